"""A training step of bnlab BatchNorm in a loop, for a profiler: the two CPU kernels called
directly ("kern") or through the C++ autograd node with backward(dy) ("node").

    perf record -e cpu-clock -F 4000 -o kern.data python benchmarks/profile_step.py kern
    perf record -e cpu-clock -F 4000 -o node.data python benchmarks/profile_step.py node
    perf report -i node.data --sort dso --stdio

(docs/performance.md, "The autograd node", splits the node's extra time per step this way.)
"""

import argparse
import time

import torch

from bnlab.bench._common import node_kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["kern", "node"])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    k = node_kernels(args.threads)
    x = torch.randn(64, 64, 28, 28).contiguous(memory_format=torch.channels_last)   # N,C,H,W
    C = x.shape[1]
    dy = torch.randn_like(x)
    w, b, rm, rv = torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C)
    x_leaf = x.detach().requires_grad_()
    w_leaf, b_leaf = w.clone().requires_grad_(), b.clone().requires_grad_()
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        if args.mode == "kern":
            y, mean, _, invstd = k.forward_train(x, w, b, 1e-5, 0, 0.0, rm, rv, 0.1, True)
            k.backward_train(dy, x, mean, invstd, w)
        else:
            y = k.batch_norm_train(x_leaf, w_leaf, b_leaf, 1e-5, rm, rv, 0.1, True)
            y.backward(dy)
            x_leaf.grad = w_leaf.grad = b_leaf.grad = None
        del y
        steps += 1
    print(f"{args.mode}: {steps} steps, {(time.perf_counter() - start) / steps * 1e3:.3f} ms a step")


if __name__ == "__main__":
    main()
