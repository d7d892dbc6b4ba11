"""A resumable classifier trainer for seed-batched models (see lab.models).

Every seed draws its mini-batches from its own epoch-wise permutation of the training set
(generator seeded by the seed alone, so different arms of an experiment see the same data order
for a given seed: a paired comparison). The loss is the sum over seeds of each seed's mean
cross-entropy, so every seed's parameters get exactly their own gradient.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from .data import Dataset

__all__ = ["EpochSampler", "ClassifierTrainer", "accuracy_per_seed", "make_optimizer", "make_trainer"]


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


def make_trainer(model: nn.Module, data: Dataset, seeds: list[int], arm: str, batch: int, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0, optimizer: str = "sgd",
                 fast: bool = True, **kwargs) -> ClassifierTrainer:
    """A ClassifierTrainer, using the explicit no-autograd step (lab.fast_mlp) where it computes
    exactly the same thing (plain SGD on plain MLPs), unless ``fast=False``."""
    from . import dist as lab_dist
    from .fast_mlp import FastMLPTrainer, supports
    cls = FastMLPTrainer if (fast and kwargs.get("loss_hook") is None and lab_dist.world() == 1
                             and supports(model, optimizer, momentum, weight_decay)) else ClassifierTrainer
    return cls(model, data, seeds, arm, batch, lr, momentum, weight_decay, optimizer, **kwargs)
