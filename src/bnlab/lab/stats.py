"""Statistics a referee accepts: paired differences, their t-interval, an effect size, and the
three-way verdict of a pre-declared test.

A verdict part compares two arms paired by seed (same initialization stream and data order), or
one arm with a reference value. With per-seed values a_s (treatment) and b_s (baseline) — on a log
scale when the statistic is a ratio — the differences d_s = a_s − b_s give::

    mean d̄,  sample sd s,  95% interval d̄ ± t_{0.975, n−1} · s/√n,  effect size d_z = d̄/s

and, for a claim that the treatment is *greater* (mirror everything for *less*), with minimum
effect δ ≥ 0 (or margin δ for the other tests):

    difference       supported if the interval lies above δ,    not supported if below δ
    noninferiority   supported if it lies above −δ,              not supported if below −δ
    equivalence      supported if it lies inside (−δ, δ),        not supported if outside it
    anything else    inconclusive

A statistic that is not finite for any seed (a run that diverged) makes the part "diverged": it is
never given a verdict. One seed gives no interval: inconclusive.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

__all__ = ["SUPPORTED", "NOT_SUPPORTED", "INCONCLUSIVE", "DIVERGED", "VERDICTS", "TESTS", "t_quantile",
           "PairedResult", "paired_test", "combine_all"]

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, DIVERGED = "supported", "not supported", "inconclusive", "diverged"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, DIVERGED)
TESTS = ("difference", "noninferiority", "equivalence")


# -- Student's t --------------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Lentz's method)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom (bisection on the exact CDF)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# -- the paired test -----------------------------------------------------------------------------

@dataclass
class PairedResult:
    """One verdict part's numbers: the per-seed values, the paired differences, their mean and
    (1 − α) interval, the effect size, and the verdict of the declared test."""

    treatment: list
    baseline: list
    differences: list
    n: int
    mean: float
    low: float
    high: float
    effect_size: float              # d_z = mean / sd of the differences (nan for one seed or sd 0)
    verdict: str
    reason: str = ""
    scale: str = "linear"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def paired_test(treatment: Sequence[float], baseline: Optional[Sequence[float]] = None, *,
                reference: Optional[float] = None, direction: str = "greater", test: str = "difference",
                margin: float = 0.0, alpha: float = 0.05, scale: str = "linear") -> PairedResult:
    """The declared test of a verdict part (see the module docstring).

    ``baseline``: the other arm's per-seed values (paired by position), or None with ``reference``
    a constant. ``scale="log"``: compare log values (for ratios and magnitudes; the interval is then
    on the log of the ratio, and margins are log-ratios)."""
    if direction not in ("greater", "less"):
        raise ValueError(f"direction must be 'greater' or 'less', got {direction!r}")
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    if margin < 0:
        raise ValueError(f"margin must be ≥ 0, got {margin}")
    a = [float(v) if v is not None else math.nan for v in treatment]
    if baseline is None:
        if reference is None:
            raise ValueError("give a baseline arm or a reference value")
        b = [float(reference)] * len(a)
    else:
        b = [float(v) if v is not None else math.nan for v in baseline]
        if len(b) != len(a):
            raise ValueError(f"paired arms need one value per seed each, got {len(a)} and {len(b)}")
    n = len(a)
    nan = math.nan
    if n == 0:
        return PairedResult(a, b, [], 0, nan, nan, nan, nan, INCONCLUSIVE, "no seeds", scale)
    if not all(_finite(v) for v in a + b) or (scale == "log" and not all(v > 0 for v in a + b)):
        bad = [i for i, (x, y) in enumerate(zip(a, b)) if not (_finite(x) and _finite(y))]
        return PairedResult(a, b, [], n, nan, nan, nan, nan, DIVERGED,
                            f"non-finite values for seed positions {bad}" if bad else "non-positive values on a log scale",
                            scale)
    f = math.log if scale == "log" else (lambda v: v)
    d = [f(x) - f(y) for x, y in zip(a, b)]
    if direction == "less":
        d = [-v for v in d]                          # every test below reads "greater"
    mean = statistics.fmean(d)
    if n == 1:
        return PairedResult(a, b, d, 1, mean, -math.inf, math.inf, nan, INCONCLUSIVE,
                            "one seed: no interval", scale)
    sd = statistics.stdev(d)
    half = t_quantile(1 - alpha / 2, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    effect = mean / sd if sd > 0 else (math.copysign(math.inf, mean) if mean else nan)
    if test == "difference":
        verdict = SUPPORTED if low > margin else NOT_SUPPORTED if high < margin else INCONCLUSIVE
    elif test == "noninferiority":
        verdict = SUPPORTED if low > -margin else NOT_SUPPORTED if high < -margin else INCONCLUSIVE
    else:
        verdict = SUPPORTED if (low > -margin and high < margin) else \
            NOT_SUPPORTED if (low > margin or high < -margin) else INCONCLUSIVE
    return PairedResult(a, b, d, n, mean, low, high, effect, verdict, "", scale)


def combine_all(verdicts: Sequence[str]) -> str:
    """The default rule from parts to the experiment's verdict: diverged if any part diverged,
    supported if all are, not supported if any is, else inconclusive."""
    if not verdicts:
        return INCONCLUSIVE
    if any(v == DIVERGED for v in verdicts):
        return DIVERGED
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    if any(v == NOT_SUPPORTED for v in verdicts):
        return NOT_SUPPORTED
    return INCONCLUSIVE
