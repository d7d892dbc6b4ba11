"""``bnlab recalibrate CHECKPOINT --out NEW``: replace a model's running BN statistics by exact
population statistics over its training data, and report test accuracy before/after.

Models: the lab's checkpoints (rebuilt from their spec); any state_dict with ``--model
module:function`` (a function returning the nn.Module to load it into; a dict holding
"state_dict" or "model" is unwrapped); a whole pickled nn.Module only with
``--trust-checkpoint`` (unpickling it runs code from the file).

Data: MNIST or IDX files (``--data``), images fed flat (N, 784) or as (N, 1, 28, 28), whichever
the model accepts (or as ``--input-shape`` says); or any data with ``--loader module:function``,
a function returning an iterable of batches (a DataLoader: tensors, (x, y) tuples or dicts),
and ``--eval-loader`` likewise for the accuracy before/after. ``module`` is a module name
importable from the current directory or a path to a .py file — like the script of a launcher,
that code runs; the checkpoint's never does. The log says how many examples were used. The
output keeps the input's format, written atomically.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ..errors import BnlabError, DataError, UsageError
from ..isolation import isolated
from ..population import population_statistics
from . import data as data_mod
from .io import atomic_torch_save
from .models import CHECKPOINT_FORMAT, load_checkpoint

__all__ = ["recalibrate", "load_function"]


def load_function(spec: str, what: str) -> Callable:
    """``module:function`` or ``path/to/file.py:function`` → the function (its module is imported,
    so its code runs). Raises UsageError with what was wrong."""
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise UsageError(f"{what} must be module:function or file.py:function, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"{what}: no file {module_name}")
            module_spec = importlib.util.spec_from_file_location(f"_bnlab_user_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{what}: cannot import {module_name} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"{what}: {module_name} has no function {name!r}")
    return fn


def _load_state_dict_model(checkpoint: str, build: Callable[[], nn.Module]) -> tuple[nn.Module, dict]:
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:                       # noqa: BLE001 — any unreadable file is a data error
        raise DataError(f"{checkpoint}: not a state_dict torch.load(weights_only=True) can read "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj["state_dict"]
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{checkpoint}: not a state_dict (name → tensor)")
    model = build()
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model returned {type(model).__name__}, not an nn.Module")
    try:
        model.load_state_dict(obj)
    except RuntimeError as e:
        raise DataError(f"{checkpoint} does not fit the --model: {' '.join(str(e).split())[:300]}") from None
    return model, {"kind": "state_dict"}


class _Counted:
    """An iterable of batches that counts the examples it hands out: the most of any one pass
    (the statistics pass may iterate once per depth, or stop early to find the layers)."""

    def __init__(self, batches: Iterable) -> None:
        self.batches, self.examples = batches, 0

    def __iter__(self):
        seen = 0
        for batch in self.batches:
            seen += _examples(batch)
            self.examples = max(self.examples, seen)
            yield batch


def _examples(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, (tuple, list)) and batch:
        return _examples(batch[0])
    if isinstance(batch, dict) and batch:
        return _examples(next(iter(batch.values())))
    return 0


@torch.no_grad()
def _loader_accuracy(model: nn.Module, batches: Iterable) -> Optional[float]:
    """Top-1 accuracy over (x, y) batches, or None when the model's output is not (N, K) logits."""
    right = total = 0
    with isolated(model, "eval"):
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                return None
            out = model(batch[0])
            y = batch[1]
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or not isinstance(y, torch.Tensor):
                return None
            right += int((out.argmax(1) == y).sum())
            total += len(y)
    return right / total if total else None


def _shape_for(model: nn.Module, x: torch.Tensor, input_shape: Optional[Sequence[int]]) -> Sequence[int]:
    if input_shape:
        return tuple(input_shape)
    candidates = [(x.shape[1],), (1, 28, 28)]
    for shape in candidates:
        try:
            with isolated(model, "eval"), torch.no_grad():
                model(x[:2].reshape(2, *shape))
            return shape
        except Exception:       # the model does not take this layout: try the next one
            continue
    raise BnlabError("cannot tell the model's input layout (tried flat and (1, 28, 28)); "
                     "pass --input-shape, e.g. --input-shape 1,28,28")


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, shape) -> Optional[float]:
    with isolated(model, "eval"):
        out = model(x.reshape(len(x), *shape))
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < int(y.max()) + 1:
        return None
    return (out.argmax(1) == y).double().mean().item()


def recalibrate(checkpoint: str, out: str, data: str = "mnist", data_dir: Optional[str] = None,
                batch_size: Optional[int] = None, num_batches: Optional[int] = None,
                upstream: str = "population", estimator: str = "pooled", correction: str = "unbiased",
                input_shape: Optional[Sequence[int]] = None, trust_code: bool = False, log=print,
                model: Optional[str] = None, loader: Optional[str] = None,
                eval_loader: Optional[str] = None) -> dict:
    if model is not None:
        net, info = _load_state_dict_model(checkpoint, load_function(model, "--model"))
    else:
        net, info = load_checkpoint(checkpoint, trust_code=trust_code)
    if loader is not None:
        return _recalibrate_with_loader(net, info, checkpoint, out, loader, eval_loader, num_batches,
                                        upstream, estimator, correction, log)
    if eval_loader is not None:
        raise UsageError("--eval-loader goes with --loader")
    model = net
    ds = data_mod.load(data, data_dir)
    shape = _shape_for(model, ds.train_x, input_shape)
    if batch_size is None:
        # the pooled estimate of the inference network does not depend on the batch split, so
        # large batches are just faster; otherwise use the batch size the model was trained with
        split_free = upstream == "population" and estimator == "pooled"
        batch_size = 1000 if split_free else int(info.get("meta", {}).get("train_batch", 60) or 60)
    m = batch_size
    x = ds.train_x.reshape(len(ds.train_x), *shape)
    before = _accuracy(model, ds.test_x, ds.test_y, shape)
    batches = _Counted(list(x.split(m)))
    t0 = time.perf_counter()
    stats = population_statistics(model, batches, num_batches=num_batches, upstream=upstream,
                                  estimator=estimator, correction=correction, progress=True)
    seconds = time.perf_counter() - t0
    after = _accuracy(model, ds.test_x, ds.test_y, shape)
    _save(model, info, out, dict(upstream=upstream, estimator=estimator, correction=correction, batch_size=m))
    return _report(stats, batches.examples, seconds, before, after, out, log, batch_size=m)


def _save(model: nn.Module, info: dict, out: str, how: dict) -> None:
    if info.get("kind") == "lab":
        meta = dict(info.get("meta", {}), recalibrated=how)
        atomic_torch_save(dict(format=CHECKPOINT_FORMAT, spec=info["spec"], state_dict=model.state_dict(),
                               meta=meta), out)
    elif info.get("kind") == "state_dict":
        atomic_torch_save(model.state_dict(), out)
    else:
        atomic_torch_save(model, out)


def _report(stats, examples: int, seconds: float, before, after, out: str, log, **extra) -> dict:
    acc = ""
    if before is not None:
        acc = f"; test accuracy {before:.4f} (running EMA) → {after:.4f} (population statistics)"
    log(f"recalibrated {len(stats)} BN layer(s) over {examples} training examples in {seconds:.1f}s{acc}; "
        f"wrote {out}")
    return dict(layers=len(stats), examples=examples, seconds=seconds, test_acc_before=before,
                test_acc_after=after, out=str(Path(out)), **extra)


def _recalibrate_with_loader(model: nn.Module, info: dict, checkpoint: str, out: str, loader: str,
                             eval_loader: Optional[str], num_batches: Optional[int], upstream: str,
                             estimator: str, correction: str, log) -> dict:
    train = load_function(loader, "--loader")()
    evaluate = load_function(eval_loader, "--eval-loader")() if eval_loader else None
    before = _loader_accuracy(model, evaluate) if evaluate is not None else None
    batches = _Counted(train)
    t0 = time.perf_counter()
    stats = population_statistics(model, batches, num_batches=num_batches, upstream=upstream,
                                  estimator=estimator, correction=correction, progress=True)
    seconds = time.perf_counter() - t0
    after = _loader_accuracy(model, evaluate) if evaluate is not None else None
    _save(model, info, out, dict(upstream=upstream, estimator=estimator, correction=correction, loader=loader))
    return _report(stats, batches.examples, seconds, before, after, out, log)
