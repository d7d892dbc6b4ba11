"""E4 — Vanishing gradients (Glorot & Bengio 2010; the seed's first claim): deep MLPs on MNIST,
{sigmoid, tanh, ReLU} × {standard, Glorot, He} initialization × {no BN, BN} (+ residual ReLU),
measured with bnlab.probes (GradientFlow, ActivationStats) during training."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass

from ...probes import ActivationStats, GradientFlow
from ..config import BaseConfig
from ..measure import ProbedTrainer
from ..models import build_mlp
from ...plotting import COLORS, plt, save
from ..registry import Experiment, register
from ..verdict import Verdict, all_seeds, combine, fmt

ACTIVATIONS = ("sigmoid", "tanh", "relu")
INITS = ("standard", "glorot", "he")


@dataclass
class Config(BaseConfig):
    steps: int = 3000
    batch: int = 60
    lr: float = 0.1
    hidden: int = 100
    depth: int = 5                   # hidden layers (Glorot & Bengio Table 1: 5)
    probe_every: int = 100
    activations: tuple[str, ...] = ACTIVATIONS
    inits: tuple[str, ...] = INITS
    residual: bool = True            # add residual ReLU/He arms with and without BN
    vanishing_ratio: float = 0.1     # std ∂L/∂z: first / last hidden layer below this = vanishing
    seeds: int = 3


def _arms(cfg: Config) -> list[tuple[str, dict]]:
    arms = []
    for act, init, norm in itertools.product(cfg.activations, cfg.inits, ("none", "bn")):
        arms.append((f"{act}-{init}-{'bn' if norm == 'bn' else 'plain'}",
                     dict(activation=act, init=init, norm=norm)))
    if cfg.residual:
        for norm in ("none", "bn"):
            arms.append((f"relu-he-{'bn' if norm == 'bn' else 'plain'}-residual",
                         dict(activation="relu", init="he", norm=norm, residual_from=1)))
    return arms


def _spec(cfg: Config, arm: dict, seed: int) -> dict:
    widths = [784] + [cfg.hidden] * cfg.depth + [10]
    return dict(kind="mlp", widths=widths, init_std=0.1, init_seed=seed, **arm)


@register
class E4(Experiment):
    id = "E4"
    order = 4
    title = "Glorot & Bengio: gradients vanish in deep sigmoid/tanh nets; ReLU and BN counter it"
    claim = ("In deep MLPs with standard initialization, the back-propagated gradient shrinks towards "
             "the input with sigmoid and tanh units (vanishing gradients); ReLU with He initialization "
             "mitigates it, and BN counters it for sigmoid units.")
    paper = ("Glorot & Bengio 2010: back-propagated gradients (∂Cost/∂s) shrink towards the input with "
             "standard initialization (Fig. 7), sigmoid top layers saturate (Fig. 2); Table 1, 5 hidden "
             "layers, MNIST test error %: softsign 1.64, softsign-N 1.72, tanh 1.76, tanh-N 1.64, "
             "sigmoid 2.21. ReLU is not in that paper (the seed's 'ReLU mitigates' is a later "
             "observation; He et al. 2015 give its initialization).")
    source = "Glorot & Bengio 2010 (AISTATS); He et al. 2015 (arXiv:1502.01852)"
    Config = Config
    profiles = {
        "quick": dict(steps=600, probe_every=100, seeds=1),
        "tiny": dict(steps=20, probe_every=10, seeds=1, depth=3, hidden=16,
                     inits=("standard", "he"), checkpoint_every=15),
    }

    def run(self, cfg: Config, ctx) -> None:
        arms = _arms(cfg)
        ctx.log(f"{len(arms)} arms × {cfg.seeds} seeds, {cfg.depth} hidden layers of {cfg.hidden}, "
                f"{cfg.steps} steps, probes every {cfg.probe_every}")
        for name, arm in arms:
            for seed in ctx.seeds:
                ctx.run_unit(f"{name}-s{seed}", lambda arm=arm, name=name, seed=seed: ProbedTrainer(
                    build_mlp(_spec(cfg, arm, seed), 1), ctx.data, [seed], name, cfg.batch, cfg.lr,
                    probes=[GradientFlow(), ActivationStats(percentiles=(2, 50, 98))],
                    probe_every=cfg.probe_every, probe_at=(1,)),
                    cfg.steps, eval_steps=[1, *range(cfg.probe_every, cfg.steps + 1, cfg.probe_every)])

    # -- analysis ------------------------------------------------------------------------------
    @staticmethod
    def _layers(ctx, arm: str, metric: str) -> list[str]:
        return sorted({r["metric"].split("@")[1] for r in ctx.rows
                       if r["arm"] == arm and r["metric"].startswith(metric + "@")},
                      key=lambda n: (n.startswith("readout"), n))

    def _ratios(self, ctx, arm: str, seed: int) -> tuple[float, float]:
        """std(∂L/∂z) at the first hidden layer / at the last hidden layer: at initialization (the
        first training step) and the median over the rest of training."""
        hidden = [n for n in self._layers(ctx, arm, "preact_grad_std") if not n.startswith("readout")]
        first, last = hidden[0], hidden[-1]
        steps, a = ctx.series(f"preact_grad_std@{first}", arm, seed)
        _, b = ctx.series(f"preact_grad_std@{last}", arm, seed)
        ratios = [x / y if y > 0 else float("nan") for x, y in zip(a, b)]
        later = [r for s, r in zip(steps, ratios) if s > 1]
        return ratios[0], (statistics.median(later) if later else float("nan"))

    def analyze(self, cfg: Config, ctx) -> Verdict:
        arms = [name for name, _ in _arms(cfg)]
        both = {a: [self._ratios(ctx, a, s) for s in ctx.seeds] for a in arms}
        ratio = {a: [r[0] for r in both[a]] for a in arms}                  # at initialization
        ratio_training = {a: [r[1] for r in both[a]] for a in arms}
        err = {a: [1 - v for v in ctx.final("test_acc", a)] for a in arms}
        sat = {}
        for a in arms:
            layers = self._layers(ctx, a, "saturated")
            if layers:
                sat[a] = ctx.seed_means(f"saturated@{layers[-1]}", a)
        std_init = "standard" if "standard" in cfg.inits else cfg.inits[0]
        vanish_arms = [f"{act}-{std_init}-plain" for act in ("sigmoid", "tanh") if act in cfg.activations]
        relu_arm = "relu-he-plain" if "he" in cfg.inits else None
        p1 = all_seeds(r < cfg.vanishing_ratio for a in vanish_arms for r in ratio[a])
        p2 = all_seeds(r >= cfg.vanishing_ratio for r in ratio[relu_arm]) if relu_arm else "inconclusive"
        sig_plain, sig_bn = f"sigmoid-{std_init}-plain", f"sigmoid-{std_init}-bn"
        p3 = all_seeds(b >= 10 * p for b, p in zip(ratio[sig_bn], ratio[sig_plain]))
        verdict = combine(p1, p2, p3)
        table = "; ".join(f"{a}: ratio {fmt(ratio[a], 2)} at init, {fmt(ratio_training[a], 2)} in "
                          f"training, test error {fmt([100 * e for e in err[a]], 3)}%" for a in arms)
        measured = (f"std of ∂L/∂z, first hidden layer / last, at initialization: "
                    f"{sig_plain} {fmt(ratio[sig_plain], 2)}, {sig_bn} {fmt(ratio[sig_bn], 2)}, "
                    + (f"{vanish_arms[-1]} {fmt(ratio[vanish_arms[-1]], 2)}, " if len(vanish_arms) > 1 else "")
                    + (f"{relu_arm} {fmt(ratio[relu_arm], 2)}. " if relu_arm else "")
                    + f"All arms — {table}.")
        criterion = (f"supported if, for every seed, the ratio at initialization (first training step) "
                     f"is < {cfg.vanishing_ratio} for "
                     f"{' and '.join(vanish_arms)} (vanishing: {p1}), ≥ {cfg.vanishing_ratio} for "
                     f"{relu_arm} (ReLU mitigates: {p2}), and BN raises the sigmoid ratio ≥ 10× "
                     f"(BN counters it: {p3}).")
        return Verdict(self.id, self.claim, self.paper, measured, criterion, verdict,
                       numbers=dict(grad_ratio_at_init=ratio, grad_ratio_median_training=ratio_training,
                                    test_error=err,
                                    top_layer_saturation=sat, vanishing=p1, relu_mitigates=p2,
                                    bn_counters=p3),
                       figures=[self._figure_ratios(cfg, ctx, arms, ratio, err),
                                self._figure_layers(cfg, ctx, arms)])

    def _figure_ratios(self, cfg, ctx, arms, ratio, err) -> str:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
        ys = range(len(arms))
        for ax, values, title, log in ((axes[0], ratio, "std ∂L/∂z: first / last hidden layer", True),
                                       (axes[1], {a: [100 * e for e in err[a]] for a in arms}, "test error %", False)):
            means = [statistics.fmean(values[a]) for a in arms]
            colors = [COLORS[2] if a.endswith("residual") else COLORS[1] if "-bn" in a else COLORS[0] for a in arms]
            ax.barh(list(ys), means, color=colors)
            ax.set_yticks(list(ys), arms, fontsize=7)
            ax.set_title(title)
            if log:
                ax.set_title(title + " (at initialization)")
                ax.set_xscale("log")
                ax.axvline(cfg.vanishing_ratio, color="k", ls="--", lw=0.8)
        return save(fig, ctx.path("vanishing_ratio_and_error.png"))

    def _figure_layers(self, cfg, ctx, arms) -> str:
        """Per-layer std of ∂L/∂z at the last measurement (Glorot & Bengio Fig. 7 style)."""
        std_init = "standard" if "standard" in cfg.inits else cfg.inits[0]
        show = [a for a in arms if a.split("-")[1] in (std_init, "he")][:12]
        fig, ax = plt.subplots(figsize=(8, 4))
        seed = ctx.seeds[0]
        for i, a in enumerate(show):
            layers = [n for n in self._layers(ctx, a, "preact_grad_std") if not n.startswith("readout")]
            vals = [ctx.series(f"preact_grad_std@{n}", a, seed)[1][-1] for n in layers]
            ax.plot(range(1, len(vals) + 1), vals, "o-" if "-bn" in a else "s--",
                    color=COLORS[i % len(COLORS)], label=a, lw=1.2, ms=3)
        ax.set(yscale="log", xlabel="hidden layer (input → output)", ylabel="std of ∂L/∂z",
               title=f"back-propagated gradient per layer at step {cfg.steps} (seed {seed})")
        ax.legend(fontsize=6, ncol=2)
        return save(fig, ctx.path("gradient_per_layer.png"))
