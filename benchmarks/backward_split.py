"""Where a training step's backward goes: y.backward(dy) split at the BN node by Python hooks.

For torch.nn's BN and bnlab's (the C++ node), each called through ``Tensor.backward`` and through
the engine directly (``Variable._execution_engine.run_backward``, what ``Tensor.backward`` ends
in): the time from the call to the node's start (a pre-hook on y.grad_fn), the node itself (to
its post-hook) and from there to the return; and bnlab's backward kernel called directly. Medians of blocks of 5 steps, the four variants in
turns. docs/performance.md ("Where the rest of that step goes") quotes a run.

    python benchmarks/backward_split.py [--shape 64,64,28,28] [--channels-last] [--threads 2]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.autograd import Variable

from bnlab.bench._common import node_kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="64,64,28,28")
    ap.add_argument("--channels-last", action="store_true", default=True)
    ap.add_argument("--contiguous", dest="channels_last", action="store_false")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=60)
    args = ap.parse_args()
    k = node_kernels(args.threads)
    x = torch.randn(*map(int, args.shape.split(",")))
    if args.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    C = x.shape[1]
    dy = torch.randn_like(x)
    rm, rv = torch.zeros(C), torch.ones(C)
    x_leaf = x.detach().clone().requires_grad_()
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    stamp = {}

    def pre(grad_outputs):
        stamp["start"] = time.perf_counter()

    def post(grad_inputs, grad_outputs):
        stamp["end"] = time.perf_counter()

    def variant(impl: str, direct: bool):
        def step():
            if impl == "bnlab":
                y = k.batch_norm_train(x_leaf, w, b, 1e-5, rm, rv, 0.1, True)
            else:
                y = F.batch_norm(x_leaf, rm, rv, w, b, True, 0.1, 1e-5)
            y.grad_fn.register_prehook(pre)
            y.grad_fn.register_hook(post)
            t0 = time.perf_counter()
            if direct:
                Variable._execution_engine.run_backward((y,), (dy,), False, False, (), True, True)
            else:
                y.backward(dy)
            t1 = time.perf_counter()
            x_leaf.grad = w.grad = b.grad = None
            return stamp["start"] - t0, stamp["end"] - stamp["start"], t1 - stamp["end"], t1 - t0
        return step

    def kernel_only():
        y, mean, _, invstd = k.forward_train(x, w.detach(), b.detach(), 1e-5, 0, 0.0, rm, rv, 0.1, True)
        t0 = time.perf_counter()
        k.backward_train(dy, x, mean, invstd, w.detach())
        t = time.perf_counter() - t0
        return 0.0, t, 0.0, t

    variants = {f"{impl} {'engine' if direct else 'Tensor.backward'}": variant(impl, direct)
                for impl in ("torch", "bnlab") for direct in (False, True)}
    variants["bnlab backward_train alone"] = kernel_only
    samples = {name: [] for name in variants}
    for fn in variants.values():
        for _ in range(5):
            fn()
    for turn in range(args.turns):
        order = list(variants.items())
        for name, fn in (order if turn % 2 == 0 else order[::-1]):
            samples[name].extend(fn() for _ in range(5))
    print(f"{tuple(x.shape)} {'channels_last' if args.channels_last else 'contiguous'}, {args.threads} threads, µs:")
    for name, rows in samples.items():
        cols = [1e6 * statistics.median(c) for c in zip(*rows)]
        print(f"  {name:28s} to the node {cols[0]:6.1f}  node {cols[1]:6.1f}  after {cols[2]:5.1f}  total {cols[3]:6.1f}")


if __name__ == "__main__":
    main()
