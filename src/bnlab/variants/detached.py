r"""DetachedNorm: normalization whose statistics the gradient treats as constants (Ioffe §2).

Ioffe & Szegedy §2 explain why normalization must be part of the gradient step with a layer
x = u + b normalized by x̂ = x − E[x]: if the gradient ignores that E[x] depends on b, then
∂ℓ/∂b = ∂ℓ/∂x̂ ≠ 0, yet the update b ← b + Δb is undone by E[x] moving with it — "b will grow
indefinitely while the loss remains fixed". This layer computes exactly that::

    training:  y = (x − stopgrad(μ_B)) · stopgrad(1/√(σ²_B + ε))?  (· γ + β)
    eval:      the running statistics, as BN

``center=True, scale=False`` is §2's mean subtraction; ``scale=True`` also divides by the detached
standard deviation. The forward equals BN's (for scale=True); only the gradient differs:
∂ℓ/∂x = γ·invstd·∂ℓ/∂y — the projection terms of BN's closed form are missing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import definition as D
from .. import functional as BF
from ..kernels import dispatch
from ..batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm
from . import _grouped as G
from ._grouped import kernels_for

__all__ = ["DetachedNorm", "DetachedNorm2d", "detached_norm"]


def detached_norm(x: Tensor, mean: Tensor, var: Optional[Tensor], weight: Optional[Tensor],
                  bias: Optional[Tensor], eps: float) -> Tensor:
    """y = (x − mean)·rsqrt(var + ε) (if var is given) · γ + β, with mean/var constants."""
    y = x - D.channel_view(mean.detach().to(x.dtype), x)
    if var is not None:
        y = y * D.channel_view(torch.rsqrt(var.detach().to(x.dtype) + eps), x)
    return D.affine(y, weight, bias)


class _DetachedMixin:
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = False, track_running_stats: bool = True, device=None, dtype=None,
                 *, center: bool = True, scale: bool = False, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.center, self.scale = center, scale

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        k = kernels_for(input) if self._uses_batch_stats() and self.center else None
        if k is not None:
            return self._forward_kernels(input, k)
        if self._uses_batch_stats():
            BF.check_batch_size(input)
            with torch.no_grad():
                mean, var = D.batch_moments(input)
                if self._updates_running_stats():
                    D.update_running_stats(self.running_mean, self.running_var, mean, var,
                                           D.values_per_channel(input), self._momentum_step(),
                                           self.running_var_correction)
        else:
            mean, var = self.running_mean, self.running_var
            if self.center:                     # BN's inference on its one-call entry where that applies
                y = dispatch.eval_fast(input, mean, var, self.weight, self.bias, self.eps) if self.scale else \
                    dispatch.eval_fast(input, mean, self._unit(var), self.weight, self.bias, 0.0)
                if y is not None:
                    return y
            if input.numel() > 0:        # BN's inference transform (x − μ)·γ/√(var + ε) + β, on its kernel
                k = kernels_for(input)
                if k is not None and not dispatch.needs_graph(input, self.weight, self.bias):
                    return k.scaled_eval(input, mean if self.center else None, var if self.scale else None,
                                         self.weight, self.bias, self.eps, True)
                mu = mean if self.center else torch.zeros_like(mean)
                if self.scale:
                    return dispatch.evaluate(input, mu, var, self.weight, self.bias, self.eps)
                return dispatch.evaluate(input, mu, torch.ones_like(var), self.weight, self.bias, 0.0)
        if not self.center:
            mean = torch.zeros_like(mean)
        return detached_norm(input, mean, var if self.scale else None, self.weight, self.bias, self.eps)

    def _unit(self, like: Tensor) -> Tensor:
        """Ones like ``like`` (kept between calls): the variance that makes BN's inference x − μ."""
        ones = getattr(self, "_ones", None)
        if ones is None or ones.shape != like.shape or ones.dtype != like.dtype or ones.device != like.device:
            ones = self._ones = torch.ones_like(like)
        return ones

    def _forward_kernels(self, input: Tensor, k) -> Tensor:
        """BN's kernels: the forward is BN's normalize (or the mean subtraction alone), the backward
        BN's with the statistics' terms dropped (see variants._grouped)."""
        BF.check_batch_size(input)
        update = self._updates_running_stats()
        return G.train(k, input, self.weight, self.bias, [input.shape[0]], self.eps, scale=self.scale,
                       project=False, running_mean=self.running_mean, running_var=self.running_var,
                       update=G.WHOLE_BATCH if update else G.NO_UPDATE, momentum=self._momentum_step(),
                       unbiased=self.running_var_correction == "unbiased")

    @property
    def _eval_is_bn(self) -> bool:
        """Its eval output is BN's only with both centering and scaling (folding, freezing)."""
        return self.center and self.scale

    def extra_repr(self) -> str:
        return super().extra_repr() + f", center={self.center}, scale={self.scale}"


# _BatchNorm (state, state_dict, checks) but not torch's BatchNorm1d/2d: its gradient, and by
# default its eval output (x − μ, unscaled), are not BN's, so code that fuses or converts
# "every BatchNorm2d" must not take it for one.
class DetachedNorm(_DetachedMixin, _BatchNorm):
    """Ioffe §2's normalization outside the gradient, on (N, C) or (N, C, L) inputs."""

    _expected_dims = BatchNorm1d._expected_dims
    _shape_hint = BatchNorm1d._shape_hint


class DetachedNorm2d(_DetachedMixin, _BatchNorm):
    """Ioffe §2's normalization outside the gradient, on (N, C, H, W) inputs."""

    _expected_dims = BatchNorm2d._expected_dims
    _shape_hint = BatchNorm2d._shape_hint
