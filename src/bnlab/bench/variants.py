"""Each normalization variant against bnlab's BatchNorm on the same input, in one process.

For every thread count, shape (2-D, NCHW and channels_last) and mode — training forward +
backward, and inference (eval, no autograd) — the variant and BatchNorm take turns (3 calls each
per turn, the order alternating), and the ratio is the median of the per-turn ratios: load on the
shared machine moves both sides of a turn together. ``--quick`` takes fewer turns.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import torch

from .. import variants as V
from ..batchnorm import BatchNorm1d, BatchNorm2d

SHAPES = (((256, 512), None), ((64, 64, 28, 28), None), ((64, 64, 28, 28), torch.channels_last))
MODES = ("fwdbwd", "eval")


def _layers(C: int, image: bool) -> dict[str, Callable[[], torch.nn.Module]]:
    if image:
        bn, ghost, renorm, lp, noisy, detached = (BatchNorm2d, V.GhostBatchNorm2d, V.BatchRenorm2d, V.LpNorm2d,
                                                  V.NoisyBatchNorm2d, V.DetachedNorm2d)
        v, v_rem = 16, 24
    else:
        bn, ghost, renorm, lp, noisy, detached = (BatchNorm1d, V.GhostBatchNorm1d, V.BatchRenorm1d, V.LpNorm1d,
                                                  V.NoisyBatchNorm1d, V.DetachedNorm)
        v, v_rem = 32, 48
    return {
        "BatchNorm (reference)": lambda: bn(C),
        "BatchRenorm": lambda: renorm(C, warmup=False),
        f"Ghost BN (v={v})": lambda: ghost(C, virtual_batch_size=v),
        f"Ghost BN (v={v_rem}, remainder)": lambda: ghost(C, virtual_batch_size=v_rem),
        "Detached (center)": lambda: detached(C),
        "Detached (center, scale)": lambda: detached(C, scale=True),
        "FrozenBatchNorm": lambda: V.FrozenBatchNorm(C),
        "Noisy BN": lambda: noisy(C),
        "ℓ1": lambda: lp(C, p=1),
        "ℓ2": lambda: lp(C, p=2),
        "ℓ∞": lambda: lp(C, p="inf"),
        "ZCA (G=16)": lambda: V.DecorrelatedBatchNorm(C, group_size=16),
        "ZCA (G=64)": lambda: V.DecorrelatedBatchNorm(C, group_size=64),
        "PCA (G=16)": lambda: V.DecorrelatedBatchNorm(C, group_size=16, whitening="pca"),
        "IterNorm (G=16, T=5)": lambda: V.IterNorm(C, group_size=16),
        "IterNorm (G=64, T=5)": lambda: V.IterNorm(C, group_size=64),
    }


def _call(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode == "eval":
        layer.eval()

        def run():
            with torch.no_grad():
                layer(x)
        return run
    layer.train()
    xg = x.detach().requires_grad_()

    def run():
        xg.grad = None
        layer(xg).backward(dy)
    return run


def _timed(fn: Callable[[], None], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def run(threads=(1, 2), repeats: int = 15, calls: int = 3, log=print) -> list[dict]:
    rows = []
    before = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            for shape, fmt in SHAPES:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(*shape, generator=g)
                dy = torch.randn(*shape, generator=g)
                if fmt is not None:
                    x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
                label = "x".join(map(str, shape)) + (" channels_last" if fmt is not None else "")
                layers = _layers(shape[1], len(shape) == 4)
                reference = next(iter(layers))
                for mode in MODES:
                    ref = _call(layers[reference](), x, dy, mode)
                    for name, make in layers.items():
                        if name == reference:
                            continue
                        fn = _call(make(), x, dy, mode)
                        for f in (ref, fn, ref, fn):
                            f()
                        ratios, t_ref, t_var = [], [], []
                        for i in range(repeats):
                            pair = (ref, fn) if i % 2 == 0 else (fn, ref)
                            times = {id(f): _timed(f, calls) for f in pair}
                            t_ref.append(times[id(ref)])
                            t_var.append(times[id(fn)])
                            ratios.append(times[id(fn)] / times[id(ref)])
                        row = dict(threads=t, shape=label, mode=mode, layer=name,
                                   ms=statistics.median(t_var) * 1e3, bn_ms=statistics.median(t_ref) * 1e3,
                                   ratio=statistics.median(ratios))
                        rows.append(row)
                        log(f"{t}t {label:>24} {mode:>6} {name:<28} {row['ms']:8.3f} ms  ×{row['ratio']:5.2f} "
                            f"(BatchNorm {row['bn_ms']:.3f} ms)")
    finally:
        torch.set_num_threads(before)
    return rows


def markdown(rows: list[dict]) -> str:
    """One table per mode: a row per variant, a column per (threads, shape), × bnlab's BatchNorm."""
    out = []
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode]
        cols = list(dict.fromkeys((r["threads"], r["shape"]) for r in sel))
        names = list(dict.fromkeys(r["layer"] for r in sel))
        title = "training forward + backward" if mode == "fwdbwd" else "inference (eval, no autograd)"
        out.append(f"**{title}**, × bnlab BatchNorm (median of paired turns)\n")
        out.append("| variant | " + " | ".join(f"{t}t {s}" for t, s in cols) + " |")
        out.append("|---|" + "---:|" * len(cols))
        for name in names:
            cells = {(r["threads"], r["shape"]): r["ratio"] for r in sel if r["layer"] == name}
            out.append(f"| {name} | " + " | ".join(f"{cells[c]:.2f}" if c in cells else "" for c in cols) + " |")
        out.append("")
    return "\n".join(out)


def command(args) -> int:
    """``bnlab bench variants``."""
    threads = tuple(int(t) for t in (args.threads or "1,2").split(","))
    rows = run(threads=threads, repeats=3 if args.quick else 15)
    if args.markdown:
        print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
