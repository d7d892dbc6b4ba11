"""An explicit forward and closed-form backward for the lab's plain MLPs — no autograd.

The lab's workhorse (E1, E2: 50,000 steps of batch 60 per arm) spends most of its time on
per-step overhead, not arithmetic: autograd's graph, the optimizer's loops. For the MLPs those
experiments use — blocks of linear → (BN) → sigmoid/tanh/ReLU/identity, a linear readout,
softmax cross-entropy, plain SGD — the whole step is a dozen formulas, written here once over
the seed-batched parameters of a :class:`~bnlab.lab.models.BatchedMLP` (so the model object,
its checkpoints and ``to_plain`` are unchanged). BN uses bnlab's own memory-planned closed
forms (``functional.train_forward_``/``train_backward_``). ``test_fast_mlp`` holds it equal to
the autograd path step by step.

Per block (S seeds, batch B), forward::

    z = h W (+ b)                      S,B,C
    y = γ·x̂ + β of z (per seed)        via (B, S·C)
    a = act(y)

backward, from da::

    dy = da ⊙ act'(y)                  sigmoid: a(1 − a); tanh: 1 − a²; relu: [y > 0]
    dz, dγ, dβ = BN closed form (docs/batchnorm.md)
    dW = hᵀ dz,  db = Σ dz,  dh = dz Wᵀ
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import functional as BF
from .models import BatchedMLP
from .train import ClassifierTrainer

__all__ = ["supports", "FastMLPTrainer", "bmm", "MATMUL_BACKEND"]

_ACTS = ("sigmoid", "tanh", "relu", "identity")

# The batched matrix products run on NumPy's BLAS by default: on this project's machines the
# OpenBLAS that NumPy ships multiplies these small single-threaded float32 matrices (60×784 by
# 784×100...) ~1.2× faster than the MKL linked into torch's CPU wheel (``bnlab bench e1``).
# The operands are zero-copy views, and the path never needs autograd. BNLAB_MATMUL=torch
# keeps everything in torch.
MATMUL_BACKEND = os.environ.get("BNLAB_MATMUL", "numpy")


def bmm(a: Tensor, b: Tensor) -> Tensor:
    """Batched a @ b: (S, n, k) × (S, k, m) → (S, n, m), float32, transposed views allowed."""
    if MATMUL_BACKEND == "numpy":
        return torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy()))
    return torch.bmm(a, b)


def supports(model, optimizer: str, momentum: float, weight_decay: float) -> bool:
    """Whether the explicit path computes exactly what autograd + torch.optim would."""
    if not isinstance(model, BatchedMLP) or optimizer != "sgd" or momentum or weight_decay:
        return False
    spec = model.spec
    return (spec.get("norm", "none") in ("none", "bn") and spec.get("activation", "sigmoid") in _ACTS
            and not any(b.residual for b in model.blocks)
            and not spec.get("norm_kwargs"))


def _act(name: str, y: Tensor) -> Tensor:
    if name == "sigmoid":
        return torch.sigmoid(y)
    if name == "tanh":
        return torch.tanh(y)
    if name == "relu":
        return torch.relu(y)
    return y


def _act_backward(name: str, da: Tensor, a: Tensor, y: Tensor) -> Tensor:
    """dy = da ⊙ act'(y), in one ATen op each (sigmoid: a(1 − a), tanh: 1 − a², relu: [y > 0])."""
    if name == "sigmoid":
        return torch.ops.aten.sigmoid_backward(da, a)
    if name == "tanh":
        return torch.ops.aten.tanh_backward(da, a)
    if name == "relu":
        return torch.ops.aten.threshold_backward(da, y, 0)
    return da


class _Block:
    """One block's tensors, looked up once (module attribute access costs µs per step).
    The parameters are the model's own tensors, updated in place — load_state_dict copies into
    them, so the references stay valid across checkpoint restores."""

    def __init__(self, block):
        self.weight, self.bias = block.linear.weight, block.linear.bias
        self.bn = block.norm.layer if block.norm is not None else None
        if self.bn is not None:
            self.gamma, self.beta, self.eps = self.bn.weight, self.bn.bias, self.bn.eps


class FastMLPTrainer(ClassifierTrainer):
    """ClassifierTrainer whose step is the explicit computation above (same results)."""

    @torch.no_grad()
    def train_step(self, step: int) -> None:
        model: BatchedMLP = self.model
        idx = self.sampler.next()                                          # S, B
        S, B = idx.shape
        flat = idx.reshape(-1)
        h = torch.index_select(self.data.train_x, 0, flat, out=self._batch_buffer(S * B))
        h = h.view(S, B, -1)                                               # S,B,D
        y = self.data.train_y.index_select(0, flat).view(S, B)             # S,B
        lr = self.lr_at(step) if self.lr_at is not None else self.opt.param_groups[0]["lr"]
        for group in self.opt.param_groups:
            group["lr"] = lr
        act = model.spec.get("activation", "sigmoid")
        plan = self._plan()
        caches = []
        for blk in plan:
            z = bmm(h, blk.weight)                                         # S,B,C
            if blk.bias is not None:
                z += blk.bias
            C = z.shape[2]
            if blk.bn is not None:
                zt = z.transpose(0, 1).reshape(B, S * C)                   # B, S·C
                yt, mean, var, invstd = BF.train_forward_(zt, blk.gamma, blk.beta, blk.eps,
                                                           self._running(blk.bn))
                pre = yt.view(B, S, C).transpose(0, 1)                     # S,B,C
                a = _act(act, pre)
                caches.append((h, zt, mean, invstd, pre, a))
            else:
                a = _act(act, z)
                caches.append((h, None, None, None, z, a))
            h = a
        ro = model.readout
        logits = bmm(h, ro.weight).add_(ro.bias)                           # S,B,K
        logp = torch.log_softmax(logits, dim=2)
        target = y.unsqueeze(2)                                            # S,B,1
        loss = logp.gather(2, target).squeeze(2).mean(1).neg_()            # S
        dlogits = logp.exp_()                                              # softmax
        dlogits.scatter_add_(2, target, self._minus_one(S, B))
        dlogits.div_(B)                                                    # ∂(mean CE)/∂logits
        # readout
        dh = bmm(dlogits, ro.weight.transpose(1, 2))
        ro.weight.sub_(bmm(h.transpose(1, 2), dlogits), alpha=lr)
        ro.bias.sub_(dlogits.sum(1, keepdim=True), alpha=lr)
        for i in range(len(plan) - 1, -1, -1):
            blk = plan[i]
            h_in, zt, mean, invstd, pre, a = caches[i]
            dpre = _act_backward(act, dh, a, pre)                          # S,B,C
            if blk.bn is not None:
                C = dpre.shape[2]
                dyt = dpre.transpose(0, 1).reshape(B, S * C)
                dzt, dgamma, dbeta = BF.train_backward_(dyt, zt, mean, invstd, blk.gamma)
                dz = dzt.view(B, S, C).transpose(0, 1)
                blk.gamma.sub_(dgamma, alpha=lr)
                blk.beta.sub_(dbeta, alpha=lr)
            else:
                dz = dpre
            if i > 0:
                dh = bmm(dz, blk.weight.transpose(1, 2))
            blk.weight.sub_(bmm(h_in.transpose(1, 2), dz), alpha=lr)
            if blk.bias is not None:
                blk.bias.sub_(dz.sum(1, keepdim=True), alpha=lr)
        self.last_loss = loss
        self.loss_sum += loss.double()
        self.loss_count += 1

    def _minus_one(self, S: int, B: int) -> Tensor:
        cached = getattr(self, "_m1", None)
        if cached is None or cached.shape != (S, B, 1):
            self._m1 = cached = torch.full((S, B, 1), -1.0)
        return cached

    def _batch_buffer(self, rows: int) -> Tensor:
        """The step's input rows, gathered into one reused buffer (nothing keeps the last step's)."""
        buf = getattr(self, "_xbuf", None)
        if buf is None or buf.shape[0] != rows:
            buf = self._xbuf = self.data.train_x.new_empty(rows, *self.data.train_x.shape[1:])
        return buf

    def _plan(self) -> list:
        plan = getattr(self, "_blocks", None)
        if plan is None:
            plan = self._blocks = [_Block(b) for b in self.model.blocks]
        return plan

    @staticmethod
    def _running(bn) -> Optional[tuple]:
        """The running-statistics update of this step, as train_forward_ takes it (applied inside
        the statistics kernel), or None when the layer keeps none or is frozen."""
        if bn.running_mean is None or getattr(bn, "frozen", False):
            return None
        bn.num_batches_tracked.add_(1)
        momentum = BF.effective_momentum("cumulative" if bn.momentum is None else bn.ema, bn.momentum,
                                         int(bn.num_batches_tracked))
        return bn.running_mean, bn.running_var, momentum, bn.running_var_correction
