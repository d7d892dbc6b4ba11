"""EX — <paper, figure>: <the claim in a few words>.   (A template: copy to eNN_name.py.)

A new experiment is one module here, discovered by the registry: nothing else changes (the CLI,
``bnlab reproduce``, ``bnlab criteria`` and the report find it). The steps, in order:

1. Read the paper. Write ``claim`` (the claim as the paper makes it, one sentence), ``paper``
   (what it reports, with numbers; [F] for values read off a figure) and ``departures`` (where a
   CPU-scale version must differ, said beside the result).
2. Declare the arms (typed :class:`Arm` values — never parse a setting back out of a name) and the
   ``Config`` (a dataclass whose defaults are the paper profile; ``profiles`` override them for
   "quick" and "tiny"; ``RANGES`` bound each field's values).
3. Declare the verdict parts as ``criteria`` *before running anything*: each a statistic, the arms
   compared (paired by seed), the direction, the test (difference / noninferiority / equivalence),
   the minimum effect or margin, and α. Properties that hold by construction are ``checks``, not
   parts. Then ``bnlab criteria --lock``.
4. ``run`` trains through ``ctx.run_unit`` (resumable) and records metrics; one ``@statistic``
   method per statistic turns them into ``{arm: [value per seed]}``; ``figures`` draws the PNGs
   (axis labels, error bands over seeds, the paper's reference values where it gives any).
5. Unit-test the analysis with synthetic per-seed numbers that give each verdict (see
   tests/test_lab_verdicts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...plotting import COLORS, mean_band, plt, save
from ..config import BaseConfig
from ..criteria import Check, Criterion, statistic
from ..models import build_mlp
from ..registry import Arm, Experiment
from ..runner import RunContext
from ..trainers import make_trainer

ARMS = (Arm("plain", "without BN", dict(norm="none")), Arm("bn", "with BN", dict(norm="bn")))


@dataclass
class Config(BaseConfig):
    steps: int = 10_000              # the paper's budget, or the CPU one (say which in `departures`)
    batch: int = 60
    lr: float = 0.1
    widths: tuple[int, ...] = (784, 100, 100, 10)
    eval_every: int = 1000
    seeds: int = 5                   # ≥ 5 in the paper profile


# @register                          # uncomment in a real experiment
class EX(Experiment):
    id = "EX"
    order = 99
    title = "<paper, figure>: <the claim in a few words>"
    claim = "<the claim as the paper makes it>"
    paper = "<what the paper reports, with numbers>"
    source = "<authors year (arXiv id), section, figure>"
    departures = "<how this CPU-scale design differs from the paper's>"
    Config = Config
    profiles = {"quick": dict(steps=2000, seeds=3), "tiny": dict(steps=20, eval_every=10, seeds=2)}
    labels = {a.name: a.label for a in ARMS}
    criteria = (
        Criterion("better", "BN ends with the higher test accuracy", "acc_final", "bn", "plain", margin=0.01),
    )

    def run(self, cfg: Config, ctx: RunContext) -> None:
        for arm in ARMS:
            spec = dict(kind="mlp", widths=list(cfg.widths), activation="sigmoid", norm=arm["norm"])
            ctx.run_unit(arm.name, lambda spec=spec, arm=arm: make_trainer(
                build_mlp(spec, cfg.seeds), ctx.data, ctx.seeds, arm.name, cfg.batch, cfg.lr),
                cfg.steps, eval_steps=range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))

    @statistic("acc_final", "test accuracy at the last step")
    def acc_final(self, cfg: Config, ctx: RunContext) -> dict:
        return {a.name: ctx.final("test_acc", a.name) for a in ARMS}

    def checks(self, cfg: Config, ctx: RunContext) -> list:
        return [Check("finite", "every arm's final accuracy is finite", all(
            v == v for a in ARMS for v in ctx.final("test_acc", a.name)))]

    def figures(self, cfg: Config, ctx: RunContext) -> list:
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, color in zip(ARMS, COLORS):
            mean_band(ax, [ctx.series("test_acc", arm.name, s) for s in ctx.seeds], arm.label, color)
        ax.set(xlabel="training step", ylabel="test accuracy", title="test accuracy (mean, min–max over seeds)")
        ax.legend()
        return [save(fig, ctx.path("ex.png"))]
