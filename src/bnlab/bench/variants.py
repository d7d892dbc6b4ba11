"""Forward+backward time of each normalization variant vs bnlab's BatchNorm on the same input,
measured alternately in one process (median over repeats)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from .. import variants as V
from ..batchnorm import BatchNorm1d, BatchNorm2d

SHAPES = ((256, 512), (64, 64, 28, 28))


def _layers(C: int, two_d: bool) -> dict[str, Callable[[], torch.nn.Module]]:
    if two_d:
        return {
            "BatchNorm2d (reference)": lambda: BatchNorm2d(C),
            "BatchRenorm2d": lambda: V.BatchRenorm2d(C, warmup=False),
            "GhostBatchNorm2d (v=16)": lambda: V.GhostBatchNorm2d(C, virtual_batch_size=16),
            "LpNorm2d (p=1)": lambda: V.LpNorm2d(C, p=1),
            "LpNorm2d (p=inf)": lambda: V.LpNorm2d(C, p="inf"),
            "NoisyBatchNorm2d": lambda: V.NoisyBatchNorm2d(C),
            "DetachedNorm2d": lambda: V.DetachedNorm2d(C, scale=True),
            "DecorrelatedBN ZCA (G=16)": lambda: V.DecorrelatedBatchNorm(C, group_size=16),
            "DecorrelatedBN PCA (G=16)": lambda: V.DecorrelatedBatchNorm(C, group_size=16, whitening="pca"),
            "IterNorm (G=16, T=5)": lambda: V.IterNorm(C, group_size=16),
            "FrozenBatchNorm": lambda: V.FrozenBatchNorm(C),
        }
    return {
        "BatchNorm1d (reference)": lambda: BatchNorm1d(C),
        "BatchRenorm1d": lambda: V.BatchRenorm1d(C, warmup=False),
        "GhostBatchNorm1d (v=32)": lambda: V.GhostBatchNorm1d(C, virtual_batch_size=32),
        "LpNorm1d (p=1)": lambda: V.LpNorm1d(C, p=1),
        "LpNorm1d (p=2)": lambda: V.LpNorm1d(C, p=2),
        "LpNorm1d (p=inf)": lambda: V.LpNorm1d(C, p="inf"),
        "NoisyBatchNorm1d": lambda: V.NoisyBatchNorm1d(C),
        "DetachedNorm": lambda: V.DetachedNorm(C, scale=True),
        "DecorrelatedBN ZCA (G=16)": lambda: V.DecorrelatedBatchNorm(C, group_size=16),
        "DecorrelatedBN PCA (G=16)": lambda: V.DecorrelatedBatchNorm(C, group_size=16, whitening="pca"),
        "IterNorm (G=16, T=5)": lambda: V.IterNorm(C, group_size=16),
        "FrozenBatchNorm": lambda: V.FrozenBatchNorm(C),
    }


def _step(layer, x, dy):
    def run():
        x.grad = None
        y = layer(x)
        y.backward(dy)
    return run


def run(repeats: int = 15, log=print) -> list[dict]:
    rows = []
    for shape in SHAPES:
        x = torch.randn(*shape, requires_grad=True)
        dy = torch.randn(*shape)
        layers = _layers(shape[1], len(shape) == 4)
        ref_name = next(iter(layers))
        ref = _step(layers[ref_name]().train(), x, dy)
        for name, make in layers.items():
            fn = _step(make().train(), x, dy)
            for f in (ref, fn, ref, fn):
                f()
            t_ref, t = [], []
            for _ in range(repeats):
                for f, out in ((ref, t_ref), (fn, t)):
                    t0 = time.perf_counter()
                    f()
                    out.append(time.perf_counter() - t0)
            m_ref, m = statistics.median(t_ref), statistics.median(t)
            rows.append(dict(shape="x".join(map(str, shape)), layer=name, ms=m * 1e3, ratio=m / m_ref))
            log(f"{rows[-1]['shape']:>12} {name:<28} fwd+bwd {m * 1e3:8.2f} ms  ×{m / m_ref:6.2f} vs BatchNorm")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | layer | fwd+bwd ms | × bnlab BatchNorm |", "|---|---|---:|---:|"]
    lines += [f"| {r['shape']} | {r['layer']} | {r['ms']:.2f} | {r['ratio']:.2f} |" for r in rows]
    return "\n".join(lines)


def command(args) -> int:
    """``bnlab bench variants``."""
    torch.set_num_threads(int((args.threads or "2").split(",")[-1]))
    rows = run(repeats=5 if args.quick else 15)
    if args.markdown:
        print(markdown(rows))
    return 0
