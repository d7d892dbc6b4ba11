"""E13 — γ and β let BN recover what normalization removes (Ioffe & Szegedy 2015, §3): E1's sigmoid
network with BN's learned γ, β against BN without them. Without γ, β the sigmoids' inputs stay
standardized — mostly in the near-linear regime — and the network should do worse. (That γ = √(σ²+ε),
β = μ make BN the identity is a test, tests/test_closed_forms.py, not an experiment.)"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from ...isolation import isolated
from ...plotting import COLORS, mean_band, plt, save
from ..config import BaseConfig, Range
from ..criteria import Criterion, statistic
from ..models import build_mlp
from ..registry import Arm, Experiment, register
from ..runner import RunContext
from ..trainers import ClassifierTrainer, make_trainer

ARMS = (Arm("affine", "BN with learned γ, β", dict(affine=True)), Arm("no_affine", "BN without γ, β", dict(affine=False)))


@dataclass
class Config(BaseConfig):
    steps: int = 20_000
    batch: int = 60
    lr: float = 0.1
    widths: tuple[int, ...] = (784, 100, 100, 100, 10)
    eval_every: int = 1000
    linear_bound: float = 1.0        # |z| < 1: sigmoid'(z) ≥ 0.79·sigmoid'(0), the near-linear regime
    probe_examples: int = 2000
    seeds: int = 5

    RANGES = {**BaseConfig.RANGES, "linear_bound": Range(0, 100, lo_open=True)}


def _measure(cfg: Config):
    """extra_eval: the fraction of every sigmoid's inputs inside (−bound, bound) on a fixed probe
    batch (training semantics), and how far γ and β have moved from 1 and 0."""
    def extra(trainer: ClassifierTrainer, step: int):
        captured: list = []
        with isolated(trainer.model, "train"), torch.no_grad():
            trainer.model(trainer.data.test_x[:cfg.probe_examples], capture=captured)
        near = torch.stack([(z.abs() < cfg.linear_bound).double().mean((1, 2)) for z in captured]).mean(0)   # S
        S = len(trainer.seeds)
        gammas, betas = [], []
        for block in trainer.model.blocks:
            bn = block.norm.layer
            if bn.weight is not None:
                gammas.append((bn.weight.detach().view(S, -1) - 1).abs().mean(1))
                betas.append(bn.bias.detach().view(S, -1).abs().mean(1))
        for i, seed in enumerate(trainer.seeds):
            yield seed, "near_linear", near[i].item()
            if gammas:
                yield seed, "gamma_moved", torch.stack(gammas)[:, i].mean().item()
                yield seed, "beta_moved", torch.stack(betas)[:, i].mean().item()
    return extra


@register
class E13(Experiment):
    id = "E13"
    order = 13
    title = "Ioffe §3: γ and β let BN leave the sigmoid's linear regime"
    claim = ("Without BN's learned γ and β the sigmoids' inputs stay near the linear regime and the network "
             "does worse than with them.")
    paper = ("Ioffe & Szegedy 2015, §3: \"normalizing the inputs of a sigmoid would constrain them to the "
             "linear regime of the nonlinearity. To address this, we make sure that the transformation "
             "inserted in the network can represent the identity transform\" (γ = √Var[x], β = E[x]). No "
             "experiment isolates γ and β.")
    source = "Ioffe & Szegedy 2015 (arXiv:1502.03167), §3"
    departures = ("E1's sigmoid MLP with BN (SGD 0.1, 20k steps), with BN's affine parameters learned or absent "
                  "(absent equals γ, β frozen at 1, 0). 'Near-linear': |z| < 1 at the sigmoid's input, on 2,000 "
                  "fixed test images in training semantics, averaged over units, layers and evaluations.")
    Config = Config
    profiles = {
        "quick": dict(steps=3000, eval_every=300, seeds=3),
        "tiny": dict(steps=40, eval_every=10, seeds=2, probe_examples=200, checkpoint_every=25),
    }
    labels = {a.name: a.label for a in ARMS}
    criteria = (
        Criterion("stays_linear_without", "without γ, β the fraction of sigmoid inputs in the near-linear "
                  "regime is at least 5 points higher", "near_linear", "no_affine", "affine", margin=0.05),
        Criterion("worse_without", "without γ, β the final test accuracy is lower by at least 0.2 points",
                  "test_acc", "no_affine", "affine", direction="less", margin=0.002),
    )

    def run(self, cfg: Config, ctx: RunContext) -> None:
        for arm in ARMS:
            spec = dict(kind="mlp", widths=list(cfg.widths), activation="sigmoid", norm="bn", init="normal",
                        init_std=0.1, norm_kwargs=dict(affine=arm["affine"]))
            ctx.log(f"{arm.label}: {cfg.seeds} seeds, {cfg.steps} steps")
            ctx.run_unit(arm.name, lambda spec=spec, arm=arm: make_trainer(
                build_mlp(spec, cfg.seeds), ctx.data, ctx.seeds, arm.name, cfg.batch, cfg.lr,
                extra_eval=_measure(cfg)),
                cfg.steps, eval_steps=range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))

    @statistic("near_linear", "fraction of sigmoid inputs with |z| < linear_bound, averaged over the evaluations")
    def near_linear(self, cfg: Config, ctx: RunContext) -> dict:
        return {a.name: ctx.seed_means("near_linear", a.name) for a in ARMS}

    @statistic("test_acc", "test accuracy at the last step")
    def test_acc(self, cfg: Config, ctx: RunContext) -> dict:
        return {a.name: ctx.final("test_acc", a.name) for a in ARMS}

    def measured(self, cfg: Config, ctx: RunContext, parts: list) -> str:
        from ..verdict import fmt
        g, b = ctx.final("gamma_moved", "affine"), ctx.final("beta_moved", "affine")
        return (f"With γ, β learned, mean |γ − 1| reaches {fmt(g)} and mean |β| {fmt(b)}; final near-linear fraction "
                f"{fmt(ctx.final('near_linear', 'affine'))} with vs {fmt(ctx.final('near_linear', 'no_affine'))} "
                f"without; test accuracy {fmt(ctx.final('test_acc', 'affine'))} vs {fmt(ctx.final('test_acc', 'no_affine'))}.")

    def figures(self, cfg: Config, ctx: RunContext) -> list:
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
        for arm, color in zip(ARMS, COLORS):
            mean_band(axes[0], [ctx.series("test_acc", arm.name, s) for s in ctx.seeds], arm.label, color)
            mean_band(axes[1], [ctx.series("near_linear", arm.name, s) for s in ctx.seeds], arm.label, color)
        for metric, color, label in (("gamma_moved", COLORS[2], "mean |γ − 1|"), ("beta_moved", COLORS[3], "mean |β|")):
            mean_band(axes[2], [ctx.series(metric, "affine", s) for s in ctx.seeds], label, color)
        axes[0].set(title="test accuracy", xlabel="step", ylabel="accuracy")
        axes[1].set(title=f"fraction of sigmoid inputs with |z| < {cfg.linear_bound:g}", xlabel="step", ylabel="fraction")
        axes[2].set(title="how far γ and β move (learned arm)", xlabel="step", ylabel="mean over units")
        for ax in axes:
            ax.legend(fontsize=8)
        return [save(fig, ctx.path("gamma_beta.png"))]
