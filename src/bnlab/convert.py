"""Swap every batch-norm layer of a model for another implementation, keeping its state.

``convert(model, to="bnlab")`` replaces ``torch.nn.BatchNorm1d/2d/3d`` (and subclasses) by
``bnlab.BatchNorm1d/2d/3d``; ``to="torch"`` goes back. Other targets register themselves with
:func:`register_target` (e.g. ``"sync"``, ``"frozen"`` in later modules).

Only layers whose forward is known are touched (:mod:`bnlab.layouts`): torch's and bnlab's plain
batch norm, and norm-act layers such as timm's ``BatchNormAct2d`` (BN, dropout, activation),
which become ``bnlab.BatchNormAct2d`` with the same ``drop`` and ``act`` modules. A layer that
derives from ``_BatchNorm`` but computes something else is left as it is, and one warning names
every such layer: a conversion never changes what a model computes.

The swap is zero-copy: the new layer receives the *same* Parameter and buffer objects, so an
optimizer built before the conversion keeps updating the right tensors, and hooks registered on
the old layer move with it. The training flag, device and dtype are kept. The model is changed
in place; the (possibly new) root is returned, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
does, so ``model = bnlab.convert(model)`` is always right.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .options import ConvertTarget
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm
from .layouts import is_plain, layout, looks_like_batchnorm

__all__ = ["convert", "register_target", "transfer_state", "bn_dim"]

# A target maps a layer to its replacement; None leaves it as it is (not the target's business),
# a string leaves it as it is and says why (convert warns, naming the layer).
Converter = Callable[[nn.Module], Union[nn.Module, str, None]]
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
    if isinstance(m, _BatchNorm):
        return None
    if not is_plain(m):
        return _norm_act_to_bnlab(m)
    _refuse_lazy(m)
    if isinstance(m, nn.SyncBatchNorm):              # torch's SyncBN → bnlab's, still synchronized
        return _to_sync(m, process_group=m.process_group)
    dim = bn_dim(m)
    if dim is None:
        return None
    return _new_like(_BNLAB_BY_DIM[dim], m)


def _unknown(m: nn.Module, what: str = "batch norm's") -> Optional[str]:
    """The reason a batch-norm-like layer is left alone, or None for other modules."""
    if not looks_like_batchnorm(m):
        return None
    return f"{type(m).__name__}: its forward is not {what}"


def _norm_act_to_bnlab(m: nn.Module) -> Union[nn.Module, str, None]:
    """A norm-act layer derived from nn.BatchNorm2d (timm's BatchNormAct2d) → bnlab.BatchNormAct2d
    with the same drop and act modules; anything else batch-norm-like is left, with its reason."""
    from .fused import BatchNormAct2d
    lay = layout(m)
    if lay is None:
        return _unknown(m)
    if lay.kind != "norm_act" or not isinstance(m, nn.BatchNorm2d) or isinstance(m, nn.SyncBatchNorm) \
            or len(lay.tail) != 2:
        return None if lay.kind == "frozen" else f"{type(m).__name__}: no bnlab equivalent"
    _refuse_lazy(m)
    drop, act = lay.tail
    return _new_like(BatchNormAct2d, m, activation=act, drop=drop)


def _bnlab_options(m: nn.Module) -> dict:
    return {k: getattr(m, k) for k in ("running_var_correction", "batch_of_one", "check_finite", "ema")
            if hasattr(m, k)}


@register_target("sync")
def _to_sync(m: nn.Module, process_group=None) -> Optional[nn.Module]:
    """Any batch-norm layer (torch's, bnlab's, torch's SyncBatchNorm) → bnlab.SyncBatchNorm."""
    from .sync import SyncBatchNorm
    if isinstance(m, SyncBatchNorm):
        return None
    if not is_plain(m):
        return _unknown(m, "plain batch norm's")     # variants and norm-act layers keep their semantics
    _refuse_lazy(m)
    new = _new_like(SyncBatchNorm, m, process_group=process_group, **_bnlab_options(m))
    new.bn_dim = bn_dim(m)
    return new


@register_target("torch")
def _to_torch(m: nn.Module) -> Optional[nn.Module]:
    from .sync import SyncBatchNorm
    if not isinstance(m, _BatchNorm):
        return None
    if not is_plain(m):
        return f"{type(m).__name__}: torch.nn has no equivalent"
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


def convert(model: nn.Module, to: ConvertTarget = "bnlab", **options: Any) -> nn.Module:
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

    left: list[str] = []

    def swap(m: nn.Module, name: str) -> nn.Module:
        new = converter(m, **options) if options else converter(m)
        if isinstance(new, str):
            left.append(f"{name or '<root>'} ({new})")
            return m
        return m if new is None else new

    root = swap(model, "")
    stack = [("", root)]
    while stack:
        prefix, parent = stack.pop()
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            qualname = f"{prefix}.{name}" if prefix else name
            new = swap(child, qualname)
            if new is not child:
                parent._modules[name] = new
            stack.append((qualname, new))
    if left:
        shown = "; ".join(left[:8]) + (f"; and {len(left) - 8} more" if len(left) > 8 else "")
        warnings.warn(f"bnlab.convert(to={to!r}) left {len(left)} layer(s) as they are, so the model "
                      f"computes what it did: {shown}", stacklevel=2)
    return root



@register_target("frozen")
def _to_frozen(m: nn.Module) -> Union[nn.Module, str, None]:
    """Every BN layer whose eval forward is known → FrozenBatchNorm with its eval-mode statistics
    and affine as constant buffers, and a norm-act layer's drop and act modules after it."""
    from .variants.frozen import FrozenBatchNorm
    lay = layout(m)
    if lay is None:
        return _unknown(m)
    if lay.kind == "frozen":
        return None
    if lay.running_mean is None or lay.running_var is None:
        raise ValueError(f"{type(m).__name__} has no running statistics (track_running_stats=False): "
                         f"there is nothing to freeze it to")
    drop, act = (lay.tail + (None, None))[:2] if len(lay.tail) == 2 else (None, lay.tail[0] if lay.tail else None)
    rm = lay.running_mean
    frozen = FrozenBatchNorm(rm.numel(), lay.eps, device=rm.device, dtype=rm.dtype, act=act, drop=drop)
    with torch.no_grad():
        frozen.running_mean.copy_(rm)
        frozen.running_var.copy_(lay.running_var)
        if lay.weight is not None:
            frozen.weight.copy_(lay.weight.detach().reshape(-1))
        if lay.bias is not None:
            frozen.bias.copy_(lay.bias.detach().reshape(-1))
    return frozen


def _to_variant(dims: dict, m: nn.Module, **kwargs) -> Union[nn.Module, str, None]:
    if not is_plain(m):
        return _unknown(m, "plain batch norm's")
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


def _register_with_torch_fusers() -> None:
    """Let ``torch.ao.quantization.fuse_modules`` fuse Conv/Linear + bnlab's BatchNorm (+ ReLU) as
    it fuses torch's: every default fuser pattern with torch's BatchNormNd gets a twin with
    bnlab's, whose fuser swaps in a torch layer sharing the same tensors (``convert(to="torch")``)
    and calls torch's own fuser. Skipped quietly if torch's table is not where it was."""
    try:
        from torch.ao.quantization import fuser_method_mappings as mappings
        table = mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    except (ImportError, AttributeError):
        return
    ours = {t: b for t, b in zip(_TORCH_BY_DIM.values(), _BNLAB_BY_DIM.values())}

    def via_torch(fuser):
        def fuse(is_qat, *modules):
            return fuser(is_qat, *(_to_torch(m) if type(m) in ours.values() else m for m in modules))
        return fuse

    for ops, fuser in list(table.items()):
        if any(op in ours for op in ops) and callable(fuser) and not isinstance(fuser, type):
            twin = tuple(ours.get(op, op) for op in ops)
            table.setdefault(twin, via_torch(fuser))


_register_with_torch_fusers()
