r"""ℓp normalization (Santurkar et al. 2018, §3.3): centered like BN, scaled by the batch average
of the activations' ℓp norm instead of the per-feature standard deviation.

Santurkar et al. use it to show that normalizations with none of BN's distributional
guarantees — layer inputs are not standardized per feature and shift more — still train well
and smooth the landscape. The paper leaves the details open; bnlab chooses:

  * centering per feature with the batch mean, as BN: x̃ = x − μ_B;
  * per sample i, the ℓp norm of its centered activations over all features (and positions),
    divided by the number of entries so the scale does not depend on layer width::

        p = 1:  n_i = mean_j |x̃_ij|      p = 2:  n_i = (mean_j x̃_ij²)^½      p = ∞:  n_i = max_j |x̃_ij|

  * one scalar per layer (per group): d = mean_i n_i, the *batch average*; y = x̃ / (d + ε);
  * then BN's per-feature affine γ, β; in eval mode the running mean and a running d (EMA
    with the layer's momentum) replace the batch values;
  * ``groups``: the features split into equal contiguous groups, each with its own d (the lab
    batches seeds this way; groups=1 is the paper's layer).

Because d is one number per layer, individual features keep their relative scales: the input
distribution of a unit is *not* pinned to unit variance (for p = 2 this differs from BN, which
divides each feature by its own standard deviation). The gradient is autograd's, through μ_B
and d — of the functions below, which are the definition; on the CPU the compiled kernels
compute the same forward and its closed-form gradient in BN's passes plus one (the norms):
with z = x − μ, a = γ/D, φ = ∂n_i/∂z and κ = −Σ_c γ_c Σ(dy·z)_c / (N·D²)::

    dz = dy·a + κ·φ,   dx = dz − mean(dz),   dγ = Σ dy·z / D,   dβ = Σ dy
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import definition as D
from .. import functional as BF
from ..errors import ShapeError
from ..kernels import dispatch
from ._grouped import differentiable_backward, kernels_for

__all__ = ["LpNorm1d", "LpNorm2d", "lp_norm"]

P_VALUES = (1, 2, math.inf)


def _p(p) -> float:
    p = math.inf if p in ("inf", float("inf")) else float(p)
    if p not in P_VALUES:
        raise ValueError(f"p must be 1, 2 or inf, got {p}")
    return p


def lp_scale(x_centered: Tensor, p: float, groups: int) -> Tensor:
    """d per group: the batch mean of each sample's width-normalized ℓp norm. Returns (groups,)."""
    N, C = x_centered.shape[:2]
    z = x_centered.reshape(N, groups, C // groups, -1).reshape(N, groups, -1)   # N, G, entries
    if p == 1:
        n = z.abs().mean(-1)
    elif p == 2:
        n = z.square().mean(-1).sqrt()
    else:
        n = z.abs().amax(-1)
    return n.mean(0)                                                             # G


def lp_norm(x: Tensor, mean: Tensor, scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            eps: float, groups: int) -> Tensor:
    """y = (x − mean) / (d_group + ε) · γ + β."""
    C = x.shape[1]
    d = scale.repeat_interleave(C // groups)                                     # C
    return D.affine((x - D.channel_view(mean, x)) / D.channel_view(d + eps, x), weight, bias)


def _graph_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], code: int,
                    groups: int, eps: float, need_x: bool, need_w: bool, need_b: bool) -> tuple:
    """The training backward as a differentiable graph (create_graph=True; the compiled node calls
    it): the gradients of the definition (:func:`lp_scale`, :func:`lp_norm`) rebuilt from x."""
    p = math.inf if code == 0 else float(code)

    def reference(x, weight, bias):
        m = x.mean(dim=D.reduction_dims(x))
        return lp_norm(x, m, lp_scale(x - D.channel_view(m, x), p, groups), weight, bias, eps, groups)

    return differentiable_backward(reference, (x, weight, bias), (need_x, need_w, need_b), dy)


def _kernels(x: Tensor):
    """The compiled module if it takes x, with the graph backward its ℓp node calls registered."""
    k = kernels_for(x) if x.numel() > 0 else None
    if k is not None and not _kernels.registered:
        k.set_lp_graph_backward(_graph_backward)
        _kernels.registered = True
    return k


_kernels.registered = False


class _LpNorm(nn.Module):
    _expected_dims: tuple = ()

    def __init__(self, num_features: int, p=2, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, groups: int = 1,
                 device=None, dtype=None) -> None:
        super().__init__()
        if num_features % groups:
            raise ValueError(f"num_features {num_features} is not divisible by groups {groups}")
        factory = dict(device=device, dtype=dtype)
        self.num_features, self.p, self.eps, self.momentum = num_features, _p(p), eps, momentum
        self.affine, self.track_running_stats, self.groups = affine, track_running_stats, groups
        self.weight = nn.Parameter(torch.ones(num_features, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features, **factory)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_scale", torch.ones(groups, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_scale", None)
            self.register_buffer("num_batches_tracked", None)

    def forward(self, x: Tensor) -> Tensor:
        BF.check_input(x, self.num_features)
        if x.dim() not in self._expected_dims:
            raise ShapeError(f"{type(self).__name__} expects {self._expected_dims}-D input, got {x.dim()}-D")
        if self.training or self.running_mean is None:
            BF.check_batch_size(x)
            k = _kernels(x)
            if k is not None:          # one C++ call: forward, running statistics, the backward's node
                update = self.training and self.running_mean is not None
                return k.lp_train(x, self.weight, self.bias, 0 if self.p == math.inf else int(self.p), self.groups,
                                  self.eps, self.running_mean if update else None,
                                  self.running_scale if update else None,
                                  self.num_batches_tracked if update else None, float(self.momentum))
            mean = x.mean(dim=D.reduction_dims(x))
            scale = lp_scale(x - D.channel_view(mean, x), self.p, self.groups)
            if self.training and self.running_mean is not None:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_scale.lerp_(scale.detach(), self.momentum)
            return lp_norm(x, mean, scale, self.weight, self.bias, self.eps, self.groups)
        if x.numel() == 0:
            return lp_norm(x, self.running_mean, self.running_scale, self.weight, self.bias, self.eps, self.groups)
        # eval is BN's inference transform with 1/√var = 1/(d + ε): one kernel pass
        k = _kernels(x)
        if k is not None and not dispatch.needs_graph(x, self.weight, self.bias):
            return k.scaled_eval(x, self.running_mean, self.running_scale, self.weight, self.bias, self.eps, False)
        d = (self.running_scale + self.eps).repeat_interleave(self.num_features // self.groups)      # C
        return dispatch.evaluate(x, self.running_mean, d * d, self.weight, self.bias, 0.0)

    def extra_repr(self) -> str:
        p = "inf" if self.p == math.inf else int(self.p)
        return (f"{self.num_features}, p={p}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, groups={self.groups}")


class LpNorm1d(_LpNorm):
    """ℓp normalization of (N, C) or (N, C, L) inputs."""
    _expected_dims = (2, 3)


class LpNorm2d(_LpNorm):
    """ℓp normalization of (N, C, H, W) inputs; the per-sample norm runs over C·H·W."""
    _expected_dims = (4,)
