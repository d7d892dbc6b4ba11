"""Pre-registration, enforced by code: every verdict part is a declared :class:`Criterion`.

A criterion is data — the statistic, the arms compared (paired by seed), the direction, the
test (difference, non-inferiority or equivalence), the minimum effect or margin, and α — and the
prose criterion in the report is generated from it. Its *hash* covers those fields and the
source (the syntax tree, so comments and formatting do not count) of the function that computes
the statistic from the run's metrics: changing how a statistic is measured is changing the
criterion.

``bnlab criteria --lock`` writes every hash, with the date, to ``docs/results/criteria.lock``. A
test fails when a criterion's hash differs from the lock unless ``docs/results/criteria-changes.md``
records the change — an entry headed ``## <date> — <part id>`` with ``- new: <hash>``, the old
criterion, the new one, why, and whether results had been seen. ``result.json`` records each
part's hash and whether it was locked before the run that produced the result; the report marks
parts changed after their results were seen.
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import inspect
import json
import re
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from .._files import atomic_write_text
from ..errors import UsageError

__all__ = ["Criterion", "Check", "statistic", "criterion_hash", "LOCK_PATH", "CHANGES_PATH", "read_lock",
           "write_lock", "read_changes", "lock_status"]

# the repository's docs/results (the lab runs from a checkout; a pip-installed bnlab has none)
_RESULTS = Path(__file__).resolve().parents[3] / "docs" / "results"
LOCK_PATH = _RESULTS / "criteria.lock"
CHANGES_PATH = _RESULTS / "criteria-changes.md"


@dataclass(frozen=True)
class Criterion:
    """One verdict part. ``treatment`` is compared with ``baseline`` (another arm, paired by seed)
    or with ``reference`` (a constant); see bnlab.lab.stats for the tests."""

    part: str                          # the part's id within its experiment, e.g. "faster"
    claim: str                         # the part of the claim, in words
    statistic: str                     # the experiment's @statistic computing it, per arm and seed
    treatment: str                     # arm
    baseline: Optional[str] = None     # arm (paired by seed), or None to compare with ``reference``
    reference: Optional[float] = None
    direction: str = "greater"         # the claim: treatment − baseline is "greater" or "less"
    test: str = "difference"           # difference | noninferiority | equivalence
    margin: float = 0.0                # minimum effect (difference) or margin (the others)
    alpha: float = 0.05
    scale: str = "linear"              # "log": compare log values (ratios, magnitudes)

    def describe(self, labels: Optional[dict] = None) -> str:
        """The criterion in words, generated from its fields."""
        name = lambda arm: (labels or {}).get(arm, arm)                       # noqa: E731
        what = f"log({self.statistic})" if self.scale == "log" else self.statistic
        if self.baseline is not None:
            diff = f"{what}[{name(self.treatment)}] − {what}[{name(self.baseline)}]"
        else:
            ref = f"log({self.reference:g})" if self.scale == "log" else f"{self.reference:g}"
            diff = f"{what}[{name(self.treatment)}] − {ref}"
        paired = "paired " if self.baseline is not None else "per-seed "
        sign = "" if self.direction == "greater" else "−("
        close = "" if self.direction == "greater" else ")"
        level = f"{100 * (1 - self.alpha):g}%"
        d = f"{sign}{diff}{close}"
        if self.test == "difference":
            rule = (f"supported if the {level} interval of the {paired}{d} lies above {self.margin:g}, "
                    f"not supported if below it")
        elif self.test == "noninferiority":
            rule = (f"non-inferiority: supported if the {level} interval of the {paired}{d} lies above "
                    f"−{self.margin:g}, not supported if below it")
        else:
            rule = (f"equivalence: supported if the {level} interval of the {paired}{diff} lies inside "
                    f"(−{self.margin:g}, {self.margin:g}), not supported if outside it")
        return rule + "; otherwise inconclusive"


@dataclass(frozen=True)
class Check:
    """A property that holds by construction or by algebra (an identity, a bound): reported, never a
    verdict part. A failed check means the measurement is wrong, and the experiment's verdict
    becomes inconclusive."""

    name: str
    description: str
    passed: bool
    detail: str = ""


def statistic(name: str, description: str) -> Callable:
    """Mark an experiment method ``(self, cfg, ctx) -> {arm: [value per seed]}`` as the statistic
    ``name`` that criteria refer to."""
    def mark(fn):
        fn.statistic_name, fn.statistic_description = name, description
        return fn
    return mark


def _source_tree(fn) -> str:
    src = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
    tree = ast.parse(src)
    node = tree.body[0]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        node.decorator_list, node.name = [], "statistic"    # the name and the docstring are not the measurement
        if node.body and isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None),
                                                                           ast.Constant):
            node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(node, annotate_fields=False, include_attributes=False)


def criterion_hash(criterion: Criterion, statistic_fn) -> str:
    """sha256 (16 hex digits) of the criterion's fields and its statistic's syntax tree."""
    h = hashlib.sha256()
    h.update(json.dumps(asdict(criterion), sort_keys=True).encode())
    h.update(_source_tree(statistic_fn).encode())
    return h.hexdigest()[:16]


def read_lock(path: Path = LOCK_PATH) -> dict:
    """{part id: {"hash", "locked", "criterion"}} from the lock file, or {} when there is none."""
    try:
        return json.loads(Path(path).read_text())["parts"]
    except (OSError, KeyError, ValueError):
        return {}


def write_lock(all_parts: list, path: Path = LOCK_PATH, changes: Path = CHANGES_PATH,
               today: Optional[str] = None) -> dict:
    """Lock every criterion of ``all_parts`` ([(part id, criterion, hash)], registry.all_parts()): a
    part whose hash changed since the last lock must have its criteria-changes.md entry first
    (UsageError otherwise). Returns the new lock's parts."""
    today = today or datetime.date.today().isoformat()
    old = read_lock(path)
    recorded = read_changes(changes)
    parts = {}
    for pid, c, h in all_parts:
        previous = old.get(pid)
        if previous is not None and previous["hash"] != h and h not in recorded.get(pid, []):
            raise UsageError(f"{pid} changed since it was locked ({previous['hash']} → {h}): record the "
                             f"change in {changes} (date, old, new, why, results seen) before locking it")
        locked = previous["locked"] if previous is not None and previous["hash"] == h else today
        parts[pid] = dict(hash=h, locked=locked, criterion=asdict(c))
    text = json.dumps({"format": "bnlab-criteria-lock/1", "parts": parts}, indent=1, sort_keys=True)
    atomic_write_text(path, text + "\n")
    return parts


_ENTRY = re.compile(r"^##\s+(\d{4}-\d{2}-\d{2})\s+[—-]+\s+(\S+)\s*$")
_NEW = re.compile(r"^\s*-\s*new:\s*`?([0-9a-f]{16})`?", re.IGNORECASE)
_SEEN = re.compile(r"^\s*-\s*results seen:\s*(\w+)", re.IGNORECASE)


def read_changes(path: Path = CHANGES_PATH, with_seen: bool = False) -> dict:
    """{part id: [new hashes recorded]} from criteria-changes.md ({part id: [(hash, date, results
    seen)]} with ``with_seen``)."""
    out: dict = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    pid = date = new = seen = None

    def flush():
        if pid and new:
            out.setdefault(pid, []).append((new, date, seen) if with_seen else new)

    for line in lines:
        m = _ENTRY.match(line)
        if m:
            flush()
            date, pid, new, seen = m.group(1), m.group(2), None, None
            continue
        if pid:
            if (n := _NEW.match(line)):
                new = n.group(1)
            elif (s := _SEEN.match(line)):
                seen = s.group(1).lower().startswith("y")
    flush()
    return out


def lock_status(part_id: str, h: str, started: Optional[str] = None) -> dict:
    """What result.json records about a part's registration: its hash, the lock's, the date it was
    locked, whether that was before the run (``started``, ISO date), and whether a recorded change
    to it was made after its results had been seen."""
    lock = read_lock().get(part_id)
    changes = read_changes(with_seen=True).get(part_id, [])
    locked = lock is not None and lock["hash"] == h
    before = bool(locked and started and lock["locked"] <= started[:10])
    after_seen = any(seen for new, _, seen in changes if new == h)
    return dict(hash=h, lock_hash=lock["hash"] if lock else None, locked_on=lock["locked"] if lock else None,
                locked_before_run=before, changed_after_results_seen=after_seen)
