"""Verdicts: every declared criterion evaluated on the run's per-seed statistics, the checks, and
the experiment's verdict derived from its parts by a declared rule.

Criteria are decided before looking (bnlab.lab.criteria, locked), the statistics are paired by
seed (bnlab.lab.stats), and nothing here tunes anything: the same code turns any per-seed numbers
into supported / not supported / inconclusive / diverged.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from .criteria import Check, Criterion
from .stats import (DIVERGED, INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, VERDICTS, PairedResult, combine_all,
                    paired_test)

__all__ = ["SUPPORTED", "NOT_SUPPORTED", "INCONCLUSIVE", "DIVERGED", "VERDICTS", "Part", "Verdict",
           "evaluate", "fmt", "mean_spread", "RULES"]

# How an experiment's verdict follows from its parts (declared per experiment).
RULES = {"all parts": combine_all}


@dataclass
class Part:
    """A criterion, its hash and registration status, and its result on this run."""

    id: str                     # "E1.faster"
    criterion: Criterion
    result: PairedResult
    description: str            # the criterion in words
    hash: str = ""
    registration: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return self.result.verdict

    def summary(self) -> str:
        """"Δ +0.041 [+0.030, +0.052] (claimed > 0.02), d_z 4.1, n=5": the paired difference
        (treatment − baseline, or − the reference value; of logs on the log scale), its interval,
        the region the claim needs it in, and the effect size, all in the natural orientation."""
        r, c = self.result, self.criterion
        if r.verdict == DIVERGED:
            return f"diverged ({r.reason})"
        flip = -1.0 if c.direction == "less" else 1.0          # results are stored claim-oriented
        what = "log ratio" if r.scale == "log" else "Δ"
        if r.n < 2:
            return f"{what} {_num(flip * r.mean, True)} (n={r.n}: no interval)"
        low, high = sorted((flip * r.low, flip * r.high))
        if c.test == "equivalence":
            claim = f"within ±{c.margin:g}"
        else:
            bound = c.margin if c.test == "difference" else -c.margin
            claim = f"> {bound:g}" if c.direction == "greater" else f"< {-bound:g}"
        return (f"{what} {_num(flip * r.mean, True)} [{_num(low, True)}, {_num(high, True)}] "
                f"(claimed {claim}), d_z {_num(flip * r.effect_size)}, n={r.n}")

    def to_dict(self) -> dict:
        return dict(id=self.id, claim=self.criterion.claim, verdict=self.verdict, summary=self.summary(),
                    criterion=asdict(self.criterion), description=self.description, result=self.result.to_dict(),
                    hash=self.hash, registration=self.registration)


@dataclass
class Verdict:
    experiment: str
    claim: str
    paper: str
    measured: str
    criterion: str
    verdict: str
    parts: list = field(default_factory=list)          # Part
    checks: list = field(default_factory=list)         # Check
    rule: str = "all parts"
    numbers: dict = field(default_factory=dict)        # further measured figures, machine-readable
    figures: list = field(default_factory=list)
    notes: str = ""
    departures: str = ""                               # how the CPU-scale design departs from the paper's

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("parts", "checks")}
        d["parts"] = [p.to_dict() for p in self.parts]
        d["checks"] = [asdict(c) for c in self.checks]
        return d


def evaluate(experiment_id: str, criteria: Sequence[Criterion], stats: dict, checks: Sequence[Check] = (),
             rule: str = "all parts", labels: Optional[dict] = None, hashes: Optional[dict] = None,
             registration: Optional[dict] = None) -> tuple[list[Part], str]:
    """The parts of ``criteria`` on ``stats`` ({statistic: {arm: [per seed]}}) and the verdict by
    ``rule``; a failed check makes it inconclusive."""
    parts = []
    for c in criteria:
        values = stats[c.statistic]
        result = paired_test(values[c.treatment], values[c.baseline] if c.baseline is not None else None,
                             reference=c.reference, direction=c.direction, test=c.test, margin=c.margin,
                             alpha=c.alpha, scale=c.scale)
        pid = f"{experiment_id}.{c.part}"
        parts.append(Part(pid, c, result, c.describe(labels), (hashes or {}).get(pid, ""),
                          (registration or {}).get(pid, {})))
    verdict = RULES[rule]([p.verdict for p in parts])
    if verdict != DIVERGED and any(not ch.passed for ch in checks):
        verdict = INCONCLUSIVE
    return parts, verdict


# -- formatting ----------------------------------------------------------------------------------

def _num(v: float, signed: bool = False) -> str:
    if v is None or not isinstance(v, (int, float)):
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if math.isnan(v):
        return "nan"
    text = f"{v:+.3g}" if signed else f"{v:.3g}"
    return text.replace("-", "−")


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 3) -> str:
    """"0.953 ± 0.004 (n=5)": mean ± sample sd over seeds, the form per-arm figures are given in."""
    m, s = mean_spread(values)
    if math.isnan(m):
        return "non-finite (diverged)" if values else "n/a"
    n = len([v for v in values if v is not None and math.isfinite(v)])
    lost = len(values) - n
    tail = f", {lost} non-finite" if lost else ""
    return f"{m:.{digits}g} ± {s:.2g} (n={n}{tail})" if n > 1 else f"{m:.{digits}g} (n=1{tail})"
