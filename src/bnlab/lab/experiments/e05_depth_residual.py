"""E5 — Depth: plain vs residual (He et al. 2015). CPU plan: deep ReLU MLPs on MNIST, plain vs
identity shortcuts, shallow vs deep, with and without BN; the main metric is the training loss
at a fixed budget (degradation is a *training* phenomenon)."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass

import torch

from ..config import BaseConfig
from ..models import build_mlp
from ...plotting import COLORS, mean_band, plt, save
from ..registry import Experiment, register
from ..trainers import ClassifierTrainer
from ..verdict import Verdict, all_seeds, combine, fmt


@dataclass
class Config(BaseConfig):
    steps: int = 8000
    batch: int = 128                 # He et al.: batch 128, SGD momentum 0.9, weight decay 1e-4
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    width: int = 64
    shallow: int = 4                 # hidden blocks after the input layer
    deep: int = 20
    eval_every: int = 500
    train_eval_examples: int = 10_000  # training error is measured on this many training images
    healthy_ratio: float = 0.1       # first/last hidden ‖∂L/∂W‖ above this = not vanishing
    seeds: int = 3


ARMS = [(f"{kind}-{'bn' if bn else 'plain'}-{depth}", kind, bn, depth)
        for kind, bn, depth in itertools.product(("plain", "residual"), (True, False), ("shallow", "deep"))]


def _spec(cfg: Config, kind: str, bn: bool, depth: str) -> dict:
    n = cfg.shallow if depth == "shallow" else cfg.deep
    return dict(kind="mlp", widths=[784] + [cfg.width] * (n + 1) + [10], activation="relu", init="he",
                norm="bn" if bn else "none", residual_from=1 if kind == "residual" else None)


class _GradRatio:
    """loss_hook: per seed, ‖∂L/∂W‖ of the first hidden layer over the last hidden layer."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def __call__(self, trainer: ClassifierTrainer, loss) -> None:
        blocks = trainer.model.blocks
        first = blocks[0].linear.weight.grad.flatten(1).norm(dim=1)                 # S
        last = blocks[-1].linear.weight.grad.flatten(1).norm(dim=1)
        self.values.append((first / last.clamp_min(1e-30)).detach())

    def extra(self, cfg: Config):
        def extra(trainer: ClassifierTrainer, step: int):
            if self.values:
                med = torch.stack(self.values).median(0).values
                for i, seed in enumerate(trainer.seeds):
                    yield seed, "grad_ratio_first_last", med[i].item()
            self.values.clear()
            from ..trainers import accuracy_per_seed
            n = cfg.train_eval_examples
            acc = accuracy_per_seed(trainer.model, trainer.data.train_x[:n], trainer.data.train_y[:n])
            for i, seed in enumerate(trainer.seeds):
                yield seed, "train_error", 1 - acc[i].item()
        return extra


@register
class E5(Experiment):
    id = "E5"
    order = 5
    title = "He et al.: plain nets degrade with depth even with BN; residual nets do not"
    claim = ("A deeper plain network with BN reaches a higher training loss than a shallower one "
             "(degradation), identity shortcuts at the same depth remove it, and the deep plain BN "
             "network's gradients do not vanish — degradation is not a vanishing-gradient problem.")
    paper = ("He et al. 2015, CIFAR-10 [F]: plain-20 ≈ 9.7% vs plain-56 ≈ 13.3% test error (training "
             "error also higher for 56), although both use BN; ResNet-20/56: 8.75/6.97%. \"We argue "
             "that this optimization difficulty is unlikely to be caused by vanishing gradients … "
             "trained with BN … ensures forward propagated signals to have non-zero variances\".")
    source = "He et al. 2015 (arXiv:1512.03385), §4.1, Fig. 6 and Table 6"
    Config = Config
    profiles = {
        "quick": dict(steps=1500, eval_every=250, seeds=2, deep=16, train_eval_examples=5000),
        "tiny": dict(steps=30, eval_every=15, seeds=2, width=16, shallow=2, deep=5, batch=32,
                     train_eval_examples=500, checkpoint_every=20),
    }

    def run(self, cfg: Config, ctx) -> None:
        for name, kind, bn, depth in ARMS:
            ctx.log(f"{name}: {cfg.seeds} seeds, {cfg.steps} steps")
            hook = _GradRatio()
            ctx.run_unit(name, lambda kind=kind, bn=bn, depth=depth, hook=hook, name=name: ClassifierTrainer(
                build_mlp(_spec(cfg, kind, bn, depth), cfg.seeds), ctx.data, ctx.seeds, name, cfg.batch,
                cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, extra_eval=hook.extra(cfg),
                loss_hook=hook),
                cfg.steps, eval_steps=range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))

    def analyze(self, cfg: Config, ctx) -> Verdict:
        names = [a[0] for a in ARMS]
        loss = {a: ctx.final("train_loss", a) for a in names}
        terr = {a: ctx.final("train_error", a) for a in names}
        test = {a: [1 - v for v in ctx.final("test_acc", a)] for a in names}
        ratio = {a: [statistics.median(ctx.series("grad_ratio_first_last", a, s)[1]) for s in ctx.seeds]
                 for a in names}
        degrade = all_seeds(d > s for d, s in zip(loss["plain-bn-deep"], loss["plain-bn-shallow"]))
        fixed = all_seeds(r < p for r, p in zip(loss["residual-bn-deep"], loss["plain-bn-deep"]))
        healthy = all_seeds(r >= cfg.healthy_ratio for r in ratio["plain-bn-deep"])
        verdict = combine(degrade, fixed, healthy)
        measured = (f"final training loss — plain+BN: {fmt(loss['plain-bn-shallow'])} ({cfg.shallow} blocks) vs "
                    f"{fmt(loss['plain-bn-deep'])} ({cfg.deep} blocks); residual+BN: "
                    f"{fmt(loss['residual-bn-shallow'])} vs {fmt(loss['residual-bn-deep'])}; without BN "
                    f"plain {fmt(loss['plain-plain-shallow'])} vs {fmt(loss['plain-plain-deep'])}, residual "
                    f"{fmt(loss['residual-plain-shallow'])} vs {fmt(loss['residual-plain-deep'])}. Training "
                    f"error plain+BN {fmt(terr['plain-bn-shallow'])} vs {fmt(terr['plain-bn-deep'])}. First/last "
                    f"hidden ‖∂L/∂W‖ in the deep plain+BN net: {fmt(ratio['plain-bn-deep'])} (without BN "
                    f"{fmt(ratio['plain-plain-deep'])}).")
        criterion = (f"supported if, for every seed, the deep plain+BN net ends with a higher training loss "
                     f"than the shallow one (degradation: {degrade}), the deep residual+BN net with a lower "
                     f"one than the deep plain+BN net (shortcuts fix it: {fixed}), and the deep plain+BN "
                     f"gradient ratio is ≥ {cfg.healthy_ratio} (not vanishing: {healthy}). A scaled-down "
                     f"MLP may not degrade; then this says so.")
        return Verdict(self.id, self.claim, self.paper, measured, criterion, verdict,
                       numbers=dict(final_train_loss=loss, final_train_error=terr, final_test_error=test,
                                    grad_ratio_first_last=ratio, degradation=degrade,
                                    residual_fixes=fixed, gradients_healthy=healthy),
                       figures=[self._figure(cfg, ctx)])

    def _figure(self, cfg, ctx) -> str:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        for ax, bn in zip(axes, (True, False)):
            for i, (name, kind, b, depth) in enumerate(a for a in ARMS if a[2] == bn):
                curves = [ctx.series("train_loss", name, s) for s in ctx.seeds]
                mean_band(ax, curves, f"{kind}, {cfg.shallow if depth == 'shallow' else cfg.deep} blocks",
                          COLORS[i], log=True)
            ax.set(title=f"training loss, {'with' if bn else 'without'} BN", xlabel="step")
            ax.legend(fontsize=8)
        return save(fig, ctx.path("depth_training_loss.png"))
