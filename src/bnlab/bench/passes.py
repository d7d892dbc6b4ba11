"""Where a training step's time goes: each pass of bnlab's CPU kernels against the memory
operation that moves the same bytes, and torch.nn's native forward and backward, in one loop.

Exact BatchNorm with two-pass statistics makes 8 passes over the tensor per training step
(S = the tensor's bytes):

    forward   statistics   read x            S
              normalize    read x, write y   2S
    backward  grad sums    read dy, x        2S
              dx           read dy, x, write 3S

Each pass is timed alone (``bench_pass`` in the extension: the same code, layouts, threads and
store rule as ``forward_train``/``backward_train``), next to a torch operation of the same bytes:
``x.sum()`` (read S), ``z.copy_(x)`` (read S, write S), ``x.sum(); dy.sum()`` (read 2S)
and ``torch.add(x, dy, out=z)`` (read 2S, write S). All of them run in turn inside one loop, so
they see the same phase of the machine, and each timed call is preceded by the same untimed
``torch.add(x, dy, out=scratch)``, so each starts from the same cache state (x and dy as warm as
the last-level cache allows, as after a backward); the medians are reported. A pass
close to its memory operation has nothing left to win but bytes.

Three whole training steps run in the same loop: bnlab's two kernel calls made directly, and
bnlab's and torch's ``batch_norm`` with autograd (forward, ``backward(dy)``, gradients cleared) —
the difference between the first two is what the Python and autograd around the kernels cost.

    bnlab bench passes [--threads 2] [--malloc keep]
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .. import functional as BF
from ._common import keep_freed_memory

PASSES = [("statistics", 0, "x.sum()", 1), ("normalize", 1, "z.copy_(x)", 2),
          ("grad sums", 2, "x.sum(); dy.sum()", 2), ("dx", 3, "add(x, dy, out=z)", 3)]
SHAPES: list[tuple[tuple[int, ...], bool]] = [((4096, 1024), False), ((64, 64, 28, 28), True),
                                              ((64, 64, 28, 28), False), ((4096, 4096), False)]
QUICK_SHAPES: list[tuple[tuple[int, ...], bool]] = [((256, 1024), False), ((8, 64, 28, 28), True)]


@dataclass
class PassRow:
    shape: str
    layout: str
    name: str                     # a pass, "bnlab total", "torch forward", "torch backward", "torch total"
    ms: float
    memory_op: str                # the torch operation of the same bytes ("" for totals)
    memory_op_ms: float
    gbs: float                    # the pass's bytes / its time


def run(shapes: Iterable[tuple[tuple[int, ...], bool]] = SHAPES, threads: int = 2, repeats: int = 60,
        log: Optional[Callable[[str], None]] = print) -> list[PassRow]:
    from .. import kernels
    k = kernels.load()
    if k is None:
        raise RuntimeError(f"bnlab bench passes needs the compiled CPU kernels ({kernels.failure()})")
    rows: list[PassRow] = []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape, channels_last in shapes:
            rows += _one_shape(k, shape, channels_last, repeats, log)
    finally:
        torch.set_num_threads(before)
    return rows


def _one_shape(k, shape, channels_last, repeats, log) -> list[PassRow]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*shape).contiguous(memory_format=fmt)
    dy = torch.randn_like(x)
    out, z = torch.empty_like(x), torch.empty_like(x)
    C = x.shape[1]
    w, b, rm, rv = torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C)
    saved: dict = {}

    def torch_forward():
        saved["fwd"] = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)

    def torch_backward():
        _, mean, invstd = saved["fwd"]
        torch.ops.aten.native_batch_norm_backward(dy, x, w, rm, rv, mean, invstd, True, 1e-5, [True, True, True])

    def bnlab_step_kernels():                       # forward_train + backward_train, called directly
        _, mean, _, invstd = k.forward_train(x, w, b, 1e-5, 0, 0.0, rm, rv, 0.1, True)
        k.backward_train(dy, x, mean, invstd, w)

    memory_ops = [lambda: x.sum(), lambda: z.copy_(x), lambda: (x.sum(), dy.sum()),
                  lambda: torch.add(x, dy, out=z)]
    fns: list[Callable[[], object]] = [(lambda p=p: k.control.bench_pass(p, x, dy, out)) for _, p, _, _ in PASSES]
    fns += memory_ops + [torch_forward, torch_backward, bnlab_step_kernels,
                         _autograd_step(BF.batch_norm, x, dy), _autograd_step(F.batch_norm, x, dy)]
    times: list[list[float]] = [[] for _ in fns]
    scratch = torch.empty_like(x)
    for it in range(repeats + 5):                   # 5 warm-up rounds
        for i, fn in enumerate(fns):
            torch.add(x, dy, out=scratch)           # the same cache state before every timed call
            t0 = time.perf_counter()
            fn()
            if it >= 5:
                times[i].append(time.perf_counter() - t0)
    med = [statistics.median(t) * 1e3 for t in times]
    S = x.numel() * x.element_size()
    name = "x".join(map(str, shape))
    layout = "channels_last" if channels_last else "contiguous"
    rows = []
    for i, (pass_name, _, op_name, n_bytes) in enumerate(PASSES):
        rows.append(PassRow(name, layout, pass_name, med[i], op_name, med[4 + i], n_bytes * S / med[i] / 1e6))
    total = sum(med[:4])
    rows.append(PassRow(name, layout, "bnlab total", total, "", sum(med[4:8]), 8 * S / total / 1e6))
    rows.append(PassRow(name, layout, "torch forward", med[8], "", float("nan"), 3 * S / med[8] / 1e6))
    rows.append(PassRow(name, layout, "torch backward", med[9], "", float("nan"), 5 * S / med[9] / 1e6))
    rows.append(PassRow(name, layout, "torch total", med[8] + med[9], "", float("nan"),
                        8 * S / (med[8] + med[9]) / 1e6))
    for i, step in zip((10, 11, 12), ("bnlab step, kernels", "bnlab step, autograd", "torch step, autograd")):
        rows.append(PassRow(name, layout, step, med[i], "", float("nan"), 8 * S / med[i] / 1e6))
    if log:
        for r in rows:
            log(format_row(r))
    return rows


def _autograd_step(batch_norm: Callable, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """A training step as a model takes it: forward with autograd, backward(dy), grads cleared."""
    C = x.shape[1]
    x_leaf = x.detach().requires_grad_()           # x's memory: warmed like every other call's input
    weight, bias = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)

    def step():
        batch_norm(x_leaf, rm, rv, weight, bias, True, 0.1, 1e-5).backward(dy)
        x_leaf.grad = weight.grad = bias.grad = None
    return step


def format_row(r: PassRow) -> str:
    mem = f"  same bytes [{r.memory_op}] {r.memory_op_ms:7.3f} ms" if r.memory_op else ""
    return f"{r.shape:>14} {r.layout:>13} {r.name:>14}: {r.ms:7.3f} ms {r.gbs:6.1f} GB/s{mem}"


def markdown(rows: list[PassRow]) -> str:
    lines = ["| shape | layout | pass | bnlab ms | GB/s | same bytes (torch op) | its ms | pass / op |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        if r.memory_op:
            lines.append(f"| {r.shape} | {r.layout} | {r.name} | {r.ms:.3f} | {r.gbs:.0f} | `{r.memory_op}` | "
                         f"{r.memory_op_ms:.3f} | {r.ms / r.memory_op_ms:.2f} |")
        elif r.name == "bnlab total":
            lines.append(f"| {r.shape} | {r.layout} | **bnlab total** | {r.ms:.3f} | {r.gbs:.0f} | sum of the four | "
                         f"{r.memory_op_ms:.3f} | {r.ms / r.memory_op_ms:.2f} |")
        else:
            lines.append(f"| {r.shape} | {r.layout} | {r.name} | {r.ms:.3f} | {r.gbs:.0f} | | | |")
    return "\n".join(lines)


def command(args) -> int:
    """``bnlab bench passes``."""
    if args.malloc == "keep":
        keep_freed_memory()
    rows = run(QUICK_SHAPES if args.quick else SHAPES, threads=int((args.threads or "2").split(",")[-1]),
               repeats=5 if args.quick else 60)
    if args.markdown:
        print(markdown(rows))
    return 0
