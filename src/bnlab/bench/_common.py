"""What the benchmarks share: same-process alternating timing, glibc's allocator switch, and the
setup of the scripts that time the C++ autograd node."""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from typing import Callable, Optional

import torch

__all__ = ["keep_freed_memory", "node_kernels", "median_alternating"]


def keep_freed_memory() -> None:
    """glibc ``mallopt``: serve every allocation from the heap (M_MMAP_MAX = 0) and never trim it
    (M_TRIM_THRESHOLD = 2 GiB), so freed outputs stay mapped and the next ones reuse faulted-in
    pages. Process-wide and for the rest of the process (a benchmark process)."""
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4                   # <malloc.h>
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        raise RuntimeError("--malloc keep needs glibc's mallopt (Linux with glibc)")
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        raise RuntimeError("glibc mallopt refused M_MMAP_MAX/M_TRIM_THRESHOLD")


def node_kernels(threads: int):
    """Setup of the scripts that time the C++ autograd node (benchmarks/profile_step.py,
    backward_split.py): glibc keeps freed memory, ``threads`` intra-op threads, and the compiled
    module with its node registered — or SystemExit saying why there is none."""
    from .. import kernels
    from ..kernels import dispatch
    keep_freed_memory()
    torch.set_num_threads(threads)
    k = dispatch.cpu_module()
    if k is None:
        raise SystemExit(f"needs the compiled CPU kernels ({kernels.failure()})")
    return k


def median_alternating(fns: list[Callable[[], object]], min_repeats: int, max_repeats: int,
                        budget_s: float, paired: Optional[list] = None, block: int = 1,
                        samples: Optional[list] = None) -> tuple[list[float], int]:
    """Median time per call of each fn. Each repetition runs every fn in turn, ``block``
    consecutive calls each; a repetition's sample is the median of its block. ``paired`` gets
    the per-repetition ratios fns[1]/fns[0]; ``samples`` the per-repetition times of every fn."""
    for fn in fns:                 # warm-up: allocator, thread pool, caches
        for _ in range(max(2, block)):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    repeats = 0
    while repeats < max_repeats and (repeats < min_repeats or time.perf_counter() - start < budget_s):
        for i, fn in enumerate(fns):
            calls = []
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                calls.append(time.perf_counter() - t0)
            times[i].append(statistics.median(calls))
        repeats += 1
    if paired is not None and len(fns) >= 2:
        paired.extend(b / a for a, b in zip(times[0], times[1]))
    if samples is not None:
        samples.extend(times)
    return [statistics.median(t) for t in times], repeats
