"""E7 — Internal covariate shift measured on gradients (Santurkar et al. 2018, Def. 2.1, Fig. 3):
‖G − G′‖ and cos(G, G′) per layer through training, with and without BN, on the MNIST MLP and
on the 25-layer deep linear network (DLN)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from ...batchnorm import BatchNorm1d
from ...probes import ICS, Monitor
from ..config import BaseConfig
from ..measure import ProbedTrainer
from ..models import build_mlp
from ...plotting import COLORS, plt, save
from ..registry import Experiment, register
from ..verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Verdict, all_seeds, combine, fmt


@dataclass
class Config(BaseConfig):
    # MNIST MLP (E1's network)
    mlp_steps: int = 10_000
    batch: int = 60
    lr: float = 0.1
    widths: tuple[int, ...] = (784, 100, 100, 100, 10)
    mlp_probe_every: int = 250
    # deep linear network (Santurkar §2.2)
    dln_steps: int = 10_000
    dln_depth: int = 25
    dln_dim: int = 10
    dln_samples: int = 1000
    dln_lrs: tuple[float, ...] = (1e-6, 1e-7)
    dln_probe_every: int = 500
    reduced_factor: float = 0.5      # BN "reduces" ICS if its median relative ICS is below this × no-BN's
    seeds: int = 3


class DLNTrainer:
    """Full-batch gradient descent on L = ‖W_L⋯W_1 X − A X‖²_F = Σ_i ‖W_L⋯W_1 x_i − A x_i‖²
    (the paper's loss read literally over the batch of n = 1,000 samples) with an ICS probe.

    The scale matters: at lr 1e-6 this sum makes plain gradient descent oscillate in the top
    layers (cos(G, G′) < 0 there) — a regime the paper's lr 1e-7 curve avoids; averaging over the
    samples instead would shrink both learning rates 1,000× and leave every G′ ≈ G.
    """

    def __init__(self, cfg: Config, seed: int, bn: bool, lr: float, arm: str) -> None:
        g = torch.Generator().manual_seed(1000 + seed)
        d = cfg.dln_dim
        self.A = torch.randn(d, d, generator=g)
        self.X = torch.randn(cfg.dln_samples, d, generator=g)
        self.Y = self.X @ self.A.t()
        layers: list[nn.Module] = []
        bound = math.sqrt(6.0 / (d + d))                              # Glorot uniform
        for _ in range(cfg.dln_depth):
            lin = nn.Linear(d, d, bias=False)
            with torch.no_grad():
                lin.weight.copy_((torch.rand(d, d, generator=g) * 2 - 1) * bound)
            layers.append(lin)
            if bn:
                layers.append(BatchNorm1d(d))
        self.model = nn.Sequential(*layers)
        self.loss_fn = lambda out, y: (out - y).square().sum()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.monitor = Monitor(self.model, self.loss_fn, self.opt, probes=[ICS()],
                               every=cfg.dln_probe_every, start_step=1)
        self.seed, self.arm = seed, arm
        self.records: list[dict] = []
        self.loss = float("nan")

    def train_step(self, step: int) -> None:
        loss = self.loss_fn(self.model(self.X), self.Y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.records.extend(self.monitor.observe(step, self.X, self.Y))
        self.opt.step()
        self.loss = loss.item()

    def evaluate(self, step: int):
        yield self.seed, self.arm, "loss", self.loss
        for r in self.records:
            if r["step"] == step:
                yield self.seed, self.arm, f"{r['metric']}@{r['layer']}", r["value"]
        self.records = [r for r in self.records if r["step"] > step]

    def state_dict(self) -> dict:
        return dict(model=self.model.state_dict(), opt=self.opt.state_dict())

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])


def _summary(ctx, arm: str, seed: int) -> tuple[float, float]:
    """Median over layers and measurements of cos(G, G′) and of ‖G − G′‖."""
    cos = [r["value"] for r in ctx.rows if r["arm"] == arm and r["seed"] == seed
           and r["metric"].startswith("ics_cos@") and math.isfinite(r["value"])]
    l2 = [r["value"] for r in ctx.rows if r["arm"] == arm and r["seed"] == seed
          and r["metric"].startswith("ics_l2@") and math.isfinite(r["value"])]
    return (statistics.median(cos) if cos else float("nan"), statistics.median(l2) if l2 else float("nan"))


@register
class E7(Experiment):
    id = "E7"
    order = 7
    title = "Santurkar Fig. 3: BN does not reduce internal covariate shift measured on gradients"
    claim = ("Measured as the change of a layer's gradient caused by the update of the layers before it "
             "(Santurkar Def. 2.1), internal covariate shift is not reduced by BN: in the MNIST MLP it "
             "is similar or larger with BN, and in the deep linear network the gradient changes more "
             "with BN — G and G′ are less correlated than without.")
    paper = ("Santurkar et al. 2018, Fig. 3: with BN, ‖G − G′‖ is similar or larger and cos(G, G′) "
             "similar or smaller than without (VGG); in the 25-layer DLN (lr 1e-6, 1e-7) cos(G, G′) "
             "stays near 1 without BN and near 0 with BN: \"BatchNorm might not even be reducing "
             "internal covariate shift\".")
    source = "Santurkar, Tsipras, Ilyas, Madry 2018 (arXiv:1805.11604), §2.2, Def. 2.1, Fig. 3"
    Config = Config
    profiles = {
        "quick": dict(mlp_steps=1500, mlp_probe_every=250, dln_steps=2000, dln_probe_every=250, seeds=2),
        "tiny": dict(mlp_steps=20, mlp_probe_every=10, dln_steps=20, dln_probe_every=10, dln_depth=5,
                     dln_samples=50, dln_lrs=(1e-6,), seeds=2, checkpoint_every=15),
    }

    def run(self, cfg: Config, ctx) -> None:
        for bn in (False, True):
            arm = "mlp-bn" if bn else "mlp-plain"
            spec = dict(kind="mlp", widths=list(cfg.widths), activation="sigmoid",
                        norm="bn" if bn else "none", init="normal", init_std=0.1)
            for seed in ctx.seeds:
                ctx.log(f"{arm} seed {seed}: {cfg.mlp_steps} steps, ICS every {cfg.mlp_probe_every}")
                ctx.run_unit(f"{arm}-s{seed}", lambda spec=dict(spec, init_seed=seed), seed=seed, arm=arm:
                             ProbedTrainer(build_mlp(spec, 1), ctx.data, [seed], arm, cfg.batch, cfg.lr,
                                           probes=[ICS()], probe_every=cfg.mlp_probe_every),
                             cfg.mlp_steps, eval_steps=range(cfg.mlp_probe_every, cfg.mlp_steps + 1,
                                                             cfg.mlp_probe_every))
        for lr in cfg.dln_lrs:
            for bn in (False, True):
                arm = f"dln-{'bn' if bn else 'plain'}-lr{lr:g}"
                for seed in ctx.seeds:
                    ctx.log(f"{arm} seed {seed}: {cfg.dln_steps} GD steps")
                    ctx.run_unit(f"{arm}-s{seed}", lambda seed=seed, bn=bn, lr=lr, arm=arm:
                                 DLNTrainer(cfg, seed, bn, lr, arm), cfg.dln_steps,
                                 eval_steps=range(cfg.dln_probe_every, cfg.dln_steps + 1, cfg.dln_probe_every))

    def analyze(self, cfg: Config, ctx) -> Verdict:
        arms = sorted({r["arm"] for r in ctx.rows})
        cos = {a: [_summary(ctx, a, s)[0] for s in ctx.seeds] for a in arms}
        l2 = {a: [_summary(ctx, a, s)[1] for s in ctx.seeds] for a in arms}
        rel = {a: [self._relative(ctx, a, s) for s in ctx.seeds] for a in arms}
        # (A) MNIST MLP: BN does not reduce ICS (relative size of the gradient change)
        bn_rel, plain_rel = rel["mlp-bn"], rel["mlp-plain"]
        reduced = [b < cfg.reduced_factor * p for b, p in zip(bn_rel, plain_rel)]
        part_a = SUPPORTED if not any(reduced) else NOT_SUPPORTED if all(reduced) else INCONCLUSIVE
        # (B) DLN: with BN the gradient changes more (relative change ≥, cos ≤ the plain network's)
        parts_b = []
        for lr in cfg.dln_lrs:
            bn_arm, plain_arm = f"dln-bn-lr{lr:g}", f"dln-plain-lr{lr:g}"
            parts_b.append(all_seeds(rb >= rp and cb <= cp for rb, rp, cb, cp in
                                     zip(rel[bn_arm], rel[plain_arm], cos[bn_arm], cos[plain_arm])))
        verdict = combine(part_a, *parts_b)
        measured = (f"MNIST MLP, median over layers and training of ‖G − G′‖/‖G‖: {fmt(bn_rel)} with BN vs "
                    f"{fmt(plain_rel)} without; cos(G, G′): {fmt(cos['mlp-bn'])} vs {fmt(cos['mlp-plain'])}. "
                    + " ".join(f"DLN lr {lr:g}: cos(G, G′) {fmt(cos[f'dln-bn-lr{lr:g}'])} with BN vs "
                               f"{fmt(cos[f'dln-plain-lr{lr:g}'])} without; ‖G − G′‖/‖G‖ "
                               f"{fmt(rel[f'dln-bn-lr{lr:g}'])} vs {fmt(rel[f'dln-plain-lr{lr:g}'])}."
                               for lr in cfg.dln_lrs))
        criterion = (f"supported if BN's relative gradient change in the MLP is not below "
                     f"{cfg.reduced_factor}× the plain network's for any seed (not reduced: {part_a}; "
                     f"not supported if below for every seed), and in the DLN, for every seed, at each "
                     f"learning rate ({', '.join(f'{lr:g}' for lr in cfg.dln_lrs)}), BN's median relative "
                     f"change is ≥ and its median cos(G, G′) ≤ the plain network's ({', '.join(parts_b)}).")
        return Verdict(self.id, self.claim, self.paper, measured, criterion, verdict,
                       numbers=dict(median_cos=cos, median_l2=l2, median_relative=rel,
                                    mlp_not_reduced=part_a, dln_changes_more_with_bn=parts_b),
                       figures=[self._figure(cfg, ctx, arms)])

    @staticmethod
    def _relative(ctx, arm: str, seed: int) -> float:
        """Median over layers and measurements of ‖G − G′‖/‖G‖ (the probe's ics_rel)."""
        vals = [r["value"] for r in ctx.rows if r["arm"] == arm and r["seed"] == seed
                and r["metric"].startswith("ics_rel@") and math.isfinite(r["value"])]
        return statistics.median(vals) if vals else float("nan")

    def _figure(self, cfg, ctx, arms) -> str:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        for ax, prefix in zip(axes, ("mlp", "dln")):
            shown = [a for a in arms if a.startswith(prefix)]
            for i, a in enumerate(shown):
                seed = ctx.seeds[0]
                layers = sorted({r["metric"] for r in ctx.rows if r["arm"] == a and r["metric"].startswith("ics_cos@")})
                for j, m in enumerate(layers):
                    steps, vals = ctx.series(m, a, seed)
                    ax.plot(steps, vals, color=COLORS[i % len(COLORS)], alpha=0.35 + 0.65 * j / max(1, len(layers) - 1),
                            lw=1, label=a if j == len(layers) - 1 else None)
            ax.set(title=f"cos(G, G′) per layer ({'MNIST MLP' if prefix == 'mlp' else 'deep linear network'})",
                   xlabel="step", ylim=(-1.05, 1.05))
            ax.legend(fontsize=7)
        return save(fig, ctx.path("ics_cosine.png"))
