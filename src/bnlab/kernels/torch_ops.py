"""The torch-ops backend: bnlab.definition's expressions, memory-planned, on any device.

It runs where no compiled kernel can (no C++ compiler, a GPU without Triton, float16 on the
CPU) and writes every full-size intermediate into the storage of the tensor it returns: a fresh
allocation of a large tensor costs more than an arithmetic pass over it (page faults above
glibc's mmap threshold), so — like torch.nn's kernel — it allocates y in forward and dx in
backward, nothing else. The interface is the compiled backends' (``forward_train``,
``forward_eval``, ``backward_train``); outputs are in the input's dtype, statistics and
parameter gradients in the accumulation dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..definition import accumulation_dtype, channel_view, reduction_dims, update_running_stats, values_per_channel

__all__ = ["forward_train", "forward_eval", "backward_train", "affine_"]


def _to(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.detach().reshape(-1).to(dtype)


def affine_(out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
            bias: Optional[Tensor]) -> Tensor:
    """out ← x·α + b with α = γ·invstd and b = β − μ·α: Algorithm 2's form of the transform, one
    pass over x. Its rounding error is of order ε·|μ|/σ, the order of x's own quantization (unlike
    the one-pass variance, whose error ε·(μ/σ)² is avoided in the statistics)."""
    alpha = invstd if weight is None else invstd * weight                  # C
    shift = torch.addcmul(bias if bias is not None else torch.zeros_like(mean), mean, alpha, value=-1.0)  # C
    alpha, shift = channel_view(alpha, x), channel_view(shift, x)
    if x.dim() == 2 or x.stride(1) == 1:
        # channels vary along the innermost dimension: addcmul's vectorized row broadcast is best
        return torch.addcmul(shift, x, alpha, out=out)
    return torch.mul(x, alpha, out=out).add_(shift)


def forward_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, act: int = 0,
                  slope: float = 0.0, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                  momentum: float = 0.0, unbiased: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1 with one allocation: (y, mean, var, invstd); updates the running statistics."""
    if act != 0:
        raise NotImplementedError("the torch-ops backend fuses no activation")
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    dims = reduction_dims(xa)
    mean = xa.mean(dim=dims)                                                         # C
    # (x − μ_B)² in one pass (mse_loss with reduction="none" is exactly the squared difference),
    # into the storage that becomes y
    out = F.mse_loss(xa, channel_view(mean, xa).expand_as(xa), reduction="none")     # N,C,*
    var = out.sum(dim=dims).div_(values_per_channel(xa))                             # C
    invstd = torch.rsqrt(var + eps)                                                  # C
    affine_(out, xa, mean, invstd, _to(weight, acc), _to(bias, acc))
    update_running_stats(running_mean, running_var, mean, var, values_per_channel(x), momentum,
                         "unbiased" if unbiased else "biased")
    return out.to(x.dtype), mean, var, invstd


def forward_eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], eps: float, act: int = 0, slope: float = 0.0) -> Tensor:
    """Algorithm 2's transform with one allocation (the output)."""
    if act != 0:
        raise NotImplementedError("the torch-ops backend fuses no activation")
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    out = affine_(torch.empty_like(xa), xa, running_mean.to(acc), invstd, _to(weight, acc), _to(bias, acc))
    return out.to(x.dtype)


def backward_train(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                   weight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form training backward with one allocation (dx): (dx, dgamma, dbeta).

    With scale = γ·invstd, k = mean(dy ⊙ x_hat) and x_hat = (x − μ)·invstd, the closed form
    dx = scale·(dy − mean(dy) − x_hat·k) is, per channel, affine in (dy, x):
        dx = scale·dy + a·x + c,   a = −scale·invstd·k,   c = −scale·mean(dy) − a·μ
    which is how it is evaluated here: two reductions, then three in-place passes."""
    acc = mean.dtype
    xa, dya = x.to(acc), dy.to(acc)
    dims = reduction_dims(xa)
    m = values_per_channel(xa)
    sum_dy = dya.sum(dim=dims)                                                       # C  Σ dy
    dx = torch.sub(xa, channel_view(mean, xa))                                       # N,C,*  x − μ (scratch)
    sum_dy_xhat = dx.mul_(dya).sum(dim=dims) * invstd                                # C  Σ dy ⊙ x_hat
    scale = invstd if weight is None else invstd * _to(weight, acc)                  # C  γ·invstd
    a = -scale * invstd * (sum_dy_xhat / m)                                          # C
    c = -scale * (sum_dy / m) - a * mean                                             # C
    torch.mul(xa, channel_view(a, xa), out=dx).add_(channel_view(c, xa))
    dx.addcmul_(dya, channel_view(scale, xa))
    return dx.to(x.dtype), sum_dy_xhat, sum_dy
