"""Verdicts: the claim, what the paper reported, what bnlab measured (mean ± spread over seeds),
the criterion, and supported / not supported / inconclusive.

Criteria are decided before looking (they live in the experiment's code, with the claim) and
must be able to go either way; the helpers here turn per-seed numbers into a verdict without
tuning: "supported" needs every seed to agree, "not supported" needs every seed to contradict,
anything between is "inconclusive".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)


@dataclass
class Verdict:
    experiment: str
    claim: str
    paper: str
    measured: str
    criterion: str
    verdict: str
    numbers: dict = field(default_factory=dict)      # the measured figures, machine-readable
    figures: list = field(default_factory=list)       # file names in the experiment directory
    notes: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 3) -> str:
    """"0.953 ± 0.004 (n=3)" — the form every measured figure is reported in."""
    m, s = mean_spread(values)
    if math.isnan(m):
        return "non-finite (diverged)" if values else "n/a"
    n = len([v for v in values if v is not None and math.isfinite(v)])
    lost = len(values) - n
    tail = f", {lost} non-finite" if lost else ""
    return f"{m:.{digits}g} ± {s:.2g} (n={n}{tail})" if n > 1 else f"{m:.{digits}g} (n=1{tail})"


def all_seeds(holds: Iterable[bool]) -> str:
    """supported if it holds for every seed, not supported if for none, else inconclusive."""
    holds = list(holds)
    if not holds:
        return INCONCLUSIVE
    if all(holds):
        return SUPPORTED
    if not any(holds):
        return NOT_SUPPORTED
    return INCONCLUSIVE


def combine(*verdicts: str) -> str:
    """A claim with several parts: supported only if all parts are, not supported if any part
    is contradicted, otherwise inconclusive."""
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    if any(v == NOT_SUPPORTED for v in verdicts):
        return NOT_SUPPORTED
    return INCONCLUSIVE


def separated(a: Sequence[float], b: Sequence[float], margin: float = 0.0) -> str:
    """Is a > b across seeds? supported if min(a) > max(b) + margin; not supported if
    max(a) < min(b) − margin (clearly the other way); inconclusive otherwise."""
    a = [v for v in a if math.isfinite(v)]
    b = [v for v in b if math.isfinite(v)]
    if not a or not b:
        return INCONCLUSIVE
    if min(a) > max(b) + margin:
        return SUPPORTED
    if max(a) < min(b) - margin:
        return NOT_SUPPORTED
    return INCONCLUSIVE
