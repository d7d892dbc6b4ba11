"""The verdict machinery: Student's t, the paired tests in every direction, every experiment's
declared parts turned into each verdict by synthetic per-seed numbers, the statistics' own code on
synthetic metrics, and the pre-registration lock."""

from __future__ import annotations

import math

import pytest

from bnlab.lab import criteria as C
from bnlab.lab import stats as S
from bnlab.lab.registry import all_experiments, all_parts
from bnlab.lab.verdict import evaluate


@pytest.mark.parametrize("p,df,expected", [(0.975, 1, 12.7062), (0.975, 4, 2.77645), (0.975, 9, 2.26216),
                                           (0.95, 4, 2.13185), (0.995, 30, 2.74999), (0.975, 1e6, 1.95997)])
def test_t_quantile_matches_tables(p, df, expected):
    assert math.isclose(S.t_quantile(p, df), expected, rel_tol=2e-5)
    assert math.isclose(S.t_quantile(1 - p, df), -expected, rel_tol=2e-5)


BASE = [1.0, 1.1, 0.9, 1.05, 0.95]


@pytest.mark.parametrize("test,direction,shift,expected", [
    ("difference", "greater", 0.5, S.SUPPORTED), ("difference", "greater", -0.5, S.NOT_SUPPORTED),
    ("difference", "less", -0.5, S.SUPPORTED), ("difference", "less", 0.5, S.NOT_SUPPORTED),
    ("noninferiority", "greater", 0.0, S.SUPPORTED), ("noninferiority", "greater", -0.5, S.NOT_SUPPORTED),
    ("equivalence", "greater", 0.0, S.SUPPORTED), ("equivalence", "greater", 0.5, S.NOT_SUPPORTED),
    ("equivalence", "greater", -0.5, S.NOT_SUPPORTED),
])
def test_paired_test_verdicts(test, direction, shift, expected):
    treatment = [b + shift + 0.001 * i for i, b in enumerate(BASE)]
    r = S.paired_test(treatment, BASE, direction=direction, test=test, margin=0.1)
    assert r.verdict == expected, r


def test_paired_test_pairs_by_seed_and_reports_the_interval():
    """The seeds' spread cancels in the pairing: a consistent +0.01 against a spread of 0.1."""
    a = [b + 0.01 for b in BASE]
    r = S.paired_test(a, BASE)
    assert r.verdict == S.SUPPORTED and math.isclose(r.mean, 0.01) and r.low > 0 and r.n == 5
    unpaired_like = S.paired_test(a, list(reversed(BASE)))       # mispaired: no longer clear
    assert unpaired_like.verdict == S.INCONCLUSIVE


def test_paired_test_inconclusive_diverged_one_seed_and_log_scale():
    noisy = [b + d for b, d in zip(BASE, (0.3, -0.3, 0.3, -0.3, 0.0))]
    assert S.paired_test(noisy, BASE).verdict == S.INCONCLUSIVE
    assert S.paired_test([1.0, math.nan, 1.2, 1.1, 1.0], BASE).verdict == S.DIVERGED
    assert S.paired_test([1.0, math.inf, 1.2, 1.1, 1.0], BASE).verdict == S.DIVERGED
    assert S.paired_test([2.0], [1.0]).verdict == S.INCONCLUSIVE
    r = S.paired_test([10 * b for b in BASE], BASE, scale="log", margin=math.log(5))
    assert r.verdict == S.SUPPORTED and math.isclose(r.mean, math.log(10))
    assert S.paired_test([-1.0] * 5, BASE, scale="log").verdict == S.DIVERGED
    r = S.paired_test([0.3, 0.31, 0.29, 0.3, 0.3], reference=0.5, direction="less", scale="log")
    assert r.verdict == S.SUPPORTED


def test_combine_rule():
    assert S.combine_all([S.SUPPORTED, S.SUPPORTED]) == S.SUPPORTED
    assert S.combine_all([S.SUPPORTED, S.INCONCLUSIVE]) == S.INCONCLUSIVE
    assert S.combine_all([S.INCONCLUSIVE, S.NOT_SUPPORTED]) == S.NOT_SUPPORTED
    assert S.combine_all([S.NOT_SUPPORTED, S.DIVERGED]) == S.DIVERGED
    assert S.combine_all([]) == S.INCONCLUSIVE


# -- every experiment's parts, driven to each verdict ----------------------------------------------

def _target(c: C.Criterion, verdict: str) -> list[float]:
    """Per-seed differences (in the statistic's scale, before the direction) giving ``verdict``."""
    thr = {"difference": c.margin, "noninferiority": -c.margin, "equivalence": 0.0}[c.test]
    if verdict == S.SUPPORTED:
        d = thr + (0.0 if c.test == "equivalence" else 0.5)
        spread = [0.0, 1e-3, -1e-3, 2e-3, -2e-3] if c.test != "equivalence" else [0.0, 1e-4, -1e-4, 0.0, 0.0]
    elif verdict == S.NOT_SUPPORTED:
        d = (c.margin + 0.5) if c.test == "equivalence" else thr - 0.5
        spread = [0.0, 1e-3, -1e-3, 2e-3, -2e-3]
    else:
        d, spread = thr, [0.8, -0.8, 0.8, -0.8, 0.0]
    sign = 1.0 if c.direction == "greater" else -1.0
    return [sign * (d + s) for s in spread]


def _synthetic_stats(e, verdicts: dict) -> dict:
    """Per-statistic, per-arm per-seed values realizing ``verdicts`` ({part: verdict}) for all parts
    at once, assigning arms in the criteria's order."""
    stats: dict = {}
    base = [1.0, 1.2, 0.9, 1.1, 1.05]
    for c in e.criteria:
        arms = stats.setdefault(c.statistic, {})
        d = _target(c, verdicts[c.part])
        to = (lambda v: math.log(v)) if c.scale == "log" else (lambda v: v)
        back = (lambda v: math.exp(v)) if c.scale == "log" else (lambda v: v)
        if c.baseline is None:
            arms[c.treatment] = [back(to(c.reference) + di) for di in d]
            continue
        if c.baseline in arms and c.treatment not in arms:
            arms[c.treatment] = [back(to(b) + di) for b, di in zip(arms[c.baseline], d)]
        elif c.treatment in arms and c.baseline not in arms:
            arms[c.baseline] = [back(to(t) - di) for t, di in zip(arms[c.treatment], d)]
        elif c.treatment not in arms:
            arms[c.baseline] = list(base)
            arms[c.treatment] = [back(to(b) + di) for b, di in zip(base, d)]
        else:                                   # both fixed by earlier parts: they must already agree
            r = S.paired_test(arms[c.treatment], arms[c.baseline], direction=c.direction, test=c.test,
                              margin=c.margin, alpha=c.alpha, scale=c.scale)
            assert r.verdict == verdicts[c.part], f"{e.id}.{c.part}: the arms fixed earlier give {r.verdict}"
    return stats


EXPERIMENTS = all_experiments()


@pytest.mark.parametrize("e", EXPERIMENTS, ids=lambda e: e.id)
@pytest.mark.parametrize("wanted", [S.SUPPORTED, S.NOT_SUPPORTED, S.INCONCLUSIVE, S.DIVERGED])
def test_every_experiments_parts_give_every_verdict(e, wanted):
    assert e.criteria, f"{e.id} declares no criteria"
    parts = [c.part for c in e.criteria]
    verdicts = {p: S.SUPPORTED for p in parts}
    if wanted in (S.NOT_SUPPORTED, S.INCONCLUSIVE):
        verdicts[parts[-1]] = wanted
    stats = _synthetic_stats(e, verdicts)
    if wanted == S.DIVERGED:
        c = e.criteria[0]
        stats[c.statistic][c.treatment] = [math.nan] + stats[c.statistic][c.treatment][1:]
    got, verdict = evaluate(e.id, e.criteria, stats, rule=e.rule)
    assert verdict == wanted, [(p.id, p.verdict, p.summary()) for p in got]
    if wanted != S.DIVERGED:
        assert [p.verdict for p in got] == [verdicts[p] for p in parts]


@pytest.mark.parametrize("e", EXPERIMENTS, ids=lambda e: e.id)
def test_a_failed_check_withholds_the_verdict(e):
    stats = _synthetic_stats(e, {c.part: S.SUPPORTED for c in e.criteria})
    _, verdict = evaluate(e.id, e.criteria, stats, checks=[C.Check("x", "a broken measurement", False)], rule=e.rule)
    assert verdict == S.INCONCLUSIVE


@pytest.mark.parametrize("e", EXPERIMENTS, ids=lambda e: e.id)
def test_criteria_are_well_formed(e):
    stats = e.statistic_functions()
    ids = [c.part for c in e.criteria]
    assert len(ids) == len(set(ids))
    for c in e.criteria:
        assert c.statistic in stats and c.direction in ("greater", "less") and c.test in S.TESTS
        assert (c.baseline is None) == (c.reference is not None) and c.margin >= 0 and 0 < c.alpha < 1
        assert c.test != "equivalence" or c.margin > 0
        assert c.claim and c.describe()


# -- the statistics' own code, on synthetic metrics -----------------------------------------------------

class _Ctx:
    """A RunContext with hand-made rows (the statistics read metrics only through its helpers)."""

    def __init__(self, seeds):
        from bnlab.lab.runner import RunContext
        self._impl = RunContext.__new__(RunContext)
        self._impl.rows, self._impl.seeds = [], list(range(seeds))

    def __getattr__(self, name):
        return getattr(self._impl, name)


def test_e1_statistics_on_synthetic_metrics():
    from bnlab.lab.experiments.e01_ioffe_fig1 import E1, Config
    cfg = Config(steps=4000, eval_every=1000, early_step=1000, seeds=2)
    ctx = _Ctx(2)
    for arm, acc, move in (("bn", 0.9, 0.01), ("nobn", 0.5, 0.1)):
        for seed in (0, 1):
            for step in range(0, 4001, 1000):
                ctx.record(step, seed, arm, "test_acc", acc + step / 1e5)
                for q, base in (("p15", -1.0), ("p50", 0.0), ("p85", 1.0)):     # width 2, each moves `move`
                    ctx.record(step, seed, arm, q, base + move * (step // 1000))
    e = E1()
    assert e.acc_early(cfg, ctx) == {"nobn": [0.51, 0.51], "bn": [0.91, 0.91]}
    mean = e.acc_mean_over_training(cfg, ctx)
    assert math.isclose(mean["bn"][0], 0.9 + 2500 / 1e5)                        # steps 1000..4000
    moves = e.percentile_movement(cfg, ctx)
    assert math.isclose(moves["bn"][0], 0.01 / 2) and math.isclose(moves["nobn"][1], 0.1 / 2)


def test_e3_growth_statistic_on_synthetic_metrics():
    from bnlab.lab.experiments.e03_outside_gradient import E3, Config
    cfg = Config(steps=20_000, eval_every=1000, seeds=1)
    ctx = _Ctx(1)
    for step in range(0, 20_001, 1000):
        ctx.record(step, 0, "detached_mean", "bias_norm", 0.5 + step / 5000)          # linear growth
        ctx.record(step, 0, "bn", "bias_norm", 0.0)
        ctx.record(step, 0, "detached_meanstd", "bias_norm", 2.0)                      # converged
        for arm in ("detached_mean", "bn", "detached_meanstd"):
            ctx.record(step, 0, arm, "weight_norm", 3.0 * (1 + step / 1000) if arm == "detached_meanstd" else 3.0)
    growth = E3().bias_growth_second_half(cfg, ctx)
    assert math.isclose(growth["detached_mean"][0], 4.5 / 2.5) and math.isclose(growth["detached_meanstd"][0], 1.0)
    assert math.isnan(growth["bn"][0])                                         # b stays 0: no ratio
    w = E3().weight_growth(cfg, ctx)
    assert math.isclose(w["detached_meanstd"][0], 21.0) and math.isclose(w["bn"][0], 1.0)


# -- pre-registration ----------------------------------------------------------------------------

def test_every_criterion_is_locked_or_its_change_recorded():
    """docs/results/criteria.lock holds every criterion's hash (fields + the statistic's syntax
    tree); a differing hash must have its entry in docs/results/criteria-changes.md."""
    lock, changes = C.read_lock(), C.read_changes()
    assert lock, f"no lock at {C.LOCK_PATH}: run `bnlab criteria --lock`"
    problems = []
    for pid, c, h in all_parts():
        entry = lock.get(pid)
        if entry is None:
            problems.append(f"{pid}: not locked")
        elif entry["hash"] != h and h not in changes.get(pid, []):
            problems.append(f"{pid}: changed ({entry['hash']} → {h}) without a criteria-changes.md entry")
    assert problems == []


def test_the_hash_sees_the_statistic_code_but_not_its_comments(tmp_path, monkeypatch):
    from bnlab.lab.experiments.e03_outside_gradient import E3
    e = E3()
    c = e.criteria[0]
    fn = e.statistic_functions()[c.statistic]
    h = C.criterion_hash(c, fn)
    assert C.criterion_hash(c, fn) == h
    import dataclasses
    assert C.criterion_hash(dataclasses.replace(c, margin=0.1), fn) != h

    def commented(self, cfg, ctx):
        """A docstring is prose."""
        return {"x": [1.0]}      # a comment

    def plain(self, cfg, ctx):
        return {"x": [1.0]}

    def other(self, cfg, ctx):
        return {"x": [2.0]}
    assert C.criterion_hash(c, commented) == C.criterion_hash(c, plain) != C.criterion_hash(c, other)


def test_lock_and_changes_files_round_trip(tmp_path):
    lock, changes = tmp_path / "criteria.lock", tmp_path / "criteria-changes.md"
    parts = C.write_lock(all_parts(), lock, changes, today="2026-12-01")
    assert set(parts) == {pid for pid, _, _ in all_parts()} and C.read_lock(lock) == parts
    # a lock with another hash for one part: relocking needs the change recorded
    pid = sorted(parts)[0]
    import json
    data = json.loads(lock.read_text())
    data["parts"][pid]["hash"] = "0" * 16
    lock.write_text(json.dumps(data))
    with pytest.raises(Exception, match="record the change"):
        C.write_lock(all_parts(), lock, changes, today="2026-12-02")
    new = parts[pid]["hash"]
    changes.write_text(f"# changes\n\n## 2026-12-02 — {pid}\n- old: `{'0' * 16}` the old one\n- new: `{new}` the new one\n"
                       f"- why: a test\n- results seen: yes\n")
    assert C.read_changes(changes) == {pid: [new]}
    assert C.read_changes(changes, with_seen=True) == {pid: [(new, "2026-12-02", True)]}
    relocked = C.write_lock(all_parts(), lock, changes, today="2026-12-02")
    assert relocked[pid]["locked"] == "2026-12-02" and relocked[sorted(parts)[1]]["locked"] == "2026-12-01"


def test_part_summary_reads_in_the_natural_orientation():
    """The stored result is claim-oriented (positive supports the claim); the summary shows the
    difference as measured, with the region the claim needs it in."""
    from bnlab.lab.criteria import Criterion
    from bnlab.lab.stats import paired_test
    from bnlab.lab.verdict import Part
    c = Criterion(part="smaller", claim="c", statistic="s", treatment="a", baseline="b", direction="less",
                  margin=0.5)
    r = paired_test([1.0, 1.1, 0.9, 1.0], [3.0, 3.2, 2.9, 3.1], direction="less", margin=0.5)
    text = Part("E0.smaller", c, r, "").summary()
    assert text.startswith("Δ −2.05 [") and "(claimed < -0.5)" in text and "d_z −" in text
