"""E16 — ReLU is a workaround, not a cure (docs/story.md, row 1): plain ReLU MLPs with He
initialization, without BN and without shortcuts, at depths 5, 10, 20 and 50, against the same with
BN. Does trainability fall with depth without BN, and does BN extend it?"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...plotting import COLORS, mean_band, plt, save
from ..config import BaseConfig, Range
from ..criteria import Criterion, statistic
from ..models import build_mlp
from ..registry import Arm, Experiment, register
from ..runner import RunContext
from ..trainers import batch_loss_per_seed, make_trainer


@dataclass
class Config(BaseConfig):
    steps: int = 5000
    batch: int = 60
    lr: float = 0.02
    hidden: int = 100
    depths: tuple[int, ...] = (5, 10, 20, 50)      # hidden layers
    eval_every: int = 500
    train_eval_examples: int = 10_000
    seeds: int = 5

    RANGES = {**BaseConfig.RANGES, "hidden": Range(1, 4096), "depths": Range(1, 500),
              "train_eval_examples": Range(2, 60_000)}

    def check(self) -> None:
        super().check()
        from ...errors import UsageError
        if len(self.depths) < 2:
            raise UsageError("config field depths needs at least two depths to compare")


def _arms(cfg: Config) -> tuple:
    return tuple(Arm(f"{'bn' if bn else 'plain'}-d{d}", f"{'with' if bn else 'without'} BN, {d} layers", dict(bn=bn, depth=d))
                 for bn in (False, True) for d in cfg.depths)


class _TrainLoss:
    """extra_eval: loss and error on fixed training images, in eval mode."""

    def __init__(self, cfg: Config) -> None:
        self.n = cfg.train_eval_examples

    def __call__(self, trainer, step: int):
        loss, err = batch_loss_per_seed(trainer.model, trainer.data.train_x[:self.n], trainer.data.train_y[:self.n])
        for i, seed in enumerate(trainer.seeds):
            yield seed, "train_eval_loss", loss[i].item()
            yield seed, "train_eval_error", err[i].item()


@register
class E16(Experiment):
    id = "E16"
    order = 16
    title = "ReLU with He init is a workaround, not a cure: depth without and with BN"
    claim = ("Without BN or shortcuts, a ReLU network with He initialization trains worse as it gets deeper, and "
             "BN lets the deepest one train better.")
    paper = ("He et al. 2015 (arXiv:1502.01852) derive N(0, 2/n) so that a deep ReLU net's signal neither "
             "vanishes nor explodes at initialization (a 30-layer net converges with it); the summary in "
             "docs/story.md says \"ReLU only mitigates\" vanishing gradients; He et al. 2015 (arXiv:1512.03385) find plain nets "
             "degrade with depth even with BN (E5).")
    source = "He et al. 2015 (arXiv:1502.01852), §2.2; docs/story.md, row 1"
    departures = ("MLPs of 100 ReLU units per layer on MNIST, He initialization, plain SGD at lr 0.02 for every "
                  "depth, 5,000 steps of batch 60; training loss on 10,000 fixed training images in eval mode.")
    Config = Config
    profiles = {
        "quick": dict(steps=1000, eval_every=250, seeds=3, depths=(5, 20, 50)),
        "tiny": dict(steps=20, eval_every=10, seeds=2, depths=(2, 6), hidden=16, train_eval_examples=300,
                     checkpoint_every=15),
    }
    labels: dict = {}
    criteria = (
        Criterion("depth_hurts_without_bn", "without BN, the deepest network's training loss is at least 1.5× the "
                  "shallowest's", "train_loss", "plain-deepest", "plain-shallowest", margin=math.log(1.5), scale="log"),
        Criterion("bn_extends_depth", "at the deepest depth, BN's training loss is at most 2/3 of the plain "
                  "network's", "train_loss", "bn-deepest", "plain-deepest", direction="less", margin=math.log(1.5),
                  scale="log"),
    )

    def run(self, cfg: Config, ctx: RunContext) -> None:
        for arm in _arms(cfg):
            spec = dict(kind="mlp", widths=[784] + [cfg.hidden] * arm["depth"] + [10], activation="relu", init="he",
                        norm="bn" if arm["bn"] else "none")
            ctx.log(f"{arm.label}: {cfg.seeds} seeds, {cfg.steps} steps")
            ctx.run_unit(arm.name, lambda spec=spec, arm=arm: make_trainer(
                build_mlp(spec, cfg.seeds), ctx.data, ctx.seeds, arm.name, cfg.batch, cfg.lr, extra_eval=_TrainLoss(cfg)),
                cfg.steps, eval_steps=range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))

    @statistic("train_loss", "loss on the fixed training images at the last step; arms named by depth rank "
                             "(shallowest, deepest)")
    def train_loss(self, cfg: Config, ctx: RunContext) -> dict:
        lo, hi = min(cfg.depths), max(cfg.depths)
        out = {}
        for bn in ("plain", "bn"):
            out[f"{bn}-shallowest"] = ctx.final("train_eval_loss", f"{bn}-d{lo}")
            out[f"{bn}-deepest"] = ctx.final("train_eval_loss", f"{bn}-d{hi}")
        return out

    def measured(self, cfg: Config, ctx: RunContext, parts: list) -> str:
        from ..verdict import fmt
        return "Final training loss — " + "; ".join(
            f"{a.label}: {fmt(ctx.final('train_eval_loss', a.name))} (error "
            f"{fmt([100 * e for e in ctx.final('train_eval_error', a.name)], 3)}%)" for a in _arms(cfg)) + "."

    def figures(self, cfg: Config, ctx: RunContext) -> list:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4), sharey=True)
        for ax, bn in zip(axes, (False, True)):
            for arm, color in zip([a for a in _arms(cfg) if a["bn"] == bn], COLORS):
                mean_band(ax, [ctx.series("train_eval_loss", arm.name, s) for s in ctx.seeds], arm.label, color, log=True)
            ax.set(title=f"ReLU, He init, {'with' if bn else 'without'} BN", xlabel="step",
                   ylabel="training loss (fixed images, log)")
            ax.legend(fontsize=8)
        return [save(fig, ctx.path("relu_depth.png"))]
