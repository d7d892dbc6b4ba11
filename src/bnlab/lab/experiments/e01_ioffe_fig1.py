"""E1 — Ioffe & Szegedy 2015, Figure 1: MNIST, 784-100-100-100-10 sigmoid MLP, with and without
BN; test accuracy over training and the 15/50/85th percentiles of one last-hidden-layer
sigmoid's input."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...isolation import isolated
from ..config import BaseConfig
from ..models import build_mlp
from ...plotting import COLORS, mean_band, plt, save
from ..registry import Experiment, register
from ..trainers import ClassifierTrainer, make_trainer
from ..verdict import Verdict, all_seeds, combine, fmt, separated

ARMS = ("nobn", "bn")
LABEL = {"nobn": "without BN", "bn": "with BN"}


@dataclass
class Config(BaseConfig):
    steps: int = 50_000              # Ioffe Fig. 1: 50k steps of batch 60
    batch: int = 60
    lr: float = 0.1                  # not given in the paper; SGD 0.1 reproduces the curve shape
    init_std: float = 0.1            # "small Gaussian" initialization: N(0, 0.1²)
    widths: tuple[int, ...] = (784, 100, 100, 100, 10)
    eval_every: int = 1000
    early_fraction: float = 0.1      # "early" = the first evaluation at ≥ 10% of training
    probe_unit: int = 0              # which last-hidden-layer sigmoid to follow
    probe_examples: int = 2000       # test images its input percentiles are taken over
    seeds: int = 3


def _spec(cfg: Config, arm: str) -> dict:
    return dict(kind="mlp", widths=list(cfg.widths), activation="sigmoid",
                norm="bn" if arm == "bn" else "none", init="normal", init_std=cfg.init_std)


def _percentiles(cfg: Config):
    """Percentiles of one sigmoid's input over a fixed probe set, in *training* semantics (BN
    with the probe set's batch statistics: the distribution training feeds the sigmoid), with
    every buffer and the RNG restored afterwards (bnlab.isolation)."""
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
    claim = ("On MNIST, a sigmoid MLP with BN reaches high test accuracy much sooner than without, "
             "and the input distribution of its sigmoids stays steady during training instead of "
             "drifting.")
    paper = ("Ioffe & Szegedy 2015, Fig. 1 [F]: without BN test accuracy ≈0.70 at the first point, "
             "≈0.91 at ~8k steps, ≈0.97 at 50k; with BN ≈0.95 at the first point and ≈0.98 at 50k. "
             "(b,c): the 15/50/85th percentiles of a last-layer sigmoid input are erratic without "
             "BN, steady with BN.")
    source = "Ioffe & Szegedy 2015 (arXiv:1502.03167), §4.1, Fig. 1"
    Config = Config
    profiles = {
        "quick": dict(steps=6000, eval_every=500),
        "tiny": dict(steps=60, eval_every=20, seeds=2, probe_examples=200, checkpoint_every=25),
    }

    def run(self, cfg: Config, ctx) -> None:
        data = ctx.data
        for arm in ARMS:
            ctx.log(f"training {LABEL[arm]}: {cfg.seeds} seeds batched, {cfg.steps} steps of batch {cfg.batch}")
            ctx.run_unit(
                arm,
                lambda arm=arm: make_trainer(build_mlp(_spec(cfg, arm), cfg.seeds), data, ctx.seeds,
                                                  arm, cfg.batch, cfg.lr, extra_eval=_percentiles(cfg)),
                cfg.steps, eval_steps=range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))

    def analyze(self, cfg: Config, ctx) -> Verdict:
        eval_steps = sorted({r["step"] for r in ctx.select("test_acc")})
        early = next(s for s in eval_steps if s >= cfg.early_fraction * cfg.steps)
        acc_early = {a: [r["value"] for r in ctx.select("test_acc", a, step=early)] for a in ARMS}
        acc_final = {a: ctx.final("test_acc", a) for a in ARMS}
        drift = {a: [self._drift(ctx, a, s) for s in ctx.seeds] for a in ARMS}
        drift_abs = {a: [self._drift(ctx, a, s, absolute=True) for s in ctx.seeds] for a in ARMS}

        faster = separated(acc_early["bn"], acc_early["nobn"])
        better = separated(acc_final["bn"], acc_final["nobn"])
        steadier = all_seeds(d_bn < d_no for d_bn, d_no in zip(drift["bn"], drift["nobn"]))
        verdict = combine(faster, steadier, better)

        figures = [self._figure(cfg, ctx)]
        measured = (f"test accuracy at step {early}: {fmt(acc_early['bn'])} with BN vs "
                    f"{fmt(acc_early['nobn'])} without; at step {cfg.steps}: {fmt(acc_final['bn'])} vs "
                    f"{fmt(acc_final['nobn'])}. Movement of the sigmoid-input percentiles between "
                    f"evaluations, relative to the distribution's 15–85 width: {fmt(drift['bn'])} "
                    f"with BN vs {fmt(drift['nobn'])} without.")
        criterion = (f"supported if, for every seed, BN's accuracy at step {early} exceeds every "
                     f"no-BN seed's (faster: {faster}), BN's final accuracy exceeds every no-BN "
                     f"seed's (higher: {better}), and BN's relative percentile movement is "
                     f"smaller for every seed (steadier: {steadier}); not supported if any part is reversed for all seeds.")
        return Verdict(self.id, self.claim, self.paper, measured, criterion, verdict,
                       numbers=dict(early_step=early, acc_early=acc_early, acc_final=acc_final,
                                    percentile_drift=drift, percentile_drift_absolute=drift_abs,
                                    faster=faster, higher=better,
                                    steadier=steadier),
                       figures=figures)

    @staticmethod
    def _drift(ctx, arm: str, seed: int, absolute: bool = False) -> float:
        """How much the sigmoid's input distribution moves between evaluations, relative to its
        width: mean over q ∈ {15, 50, 85} and consecutive evaluations of |Δp_q|, divided by the
        mean width p85 − p15 over the run (scale-free: a shift matters relative to the spread).
        """
        moves, widths = [], []
        series = {q: ctx.series(q, arm, seed)[1] for q in ("p15", "p50", "p85")}
        for vals in series.values():
            moves += [abs(b - a) for a, b in zip(vals, vals[1:])]
        widths = [hi - lo for lo, hi in zip(series["p15"], series["p85"])]
        if not moves or not widths:
            return float("nan")
        move = sum(moves) / len(moves)
        return move if absolute else move / (sum(widths) / len(widths))

    def _figure(self, cfg: Config, ctx) -> str:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        ax = axes[0]
        for arm, color in zip(ARMS, COLORS):
            mean_band(ax, [ctx.series("test_acc", arm, s) for s in ctx.seeds], LABEL[arm], color)
        ax.set(xlabel="training step", ylabel="test accuracy", title="(a) test accuracy")
        lo = min([r["value"] for r in ctx.select("test_acc")] + [0.9])
        ax.set_ylim(max(0.0, lo - 0.02), 1.0)
        ax.legend()
        seed = ctx.seeds[0]
        for ax, arm, tag in zip(axes[1:], ARMS, ("(b)", "(c)")):
            for q, style in (("p15", "--"), ("p50", "-"), ("p85", "--")):
                ax.plot(*ctx.series(q, arm, seed), style, color="k", lw=1.2, label=q)
            ax.set(xlabel="training step", ylabel="sigmoid input",
                   title=f"{tag} {LABEL[arm]}: 15/50/85th percentiles (seed {seed})")
        lims = [ax.get_ylim() for ax in axes[1:]]
        for ax in axes[1:]:
            ax.set_ylim(min(l[0] for l in lims), max(l[1] for l in lims))
        axes[1].legend()
        return save(fig, ctx.path("fig1_accuracy_percentiles.png"))
