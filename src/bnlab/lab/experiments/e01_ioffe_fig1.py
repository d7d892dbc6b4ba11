"""E1 — Ioffe & Szegedy 2015, Figure 1: MNIST, 784-100-100-100-10 sigmoid MLP, with and without
BN; test accuracy over training and the 15/50/85th percentiles of one last-hidden-layer sigmoid's
input on a fixed probe batch."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from ...isolation import isolated
from ...plotting import COLORS, mean_band, plt, save
from ..config import BaseConfig, Range
from ..criteria import Criterion, statistic
from ..models import build_mlp, to_plain
from ..registry import Arm, Experiment, register
from ..runner import RunContext
from ..trainers import ClassifierTrainer, make_trainer

ARMS = (Arm("nobn", "without BN", dict(norm="none")), Arm("bn", "with BN", dict(norm="bn")))


@dataclass
class Config(BaseConfig):
    steps: int = 50_000              # Ioffe Fig. 1: 50k steps of batch 60
    batch: int = 60
    lr: float = 0.1                  # not given in the paper; SGD 0.1 for both arms
    init_std: float = 0.1            # "small random Gaussian values": N(0, 0.1²)
    widths: tuple[int, ...] = (784, 100, 100, 100, 10)
    eval_every: int = 1000
    early_step: int = 1000           # where the paper's curves are furthest apart
    probe_unit: int = 0              # which last-hidden-layer sigmoid to follow
    probe_examples: int = 2000       # the fixed probe batch (test images) the percentiles are taken on
    seeds: int = 5

    RANGES = {**BaseConfig.RANGES, "early_step": Range(1, 10_000_000)}

    def check(self) -> None:
        super().check()
        from ...errors import UsageError
        if self.early_step % self.eval_every or self.early_step > self.steps:
            raise UsageError(f"config field early_step = {self.early_step} must be an evaluation step "
                             f"(a multiple of eval_every = {self.eval_every}, ≤ steps = {self.steps})")


def _spec(cfg: Config, arm: Arm) -> dict:
    return dict(kind="mlp", widths=list(cfg.widths), activation="sigmoid", norm=arm["norm"], init="normal",
                init_std=cfg.init_std)


def _percentiles(cfg: Config):
    """Percentiles of one sigmoid's input on the fixed probe batch, in *training* semantics for both
    arms alike (BN normalizes with the probe batch's statistics: the distribution training feeds
    the sigmoid), every buffer and the RNG restored afterwards."""
    def extra(trainer: ClassifierTrainer, step: int):
        captured: list = []
        with isolated(trainer.model, "train"), torch.no_grad():
            trainer.model(trainer.data.test_x[:cfg.probe_examples], capture=captured)
        z = captured[-1][:, :, cfg.probe_unit]                              # S, P
        q = torch.quantile(z, torch.tensor([0.15, 0.50, 0.85]), dim=1)      # 3, S
        for i, seed in enumerate(trainer.seeds):
            for name, row in zip(("p15", "p50", "p85"), q):
                yield seed, name, row[i].item()
    return extra


@register
class E1(Experiment):
    id = "E1"
    order = 1
    title = "Ioffe Fig. 1: BN trains faster and steadies the sigmoid inputs"
    claim = ("On MNIST, a sigmoid MLP with BN reaches high test accuracy much sooner than without, ends "
             "higher, and the input distribution of its sigmoids stays steadier during training.")
    paper = ("Ioffe & Szegedy 2015, §4.1, Fig. 1 [F]: without BN test accuracy ≈0.70 at the first plotted "
             "point, ≈0.91 at ~8k steps, ≈0.97 at 50k; with BN ≈0.95 at the first point and ≈0.98 at 50k. "
             "(b,c): the 15/50/85th percentiles of a typical last-layer sigmoid input change significantly "
             "in mean and variance without BN, are much more stable with BN. One run, no error bars.")
    source = "Ioffe & Szegedy 2015 (arXiv:1502.03167), §4.1, Fig. 1"
    departures = ("The paper gives no optimizer, learning rate, initialization scale or input binarization: "
                  "plain SGD at lr 0.1 for both arms, N(0, 0.1²) weights, inputs in [0, 1]. Five seeds, "
                  "each arm paired with the other on the same initial weights and data order. Test "
                  "accuracy uses BN's running averages (as the paper's tracking curve would).")
    Config = Config
    profiles = {
        "quick": dict(steps=6000, eval_every=500, early_step=1000, seeds=3),
        "tiny": dict(steps=60, eval_every=20, early_step=20, seeds=2, probe_examples=200, checkpoint_every=25),
    }
    labels = {a.name: a.label for a in ARMS}
    criteria = (
        Criterion("faster", "BN's test accuracy early in training (the paper's first points) is higher",
                  "acc_early", "bn", "nobn", margin=0.02),
        Criterion("auc", "BN's accuracy averaged over the whole training run is higher",
                  "acc_mean_over_training", "bn", "nobn", margin=0.01),
        Criterion("higher", "BN ends with the higher test accuracy (by at least 20 of 10,000 test images)",
                  "acc_final", "bn", "nobn", margin=0.002),
        Criterion("steadier", "the sigmoid input's percentiles move at most half as much with BN",
                  "percentile_movement", "bn", "nobn", direction="less", margin=math.log(2), scale="log"),
    )

    def run(self, cfg: Config, ctx: RunContext) -> None:
        for arm in ARMS:
            ctx.log(f"training {arm.label}: {cfg.seeds} seeds batched, {cfg.steps} steps of batch {cfg.batch}")
            trainer = ctx.run_unit(arm.name, lambda arm=arm: make_trainer(
                build_mlp(_spec(cfg, arm), cfg.seeds), ctx.data, ctx.seeds, arm.name, cfg.batch, cfg.lr,
                extra_eval=_percentiles(cfg)),
                cfg.steps, eval_steps=range(0, cfg.steps + 1, cfg.eval_every))
            # the first seed's trained network, as an ordinary model (bnlab recalibrate, torch.load)
            ctx.save_model(f"model_{arm.name}_seed{ctx.seeds[0]}.pt", to_plain(trainer.model, 0), _spec(cfg, arm),
                           dict(experiment="E1", train_batch=cfg.batch, steps=cfg.steps, seed=ctx.seeds[0]))

    @statistic("acc_early", "test accuracy at config.early_step")
    def acc_early(self, cfg: Config, ctx: RunContext) -> dict:
        return {a.name: ctx.at("test_acc", a.name, cfg.early_step) for a in ARMS}

    @statistic("acc_mean_over_training", "mean test accuracy over the evaluations after step 0 (area under the curve / length)")
    def acc_mean_over_training(self, cfg: Config, ctx: RunContext) -> dict:
        out = {}
        for a in ARMS:
            out[a.name] = []
            for seed in ctx.seeds:
                steps, values = ctx.series("test_acc", a.name, seed)
                later = [v for s, v in zip(steps, values) if s > 0]
                out[a.name].append(statistics.fmean(later) if later else math.nan)
        return out

    @statistic("acc_final", "test accuracy at the last step")
    def acc_final(self, cfg: Config, ctx: RunContext) -> dict:
        return {a.name: ctx.final("test_acc", a.name) for a in ARMS}

    @statistic("percentile_movement", "mean |Δ| of the 15/50/85th percentiles between evaluations after "
                                      "step 0, over the mean 15–85 width")
    def percentile_movement(self, cfg: Config, ctx: RunContext) -> dict:
        out = {}
        for a in ARMS:
            out[a.name] = []
            for seed in ctx.seeds:
                series = {q: [v for s, v in zip(*ctx.series(q, a.name, seed)) if s > 0] for q in ("p15", "p50", "p85")}
                moves = [abs(b - x) for vals in series.values() for x, b in zip(vals, vals[1:])]
                widths = [hi - lo for lo, hi in zip(series["p15"], series["p85"])]
                out[a.name].append(statistics.fmean(moves) / statistics.fmean(widths)
                                   if moves and widths and statistics.fmean(widths) > 0 else math.nan)
        return out

    def figures(self, cfg: Config, ctx: RunContext) -> list:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        ax = axes[0]
        for arm, color in zip(ARMS, COLORS):
            mean_band(ax, [ctx.series("test_acc", arm.name, s) for s in ctx.seeds], arm.label, color)
        for (value, text), color in zip(((0.97, "paper, without BN, at 50k: ≈ 0.97"),
                                         (0.98, "paper, with BN, at 50k: ≈ 0.98")), COLORS):
            ax.axhline(value, color=color, lw=0.9, ls=":", label=text)
        ax.axvline(cfg.early_step, color="0.5", lw=0.8, ls="--", label=f"early comparison (step {cfg.early_step})")
        ax.set(xlabel="training step", ylabel="test accuracy", title="(a) test accuracy (mean, min–max over seeds)")
        lo = min([r["value"] for r in ctx.select("test_acc") if r["step"] > 0] + [0.9])
        ax.set_ylim(max(0.0, lo - 0.02), 1.0)
        ax.legend(loc="lower right", fontsize=7)
        seed = ctx.seeds[0]
        for ax, arm, tag in zip(axes[1:], ARMS, ("(b)", "(c)")):
            for q, style in (("p15", "--"), ("p50", "-"), ("p85", "--")):
                ax.plot(*ctx.series(q, arm.name, seed), style, color="k", lw=1.2, label=q)
            ax.set(xlabel="training step", ylabel="sigmoid input",
                   title=f"{tag} {arm.label}: 15/50/85th percentiles (seed {seed})")
        lims = [ax.get_ylim() for ax in axes[1:]]
        for ax in axes[1:]:
            ax.set_ylim(min(l[0] for l in lims), max(l[1] for l in lims))
        axes[1].legend(fontsize=8, loc="upper right")
        return [save(fig, ctx.path("fig1_accuracy_percentiles.png"))]
