"""E6 — Noisy BN (Santurkar et al. 2018, §2.1, Fig. 2): the paper's three arms — standard, BN, and
BN followed by time-varying noise drawn independently per layer and step — on E1's network. Noisy
BN trains about as well as BN and better than the standard net, although its layer inputs shift
more than even the standard net's. A fourth arm, the standard net with the same noise, is
exploratory: outside the verdict."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from ...plotting import COLORS, mean_band, plt, save
from ..config import BaseConfig, Range
from ..criteria import Criterion, statistic
from ..measure import DriftEval
from ..models import build_mlp
from ..registry import Arm, Experiment, register
from ..runner import RunContext
from ..trainers import accuracy_per_seed, make_trainer

ARMS = (Arm("standard", "standard", dict(norm="none")), Arm("bn", "BN", dict(norm="bn")),
        Arm("noisy_bn", "BN + noise", dict(norm="noisy_bn")))
EXPLORATORY = (Arm("noise_only", "standard + noise (exploratory)", dict(norm="noise_only")),)


@dataclass
class Config(BaseConfig):
    steps: int = 20_000              # Santurkar et al.: 15k steps of VGG on CIFAR-10
    batch: int = 60
    lr: float = 0.1
    widths: tuple[int, ...] = (784, 100, 100, 100, 10)
    eval_every: int = 1000
    probe_examples: int = 1000       # the fixed probe batch the layer-input shift is measured on
    train_eval_examples: int = 10_000  # the fixed training images training accuracy is measured on
    exploratory: bool = True         # also train the standard net with the noise (outside the verdict)
    seeds: int = 5

    RANGES = {**BaseConfig.RANGES, "train_eval_examples": Range(2, 60_000)}


def _spec(cfg: Config, arm: Arm) -> dict:
    return dict(kind="mlp", widths=list(cfg.widths), activation="sigmoid", norm=arm["norm"], init="normal",
                init_std=0.1, drop_bias=arm["norm"] in ("bn", "noisy_bn"))


class _Evals:
    """extra_eval: the per-step layer-input shift (DriftEval, training semantics: batch statistics
    and noise as in training) and the accuracy on fixed training images (eval mode: running
    statistics, no noise)."""

    def __init__(self, cfg: Config, probe_x, train_x, train_y) -> None:
        self.drift, self.train_x, self.train_y = DriftEval(probe_x), train_x, train_y

    def __call__(self, trainer, step: int):
        yield from self.drift(trainer, step)
        acc = accuracy_per_seed(trainer.model, self.train_x, self.train_y)
        for i, seed in enumerate(trainer.seeds):
            yield seed, "train_acc", acc[i].item()

    def state_dict(self) -> dict:
        return self.drift.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.drift.load_state_dict(s)


@register
class E6(Experiment):
    id = "E6"
    order = 6
    title = "Santurkar Fig. 2: noisy BN trains like BN although its layer inputs shift more"
    claim = ("BN followed by time-varying noise — layer inputs that shift more from step to step than even "
             "the standard network's — trains about as well as BN and better than the standard network.")
    paper = ("Santurkar et al. 2018, §2.1, Fig. 2 (VGG, CIFAR-10, 15k steps, lr 0.1, one run): \"the "
             "performance difference between models with BatchNorm layers, and 'noisy' BatchNorm layers is "
             "almost non-existent. Also, both these networks perform much better than standard networks. "
             "Moreover, the 'noisy' BatchNorm network has qualitatively less stable distributions than even "
             "the standard, non-BatchNorm network\" [F: training accuracy ≈85% (BN), ≈75% (noisy), ≈50% "
             "(standard) near 1–2k steps, all ≈100% by 6k]. Noise (App. Alg. 1): per step and unit "
             "μ ~ U(−0.5, 0.5), σ ~ U(1, 1.25); per sample m ~ U(μ ± 0.1), s ~ N(σ, 0.1); a ← s·a + m.")
    source = "Santurkar, Tsipras, Ilyas, Madry 2018 (arXiv:1805.11604), §2.1, Fig. 2, App. Alg. 1"
    departures = ("E1's sigmoid MLP on MNIST instead of VGG on CIFAR-10, SGD 0.1, 20k steps. The noise is "
                  "added after BN's γ, β, drawn independently per layer, unit and step (the paper does not "
                  "say before or after γ, β), and not at test time. 'Less stable' is measured — the paper "
                  "judges histograms by eye — as the per-step change of each unit's input mean (in units of "
                  "its std) plus that of its log variance on a fixed probe batch, in training semantics, "
                  "averaged over units, layers and training. Training accuracy (the paper's measure) on "
                  "10,000 fixed training images in eval mode, averaged over the evaluations.")
    Config = Config
    profiles = {
        "quick": dict(steps=3000, eval_every=300, seeds=3, train_eval_examples=3000),
        "tiny": dict(steps=40, eval_every=10, seeds=2, probe_examples=200, train_eval_examples=300,
                     checkpoint_every=25),
    }
    labels = {a.name: a.label for a in ARMS + EXPLORATORY}
    criteria = (
        Criterion("noisy_like_bn", "noisy BN's training accuracy over training is within 2 points of BN's "
                  "(equivalence)", "train_acc_over_training", "noisy_bn", "bn", test="equivalence", margin=0.02),
        Criterion("noisy_beats_standard", "noisy BN's training accuracy over training exceeds the standard "
                  "network's by at least 1 point", "train_acc_over_training", "noisy_bn", "standard", margin=0.01),
        Criterion("noisy_shifts_more", "noisy BN's layer inputs shift more per step than the standard "
                  "network's", "layer_input_shift", "noisy_bn", "standard", scale="log"),
    )

    def _arms(self, cfg: Config) -> tuple:
        return ARMS + (EXPLORATORY if cfg.exploratory else ())

    def run(self, cfg: Config, ctx: RunContext) -> None:
        data = ctx.data
        probe = data.test_x[:cfg.probe_examples]
        tx, ty = data.train_x[:cfg.train_eval_examples], data.train_y[:cfg.train_eval_examples]
        for arm in self._arms(cfg):
            ctx.log(f"training {arm.label}: {cfg.seeds} seeds, {cfg.steps} steps")
            ctx.run_unit(arm.name, lambda arm=arm: make_trainer(
                build_mlp(_spec(cfg, arm), cfg.seeds), data, ctx.seeds, arm.name, cfg.batch, cfg.lr,
                extra_eval=_Evals(cfg, probe, tx, ty)),
                cfg.steps, eval_steps=DriftEval.schedule(cfg.eval_every, cfg.steps))

    def _mean_over_training(self, ctx: RunContext, metric: str, arms) -> dict:
        out = {}
        for a in arms:
            out[a.name] = []
            for seed in ctx.seeds:
                values = [v for v in ctx.series(metric, a.name, seed)[1] if math.isfinite(v)]
                out[a.name].append(statistics.fmean(values) if values else math.nan)
        return out

    @statistic("train_acc_over_training", "accuracy on the fixed training images, averaged over the evaluations")
    def train_acc_over_training(self, cfg: Config, ctx: RunContext) -> dict:
        return self._mean_over_training(ctx, "train_acc", ARMS)

    @statistic("layer_input_shift", "per-step |Δμ|/σ + |Δ log σ²| of every unit's input on the probe batch, "
                                    "averaged over units, layers and training")
    def layer_input_shift(self, cfg: Config, ctx: RunContext) -> dict:
        return self._mean_over_training(ctx, "drift", ARMS)

    def measured(self, cfg: Config, ctx: RunContext, parts: list) -> str:
        from ..verdict import fmt
        arms = self._arms(cfg)
        acc = {a.name: ctx.final("test_acc", a.name) for a in arms}
        tr = self._mean_over_training(ctx, "train_acc", arms)
        shift = self._mean_over_training(ctx, "drift", arms)
        return ("Final test accuracy: " + ", ".join(f"{a.label} {fmt(acc[a.name])}" for a in arms)
                + "; training accuracy over training: " + ", ".join(f"{a.label} {fmt(tr[a.name])}" for a in arms)
                + "; layer-input shift per step: " + ", ".join(f"{a.label} {fmt(shift[a.name])}" for a in arms) + ".")

    def figures(self, cfg: Config, ctx: RunContext) -> list:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4))
        for arm, color in zip(self._arms(cfg), COLORS):
            style = dict(alpha=0.1) if arm in EXPLORATORY else {}
            mean_band(axes[0], [ctx.series("train_acc", arm.name, s) for s in ctx.seeds], arm.label, color, **style)
            mean_band(axes[1], [ctx.series("drift", arm.name, s) for s in ctx.seeds], arm.label, color, log=True,
                      **style)
        axes[0].set(title="training accuracy (fixed training images)", xlabel="step", ylabel="accuracy")
        axes[1].set(title="layer-input shift in one step (|Δμ|/σ + |Δ log σ²|)", xlabel="step",
                    ylabel="shift (log)")
        axes[0].legend(loc="lower right", fontsize=8)
        return [save(fig, ctx.path("noisy_bn.png"))]
