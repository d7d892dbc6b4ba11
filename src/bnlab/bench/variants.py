"""Each normalization variant against bnlab's BatchNorm on the same input, in one process.

For every thread count, shape (2-D, NCHW and channels_last) and mode — training forward +
backward, and inference (eval, no autograd) — the variant and BatchNorm take turns (3 calls each
per turn, the order alternating), and the ratio is the median of the per-turn ratios: load on the
shared machine moves both sides of a turn together. ``--quick`` takes fewer turns.

Two floors follow, the measured bounds where a target is out of reach: what a whitening step
cannot do without (the eigendecomposition or Newton iterations, and 4.5·G multiply-adds per value
at the rate of torch's own matrix product), and Noisy BN's random draws (its counter-based
generator in the kernel, no data touched), each × BN's step on the same input.
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


def whitening_floor(threads=(1, 2), repeats: int = 9, log=print) -> list[dict]:
    """What a whitening training step cannot do without, timed against BN's step on the same input
    (NCHW): the batched eigendecomposition of the g groups' G×G covariances (ZCA, PCA) or IterNorm's
    T = 5 Newton iterations on them (three small products each), and the data-sized arithmetic —
    the covariance (G/2 multiply-adds per value), the apply (G), and in the backward Σ dy·(x − μ)ᵀ
    (G) and dx = Wᵀdy + S·x (2G): 4.5·G multiply-adds per value, timed at the rate torch's own
    matrix product reaches on this core (a 512² float32 GEMM, in cache). ``floor`` is what a step
    needs, × BN's step — a lower bound: it leaves out every byte moved. IterNorm's iterations are
    timed as a step runs them: on the compiled kernels, forward and backward (torch's products,
    forward only, where the kernels are absent); so is ZCA's Jacobi on the kernels, which a ZCA step
    takes instead of the eigendecomposition for G ≤ 16 (timed at G = 64 too: why not there)."""
    from ..kernels import dispatch
    module = dispatch.cpu_module()
    rows = []
    before = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            sq = torch.randn(512, 512)
            gemm_s = statistics.median(_timed(lambda: sq @ sq, 3) for _ in range(repeats))
            rate = 512 ** 3 / gemm_s                                                    # multiply-adds / s
            for shape in ((256, 512), (64, 64, 28, 28)):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(*shape, generator=g)
                dy = torch.randn(*shape, generator=g)
                bn = _call((BatchNorm2d if len(shape) == 4 else BatchNorm1d)(shape[1]), x, dy, "fwdbwd")
                C = shape[1]
                X = x.transpose(0, 1).reshape(C, -1)                                    # C, M
                for G in (16, 64):
                    A = (X - X.mean(1, keepdim=True)).reshape(C // G, G, -1).contiguous()  # g, G, M
                    S = torch.bmm(A, A.transpose(1, 2)) / A.shape[-1] + 1e-5 * torch.eye(G)
                    P = torch.eye(G).expand_as(S).contiguous()

                    def newton():
                        if module is not None:          # the iterations and their backward, as a step runs them
                            module.newton_inv_sqrt_backward(P, S, module.newton_inv_sqrt(S, 5)[1])
                            return
                        Q = P
                        for _ in range(5):
                            Q = 1.5 * Q - 0.5 * Q @ Q @ Q @ S
                    def jacobi():                       # ZCA's Σ^(−½) and its backward, as a step runs them (G ≤ 16)
                        _, Dm, sv = module.zca_inv_sqrt(S)
                        module.zca_inv_sqrt_backward(P, Dm, sv)
                    parts = {"bn": bn, "eigh": lambda: torch.linalg.eigh(S), "newton": newton}
                    if module is not None:
                        parts["jacobi"] = jacobi
                    for f in parts.values():
                        f()
                    ms = {k: statistics.median(_timed(f, 3) for _ in range(repeats)) * 1e3 for k, f in parts.items()}
                    ms["madds"] = 4.5 * G * x.numel() / rate * 1e3
                    zca_ms = ms["jacobi"] if "jacobi" in ms and G <= 16 else ms["eigh"]
                    label = "x".join(map(str, shape))
                    row = dict(threads=t, shape=label, G=G, bn_ms=ms["bn"], eigh_ms=ms["eigh"],
                               jacobi_ms=ms.get("jacobi"), newton_ms=ms["newton"], madds_ms=ms["madds"],
                               gemm_gmadds=rate / 1e9, pca_floor=(ms["eigh"] + ms["madds"]) / ms["bn"],
                               zca_floor=(zca_ms + ms["madds"]) / ms["bn"],
                               iternorm_floor=(ms["newton"] + ms["madds"]) / ms["bn"])
                    rows.append(row)
                    log(f"{t}t {label:>12} G={G:<3} BN {ms['bn']:.3f} ms  eigh {ms['eigh']:.3f}  Jacobi "
                        f"{zca_ms:.3f}  newton {ms['newton']:.3f}  4.5·G multiply-adds/value {ms['madds']:.3f} "
                        f"(at {rate / 1e9:.1f} G/s)  floor PCA ×{row['pca_floor']:.2f}  ZCA ×{row['zca_floor']:.2f}  "
                        f"IterNorm ×{row['iternorm_floor']:.2f}")
    finally:
        torch.set_num_threads(before)
    return rows


def noise_floor(threads=(1, 2), repeats: int = 9, log=print) -> list[dict]:
    """Noisy BN's draws alone — Philox4x32-10 and Box–Muller for a normal and a uniform value per
    activation, in the compiled kernel, no data read or written — timed against BN's training step
    on the same shape: the layer's step cannot cost less than BN's plus its draws."""
    from ..kernels import dispatch
    module = dispatch.cpu_module()
    if module is None:
        log("Noisy BN's floor: no compiled CPU kernels, skipped")
        return []
    rows = []
    before = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            for shape, fmt in SHAPES[:2]:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(*shape, generator=g)
                dy = torch.randn(*shape, generator=g)
                bn = _call((BatchNorm2d if len(shape) == 4 else BatchNorm1d)(shape[1]), x, dy, "fwdbwd")

                def draws():
                    module.control.noise_draws(x.numel(), 0, 1)
                for f in (bn, draws):
                    f()
                ms = {k: statistics.median(_timed(f, 3) for _ in range(repeats)) * 1e3
                      for k, f in (("bn", bn), ("draws", draws))}
                label = "x".join(map(str, shape))
                rows.append(dict(threads=t, shape=label, bn_ms=ms["bn"], draws_ms=ms["draws"],
                                 draws_ratio=ms["draws"] / ms["bn"], floor=1 + ms["draws"] / ms["bn"]))
                log(f"{t}t {label:>12} BN {ms['bn']:.3f} ms  the draws {ms['draws']:.3f} ms  "
                    f"×{ms['draws'] / ms['bn']:.2f}  floor ×{1 + ms['draws'] / ms['bn']:.2f}")
    finally:
        torch.set_num_threads(before)
    return rows


def floor_markdown(rows: list[dict]) -> str:
    out = ["**whitening's floor** (ms; floor = what one training step needs, × bnlab BatchNorm's step; "
           "the multiply-adds at the rate of torch's 512² GEMM on the same threads)\n",
           "| threads | shape | G | BN step | eigh (all groups) | Jacobi + backward (kernels; ZCA's for G ≤ 16) "
           "| 5 Newton iterations (+ backward on the kernels) | 4.5·G multiply-adds per value "
           "| PCA floor (eigh + multiply-adds) | ZCA floor (Jacobi for G ≤ 16, else eigh, + multiply-adds) "
           "| IterNorm floor (Newton + multiply-adds) |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        jacobi = f"{r['jacobi_ms']:.3f}" if r.get("jacobi_ms") is not None else "—"
        out.append(f"| {r['threads']} | {r['shape']} | {r['G']} | {r['bn_ms']:.3f} | {r['eigh_ms']:.3f} | {jacobi} | "
                   f"{r['newton_ms']:.3f} | {r['madds_ms']:.3f} | {r['pca_floor']:.2f}× | {r['zca_floor']:.2f}× | "
                   f"{r['iternorm_floor']:.2f}× |")
    return "\n".join(out) + "\n"


def noise_markdown(rows: list[dict]) -> str:
    out = ["**Noisy BN's floor**: the draws alone (Philox4x32-10 + Box–Muller in the kernel, no data "
           "touched; ms), × bnlab BatchNorm's step; floor = BN's step plus the draws\n",
           "| threads | shape | BN step | the draws | draws × BN | floor × BN |", "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['threads']} | {r['shape']} | {r['bn_ms']:.3f} | {r['draws_ms']:.3f} | "
                   f"{r['draws_ratio']:.2f}× | {r['floor']:.2f}× |")
    return "\n".join(out) + "\n"


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
    floor = whitening_floor(threads=threads, repeats=3 if args.quick else 9)
    noise = noise_floor(threads=threads, repeats=3 if args.quick else 9)
    if args.markdown:
        print(markdown(rows))
        print(floor_markdown(floor))
        print(noise_markdown(noise))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"variants": rows, "whitening_floor": floor, "noise_floor": noise}, f, indent=1)
    return 0
