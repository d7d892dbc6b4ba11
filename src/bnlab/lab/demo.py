"""A one-minute demo: a small sigmoid MLP on real MNIST, with and without bnlab's BatchNorm."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..batchnorm import BatchNorm1d
from . import data as data_mod


def mlp(batchnorm: bool, widths=(784, 100, 100, 100, 10)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(widths) - 2
        layers.append(nn.Linear(fan_in, fan_out, bias=last or not batchnorm))
        if not last:
            if batchnorm:
                layers.append(BatchNorm1d(fan_out))
            layers.append(nn.Sigmoid())
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def run(steps: int = 3000, batch: int = 60, lr: float = 0.1, seed: int = 0, data_dir=None) -> dict:
    torch.set_num_threads(1)
    ds = data_mod.load("mnist", data_dir)
    print(f"MNIST from {ds.source}: {len(ds.train_x)} train / {len(ds.test_x)} test images")
    results = {}
    for bn in (False, True):
        torch.manual_seed(seed)
        model = mlp(bn)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        curve = []
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(ds.train_x), (batch,), generator=g)
            loss = nn.functional.cross_entropy(model(ds.train_x[idx]), ds.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % (steps // 3) == 0:
                curve.append((step, accuracy(model, ds.test_x, ds.test_y)))
        name = "with BN" if bn else "without BN"
        results[name] = curve
        print(f"  {name:>10}: test accuracy " + ", ".join(f"{a:.3f} @ {s}" for s, a in curve)
              + f"  ({time.perf_counter() - t0:.1f}s)")
    (s0, with_bn), (_, without) = results["with BN"][0], results["without BN"][0]
    print(f"At step {s0}: {with_bn:.3f} with BN vs {without:.3f} without "
          f"(Ioffe & Szegedy Fig. 1a: BN trains faster).")
    return results
