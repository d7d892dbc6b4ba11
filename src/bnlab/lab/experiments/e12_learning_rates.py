"""E12 — BN tolerates higher learning rates and careless initialization (Ioffe & Szegedy 2015, §3.3,
§4.2; Santurkar et al. 2018, Fig. 1): a declared grid of learning rates × initial weight scales for
E1's network, sigmoid and ReLU, with and without BN. In which cells does the network train?"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...plotting import plt, save
from ..config import BaseConfig, Range
from ..criteria import Criterion, statistic
from ..models import build_mlp
from ..registry import Arm, Experiment, register
from ..runner import RunContext
from ..trainers import make_trainer

NETS = tuple(Arm(f"{act}-{'bn' if bn else 'plain'}", f"{act}, {'with' if bn else 'without'} BN",
                 dict(activation=act, bn=bn)) for act in ("sigmoid", "relu") for bn in (False, True))


@dataclass
class Config(BaseConfig):
    steps: int = 3000                # per cell
    batch: int = 60
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    init_scales: tuple[float, ...] = (0.01, 0.1, 1.0)      # weights N(0, scale²)
    widths: tuple[int, ...] = (784, 100, 100, 100, 10)
    trains_at: float = 0.9           # a cell "trains" if its final test accuracy reaches this
    seeds: int = 5

    RANGES = {**BaseConfig.RANGES, "lrs": Range(0, 1000, lo_open=True), "init_scales": Range(0, 100, lo_open=True),
              "trains_at": Range(0, 1)}


def _cell(arm: Arm, lr: float, scale: float) -> str:
    return f"{arm.name}-lr{lr:g}-s{scale:g}"


@register
class E12(Experiment):
    id = "E12"
    order = 12
    title = "Ioffe §3.3: BN trains over a larger range of learning rates and initial scales"
    claim = ("Over a grid of learning rates and initial weight scales, the region in which the network trains "
             "is larger with BN than without, and contains the region without BN — for sigmoid and for ReLU "
             "units.")
    paper = ("Ioffe & Szegedy 2015: \"Batch Normalization enables higher learning rates\" (§3.3) and lets one "
             "be \"less careful about initialization\" (abstract); BN-x5/BN-x30 Inception train at 5× and 30× "
             "the learning rate, where the original model's parameters \"reach machine infinity\" (§4.2). "
             "Santurkar et al. 2018, Fig. 1 [F]: VGG at lr 0.5 fails without BN (≈10%) and trains with it.")
    source = "Ioffe & Szegedy 2015 (arXiv:1502.03167), §3.3, §4.2; Santurkar et al. 2018 (arXiv:1805.11604), Fig. 1"
    departures = ("E1's 784-100-100-100-10 network on MNIST, plain SGD, 3,000 steps per cell, weights N(0, s²) "
                  "with s ∈ {0.01, 0.1, 1} and learning rates 0.01 … 10 (log-spaced). A cell 'trains' when its "
                  "final test accuracy reaches 0.9; a diverged cell (non-finite loss) does not train. The "
                  "region's size is counted in cells.")
    Config = Config
    profiles = {
        "quick": dict(steps=600, seeds=3),
        "tiny": dict(steps=20, seeds=2, lrs=(0.1, 10.0), init_scales=(0.1, 1.0), trains_at=0.2, checkpoint_every=15),
    }
    labels = {a.name: a.label for a in NETS}
    criteria = tuple(
        c for act in ("sigmoid", "relu") for c in (
            Criterion(f"larger_region_{act}", f"with {act} units the BN network trains in more cells of the grid",
                      "region_size", f"{act}-bn", f"{act}-plain"),
            Criterion(f"contains_{act}", f"with {act} units more than 90% of the cells where the network without BN "
                      "trains also train with BN", "containment", f"{act}-bn", reference=0.9),
        ))

    def run(self, cfg: Config, ctx: RunContext) -> None:
        ctx.log(f"{len(NETS)} networks × {len(cfg.lrs)} learning rates × {len(cfg.init_scales)} scales, "
                f"{cfg.seeds} seeds batched, {cfg.steps} steps each")
        for arm in NETS:
            for scale in cfg.init_scales:
                spec = dict(kind="mlp", widths=list(cfg.widths), activation=arm["activation"],
                            norm="bn" if arm["bn"] else "none", init="normal", init_std=scale)
                for lr in cfg.lrs:
                    ctx.run_unit(_cell(arm, lr, scale), lambda spec=spec, lr=lr, name=_cell(arm, lr, scale): make_trainer(
                        build_mlp(spec, cfg.seeds), ctx.data, ctx.seeds, name, cfg.batch, lr), cfg.steps)

    def _trained(self, cfg: Config, ctx: RunContext, arm: Arm) -> np.ndarray:
        """(seeds, scales, lrs) booleans: the cell's final test accuracy reaches trains_at (and its
        training loss stayed finite)."""
        out = np.zeros((len(ctx.seeds), len(cfg.init_scales), len(cfg.lrs)), dtype=bool)
        for i, scale in enumerate(cfg.init_scales):
            for j, lr in enumerate(cfg.lrs):
                acc = ctx.final("test_acc", _cell(arm, lr, scale))
                loss = ctx.final("train_loss", _cell(arm, lr, scale))
                out[:, i, j] = [a >= cfg.trains_at and math.isfinite(l) for a, l in zip(acc, loss)]
        return out

    @statistic("region_size", "number of grid cells whose final test accuracy reaches trains_at")
    def region_size(self, cfg: Config, ctx: RunContext) -> dict:
        return {a.name: [float(v) for v in self._trained(cfg, ctx, a).sum((1, 2))] for a in NETS}

    @statistic("containment", "fraction of the cells where the network without BN trains in which the BN "
                              "network trains too (1 when it trains nowhere)")
    def containment(self, cfg: Config, ctx: RunContext) -> dict:
        out = {}
        for act in ("sigmoid", "relu"):
            bn = self._trained(cfg, ctx, next(a for a in NETS if a.name == f"{act}-bn"))
            plain = self._trained(cfg, ctx, next(a for a in NETS if a.name == f"{act}-plain"))
            both, base = (bn & plain).sum((1, 2)), plain.sum((1, 2))
            out[f"{act}-bn"] = [float(b / p) if p else 1.0 for b, p in zip(both, base)]
        return out

    def measured(self, cfg: Config, ctx: RunContext, parts: list) -> str:
        from ..verdict import fmt
        size = self.region_size(cfg, ctx)
        cells = len(cfg.lrs) * len(cfg.init_scales)
        diverged = {a.name: sum(1 for s in cfg.init_scales for lr in cfg.lrs
                                for l in ctx.final("train_loss", _cell(a, lr, s)) if not math.isfinite(l)) for a in NETS}
        return ("Cells (of " + str(cells) + ") in which the network trains: "
                + ", ".join(f"{a.label} {fmt(size[a.name], 3)}" for a in NETS)
                + "; diverged runs (cells × seeds): " + ", ".join(f"{a.label} {diverged[a.name]}" for a in NETS) + ".")

    def figures(self, cfg: Config, ctx: RunContext) -> list:
        fig, axes = plt.subplots(1, 5, figsize=(18, 3.8), gridspec_kw=dict(width_ratios=[1, 1, 1, 1, 0.05]))
        cax, axes = axes[-1], axes[:-1]
        for ax, arm in zip(axes, NETS):
            acc = np.zeros((len(cfg.init_scales), len(cfg.lrs)))
            for i, scale in enumerate(cfg.init_scales):
                for j, lr in enumerate(cfg.lrs):
                    vals = [v for v in ctx.final("test_acc", _cell(arm, lr, scale)) if v == v]
                    acc[i, j] = np.mean(vals) if vals else np.nan
            im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
            trained = self._trained(cfg, ctx, arm).mean(0)
            for i in range(len(cfg.init_scales)):
                for j in range(len(cfg.lrs)):
                    ax.text(j, i, f"{acc[i, j]:.2f}\n{trained[i, j]:.0%}", ha="center", va="center", fontsize=6,
                            color="w" if acc[i, j] < 0.6 else "k")
            ax.set_xticks(range(len(cfg.lrs)), [f"{v:g}" for v in cfg.lrs], fontsize=7)
            ax.set_yticks(range(len(cfg.init_scales)), [f"{v:g}" for v in cfg.init_scales])
            ax.set(title=arm.label, xlabel="learning rate")
        axes[0].set_ylabel("initial weight scale s (N(0, s²))")
        fig.colorbar(im, cax=cax, label="final test accuracy (mean)")
        fig.suptitle(f"each cell: mean final test accuracy over seeds, and the share of seeds that train "
                     f"(accuracy ≥ {cfg.trains_at:g})", fontsize=9)
        return [save(fig, ctx.path("learning_rate_grid.png"))]
