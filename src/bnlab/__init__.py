"""bnlab: Batch Normalization from the math to the measurement.

* a normalization library — drop-in, state_dict-compatible ``BatchNorm1d/2d/3d`` written from
  the formulas (explicit forward, closed-form backward), and what torch.nn lacks;
* probes that measure training dynamics without perturbing training (``bnlab.probes``);
* a lab that turns each claim of the BN story into an experiment (``bnlab.lab``, ``bnlab`` CLI).
"""

from ._version import __version__
from . import functional
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, is_batchnorm
from .convert import convert
from .population import population_statistics, train_eval_gap
from .fold import fold
from . import ema
from . import probes
from .sync import SyncBatchNorm
from .fused import BatchNormAct2d
from .variants import (BatchRenorm1d, BatchRenorm2d, DecorrelatedBatchNorm, DetachedNorm,
                       DetachedNorm2d, FrozenBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, IterNorm,
                       LpNorm1d, LpNorm2d, NoisyBatchNorm1d, NoisyBatchNorm2d)
from .errors import (BatchSizeError, BnlabError, DataError, DTypeError, ModeError,
                     NonFiniteError, ShapeError)

__all__ = [
    "__version__", "functional",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "is_batchnorm", "convert",
    "population_statistics", "train_eval_gap", "fold", "ema", "probes",
    "DetachedNorm", "DetachedNorm2d", "NoisyBatchNorm1d", "NoisyBatchNorm2d", "LpNorm1d", "LpNorm2d",
    "BatchRenorm1d", "BatchRenorm2d", "GhostBatchNorm1d", "GhostBatchNorm2d", "DecorrelatedBatchNorm",
    "IterNorm", "FrozenBatchNorm", "SyncBatchNorm", "BatchNormAct2d",
    "BnlabError", "ShapeError", "BatchSizeError", "DTypeError", "ModeError", "NonFiniteError",
    "DataError",
]
