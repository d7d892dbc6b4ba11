"""``bnlab bench e1``: E1's training loop three ways on the same config, one thread.

  bnlab    the lab's loop: all seeds of an arm as one batched model (bnlab BN), per (arm, seed)
  torch    a plain PyTorch loop: nn.Sequential with torch.nn.BatchNorm1d, one seed
  numpy    a from-scratch NumPy loop (explicit forward, closed-form backward), one seed

Config: 784-100-100-100-10 sigmoid, N(0, 0.1²) init, batch 60, SGD lr 0.1, BN before each
sigmoid (no bias there). Reports ms per step per (arm, seed), the seconds that extrapolates to
at the paper's 50,000 steps, and the ratios. Evaluation is excluded from all three.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..lab import data as data_mod
from ..lab.models import build_mlp
from ..lab.trainers import make_trainer

WIDTHS = (784, 100, 100, 100, 10)


def _seconds_per_step(step, steps: int, warmup: int = 5) -> float:
    """Mean wall time of ``step()`` over ``steps`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def _bnlab(ds, bn: bool, steps: int, seeds: int) -> float:
    spec = dict(kind="mlp", widths=list(WIDTHS), activation="sigmoid", norm="bn" if bn else "none",
                init="normal", init_std=0.1)
    trainer = make_trainer(build_mlp(spec, seeds), ds, list(range(seeds)), "x", 60, 0.1)
    counter = iter(range(steps + 5))
    return _seconds_per_step(lambda: trainer.train_step(next(counter)), steps) / seeds


def _torch(ds, bn: bool, steps: int) -> float:
    torch.manual_seed(0)
    layers: list = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        last = i == len(WIDTHS) - 2
        lin = nn.Linear(a, b, bias=last or not bn)
        nn.init.normal_(lin.weight, 0, 0.1)
        layers.append(lin)
        if not last:
            if bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.Sigmoid())
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    x_all, y_all = ds.train_x, ds.train_y

    def step():
        idx = torch.randint(0, len(x_all), (60,), generator=g)
        loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _seconds_per_step(step, steps)


def _numpy(ds, bn: bool, steps: int) -> float:
    """A from-scratch NumPy MLP: forward, closed-form BN backward, softmax cross-entropy, SGD."""
    rng = np.random.default_rng(0)
    X, Y = ds.train_x.numpy(), ds.train_y.numpy()
    W = [(rng.standard_normal((a, b)) * 0.1).astype(np.float32) for a, b in zip(WIDTHS[:-1], WIDTHS[1:])]
    b = [np.zeros(o, np.float32) for o in WIDTHS[1:]]
    gamma = [np.ones(o, np.float32) for o in WIDTHS[1:-1]]
    beta = [np.zeros(o, np.float32) for o in WIDTHS[1:-1]]
    lr, eps, L = np.float32(0.1), np.float32(1e-5), len(W)

    def step():
        idx = rng.integers(0, len(X), 60)
        h, y = X[idx], Y[idx]
        cache = []
        for l in range(L):
            z = h @ W[l]
            if l == L - 1 or not bn:
                z = z + b[l]
            if l < L - 1:
                if bn:
                    mu = z.mean(0)
                    zc = z - mu
                    invstd = 1.0 / np.sqrt((zc * zc).mean(0) + eps)
                    xhat = zc * invstd
                    z = gamma[l] * xhat + beta[l]
                    cache.append((h, xhat, invstd))
                else:
                    cache.append((h, None, None))
                h = 1.0 / (1.0 + np.exp(-z))
                cache[-1] += (h,)
            else:
                cache.append((h,))
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(60), y] -= 1
        dz = p / 60
        for l in range(L - 1, -1, -1):
            h_in = cache[l][0]
            if l < L - 1:
                _, xhat, invstd, a = cache[l]
                dz = dz * a * (1 - a)                                   # through the sigmoid
                if bn:
                    dgamma, dbeta = (dz * xhat).sum(0), dz.sum(0)
                    dz = gamma[l] * invstd * (dz - dz.mean(0) - xhat * (dz * xhat).mean(0))
                    gamma[l] -= lr * dgamma
                    beta[l] -= lr * dbeta
            dW = h_in.T @ dz
            if l == L - 1 or not bn:
                b[l] -= lr * dz.sum(0)
            if l > 0:
                dz_prev = dz @ W[l].T
            W[l] -= lr * dW
            if l > 0:
                dz = dz_prev
    return _seconds_per_step(step, steps)


def _time_one(impl: str, bn: bool, steps: int, seeds: int) -> float:
    torch.set_num_threads(1)
    ds = data_mod.load("mnist")
    if impl == "bnlab":
        return _bnlab(ds, bn, steps, seeds)
    if impl == "torch":
        return _torch(ds, bn, steps)
    return _numpy(ds, bn, steps)


def _subprocess(impl: str, bn: bool, steps: int, seeds: int) -> float:
    """Each loop in a fresh process with every BLAS/OpenMP pool at one thread (numpy's OpenBLAS
    would otherwise use all cores: the comparison is one thread each)."""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    code = ("import json,sys; from bnlab.bench.e1 import _time_one; "
            f"print(json.dumps(_time_one({impl!r}, {bn!r}, {steps}, {seeds})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(steps: int = 5000, seeds: int = 3, markdown: bool = False, log=print) -> list[dict]:
    rows = []
    for bn in (True, False):
        arm = "BN" if bn else "no BN"
        t_bnlab = _subprocess("bnlab", bn, steps, seeds)
        t_torch = _subprocess("torch", bn, steps, seeds)
        t_numpy = _subprocess("numpy", bn, steps, seeds)
        row = dict(arm=arm, bnlab_ms=t_bnlab * 1e3, torch_ms=t_torch * 1e3, numpy_ms=t_numpy * 1e3,
                   bnlab_50k_s=t_bnlab * 50_000, torch_50k_s=t_torch * 50_000, numpy_50k_s=t_numpy * 50_000)
        rows.append(row)
        log(f"E1 {arm:>5}, per (arm, seed), {steps} steps, one thread: bnlab {t_bnlab * 1e3:.3f} ms/step "
            f"({t_bnlab * 5e4:.0f} s at 50k) | plain PyTorch {t_torch * 1e3:.3f} ms ({t_torch * 5e4:.0f} s) | "
            f"NumPy {t_numpy * 1e3:.3f} ms ({t_numpy * 5e4:.0f} s) | bnlab/torch {t_bnlab / t_torch:.2f}, "
            f"bnlab/numpy {t_bnlab / t_numpy:.2f}")
    if markdown:
        print("| arm | bnlab s/50k | plain PyTorch s/50k | NumPy s/50k | bnlab/PyTorch | bnlab/NumPy |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['arm']} | {r['bnlab_50k_s']:.0f} | {r['torch_50k_s']:.0f} | {r['numpy_50k_s']:.0f} | "
                  f"{r['bnlab_ms'] / r['torch_ms']:.2f} | {r['bnlab_ms'] / r['numpy_ms']:.2f} |")
    return rows


def command(args) -> int:
    """``bnlab bench e1``."""
    run(steps=500 if args.quick else 5000, markdown=args.markdown)
    return 0
