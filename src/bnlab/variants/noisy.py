r"""NoisyBatchNorm: BN followed by non-stationary noise (Santurkar et al. 2018, App. Alg. 1).

To ask whether BN's benefit comes from stabilizing layer-input distributions, Santurkar et al.
add *time-varying* noise after BN so that every layer's input distribution shifts at every step
— more ICS than without BN — and observe the network still trains like BN. Per step t (each
training forward) and unit j::

    μ_t ~ U(−n_μ, n_μ),  σ_t ~ U(1, n_σ)                 (the step's shift and scale)

and per sample i (for convolutions every (n, h, w) position counts as a sample)::

    m ~ U(μ_t − r_μ, μ_t + r_μ),   s ~ N(σ_t, r_σ),   a_ij ← s·a_ij + m

with n_μ = 0.5, n_σ = 1.25, r_μ = r_σ = 0.1, applied to the BN output a = γx̂ + β, in training
only. The noise comes from the layer's own ``torch.Generator`` (``noise_seed``): reproducible,
saved in the state_dict's extra state (so resumed runs continue the same noise), and it never
consumes the global random stream. The noise values are constants for the gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..batchnorm import BatchNorm1d, BatchNorm2d

__all__ = ["NoisyBatchNorm1d", "NoisyBatchNorm2d", "add_nonstationary_noise"]


def add_nonstationary_noise(a: Tensor, generator: torch.Generator, n_mu: float = 0.5,
                            n_sigma: float = 1.25, r_mu: float = 0.1, r_sigma: float = 0.1) -> Tensor:
    """a (N, C, *) → s·a + m with Santurkar's noise (see module docstring).

    The two full-size draws are made in place in a's layout and combined in one pass
    (m + a·s); drawing them is most of the layer's cost beyond BN's."""
    C = a.shape[1]
    shape = (1, C) + (1,) * (a.dim() - 2)
    opts = dict(generator=generator, dtype=torch.float32)
    mu_t = (torch.rand(C, **opts) * 2 - 1) * n_mu                         # C
    sigma_t = 1 + torch.rand(C, **opts) * (n_sigma - 1)                    # C
    dtype = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
    m = torch.empty(a.shape, dtype=torch.float32).uniform_(0, 1, generator=generator)
    m = m.to(dtype).mul_(2 * r_mu).add_((mu_t - r_mu).to(dtype).view(shape))      # U(μ_t − r_μ, μ_t + r_μ)
    s = torch.empty(a.shape, dtype=torch.float32).normal_(0, 1, generator=generator)
    s = s.to(dtype).mul_(r_sigma).add_(sigma_t.to(dtype).view(shape))             # N(σ_t, r_σ)
    if a.dtype != dtype:
        return (a.to(dtype) * s + m).to(a.dtype)
    return torch.addcmul(m, a, s)


class _NoisyMixin:
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, n_mu: float = 0.5, n_sigma: float = 1.25, r_mu: float = 0.1, r_sigma: float = 0.1,
                 noise_seed: int = 0, batchnorm: bool = True, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.n_mu, self.n_sigma, self.r_mu, self.r_sigma = n_mu, n_sigma, r_mu, r_sigma
        self.noise_seed = noise_seed
        self.batchnorm = batchnorm          # False: noise only (Santurkar's "standard + noise")
        self.generator = torch.Generator().manual_seed(noise_seed)

    @property
    def _eval_is_bn(self) -> bool:
        """Eval adds no noise: BN's output, unless the layer is noise alone (batchnorm=False)."""
        return self.batchnorm

    def reseed(self, seed: Optional[int] = None) -> None:
        self.generator.manual_seed(self.noise_seed if seed is None else seed)

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input) if self.batchnorm else input
        if self.training:
            out = add_nonstationary_noise(out, self.generator, self.n_mu, self.n_sigma, self.r_mu, self.r_sigma)
        return out

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state) -> None:
        if state and "generator" in state:
            self.generator.set_state(state["generator"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        extra = prefix + "_extra_state"
        if extra in missing_keys:            # a plain BN checkpoint: keep the current noise stream
            missing_keys.remove(extra)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", noise=(n_mu={self.n_mu}, n_sigma={self.n_sigma}, "
                f"r_mu={self.r_mu}, r_sigma={self.r_sigma}, seed={self.noise_seed})"
                + ("" if self.batchnorm else ", batchnorm=False"))


class NoisyBatchNorm1d(_NoisyMixin, BatchNorm1d):
    """BatchNorm1d followed by Santurkar's non-stationary noise (training only)."""


class NoisyBatchNorm2d(_NoisyMixin, BatchNorm2d):
    """BatchNorm2d followed by Santurkar's non-stationary noise; H, W count as samples."""
