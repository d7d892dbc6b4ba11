"""E15 — "BN makes layer inputs normally distributed" (a claim of the student summary quoted in
docs/story.md): BN standardizes each unit's input, it does not change its shape. The skewness,
excess kurtosis and Kolmogorov–Smirnov distance to N(0, 1) of every unit's (standardized)
pre-activation distribution, with and without BN, through training."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from ...isolation import isolated
from ...plotting import COLORS, mean_band, plt, save
from ..config import BaseConfig, Range
from ..criteria import Check, Criterion, statistic
from ..models import build_mlp
from ..registry import Arm, Experiment, register
from ..runner import RunContext
from ..trainers import ClassifierTrainer, make_trainer

ARMS = (Arm("plain", "without BN", dict(norm="none")), Arm("bn", "with BN", dict(norm="bn")))


def shape_statistics(z: torch.Tensor) -> dict:
    """Per unit of z (n, U): skewness, excess kurtosis, and the Kolmogorov–Smirnov distance of the
    standardized values to N(0, 1). Each (U,)."""
    z = z.double()
    std = z.std(0, unbiased=False).clamp_min(1e-300)
    s = (z - z.mean(0)) / std                                           # n, U
    n = s.shape[0]
    sorted_s, _ = torch.sort(s, dim=0)
    cdf = torch.special.ndtr(sorted_s)
    i = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
    ks = torch.maximum((i / n - cdf).abs(), (cdf - (i - 1) / n).abs()).amax(0)
    return dict(skew=(s ** 3).mean(0), kurtosis=(s ** 4).mean(0) - 3.0, ks=ks)


def _measure(cfg: "Config"):
    def extra(trainer: ClassifierTrainer, step: int):
        captured: list = []
        with isolated(trainer.model, "train"), torch.no_grad():
            trainer.model(trainer.data.test_x[:cfg.probe_examples], capture=captured)
        S = len(trainer.seeds)
        per = {k: [] for k in ("skew", "kurtosis", "ks")}
        for z in captured:                                              # S, n, U: the activations' inputs
            for i in range(S):
                for k, v in shape_statistics(z[i]).items():
                    per[k].append((i, v))
        for i, seed in enumerate(trainer.seeds):
            for k in per:
                vals = torch.cat([v for j, v in per[k] if j == i])
                yield seed, f"median_abs_{k}" if k != "ks" else "median_ks", (vals.abs() if k != "ks" else vals).median().item()
    return extra


@dataclass
class Config(BaseConfig):
    steps: int = 10_000
    batch: int = 60
    lr: float = 0.1
    widths: tuple[int, ...] = (784, 100, 100, 100, 10)
    eval_every: int = 1000
    probe_examples: int = 2000
    seeds: int = 5

    RANGES = {**BaseConfig.RANGES, "probe_examples": Range(10, 60_000)}


@register
class E15(Experiment):
    id = "E15"
    order = 15
    title = "A common claim: BN makes layer inputs normally distributed"
    claim = ("With BN the inputs of a layer's nonlinearity are (close to) normally distributed, and closer to a "
             "normal distribution than without BN.")
    paper = ("A claim of the student summary quoted in docs/story.md, not of Ioffe & Szegedy: BN \"fixes the "
             "means and variances of layer inputs\" (§3) — a per-unit affine map of the batch, which cannot change "
             "the shape of a unit's distribution within the batch.")
    source = "Ioffe & Szegedy 2015 (arXiv:1502.03167), §3 (what BN does fix)"
    departures = ("E1's sigmoid MLP with and without BN (SGD 0.1, 10k steps). Every unit's sigmoid input on 2,000 "
                  "fixed test images in training semantics, standardized; per seed the median over units of the "
                  "Kolmogorov–Smirnov distance to N(0, 1), averaged over evaluations. KS ≈ 0.03 is what 2,000 "
                  "draws from a normal distribution typically show.")
    Config = Config
    profiles = {
        "quick": dict(steps=2000, eval_every=500, seeds=3),
        "tiny": dict(steps=20, eval_every=10, seeds=2, probe_examples=200, checkpoint_every=15),
    }
    labels = {a.name: a.label for a in ARMS}
    criteria = (
        Criterion("normal_with_bn", "with BN the median unit's KS distance to N(0, 1) is below 0.05",
                  "ks_distance", "bn", reference=0.05, direction="less"),
        Criterion("more_normal_than_without", "with BN the median KS distance is at least 0.01 below the network "
                  "without BN's", "ks_distance", "bn", "plain", direction="less", margin=0.01),
    )

    def run(self, cfg: Config, ctx: RunContext) -> None:
        for arm in ARMS:
            spec = dict(kind="mlp", widths=list(cfg.widths), activation="sigmoid", norm=arm["norm"], init="normal",
                        init_std=0.1)
            ctx.log(f"{arm.label}: {cfg.seeds} seeds, {cfg.steps} steps")
            ctx.run_unit(arm.name, lambda spec=spec, arm=arm: make_trainer(
                build_mlp(spec, cfg.seeds), ctx.data, ctx.seeds, arm.name, cfg.batch, cfg.lr, extra_eval=_measure(cfg)),
                cfg.steps, eval_steps=range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))
        self._affine_invariance(cfg, ctx)

    def _affine_invariance(self, cfg: Config, ctx: RunContext) -> None:
        """The check's measurement: KS of one BN layer's input and of its output on the same batch."""
        torch.manual_seed(0)
        model = build_mlp(dict(kind="mlp", widths=list(cfg.widths), activation="sigmoid", norm="bn",
                               init="normal", init_std=0.1), 1)
        bn = model.blocks[0].norm.layer
        seen = {}
        hook = bn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0].detach(), y=out.detach()))
        try:
            with torch.no_grad():
                model(ctx.data.test_x[:cfg.probe_examples])
        finally:
            hook.remove()
        diff = (shape_statistics(seen["x"])["ks"] - shape_statistics(seen["y"])["ks"]).abs().max().item()
        ctx.record(0, ctx.seeds[0], "bn", "ks_change_through_bn", diff)

    @statistic("ks_distance", "median over units of the KS distance to N(0, 1), averaged over evaluations")
    def ks_distance(self, cfg: Config, ctx: RunContext) -> dict:
        return {a.name: ctx.seed_means("median_ks", a.name) for a in ARMS}

    def checks(self, cfg: Config, ctx: RunContext) -> list:
        diff = ctx.final("ks_change_through_bn", "bn")[0]
        return [Check("bn_keeps_the_shape", "BN is a per-unit affine map of the batch: a unit's standardized "
                      "distribution, hence its KS distance, is the same before and after it", diff < 1e-6,
                      f"largest change {diff:.2g}")]

    def measured(self, cfg: Config, ctx: RunContext, parts: list) -> str:
        from ..verdict import fmt
        out = []
        for k, name in (("median_ks", "KS distance"), ("median_abs_skew", "|skewness|"), ("median_abs_kurtosis", "|excess kurtosis|")):
            vals = {a.name: ctx.seed_means(k, a.name) for a in ARMS}
            out.append(f"median {name}: {fmt(vals['bn'])} with BN vs {fmt(vals['plain'])} without")
        return "; ".join(out) + "."

    def figures(self, cfg: Config, ctx: RunContext) -> list:
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
        for ax, (k, title) in zip(axes, (("median_ks", "KS distance to N(0, 1)"), ("median_abs_skew", "|skewness|"),
                                         ("median_abs_kurtosis", "|excess kurtosis|"))):
            for arm, color in zip(ARMS, COLORS):
                mean_band(ax, [ctx.series(k, arm.name, s) for s in ctx.seeds], arm.label, color)
            ax.set(title=f"{title} (median over units)", xlabel="step")
        axes[0].axhline(0.05, color="0.5", lw=0.8, ls=":")
        axes[0].legend(fontsize=8)
        return [save(fig, ctx.path("normality.png"))]
