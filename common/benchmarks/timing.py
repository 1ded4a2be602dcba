"""The one timing helper: warm-up calls, then the median (and spread) of timed calls, and peak memory."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["peak_memory_mb", "time_call"]


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak memory in MiB: CUDA's peak allocation on ``device``, or the process's peak resident set on the CPU.

    The CPU figure is the high-water mark of the whole process since it started (the kernel keeps no per-call
    peak), so measure one configuration per process when comparing CPU memory.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_call(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    On CUDA the device is synchronised around every call (kernels run asynchronously) and the peak-memory counter
    is reset after the warm-up, so ``peak_mb`` covers the timed calls only.

    Returns:
        ``{"median_ms", "min_ms", "max_ms", "repeats", "peak_mb"}``; the median is the figure to report, min and
        max show how much the machine's load moved it.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(max(int(warmup), 0)):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(int(repeats), 1)):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(min(times), 3),
        "max_ms": round(max(times), 3),
        "repeats": len(times),
        "peak_mb": round(peak_memory_mb(device), 1),
    }
