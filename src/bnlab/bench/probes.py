"""Overhead of each probe on the E1 MNIST MLP (784-100-100-100-10 sigmoid, bnlab BN, batch 60,
SGD): seconds per training step with the probe measuring every k steps, as a ratio to the
un-probed step measured in the same process (before and after, averaged)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn

from ..batchnorm import BatchNorm1d
from ..probes import ICS, ActivationStats, GradientFlow, HessianTopEig, Landscape, Monitor

PROBES: dict[str, Callable] = {
    "GradientFlow": lambda: GradientFlow(),
    "ActivationStats": lambda: ActivationStats(),
    "ICS": lambda: ICS(),
    "Landscape": lambda: Landscape(),
    "HessianTopEig": lambda: HessianTopEig(iters=10),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list = []
    widths = (784, 100, 100, 100, 10)
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(widths) - 2
        layers.append(nn.Linear(a, b, bias=last))
        if not last:
            layers += [BatchNorm1d(b), nn.Sigmoid()]
    return nn.Sequential(*layers)


def _seconds_per_step(probe_factory: Optional[Callable], every: int, steps: int, x, y) -> float:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    monitor = Monitor(model, loss_fn, opt, probes=[probe_factory()], every=every) if probe_factory else None
    n = len(x) // 60
    for step in range(3):                                           # warm-up
        loss_fn(model(x[:60]), y[:60]).backward()
    t0 = time.perf_counter()
    for step in range(steps):
        i = (step % n) * 60
        xb, yb = x[i:i + 60], y[i:i + 60]
        loss = loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if monitor is not None:
            monitor.observe(step, xb, yb)
        opt.step()
    return (time.perf_counter() - t0) / steps


def run(everies=(1, 10, 100), steps: int = 300, log=print, data_dir=None) -> list[dict]:
    from ..lab import data as data_mod
    torch.set_num_threads(1)
    ds = data_mod.load("mnist", data_dir)
    x, y = ds.train_x[:6000], ds.train_y[:6000]
    rows = []
    base = [_seconds_per_step(None, 1, steps, x, y)]
    for name, factory in PROBES.items():
        for k in everies:
            n = max(steps, 3 * k)
            t = _seconds_per_step(factory, k, n, x, y)
            base.append(_seconds_per_step(None, 1, steps, x, y))
            ref = statistics.median(base)
            rows.append(dict(probe=name, every=k, ms_per_step=t * 1e3, baseline_ms=ref * 1e3, ratio=t / ref))
            log(f"{name:>16} every {k:>3}: {t * 1e3:7.3f} ms/step vs {ref * 1e3:6.3f} ms un-probed → ×{t / ref:6.2f}")
    return rows


def markdown(rows: list[dict]) -> str:
    everies = sorted({r["every"] for r in rows})
    lines = ["| probe | " + " | ".join(f"k={k}" for k in everies) + " |",
             "|---|" + "---:|" * len(everies)]
    for probe in dict.fromkeys(r["probe"] for r in rows):
        ratios = {r["every"]: r["ratio"] for r in rows if r["probe"] == probe}
        lines.append(f"| {probe} | " + " | ".join(f"×{ratios[k]:.2f}" for k in everies) + " |")
    return "\n".join(lines)


def command(args) -> int:
    """``bnlab bench probes``."""
    rows = run(steps=100 if args.quick else 300)
    if args.markdown:
        print(markdown(rows))
    return 0
