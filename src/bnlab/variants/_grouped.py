r"""The variants that are BN with a twist, on BN's compiled kernels.

Ghost BN, Batch Renorm and Detached normalization all compute, per group g of consecutive
examples (one group, or the virtual batches)::

    y = γ·(x̂_g·r_g + d_g) + β,      x̂_g = (x − μ_g)·s_g,    s_g = 1/√(σ²_g + ε)  (or 1)

with r = 1, d = 0 except in Batch Renorm, where r_g, d_g are per-channel constants of the
gradient. That is BN's normalize with the per-group scale γ·r_g and shift γ·d_g + β, and its
gradient is BN's closed form with that scale (statistics in the gradient: Ghost, Renorm) or
only its first term (statistics constant: Detached)::

    dx = γ r_g·s_g·(dy − mean_g(dy) − x̂_g·mean_g(dy·x̂_g))      or      γ r_g·s_g·dy
    dγ = Σ_g (r_g·Σ dy·x̂_g + d_g·Σ dy),   dβ = Σ dy

The compiled module's ``group_train`` runs the whole training step — moments, r and d, the
normalize, the running statistics, and a C++ autograd node for the backward — in one call: on a
(256, 512) batch the dozen small tensor operations it replaces cost more than BN's own step.
Each variant's readable definition stays in its module: it runs wherever the kernels do not
(other devices and dtypes, tracers, kernels off) and is the reference the tests hold this path
to. A graph of the backward (create_graph=True) differentiates :func:`graph_backward`, the same
per-group formula written with torch operations.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import definition as D
from ..kernels import dispatch

__all__ = ["kernels_for", "train", "graph_backward", "differentiable_backward",
           "NO_UPDATE", "WHOLE_BATCH", "PER_GROUP", "RENORM"]

# how group_train updates the running statistics
NO_UPDATE, WHOLE_BATCH, PER_GROUP, RENORM = 0, 1, 2, 3


def kernels_for(x: Tensor):
    """The compiled CPU module if it takes x (and has the grouped step), else None."""
    k = dispatch.compiled_for(x, "group_train")
    if k is None:
        return None
    if not _Registered.done:
        k.set_group_graph_backward(graph_backward)
        _Registered.done = True
    return k


class _Registered:
    done = False


def train(k, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], sizes: Sequence[int], eps: float, *,
          scale: bool = True, project: bool = True, renorm: Optional[tuple[float, float]] = None,
          running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None, update: int = NO_UPDATE,
          momentum: float = 0.0, unbiased: bool = True) -> Tensor:
    """The grouped training step on the compiled module ``k`` (see the module docstring):
    ``renorm = (r_max, d_max)`` for Batch Renorm; ``update`` one of NO_UPDATE, WHOLE_BATCH (the
    batch's moments from the groups' by Chan's merge), PER_GROUP (each group's in turn), RENORM."""
    rmax, dmax = renorm if renorm is not None else (1.0, 0.0)
    return k.group_train(x, weight, bias, list(sizes), eps, scale, project, renorm is not None, rmax, dmax,
                         running_mean, running_var, update, momentum, unbiased)


def graph_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], sizes: list[int],
                   eps: float, scale: bool, project: bool, mean: Tensor, invstd: Tensor, r: Optional[Tensor],
                   d: Optional[Tensor], need_dx: bool, need_dw: bool, need_db: bool) -> tuple:
    """The grouped step's backward as a differentiable graph (create_graph=True, called by the C++
    node): the gradient of y = γ·(x̂_g·r_g + d_g) + β rebuilt from x — x̂_g with the group's own
    statistics when ``project``, else with the saved constants μ_g, s_g — so second derivatives
    are exact. ``mean``, ``invstd``, ``r``, ``d``: (G, C) float64."""
    acc = D.accumulation_dtype(x.dtype)
    xa = x.to(acc)
    parts = []
    for g, xg in enumerate(xa.split(sizes)):
        if project:
            mu, var = D.batch_moments(xg)
            s = torch.rsqrt(var + eps) if scale else torch.ones_like(var)
        else:
            mu, s = mean[g].to(acc), invstd[g].to(acc)
        x_hat = (xg - D.channel_view(mu, xg)) * D.channel_view(s, xg)
        if r is not None:
            x_hat = x_hat * D.channel_view(r[g].to(acc), xg) + D.channel_view(d[g].to(acc), xg)
        parts.append(x_hat)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    y = D.affine(torch.cat(parts), w, b).to(x.dtype)
    return differentiable_backward(lambda *_: y, (x, weight, bias), (need_dx, need_dw, need_db), dy)


def differentiable_backward(reference: Callable, tensors: Sequence[Optional[Tensor]], needs: Sequence[bool],
                            dy: Tensor) -> tuple:
    """A backward whose graph is wanted (create_graph=True): the gradients of ``reference(*tensors)``
    — the readable forward, rebuilt from the saved inputs, which carry their history here — so
    second derivatives are exact. Returns one gradient (or None) per tensor."""
    inputs = [t for t, need in zip(tensors, needs) if need and t is not None]
    grads = iter(torch.autograd.grad(reference(*tensors), inputs, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need and t is not None else None for t, need in zip(tensors, needs))
