"""What several commands parse and check the same way: --threads, comma-separated integers, --device."""

from __future__ import annotations

import os
import sys

import torch
import typer

from ..errors import InputError


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """$OMP_NUM_THREADS where the user set it, else half the cores: fast enough alone, and no pile-up of spinning
    threads when another process shares the machine (the README has both measurements)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else max(1, available_cores() // 2)


DEFAULT_THREADS = default_threads()


def threads_option():
    return typer.Option(
        DEFAULT_THREADS,
        "--threads",
        min=1,
        help="Threads for torch, faiss and the tokenizers. Default: $OMP_NUM_THREADS if set, else half the cores, "
        "which stays fast when another process shares the machine (every core ran 2-13x slower then; see the "
        "README). On a machine of your own, every core is faster.",
    )


def use_threads(threads: int) -> None:
    """Give torch (now) and OpenMP / the tokenizers' pool (when they start) `threads` threads."""
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # faiss's OpenMP, if it starts after this
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # the Rust tokenizers' pool, if it starts after this
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)


def parse_ints(text: str, name: str, minimum: int = 0) -> list[int]:
    """'4096,65536' → [4096, 65536], with an error that names the option."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise InputError(f"{name} must be integers ≥ {minimum}, comma-separated, got {text!r}")
    return values


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before any model is loaded onto it."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InputError(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device: {device!r}, but no CUDA device is available here; use --device cpu")
