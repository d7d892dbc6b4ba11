r"""The variants that are BN with a twist, on BN's compiled kernels.

Ghost BN, Batch Renorm and Detached normalization all compute, per group g of consecutive
examples (one group, or the virtual batches)::

    y = γ·(x̂_g·r_g + d_g) + β,      x̂_g = (x − μ_g)·invstd_g

with r = 1, d = 0 except in Batch Renorm, where r_g, d_g are per-channel constants of the
gradient. That is BN's normalize with the per-group scale γ·r_g and shift γ·d_g + β, and its
gradient is BN's closed form with that scale (statistics in the gradient: Ghost, Renorm) or
only its first term (statistics constant: Detached)::

    dx = γ r_g·invstd_g·(dy − mean_g(dy) − x̂_g·mean_g(dy·x̂_g))      or      γ r_g·invstd_g·dy
    dγ = Σ_g (r_g·Σ dy·x̂_g + d_g·Σ dy),   dβ = Σ dy

so the compiled group entries (``group_moments``, ``group_normalize``, ``group_backward``) carry
them in BN's passes. Each variant's readable definition stays in its module: it runs wherever the
kernels do not (other devices and dtypes, tracers, kernels off), is what a graph of the backward
(create_graph=True) differentiates, and is the reference the tests hold this path to.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..kernels import dispatch

__all__ = ["kernels_for", "GroupNorm", "differentiable_backward"]


def kernels_for(x: Tensor):
    """The compiled CPU module if it takes x (and has the group entries), else None."""
    k = dispatch.select(x)
    return k if k is not None and k is dispatch.cpu_module() and hasattr(k, "group_moments") else None


def differentiable_backward(reference: Callable, tensors: Sequence[Optional[Tensor]], needs: Sequence[bool],
                            dy: Tensor) -> tuple:
    """A backward whose graph is wanted (create_graph=True): the gradients of ``reference(*tensors)``
    — the readable forward, rebuilt from the saved inputs, which carry their history here — so
    second derivatives are exact. Returns one gradient (or None) per tensor."""
    inputs = [t for t, need in zip(tensors, needs) if need and t is not None]
    grads = iter(torch.autograd.grad(reference(*tensors), inputs, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need and t is not None else None for t, need in zip(tensors, needs))


class GroupNorm(torch.autograd.Function):
    """y = (x − μ_g)·invstd_g·(γ r_g) + (γ d_g + β) over groups of ``sizes`` examples.

    ``mean``/``var`` (G, C) are the groups' statistics (constants here; ``project`` says whether
    the gradient treats them as functions of x); ``r``/``d`` (G, C) or None. ``reference`` rebuilds
    y from (x, weight, bias) with the readable definition, for a differentiable backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
                r: Optional[Tensor], d: Optional[Tensor], eps: float, sizes: Sequence[int], project: bool, k,
                reference: Callable) -> Tensor:
        C = x.shape[1]
        acc = mean.dtype
        w = weight.detach().reshape(C).to(acc) if weight is not None else None
        b = bias.detach().reshape(C).to(acc) if bias is not None else None
        w_eff = w if r is None else (r if w is None else w * r)                       # C or G, C
        b_eff = b
        if d is not None:
            shift = d if w is None else w * d
            b_eff = shift if b is None else b + shift
        y = k.group_normalize(x, mean, var, w_eff, b_eff, eps, list(sizes), True)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd, w_eff, r, d)
        ctx.sizes, ctx.project, ctx.k, ctx.reference = list(sizes), project, k, reference
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy: Optional[Tensor]):
        if dy is None:
            return (None,) * 12
        x, weight, bias, mean, invstd, w_eff, r, d = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            return differentiable_backward(ctx.reference, (x, weight, bias), (need_x, need_w, need_b), dy) \
                + (None,) * 9
        dx, sxh, sdy = ctx.k.group_backward(dy, x, mean, invstd, w_eff, ctx.sizes, ctx.project)
        dweight = dbias = None
        if need_w and weight is not None:
            g = sxh if r is None else sxh * r
            if d is not None:
                g = g + sdy * d
            dweight = g.sum(0).to(weight.dtype).reshape(weight.shape)
        if need_b and bias is not None:
            dbias = sdy.sum(0).to(bias.dtype).reshape(bias.shape)
        return (dx if need_x else None, dweight, dbias) + (None,) * 9
