"""Normalization variants, each a layer with BN's contract (state_dict, running statistics,
train/eval semantics), verified by float64 gradcheck."""

from .detached import DetachedNorm, DetachedNorm2d, detached_norm
from .frozen import FrozenBatchNorm
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d
from .lp import LpNorm1d, LpNorm2d
from .noisy import NoisyBatchNorm1d, NoisyBatchNorm2d, add_nonstationary_noise, nonstationary_noise
from .renorm import BatchRenorm1d, BatchRenorm2d
from .whitening import DecorrelatedBatchNorm, IterNorm

__all__ = ["DetachedNorm", "DetachedNorm2d", "detached_norm", "NoisyBatchNorm1d", "NoisyBatchNorm2d",
           "add_nonstationary_noise", "nonstationary_noise", "LpNorm1d", "LpNorm2d", "BatchRenorm1d", "BatchRenorm2d",
           "GhostBatchNorm1d", "GhostBatchNorm2d", "DecorrelatedBatchNorm", "IterNorm", "FrozenBatchNorm"]
