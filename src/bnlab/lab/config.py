"""Experiments are data: a config dataclass, named profiles, and typed ``--set key=value``.

Every experiment's config derives from :class:`BaseConfig`; its field defaults are the
``paper`` profile (the paper's scale where it fits a CPU), and ``profiles`` holds overrides for
``quick`` (same mechanism, small budget) and ``tiny`` (seconds, for tests). Overrides are typed
by the field they set (``--set steps=2000``, ``--set lr=0.05``, ``--set arms=bn,nobn``,
``--set data.path=DIR``) and an unknown key or an unparsable value is a clear error.

Every resolved config is validated before anything runs (:func:`validate`): each field's type,
finiteness, and range — declared as data in ``RANGES`` (field name → :class:`Range`), inherited
and extended by each experiment's Config — and each experiment's cross-field ``check()``. A
value out of range is a :class:`bnlab.errors.UsageError` naming the field, the value and the
allowed range (``bnlab: error: ...``, exit status 2): a run never starts on ``lr=nan``,
``steps=0`` or ``steps=1e20``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Optional, Sequence

from ..errors import UsageError

__all__ = ["DataConfig", "BaseConfig", "Range", "apply_overrides", "config_to_dict", "parse_overrides",
           "validate", "PROFILES"]

PROFILES = ("tiny", "quick", "paper")


@dataclass(frozen=True)
class Range:
    """The values a numeric field (or each element of a tuple field) may take: lo ≤ v ≤ hi, with
    ``lo_open``/``hi_open`` making a bound strict. Tuples must be non-empty unless ``empty_ok``."""
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    empty_ok: bool = False

    def holds(self, v: float) -> bool:
        return ((v > self.lo if self.lo_open else v >= self.lo)
                and (v < self.hi if self.hi_open else v <= self.hi))

    def __str__(self) -> str:
        lo = "(" if self.lo_open else "["
        hi = ")" if self.hi_open else "]"
        return f"{lo}{_num(self.lo)}, {_num(self.hi)}{hi}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "-inf" if v < 0 else "inf"
    return f"{int(v):,}".replace(",", "_") if float(v).is_integer() and abs(v) >= 1e4 else f"{v:g}"


# Ranges of fields many experiments share; an experiment's Config extends them
# (RANGES = {**BaseConfig.RANGES, "name": Range(...)}). Fields without an entry: ints in
# [0, 10⁹], floats finite.
_STEPS = Range(1, 10_000_000)
_COMMON_RANGES: dict[str, Range] = {
    "seeds": Range(1, 100),
    "steps": _STEPS,
    "batch": Range(2, 60_000),
    "lr": Range(0, 100, lo_open=True),
    "init_std": Range(0, 100, lo_open=True),
    "eval_every": _STEPS,
    "probe_every": _STEPS,
    "checkpoint_every": Range(1, 10**9),
    "threads": Range(1, 1024),
    "widths": Range(1, 65_536),
    "probe_examples": Range(1, 1_000_000),
    "momentum": Range(0, 1, hi_open=True),
    "weight_decay": Range(0, 1),
}
_INT_DEFAULT = Range(0, 10**9)


@dataclass
class DataConfig:
    name: str = "mnist"              # "mnist" (verified) or "idx" (any IDX dataset at path)
    path: Optional[str] = None       # directory of the IDX files (else --data-dir/BNLAB_DATA/...)


@dataclass
class BaseConfig:
    seeds: int = 3                   # independent runs; verdicts use their spread
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint_every: int = 2000     # steps between resumable checkpoints
    threads: int = 1                 # torch threads: tiny matmuls run fastest on one

    RANGES: ClassVar[dict[str, Range]] = _COMMON_RANGES

    def check(self) -> None:
        """Cross-field conditions; raise UsageError. An experiment's Config extends it (calling
        ``super().check()``)."""
        steps, every = getattr(self, "steps", None), getattr(self, "eval_every", None)
        if steps is not None and every is not None and every > steps:
            raise UsageError(f"config field eval_every = {every} exceeds steps = {steps}: "
                             f"no evaluation would run")
        widths = getattr(self, "widths", None)
        if widths is not None and len(widths) < 2:
            raise UsageError(f"config field widths = {widths}: give at least the input and output "
                             f"widths (e.g. 784,100,10)")


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _parse(value: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:                                   # Optional[X]
        if value.lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse(value, inner[0], key)
    if origin in (tuple, list, Sequence) or annotation in (tuple, list):
        inner = args[0] if args else str
        items = [v for v in value.split(",") if v != ""]
        parsed = [_parse(v, inner, key) for v in items]
        return tuple(parsed) if origin is tuple or annotation is tuple else parsed
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--set {key}={value}: expected true/false")
    if annotation in (int, float, str):
        try:
            if annotation is int:
                number = float(value)
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return annotation(value)
        except (ValueError, OverflowError):
            raise UsageError(f"--set {key}={value}: expected {annotation.__name__}") from None
    if annotation is Ellipsis:
        return value
    raise UsageError(f"--set {key}: fields of type {annotation} cannot be set from the command line")


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of ``cfg`` with dotted keys set; strings are parsed by the field's type."""
    cfg = dataclasses.replace(cfg)
    for key, value in overrides.items():
        target = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if not hasattr(target, p) or not is_dataclass(getattr(target, p)):
                raise UsageError(f"unknown config key {key!r}")
            setattr(target, p, dataclasses.replace(getattr(target, p)))
            target = getattr(target, p)
        name = parts[-1]
        hints = typing.get_type_hints(type(target))
        if name not in {f.name for f in fields(target)}:
            known = ", ".join(sorted(f.name for f in fields(target)))
            raise UsageError(f"unknown config key {key!r}; known: {known}")
        if isinstance(value, str):
            value = _parse(value, hints[name], key)
        setattr(target, name, value)
    return cfg


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field of ``cfg`` against its type and range (see the module docstring);
    raise UsageError naming the field, its value and what is allowed."""
    hints = typing.get_type_hints(type(cfg))
    ranges = getattr(type(cfg), "RANGES", {})
    for f in fields(cfg):
        name, value = prefix + f.name, getattr(cfg, f.name)
        if is_dataclass(value):
            validate(value, prefix=name + ".")
            continue
        _check_value(name, value, hints[f.name], ranges.get(f.name))
    if hasattr(cfg, "check"):
        cfg.check()


def _check_value(name: str, value: Any, annotation: Any, rng: Optional[Range]) -> None:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:                                   # Optional[X]
        if value is None:
            return
        annotation = [a for a in args if a is not type(None)][0]
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (tuple, list) or annotation in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise UsageError(f"config field {name} = {value!r}: expected a list of values")
        if not value and not (rng is not None and rng.empty_ok):
            raise UsageError(f"config field {name} is empty: give at least one value "
                             f"(e.g. --set {name}=a,b)")
        inner = args[0] if args else str
        for v in value:
            _check_value(name, v, inner, rng)
        return
    if annotation is bool:
        if not isinstance(value, bool):
            raise UsageError(f"config field {name} = {value!r}: expected true or false")
        return
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"config field {name} = {value!r}: expected an integer")
        rng = rng or _INT_DEFAULT
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"config field {name} = {value!r}: expected a number")
        if not math.isfinite(value):
            raise UsageError(f"config field {name} = {value}: must be a finite number"
                             + (f" in {rng}" if rng else ""))
    elif annotation is str:
        if not isinstance(value, str):
            raise UsageError(f"config field {name} = {value!r}: expected a string")
        return
    else:
        return
    if rng is not None and not rng.holds(value):
        raise UsageError(f"config field {name} = {_num(value) if isinstance(value, (int, float)) else value}: "
                         f"allowed range {rng}")
