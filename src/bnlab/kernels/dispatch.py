"""One dispatch: which backend computes a batch-norm call, chosen once per call.

Backends share one interface — ``forward_train``, ``forward_eval``, ``backward_train`` (see
bnlab.kernels.torch_ops) — and one is chosen per call by :func:`select`:

    recorded into a graph (jit.trace, torch.compile, torch.export)
                                  → torch.nn.functional.batch_norm: the graph holds the batch-norm
                                    op PyTorch's tools recognize (ONNX BatchNormalization, Conv+BN
                                    fusion, quantization patterns); options that op lacks
                                    (biased running variance) take the definition
    transformed (torch.func), or kernels off
                                  → None: the definition (bnlab.definition), plain torch ops
    CPU, float32/float64/bfloat16, dense
                                  → the C++ module (which records its own autograd node)
    CUDA (or CPU with BNLAB_KERNELS=triton, interpreted), dense, < 2³¹ values
                                  → the Triton module
    any other dense tensor        → the torch-ops backend (memory-planned)

Gradients: the C++ node and :class:`_TrainFn` (the other backends) compute the closed form;
when a graph of the backward is requested (create_graph=True) both call :func:`graph_backward`,
the definition with the statistics recomputed from x, so second derivatives are exact.

The commonest calls — training with autograd, inference without — are first offered to the C++
module's one-call entries (:func:`train_fast`, :func:`eval_fast`), which make every check of
this path in one C++ call and return None where the path below must decide: right after a large
kernel has flushed the caches each small Python step costs microseconds, 35–96 µs a call in all
(docs/performance.md, "Per-call overhead").
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import definition as D
from . import backend, enabled, load, load_triton, torch_ops     # the package: loaded before its modules

__all__ = ["select", "train", "evaluate", "needs_graph", "train_fast", "eval_fast", "graph_backward", "traced", "calls",
           "forward_train", "backward_train"]

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

calls: Counter = Counter()      # dispatches made from Python, by entry ("forward_train"...)


class _Cpu:
    """The C++ module, loaded (compiled on first use) and wired up once: its autograd node's
    differentiable backward and its one-call entries."""

    module = None
    train_fast = None
    eval_fast = None
    tried = False


def cpu_module():
    """The C++ module, or None (no compiler, not Linux, or kernels off)."""
    if not _Cpu.tried:
        if not enabled():
            return None
        _Cpu.tried = True
        k = load()
        if k is not None:
            k.set_graph_backward(graph_backward)
            _Cpu.module, _Cpu.train_fast, _Cpu.eval_fast = k, k.batch_norm_train_fast, k.batch_norm_eval_fast
    return _Cpu.module


def compiled_for(x: Tensor, entry: str):
    """The C++ module when :func:`select` picks it for x and it has ``entry`` (the variants' one-call
    paths), else None — those paths then run their readable or torch-op definitions."""
    k = _Cpu.module
    if (k is not None and type(x) is Tensor and backend() == "cpu" and enabled() and k.takes(x)
            and not torch.compiler.is_compiling()):          # select's answer, its checks in one C++ call
        return k if hasattr(k, entry) else None
    k = select(x)
    return k if k is not None and k is _Cpu.module and hasattr(k, entry) else None


def _dense(x: Tensor) -> bool:
    return (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)))


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def traced(x: Tensor) -> bool:
    """Whether this call is traced or transformed rather than run (torch.jit.trace,
    torch.compile/export, torch.func) or x has no real storage (FakeTensor, FunctionalTensor and
    other subclasses): compiled kernels are opaque there, so torch's op (recorded graphs, see
    :func:`recorded`) or the definition (transforms, subclasses) is what runs."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or _functorch_active():
        return True
    return type(x) is not Tensor and not isinstance(x, torch.nn.Parameter)


def recorded(x: Tensor) -> bool:
    """Whether this call is being recorded into a graph for PyTorch's tools: torch.jit.trace,
    torch.compile (dynamo) or torch.export (whose inputs are fake or functional tensors)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return isinstance(x, (FakeTensor, FunctionalTensor))


def select(x: Tensor, is_traced: Optional[bool] = None):
    """The backend module for this call, or None for the definition (see the module docstring)."""
    if x.numel() == 0 or not enabled() or (traced(x) if is_traced is None else is_traced) or not _dense(x):
        return None
    device = x.device.type
    if device == "cpu" and backend() == "cpu" and x.dtype in _CPU_DTYPES:
        k = cpu_module()
        if k is not None:
            return k
    elif (device == "cuda" or backend() == "triton") and x.dtype in _GPU_DTYPES and x.numel() < 2**31:
        t = load_triton()                                  # (the Triton kernels index in int32)
        if t is not None:
            return t
    return torch_ops


def graph_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], eps: float, need_dx: bool,
                   need_dw: bool, need_db: bool):
    """The training backward as a differentiable graph (create_graph=True): the definition, with
    the statistics recomputed from x. Both _TrainFn and the C++ node call it."""
    mean, var = D.batch_moments(x)
    dx, dw, db = D.batch_norm_backward(dy, x, mean, torch.rsqrt(var + eps), weight, training=True)
    return dx if need_dx else None, dw if need_dw else None, db if need_db else None


def _param(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


def _like(g: Optional[Tensor], t: Optional[Tensor]) -> Optional[Tensor]:
    """A gradient in the dtype and shape of the tensor it belongs to."""
    return None if g is None or t is None else g.to(t.dtype).reshape(t.shape)


class _TrainFn(torch.autograd.Function):
    """Algorithm 1 on a backend without an autograd node of its own (torch-ops, Triton)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, running, k):
        rm, rv, momentum, correction = running
        y, mean, _, invstd = k.forward_train(x, _param(weight), _param(bias), eps, 0, 0.0, rm, rv, momentum,
                                             correction == "unbiased")
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps, ctx.k = eps, k
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        if dy is None:
            return (None,) * 6
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            dx, dw, db = graph_backward(dy, x, weight, ctx.eps, need_dx, need_dw, need_db)
        else:
            dx, dw, db = ctx.k.backward_train(dy, x, mean, invstd, _param(weight))
        return (_like(dx, x) if need_dx else None, _like(dw, weight) if need_dw else None,
                _like(db, bias) if need_db else None, None, None, None)


class _EvalFn(torch.autograd.Function):
    """Algorithm 2's transform on a backend; the statistics are constants: dx = γ·invstd·dy."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
                eps: float, k):
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.eps, ctx.k = eps, k
        ctx.set_materialize_grads(False)
        return k.forward_eval(x, mean, var, _param(weight), _param(bias), eps, 0, 0.0)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, var = ctx.saved_tensors
        if dy is None:
            return (None,) * 7
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        if ctx.k is _Cpu.module and not torch.is_grad_enabled() and _dense(dy) and dy.dtype == x.dtype \
                and x.numel() > 0:
            if not (need_dw or need_db):
                # dx = γ·invstd·dy is the eval transform of dy with mean 0: one kernel pass
                dx = ctx.k.forward_eval(dy, torch.zeros_like(mean), var, _param(weight), None, ctx.eps, 0, 0.0)
                return (dx if need_dx else None,) + (None,) * 6
            invstd = torch.rsqrt(var.to(D.accumulation_dtype(x.dtype)) + ctx.eps)
            dx, dw, db = ctx.k.group_backward(dy, x, mean, invstd, _param(weight), [x.shape[0]], False)
            return (dx if need_dx else None, _like(dw[0], weight) if need_dw else None,
                    _like(db[0], bias) if need_db else None, None, None, None, None)
        acc = D.accumulation_dtype(x.dtype)
        dx, dw, db = D.batch_norm_backward(dy, x, mean.to(acc), torch.rsqrt(var.to(acc) + ctx.eps), weight,
                                           training=False)
        return (_like(dx, x) if need_dx else None, _like(dw, weight) if need_dw else None,
                _like(db, bias) if need_db else None, None, None, None, None)


def needs_graph(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records this call: grad mode on and some argument requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
          running: tuple) -> Tensor:
    """Training BN of a checked, non-empty x. ``running = (running_mean, running_var, momentum,
    correction)`` (buffers may be None)."""
    is_traced = traced(x)
    k = select(x, is_traced)
    if k is None:
        rm, rv, momentum, correction = running
        if is_traced and (correction == "unbiased" or rm is None) and recorded(x):
            return F.batch_norm(x, rm, rv, weight, bias, True, momentum, eps)
        return D.batch_norm(x, rm, rv, weight, bias, True, momentum, eps, correction)
    graph = needs_graph(x, weight, bias)
    if graph and k is _Cpu.module:                         # the C++ node: no Python in its backward
        calls["forward_train"] += 1
        rm, rv, momentum, correction = running
        return k.batch_norm_train(x, weight, bias, eps, rm, rv, momentum, correction == "unbiased")
    calls["forward_train"] += 1
    if graph:
        return _TrainFn.apply(x, weight, bias, eps, running, k)
    rm, rv, momentum, correction = running                 # nothing to differentiate: no Function
    return k.forward_train(x, weight, bias, eps, 0, 0.0, rm, rv, momentum, correction == "unbiased")[0]


def evaluate(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
             bias: Optional[Tensor], eps: float) -> Tensor:
    """Inference BN of a checked, non-empty x with the given statistics."""
    is_traced = traced(x)
    k = select(x, is_traced)
    if k is None:
        if is_traced and recorded(x):
            return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        return D.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    calls["forward_eval"] += 1
    if needs_graph(x, weight, bias):
        return _EvalFn.apply(x, weight, bias, running_mean, running_var, eps, k)
    # the kernel forms 1/√(var + ε) itself: no small tensor operation runs before it (each costs
    # ~10 µs right after a large kernel)
    return k.forward_eval(x, running_mean, running_var, weight, bias, eps, 0, 0.0)


def forward_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  running: Optional[tuple] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A backend's training forward without autograd, for code that writes its own backward (the
    lab's explicit MLP step): (y, mean, var, invstd); ``running`` as for :func:`train`."""
    rm, rv, momentum, correction = running if running is not None else (None, None, 0.0, "unbiased")
    calls["forward_train"] += 1
    return (select(x) or torch_ops).forward_train(x, _param(weight), _param(bias), eps, 0, 0.0, rm, rv, momentum,
                                                  correction == "unbiased")


def backward_train(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                   weight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form training backward on a backend: (dx, dgamma, dbeta)."""
    calls["backward_train"] += 1
    return (select(x) or torch_ops).backward_train(dy, x, mean, invstd, _param(weight))


def _fast(x, which: str):
    entry = getattr(_Cpu, which)
    if entry is None and not _Cpu.tried and type(x) is Tensor and x.device.type == "cpu":
        cpu_module()                                       # loads (first use: compiles) and wires up
        entry = getattr(_Cpu, which)
    return entry


def train_fast(x, weight, bias, eps, running_mean, running_var, momentum, correction):
    """The C++ one-call training entry, or None when the checked path must run."""
    fast = _fast(x, "train_fast")
    if fast is None or type(x) is not Tensor or momentum is None or correction not in D.VAR_CORRECTIONS \
            or torch.compiler.is_compiling():
        return None
    return fast(x, weight, bias, eps, running_mean, running_var, momentum, correction == "unbiased")


def eval_fast(x, running_mean, running_var, weight, bias, eps):
    """The C++ one-call inference entry, or None when the checked path must run."""
    fast = _fast(x, "eval_fast")
    if fast is None or type(x) is not Tensor or torch.compiler.is_compiling():
        return None
    return fast(x, running_mean, running_var, weight, bias, eps)
