"""Files the lab writes: every one atomically (temporary file + rename), so an interrupted run
never leaves a half-written JSON, CSV or checkpoint behind."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch

from .._files import atomic_write_bytes, atomic_write_text, clear_directory

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "clear_directory", "read_json", "write_metrics_csv", "read_metrics_csv", "METRIC_COLUMNS"]

METRIC_COLUMNS = ("step", "seed", "arm", "metric", "value")


def _json_default(o: Any):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _finite(o: Any):
    """JSON has no NaN/Inf: write them as null (and say so in the value's name if it matters)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def atomic_write_json(path: Path | str, obj: Any) -> None:
    text = json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=2,
                      sort_keys=False)
    atomic_write_text(path, text + "\n")


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def write_metrics_csv(path: Path | str, rows: Iterable[dict]) -> None:
    """Tidy metrics: one row per (step, seed, arm, metric, value)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)
    for r in rows:
        value = r["value"]
        writer.writerow([r["step"], r["seed"], r["arm"], r["metric"],
                         repr(float(value)) if value is not None else "nan"])
    atomic_write_text(path, out.getvalue())


def read_metrics_csv(path: Path | str) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return [dict(step=int(r["step"]), seed=int(r["seed"]), arm=r["arm"], metric=r["metric"],
                     value=float(r["value"])) for r in reader]
