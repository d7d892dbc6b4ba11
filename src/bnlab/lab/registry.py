"""The experiment registry. Adding an experiment is adding one module to
``bnlab/lab/experiments/`` that defines a subclass of :class:`Experiment` decorated with
``@register`` — nothing else changes: the CLI, ``reproduce`` and the report discover it."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Type

from ..errors import UsageError
from .config import PROFILES, BaseConfig, apply_overrides, validate
from .criteria import criterion_hash, lock_status

if TYPE_CHECKING:
    from .runner import RunContext
    from .verdict import Verdict

__all__ = ["Arm", "Experiment", "register", "get", "all_experiments", "all_parts", "REGISTRY"]

REGISTRY: Dict[str, "Experiment"] = {}


@dataclass(frozen=True)
class Arm:
    """One arm of an experiment: its name in metrics.csv, its label in the report, and the settings
    that build it (typed values — never parsed back out of the name)."""

    name: str
    label: str
    settings: dict = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.settings[key]


class Experiment:
    """One claim of the BN story as an experiment (a new one starts from
    ``experiments/_template.py``).

    Subclasses set ``id``, ``title``, ``claim`` (one sentence), ``paper`` (what the paper reported,
    with numbers), ``source``, ``departures`` (how the CPU-scale design differs from the paper's),
    ``Config`` (a BaseConfig dataclass whose defaults are the paper profile), ``profiles``
    (overrides for "quick" and "tiny"), ``criteria`` (the declared verdict parts), ``labels`` (arm →
    label) and ``rule`` (parts → verdict), and implement

    * ``run(cfg, ctx)`` — the training/measurement, through ``ctx`` (resumable units, metrics);
    * one ``@statistic`` method per statistic the criteria name: ``(cfg, ctx) → {arm: [per seed]}``;
    * ``checks(cfg, ctx)`` — properties that hold by construction (optional);
    * ``figures(cfg, ctx)`` — the PNGs, returning their file names;
    * ``measured(cfg, ctx, parts)`` — further figures for the report, in words (optional).

    ``analyze`` is shared: statistics → parts (paired tests) → verdict by the declared rule.
    """

    id: str = ""
    title: str = ""
    claim: str = ""
    paper: str = ""
    source: str = ""                 # citation
    departures: str = ""             # the CPU-scale design vs the paper's, said beside the result
    Config: Type[BaseConfig] = BaseConfig
    profiles: Dict[str, Dict[str, Any]] = {}
    criteria: tuple = ()             # Criterion, ...
    labels: Dict[str, str] = {}
    rule: str = "all parts"
    order: int = 0                   # position in the report

    def config(self, profile: str = "quick", overrides: Dict[str, Any] | None = None) -> BaseConfig:
        if profile not in PROFILES:
            raise UsageError(f"unknown profile {profile!r}; choose from {PROFILES}")
        cfg = self.Config()
        if profile != "paper":
            cfg = apply_overrides(cfg, self.profiles.get(profile, {}))
        cfg = apply_overrides(cfg, overrides or {})
        validate(cfg)
        return cfg

    def run(self, cfg: Any, ctx: "RunContext") -> None:
        raise NotImplementedError

    def statistic_functions(self) -> Dict[str, Callable]:
        """The @statistic methods, by statistic name (bound)."""
        out = {}
        for name in dir(type(self)):
            fn = getattr(type(self), name, None)
            if callable(fn) and hasattr(fn, "statistic_name"):
                out[fn.statistic_name] = getattr(self, name)
        return out

    def checks(self, cfg: Any, ctx: "RunContext") -> list:
        return []

    def figures(self, cfg: Any, ctx: "RunContext") -> list:
        return []

    def measured(self, cfg: Any, ctx: "RunContext", parts: list) -> str:
        return ""

    def analyze(self, cfg: Any, ctx: "RunContext") -> "Verdict":
        from .verdict import Verdict, evaluate
        functions = self.statistic_functions()
        stats = {name: functions[name](cfg, ctx) for name in {c.statistic for c in self.criteria}}
        hashes = {f"{self.id}.{c.part}": criterion_hash(c, functions[c.statistic]) for c in self.criteria}
        registration = {pid: lock_status(pid, h, getattr(ctx, "started_iso", None)) for pid, h in hashes.items()}
        checks = self.checks(cfg, ctx)
        parts, verdict = evaluate(self.id, self.criteria, stats, checks, self.rule, self.labels, hashes,
                                  registration)
        lines = [f"{p.criterion.claim}: {p.summary()} → {p.verdict}" for p in parts]
        extra = self.measured(cfg, ctx, parts)
        measured = "; ".join(lines) + "." + (f" {extra}" if extra else "")
        criterion = (f"verdict by rule '{self.rule}' over {len(parts)} declared parts (paired by seed): "
                     + " | ".join(f"{p.id}: {p.description}" for p in parts))
        failed = [c for c in checks if not c.passed]
        notes = ("A check failed, so no verdict is given: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)
                 if failed else "")
        return Verdict(self.id, self.claim, self.paper, measured, criterion, verdict, parts=parts,
                       checks=list(checks), rule=self.rule, numbers={k: v for k, v in stats.items()},
                       figures=self.figures(cfg, ctx), notes=notes, departures=self.departures)


def register(cls: Type[Experiment]) -> Type[Experiment]:
    inst = cls()
    if not inst.id or inst.id in REGISTRY and type(REGISTRY[inst.id]) is not cls:
        raise ValueError(f"experiment id {inst.id!r} missing or registered twice")
    REGISTRY[inst.id] = inst
    return cls


def _load() -> None:
    from . import experiments
    for mod in pkgutil.iter_modules(experiments.__path__):
        if not mod.name.startswith("_"):                   # _template.py is documentation
            importlib.import_module(f"{experiments.__name__}.{mod.name}")


def all_experiments() -> list[Experiment]:
    _load()
    return sorted(REGISTRY.values(), key=lambda e: (e.order, _natural(e.id)))


def _natural(eid: str):
    digits = "".join(c for c in eid if c.isdigit())
    return (int(digits) if digits else 0, eid)


def get(eid: str) -> Experiment:
    _load()
    key = eid.upper()
    if key not in REGISTRY:
        raise UsageError(f"unknown experiment {eid!r}; known: {', '.join(e.id for e in all_experiments())}")
    return REGISTRY[key]


def all_parts() -> list:
    """(part id "E1.faster", criterion, hash) for every registered experiment's criteria."""
    out = []
    for e in all_experiments():
        stats = e.statistic_functions()
        for c in e.criteria:
            if c.statistic not in stats:
                raise UsageError(f"{e.id}.{c.part}: no @statistic named {c.statistic!r}")
            out.append((f"{e.id}.{c.part}", c, criterion_hash(c, stats[c.statistic])))
    return out
