"""Benchmark bnlab's BatchNorm against torch.nn.functional.batch_norm, in the same process.

For each shape, thread count and mode the two implementations take turns (so load on a shared
machine hits both alike), each turn a block of 5 consecutive calls of one implementation, timed
after warm-up. Blocks rather than single calls: a training loop calls one implementation over
and over, and the allocator and cache state it then runs in — for torch, glibc returning a
freed large output to the OS and page-faulting the next one; for bnlab, its pool of mapped
output regions — is part of its cost. Call-by-call alternation measures each in the other's
state instead, which for tensors near the L3 size moved either ratio by up to 2×
(``--block 1`` reproduces it). Reported: each median time, the ratio bnlab/torch as the median
of the *paired* per-turn ratios (each bnlab block against the torch block just before it —
robust to the slow drifts of a shared machine), and the effective bandwidth — the bytes a
perfect kernel must move divided by the time — as a fraction of a copy of the same tensor that
takes its own turn in the same repetitions (the median of per-turn fractions: a copy timed once
before the modes of a shape could land in another bandwidth phase than the calls after it).

Modes and their minimal traffic (S = bytes of the tensor):
  fwd     training-mode forward, autograd recording as in training   read x, write y   = 2S
  fwdbwd  training forward + backward                                + read x, dy, write dx = 5S
  eval    inference forward under no_grad                              read x, write y   = 2S
The copy is ``dst.copy_(src)`` into a preallocated buffer (2S): the memory system's ceiling.

torch.nn's time depends on glibc's allocator: a freed output above the (dynamic) mmap threshold
goes back to the OS, and the next one page-faults every 4 KiB page on first touch — on this
kind of machine often most of torch's time on large tensors. ``keep_freed_memory()`` (CLI
``--malloc keep``) tells glibc never to do that (no mmap'd chunks, no heap trimming), as a caching
allocator such as jemalloc or tcmalloc would: torch.nn at its best. Report both.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .. import functional as BF
from ._common import keep_freed_memory, median_alternating

DEFAULT_SHAPES: list[tuple[tuple[int, ...], bool]] = [
    ((256, 1024), False),          # small: per-call overhead
    ((4096, 1024), False),
    ((4096, 4096), False),
    ((64, 64, 28, 28), False),
    ((64, 64, 28, 28), True),
    ((64, 64, 56, 56), False),
    ((64, 64, 56, 56), True),
    ((128, 256, 14, 14), False),
]
QUICK_SHAPES: list[tuple[tuple[int, ...], bool]] = [((256, 1024), False), ((32, 64, 28, 28), False),
                                                    ((32, 64, 28, 28), True)]
MODES = ("fwd", "fwdbwd", "eval")
PASSES = {"fwd": 2, "fwdbwd": 5, "eval": 2}

BatchNormFn = Callable[..., torch.Tensor]


@dataclass
class Row:
    shape: str
    layout: str
    threads: int
    mode: str
    torch_ms: float
    bnlab_ms: float
    ratio: float                  # bnlab / torch: < 1 is faster than torch
    copy_fraction: float          # bnlab's effective bandwidth / copy bandwidth
    torch_copy_fraction: float
    copy_gbs: float
    repeats: int


def _case(impl: BatchNormFn, x: torch.Tensor, mode: str) -> Callable[[], object]:
    C = x.shape[1]
    weight = torch.ones(C, requires_grad=True)
    bias = torch.zeros(C, requires_grad=True)
    running_mean, running_var = torch.zeros(C), torch.ones(C)
    if mode == "eval":
        def run():
            with torch.no_grad():
                return impl(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5)
        return run
    x_leaf = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    if mode == "fwd":
        return lambda: impl(x_leaf, running_mean, running_var, weight, bias, True, 0.1, 1e-5)

    def run():
        y = impl(x_leaf, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
        y.backward(dy)
        x_leaf.grad = weight.grad = bias.grad = None
    return run


def run(shapes: Iterable[tuple[tuple[int, ...], bool]] = DEFAULT_SHAPES,
        threads: Iterable[int] = (1, 2), modes: Iterable[str] = MODES,
        impl: BatchNormFn = BF.batch_norm, min_repeats: int = 15, max_repeats: int = 101,
        budget_s: float = 2.5, log: Optional[Callable[[str], None]] = print, block: int = 5) -> list[Row]:
    """Time ``impl`` against torch's native BN; returns one Row per (shape, threads, mode).

    ``block`` consecutive calls of one implementation per turn (see the module docstring);
    ``block=1`` alternates call by call."""
    rows: list[Row] = []
    previous_threads = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for shape, channels_last in shapes:
                x = torch.randn(*shape)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                nbytes = x.numel() * x.element_size()
                dst = torch.empty_like(x)
                for mode in modes:
                    # the copy takes its turn in the same repetitions, so that each fraction of
                    # its bandwidth compares calls made in the same phase of a shared machine
                    ratios: list[float] = []
                    per_turn: list[list[float]] = []
                    (t_torch, t_ours, t_copy), reps = median_alternating(
                        [_case(F.batch_norm, x, mode), _case(impl, x, mode), lambda: dst.copy_(x)],
                        min_repeats, max_repeats, budget_s, paired=ratios, block=block, samples=per_turn)
                    need = PASSES[mode] * nbytes
                    copy_bytes = 2 * nbytes
                    # fraction of the copy bandwidth = (need / t) / (copy_bytes / t_copy), per turn
                    fraction = [need * tc / (copy_bytes * tb) for tb, tc in zip(per_turn[1], per_turn[2])]
                    fraction_torch = [need * tc / (copy_bytes * tt) for tt, tc in zip(per_turn[0], per_turn[2])]
                    row = Row(shape="x".join(map(str, shape)),
                              layout="channels_last" if channels_last else "contiguous",
                              threads=n_threads, mode=mode, torch_ms=t_torch * 1e3,
                              bnlab_ms=t_ours * 1e3, ratio=statistics.median(ratios),
                              copy_fraction=statistics.median(fraction),
                              torch_copy_fraction=statistics.median(fraction_torch),
                              copy_gbs=copy_bytes / t_copy / 1e9, repeats=reps)
                    rows.append(row)
                    if log:
                        log(format_row(row))
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def format_row(r: Row) -> str:
    return (f"{r.shape:>14} {r.layout:>13} t={r.threads} {r.mode:>6}: torch {r.torch_ms:8.3f} ms  "
            f"bnlab {r.bnlab_ms:8.3f} ms  ratio {r.ratio:5.2f}  "
            f"copy-bw bnlab {100 * r.copy_fraction:5.1f}% torch {100 * r.torch_copy_fraction:5.1f}%")


def markdown(rows: list[Row]) -> str:
    lines = ["| shape | layout | threads | mode | torch ms | bnlab ms | bnlab/torch | bnlab % of copy BW | torch % of copy BW |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.shape} | {r.layout} | {r.threads} | {r.mode} | {r.torch_ms:.3f} | "
                     f"{r.bnlab_ms:.3f} | {r.ratio:.2f} | {100 * r.copy_fraction:.0f}% | "
                     f"{100 * r.torch_copy_fraction:.0f}% |")
    return "\n".join(lines)


def save_json(rows: list[Row], path: str) -> None:
    with open(path, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)


def command(args) -> int:
    """``bnlab bench batchnorm``."""
    from ..errors import UsageError
    threads = [int(t) for t in (args.threads or "1,2").split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise UsageError(f"bench: unknown modes {sorted(unknown)}; choose from {MODES}")
    if args.malloc == "keep":
        keep_freed_memory()
    shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    kwargs = dict(min_repeats=3, max_repeats=5, budget_s=0.2) if args.quick else {}
    rows = run(shapes, threads, modes, block=args.block, **kwargs)
    if args.markdown:
        print(markdown(rows))
    if args.json:
        save_json(rows, args.json)
    return 0
