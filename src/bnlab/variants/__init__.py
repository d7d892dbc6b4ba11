"""Normalization variants, each a layer with BN's contract (state_dict, running statistics,
train/eval semantics), verified by float64 gradcheck."""

from .detached import DetachedNorm, DetachedNorm2d, detached_norm
from .lp import LpNorm1d, LpNorm2d
from .noisy import NoisyBatchNorm1d, NoisyBatchNorm2d, add_nonstationary_noise

__all__ = ["DetachedNorm", "DetachedNorm2d", "detached_norm", "NoisyBatchNorm1d", "NoisyBatchNorm2d",
           "add_nonstationary_noise", "LpNorm1d", "LpNorm2d"]
