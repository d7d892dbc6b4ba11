r"""Batch Renormalization (Ioffe 2017, arXiv:1702.03275).

BN's training output depends on the mini-batch while inference uses moving averages; with small
or non-i.i.d. batches the two differ. Batch Renorm keeps moving averages μ, σ and corrects the
batch-normalized value towards them, with corrections treated as constants by the gradient::

    σ_B = √(σ²_B + ε)
    r = stopgrad(clip(σ_B / σ, 1/r_max, r_max))
    d = stopgrad(clip((μ_B − μ) / σ, −d_max, d_max))
    x̂ = (x − μ_B) / σ_B · r + d,      y = γ x̂ + β
    μ ← μ + α(μ_B − μ),  σ ← σ + α(σ_B − σ)                 (α = ``momentum``, 0.01 in the paper)
    inference:  y = γ (x − μ)/σ + β

With r_max = 1, d_max = 0 it is BN. ``warmup=True`` follows the paper's schedule: r_max = 1 and
d_max = 0 for the first ``warmup_steps`` (5k), then relaxed linearly to ``rmax`` by ``rmax_steps``
(40k) and ``dmax`` by ``dmax_steps`` (25k); the step count is ``num_batches_tracked``.

``virtual_batch_size``: normalize groups of that many examples separately (the paper's small
per-worker minibatches), each with its own r and d; the moving averages move towards the mean
of the groups' μ_B and σ_B.

Buffers are BN's (``running_mean``, ``running_var``, ``num_batches_tracked``), with
running_var = σ² − ε, so a BN checkpoint loads as it is and √(running_var + ε) = σ.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import definition as D
from .. import functional as BF
from ..batchnorm import BatchNorm1d, BatchNorm2d
from . import _grouped as G
from ._grouped import kernels_for
from .ghost import check_virtual_batch_size, ghost_splits

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "batch_renorm", "renorm_limits"]


def renorm_limits(step: int, rmax: float, dmax: float, warmup: bool, warmup_steps: int,
                  rmax_steps: int, dmax_steps: int) -> tuple[float, float]:
    """(r_max, d_max) at training step ``step`` (1-based)."""
    if not warmup:
        return rmax, dmax
    if step <= warmup_steps:
        return 1.0, 0.0
    fr = min(1.0, (step - warmup_steps) / max(1, rmax_steps - warmup_steps))
    fd = min(1.0, (step - warmup_steps) / max(1, dmax_steps - warmup_steps))
    return 1.0 + (rmax - 1.0) * fr, dmax * fd


def batch_renorm(x: Tensor, running_mean: Tensor, running_std: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], rmax: float, dmax: float, eps: float
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode Batch Renorm. Returns (y, μ_B, σ_B) with μ_B, σ_B detached for the averages."""
    mean, var = D.batch_moments(x)                                          # C, C
    std = torch.sqrt(var + eps)                                             # C: σ_B
    with torch.no_grad():
        r = (std / running_std).clamp(1.0 / rmax, rmax)
        d = ((mean - running_mean) / running_std).clamp(-dmax, dmax)
    x_hat = (x - D.channel_view(mean, x)) / D.channel_view(std, x) * D.channel_view(r, x) + D.channel_view(d, x)
    return D.affine(x_hat, weight, bias), mean.detach(), std.detach()


class _RenormMixin:
    _eval_is_bn = True                # eval: BN with the running statistics (folding, freezing)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.01, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, rmax: float = 3.0,
                 dmax: float = 5.0, warmup: bool = True, warmup_steps: int = 5000, rmax_steps: int = 40000,
                 dmax_steps: int = 25000, virtual_batch_size: Optional[int] = None,
                 check_finite: bool = False) -> None:
        if not track_running_stats:
            raise ValueError("Batch Renorm needs its moving averages: track_running_stats=True")
        if momentum is None:
            raise ValueError("Batch Renorm needs a momentum (the paper's α = 0.01)")
        if not (isinstance(rmax, (int, float)) and rmax >= 1 and math.isfinite(rmax)):
            raise ValueError(f"rmax must be a finite number ≥ 1 (r is clipped to [1/rmax, rmax]), got {rmax!r}")
        if not (isinstance(dmax, (int, float)) and dmax >= 0 and math.isfinite(dmax)):
            raise ValueError(f"dmax must be a finite number ≥ 0 (d is clipped to [−dmax, dmax]), got {dmax!r}")
        for name, v in (("warmup_steps", warmup_steps), ("rmax_steps", rmax_steps), ("dmax_steps", dmax_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer ≥ 0, got {v!r}")
        if virtual_batch_size is not None:
            check_virtual_batch_size(virtual_batch_size)
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, check_finite=check_finite)
        self.rmax, self.dmax, self.warmup = rmax, dmax, warmup
        self.warmup_steps, self.rmax_steps, self.dmax_steps = warmup_steps, rmax_steps, dmax_steps
        self.virtual_batch_size = virtual_batch_size

    def limits(self, step: Optional[int] = None) -> tuple[float, float]:
        step = int(self.num_batches_tracked) if step is None else step
        return renorm_limits(step, self.rmax, self.dmax, self.warmup, self.warmup_steps,
                             self.rmax_steps, self.dmax_steps)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training or self.frozen:
            self._check_finite(input)
            return BF.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                 training=False, eps=self.eps)
        BF.check_batch_size(input)
        self._check_finite(input)
        momentum = self._momentum_step()                        # counts the step the schedule reads
        rmax, dmax = self.limits() if self.warmup else (self.rmax, self.dmax)
        sizes = [input.shape[0]]
        if self.virtual_batch_size is not None and input.shape[0] > self.virtual_batch_size:
            sizes = ghost_splits(input.shape[0], self.virtual_batch_size)
        k = kernels_for(input)
        if k is not None:              # BN's kernels with r, d folded into the per-group scale and shift
            return G.train(k, input, self.weight, self.bias, sizes, self.eps, renorm=(rmax, dmax),
                           running_mean=self.running_mean, running_var=self.running_var, update=G.RENORM,
                           momentum=momentum)
        acc = D.accumulation_dtype(input.dtype)
        running_std = torch.sqrt(self.running_var.to(acc) + self.eps)
        weight = None if self.weight is None else self.weight.to(acc)
        bias = None if self.bias is None else self.bias.to(acc)
        results = [batch_renorm(g, self.running_mean.to(acc), running_std, weight, bias, rmax, dmax, self.eps)
                   for g in input.to(acc).split(sizes)]
        y = torch.cat([r[0] for r in results])
        mean = torch.stack([r[1] for r in results]).mean(0)
        std = torch.stack([r[2] for r in results]).mean(0)
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            new_std = running_std + momentum * (std - running_std)
            self.running_var.copy_((new_std.square() - self.eps).to(self.running_var.dtype))
        return y.to(input.dtype)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, warmup={self.warmup}"
                + (f" ({self.warmup_steps}/{self.dmax_steps}/{self.rmax_steps})" if self.warmup else ""))


class BatchRenorm1d(_RenormMixin, BatchNorm1d):
    """Batch Renormalization of (N, C) or (N, C, L) inputs."""


class BatchRenorm2d(_RenormMixin, BatchNorm2d):
    """Batch Renormalization of (N, C, H, W) inputs."""
