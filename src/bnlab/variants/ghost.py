r"""Ghost Batch Normalization (Hoffer et al. 2017, arXiv:1705.08741).

In training, the batch is split along N into virtual batches of ``virtual_batch_size`` examples
and each is normalized with its own statistics (bnlab's closed-form BN per virtual batch) — the
normalization noise of a small batch at the throughput of a large one. The running statistics
are updated once per step from the *whole* batch, and inference is plain BN: Keras applies
ghost batches at inference too, which makes a prediction depend on its neighbours — a known bug
this layer does not copy.

Uneven splits: the last virtual batch takes the remainder; a remainder of a single example
(which has no batch statistics) joins the previous virtual batch.

``running_stats="virtual"`` instead averages every virtual batch's statistics into the running
buffers — what BN does when each device normalizes its own small batch without synchronization
(the running statistics then miss the spread *between* groups, the train/inference mismatch of
small and non-i.i.d. groups that Batch Renorm addresses).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..options import GhostStatistics
from .. import definition as D
from .. import functional as BF
from ..batchnorm import BatchNorm1d, BatchNorm2d
from . import _grouped as G
from ._grouped import kernels_for

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "ghost_splits", "check_virtual_batch_size"]


def check_virtual_batch_size(size) -> None:
    """A virtual batch holds a whole number ≥ 2 of examples (one example has no statistics)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"virtual_batch_size must be an integer ≥ 2, got {size!r}")


def ghost_splits(n: int, size: int) -> list[int]:
    """Sizes of the virtual batches of a batch of n (no virtual batch of one)."""
    sizes = [size] * (n // size)
    if n % size:
        sizes.append(n % size)
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2] += 1
        sizes.pop()
    return sizes


class _GhostMixin:
    _eval_is_bn = True                # eval: BN with the running statistics (folding, freezing)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 virtual_batch_size: int = 32, running_stats: GhostStatistics = "batch", **kwargs) -> None:
        check_virtual_batch_size(virtual_batch_size)
        if running_stats not in ("batch", "virtual"):
            raise ValueError(f"running_stats must be 'batch' or 'virtual', got {running_stats!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.virtual_batch_size = virtual_batch_size
        self.running_stats = running_stats

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.frozen or input.shape[0] <= self.virtual_batch_size:
            return super().forward(input)                 # one virtual batch: plain BN
        self._check_input_dim(input)
        BF.check_batch_size(input)
        self._check_finite(input)
        update = self._updates_running_stats()
        momentum = self._momentum_step(update)            # one step per call, whatever the split
        per_chunk = update and self.running_stats == "virtual"
        sizes = ghost_splits(input.shape[0], self.virtual_batch_size)
        k = kernels_for(input)
        if k is not None:                                 # BN's kernels, one set of moments per group
            return G.train(k, input, self.weight, self.bias, sizes, self.eps, running_mean=self.running_mean,
                           running_var=self.running_var,
                           update=(G.PER_GROUP if per_chunk else G.WHOLE_BATCH) if update else G.NO_UPDATE,
                           momentum=momentum, unbiased=self.running_var_correction == "unbiased")
        chunks = input.split(sizes)
        out = torch.cat([BF.batch_norm(c, self.running_mean if per_chunk else None,
                                       self.running_var if per_chunk else None, self.weight, self.bias,
                                       training=True, momentum=momentum, eps=self.eps,
                                       running_var_correction=self.running_var_correction)
                         for c in chunks])
        if update and not per_chunk:
            mean, var = D.batch_moments(input.detach())
            D.update_running_stats(self.running_mean, self.running_var, mean, var, D.values_per_channel(input),
                                   momentum, self.running_var_correction)
        return out

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"
                + (f", running_stats={self.running_stats!r}" if self.running_stats != "batch" else ""))


class GhostBatchNorm1d(_GhostMixin, BatchNorm1d):
    """Ghost BN of (N, C) or (N, C, L) inputs."""


class GhostBatchNorm2d(_GhostMixin, BatchNorm2d):
    """Ghost BN of (N, C, H, W) inputs."""
