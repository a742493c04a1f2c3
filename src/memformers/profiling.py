"""Peak memory of a block of code, on the GPU and on the CPU, so benchmarks and tests can show it stays flat.

On CUDA the allocator's own peak counter is used. The CPU allocator keeps no such counter, so `PeakMemory`
watches every tensor an operator creates (a `TorchDispatchMode`) and tracks the bytes of storages still alive:
an exact, deterministic count of activation memory (parameters that existed before are not counted).
Measured under `torch.no_grad()`, as tensors kept only by autograd are invisible to it.
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _LiveTensorBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer → [live tensors, bytes]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def _track(self, tensor: torch.Tensor, is_view: bool) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        entry = self.live.get(key)
        if entry is None and is_view:  # a view of memory allocated before the meter started
            return
        if entry is None:
            self.live[key] = [1, size]
            self.current += size
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self._track(item, func.is_view)
        return out


class PeakMemory:
    """`with PeakMemory(device) as meter: …` then `meter.peak_bytes`: the most memory the block held at once."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._mode: _LiveTensorBytes | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _LiveTensorBytes()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak


def reset_peak_rss() -> bool:
    """Reset the process's resident-memory high-water mark (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The process's resident-memory high-water mark (VmHWM, Linux), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def keep_freed_memory(bytes_kept: int = 1 << 30) -> bool:
    """Ask glibc to keep freed buffers up to `bytes_kept` instead of returning them to the OS at once.

    Training frees and re-allocates the same large activation and logit buffers every step; glibc's defaults hand
    each back with munmap/trim and fault the pages in again the next step. On a small decoder this made a CPU
    training step ~1.4× faster. Returns False where the C library is not glibc (nothing changes there).
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, bytes_kept)) and bool(mallopt(m_trim_threshold, 2 * bytes_kept))


def stream_throughput(
    model, token_chunks, callback=None
) -> tuple[float, int, int | None]:  # tokens/s, peak activation bytes, peak resident bytes
    """Stream one document (an iterator of id chunks) through `model` without a graph; `callback` is the driver's
    progress callback (segments done, total or None, tokens done)."""
    from .segments import stream_segments

    reset_peak_rss()
    tokens = 0
    start = time.perf_counter()
    with torch.no_grad(), PeakMemory() as meter:
        for segment, _, _ in model.stream(stream_segments(token_chunks, model.content_size), callback=callback):
            tokens += segment.input_ids.shape[1]
    return tokens / (time.perf_counter() - start), meter.peak_bytes, peak_rss_bytes()
