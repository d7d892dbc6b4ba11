r"""Batch Normalization: the whole math, in one file that runs.

Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by Reducing
Internal Covariate Shift" (arXiv:1502.03167), Algorithms 1 and 2. Per feature — per channel for
convolutions, where the statistics run over the ``m = N·H·W`` values of a channel::

    mean   = μ_B  = (1/m) Σ_i x_i
    var    = σ²_B = (1/m) Σ_i (x_i − μ_B)²        biased: the normalizer of Algorithm 1
    invstd = 1/√(σ²_B + ε)                       ε inside the square root
    x_hat  = (x − μ_B) · invstd
    y      = γ · x_hat + β

With ``dy = ∂ℓ/∂y``, the closed-form backward (derived step by step in docs/batchnorm.md)::

    dx     = γ · invstd · (dy − mean(dy) − x_hat · mean(dy ⊙ x_hat))
    dgamma = Σ dy ⊙ x_hat
    dbeta  = Σ dy

At inference (Algorithm 2) ``mean``/``var`` are population estimates, constants for the
gradient, so ``dx = γ · invstd · dy``. Training leaves running estimates behind:
``r ← (1 − m)·r + m·x_t`` with the *unbiased* batch variance ``m/(m−1)·σ²_B`` (PyTorch's
convention; m = momentum, or 1/t for the cumulative average).

This file is the reference backend: what runs under torch.func transforms, for double backward,
and when the compiled kernels are off, and the oracle the kernels are tested against. (A graph
recorded for PyTorch's tools — jit.trace, torch.export, torch.compile, FX — holds torch's own
batch_norm op instead, the one those tools recognize.) The kernels (bnlab.kernels) evaluate the
same expressions with fewer passes over memory.

Numerical decisions: statistics are two-pass (never the cancelling E[x²] − E[x]²); float16 and
bfloat16 inputs are computed in float32 (``accumulation_dtype``), outputs cast back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["reduction_dims", "channel_view", "values_per_channel", "accumulation_dtype",
           "batch_moments", "Moments", "merge_moments", "affine", "normalize", "batch_norm",
           "backward_sums", "input_gradient", "batch_norm_backward", "update_running_stats",
           "momentum_at", "VAR_CORRECTIONS", "EMA_CONVENTIONS"]

VAR_CORRECTIONS = ("unbiased", "biased")
EMA_CONVENTIONS = ("pytorch", "cumulative", "debiased")


# -- shapes ------------------------------------------------------------------------------------

def reduction_dims(x: Tensor) -> tuple[int, ...]:
    """Every dimension but the channel dimension 1: (0, 2, 3, ...)."""
    return (0,) + tuple(range(2, x.dim()))


def channel_view(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector (C,) shaped to broadcast against x (N, C, *): (1, C, 1, ...)."""
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def values_per_channel(x: Tensor) -> int:
    """m = N · ∏ spatial: the number of values each channel's statistics run over."""
    return x.numel() // x.shape[1] if x.shape[1] > 0 else 0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16 (statistics and normalization), else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# -- statistics --------------------------------------------------------------------------------

def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """(μ_B, σ²_B) per channel of x (N, C, *), two-pass, in ``accumulation_dtype``. Each (C,)."""
    x = x.to(accumulation_dtype(x.dtype))
    dims = reduction_dims(x)
    mean = x.mean(dim=dims)                                                 # C
    var = (x - channel_view(mean, x)).square().sum(dim=dims) / values_per_channel(x)   # C
    return mean, var


def merge_moments(count: Tensor, mean: Tensor, m2: Tensor, dim: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Exact merge of K partial moments (n_k, μ_k, M2_k = Σ(x − μ_k)²) stacked along ``dim``
    (Chan, Golub & LeVeque)::

        n = Σ n_k,   μ = Σ n_k μ_k / n,   M2 = Σ M2_k + Σ n_k (μ_k − μ)²

    The same totals whatever the split of the data. Returns (n, μ, M2); μ = 0 where n = 0."""
    n = count.sum(dim)
    mu = (count * mean).sum(dim) / n.clamp_min(1)
    m2_total = m2.sum(dim) + (count * (mean - mu.unsqueeze(dim)).square()).sum(dim)
    return n, mu, m2_total


@dataclass
class Moments:
    """Per-channel count n, mean and M2 = Σ(x − mean)² in float64: statistics that merge exactly
    (population statistics batch by batch, SyncBatchNorm rank by rank)."""

    count: Tensor                 # ()  the number of values per channel
    mean: Tensor                  # C
    m2: Tensor                    # C

    @staticmethod
    def empty(channels: int, device=None) -> "Moments":
        z = torch.zeros(channels, dtype=torch.float64, device=device)
        return Moments(torch.zeros((), dtype=torch.float64, device=device), z, z.clone())

    @staticmethod
    @torch.no_grad()
    def of_batch(x: Tensor) -> "Moments":
        """Two-pass moments of x (N, C, *) in float64."""
        x = x.detach().to(torch.float64)
        mean, var = batch_moments(x)
        m = values_per_channel(x)
        return Moments(torch.tensor(float(m), dtype=torch.float64, device=x.device), mean, var * m)

    def merge(self, other: "Moments") -> "Moments":
        n, mu, m2 = merge_moments(torch.stack([self.count, other.count]).unsqueeze(1),
                                  torch.stack([self.mean, other.mean]), torch.stack([self.m2, other.m2]))
        return Moments(n[0], mu, m2)

    def var(self, correction: str = "unbiased") -> Tensor:
        """M2/(n − 1) (unbiased) or M2/n (biased)."""
        return self.m2 / (self.count - 1 if correction == "unbiased" else self.count)


# -- forward -----------------------------------------------------------------------------------

def affine(x_hat: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """y = γ · x̂ + β per channel (either may be absent): the tail every normalization shares."""
    y = x_hat if weight is None else x_hat * channel_view(weight.to(x_hat.dtype), x_hat)
    return y if bias is None else y + channel_view(bias.to(x_hat.dtype), x_hat)


def normalize(x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Optional[Tensor],
              bias: Optional[Tensor]) -> Tensor:
    """y = γ · (x − μ) / √(σ² + ε) + β, in the dtype of ``mean``."""
    x_hat = (x.to(mean.dtype) - channel_view(mean, x)) * channel_view(torch.rsqrt(var + eps), x)
    return affine(x_hat, weight, bias)


def batch_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float,
               eps: float, correction: str = "unbiased") -> Tensor:
    """Algorithm 1 (training: batch statistics, running estimates updated in place) or Algorithm 2
    (inference: the running estimates), as plain differentiable tensor operations. Shape: x
    (N, C, *), the rest (C,); returns y like x."""
    acc = accumulation_dtype(x.dtype)
    if training:
        mean, var = batch_moments(x)
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(),
                             values_per_channel(x), momentum, correction)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    return normalize(x, mean, var, eps, weight, bias).to(x.dtype)


# -- backward ----------------------------------------------------------------------------------

def backward_sums(dy: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ dy, Σ dy ⊙ x_hat) per channel: dbeta and dgamma, and all dx needs of the batch."""
    dims = reduction_dims(x_hat)
    return dy.sum(dim=dims), (dy * x_hat).sum(dim=dims)


def input_gradient(dy: Tensor, x_hat: Tensor, sum_dy: Tensor, sum_dy_xhat: Tensor, m: float,
                   scale: Tensor) -> Tensor:
    """dx = γ·invstd · (dy − Σdy/m − x_hat · Σ(dy ⊙ x_hat)/m), with scale = γ·invstd (C,)."""
    return (dy - channel_view(sum_dy / m, dy) - x_hat * channel_view(sum_dy_xhat / m, dy)) * channel_view(scale, dy)


def batch_norm_backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                        training: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dgamma, dbeta) in the dtype of ``mean``, written with differentiable operations (so
    autograd can differentiate it again). In eval the statistics are constants: dx = γ·invstd·dy."""
    acc = mean.dtype
    dy = dy.to(acc)
    x_hat = (x.to(acc) - channel_view(mean, x)) * channel_view(invstd, x)         # N,C,*
    sum_dy, sum_dy_xhat = backward_sums(dy, x_hat)                                  # C, C
    scale = invstd if weight is None else invstd * weight.reshape(-1).to(acc)       # C: γ·invstd
    if training:
        dx = input_gradient(dy, x_hat, sum_dy, sum_dy_xhat, values_per_channel(x), scale)
    else:
        dx = dy * channel_view(scale, dy)
    return dx, sum_dy_xhat, sum_dy


# -- running statistics ------------------------------------------------------------------------

@torch.no_grad()
def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor,
                         var: Tensor, count: int, momentum: float, correction: str = "unbiased") -> None:
    """In place: r ← (1 − m)·r + m·x_t, x_t the unbiased m/(m−1)·σ²_B (``correction="unbiased"``,
    PyTorch) or the biased σ²_B (``"biased"``, Keras/Flax) for the variance."""
    if correction not in VAR_CORRECTIONS:
        raise ValueError(f"running_var_correction must be one of {VAR_CORRECTIONS}, got {correction!r}")
    if running_mean is not None:
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)         # r + m·(x_t − r)
    if running_var is not None:
        if correction == "unbiased" and count > 1:
            var = var * (count / (count - 1))
        running_var.lerp_(var.to(running_var.dtype), momentum)


def momentum_at(convention: str, momentum: Optional[float], step: int) -> float:
    """m_t of r_t = (1 − m_t)·r_{t−1} + m_t·x_t at step t ≥ 1. pytorch: m; cumulative (or
    momentum None): 1/t; debiased (Haiku's EMA divided by 1 − d^t, d = 1 − m): m / (1 − d^t)."""
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
