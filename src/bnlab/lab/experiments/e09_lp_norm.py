"""E9 — ℓp normalization (Santurkar et al. 2018, §3.3): normalizing by the batch average of the ℓ1,
ℓ2 or ℓ∞ norm (bnlab.LpNorm1d) trains better than the unnormalized network and comparably to BN,
its layer inputs shift more than the unnormalized network's, and its landscape is smoother. Same
network as E8."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from ...plotting import COLORS, mean_band, plt, save
from ...probes import Landscape
from ..config import BaseConfig, Range
from ..criteria import Criterion, statistic
from ..measure import DriftEval, ProbedTrainer
from ..models import build_mlp
from ..registry import Arm, Experiment, register
from ..runner import RunContext

ARMS = (Arm("standard", "standard", dict(norm="none")), Arm("bn", "BN", dict(norm="bn")),
        Arm("lp1", "ℓ1", dict(norm="lp1")), Arm("lp2", "ℓ2", dict(norm="lp2")), Arm("lpinf", "ℓ∞", dict(norm="lpinf")))
LP = ("lp1", "lp2", "lpinf")
_NAME = {"lp1": "ℓ1", "lp2": "ℓ2", "lpinf": "ℓ∞"}


@dataclass
class Config(BaseConfig):
    steps: int = 6000
    batch: int = 60
    lr: float = 0.1
    widths: tuple[int, ...] = (784, 100, 100, 100, 100, 100, 100, 10)
    activation: str = "relu"
    init: str = "standard"
    eval_every: int = 200
    probe_examples: int = 1000
    seeds: int = 5


def _per_seed(ctx: RunContext, metric: str, layer, how) -> dict:
    out = {}
    for a in ARMS:
        out[a.name] = []
        for seed in ctx.seeds:
            values = [v for v in ctx.series(metric, a.name, seed, layer=layer)[1] if math.isfinite(v)]
            out[a.name].append(how(values) if values else math.nan)
    return out


def _parts() -> tuple:
    parts = []
    for p in LP:
        n = _NAME[p]
        parts += [
            Criterion(f"{p}_comparable_to_bn", f"{n}'s final test accuracy is within 1 point of BN's (equivalence)",
                      "test_acc_final", p, "bn", test="equivalence", margin=0.01),
            Criterion(f"{p}_better_than_standard", f"{n}'s final test accuracy exceeds the unnormalized network's "
                      "by at least 0.5 points", "test_acc_final", p, "standard", margin=0.005),
            Criterion(f"{p}_shifts_more", f"{n}'s layer inputs shift more per step than the unnormalized "
                      "network's", "layer_input_shift", p, "standard", scale="log"),
            Criterion(f"{p}_smoother", f"{n}'s median gradient change along −ηg is at least 2× smaller than the "
                      "unnormalized network's", "median_grad_pred", p, "standard", direction="less",
                      margin=math.log(2), scale="log"),
        ]
    return tuple(parts)


@register
class E9(Experiment):
    id = "E9"
    order = 9
    title = "Santurkar §3.3: ℓp normalization trains like BN, shifts more, smooths the landscape"
    claim = ("Normalizing by the batch average of the ℓ1, ℓ2 or ℓ∞ norm trains better than the unnormalized "
             "network and comparably to BN, although its layer inputs shift more than the unnormalized "
             "network's, and it smooths the loss landscape.")
    paper = ("Santurkar et al. 2018, §3.3 (VGG, CIFAR-10; DLN; one run each): \"all the normalization "
             "strategies offer comparable performance to BatchNorm\"; \"qualitatively, the ℓp-normalization "
             "techniques lead to larger distributional covariate shift … than the vanilla, i.e., "
             "unnormalized, networks\" (histograms, Fig. 6); \"all these techniques result in an improved "
             "smoothness of the landscape that is similar to the effect of BatchNorm\". The definition "
             "(\"fix the first order moment … then normalize by the average of their ℓp-norm\") leaves "
             "details open.")
    source = "Santurkar, Tsipras, Ilyas, Madry 2018 (arXiv:1805.11604), §3.3, Figs. 5, 6, 12"
    departures = ("E8's ReLU MLP on MNIST (SGD 0.1, 6k steps). bnlab.LpNorm1d centers each feature with the "
                  "batch mean, divides by one scalar per layer — the batch average of every sample's "
                  "width-normalized ℓp norm — then BN's γ, β. The shift is measured as in E6, per step on a "
                  "fixed probe batch; smoothness as E8's gradient predictiveness.")
    Config = Config
    profiles = {
        "quick": dict(steps=1000, eval_every=200, seeds=3),
        "tiny": dict(steps=20, eval_every=10, seeds=2, probe_examples=200, checkpoint_every=15),
    }
    labels = {a.name: a.label for a in ARMS}
    criteria = _parts()

    def run(self, cfg: Config, ctx: RunContext) -> None:
        probe = ctx.data.test_x[:cfg.probe_examples]
        for arm in ARMS:
            spec = dict(kind="mlp", widths=list(cfg.widths), activation=cfg.activation, norm=arm["norm"], init=cfg.init)
            for seed in ctx.seeds:
                ctx.log(f"{arm.label} seed {seed}: {cfg.steps} steps")
                ctx.run_unit(f"{arm.name}-s{seed}", lambda spec=dict(spec, init_seed=seed), seed=seed, arm=arm:
                             ProbedTrainer(build_mlp(spec, 1), ctx.data, [seed], arm.name, cfg.batch, cfg.lr,
                                           probes=[Landscape()], probe_every=cfg.eval_every,
                                           extra_eval=DriftEval(probe)),
                             cfg.steps, eval_steps=DriftEval.schedule(cfg.eval_every, cfg.steps))

    @statistic("test_acc_final", "test accuracy at the last step")
    def test_acc_final(self, cfg: Config, ctx: RunContext) -> dict:
        return {a.name: ctx.final("test_acc", a.name) for a in ARMS}

    @statistic("layer_input_shift", "per-step |Δμ|/σ + |Δ log σ²| of every unit's input on the probe batch, "
                                    "averaged over units, layers and training")
    def layer_input_shift(self, cfg: Config, ctx: RunContext) -> dict:
        return _per_seed(ctx, "drift", None, statistics.fmean)

    @statistic("median_grad_pred", "median over training of max over η of ‖∇L(w) − ∇L(w − ηg)‖")
    def median_grad_pred(self, cfg: Config, ctx: RunContext) -> dict:
        return _per_seed(ctx, "grad_pred", "*", statistics.median)

    def measured(self, cfg: Config, ctx: RunContext, parts: list) -> str:
        from ..verdict import fmt
        acc = self.test_acc_final(cfg, ctx)
        shift = self.layer_input_shift(cfg, ctx)
        pred = self.median_grad_pred(cfg, ctx)
        return ("Final test accuracy: " + ", ".join(f"{a.label} {fmt(acc[a.name])}" for a in ARMS)
                + "; layer-input shift per step: " + ", ".join(f"{a.label} {fmt(shift[a.name])}" for a in ARMS)
                + "; median gradient predictiveness: " + ", ".join(f"{a.label} {fmt(pred[a.name])}" for a in ARMS) + ".")

    def figures(self, cfg: Config, ctx: RunContext) -> list:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for arm, color in zip(ARMS, COLORS):
            mean_band(axes[0], [ctx.series("test_acc", arm.name, s) for s in ctx.seeds], arm.label, color)
            mean_band(axes[1], [ctx.series("drift", arm.name, s) for s in ctx.seeds], arm.label, color, log=True)
            mean_band(axes[2], [ctx.series("grad_pred", arm.name, s, layer="*") for s in ctx.seeds], arm.label,
                      color, log=True)
        axes[0].set(title="test accuracy", xlabel="step", ylabel="accuracy")
        axes[1].set(title="layer-input shift per step (|Δμ|/σ + |Δ log σ²|)", xlabel="step", ylabel="shift (log)")
        axes[2].set(title="gradient predictiveness", xlabel="step", ylabel="max ‖∇L(w) − ∇L(w − ηg)‖ (log)")
        axes[0].legend(fontsize=8, loc="lower right")
        return [save(fig, ctx.path("lp_normalization.png"))]
