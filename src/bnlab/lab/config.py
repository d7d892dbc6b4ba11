"""Experiments are data: a config dataclass, named profiles, and typed ``--set key=value``.

Every experiment's config derives from :class:`BaseConfig`; its field defaults are the
``paper`` profile (the paper's scale where it fits a CPU), and ``profiles`` holds overrides for
``quick`` (same mechanism, small budget) and ``tiny`` (seconds, for tests). Overrides are typed
by the field they set (``--set steps=2000``, ``--set lr=0.05``, ``--set arms=bn,nobn``,
``--set data.path=DIR``) and an unknown key or an unparsable value is a clear error.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional, Sequence

__all__ = ["DataConfig", "BaseConfig", "apply_overrides", "config_to_dict", "parse_overrides",
           "PROFILES"]

PROFILES = ("tiny", "quick", "paper")


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
        raise ValueError(f"--set {key}={value}: expected true/false")
    if annotation in (int, float, str):
        try:
            return annotation(float(value)) if annotation is int and "e" in value.lower() else annotation(value)
        except ValueError:
            raise ValueError(f"--set {key}={value}: expected {annotation.__name__}") from None
    if annotation is Ellipsis:
        return value
    raise ValueError(f"--set {key}: fields of type {annotation} cannot be set from the command line")


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
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
                raise ValueError(f"unknown config key {key!r}")
            setattr(target, p, dataclasses.replace(getattr(target, p)))
            target = getattr(target, p)
        name = parts[-1]
        hints = typing.get_type_hints(type(target))
        if name not in {f.name for f in fields(target)}:
            known = ", ".join(sorted(f.name for f in fields(target)))
            raise ValueError(f"unknown config key {key!r}; known: {known}")
        if isinstance(value, str):
            value = _parse(value, hints[name], key)
        setattr(target, name, value)
    return cfg
