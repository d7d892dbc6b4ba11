"""E2 — Test-time statistics (Ioffe & Szegedy 2015, §3.1, Algorithm 2): population statistics
against test-batch statistics, and — after small-batch training — each estimator of the population
statistics on its own: the running EMA, Algorithm 2's literal formula, the exact statistics of the
inference network."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ...batchnorm import is_batchnorm
from ...isolation import isolated
from ...plotting import COLORS, plt, save
from ...population import population_statistics
from ..config import BaseConfig, Range
from ..criteria import Check, Criterion, statistic
from ..models import build_mlp, to_plain
from ..registry import Arm, Experiment, register
from ..runner import RunContext
from ..trainers import make_trainer

TRAIN_BATCHES = (Arm("b60", "trained at batch 60", dict(batch=60)), Arm("b4", "trained at batch 4", dict(batch=4)))
# the ways to normalize at test time, measured on every trained network
METHODS = ("ema", "algorithm2", "population", "batch1", "batch4", "batch60")
LABEL = {"ema": "running EMA", "algorithm2": "Algorithm 2", "population": "exact population",
         "batch1": "test batch 1", "batch4": "test batch 4", "batch60": "test batch 60"}


@dataclass
class Config(BaseConfig):
    steps: int = 50_000                   # per training batch size (E1's schedule)
    lr: float = 0.1
    init_std: float = 0.1
    widths: tuple[int, ...] = (784, 100, 100, 100, 10)
    population_examples: int = 60_000     # training images the population statistics are estimated on
    time_epoch: bool = True               # time population_statistics against one training epoch
    seeds: int = 5

    RANGES = {**BaseConfig.RANGES, "population_examples": Range(2, 60_000)}


def _spec(cfg: Config) -> dict:
    return dict(kind="mlp", widths=list(cfg.widths), activation="sigmoid", norm="bn", init="normal",
                init_std=cfg.init_std)


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
    claim = ("At inference BN normalizes with population statistics (Algorithm 2), which make a "
             "prediction depend on its input alone at no loss of accuracy against the statistics the "
             "network trained with (test batches of the training size); after small-batch training, "
             "the exact statistics of the inference network do better than Algorithm 2's estimate.")
    paper = ("Ioffe & Szegedy 2015, §3.1: \"the normalization of activations that depends on the "
             "mini-batch … is neither necessary nor desirable during inference; we want the output to "
             "depend only on the input, deterministically\"; Algorithm 2: E[x] = E_B[μ_B], Var[x] = "
             "m/(m−1)·E_B[σ²_B] (1.017 at m = 60, 1.333 at m = 4). No accuracy figures are given for "
             "this comparison; the small-batch part follows Wu & Johnson 2021 (\"Rethinking Batch\").")
    source = "Ioffe & Szegedy 2015, §3.1 and Algorithm 2; Wu & Johnson 2021 (arXiv:2105.07576)"
    departures = ("E1's network and schedule (SGD 0.1, 50k steps), trained at batch 60 and at batch 4. "
                  "Algorithm 2 is computed literally over the training images in batches of the training "
                  "size with every other layer in training mode (as during training); 'exact population' "
                  "runs the inference network, layer by layer (bnlab.population_statistics with "
                  "upstream='population'). Five seeds, paired.")
    Config = Config
    profiles = {
        "quick": dict(steps=5000, population_examples=20_000, seeds=3),
        "tiny": dict(steps=40, seeds=2, population_examples=600, checkpoint_every=30),
    }
    labels = {**{a.name: a.label for a in TRAIN_BATCHES}, **LABEL}
    criteria = (
        Criterion("population_costs_nothing", "after batch-60 training, Algorithm 2's statistics are not "
                  "worse than normalizing test batches of 60 with their own statistics (within 0.5 points)",
                  "acc_b60", "algorithm2", "batch60", test="noninferiority", margin=0.005),
        Criterion("exact_beats_algorithm2_small_batch", "after batch-4 training, the inference network's "
                  "exact statistics are more accurate than Algorithm 2's estimate",
                  "acc_b4", "population", "algorithm2", margin=0.002),
    )

    def run(self, cfg: Config, ctx: RunContext) -> None:
        data = ctx.data
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(data.train_x), generator=g)[:cfg.population_examples]
        train_x = data.train_x[order]
        for arm in TRAIN_BATCHES:
            m = arm["batch"]
            ctx.log(f"training the BN net at batch {m}: {cfg.seeds} seeds batched, {cfg.steps} steps")
            trainer = ctx.run_unit(arm.name, lambda arm=arm: make_trainer(
                build_mlp(_spec(cfg), cfg.seeds), data, ctx.seeds, arm.name, arm["batch"], cfg.lr), cfg.steps)
            ctx.log(f"batch {m}: EMA vs Algorithm 2 vs exact population vs test-batch statistics")
            for i, seed in enumerate(ctx.seeds):
                model = to_plain(trainer.model, i)
                if i == 0:
                    ctx.save_model(f"model_{arm.name}_seed{seed}.pt", model, _spec(cfg),
                                   dict(experiment="E2", train_batch=m, steps=cfg.steps, seed=seed))
                self._measure(cfg, ctx, model, data, train_x, arm, seed)
                if cfg.time_epoch and i == 0:
                    self._time(ctx, cfg, model, data, m, arm.name, seed)

    def _measure(self, cfg, ctx, model, data, train_x, arm, seed) -> None:
        m = arm["batch"]
        test_x, test_y = data.test_x, data.test_y
        ctx.record(cfg.steps, seed, arm.name, "acc_ema", _accuracy(model, test_x, test_y))
        for k in (1, 4, 60):
            ctx.record(cfg.steps, seed, arm.name, f"acc_batch{k}", _batch_stats_accuracy(model, test_x, test_y, k))
        ema = {n: (b.running_mean.clone(), b.running_var.clone()) for n, b in model.named_modules() if is_batchnorm(b)}
        population_statistics(model, list(train_x.split(m)), estimator="algorithm2", progress=False)
        ctx.record(cfg.steps, seed, arm.name, "acc_algorithm2", _accuracy(model, test_x, test_y))
        stats = population_statistics(model, list(train_x.split(1000)), upstream="population", progress=False)
        ctx.record(cfg.steps, seed, arm.name, "acc_population", _accuracy(model, test_x, test_y))
        # determinism: with population statistics an example's output does not depend on its batch
        with isolated(model, "eval"), torch.no_grad():
            alone = model(test_x[:64])
            mixed = model(torch.cat([test_x[:64], test_x[64:128].flip(0)]))[:64]
        ctx.record(cfg.steps, seed, arm.name, "batch_dependence", (alone - mixed).abs().max().item())
        for name, s in stats.items():
            ctx.record(cfg.steps, seed, arm.name, "ema_var_ratio", (ema[name][1].double() / s.var).mean().item(),
                       layer=name)

    def _time(self, ctx, cfg, model, data, m, arm, seed) -> None:
        """Seconds of population_statistics over the training images vs one epoch of training the
        same (plain) model at the same batch size, one thread, this machine."""
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

    def _accuracies(self, ctx: RunContext, arm: str) -> dict:
        return {k: ctx.final(f"acc_{k}", arm) for k in METHODS}

    @statistic("acc_b60", "test accuracy of the batch-60 network, by way of normalizing at test time")
    def acc_b60(self, cfg: Config, ctx: RunContext) -> dict:
        return self._accuracies(ctx, "b60")

    @statistic("acc_b4", "test accuracy of the batch-4 network, by way of normalizing at test time")
    def acc_b4(self, cfg: Config, ctx: RunContext) -> dict:
        return self._accuracies(ctx, "b4")

    def checks(self, cfg: Config, ctx: RunContext) -> list:
        dep = [v for a in TRAIN_BATCHES for v in ctx.final("batch_dependence", a.name)]
        one = [v for a in TRAIN_BATCHES for v in ctx.final("acc_batch1", a.name)]
        return [
            Check("deterministic", "with population statistics an example's output does not depend on the "
                  "other examples in its batch", max(dep) < 1e-5, f"largest change {max(dep):.2g}"),
            Check("batch_of_one_is_input_blind", "normalizing a test batch of one with its own statistics "
                  "gives x̂ = 0 in every BN layer, so the prediction ignores the input (chance level)",
                  max(one) < 0.2, f"accuracy at most {max(one):.3f}"),
        ]

    def measured(self, cfg: Config, ctx: RunContext, parts: list) -> str:
        from ..verdict import fmt
        lines = []
        for a in TRAIN_BATCHES:
            acc = self._accuracies(ctx, a.name)
            lines.append(f"{a.label}: " + ", ".join(f"{LABEL[k]} {fmt(acc[k])}" for k in METHODS))
        out = "Test accuracy — " + "; ".join(lines) + "."
        timing = [(a, ctx.final("seconds_population_statistics", a.name), ctx.final("seconds_training_epoch", a.name))
                  for a in TRAIN_BATCHES]
        ratios = [f"{tp[0] / te[0]:.2f}× a training epoch at batch {a['batch']}" for a, tp, te in timing
                  if tp and te and tp[0] == tp[0] and te[0] == te[0]]
        if ratios:
            out += " population_statistics over the training images costs " + ", ".join(ratios) + "."
        return out

    def figures(self, cfg: Config, ctx: RunContext) -> list:
        fig, ax = plt.subplots(figsize=(10, 4))
        width = 0.8 / len(TRAIN_BATCHES)
        for j, a in enumerate(TRAIN_BATCHES):
            acc = self._accuracies(ctx, a.name)
            means = [sum(acc[k]) / len(acc[k]) for k in METHODS]
            pos = [i + (j - (len(TRAIN_BATCHES) - 1) / 2) * width for i in range(len(METHODS))]
            ax.bar(pos, means, width=width, color=COLORS[j], label=a.label, alpha=0.8)
            for p, k in zip(pos, METHODS):
                ax.plot([p] * len(acc[k]), acc[k], "k.", ms=3)
        ax.axhline(0.1, color="0.5", lw=0.8, ls=":")
        ax.text(len(METHODS) - 0.5, 0.1, "chance", fontsize=7, ha="right", va="bottom", color="0.35")
        ax.set_xticks(range(len(METHODS)), [LABEL[k] for k in METHODS], rotation=15)
        ax.set(ylabel="test accuracy (bars: mean; dots: seeds)", ylim=(0, 1),
               title="Normalizing at test time: which statistics?")
        ax.legend(loc="center left", fontsize=8)
        return [save(fig, ctx.path("test_time_statistics.png"))]
