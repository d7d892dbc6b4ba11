"""E2 — Test-time statistics (Ioffe & Szegedy 2015, Algorithm 2): running EMA vs Algorithm 2
vs exact population statistics vs test-batch statistics, after training at batch 60 and 4."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ...batchnorm import is_batchnorm
from ...isolation import isolated
from ...population import population_statistics
from ..config import BaseConfig
from ..models import build_mlp, to_plain
from ...plotting import COLORS, plt, save
from ..registry import Experiment, register
from ..trainers import make_trainer
from ..verdict import Verdict, all_seeds, combine, fmt

METHODS = ("ema", "algorithm2", "population", "batch1", "batch4", "batch60")
LABEL = {"ema": "running EMA", "algorithm2": "Algorithm 2", "population": "exact population",
         "batch1": "test batch 1", "batch4": "test batch 4", "batch60": "test batch 60"}


@dataclass
class Config(BaseConfig):
    steps: int = 50_000                   # per training batch size (E1's schedule)
    train_batches: tuple[int, ...] = (60, 4)
    lr: float = 0.1
    init_std: float = 0.1
    widths: tuple[int, ...] = (784, 100, 100, 100, 10)
    test_batches: tuple[int, ...] = (1, 4, 60)
    population_examples: int = 60_000     # training images the statistics are estimated on
    time_epoch: bool = True               # time population_statistics against one training epoch
    seeds: int = 3


def _spec(cfg: Config) -> dict:
    return dict(kind="mlp", widths=list(cfg.widths), activation="sigmoid", norm="bn",
                init="normal", init_std=cfg.init_std)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with isolated(model, "eval"):
        return (model(x).argmax(1) == y).double().mean().item()


@torch.no_grad()
def _batch_stats_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, size: int) -> float:
    """Normalize each test batch of ``size`` with its own statistics (train-mode semantics, no
    buffer changes). At size 1 the statistics are degenerate — σ²_B = 0, x̂ = 0 — so every BN
    outputs β whatever the input: that literal outcome is what is measured."""
    correct = 0
    with isolated(model, "train"):
        if size == 1:
            hooks = [m.register_forward_hook(lambda mod, a, out: (mod.bias if mod.bias is not None
                                                                  else torch.zeros_like(out[0])).expand_as(out))
                     for m in model.modules() if is_batchnorm(m)]
            for m in model.modules():
                if is_batchnorm(m):
                    m.eval()          # BN refuses batch statistics of one value; the hook gives x̂ = 0
            try:
                correct = (model(x).argmax(1) == y).sum().item()
            finally:
                for h in hooks:
                    h.remove()
        else:
            n = (len(x) // size) * size
            for start in range(0, n, size):
                correct += (model(x[start:start + size]).argmax(1) == y[start:start + size]).sum().item()
            x = x[:n]
    return correct / len(x)


@register
class E2(Experiment):
    id = "E2"
    order = 2
    title = "Algorithm 2: population statistics at test time"
    claim = ("At inference BN must normalize with population statistics (Algorithm 2): they give the "
             "trained network's accuracy, test-batch statistics lose accuracy as the test batch "
             "shrinks (and are undefined at 1), and after small-batch training the exact population "
             "statistics are at least as good as the running average.")
    paper = ("Ioffe & Szegedy 2015, Algorithm 2: E[x] = E_B[μ_B], Var[x] = m/(m−1)·E_B[σ²_B] "
             "(1.017 at m = 60, 1.333 at m = 4); γ and β are the learned parameters, not averages "
             "(the seed note's error). No accuracy figures are given for this comparison.")
    source = "Ioffe & Szegedy 2015, §3.1 and Algorithm 2; Wu & Johnson 2021 (arXiv:2105.07576)"
    Config = Config
    profiles = {
        "quick": dict(steps=5000, population_examples=20_000),
        "tiny": dict(steps=40, seeds=2, population_examples=600, test_batches=(1, 4, 60),
                     checkpoint_every=30),
    }

    def run(self, cfg: Config, ctx) -> None:
        data = ctx.data
        test_x, test_y = data.test_x, data.test_y
        for m in cfg.train_batches:
            arm = f"b{m}"
            ctx.log(f"training the BN net at batch {m}: {cfg.seeds} seeds batched, {cfg.steps} steps")
            trainer = ctx.run_unit(arm, lambda m=m, arm=arm: make_trainer(
                build_mlp(_spec(cfg), cfg.seeds), data, ctx.seeds, arm, m, cfg.lr), cfg.steps)
            ctx.log(f"batch {m}: EMA vs Algorithm 2 vs exact population vs test-batch statistics")
            g = torch.Generator().manual_seed(0)
            order = torch.randperm(len(data.train_x), generator=g)[:cfg.population_examples]
            train_x = data.train_x[order]
            for i, seed in enumerate(ctx.seeds):
                model = to_plain(trainer.model, i)
                if i == 0:
                    ctx.save_model(f"model_{arm}_seed{seed}.pt", model, _spec(cfg),
                                   dict(experiment="E2", train_batch=m, steps=cfg.steps, seed=seed))
                ctx.record(cfg.steps, seed, arm, "acc_ema", _accuracy(model, test_x, test_y))
                for k in cfg.test_batches:
                    ctx.record(cfg.steps, seed, arm, f"acc_batch{k}",
                               _batch_stats_accuracy(model, test_x, test_y, k))
                ema = {n: (b.running_mean.clone(), b.running_var.clone())
                       for n, b in model.named_modules() if is_batchnorm(b)}
                population_statistics(model, list(train_x.split(m)), estimator="algorithm2",
                                      progress=False)
                ctx.record(cfg.steps, seed, arm, "acc_algorithm2", _accuracy(model, test_x, test_y))
                stats = population_statistics(model, list(train_x.split(1000)), upstream="population",
                                              progress=False)
                ctx.record(cfg.steps, seed, arm, "acc_population", _accuracy(model, test_x, test_y))
                for name, s in stats.items():
                    run_mean, run_var = ema[name]
                    ctx.record(cfg.steps, seed, arm, f"ema_var_ratio/{name}",
                               (run_var.double() / s.var).mean().item())
                if cfg.time_epoch and i == 0:
                    self._time(ctx, cfg, model, data, m, arm, seed)

    def _time(self, ctx, cfg, model, data, m, arm, seed) -> None:
        """Seconds of population_statistics over the training images vs one epoch of training
        the same (plain) model at the same batch size, one thread, this machine."""
        x = data.train_x[:cfg.population_examples]
        batches = list(x.split(m))
        t0 = time.perf_counter()
        population_statistics(model, batches, progress=False)
        t_pop = time.perf_counter() - t0
        with isolated(model, "train", parameters=True, grads=True):
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
            y = data.train_y[:cfg.population_examples]
            t0 = time.perf_counter()
            for xb, yb in zip(batches, y.split(m)):
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            t_epoch = time.perf_counter() - t0
        ctx.record(cfg.steps, seed, arm, "seconds_population_statistics", t_pop)
        ctx.record(cfg.steps, seed, arm, "seconds_training_epoch", t_epoch)

    def analyze(self, cfg: Config, ctx) -> Verdict:
        arms = [f"b{m}" for m in cfg.train_batches]
        acc = {(a, k): [r["value"] for r in ctx.select(f"acc_{k}", a)] for a in arms for k in METHODS
               if ctx.select(f"acc_{k}", a)}
        small = arms[-1]                                     # the smallest training batch
        p1 = all_seeds(p > b for a in arms for p, b in zip(acc[(a, "population")], acc[(a, "batch4")]))
        p2 = all_seeds(p >= e for p, e in zip(acc[(small, "population")], acc[(small, "ema")]))
        verdict = combine(p1, p2)
        timing = {}
        for a in arms:
            tp = [r["value"] for r in ctx.select("seconds_population_statistics", a)]
            te = [r["value"] for r in ctx.select("seconds_training_epoch", a)]
            if tp and te:
                timing[a] = dict(population_statistics_s=tp[0], training_epoch_s=te[0], ratio=tp[0] / te[0])
        parts = []
        for a in arms:
            parts.append(f"trained at batch {a[1:]}: " + ", ".join(
                f"{LABEL[k]} {fmt(acc[(a, k)])}" for k in METHODS if (a, k) in acc))
        measured = "; ".join(parts) + "."
        if timing:
            measured += " population_statistics over the training images costs " + ", ".join(
                f"{t['ratio']:.2f}× a training epoch at batch {a[1:]}" for a, t in timing.items()) + "."
        criterion = (f"supported if exact population statistics beat test-batch-4 statistics for every "
                     f"seed and training batch ({p1}) and, after training at batch {small[1:]}, are at "
                     f"least as accurate as the running EMA for every seed ({p2}); not supported if "
                     f"either is reversed for every seed.")
        figures = [self._figure(cfg, ctx, arms, acc)]
        return Verdict(self.id, self.claim, self.paper, measured, criterion, verdict,
                       numbers=dict(accuracy={f"{a}/{k}": v for (a, k), v in acc.items()},
                                    timing=timing, population_beats_batch4=p1,
                                    population_vs_ema_small_batch=p2),
                       figures=figures,
                       notes="Test batch 1: batch statistics of one example give x̂ = 0, so every BN "
                             "outputs β and the prediction no longer depends on the input; bnlab's "
                             "layers refuse such a batch in training mode (BatchSizeError).")

    def _figure(self, cfg, ctx, arms, acc) -> str:
        fig, ax = plt.subplots(figsize=(9, 3.8))
        methods = [k for k in METHODS if all((a, k) in acc for a in arms)]
        width = 0.8 / len(arms)
        for j, a in enumerate(arms):
            means = [sum(acc[(a, k)]) / len(acc[(a, k)]) for k in methods]
            pos = [i + (j - (len(arms) - 1) / 2) * width for i in range(len(methods))]
            ax.bar(pos, means, width=width, color=COLORS[j], label=f"trained at batch {a[1:]}")
            for p, k in zip(pos, methods):
                ax.plot([p] * len(acc[(a, k)]), acc[(a, k)], "k.", ms=3)
        ax.set_xticks(range(len(methods)), [LABEL[k] for k in methods], rotation=15)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.set_title("Normalizing at test time: which statistics?")
        ax.legend(loc="lower left")
        return save(fig, ctx.path("test_time_statistics.png"))
