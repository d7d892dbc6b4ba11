r"""SyncBatchNorm: batch statistics over the global batch of all processes (torch.distributed).

When one device's batch is too small, each rank normalizing its own examples changes the model
(E10 shows how much). SyncBatchNorm computes the statistics of the *global* batch:

forward   every rank computes its (count n_r, mean μ_r, M2_r = Σ(x − μ_r)²) per channel in
          float64; the W triples are all-gathered and merged in rank order with Chan's update —
          exact for any split, and bit-identical on every rank (same inputs, same order);
          μ, σ² = M2/n of the union normalize the local examples.
backward  with g = ∂ℓ/∂y, the closed form dx = γ·invstd·(g − Σg/n − x̂·Σ(g⊙x̂)/n) needs the two
          sums over the *global* batch: one all-reduce of [Σg, Σg⊙x̂] (2C numbers).
          ∂ℓ/∂γ and ∂ℓ/∂β are returned as each rank's share (as torch.nn.SyncBatchNorm does):
          their sum over ranks is the full-batch gradient, which DistributedDataParallel's
          gradient all-reduce provides.

Ranks with an empty batch take part with n_r = 0 (and still join the backward's all-reduce, so
every rank must backpropagate through the layer). Works with any process group; without an
initialized group, or with one process, it is exactly bnlab.BatchNorm. Running statistics are
updated from the global statistics (unbiased with the global count), identically on all ranks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .options import VarCorrection
from . import definition as D
from . import functional as BF
from .batchnorm import _BatchNorm
from .errors import BatchSizeError
from .kernels import dispatch

__all__ = ["SyncBatchNorm", "sync_batch_norm", "distributed_world"]


def distributed_world(group=None) -> int:
    """World size of ``group`` if torch.distributed is initialized, else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _device_for(group, like: Tensor) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else like.device


def _gather_moments(x: Tensor, group) -> tuple[Tensor, Tensor, float]:
    """(global mean, global biased var) in float64, and the global count: every rank's Moments
    all-gathered and merged in rank order (identical on every rank)."""
    C = x.shape[1]
    local = D.Moments.of_batch(x) if x.numel() > 0 else D.Moments.empty(C, device=x.device)
    packed = torch.cat([local.count.reshape(1), local.mean, local.m2]).to(_device_for(group, x))
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    stacked = torch.stack(parts).cpu()                                   # W, 1 + 2C
    n, mean, m2 = D.merge_moments(stacked[:, :1], stacked[:, 1:1 + C], stacked[:, 1 + C:])
    count = float(n[0])
    return mean.to(x.device), (m2 / max(count, 1.0)).to(x.device), count


def _detached(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, group):
        acc = D.accumulation_dtype(x.dtype)
        mean64, var64, count = _gather_moments(x, group)
        if count <= 1:
            raise BatchSizeError(
                f"Expected more than 1 value per channel across all ranks when training, got {int(count)}: "
                f"use larger per-rank batches or call model.eval()")
        mean, var = mean64.to(acc), var64.to(acc)
        invstd = torch.rsqrt(var + eps)
        if x.numel() > 0:                        # the local examples, normalized with the global statistics
            k = dispatch.select(x)
            y = (k.forward_eval(x, mean, var, _detached(weight), _detached(bias), eps, 0, 0.0) if k is not None
                 else D.normalize(x, mean, var, eps, weight, bias).to(x.dtype))
        else:
            y = x * 1.0
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.group = count, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return y, mean, var, torch.tensor(count, dtype=torch.float64)

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x, weight, mean, invstd = ctx.saved_tensors
        acc = mean.dtype
        C = x.shape[1]
        if dy is None:
            dy = torch.zeros_like(x)
        if x.numel() > 0:
            dy_acc = dy.to(acc)
            x_hat = (x.to(acc) - D.channel_view(mean, x)) * D.channel_view(invstd, x)
            sums = torch.cat(D.backward_sums(dy_acc, x_hat))                              # 2C: local
        else:
            x_hat = None
            sums = torch.zeros(2 * C, dtype=acc, device=x.device)
        local_dbeta, local_dgamma = sums[:C].clone(), sums[C:].clone()
        total = sums.to(_device_for(ctx.group, x))
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)                     # global sums
        total = total.to(x.device)
        dx = None
        if ctx.needs_input_grad[0]:
            if x.numel() > 0:
                scale = invstd if weight is None else invstd * weight.to(acc)
                dx = D.input_gradient(dy_acc, x_hat, total[:C], total[C:], ctx.count, scale).to(x.dtype)
            else:
                dx = torch.zeros_like(x)
        dweight = local_dgamma.to(weight.dtype) if (weight is not None and ctx.needs_input_grad[1]) else None
        dbias = local_dbeta.to(ctx.bias_dtype) if (ctx.bias_dtype is not None and ctx.needs_input_grad[2]) else None
        return dx, dweight, dbias, None, None


def sync_batch_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float,
                    group=None, running_var_correction: VarCorrection = "unbiased") -> Tensor:
    """Training-mode BN over the global batch of ``group`` (see the module docstring)."""
    y, mean, var, count = _SyncBatchNormFn.apply(x, weight, bias, eps, group)
    D.update_running_stats(running_mean, running_var, mean, var, int(count.item()), momentum,
                           running_var_correction)
    return y


class SyncBatchNorm(_BatchNorm):
    r"""Batch Normalization over the global batch of a torch.distributed process group.

    Same constructor, parameters, buffers, state_dict and options as bnlab.BatchNorm1d/2d/3d,
    plus ``process_group`` (default: the world). Accepts (N, C, *) inputs of any rank ≥ 2.
    Without torch.distributed (or with one process) it is exactly bnlab's BatchNorm.
    """

    _expected_dims = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.process_group = process_group
        self.bn_dim: Optional[int] = None         # 1/2/3: the BatchNorm this came from (convert "back")

    def forward(self, input: Tensor) -> Tensor:
        if self.bn_dim is None and input.dim() in (2, 3, 4, 5):
            self.bn_dim = {2: 1, 3: 1, 4: 2, 5: 3}[input.dim()]
        use_batch_stats = self._uses_batch_stats()
        if not use_batch_stats or not self.training or distributed_world(self.process_group) == 1:
            return super().forward(input)
        BF.check_input(input, self.num_features)
        self._check_finite(input)
        update = self._updates_running_stats()
        momentum = self._momentum_step()
        return sync_batch_norm(input, self.running_mean if update else None,
                               self.running_var if update else None, self.weight, self.bias, momentum,
                               self.eps, self.process_group, self.running_var_correction)

    def __setstate__(self, state):
        state.setdefault("process_group", None)
        state.setdefault("bn_dim", None)
        super().__setstate__(state)
