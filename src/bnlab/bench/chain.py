"""BatchNorm inside a network: L blocks of (BN, ReLU), trained, bnlab's BN against torch.nn's.

The single-layer benchmark (``bnlab bench batchnorm``) is BN's worst case and its cleanest
measurement, but it is not how BN runs in a network: there the next layer reads y at once (so an
output left in cache pays off), and the gradient dy arrives fresh from the layer above's backward
and is dead after BN's (so the C++ node writes dx over it, ``kernels.calls["backward_train_inplace"]``),
where the single-layer loop passes a dy the caller keeps. This benchmark runs

    h = x;  for each of L blocks: h = relu(BN(h))          (training mode, running statistics)
    h.backward(dy)

with ``torch.nn.functional.batch_norm`` and with ``bnlab.functional.batch_norm`` (ReLU is
torch's in both), and times the forward and the backward of each step separately.

Method (as in bench/batchnorm.py): torch and bnlab take turns, each turn ``block`` consecutive steps, the
order rotating from repetition to repetition (whichever runs first after the switch pays for
it, so none always does); a turn's sample is the median of its steps, and each ratio is the
median over repetitions of bnlab's turn against the torch turn of the same repetition.
``ablate`` (CLI ``--ablate``) adds bnlab with dx over dy switched off as a third contender.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .. import functional as BF
from .. import kernels
from ._common import keep_freed_memory
from .batchnorm import save_json as _save_json

SHAPES: list[tuple[tuple[int, ...], bool]] = [
    ((256, 1024), False),
    ((4096, 1024), False),
    ((64, 64, 28, 28), False),
    ((64, 64, 28, 28), True),
    ((128, 256, 14, 14), False),
]
QUICK_SHAPES: list[tuple[tuple[int, ...], bool]] = [((256, 64), False), ((8, 16, 10, 10), True)]


@dataclass
class Row:
    shape: str
    layout: str
    threads: int
    layers: int
    torch_fwd_ms: float
    torch_bwd_ms: float
    bnlab_fwd_ms: float
    bnlab_bwd_ms: float
    ratio_fwd: float              # bnlab / torch, medians of paired turns: < 1 is faster than torch
    ratio_bwd: float
    ratio: float                  # forward + backward
    inplace_fraction: float       # bnlab BN backwards that wrote dx over dy
    turns: int
    # with ablate=True: the same ratios for bnlab with dx over dy switched off (kernels.dx_over_dy)
    ratio_bwd_without: Optional[float] = None
    ratio_without: Optional[float] = None
    # page faults per step (median): fresh pages torch's or bnlab's outputs had to fault in
    torch_faults: float = 0.0
    bnlab_faults: float = 0.0
    faults_without: Optional[float] = None


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _chain(impl: Callable[..., torch.Tensor], x: torch.Tensor, layers: int,
           seed: int = 0) -> Callable[[], tuple[float, float, float]]:
    """One training step of the chain with BN ``impl``; returns (forward s, backward s, page
    faults of the step — fresh memory the allocators had to map, read outside the timed parts)."""
    C = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    weights = [(torch.rand(C, generator=g) + 0.5).requires_grad_() for _ in range(layers)]
    biases = [(0.1 * torch.randn(C, generator=g)).requires_grad_() for _ in range(layers)]
    running = [(torch.zeros(C), torch.ones(C)) for _ in range(layers)]
    x_leaf = x.detach().clone().requires_grad_()
    dy = torch.randn(x.shape, generator=g).contiguous(memory_format=_format_of(x))
    params = weights + biases

    def step() -> tuple[float, float, float]:
        faults = _minor_faults()
        t0 = time.perf_counter()
        h = x_leaf
        for w, b, (rm, rv) in zip(weights, biases, running):
            h = torch.relu(impl(h, rm, rv, w, b, True, 0.1, 1e-5))
        t1 = time.perf_counter()
        h.backward(dy)
        t2 = time.perf_counter()
        x_leaf.grad = None
        for p in params:
            p.grad = None
        return t1 - t0, t2 - t1, float(_minor_faults() - faults)
    return step


def _format_of(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _without_dx_over_dy(step: Callable[[], tuple[float, float, float]]) -> Callable[[], tuple[float, float, float]]:
    def run() -> tuple[float, float, float]:
        with kernels.dx_over_dy(False):
            return step()
    return run


def run(shapes: Iterable[tuple[tuple[int, ...], bool]] = SHAPES, threads: Iterable[int] = (2,),
        layers: int = 4, block: int = 3, min_turns: int = 10, max_turns: int = 41, budget_s: float = 4.0,
        ablate: bool = False, log: Optional[Callable[[str], None]] = print) -> list[Row]:
    """One Row per (threads, shape). ``ablate`` adds a third contender, bnlab with dx over dy
    switched off, in the same turns (its ratios against the same torch turns)."""
    rows: list[Row] = []
    previous_threads = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for shape, channels_last in shapes:
                x = torch.randn(*shape)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                steps = {"torch": _chain(F.batch_norm, x, layers), "bnlab": _chain(BF.batch_norm, x, layers)}
                if ablate:
                    steps["without"] = _without_dx_over_dy(_chain(BF.batch_norm, x, layers))
                for fn in steps.values():                        # warm-up: allocator, pool, threads
                    for _ in range(3):
                        fn()
                samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in steps}
                counted = {"bnlab": 0}                           # bnlab's own backwards, for the fraction
                inplace = 0
                names = list(steps)
                start, turns = time.perf_counter(), 0
                while turns < max_turns and (turns < min_turns or time.perf_counter() - start < budget_s):
                    order = names[turns % len(names):] + names[:turns % len(names)]   # rotate who goes first
                    for name in order:
                        backward_before = kernels.calls["backward_train"]
                        inplace_before = kernels.calls["backward_train_inplace"]
                        block_times = [steps[name]() for _ in range(block)]
                        if name == "bnlab":
                            counted["bnlab"] += kernels.calls["backward_train"] - backward_before
                            inplace += kernels.calls["backward_train_inplace"] - inplace_before
                        samples[name].append(tuple(statistics.median(t[i] for t in block_times) for i in range(3)))
                    turns += 1
                backwards = counted["bnlab"]

                def ratio(part: Callable[[tuple[float, float, float]], float], name: str = "bnlab") -> float:
                    return statistics.median(part(b) / part(t) for t, b in zip(samples["torch"], samples[name]))

                def median_ms(name: str, i: int) -> float:
                    return 1e3 * statistics.median(s[i] for s in samples[name])

                def median_faults(name: str) -> float:
                    return statistics.median(s[2] for s in samples[name])

                row = Row(shape="x".join(map(str, shape)), layout="channels_last" if channels_last else "contiguous",
                          threads=n_threads, layers=layers,
                          torch_fwd_ms=median_ms("torch", 0), torch_bwd_ms=median_ms("torch", 1),
                          bnlab_fwd_ms=median_ms("bnlab", 0), bnlab_bwd_ms=median_ms("bnlab", 1),
                          ratio_fwd=ratio(lambda s: s[0]), ratio_bwd=ratio(lambda s: s[1]),
                          ratio=ratio(lambda s: s[0] + s[1]),
                          inplace_fraction=inplace / backwards if backwards else 0.0, turns=turns,
                          ratio_bwd_without=ratio(lambda s: s[1], "without") if ablate else None,
                          ratio_without=ratio(lambda s: s[0] + s[1], "without") if ablate else None,
                          torch_faults=median_faults("torch"), bnlab_faults=median_faults("bnlab"),
                          faults_without=median_faults("without") if ablate else None)
                rows.append(row)
                if log:
                    log(format_row(row))
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def format_row(r: Row) -> str:
    return (f"{r.shape:>14} {r.layout:>13} t={r.threads} {r.layers}x(BN,ReLU): "
            f"torch fwd {r.torch_fwd_ms:7.3f} bwd {r.torch_bwd_ms:7.3f} ms  "
            f"bnlab fwd {r.bnlab_fwd_ms:7.3f} bwd {r.bnlab_bwd_ms:7.3f} ms  "
            f"ratio fwd {r.ratio_fwd:4.2f} bwd {r.ratio_bwd:4.2f} fwd+bwd {r.ratio:4.2f}  "
            f"dx over dy {100 * r.inplace_fraction:3.0f}%"
            + (f"  without it: bwd {r.ratio_bwd_without:4.2f} fwd+bwd {r.ratio_without:4.2f}"
               if r.ratio_without is not None else "")
            + f"  page faults/step torch {r.torch_faults:.0f} bnlab {r.bnlab_faults:.0f}"
            + (f" without {r.faults_without:.0f}" if r.faults_without is not None else ""))


def markdown(rows: list[Row]) -> str:
    ablated = any(r.ratio_without is not None for r in rows)
    lines = ["| shape | layout | threads | torch fwd / bwd ms | bnlab fwd / bwd ms | fwd | bwd | fwd+bwd | dx over dy |"
             + (" bwd without it | fwd+bwd without it |" if ablated else "")
             + " page faults / step: torch, bnlab" + (", without" if ablated else "") + " |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if ablated else "") + "---:|"]
    for r in rows:
        line = (f"| {r.shape} | {r.layout} | {r.threads} | {r.torch_fwd_ms:.3f} / {r.torch_bwd_ms:.3f} | "
                f"{r.bnlab_fwd_ms:.3f} / {r.bnlab_bwd_ms:.3f} | {r.ratio_fwd:.2f} | {r.ratio_bwd:.2f} | "
                f"{r.ratio:.2f} | {100 * r.inplace_fraction:.0f}% |")
        if ablated:
            line += (f" {r.ratio_bwd_without:.2f} | {r.ratio_without:.2f} |" if r.ratio_without is not None
                     else " | |")
        line += f" {r.torch_faults:.0f}, {r.bnlab_faults:.0f}"
        line += (f", {r.faults_without:.0f} |" if r.faults_without is not None else " |")
        lines.append(line)
    return "\n".join(lines)


save_json = _save_json               # rows of any dataclass


def command(args) -> int:
    """``bnlab bench chain``."""
    if args.malloc == "keep":
        keep_freed_memory()
    threads = [int(t) for t in (args.threads or "2").split(",")]
    kwargs = dict(min_turns=2, max_turns=3, budget_s=0.1, block=1) if args.quick else {}
    rows = run(QUICK_SHAPES if args.quick else SHAPES, threads, ablate=args.ablate, **kwargs)
    if args.markdown:
        print(markdown(rows))
    if args.json:
        save_json(rows, args.json)
    return 0
