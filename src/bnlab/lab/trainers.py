"""The lab's trainers: resumable training of seed-batched classifiers (see lab.models).

Every seed draws its mini-batches from its own epoch-wise permutation of the training set
(generator seeded by the seed alone, so different arms of an experiment see the same data order
for a given seed: a paired comparison). The loss is the sum over seeds of each seed's mean
cross-entropy, so every seed's parameters get exactly their own gradient.

:class:`ClassifierTrainer` steps with autograd and torch.optim. :class:`FastMLPTrainer` computes
the same step explicitly for the plain MLPs most experiments train; :func:`make_trainer` picks it
wherever it computes exactly what the first would.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..kernels import dispatch
from .data import Dataset
from .models import BatchedMLP

__all__ = ["EpochSampler", "ClassifierTrainer", "FastMLPTrainer", "accuracy_per_seed", "batch_loss_per_seed",
           "make_optimizer",
           "make_trainer", "supports", "bmm", "MATMUL_BACKEND"]


class EpochSampler:
    """(S, B_local) indices per step: each seed walks its own random permutation, epoch after epoch.

    Built on torch.utils.data.DistributedSampler: rank r of W reads positions r, r + W, ... of the
    epoch's permutation, B/W at a time, so the union of the ranks' shards at every step is the
    global batch a single process would draw. The state is (epoch, position): resumable.
    """

    def __init__(self, n: int, batch: int, seeds: list[int], salt: int = 0,
                 rank: Optional[int] = None, world: Optional[int] = None) -> None:
        from torch.utils.data import DistributedSampler

        from . import dist as lab_dist
        world = lab_dist.world() if world is None else world
        rank = lab_dist.rank() if rank is None else rank
        if batch > n:
            raise ValueError(f"batch {batch} exceeds the {n} training examples")
        if batch % world:
            raise ValueError(f"the global batch {batch} must split evenly over {world} processes")
        self.n, self.batch, self.local = n, batch, batch // world
        self.samplers = [DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                            seed=10_007 * s + salt, drop_last=True) for s in seeds]
        self.steps_per_epoch = n // batch
        self.epoch, self.pos = 0, 0
        self._load_epoch()

    def _load_epoch(self) -> None:
        for s in self.samplers:
            s.set_epoch(self.epoch)
        self.perms = torch.stack([torch.tensor(list(iter(s))) for s in self.samplers])   # S, n/W

    def next(self) -> Tensor:
        if self.pos >= self.steps_per_epoch:
            self.epoch += 1
            self.pos = 0
            self._load_epoch()
        idx = self.perms[:, self.pos * self.local:(self.pos + 1) * self.local]         # S, B/W
        self.pos += 1
        return idx

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, pos=self.pos)

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._load_epoch()


def make_optimizer(params, name: str = "sgd", lr: float = 0.1, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: sgd or adam")


@torch.no_grad()
def accuracy_per_seed(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 5000) -> Tensor:
    """Accuracy of each seed of a batched model on (x, y), in eval mode. Returns (S,)."""
    was = model.training
    model.eval()
    correct = None
    for start in range(0, len(x), chunk):
        logits = model(x[start:start + chunk])                                     # S, n, K
        hit = (logits.argmax(-1) == y[start:start + chunk]).sum(-1).double()
        correct = hit if correct is None else correct + hit
    model.train(was)
    return correct / len(x)


@torch.no_grad()
def batch_loss_per_seed(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 2500) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and error of each seed of a batched model on (x, y), in eval mode:
    two (S,) tensors."""
    was = model.training
    model.eval()
    loss = err = None
    try:
        for start in range(0, len(x), chunk):
            logits = model(x[start:start + chunk])                                 # S, n, K
            S, n, K = logits.shape
            target = y[start:start + chunk]
            l_ = nn.functional.cross_entropy(logits.reshape(S * n, K), target.repeat(S),
                                             reduction="none").view(S, n).sum(1).double()
            e_ = (logits.argmax(-1) != target).sum(-1).double()
            loss, err = (l_, e_) if loss is None else (loss + l_, err + e_)
    finally:
        model.train(was)
    return loss / len(x), err / len(x)


class ClassifierTrainer:
    """SGD (or Adam) on a seed-batched classifier over a Dataset.

    evaluate() records, per seed: test_acc, train_loss (mean since the last evaluation),
    and whatever ``extra_eval(trainer, step)`` yields as (seed, metric, value).
    """

    def __init__(self, model: nn.Module, data: Dataset, seeds: list[int], arm: str, batch: int,
                 lr: float, momentum: float = 0.0, weight_decay: float = 0.0, optimizer: str = "sgd",
                 extra_eval: Optional[Callable[["ClassifierTrainer", int], Iterable[tuple]]] = None,
                 test_subset: Optional[int] = None, lr_at: Optional[Callable[[int], float]] = None,
                 loss_hook: Optional[Callable[["ClassifierTrainer", Tensor], None]] = None,
                 sampler=None) -> None:
        self.model, self.data, self.seeds, self.arm = model, data, list(seeds), arm
        self.sampler = sampler if sampler is not None else EpochSampler(len(data.train_x), batch, self.seeds)
        self.train_model = self._distributed(model)
        self.opt = make_optimizer(model.parameters(), optimizer, lr, momentum, weight_decay)
        self.extra_eval = extra_eval
        self.lr_at = lr_at
        self.loss_hook = loss_hook
        n_test = len(data.test_x) if test_subset is None else min(test_subset, len(data.test_x))
        self.test_x, self.test_y = data.test_x[:n_test], data.test_y[:n_test]
        self.loss_sum = torch.zeros(len(self.seeds), dtype=torch.float64)
        self.loss_count = 0
        self.last_loss = torch.zeros(len(self.seeds))
        model.train()

    @staticmethod
    def _distributed(model: nn.Module) -> nn.Module:
        """Under torch.distributed: plain BN → SyncBatchNorm (global statistics) and DDP."""
        from . import dist as lab_dist
        if lab_dist.world() == 1:
            return model
        from ..convert import convert
        converted = convert(model, to="sync")
        assert converted is model, "the lab's models are containers"
        # SyncBatchNorm keeps the running statistics identical on every rank: no buffer broadcast
        return nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)

    def loss_per_seed(self, x: Tensor, y: Tensor, train: bool = False) -> Tensor:
        logits = (self.train_model if train else self.model)(x)                   # S, B, K
        S, B, K = logits.shape
        return nn.functional.cross_entropy(logits.reshape(S * B, K), y.reshape(S * B),
                                           reduction="none").view(S, B).mean(1)    # S

    def train_step(self, step: int) -> None:
        idx = self.sampler.next()                                                  # S, B
        x, y = self.data.train_x[idx], self.data.train_y[idx]                      # S,B,D / S,B
        if self.lr_at is not None:
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(step)
        self.last_batch = (x, y)
        loss = self.loss_per_seed(x, y, train=True)
        self.opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        if self.loss_hook is not None:
            self.loss_hook(self, loss)
        self.opt.step()
        self.last_loss = self._global_mean(loss.detach())
        self.loss_sum += self.last_loss.double()
        self.loss_count += 1

    @staticmethod
    def _global_mean(loss: Tensor) -> Tensor:
        """The global batch's loss under torch.distributed (equal shards: the mean of the ranks')."""
        from . import dist as lab_dist
        if lab_dist.world() == 1:
            return loss
        import torch.distributed as dist
        total = loss.clone()
        dist.all_reduce(total)
        return total / lab_dist.world()

    def evaluate(self, step: int):
        acc = accuracy_per_seed(self.model, self.test_x, self.test_y)
        for i, seed in enumerate(self.seeds):
            yield seed, self.arm, "test_acc", acc[i].item()
            if self.loss_count:
                yield seed, self.arm, "train_loss", (self.loss_sum[i] / self.loss_count).item()
        self.loss_sum.zero_()
        self.loss_count = 0
        if self.extra_eval is not None:
            for seed, metric, value in self.extra_eval(self, step):
                yield seed, self.arm, metric, value

    def state_dict(self) -> dict:
        out = dict(model=self.model.state_dict(), opt=self.opt.state_dict(),
                   sampler=self.sampler.state_dict(), loss_sum=self.loss_sum.clone(),
                   loss_count=self.loss_count)
        if hasattr(self.extra_eval, "state_dict"):       # stateful measurements resume exactly
            out["extra_eval"] = self.extra_eval.state_dict()
        return out

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.sampler.load_state_dict(s["sampler"])
        self.loss_sum, self.loss_count = s["loss_sum"].clone(), s["loss_count"]
        if "extra_eval" in s and hasattr(self.extra_eval, "load_state_dict"):
            self.extra_eval.load_state_dict(s["extra_eval"])



# ----------------------------------------------------------------------------------------------
# The explicit step
# ----------------------------------------------------------------------------------------------
# An explicit forward and closed-form backward for the lab's plain MLPs — no autograd.
#
# The lab's workhorse (E1, E2: 50,000 steps of batch 60 per arm) spends most of its time on
# per-step overhead, not arithmetic: autograd's graph, the optimizer's loops. For the MLPs those
# experiments use — blocks of linear → (BN) → sigmoid/tanh/ReLU/identity, a linear readout,
# softmax cross-entropy, plain SGD — the whole step is a dozen formulas, written here once over
# the seed-batched parameters of a :class:`~bnlab.lab.models.BatchedMLP` (so the model object,
# its checkpoints and ``to_plain`` are unchanged). BN uses bnlab's kernels through the dispatch
# (``kernels.dispatch.forward_train``/``backward_train``). tests/test_lab_models.py holds it equal to
# the autograd path step by step.
#
# Per block (S seeds, batch B), forward::
#
#     z = h W (+ b)                      S,B,C
#     y = γ·x̂ + β of z (per seed)        via (B, S·C)
#     a = act(y)
#
# backward, from da::
#
#     dy = da ⊙ act'(y)                  sigmoid: a(1 − a); tanh: 1 − a²; relu: [y > 0]
#     dz, dγ, dβ = BN closed form (docs/batchnorm.md)
#     dW = hᵀ dz,  db = Σ dz,  dh = dz Wᵀ

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
                yt, mean, var, invstd = dispatch.forward_train(zt, blk.gamma, blk.beta, blk.eps,
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
                dzt, dgamma, dbeta = dispatch.backward_train(dyt, zt, mean, invstd, blk.gamma)
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
        if not bn._updates_running_stats():
            return None
        return bn.running_mean, bn.running_var, bn._momentum_step(), bn.running_var_correction


def make_trainer(model: nn.Module, data: Dataset, seeds: list[int], arm: str, batch: int, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0, optimizer: str = "sgd",
                 fast: bool = True, **kwargs) -> ClassifierTrainer:
    """A ClassifierTrainer, using the explicit no-autograd step (FastMLPTrainer) where it computes
    exactly the same thing (plain SGD on plain MLPs), unless ``fast=False``."""
    from . import dist as lab_dist
    cls = FastMLPTrainer if (fast and kwargs.get("loss_hook") is None and lab_dist.world() == 1
                             and supports(model, optimizer, momentum, weight_decay)) else ClassifierTrainer
    return cls(model, data, seeds, arm, batch, lr, momentum, weight_decay, optimizer, **kwargs)
