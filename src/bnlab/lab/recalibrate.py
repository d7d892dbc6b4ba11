"""``bnlab recalibrate CHECKPOINT --data mnist --out NEW``: replace a model's running EMA by
exact population statistics over the training images, and report test accuracy before/after.

Accepts the lab's checkpoints (rebuilt from their spec) and any ``torch.save``d nn.Module.
Images are fed flat (N, 784) or as (N, 1, 28, 28), whichever the model accepts (or as
``--input-shape`` says). The output keeps the input's format, written atomically.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import BnlabError
from ..isolation import isolated
from ..population import population_statistics
from . import data as data_mod
from .io import atomic_torch_save
from .models import CHECKPOINT_FORMAT, load_checkpoint

__all__ = ["recalibrate"]


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
                input_shape: Optional[Sequence[int]] = None, trust_code: bool = False, log=print) -> dict:
    model, info = load_checkpoint(checkpoint, trust_code=trust_code)
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
    t0 = time.perf_counter()
    stats = population_statistics(model, list(x.split(m)), num_batches=num_batches, upstream=upstream,
                                  estimator=estimator, correction=correction, progress=True)
    seconds = time.perf_counter() - t0
    after = _accuracy(model, ds.test_x, ds.test_y, shape)
    if info.get("kind") == "lab":
        meta = dict(info.get("meta", {}), recalibrated=dict(upstream=upstream, estimator=estimator,
                                                            correction=correction, batch_size=m))
        atomic_torch_save(dict(format=CHECKPOINT_FORMAT, spec=info["spec"], state_dict=model.state_dict(),
                               meta=meta), out)
    else:
        atomic_torch_save(model, out)
    summary = dict(layers=len(stats), batch_size=m, seconds=seconds, test_acc_before=before,
                   test_acc_after=after, out=str(Path(out)))
    acc = ""
    if before is not None:
        acc = f"; test accuracy {before:.4f} (running EMA) → {after:.4f} (population statistics)"
    log(f"recalibrated {len(stats)} BN layer(s) over {len(x)} training images in {seconds:.1f}s{acc}; "
        f"wrote {out}")
    return summary
