"""Computing in bf16: where it pays and how. On a CPU with bf16 instructions (AVX512-BF16, AMX) autocast reads a
MiniLM memory model ~2.6× faster and trains it ~1.4× faster; on one without them (AVX2 only) bf16 runs reference
kernels, ~10× slower than fp32, so it is refused there in one warning line and fp32 is used instead."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import warn_input

PRECISIONS = ("fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def bf16_pays(device: torch.device | str) -> bool:
    """Whether bf16 runs natively on `device`: a GPU that supports it, or a CPU with bf16 instructions."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def resolve_precision(requested: str, device: torch.device | str, option: str = "precision") -> str:
    """ "fp32" or "bf16" for `requested` ("fp32", "bf16" or "auto": bf16 where it runs natively). An explicit
    "bf16" where it does not becomes "fp32", with a warning naming `option`."""
    if requested not in (*PRECISIONS, "auto"):
        raise ValueError(f"{option} must be one of {(*PRECISIONS, 'auto')}, got {requested!r}")
    if requested == "fp32":
        return "fp32"
    if bf16_pays(device):
        return "bf16"
    if requested == "bf16":
        if torch.device(device).type == "cpu":
            capability = torch.backends.cpu.get_cpu_capability()
            warn_input(f"{option} bf16: this CPU ({capability}) has no bf16 instructions and would run about 10× "
                       "slower; using fp32")  # fmt: skip
        else:
            warn_input(f"{option} bf16: {device} does not support bf16; using fp32")
    return "fp32"


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block in `precision` ("fp32": as it is; "bf16": torch's autocast on `device`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield
