#!/usr/bin/env python
"""Check and time bnlab's GPU path (Triton kernels) against torch.nn (cuDNN / ATen CUDA).

    python benchmarks/gpu_bench.py [--out DIR] [--repeats 50] [--smoke]

One prepared script for a lent GPU session: first it *checks* every path (training forward,
backward, running-statistics update, eval) against a float64 reference on the same device and
fails loudly on a mismatch; then it *times* bnlab and torch alternately with CUDA events
(medians of paired ratios, as ``bnlab bench``), and measures a device-to-device copy of the same
size as the bandwidth ceiling; last it times each normalization variant against bnlab's
BatchNorm on the device (training forward + backward), as ``bnlab bench variants`` does on the CPU.
Results go to DIR/gpu_bench.json (DIR defaults to $OUT, else .)
and a Markdown table to stdout.

``--smoke`` runs the same code on the CPU through Triton's interpreter with tiny shapes: that
is how CI keeps this script working although CI has no GPU (tests/test_triton.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:                                     # must be set before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["BNLAB_KERNELS"] = "triton"

import torch                                   # noqa: E402
import torch.nn.functional as F                # noqa: E402

from bnlab import functional as BF             # noqa: E402
from bnlab import kernels                      # noqa: E402

SHAPES = [((256, 1024), None), ((4096, 1024), None), ((8192, 4096), None),
          ((64, 64, 56, 56), None), ((64, 64, 56, 56), torch.channels_last),
          ((128, 256, 14, 14), None), ((128, 256, 14, 14), torch.channels_last),
          ((32, 128, 112, 112), None), ((32, 128, 112, 112), torch.channels_last)]
SMOKE_SHAPES = [((33, 40), None), ((4, 6, 9, 9), None), ((4, 6, 9, 9), torch.channels_last)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
PASSES = {"fwd": 2, "fwdbwd": 5, "eval": 2}


def make(shape, fmt, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    dy = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    C = shape[1]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32     # parameters as in AMP
    w = (torch.rand(C, generator=g) + 0.5).to(device=device, dtype=pdt)
    b = torch.randn(C, generator=g).to(device=device, dtype=pdt)
    return x, dy, w, b


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


def check(shape, fmt, dtype, device) -> dict:
    """bnlab (Triton) vs float64 torch reference, on the device: y, dx, dγ, dβ, running stats, eval."""
    x, dy, w, b = make(shape, fmt, dtype, device)
    C = shape[1]
    out = {}
    rm, rv = torch.zeros(C, device=device, dtype=w.dtype), torch.ones(C, device=device, dtype=w.dtype)
    xx, ww, bb = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    before = kernels.calls["forward_train"]
    y = BF.batch_norm(xx, rm, rv, ww, bb, True, 0.1, 1e-5)
    y.backward(dy)
    assert kernels.calls["forward_train"] > before, "the Triton path was not taken"
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    rmr, rvr = torch.zeros(C, device=device, dtype=torch.float64), torch.ones(C, device=device, dtype=torch.float64)
    yr = F.batch_norm(xr, rmr, rvr, wr, br, True, 0.1, 1e-5)
    yr.backward(dy.double())
    for name, a, r in (("y", y, yr), ("dx", xx.grad, xr.grad), ("dgamma", ww.grad, wr.grad),
                       ("dbeta", bb.grad, br.grad), ("running_mean", rm, rmr), ("running_var", rv, rvr)):
        out[name] = rel_err(a, r)
    out["layout_kept"] = y.stride() == x.stride() and xx.grad.stride() == x.stride()
    ye = BF.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
    out["eval"] = rel_err(ye, F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(),
                                          False, 0.1, 1e-5))
    tol = TOL[dtype]
    out["ok"] = out["layout_kept"] and all(v <= tol for k, v in out.items() if isinstance(v, float))
    return out


class Timer:
    """Per-call times in ms: CUDA events on a GPU, perf_counter on the CPU (smoke)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def time_pair(timer, f_torch, f_ours, repeats) -> tuple[float, float, float]:
    for _ in range(3):
        f_torch(), f_ours()
    a, b, r = [], [], []
    for _ in range(repeats):
        ta, tb = timer(f_torch), timer(f_ours)
        a.append(ta), b.append(tb), r.append(tb / ta)
    return statistics.median(a), statistics.median(b), statistics.median(r)


def bench(shape, fmt, dtype, device, repeats) -> list[dict]:
    x, dy, w, b = make(shape, fmt, dtype, device)
    C = shape[1]
    timer = Timer(device)
    rows = []
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    xg = x.clone().requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()

    def run(fn, mode):
        def call():
            if mode == "eval":
                with torch.no_grad():
                    fn(x, rm, rv, w, b, False, 0.1, 1e-5)
                return
            y = fn(xg, rm, rv, wg, bg, True, 0.1, 1e-5)
            if mode == "fwdbwd":
                y.backward(dy)
        return call

    dst = torch.empty_like(x)
    copy_ms = statistics.median([timer(lambda: dst.copy_(x)) for _ in range(max(5, repeats))])
    nbytes = x.numel() * x.element_size()
    for mode in ("fwd", "fwdbwd", "eval"):
        t_torch, t_ours, ratio = time_pair(timer, run(F.batch_norm, mode), run(BF.batch_norm, mode), repeats)
        rows.append(dict(shape="x".join(map(str, shape)), layout="CL" if fmt is not None else "NC*",
                         dtype=str(dtype).replace("torch.", ""), mode=mode, torch_ms=t_torch, bnlab_ms=t_ours,
                         ratio=ratio, copy_gbs=2 * nbytes / copy_ms / 1e6,
                         bnlab_copy_fraction=(copy_ms / 2 * PASSES[mode]) / t_ours,
                         torch_copy_fraction=(copy_ms / 2 * PASSES[mode]) / t_torch))
    return rows


VARIANT_SHAPES = [((256, 512), None), ((64, 64, 28, 28), None), ((64, 64, 28, 28), torch.channels_last)]
SMOKE_VARIANT_SHAPES = [((16, 8), None), ((8, 8, 5, 5), None)]


def variant_layers(C: int, image: bool) -> dict:
    import bnlab
    V = bnlab
    if image:
        return {"BatchNorm": lambda: V.BatchNorm2d(C), "BatchRenorm": lambda: V.BatchRenorm2d(C, warmup=False),
                "Ghost BN (v=16)": lambda: V.GhostBatchNorm2d(C, virtual_batch_size=16),
                "Detached": lambda: V.DetachedNorm2d(C, scale=True), "Noisy BN": lambda: V.NoisyBatchNorm2d(C),
                "l2": lambda: V.LpNorm2d(C, p=2), "ZCA (G=8)": lambda: V.DecorrelatedBatchNorm(C, group_size=8),
                "IterNorm (G=8)": lambda: V.IterNorm(C, group_size=8)}
    return {"BatchNorm": lambda: V.BatchNorm1d(C), "BatchRenorm": lambda: V.BatchRenorm1d(C, warmup=False),
            "Ghost BN (v=4)": lambda: V.GhostBatchNorm1d(C, virtual_batch_size=4),
            "Detached": lambda: V.DetachedNorm(C, scale=True), "Noisy BN": lambda: V.NoisyBatchNorm1d(C),
            "l2": lambda: V.LpNorm1d(C, p=2), "ZCA (G=8)": lambda: V.DecorrelatedBatchNorm(C, group_size=8),
            "IterNorm (G=8)": lambda: V.IterNorm(C, group_size=8)}


def bench_variants(shape, fmt, device, repeats) -> list[dict]:
    """Training forward + backward of each variant vs bnlab's BatchNorm, float32, on the device."""
    x, dy, _, _ = make(shape, fmt, torch.float32, device)
    timer = Timer(device)
    layers = variant_layers(shape[1], len(shape) == 4)
    xg = x.clone().requires_grad_()

    def step(layer):
        def call():
            xg.grad = None
            layer(xg).backward(dy)
        return call

    reference = step(layers["BatchNorm"]().to(device).train())
    rows = []
    for name, build in layers.items():
        if name == "BatchNorm":
            continue
        t_bn, t_var, ratio = time_pair(timer, reference, step(build().to(device).train()), repeats)
        rows.append(dict(shape="x".join(map(str, shape)), layout="CL" if fmt is not None else "NC*", layer=name,
                         bn_ms=t_bn, ms=t_var, ratio=ratio))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU via TRITON_INTERPRET")
    args = p.parse_args(argv)
    if args.smoke:
        device, shapes, dtypes, repeats = torch.device("cpu"), SMOKE_SHAPES, (torch.float32,), 2
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --smoke for the CPU check", file=sys.stderr)
            return 2
        device, shapes, dtypes, repeats = torch.device("cuda"), SHAPES, DTYPES, args.repeats
        torch.backends.cudnn.benchmark = True
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
                  torch=torch.__version__, checks=[], timings=[])
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    ok = True
    for shape, fmt in shapes:
        for dtype in dtypes + ((torch.float64,) if shape == shapes[0][0] or args.smoke else ()):
            c = check(shape, fmt, dtype, device)
            c.update(shape="x".join(map(str, shape)), layout="CL" if fmt is not None else "NC*",
                     dtype=str(dtype).replace("torch.", ""))
            report["checks"].append(c)
            ok &= c["ok"]
            if not c["ok"]:
                print("CHECK FAILED", c, file=sys.stderr)
    for shape, fmt in shapes:
        for dtype in dtypes:
            report["timings"].extend(bench(shape, fmt, dtype, device, repeats))
    report["variants"] = []
    for shape, fmt in (SMOKE_VARIANT_SHAPES if args.smoke else VARIANT_SHAPES):
        report["variants"].extend(bench_variants(shape, fmt, device, repeats))
    report["all_checks_ok"] = ok
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"device: {report['device']}  torch {report['torch']}  triton {report['triton']}  checks ok: {ok}")
    print("| shape | layout | dtype | mode | torch ms | bnlab ms | bnlab/torch | bnlab copy-BW | torch copy-BW |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["timings"]:
        print(f"| {r['shape']} | {r['layout']} | {r['dtype']} | {r['mode']} | {r['torch_ms']:.3f} | "
              f"{r['bnlab_ms']:.3f} | {r['ratio']:.2f} | {r['bnlab_copy_fraction']:.0%} | "
              f"{r['torch_copy_fraction']:.0%} |")
    print("\n| shape | layout | variant | BatchNorm ms | variant ms | × BatchNorm |")
    print("|---|---|---|---|---|---|")
    for r in report["variants"]:
        print(f"| {r['shape']} | {r['layout']} | {r['layer']} | {r['bn_ms']:.3f} | {r['ms']:.3f} | {r['ratio']:.2f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
