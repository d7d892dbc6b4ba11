"""Swap every batch-norm layer of a model for another implementation, keeping its state.

``convert(model, to="bnlab")`` replaces ``torch.nn.BatchNorm1d/2d/3d`` (and subclasses) by
``bnlab.BatchNorm1d/2d/3d``; ``to="torch"`` goes back. Other targets register themselves with
:func:`register_target` (e.g. ``"sync"``, ``"frozen"`` in later modules).

The swap is zero-copy: the new layer receives the *same* Parameter and buffer objects, so an
optimizer built before the conversion keeps updating the right tensors, and hooks registered on
the old layer move with it. The training flag, device and dtype are kept. The model is changed
in place; the (possibly new) root is returned, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
does, so ``model = bnlab.convert(model)`` is always right.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["convert", "register_target", "transfer_state", "bn_dim"]

# A target maps a batch-norm layer to its replacement, or returns None to leave it as it is.
Converter = Callable[[nn.Module], Optional[nn.Module]]
_TARGETS: Dict[str, Converter] = {}

_TORCH_BY_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_BNLAB_BY_DIM = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


def register_target(name: str) -> Callable[[Converter], Converter]:
    """Decorator: make ``convert(model, to=name)`` use this per-layer converter."""
    def deco(fn: Converter) -> Converter:
        _TARGETS[name] = fn
        return fn
    return deco


def bn_dim(module: nn.Module) -> Optional[int]:
    """1, 2 or 3 for a BatchNorm1d/2d/3d (torch's, bnlab's or a subclass); None otherwise."""
    for dim, (t, b) in enumerate(zip(_TORCH_BY_DIM.values(), _BNLAB_BY_DIM.values()), start=1):
        if isinstance(module, (t, b)):
            return dim
    return getattr(module, "bn_dim", None)


def transfer_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` the very tensors, flags and hooks of ``src`` (no copies). Returns dst."""
    for name in ("weight", "bias"):
        if name in dst._parameters:
            dst._parameters[name] = src._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if name in dst._buffers:
            dst._buffers[name] = src._buffers.get(name)
    dst.train(src.training)
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        if hasattr(src, hooks):
            setattr(dst, hooks, getattr(src, hooks))
    return dst


def _config(m: _TorchBatchNorm) -> dict:
    return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats)


def _new_like(cls, m: _TorchBatchNorm, **extra) -> nn.Module:
    # Built on the meta device: its own tensors are never allocated, transfer_state gives it m's.
    kwargs = _config(m)
    if m.affine and m.bias is None:
        kwargs["bias"] = False
    new = cls(**kwargs, device="meta", **extra)
    return transfer_state(m, new)


def _refuse_lazy(m: nn.Module) -> None:
    if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
        raise ValueError(f"{type(m).__name__} is not initialized yet: run one forward pass "
                         f"before converting it")


@register_target("bnlab")
def _to_bnlab(m: nn.Module) -> Optional[nn.Module]:
    from .sync import SyncBatchNorm
    if isinstance(m, SyncBatchNorm):                 # back from "sync": the BatchNorm it came from
        dim = bn_dim(m)
        if dim is None:
            raise ValueError("this SyncBatchNorm never saw an input and was not converted from a "
                             "BatchNorm1d/2d/3d: its dimensionality is unknown; run one forward first")
        return _new_like(_BNLAB_BY_DIM[dim], m, **_bnlab_options(m))
    if isinstance(m, _BatchNorm) or not isinstance(m, _TorchBatchNorm):
        return None
    _refuse_lazy(m)
    if isinstance(m, nn.SyncBatchNorm):              # torch's SyncBN → bnlab's, still synchronized
        return _to_sync(m, process_group=m.process_group)
    dim = bn_dim(m)
    if dim is None:
        return None
    return _new_like(_BNLAB_BY_DIM[dim], m)


def _bnlab_options(m: nn.Module) -> dict:
    return {k: getattr(m, k) for k in ("running_var_correction", "batch_of_one", "check_finite", "ema")
            if hasattr(m, k)}


@register_target("sync")
def _to_sync(m: nn.Module, process_group=None) -> Optional[nn.Module]:
    """Any batch-norm layer (torch's, bnlab's, torch's SyncBatchNorm) → bnlab.SyncBatchNorm."""
    from .sync import SyncBatchNorm
    if not isinstance(m, _TorchBatchNorm) or isinstance(m, SyncBatchNorm):
        return None
    if isinstance(m, _BatchNorm) and not _plain_bn(m):
        return None                                  # variants keep their own semantics
    _refuse_lazy(m)
    new = _new_like(SyncBatchNorm, m, process_group=process_group, **_bnlab_options(m))
    new.bn_dim = bn_dim(m)
    return new


@register_target("torch")
def _to_torch(m: nn.Module) -> Optional[nn.Module]:
    from .sync import SyncBatchNorm
    if not isinstance(m, _BatchNorm):
        return None
    if isinstance(m, SyncBatchNorm):
        return _new_like(nn.SyncBatchNorm, m, process_group=m.process_group)
    dim = bn_dim(m)
    if dim is None:
        return None
    if getattr(m, "frozen", False) or getattr(m, "running_var_correction", "unbiased") != "unbiased":
        warnings.warn(f"{type(m).__name__}: torch.nn.BatchNorm{dim}d has no frozen mode or "
                      f"biased running variance; the converted layer uses torch's defaults",
                      stacklevel=3)
    new = _new_like(_TORCH_BY_DIM[dim], m)
    # A frozen bnlab layer stopped γ/β; torch has no such mode, so restore their flags.
    saved = getattr(m, "_requires_grad_before_freeze", None)
    if saved:
        for name, flag in saved.items():
            p = new._parameters.get(name)
            if p is not None:
                p.requires_grad_(flag)
    return new


def convert(model: nn.Module, to: str = "bnlab", **options) -> nn.Module:
    """Replace every batch-norm layer of ``model`` (nested at any depth) by the ``to`` kind.

    Args:
        model: any module; may itself be a batch-norm layer.
        to: ``"bnlab"``, ``"torch"``, ``"sync"`` (bnlab.SyncBatchNorm; option process_group;
            ``to="bnlab"`` goes back), ``"frozen"``, ``"renorm"``, ``"ghost"``.
        options: passed to the target's converter when it accepts them (e.g. process_group).

    Returns:
        The converted model — the same object unless ``model`` itself was replaced.
    """
    if to not in _TARGETS:
        raise ValueError(f"unknown conversion target {to!r}; known: {sorted(_TARGETS)}")
    converter = _TARGETS[to]

    def swap(m: nn.Module) -> nn.Module:
        new = converter(m, **options) if options else converter(m)
        return m if new is None else new

    root = swap(model)
    stack = [root]
    while stack:
        parent = stack.pop()
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            new = swap(child)
            if new is not child:
                parent._modules[name] = new
            stack.append(new)
    return root



def _plain_bn(m: nn.Module) -> bool:
    """A batch-norm layer of the standard kind (torch's or bnlab's BatchNormNd or SyncBatchNorm,
    not a variant that changes the forward)."""
    from .sync import SyncBatchNorm
    return isinstance(m, _TorchBatchNorm) and (
        type(m).forward in (nn.BatchNorm1d.forward, _BatchNorm.forward, nn.SyncBatchNorm.forward,
                            SyncBatchNorm.forward))


@register_target("frozen")
def _to_frozen(m: nn.Module) -> Optional[nn.Module]:
    """Every BN layer → FrozenBatchNorm with its statistics and affine as constant buffers."""
    from .variants.frozen import FrozenBatchNorm
    if not isinstance(m, _TorchBatchNorm) or not getattr(m, "_eval_is_bn", True):
        return None                                  # e.g. BatchNormAct2d: BN and an activation
    if m.running_mean is None:
        raise ValueError(f"{type(m).__name__} has no running statistics (track_running_stats=False): "
                         f"there is nothing to freeze it to")
    frozen = FrozenBatchNorm(m.num_features, m.eps, device=m.running_mean.device, dtype=m.running_mean.dtype)
    with torch.no_grad():
        frozen.running_mean.copy_(m.running_mean)
        frozen.running_var.copy_(m.running_var)
        if m.weight is not None:
            frozen.weight.copy_(m.weight.detach())
        if m.bias is not None:
            frozen.bias.copy_(m.bias.detach())
    return frozen


def _to_variant(dims: dict, m: nn.Module, **kwargs) -> Optional[nn.Module]:
    if not _plain_bn(m):
        return None
    dim = bn_dim(m)
    if dim not in dims:
        raise ValueError(f"no {sorted(dims)}-D form for {type(m).__name__}")
    return _new_like(dims[dim], m, **kwargs)


@register_target("renorm")
def _to_renorm(m: nn.Module, **kwargs) -> Optional[nn.Module]:
    """BN → BatchRenorm1d/2d with the same statistics (options: rmax, dmax, warmup, ...)."""
    from .variants.renorm import BatchRenorm1d, BatchRenorm2d
    return _to_variant({1: BatchRenorm1d, 2: BatchRenorm2d}, m, **kwargs)


@register_target("ghost")
def _to_ghost(m: nn.Module, **kwargs) -> Optional[nn.Module]:
    """BN → GhostBatchNorm1d/2d with the same statistics (option: virtual_batch_size)."""
    from .variants.ghost import GhostBatchNorm1d, GhostBatchNorm2d
    return _to_variant({1: GhostBatchNorm1d, 2: GhostBatchNorm2d}, m, **kwargs)
