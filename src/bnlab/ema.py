r"""Running-statistics conventions, made explicit, and importers from other frameworks.

Every framework keeps r_t ≈ the population statistic with an update r_t = (1 − m_t)·r_{t−1} +
m_t·x_t; they differ in m_t, in what they call "momentum", and in which batch variance x_t is:

  convention   m_t                         "momentum" means   variance averaged
  pytorch      m (0.1)                      m                  unbiased m/(m−1)·σ²_B
  cumulative   1/t                          (momentum=None)    unbiased
  debiased     m / (1 − (1 − m)^t)          decay d = 1 − m    (Haiku's ExponentialMovingAverage)
  keras/flax   1 − d (d = 0.99)             decay d            biased σ²_B

The debiased EMA is Haiku's: hidden_t = d·hidden_{t−1} + (1 − d)·x_t from hidden_0 = 0, divided
by 1 − d^t. Written as an update of the debiased value a_t itself it is the PyTorch update with
the step-dependent momentum above (m_1 = 1, so the zero start leaves no trace; m_t → m).
bnlab's BatchNorm takes ``ema="pytorch"|"debiased"`` (and momentum=None for cumulative).

Importers convert *stored* statistics: ``momentum = 1 − decay``, and a biased variance is made
unbiased with the factor n/(n − 1), where n is the number of values per feature in each
training batch (batch size × spatial positions) — which only the user knows, so it is required.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .batchnorm import is_batchnorm
from .definition import EMA_CONVENTIONS
from .definition import momentum_at as effective_momentum

__all__ = ["effective_momentum", "EMA_CONVENTIONS", "ImportedStatistics", "from_framework",
           "load_statistics"]

FRAMEWORKS = ("pytorch", "keras", "flax", "haiku")


@dataclass
class ImportedStatistics:
    """Statistics in bnlab/PyTorch convention."""

    running_mean: Tensor
    running_var: Tensor          # unbiased (or biased if keep_biased=True)
    momentum: float              # PyTorch meaning: weight of the new batch
    ema: str                     # "pytorch" or "debiased"
    steps: Optional[int] = None


def from_framework(mean: Tensor, var: Tensor, framework: str, *, decay: Optional[float] = None,
                   values_per_batch: Optional[int] = None, keep_biased: bool = False,
                   steps: Optional[int] = None) -> ImportedStatistics:
    """Convert stored running statistics of ``framework`` to bnlab's convention.

    ``mean`` and ``var`` are the stored moving mean and variance (Keras moving_mean/moving_variance,
    Flax batch_stats mean/var, Haiku mean_ema/var_ema averages, torch buffers).

    Args:
        framework: "keras", "flax", "haiku" (biased variance, "momentum"/decay d) or "pytorch".
        decay: the framework's momentum/decay d (default 0.99 for Keras/Flax, 0.999 for Haiku);
            for "pytorch" pass the torch momentum m here (default 0.1).
        values_per_batch: n, values per feature per training batch (N·H·W); required to make a
            biased variance unbiased unless ``keep_biased``.
        keep_biased: keep the biased variance (then build the layer with
            running_var_correction="biased" so that further training stays consistent).
        steps: Haiku's counter (number of updates), carried over for the debiased EMA.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    mean = torch.as_tensor(mean).detach().clone()
    var = torch.as_tensor(var).detach().clone()
    if framework == "pytorch":
        return ImportedStatistics(mean, var, 0.1 if decay is None else decay, "pytorch", steps)
    d = decay if decay is not None else (0.999 if framework == "haiku" else 0.99)
    if not 0.0 <= d < 1.0:
        raise ValueError(f"{framework} decay must be in [0, 1), got {d} (e.g. Keras momentum=0.99)")
    if not keep_biased:
        if values_per_batch is None or values_per_batch < 2:
            raise ValueError(
                f"{framework} stores the biased batch variance; to make it unbiased (the PyTorch/"
                f"bnlab convention) pass values_per_batch = batch size × spatial positions of "
                f"the training batches (≥ 2), or keep_biased=True")
        var = var * (values_per_batch / (values_per_batch - 1))
    ema = "debiased" if framework == "haiku" else "pytorch"
    return ImportedStatistics(mean, var, 1.0 - d, ema, steps)


@torch.no_grad()
def load_statistics(layer: nn.Module, stats: ImportedStatistics, *, eps: Optional[float] = None,
                    gamma: Optional[Tensor] = None, beta: Optional[Tensor] = None) -> nn.Module:
    """Write imported statistics (and optionally γ, β, ε) into a BN layer. Returns the layer."""
    if not is_batchnorm(layer) or layer.running_mean is None:
        raise ValueError(f"{type(layer).__name__} is not a batch-norm layer with running statistics")
    layer.running_mean.copy_(stats.running_mean.to(layer.running_mean))
    layer.running_var.copy_(stats.running_var.to(layer.running_var))
    layer.momentum = stats.momentum
    if hasattr(layer, "ema"):
        layer.ema = stats.ema
    if stats.steps is not None and layer.num_batches_tracked is not None:
        layer.num_batches_tracked.fill_(stats.steps)
    if eps is not None:
        layer.eps = eps
    if gamma is not None:
        layer.weight.copy_(torch.as_tensor(gamma).to(layer.weight))
    if beta is not None:
        layer.bias.copy_(torch.as_tensor(beta).to(layer.bias))
    return layer
