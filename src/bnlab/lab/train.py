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
    """(S, B) indices per step: each seed walks its own random permutation, epoch after epoch."""

    def __init__(self, n: int, batch: int, seeds: list[int], salt: int = 0) -> None:
        if batch > n:
            raise ValueError(f"batch {batch} exceeds the {n} training examples")
        self.n, self.batch = n, batch
        self.gens = [torch.Generator().manual_seed(10_007 * s + salt) for s in seeds]
        self.perms = torch.stack([torch.randperm(n, generator=g) for g in self.gens])   # S, n
        self.pos = 0

    def next(self) -> Tensor:
        if self.pos + self.batch > self.n:
            self.perms = torch.stack([torch.randperm(self.n, generator=g) for g in self.gens])
            self.pos = 0
        idx = self.perms[:, self.pos:self.pos + self.batch]                        # S, B
        self.pos += self.batch
        return idx

    def state_dict(self) -> dict:
        return dict(perms=self.perms.clone(), pos=self.pos, gens=[g.get_state() for g in self.gens])

    def load_state_dict(self, s: dict) -> None:
        self.perms, self.pos = s["perms"].clone(), s["pos"]
        for g, st in zip(self.gens, s["gens"]):
            g.set_state(st)


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

    def loss_per_seed(self, x: Tensor, y: Tensor) -> Tensor:
        logits = self.model(x)                                                     # S, B, K
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
        loss = self.loss_per_seed(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        if self.loss_hook is not None:
            self.loss_hook(self, loss)
        self.opt.step()
        self.last_loss = loss.detach()
        self.loss_sum += self.last_loss.double()
        self.loss_count += 1

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
    from .fast_mlp import FastMLPTrainer, supports
    cls = FastMLPTrainer if (fast and kwargs.get("loss_hook") is None
                             and supports(model, optimizer, momentum, weight_decay)) else ClassifierTrainer
    return cls(model, data, seeds, arm, batch, lr, momentum, weight_decay, optimizer, **kwargs)
