"""E9 — ℓp normalization (Santurkar et al. 2018, §3.3, Fig. 5): normalizing by the average ℓp norm
(p = 1, 2, ∞; bnlab.LpNorm1d) trains comparably to BN although layer-input distributions shift
more, and the landscape stays smooth. Same network as E8 (the CPU analog of their VGG)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...probes import Landscape
from ..config import BaseConfig
from ..measure import DriftEval, ProbedTrainer
from ..models import build_mlp
from ...plotting import COLORS, mean_band, plt, save
from ..registry import Experiment, register
from ..verdict import Verdict, all_seeds, combine, fmt

ARMS = ("none", "bn", "lp1", "lp2", "lpinf")
LP = ("lp1", "lp2", "lpinf")
LABEL = {"none": "standard", "bn": "BN", "lp1": "ℓ1", "lp2": "ℓ2", "lpinf": "ℓ∞"}


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
    comparable: float = 0.02         # "comparable to BN": within 2 accuracy points
    seeds: int = 3


def _max(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


@register
class E9(Experiment):
    id = "E9"
    order = 9
    title = "Santurkar Fig. 5: ℓp normalization trains like BN without stabilizing distributions"
    claim = ("Normalizing by the average ℓ1, ℓ2 or ℓ∞ norm — which leaves layer-input distributions "
             "shifting more than BN's — trains about as well as BN, and its loss landscape is smoother "
             "than the unnormalized network's.")
    paper = ("Santurkar et al. 2018, Fig. 5 (VGG, CIFAR-10): ℓ1, ℓ2 and ℓ∞ normalizations reach "
             "accuracy comparable to BN; their layer-input distributions are less stable (\"larger "
             "distributional shift\"); App. Fig. 12: the landscape is smoother, as with BN. Details of "
             "the normalization are left open (bnlab's choices: bnlab.variants.lp).")
    source = "Santurkar, Tsipras, Ilyas, Madry 2018 (arXiv:1805.11604), §3.3, Fig. 5"
    Config = Config
    profiles = {
        "quick": dict(steps=1200, eval_every=200, seeds=2),
        "tiny": dict(steps=20, eval_every=10, seeds=1, probe_examples=200, checkpoint_every=15),
    }

    def run(self, cfg: Config, ctx) -> None:
        probe = ctx.data.test_x[:cfg.probe_examples]
        for arm in ARMS:
            spec = dict(kind="mlp", widths=list(cfg.widths), activation=cfg.activation, norm=arm, init=cfg.init)
            for seed in ctx.seeds:
                ctx.log(f"{LABEL[arm]} seed {seed}: {cfg.steps} steps")
                ctx.run_unit(f"{arm}-s{seed}", lambda spec=dict(spec, init_seed=seed), seed=seed, arm=arm:
                             ProbedTrainer(build_mlp(spec, 1), ctx.data, [seed], arm, cfg.batch, cfg.lr,
                                           probes=[Landscape()], probe_every=cfg.eval_every,
                                           extra_eval=DriftEval(probe)),
                             cfg.steps, eval_steps=DriftEval.schedule(cfg.eval_every, cfg.steps))

    def analyze(self, cfg: Config, ctx) -> Verdict:
        acc = {a: ctx.final("test_acc", a) for a in ARMS}
        # the whole shift: ℓp centers each feature exactly as BN does, so location alone could not
        # tell them apart — the scale (|Δ log σ²|) is what ℓp leaves free
        drift = {a: ctx.seed_means("drift", a) for a in ARMS}
        logvar = {a: ctx.seed_means("drift_logvar", a) for a in ARMS}
        band = {a: [_max([h - l for l, h in zip(ctx.series("loss_min@*", a, s)[1], ctx.series("loss_max@*", a, s)[1])])
                    for s in ctx.seeds] for a in ARMS}
        pred = {a: [_max(ctx.series("grad_pred@*", a, s)[1]) for s in ctx.seeds] for a in ARMS}
        comparable = all_seeds(acc[p][i] >= acc["bn"][i] - cfg.comparable for p in LP for i in range(len(ctx.seeds)))
        shifts_more = all_seeds(drift[p][i] > drift["bn"][i] for p in LP for i in range(len(ctx.seeds)))
        smooth = all_seeds(band[p][i] < band["none"][i] and pred[p][i] < pred["none"][i]
                           for p in LP for i in range(len(ctx.seeds)))
        verdict = combine(comparable, shifts_more, smooth)
        measured = ("final test accuracy: " + ", ".join(f"{LABEL[a]} {fmt(acc[a])}" for a in ARMS) +
                    ". Layer-input shift per step (|Δμ|/σ + |Δ log σ²|): " + ", ".join(f"{LABEL[a]} {fmt(drift[a])}" for a in ARMS) +
                    ". Peak loss band along −ηg: " + ", ".join(f"{LABEL[a]} {fmt(band[a])}" for a in ARMS) +
                    "; peak gradient predictiveness: " + ", ".join(f"{LABEL[a]} {fmt(pred[a])}" for a in ARMS) + ".")
        criterion = (f"supported if, for every seed and p, ℓp's accuracy is within {cfg.comparable:g} of BN's "
                     f"({comparable}), its layer inputs shift more per step than BN's ({shifts_more}), and its "
                     f"peak loss band and peak gradient predictiveness are below the standard network's "
                     f"({smooth}).")
        return Verdict(self.id, self.claim, self.paper, measured, criterion, verdict,
                       numbers=dict(test_acc=acc, drift=drift, drift_logvar=logvar, peak_loss_band=band, peak_grad_pred=pred,
                                    comparable_to_bn=comparable, shifts_more_than_bn=shifts_more,
                                    smoother_than_standard=smooth),
                       figures=[self._figure(cfg, ctx)])

    def _figure(self, cfg, ctx) -> str:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        for arm, color in zip(ARMS, COLORS):
            mean_band(axes[0], [ctx.series("test_acc", arm, s) for s in ctx.seeds], LABEL[arm], color)
            mean_band(axes[1], [ctx.series("drift", arm, s) for s in ctx.seeds], LABEL[arm], color, log=True)
            mean_band(axes[2], [ctx.series("grad_pred@*", arm, s) for s in ctx.seeds], LABEL[arm], color, log=True)
        axes[0].set(title="test accuracy", xlabel="step")
        axes[1].set(title="layer-input shift per step (|Δμ|/σ + |Δ log σ²|)", xlabel="step")
        axes[2].set(title="gradient predictiveness", xlabel="step")
        axes[0].legend()
        return save(fig, ctx.path("lp_normalization.png"))
