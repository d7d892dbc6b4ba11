"""What a bnlab.functional.batch_norm call costs around its kernel, with cold caches.

Each call is timed right after the same untimed ``torch.add(x, dy, out=scratch)`` (three
tensor-sized streams, which flush the caches as the previous layer's kernel would). Per shape, the
forward alone, µs:

    train   batch_norm(training=True) with autograd recording   vs  the C++ node called directly
    eval    batch_norm(training=False) under no_grad            vs  the eval kernel called directly

for three callers: ``batch_norm`` as it ships (one-call checks), ``batch_norm`` with the one-call
paths switched off (the Python path, each check a Python step), and a ``lambda`` that only
forwards to the kernel entry (what any Python function call costs there). Reported: the median
of each minus the direct call's median, over turns that rotate the order.
docs/performance.md ("Per-call overhead with cold caches") quotes a run.

    python benchmarks/call_overhead.py [--threads 2] [--turns 60]
"""

import argparse
import statistics
import time

import torch

from bnlab.bench._common import node_kernels
from bnlab import functional as BF
from bnlab.kernels import dispatch

SHAPES = [((64, 64, 28, 28), True), ((4096, 1024), False), ((64, 64, 28, 28), False), ((256, 1024), False)]


def _python_path(fn):
    """fn with the C++ one-call entries switched off (they decline; the checked path runs)."""
    def run():
        control = dispatch.cpu_module().control
        before = control.set_enabled(False)
        try:
            return fn()
        finally:
            control.set_enabled(before)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=60)
    ap.add_argument("--shapes", default=None, help="e.g. 8,4,5,5:cl;300,37 (default: four shapes)")
    args = ap.parse_args()
    k = node_kernels(args.threads)
    shapes = SHAPES
    if args.shapes:
        shapes = [(tuple(int(v) for v in s.split(":")[0].split(",")), s.endswith(":cl")) for s in args.shapes.split(";")]
    for shape, channels_last in shapes:
        x = torch.randn(*shape)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        C = x.shape[1]
        dy, scratch = torch.randn_like(x), torch.empty_like(x)
        x_leaf = x.detach().clone().requires_grad_()
        w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
        rm, rv = torch.zeros(C), torch.ones(C)
        wd, bd = w.detach(), b.detach()

        train = {
            "direct": lambda: k.batch_norm_train(x_leaf, w, b, 1e-5, rm, rv, 0.1, True),
            "batch_norm": lambda: BF.batch_norm(x_leaf, rm, rv, w, b, True, 0.1, 1e-5),
            "Python path": _python_path(lambda: BF.batch_norm(x_leaf, rm, rv, w, b, True, 0.1, 1e-5)),
            "lambda": (lambda f: lambda: f(x_leaf, rm, rv, w, b, True, 0.1, 1e-5))(
                lambda i, m, v, g, s, t, mo, e: k.batch_norm_train(i, g, s, e, m, v, mo, True)),
        }
        evals = {
            "direct": lambda: k.forward_eval(x, rm, rv, wd, bd, 1e-5, 0, 0.0),
            "batch_norm": lambda: BF.batch_norm(x, rm, rv, wd, bd, False, 0.1, 1e-5),
            "Python path": _python_path(lambda: BF.batch_norm(x, rm, rv, wd, bd, False, 0.1, 1e-5)),
            "lambda": (lambda f: lambda: f(x, rm, rv, wd, bd, False, 0.1, 1e-5))(
                lambda i, m, v, g, s, t, mo, e: k.forward_eval(i, m, v, g, s, e, 0, 0.0)),
        }
        for mode, fns in (("train", train), ("eval", evals)):
            samples = {name: [] for name in fns}
            names = list(fns)
            for turn in range(args.turns + 3):
                shift = turn % len(names)
                for name in names[shift:] + names[:shift]:
                    torch.add(x, dy, out=scratch)
                    if mode == "eval":
                        with torch.no_grad():
                            t0 = time.perf_counter()
                            fns[name]()
                            t = time.perf_counter() - t0
                    else:
                        t0 = time.perf_counter()
                        y = fns[name]()
                        t = time.perf_counter() - t0
                        del y
                    if turn >= 3:
                        samples[name].append(t)
            med = {name: 1e6 * statistics.median(v) for name, v in samples.items()}
            layout = "channels_last" if channels_last else "contiguous"
            extra = "  ".join(f"{name} +{med[name] - med['direct']:5.1f}" for name in names[1:])
            print(f"{str(shape):>18} {layout:>13} {args.threads}t {mode:>5}: direct {med['direct']:7.1f} µs  {extra}",
                  flush=True)


if __name__ == "__main__":
    main()
