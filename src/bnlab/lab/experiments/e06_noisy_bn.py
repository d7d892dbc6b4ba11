"""E6 — Noisy BN (Santurkar et al. 2018, Fig. 2): BN followed by non-stationary noise — more
"internal covariate shift" than without BN — still trains like BN, while the same noise without
BN hurts training. E1's network and schedule."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import BaseConfig
from ..measure import DriftEval
from ..models import build_mlp
from ...plotting import COLORS, mean_band, plt, save
from ..registry import Experiment, register
from ..trainers import make_trainer
from ..verdict import Verdict, all_seeds, combine, fmt

ARMS = ("none", "noise_only", "bn", "noisy_bn")
LABEL = {"none": "standard", "noise_only": "standard + noise", "bn": "BN", "noisy_bn": "BN + noise"}


@dataclass
class Config(BaseConfig):
    steps: int = 20_000
    batch: int = 60
    lr: float = 0.1
    widths: tuple[int, ...] = (784, 100, 100, 100, 10)
    eval_every: int = 1000
    probe_examples: int = 1000
    comparable: float = 0.02         # "about as well as BN": within 2 accuracy points
    seeds: int = 3


def _spec(cfg: Config, arm: str) -> dict:
    return dict(kind="mlp", widths=list(cfg.widths), activation="sigmoid", norm=arm, init="normal",
                init_std=0.1, drop_bias=arm in ("bn", "noisy_bn"))


@register
class E6(Experiment):
    id = "E6"
    order = 6
    title = "Santurkar Fig. 2: noisy BN trains like BN although its layer inputs shift more"
    claim = ("BN followed by non-stationary noise — layer-input distributions that shift more than "
             "without BN — trains about as well as BN and better than the standard network, while the "
             "same noise added to the standard network hurts its training.")
    paper = ("Santurkar et al. 2018, Fig. 2 (VGG, CIFAR-10): noisy BN's training curve is close to "
             "BN's and above the standard network's, despite visibly unstable layer-input "
             "distributions; the noise makes the standard network train markedly worse (App. Fig. 8).")
    source = "Santurkar, Tsipras, Ilyas, Madry 2018 (arXiv:1805.11604), §2.1, Fig. 2, App. Alg. 1"
    Config = Config
    profiles = {
        "quick": dict(steps=3000, eval_every=300),
        "tiny": dict(steps=40, eval_every=10, seeds=2, probe_examples=200, checkpoint_every=25),
    }

    def run(self, cfg: Config, ctx) -> None:
        probe = ctx.data.test_x[:cfg.probe_examples]
        for arm in ARMS:
            ctx.log(f"training {LABEL[arm]}: {cfg.seeds} seeds, {cfg.steps} steps")
            ctx.run_unit(arm, lambda arm=arm: make_trainer(
                build_mlp(_spec(cfg, arm), cfg.seeds), ctx.data, ctx.seeds, arm, cfg.batch, cfg.lr,
                extra_eval=DriftEval(probe)),
                cfg.steps, eval_steps=DriftEval.schedule(cfg.eval_every, cfg.steps))

    def analyze(self, cfg: Config, ctx) -> Verdict:
        acc = {a: ctx.final("test_acc", a) for a in ARMS}
        drift = {a: ctx.seed_means("drift", a) for a in ARMS}
        mean_part = {a: ctx.seed_means("drift_mean", a) for a in ARMS}
        logvar = {a: ctx.seed_means("drift_logvar", a) for a in ARMS}
        like_bn = all_seeds(n >= b - cfg.comparable for n, b in zip(acc["noisy_bn"], acc["bn"]))
        beats_standard = all_seeds(n > s for n, s in zip(acc["noisy_bn"], acc["none"]))
        noise_hurts = all_seeds(n < s for n, s in zip(acc["noise_only"], acc["none"]))
        more_shift = all_seeds(n > s for n, s in zip(drift["noisy_bn"], drift["none"]))
        verdict = combine(like_bn, beats_standard, noise_hurts, more_shift)
        measured = ("final test accuracy: " + ", ".join(f"{LABEL[a]} {fmt(acc[a])}" for a in ARMS) +
                    ". Layer-input shift in one training step (|Δμ|/σ + |Δ log σ²|, averaged over "
                    "units and layers): " + ", ".join(f"{LABEL[a]} {fmt(drift[a])}" for a in ARMS) + ".")
        criterion = (f"supported if, for every seed, BN+noise is within {cfg.comparable:g} of BN's accuracy "
                     f"({like_bn}) and above the standard network's ({beats_standard}), the noise lowers "
                     f"the standard network's accuracy ({noise_hurts}), and BN+noise's layer inputs shift "
                     f"more than the standard network's ({more_shift}).")
        return Verdict(self.id, self.claim, self.paper, measured, criterion, verdict,
                       numbers=dict(test_acc=acc, drift=drift, drift_mean=mean_part, drift_logvar=logvar,
                                    noisy_like_bn=like_bn, noisy_beats_standard=beats_standard,
                                    noise_hurts_standard=noise_hurts, noisy_shifts_more=more_shift),
                       figures=[self._figure(cfg, ctx)])

    def _figure(self, cfg, ctx) -> str:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        for arm, color in zip(ARMS, COLORS):
            mean_band(axes[0], [ctx.series("test_acc", arm, s) for s in ctx.seeds], LABEL[arm], color)
            mean_band(axes[1], [ctx.series("drift", arm, s) for s in ctx.seeds], LABEL[arm], color, log=True)
        axes[0].set(title="test accuracy", xlabel="step")
        axes[1].set(title="layer-input shift in one step (|Δμ|/σ + |Δ log σ²|)", xlabel="step")
        axes[0].legend()
        return save(fig, ctx.path("noisy_bn.png"))
