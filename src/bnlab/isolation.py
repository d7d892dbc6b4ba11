"""Run a model without changing it: the guard every measurement in bnlab goes through.

Measuring a network the naive way perturbs it: an extra forward pass in training mode updates
BN running statistics (and num_batches_tracked), switching to eval mode measures a different
function, dropout and noise layers advance the global random stream that training draws from,
and a probing optimizer step changes parameters and optimizer state. :func:`isolated` takes a
snapshot of everything a forward/backward can change and puts it back on exit — also when the
measurement raises:

  * every module's ``training`` flag (optionally forced to train or eval inside);
  * every buffer (running statistics, counters) — restored bit for bit;
  * every module's extra state (``get_extra_state``: e.g. a noise layer's seed and step);
  * optionally the parameters (for probes that move the weights) and their ``.grad``;
  * the CPU (and CUDA) random number generators, forked: the measurement gets its own stream.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["isolated", "snapshot_buffers", "restore_buffers", "snapshot_extra_state",
           "restore_extra_state"]


def snapshot_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.detach().clone()) for b in model.buffers()]


@torch.no_grad()
def restore_buffers(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for b, saved in snapshot:
        b.copy_(saved)


def _has_extra_state(m: nn.Module) -> bool:
    return type(m).get_extra_state is not nn.Module.get_extra_state


def snapshot_extra_state(model: nn.Module) -> list:
    """(module, state) for modules with extra state (the noise layers' seed and step...)."""
    return [(m, copy.deepcopy(m.get_extra_state())) for m in model.modules() if _has_extra_state(m)]


def restore_extra_state(snapshot: list) -> None:
    for m, state in snapshot:
        m.set_extra_state(copy.deepcopy(state))


@contextmanager
def isolated(model: nn.Module, mode: Optional[str] = None, *, parameters: bool = False,
             grads: bool = False, rng: bool = True) -> Iterator[nn.Module]:
    """Context in which ``model`` can be run freely; on exit it is exactly as before.

    Args:
        mode: "train" (batch statistics, as in training), "eval", or None (leave as is).
        parameters: also snapshot and restore parameter values (probes that step the weights).
        grads: also snapshot and restore parameters' ``.grad`` (probes that run backward).
        rng: fork the CPU/CUDA generators so training's random stream is not advanced.
    """
    if mode not in (None, "train", "eval"):
        raise ValueError(f"mode must be 'train', 'eval' or None, got {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    buffers = snapshot_buffers(model)
    extra = snapshot_extra_state(model)
    params = [(p, p.detach().clone()) for p in model.parameters()] if parameters else []
    saved_grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()] \
        if grads else []
    devices = list(range(torch.cuda.device_count())) if (rng and torch.cuda.is_available()) else []
    try:
        if rng:
            with torch.random.fork_rng(devices=devices):
                if mode is not None:
                    model.train(mode == "train")
                yield model
        else:
            if mode is not None:
                model.train(mode == "train")
            yield model
    finally:
        for m, flag in flags:
            m.training = flag
        restore_buffers(buffers)
        restore_extra_state(extra)
        with torch.no_grad():
            for p, value in params:
                p.copy_(value)
        for p, g in saved_grads:
            p.grad = g
