"""E5 — Depth: plain vs residual convolutional nets with BN (He et al. 2015, §4.1–4.2): the deeper
plain net has the higher training loss at a fixed budget and at three times it (degradation),
identity shortcuts remove it, and the deep plain net's gradients do not vanish."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from ...plotting import COLORS, mean_band, plt, save
from ..config import BaseConfig, Range
from ..criteria import Criterion, statistic
from ..models import build_cnn
from ..registry import Arm, Experiment, register
from ..runner import RunContext
from ..trainers import ClassifierTrainer, batch_loss_per_seed

ARMS = (Arm("plain-shallow", "plain, shallow", dict(residual=False, depth="shallow")),
        Arm("plain-deep", "plain, deep", dict(residual=False, depth="deep")),
        Arm("residual-shallow", "residual, shallow", dict(residual=True, depth="shallow")),
        Arm("residual-deep", "residual, deep", dict(residual=True, depth="deep")))


@dataclass
class Config(BaseConfig):
    budget: int = 1500               # the base budget B in steps; training runs to 3B
    batch: int = 64
    lr: float = 0.05                 # He et al.: 0.1 at batch 128, momentum 0.9, weight decay 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    channels: tuple[int, ...] = (8, 16, 32)   # channels per stage (He et al.: 16, 32, 64)
    shallow_blocks: int = 1          # basic blocks per stage: 2·3·1 + 2 = 8 layers
    deep_blocks: int = 5             # 2·3·5 + 2 = 32 layers
    pool: int = 2                    # 28×28 → 14×14 input (CPU budget)
    eval_every: int = 250
    train_eval_examples: int = 10_000  # the fixed training images the training loss is measured on
    seeds: int = 5

    RANGES = {**BaseConfig.RANGES, "budget": Range(1, 10_000_000), "channels": Range(1, 512),
              "shallow_blocks": Range(1, 100), "deep_blocks": Range(1, 100), "pool": Range(1, 4),
              "train_eval_examples": Range(2, 60_000)}

    def check(self) -> None:
        super().check()
        from ...errors import UsageError
        if self.budget % self.eval_every:
            raise UsageError(f"config field budget = {self.budget} must be a multiple of eval_every = {self.eval_every}")
        if self.deep_blocks <= self.shallow_blocks:
            raise UsageError("config field deep_blocks must exceed shallow_blocks")


def _spec(cfg: Config, arm: Arm) -> dict:
    blocks = cfg.deep_blocks if arm["depth"] == "deep" else cfg.shallow_blocks
    return dict(kind="cnn", widths=list(cfg.channels), blocks=blocks, residual=arm["residual"], norm="bn",
                pool=cfg.pool)


def _layers(cfg: Config, arm: Arm) -> int:
    blocks = cfg.deep_blocks if arm["depth"] == "deep" else cfg.shallow_blocks
    return 2 * len(cfg.channels) * blocks + 2


class _Measures:
    """loss_hook and extra_eval: ‖∂L/∂W‖ of the first block conv over the last, per seed (median
    since the last evaluation), and the loss on fixed training images in eval mode."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.ratios = cfg, []

    def __call__(self, trainer: ClassifierTrainer, loss) -> None:
        blocks = trainer.model.blocks
        S = trainer.model.seeds
        first = blocks[0]["conv1"].weight.grad.view(S, -1).norm(dim=1)
        last = blocks[-1]["conv2"].weight.grad.view(S, -1).norm(dim=1)
        self.ratios.append((first / last.clamp_min(1e-30)).detach())

    def extra(self, trainer: ClassifierTrainer, step: int):
        if self.ratios:
            med = torch.stack(self.ratios).median(0).values
            for i, seed in enumerate(trainer.seeds):
                yield seed, "grad_ratio_first_last", med[i].item()
        self.ratios.clear()
        n = self.cfg.train_eval_examples
        loss, err = batch_loss_per_seed(trainer.model, trainer.data.train_x[:n], trainer.data.train_y[:n])
        for i, seed in enumerate(trainer.seeds):
            yield seed, "train_eval_loss", loss[i].item()
            yield seed, "train_eval_error", err[i].item()


@register
class E5(Experiment):
    id = "E5"
    order = 5
    title = "He et al.: plain nets with BN degrade with depth; identity shortcuts do not"
    claim = ("A deeper plain convolutional network with BN reaches a higher training loss than a shallower "
             "one, at a fixed budget and at three times it (degradation); identity shortcuts at the same depth "
             "remove the gap and let the deeper net do at least as well; and the deep plain net's gradients "
             "do not vanish — degradation is not a vanishing-gradient problem.")
    paper = ("He et al. 2015: \"adding more layers to a suitably deep model leads to higher training error\"; "
             "the 34-layer plain ImageNet net \"has higher training error throughout the whole training "
             "procedure … unlikely to be caused by vanishing gradients. These plain networks are trained "
             "with BN … the backward propagated gradients exhibit healthy norms\"; with 3× the iterations "
             "the degradation persists (footnote 3). CIFAR-10 (Fig. 6, single runs [F]): plain-56 trains "
             "worse than plain-20; ResNet-20/32/44/56 test error 8.75/7.51/7.17/6.97%. One-layer residual "
             "blocks showed no advantage; the blocks are two 3×3 layers.")
    source = "He et al. 2015 (arXiv:1512.03385), §3.2, §4.1, §4.2, Fig. 6, Table 6"
    departures = ("MNIST average-pooled to 14×14, stages of 8/16/32 channels (He et al.: 16/32/64 on 32×32 "
                  "CIFAR), 8 vs 32 layers (1 vs 5 basic blocks per stage), batch 64, SGD lr 0.05 with "
                  "momentum 0.9 and weight decay 1e-4 at a constant rate, no augmentation; budgets of 1,500 "
                  "and 4,500 steps. Training loss is measured in eval mode on 10,000 fixed training images.")
    Config = Config
    profiles = {
        "quick": dict(budget=200, eval_every=100, seeds=3, channels=(4, 8, 16), deep_blocks=3,
                      train_eval_examples=2000),
        "tiny": dict(budget=10, eval_every=5, seeds=2, channels=(4, 8), deep_blocks=2, batch=16,
                     train_eval_examples=300, checkpoint_every=20),
    }
    labels = {a.name: a.label for a in ARMS}
    criteria = (
        Criterion("degrades", "at the base budget the deep plain net's training loss is higher than the "
                  "shallow one's", "train_loss_at_budget", "plain-deep", "plain-shallow", scale="log"),
        Criterion("degrades_at_3x", "at three times the budget it still is", "train_loss_at_3x_budget",
                  "plain-deep", "plain-shallow", scale="log"),
        Criterion("shortcuts_fix", "at the base budget the deep residual net's training loss is lower than "
                  "the deep plain net's", "train_loss_at_budget", "residual-deep", "plain-deep",
                  direction="less", scale="log"),
        Criterion("residual_deep_not_worse", "the deep residual net's training loss is not more than 1.25× the "
                  "shallow residual net's (non-inferiority)", "train_loss_at_budget", "residual-deep",
                  "residual-shallow", direction="less", test="noninferiority", margin=math.log(1.25), scale="log"),
        Criterion("gradients_healthy", "in the deep plain net the first block's weight gradient is at least "
                  "a tenth of the last block's (median over training)", "grad_ratio", "plain-deep",
                  reference=0.1, scale="log"),
    )

    def run(self, cfg: Config, ctx: RunContext) -> None:
        for arm in ARMS:
            ctx.log(f"{arm.label} ({_layers(cfg, arm)} layers): {cfg.seeds} seeds, {3 * cfg.budget} steps")
            measures = _Measures(cfg)
            ctx.run_unit(arm.name, lambda arm=arm, measures=measures: ClassifierTrainer(
                build_cnn(_spec(cfg, arm), cfg.seeds), ctx.data, ctx.seeds, arm.name, cfg.batch, cfg.lr,
                momentum=cfg.momentum, weight_decay=cfg.weight_decay, extra_eval=measures.extra,
                loss_hook=measures),
                3 * cfg.budget, eval_steps=range(cfg.eval_every, 3 * cfg.budget + 1, cfg.eval_every))

    @statistic("train_loss_at_budget", "loss on the fixed training images (eval mode) at the base budget")
    def train_loss_at_budget(self, cfg: Config, ctx: RunContext) -> dict:
        return {a.name: ctx.at("train_eval_loss", a.name, cfg.budget) for a in ARMS}

    @statistic("train_loss_at_3x_budget", "loss on the fixed training images (eval mode) at three times the budget")
    def train_loss_at_3x_budget(self, cfg: Config, ctx: RunContext) -> dict:
        return {a.name: ctx.at("train_eval_loss", a.name, 3 * cfg.budget) for a in ARMS}

    @statistic("grad_ratio", "median over evaluations of the per-interval median ‖∂L/∂W‖ first block / last block")
    def grad_ratio(self, cfg: Config, ctx: RunContext) -> dict:
        out = {}
        for a in ARMS:
            out[a.name] = []
            for seed in ctx.seeds:
                values = ctx.series("grad_ratio_first_last", a.name, seed)[1]
                out[a.name].append(statistics.median(values) if values else math.nan)
        return out

    def measured(self, cfg: Config, ctx: RunContext, parts: list) -> str:
        from ..verdict import fmt
        err = {a.name: ctx.at("train_eval_error", a.name, cfg.budget) for a in ARMS}
        test = {a.name: [1 - v for v in ctx.final("test_acc", a.name)] for a in ARMS}
        return ("Training error at the base budget: " + ", ".join(
            f"{a.label} ({_layers(cfg, a)} layers) {fmt([100 * e for e in err[a.name]], 3)}%" for a in ARMS)
            + "; test error at 3× the budget: " + ", ".join(f"{a.label} {fmt([100 * e for e in test[a.name]], 3)}%"
                                                             for a in ARMS) + ".")

    def figures(self, cfg: Config, ctx: RunContext) -> list:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4))
        for ax, residual in zip(axes, (False, True)):
            for arm, color in zip([a for a in ARMS if a["residual"] == residual], COLORS):
                mean_band(ax, [ctx.series("train_eval_loss", arm.name, s) for s in ctx.seeds],
                          f"{arm.label}, {_layers(cfg, arm)} layers", color, log=True)
            for x in (cfg.budget, 3 * cfg.budget):
                ax.axvline(x, color="0.5", lw=0.8, ls="--")
            ax.set(title=f"{'residual' if residual else 'plain'} nets with BN: training loss",
                   xlabel="step", ylabel="loss on fixed training images (log)")
            ax.legend(fontsize=8)
        return [save(fig, ctx.path("depth_training_loss.png"))]
