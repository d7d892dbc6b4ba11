"""The experiment registry. Adding an experiment is adding one module to
``bnlab/lab/experiments/`` that defines a subclass of :class:`Experiment` decorated with
``@register`` — nothing else changes: the CLI, ``reproduce`` and the report discover it."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, Dict, Type

from ..errors import UsageError
from .config import PROFILES, BaseConfig, apply_overrides, validate

if TYPE_CHECKING:
    from .runner import RunContext
    from .verdict import Verdict

__all__ = ["Experiment", "register", "get", "all_experiments", "REGISTRY"]

REGISTRY: Dict[str, "Experiment"] = {}


class Experiment:
    """One claim of the BN story as an experiment.

    Subclasses set ``id``, ``title``, ``claim`` (one sentence), ``paper`` (what the paper
    reported, with numbers), ``Config`` (a BaseConfig dataclass whose defaults are the paper
    profile) and ``profiles`` (overrides for "quick" and "tiny"), and implement

    * ``run(cfg, ctx)`` — the training/measurement, through ``ctx`` (resumable units, metrics);
    * ``analyze(cfg, ctx) -> Verdict`` — figures and the verdict from ``ctx.rows``.
    """

    id: str = ""
    title: str = ""
    claim: str = ""
    paper: str = ""
    source: str = ""                 # citation
    Config: Type[BaseConfig] = BaseConfig
    profiles: Dict[str, Dict[str, Any]] = {}
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

    def analyze(self, cfg: Any, ctx: "RunContext") -> "Verdict":
        raise NotImplementedError


def register(cls: Type[Experiment]) -> Type[Experiment]:
    inst = cls()
    if not inst.id or inst.id in REGISTRY and type(REGISTRY[inst.id]) is not cls:
        raise ValueError(f"experiment id {inst.id!r} missing or registered twice")
    REGISTRY[inst.id] = inst
    return cls


def _load() -> None:
    from . import experiments
    for mod in pkgutil.iter_modules(experiments.__path__):
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
