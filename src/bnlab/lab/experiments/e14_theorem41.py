"""E14 — Santurkar et al.'s Theorem 4.1 on real networks: for every BN unit, the gradient with respect
to the layer's input against the gradient arriving at its output, through training, on E1's sigmoid
network and on E8's ReLU network with BN. The bound must hold at every measured point (a check
that can fail); the experiment reports how much the γ/σ scaling and the two projections each
reduce the gradient."""

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

NETS = (Arm("sigmoid", "E1's sigmoid MLP with BN", dict(widths=(784, 100, 100, 100, 10), activation="sigmoid",
                                                        init="normal", init_std=0.1)),
        Arm("relu", "E8's ReLU MLP with BN", dict(widths=(784,) + (100,) * 6 + (10,), activation="relu",
                                                  init="standard", init_std=0.1)))


@dataclass
class Config(BaseConfig):
    steps: int = 10_000
    batch: int = 60
    lr: float = 0.1
    eval_every: int = 500
    probe_examples: int = 256        # the batch the gradients are measured on (training semantics)
    seeds: int = 5

    RANGES = {**BaseConfig.RANGES, "probe_examples": Range(2, 60_000)}


def theorem_terms(x: torch.Tensor, g: torch.Tensor, dx: torch.Tensor, gamma: torch.Tensor, eps: float) -> dict:
    """Per unit of a BN layer with input x (m, U), output gradient g = ∂L/∂z and input gradient dx
    (both (m, U)) and scale γ (U,): the terms of Theorem 4.1,

        ‖dx‖² ≤ (γ²/σ²)·(‖g‖² − (1/m)⟨1, g⟩² − c·⟨g, ŷ⟩²)

    with c = 1/√m as printed, or c = 1/m, which is what the closed form gives (‖ŷ‖² = m)."""
    x, g, dx = x.double(), g.double(), dx.double()
    m = x.shape[0]
    var = x.var(0, unbiased=False)
    sigma2 = var + eps
    y_hat = (x - x.mean(0)) / sigma2.sqrt()
    base = g.square().sum(0)
    p_mean = g.sum(0).square() / m
    p_hat = (g * y_hat).sum(0).square()
    scale = gamma.double().square() / sigma2
    return dict(lhs=dx.square().sum(0), base=base, scale=scale,
                rhs_fixed=scale * (base - p_mean - p_hat / m), rhs_printed=scale * (base - p_mean - p_hat / math.sqrt(m)),
                projected=(p_mean + p_hat / m) / base.clamp_min(1e-300))


def _measure(cfg: Config):
    """extra_eval: Theorem 4.1's terms for every BN unit on a fixed training batch."""
    def extra(trainer: ClassifierTrainer, step: int):
        model = trainer.model
        S = len(trainer.seeds)
        x = trainer.data.train_x[:cfg.probe_examples]
        y = trainer.data.train_y[:cfg.probe_examples]
        inputs, outputs, hooks = [], [], []
        for block in model.blocks:
            bn = block.norm.layer

            def pre(mod, args):
                args[0].retain_grad()
                inputs.append(args[0])

            def post(mod, args, out):
                out.retain_grad()
                outputs.append(out)
            hooks += [bn.register_forward_pre_hook(pre), bn.register_forward_hook(post)]
        try:
            with isolated(model, "train", parameters=True, grads=True):
                out = model(x)                                                   # S, m, K
                K = out.shape[-1]
                loss = torch.nn.functional.cross_entropy(out.reshape(-1, K), y.repeat(S), reduction="none")
                loss.view(S, -1).mean(1).sum().backward()
                per_seed: dict = {}
                for block, xin, zout in zip(model.blocks, inputs, outputs):
                    bn = block.norm.layer
                    t = theorem_terms(xin.detach(), zout.grad, xin.grad, bn.weight.detach(), bn.eps)   # (S·U,)
                    for k, v in t.items():
                        per_seed.setdefault(k, []).append(v.view(S, -1))
        finally:
            for h in hooks:
                h.remove()
        t = {k: torch.cat(v, dim=1) for k, v in per_seed.items()}                 # S, units
        for i, seed in enumerate(trainer.seeds):
            lhs, fixed, printed = t["lhs"][i], t["rhs_fixed"][i], t["rhs_printed"][i]
            yield seed, "bound_excess", (lhs / fixed.clamp_min(1e-300) - 1).max().item()
            yield seed, "printed_violations", (lhs > printed * (1 + 1e-9)).double().mean().item()
            yield seed, "log_gradient_ratio", torch.log(lhs / t["base"][i]).median().item()
            yield seed, "log_scale", torch.log(t["scale"][i]).median().item()
            yield seed, "projected_fraction", t["projected"][i].median().item()
    return extra


@register
class E14(Experiment):
    id = "E14"
    order = 14
    title = "Santurkar Thm. 4.1 on real networks: what reduces BN's input gradient"
    claim = ("In trained networks with BN, the gradient with respect to a BN layer's input is smaller than the "
             "gradient at its output; the γ/σ scaling is below one, and the two projections remove a "
             "noticeable part of the gradient.")
    paper = ("Santurkar et al. 2018, Theorem 4.1: ‖∇_{y_j} L̂‖² ≤ (γ²/σ_j²)(‖∇_{y_j} L‖² − (1/m)⟨1, ∇_{y_j} L⟩² "
             "− (1/√m)⟨∇_{y_j} L, ŷ_j⟩²), with the same downstream gradient in both networks and γ, β fixed. Its "
             "proof (App. C) is a chain of equalities, and since ‖ŷ_j‖² = m the last coefficient is 1/m, not "
             "1/√m. A reduction needs σ_j ≳ γ.")
    source = "Santurkar, Tsipras, Ilyas, Madry 2018 (arXiv:1805.11604), §4.1, Theorem 4.1, App. C"
    departures = ("Measured every 500 steps on 256 fixed training images in training semantics, per BN unit, in "
                  "E1's sigmoid MLP and E8's ReLU MLP with BN (SGD 0.1, 10k steps). Per seed: the median over "
                  "units and layers of each term, averaged over the measurements.")
    Config = Config
    profiles = {
        "quick": dict(steps=1500, eval_every=250, seeds=3),
        "tiny": dict(steps=20, eval_every=10, seeds=2, probe_examples=64, checkpoint_every=15),
    }
    labels = {a.name: a.label for a in NETS}
    criteria = tuple(c for net in ("sigmoid", "relu") for c in (
        Criterion(f"gradient_reduced_{net}", f"in the {net} network the input gradient's squared norm is below the "
                  "output gradient's (median over units)", "gradient_ratio", net, reference=1.0, direction="less",
                  scale="log"),
        Criterion(f"scaling_below_one_{net}", f"in the {net} network γ²/σ² is below one (median over units)",
                  "scale", net, reference=1.0, direction="less", scale="log"),
        Criterion(f"projections_matter_{net}", f"in the {net} network the two projections remove at least 5% of "
                  "the output gradient's squared norm (median over units)", "projected_fraction", net, reference=0.05),
    ))

    def run(self, cfg: Config, ctx: RunContext) -> None:
        for net in NETS:
            spec = dict(kind="mlp", widths=list(net["widths"]), activation=net["activation"], norm="bn",
                        init=net["init"], init_std=net["init_std"])
            ctx.log(f"{net.label}: {cfg.seeds} seeds, {cfg.steps} steps")
            ctx.run_unit(net.name, lambda spec=spec, net=net: make_trainer(
                build_mlp(spec, cfg.seeds), ctx.data, ctx.seeds, net.name, cfg.batch, cfg.lr, extra_eval=_measure(cfg)),
                cfg.steps, eval_steps=range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))

    def _mean(self, ctx: RunContext, metric: str, transform=lambda v: v) -> dict:
        out = {}
        for net in NETS:
            out[net.name] = []
            for seed in ctx.seeds:
                values = ctx.series(metric, net.name, seed)[1]
                out[net.name].append(transform(statistics.fmean(values)) if values else math.nan)
        return out

    @statistic("gradient_ratio", "exp of the mean over measurements of the median over units of log(‖dx‖²/‖g‖²)")
    def gradient_ratio(self, cfg: Config, ctx: RunContext) -> dict:
        return self._mean(ctx, "log_gradient_ratio", math.exp)

    @statistic("scale", "exp of the mean over measurements of the median over units of log(γ²/σ²)")
    def scale(self, cfg: Config, ctx: RunContext) -> dict:
        return self._mean(ctx, "log_scale", math.exp)

    @statistic("projected_fraction", "mean over measurements of the median over units of the squared norm's "
                                     "fraction the projections remove, ((1/m)⟨1,g⟩² + (1/m)⟨g,ŷ⟩²)/‖g‖²")
    def projected_fraction(self, cfg: Config, ctx: RunContext) -> dict:
        return self._mean(ctx, "projected_fraction")

    def checks(self, cfg: Config, ctx: RunContext) -> list:
        excess = [v for net in NETS for s in ctx.seeds for v in ctx.series("bound_excess", net.name, s)[1]]
        worst = max(excess) if excess else math.nan
        return [Check("bound_holds", "‖dx‖² ≤ (γ²/σ²)(‖g‖² − (1/m)⟨1,g⟩² − (1/m)⟨g,ŷ⟩²) at every unit and measurement "
                      "(the closed form gives it with equality at ε = 0; float32 gradients, relative slack 1e-5)",
                      bool(excess) and worst <= 1e-5, f"largest relative excess {worst:.2g}")]

    def measured(self, cfg: Config, ctx: RunContext, parts: list) -> str:
        from ..verdict import fmt
        viol = self._mean(ctx, "printed_violations")
        ratio, scale, proj = self.gradient_ratio(cfg, ctx), self.scale(cfg, ctx), self.projected_fraction(cfg, ctx)
        return "; ".join(
            f"{net.label}: ‖dx‖²/‖g‖² {fmt(ratio[net.name])} = γ²/σ² {fmt(scale[net.name])} × (1 − projected "
            f"{fmt(proj[net.name])}) in medians; the bound as printed (1/√m) is violated at {fmt(viol[net.name])} "
            f"of units" for net in NETS) + "."

    def figures(self, cfg: Config, ctx: RunContext) -> list:
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
        for net, color in zip(NETS, COLORS):
            for ax, metric, tr in ((axes[0], "log_gradient_ratio", math.exp), (axes[1], "log_scale", math.exp),
                                   (axes[2], "projected_fraction", lambda v: v)):
                curves = [(s, [tr(v) for v in vals]) for s, vals in (ctx.series(metric, net.name, sd) for sd in ctx.seeds)]
                mean_band(ax, curves, net.label, color, log=metric != "projected_fraction")
        for ax in axes[:2]:
            ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        axes[0].set(title="‖∂L/∂x‖² / ‖∂L/∂z‖² (median over units)", xlabel="step", ylabel="ratio (log)")
        axes[1].set(title="γ²/σ² (median over units)", xlabel="step", ylabel="ratio (log)")
        axes[2].set(title="fraction removed by the projections", xlabel="step", ylabel="fraction")
        axes[0].legend(fontsize=8)
        return [save(fig, ctx.path("theorem41.png"))]
