r"""Batch Normalization as pure tensor math: forward, closed-form backward, running statistics.

Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by Reducing
Internal Covariate Shift" (arXiv:1502.03167), Algorithm 1 and §3.1. Per feature (per channel
for convolutions, where the statistics run over the ``m = N·H·W`` values of a channel)::

    mean   = μ_B  = (1/m) Σ_i x_i
    var    = σ²_B = (1/m) Σ_i (x_i − μ_B)²        biased: the normalizer of Algorithm 1
    invstd = 1/√(σ²_B + ε)                       ε inside the square root
    x_hat  = (x − μ_B) · invstd
    y      = γ · x_hat + β

and with ``dy = ∂ℓ/∂y`` the closed-form backward (derived step by step in docs/batchnorm.md)::

    dx     = γ · invstd · (dy − mean(dy) − x_hat · mean(dy ⊙ x_hat))
    dgamma = Σ dy ⊙ x_hat
    dbeta  = Σ dy

At inference (Algorithm 2) ``mean``/``var`` are population estimates (the running buffers) and
are constants for the gradient: ``dx = γ · invstd · dy``.

Numerical decisions, stated first:
  * statistics are two-pass (mean, then the mean squared deviation from it): never the
    cancelling one-pass E[x²] − E[x]², which loses every digit when |mean| ≫ std;
  * float16/bfloat16 inputs are computed in float32 (statistics, normalization and gradients);
    outputs are cast back to the input dtype, statistics stay float32;
  * the backward is written with differentiable tensor operations and, when a graph of the
    backward is requested (``create_graph=True``), recomputes the statistics from ``x`` so that
    second derivatives (Hessian-vector products for the probes) are exact.

Everything here is a function of tensors; ``bnlab.batchnorm`` modules only hold state.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ArgumentError, BatchSizeError, DeviceError, DTypeError, ModeError, ShapeError

__all__ = [
    "batch_norm",
    "batch_mean_var",
    "normalize",
    "batch_norm_backward",
    "update_running_stats",
    "reduction_dims",
    "channel_view",
    "accumulation_dtype",
    "values_per_channel",
    "effective_momentum",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
VAR_CORRECTIONS = ("unbiased", "biased")


# ----------------------------------------------------------------------------------------------
# Shape helpers
# ----------------------------------------------------------------------------------------------

def reduction_dims(x: Tensor) -> tuple[int, ...]:
    """Dimensions BN reduces over: every one but the channel dimension 1 → (0, 2, 3, ...)."""
    return (0,) + tuple(range(2, x.dim()))


def channel_view(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel vector (C,) so it broadcasts against x (N, C, *) → (1, C, 1, ...)."""
    return v.view((1, -1) + (1,) * (x.dim() - 2))


def values_per_channel(x: Tensor) -> int:
    """m = N · ∏ spatial: how many values each channel's statistics are computed over."""
    return x.numel() // x.shape[1] if x.shape[1] > 0 else 0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for float16/bfloat16, else the input's own."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _to(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    return None if (t is None or dtype is None) else t.to(dtype)


def _dtype_of(t: Optional[Tensor]) -> Optional[torch.dtype]:
    return None if t is None else t.dtype


# ----------------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------------

def batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and *biased* variance of x (N, C, *) by the two-pass formula.

    Returns (mean, var), each (C,), in ``accumulation_dtype(x.dtype)``.
    σ²_B = ‖x − μ_B‖² / m: the deviations are formed first, so no cancellation occurs.
    """
    dims = reduction_dims(x)
    x = x.to(accumulation_dtype(x.dtype))
    m = values_per_channel(x)
    mean = x.mean(dim=dims)                                  # C
    x_centered = x - channel_view(mean, x)                   # N,C,*
    var = x_centered.square().sum(dim=dims) / m              # C
    return mean, var


def normalize(x: Tensor, mean: Tensor, invstd: Tensor,
              weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """y = γ · (x − mean) · invstd + β, per channel, in the dtype of ``mean``.

    Folds γ·invstd into one per-channel scale so the full-size tensor is touched twice, not four
    times: y = x · scale + (β − mean · scale).
    """
    scale = invstd if weight is None else invstd * weight    # C
    shift = -mean * scale                                    # C
    if bias is not None:
        shift = shift + bias
    return torch.addcmul(channel_view(shift, x), x.to(mean.dtype), channel_view(scale, x))


def batch_norm_backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                        weight: Optional[Tensor], training: bool,
                        need_dx: bool = True, need_dweight: bool = True,
                        need_dbias: bool = True) -> tuple[Optional[Tensor], ...]:
    """Closed-form gradients of BN (SPEC §1), all in the dtype of ``mean``.

    training (statistics depend on x)::
        dx = γ·invstd·(dy − mean(dy) − x_hat·mean(dy ⊙ x_hat))
    eval (statistics are constants)::
        dx = γ·invstd·dy
    both::
        dgamma = Σ dy ⊙ x_hat,   dbeta = Σ dy

    Written with differentiable tensor operations only, so autograd can differentiate it again.
    Returns (dx, dweight, dbias); an entry is None when not needed.
    """
    acc = mean.dtype
    dims = reduction_dims(x)
    dy = dy.to(acc)
    x_hat = (x.to(acc) - channel_view(mean, x)) * channel_view(invstd, x)   # N,C,*
    sum_dy = dy.sum(dim=dims)                                               # C
    sum_dy_xhat = (dy * x_hat).sum(dim=dims)                                # C
    dx = dweight = dbias = None
    if need_dx:
        scale = invstd if weight is None else invstd * weight.to(acc)       # C: γ·invstd
        if training:
            m = values_per_channel(x)
            dy_centered = dy - channel_view(sum_dy / m, x)                  # dy − mean(dy)
            dx = (dy_centered - x_hat * channel_view(sum_dy_xhat / m, x)) * channel_view(scale, x)
        else:
            dx = dy * channel_view(scale, x)
    if need_dweight:
        dweight = sum_dy_xhat
    if need_dbias:
        dbias = sum_dy
    return dx, dweight, dbias


@torch.no_grad()
def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         mean: Tensor, var: Tensor, count: int, momentum: float,
                         correction: str = "unbiased") -> None:
    """In place: r ← (1 − momentum)·r + momentum·x_t (PyTorch's convention, SPEC §1).

    The value averaged into ``running_var`` is the unbiased batch variance m/(m−1)·σ²_B when
    ``correction="unbiased"`` (PyTorch, and Algorithm 2's correction applied per batch), the
    biased σ²_B when ``"biased"`` (Keras/Flax). ``count`` is m, the values per channel.
    """
    if correction not in VAR_CORRECTIONS:
        raise ValueError(f"running_var_correction must be one of {VAR_CORRECTIONS}, got {correction!r}")
    # lerp_(x_t, m) computes r + m·(x_t − r) = (1 − m)·r + m·x_t in one pass.
    if running_mean is not None:
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    if running_var is not None:
        if correction == "unbiased" and count > 1:
            var = var * (count / (count - 1))
        running_var.lerp_(var.to(running_var.dtype), momentum)


EMA_CONVENTIONS = ("pytorch", "cumulative", "debiased")


def effective_momentum(convention: str, momentum: Optional[float], step: int) -> float:
    """m_t of the running-statistics update r_t = (1 − m_t)·r_{t−1} + m_t·x_t at step t ≥ 1.

    pytorch: m; cumulative (or momentum None): 1/t; debiased (Haiku's EMA divided by 1 − d^t,
    d = 1 − m): m / (1 − d^t). See bnlab.ema for the derivation.
    """
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if convention == "cumulative" or momentum is None:
        return 1.0 / step
    if convention == "pytorch":
        return momentum
    if convention == "debiased":
        decay = 1.0 - momentum
        return min(1.0, momentum / (1.0 - decay ** step)) if decay < 1.0 else 1.0 / step
    raise ValueError(f"ema must be one of {EMA_CONVENTIONS}, got {convention!r}")


# ----------------------------------------------------------------------------------------------
# The same formulas, memory-planned: one full-size allocation per call (the output)
# ----------------------------------------------------------------------------------------------
# The functions above are the definition. The ones below evaluate exactly the same expressions
# for the common case where no graph of the computation is needed, writing every full-size
# intermediate into the storage of the tensor they return: a fresh allocation of a large tensor
# costs more than an arithmetic pass over it (page faults above glibc's mmap threshold), so
# these do what torch.nn's kernel does — allocate y in forward and dx in backward, nothing else.

_FAST_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dense(x: Tensor) -> bool:
    return (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)))


_KERNELS = None


def _kernels_package():
    global _KERNELS                 # imported on first use: bnlab.kernels imports nothing heavy,
    if _KERNELS is None:            # but a function-level import costs microseconds on every call
        from . import kernels
        _KERNELS = kernels
    return _KERNELS


def fast_kernels(x: Tensor, traced: Optional[bool] = None):
    """bnlab's compiled kernels if they can compute this call exactly, else None.

    CPU tensors of float32/float64/bfloat16 go to the C++ module, CUDA tensors of
    float16/bfloat16/float32/float64 to the Triton module (bnlab.kernels.triton_bn) — when they
    are contiguous (or channels_last) and non-empty. Graphs of the backward (double backward)
    always use the definition. ``BNLAB_KERNELS=triton`` routes CPU tensors to the Triton module
    too, which runs them under Triton's interpreter (TRITON_INTERPRET=1): how CI tests it.
    ``traced``: ``_traced(x)`` if the caller has it already (each check is a few µs when a large
    kernel has just flushed the caches, and this runs on every call).
    """
    if x.numel() == 0 or not _dense(x) or (_traced(x) if traced is None else traced):
        return None
    kernels = _kernels_package()
    if not kernels.enabled():
        return None
    device = x.device.type
    if device == "cpu" and kernels.backend() == "cpu":
        return kernels.load() if x.dtype in _FAST_DTYPES else None
    if device == "cuda" or device == "cpu":
        # the Triton kernels index in int32
        return kernels.load_triton() if x.dtype in _GPU_DTYPES and x.numel() < 2**31 else None
    return None


def _traced(x: Tensor) -> bool:
    """Whether this call is being traced or transformed rather than run: torch.jit.trace,
    torch.compile/export (Dynamo), torch.func transforms (vmap, grad, jacrev...: their wrapped
    tensors are not plain memory, and custom autograd Functions do not compose with them), or
    tensors without real storage (FakeTensor, FunctionalTensor and other subclasses under
    FX/export). The compiled kernels are opaque there — a trace would record their output as a
    constant, and a fake tensor has no data to hand them — so the definition, written in torch
    operations, is what gets traced."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or _functorch_active():
        return True
    return type(x) is not Tensor and not isinstance(x, torch.nn.Parameter)


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _param(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


def train_forward_(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float, running: Optional[tuple] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1 with one allocation. Returns (y, mean, var, invstd); y in the accumulation dtype
    (in x's dtype when the compiled kernel runs it: one pass for the statistics, one to normalize).

    ``running = (running_mean, running_var, momentum, correction)`` also updates the running
    statistics (update_running_stats; inside the kernel call when it runs).
    """
    k = fast_kernels(x)
    if k is not None:
        _KERNELS.calls.bump("forward_train")
        if running is None:
            return tuple(k.forward_train(x, _param(weight), _param(bias), eps))
        rm, rv, momentum, correction = running
        return tuple(k.forward_train(x, _param(weight), _param(bias), eps, 0, 0.0, rm, rv, momentum,
                                     correction == "unbiased"))
    out = _train_forward_torch(x, weight, bias, eps)
    if running is not None:
        rm, rv, momentum, correction = running
        update_running_stats(rm, rv, out[1], out[2], values_per_channel(x), momentum, correction)
    return out


def _train_forward_torch(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = accumulation_dtype(x.dtype)
    x = x.to(acc)
    dims = reduction_dims(x)
    m = values_per_channel(x)
    mean = x.mean(dim=dims)                                          # C
    # (x − μ_B)² in one pass (mse_loss with reduction="none" is exactly the squared difference),
    # into the storage that becomes y
    out = F.mse_loss(x, channel_view(mean, x).expand_as(x), reduction="none")   # N,C,*
    var = out.sum(dim=dims).div_(m)                                  # C      ‖x − μ_B‖²/m
    invstd = torch.rsqrt(var + eps)                                  # C
    affine_(out, x, mean, invstd, _to(weight, acc), _to(bias, acc))
    return out, mean, var, invstd


def eval_forward_(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  mean: Tensor, invstd: Tensor) -> Tensor:
    """Algorithm 2's transform with one allocation (the output), in mean's dtype."""
    k = fast_kernels(x)
    if k is not None:
        _KERNELS.calls.bump("forward_eval")
        # the kernel takes the variance: invstd = 1/√(var + 0) with var = 1/invstd²
        return k.forward_eval(x, mean, invstd.reciprocal().square(), _param(weight), _param(bias), 0.0, 0, 0.0)
    x = x.to(mean.dtype)
    out = torch.empty_like(x)
    return affine_(out, x, mean, invstd, _to(weight, mean.dtype), _to(bias, mean.dtype))


def affine_(out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
            weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """out ← x·α + b with α = γ·invstd and b = β − μ·α, in one pass over x.

    This is Algorithm 2's own form of the inference transform (y = γ/√(Var+ε)·x +
    (β − γE[x]/√(Var+ε))) and the form torch.nn's CPU kernel evaluates. Its rounding error is
    of order eps·|μ|/σ — the same order as the quantization of x itself — so folding the mean
    into b costs nothing the input had not already lost (unlike the one-pass *variance*
    E[x²] − E[x]², whose error is eps·(μ/σ)² and is avoided above).
    """
    alpha = invstd if weight is None else invstd * weight            # C
    shift = torch.addcmul(bias if bias is not None else torch.zeros_like(mean),
                          mean, alpha, value=-1.0)                   # C  β − μ·α
    alpha, shift = channel_view(alpha, x), channel_view(shift, x)
    if x.dim() == 2 or x.stride(1) == 1:
        # channels vary along the innermost dimension: addcmul's vectorized row broadcast is best
        return torch.addcmul(shift, x, alpha, out=out)
    return torch.mul(x, alpha, out=out).add_(shift)


def train_backward_(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                    weight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form training backward with one allocation (dx). Returns (dx, dgamma, dbeta).

    With scale = γ·invstd, k = mean(dy ⊙ x_hat) and x_hat = (x − μ)·invstd, the closed form
    dx = scale·(dy − mean(dy) − x_hat·k) is, per channel, affine in (dy, x):
        dx = scale·dy + a·x + c,   a = −scale·invstd·k,   c = −scale·mean(dy) − a·μ
    which is how it is evaluated here: two reductions, then three in-place passes.
    """
    k = fast_kernels(x)
    if k is not None:
        _KERNELS.calls.bump("backward_train")
        dx, dgamma, dbeta = k.backward_train(dy, x, mean, invstd, _param(weight))
        return dx, dgamma, dbeta
    acc = mean.dtype
    x, dy = x.to(acc), dy.to(acc)
    dims = reduction_dims(x)
    m = values_per_channel(x)
    sum_dy = dy.sum(dim=dims)                                        # C  Σ dy
    dx = torch.sub(x, channel_view(mean, x))                         # N,C,*  x − μ (scratch)
    sum_dy_xhat = dx.mul_(dy).sum(dim=dims) * invstd                 # C  Σ dy ⊙ x_hat
    scale = invstd if weight is None else invstd * weight.to(acc)    # C  γ·invstd
    a = -scale * invstd * (sum_dy_xhat / m)                          # C
    c = -scale * (sum_dy / m) - a * mean                             # C
    torch.mul(x, channel_view(a, x), out=dx).add_(channel_view(c, x))
    dx.addcmul_(dy, channel_view(scale, x))
    return dx, sum_dy_xhat, sum_dy


# ----------------------------------------------------------------------------------------------
# autograd Functions: forward computes, backward is the closed form
# ----------------------------------------------------------------------------------------------
# When a graph of the backward is requested (create_graph=True, e.g. Hessian-vector products),
# the backward evaluates the definition above with the statistics recomputed from x, so that
# autograd can differentiate it again; otherwise it evaluates the memory-planned form.

def _train_backward_graph(dy: Tensor, x: Tensor, weight: Optional[Tensor], eps: float,
                          need_dx: bool, need_dw: bool, need_db: bool):
    """The training backward as a differentiable graph (create_graph=True): the definition, with
    the statistics recomputed from x. _BatchNormTrain and the C++ node (kernels.batch_norm_train)
    both call it."""
    mean, var = batch_mean_var(x)
    invstd = torch.rsqrt(var + eps)
    return batch_norm_backward(dy, x, mean, invstd, weight, training=True,
                               need_dx=need_dx, need_dweight=need_dw, need_dbias=need_db)


_NODE_READY = False
# The C++ module's one-call paths (batch_norm's first step), set once the module is in use
_TRAIN_FAST = None
_EVAL_FAST = None


def _arm_one_call_paths(k) -> None:
    global _TRAIN_FAST, _EVAL_FAST
    _TRAIN_FAST = getattr(k, "batch_norm_train_fast", None)
    _EVAL_FAST = getattr(k, "batch_norm_eval_fast", None)


def _has_autograd_node(k) -> bool:
    """Whether kernel module k is the C++ CPU module, which records training BN as a C++ autograd
    node; the node's differentiable backward is registered on first use."""
    global _NODE_READY
    if not hasattr(k, "batch_norm_train"):
        return False
    if not _NODE_READY:
        k.set_graph_backward(_train_backward_graph)
        _NODE_READY = True
        _arm_one_call_paths(k)
    return True


class _BatchNormTrain(torch.autograd.Function):
    """Algorithm 1 with batch statistics; returns y. Records the step for the Triton kernels and
    the torch-ops path; the C++ CPU kernels record their own node (kernels.batch_norm_train),
    which keeps Python out of the backward (docs/performance.md, "The autograd node")."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                running: Optional[tuple] = None):
        y, mean, _, invstd = train_forward_(x, weight, bias, eps, running)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        if dy is None:
            return None, None, None, None, None
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            dx, dweight, dbias = _train_backward_graph(dy, x, weight, ctx.eps, need_dx, need_dw, need_db)
        else:
            dx, dweight, dbias = train_backward_(dy, x, mean, invstd, weight)
        return (_to(dx, x.dtype) if need_dx else None,
                _to(dweight, _dtype_of(weight)) if need_dw else None,
                _to(dbias, ctx.bias_dtype) if need_db else None, None, None)


class _BatchNormEval(torch.autograd.Function):
    """Algorithm 2's inference transform with given (population) mean and variance."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                mean: Tensor, var: Tensor, eps: float):
        acc = accumulation_dtype(x.dtype)
        mean = mean.to(acc)
        invstd = torch.rsqrt(var.to(acc) + eps)
        y = eval_forward_(x, weight, bias, mean, invstd)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        if dy is None:
            return None, None, None, None, None, None
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dweight, dbias = batch_norm_backward(dy, x, mean, invstd, weight, training=False,
                                                 need_dx=need_dx, need_dweight=need_dw,
                                                 need_dbias=need_db)
        return (_to(dx, x.dtype), _to(dweight, _dtype_of(weight)),
                _to(dbias, ctx.bias_dtype), None, None, None)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def check_input(x: Tensor, num_features: Optional[int] = None) -> None:
    """Refuse what BN cannot normalize, with a message that says what to do."""
    if not isinstance(x, Tensor):
        raise TypeError(f"batch_norm expects a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise DTypeError(
            f"batch_norm needs a floating-point input, got {x.dtype}: convert it first, "
            f"e.g. x.float() (uint8 images: x.float() / 255)")
    if x.dim() < 2:
        raise ShapeError(
            f"batch_norm expects an input of shape (N, C, *) with at least 2 dimensions, got "
            f"shape {tuple(x.shape)}; for a single sample add a batch dimension with x[None]")
    if num_features is not None and x.shape[1] != num_features:
        raise ShapeError(
            f"batch_norm expects {num_features} channels in dimension 1, got input of shape "
            f"{tuple(x.shape)} ({x.shape[1]} channels): check the layer's num_features, or "
            f"move the feature dimension to position 1 (e.g. x.transpose(1, -1))")


def check_batch_size(x: Tensor) -> None:
    """Training statistics of a single value are undefined (σ²_B = 0, unbiased var = 0/0)."""
    if values_per_channel(x) == 1:
        raise BatchSizeError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{tuple(x.shape)}: batch statistics of one value are undefined. Use a batch of at "
            f"least 2, call model.eval() to normalize with the running statistics, or build the "
            f"layer with batch_of_one='use_running_stats'.")


def _check_param(name: str, t: Optional[Tensor], x: Tensor) -> None:
    """A per-channel argument: C values (running statistics 1-D, as torch.nn requires; weight and
    bias any shape, e.g. (1, C)), on the input's device."""
    if t is None:
        return
    channels = x.shape[1]
    if t.numel() != channels:
        raise ShapeError(f"{name} has {t.numel()} elements but the input has {channels} channels "
                         f"(dimension 1): {name} needs one element per channel")
    if name.startswith("running") and t.dim() != 1:
        raise ShapeError(f"{name} must be 1-D with {channels} values, got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise DeviceError(f"{name} is on {t.device} but the input is on {x.device}: move the layer "
                          f"and its buffers to the input's device (module.to(x.device))")


# ----------------------------------------------------------------------------------------------
# Public functional API
# ----------------------------------------------------------------------------------------------

def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               running_var_correction: str = "unbiased") -> Tensor:
    r"""Batch Normalization, with the signature and semantics of ``torch.nn.functional.batch_norm``.

    training=True:  normalize with the batch's mean and biased variance (Algorithm 1) and, if
                    running buffers are given, update them in place:
                    r ← (1 − momentum)·r + momentum·x_t, where x_t for the variance is the
                    unbiased batch variance (``running_var_correction="biased"`` to store σ²_B).
    training=False: normalize with ``running_mean``/``running_var`` (Algorithm 2); they must
                    be given.

    y = (x − E[x]) / √(Var[x] + ε) · γ + β, per channel of dimension 1.

    Shape:
        input (N, C, *), running_mean/running_var/weight/bias (C,); output like input (also
        its memory format, e.g. channels_last).

    Raises:
        DTypeError (a TypeError) for integer inputs; ShapeError (ValueError) for < 2 dims or a
        channel mismatch; BatchSizeError (ValueError) for one value per channel in training;
        ModeError for eval without running statistics.

    An empty batch (N = 0) returns an empty output and leaves the running buffers unchanged.
    NaN/Inf in the input propagate to that channel's output and, in training, its running
    statistics (as in torch.nn); modules can check for them with ``check_finite=True``.
    """
    # The two commonest calls — training with autograd (ending in the C++ autograd node) and
    # inference without it (the eval kernel) — have the checks of the path below made in one C++
    # call (kernels' batch_norm_train_fast / batch_norm_eval_fast), which returns None whenever
    # the path below must decide: right after a large kernel each small Python step costs µs,
    # 35–96 µs a call in all (docs/performance.md, "Per-call overhead with cold caches").
    if training:
        if (_TRAIN_FAST is not None and type(input) is Tensor and momentum is not None
                and running_var_correction in VAR_CORRECTIONS and not torch.compiler.is_compiling()):
            y = _TRAIN_FAST(input, weight, bias, eps, running_mean, running_var, momentum,
                            running_var_correction == "unbiased")
            if y is not None:
                return y
    elif _EVAL_FAST is not None and type(input) is Tensor and not torch.compiler.is_compiling():
        y = _EVAL_FAST(input, running_mean, running_var, weight, bias, eps)
        if y is not None:
            return y
    if isinstance(input, Tensor) and input.dim() < 2 and input.numel() == 0 and input.dtype.is_floating_point:
        # torch.nn.functional.batch_norm returns an empty 1-D input as it is (PyTorch's own OpInfo
        # samples include it); a non-empty one has no channel dimension and is refused below
        return _empty_output(input, weight, bias)
    check_input(input)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_param(name, t, input)
    if weight is not None and weight.dim() != 1:
        weight = weight.reshape(-1)
    if bias is not None and bias.dim() != 1:
        bias = bias.reshape(-1)
    if training:
        check_batch_size(input)
        if eps <= 0.0:                       # torch.nn's checks, in its order (a NaN eps passes both)
            raise ArgumentError(f"batch_norm eps must be positive during training, but got {eps}")
        if momentum is None:
            raise TypeError(
                "batch_norm's momentum must be a float; the module form's momentum=None "
                "(cumulative average) passes momentum = 1/num_batches_tracked")
        if input.numel() == 0:
            return _empty_output(input, weight, bias)
        if running_var_correction not in VAR_CORRECTIONS:
            raise ValueError(f"running_var_correction must be one of {VAR_CORRECTIONS}, "
                             f"got {running_var_correction!r}")
        running = None if (running_mean is None and running_var is None) else \
            (running_mean, running_var, momentum, running_var_correction)
        traced = _traced(input)
        if traced:
            return _batch_norm_traceable(input, weight, bias, eps, running=running)
        if _needs_graph(input, weight, bias):
            k = fast_kernels(input, traced)
            if k is not None and _has_autograd_node(k):
                # the C++ autograd node: same kernels, no Python in the backward
                _KERNELS.calls.bump("forward_train")
                rm, rv, momentum, correction = running if running is not None else (None, None, 0.0, "unbiased")
                return k.batch_norm_train(input, weight, bias, eps, rm, rv, momentum, correction == "unbiased")
            return _BatchNormTrain.apply(input, weight, bias, eps, running)
        # nothing to differentiate: skip the autograd.Function machinery (~25 µs a call)
        return train_forward_(input, weight, bias, eps, running)[0].to(input.dtype)
    if eps < 0.0:
        raise ArgumentError(f"batch_norm eps must be non-negative, but got {eps}")
    if running_mean is None or running_var is None:
        raise ModeError(
            "running_mean must be defined in evaluation mode: pass the running statistics, or "
            "training=True to normalize with the batch's statistics")
    if input.numel() == 0:
        return _empty_output(input, weight, bias)
    traced = _traced(input)
    if traced:
        return _batch_norm_traceable(input, weight, bias, eps, statistics=(running_mean, running_var))
    if _needs_graph(input, weight, bias):
        return _BatchNormEval.apply(input, weight, bias, running_mean, running_var, eps)
    k = fast_kernels(input, traced)
    if k is not None:
        # The kernel takes the running statistics as they are and forms 1/√(var + ε) itself (in
        # float64). No small tensor operation runs before it: each costs ~10 µs when the large
        # kernel before it has flushed the caches — five of them made cache-sized evals 1.1-1.4×
        # torch's in `bnlab bench batchnorm` (docs/performance.md, "Nothing small around the kernels").
        _KERNELS.calls.bump("forward_eval")
        if _EVAL_FAST is None and hasattr(k, "batch_norm_eval_fast"):
            _arm_one_call_paths(k)
        return k.forward_eval(input, running_mean, running_var, weight, bias, eps, 0, 0.0)
    acc = accumulation_dtype(input.dtype)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    return eval_forward_(input, weight, bias, running_mean.to(acc), invstd).to(input.dtype)


def _batch_norm_traceable(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                          running: Optional[tuple] = None,
                          statistics: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """BN as plain torch operations that autograd differentiates, for tracers (``_traced``): the
    same graph whatever the grad mode, no custom Function, no compiled kernel.

    Training (``statistics`` None): μ_B and σ²_B of the batch, running buffers updated from them
    (``running = (running_mean, running_var, momentum, correction)``); inference: ``statistics =
    (running_mean, running_var)``. y = (x − μ)·(σ² + ε)^(−1/2)·γ + β in the accumulation dtype.
    """
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)                                                   # N,C,*
    if statistics is None:
        dims = reduction_dims(xa)
        mean = xa.mean(dim=dims)                                     # C
        var = xa.var(dim=dims, correction=0)                         # C   σ²_B (biased)
        if running is not None:
            running_mean, running_var, momentum, correction = running
            with torch.no_grad():
                update_running_stats(running_mean, running_var, mean.detach(), var.detach(),
                                     values_per_channel(x), momentum, correction)
    else:
        mean, var = statistics[0].to(acc), statistics[1].to(acc)
    y = (xa - channel_view(mean, xa)) * channel_view(torch.rsqrt(var + eps), xa)
    if weight is not None:
        y = y * channel_view(weight.to(acc), xa)
    if bias is not None:
        y = y + channel_view(bias.to(acc), xa)
    return y.to(x.dtype)


def _needs_graph(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _empty_output(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """An empty batch has nothing to normalize; keep the graph so backward still runs (the
    parameters' gradients are then zeros)."""
    y = x * 1.0
    if x.dim() < 2:                              # no channel dimension to broadcast along
        for t in (weight, bias):
            if t is not None:
                y = y + t.sum() * 0
        return y.to(x.dtype)
    if weight is not None:
        y = y * channel_view(weight, x)
    if bias is not None:
        y = y + channel_view(bias, x)
    return y.to(x.dtype)


def reference_batch_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                         training: bool = False, eps: float = 1e-5) -> Tensor:
    """The forward as plain autograd-tracked tensor operations (no custom backward).

    An independent oracle for tests: autograd differentiates these lines directly, so comparing
    its gradients with the closed form checks the derivation, not only the code.
    """
    dims = reduction_dims(x)
    if training:
        mean = x.mean(dim=dims)
        var = (x - channel_view(mean, x)).square().mean(dim=dims)
    else:
        mean, var = running_mean, running_var
    x_hat = (x - channel_view(mean, x)) / torch.sqrt(channel_view(var, x) + eps)
    y = x_hat
    if weight is not None:
        y = y * channel_view(weight, x)
    if bias is not None:
        y = y + channel_view(bias, x)
    return y


def m_over_m_minus_1(m: int) -> float:
    """Algorithm 2's unbiasing factor m/(m−1) (1.017 at m = 60, 1.333 at m = 4)."""
    return m / (m - 1) if m > 1 else math.nan
