r"""What a batch-norm-like layer computes, as far as model surgery needs to know.

``convert``, ``fold`` and ``convert(to="frozen")`` rewrite layers; each must know what the layer's
forward *is*, not what its class derives from. timm's ``BatchNormAct2d`` derives from
``nn.BatchNorm2d`` but its forward is BN, then dropout, then an activation; a tool that trusts
``isinstance(m, nn.BatchNorm2d)`` drops the activation and silently changes the model. So a
layer is described by its forward:

    plain       forward is batch norm's own (torch.nn's, bnlab's BatchNorm1d/2d/3d and
                SyncBatchNorm): y = γ·(x − μ)/√(σ² + ε) + β
    norm-act    batch norm, then tail modules: y = tail(BN(x)) — bnlab's BatchNormAct2d, timm's
                BatchNormAct2d and SyncBatchNormAct (tail: drop, then act)
    frozen      the inference transform with constant statistics (bnlab's FrozenBatchNorm,
                torchvision's and timm's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d)
    variant     a bnlab variant whose *eval* forward is batch norm's (Batch Renorm, Ghost, noisy)

and anything else that looks like batch norm (a ``_BatchNorm`` subclass with its own forward) is
*unknown*: the tools leave it in place and say so by name. :func:`register_layout` describes
another library's layer. Matching is by the defining module and qualified name of ``forward``,
so bnlab imports neither timm nor torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

__all__ = ["Layout", "layout", "register_layout", "looks_like_batchnorm", "is_plain"]


@dataclass(frozen=True)
class Layout:
    """A layer's eval-mode function: y = tail(weight·(x − running_mean)/√(running_var + eps) + bias).

    ``weight``/``bias`` are the γ, β the layer actually applies (None: 1, 0); ``tail`` the modules
    after the normalization, in order; ``kind`` one of "plain", "norm_act", "frozen", "variant".
    """

    kind: str
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    eps: float
    tail: tuple[nn.Module, ...] = ()


Describer = Callable[[nn.Module], Optional[Layout]]
_REGISTERED: list[tuple[Callable[[nn.Module], bool], Describer]] = []


def register_layout(matches: Callable[[nn.Module], bool], describe: Describer) -> None:
    """Teach convert/fold/freeze another layer: ``matches(m)`` says whether ``describe(m)`` applies,
    and ``describe(m)`` returns its :class:`Layout` (or None for "leave it alone")."""
    _REGISTERED.append((matches, describe))


def _forward_of(m: nn.Module) -> tuple[str, str]:
    f = type(m).forward
    return getattr(f, "__module__", "") or "", getattr(f, "__qualname__", "") or ""


def _plain_forwards() -> set:
    from .batchnorm import _BatchNorm
    from .sync import SyncBatchNorm
    return {_TorchBatchNorm.forward, nn.SyncBatchNorm.forward, _BatchNorm.forward, SyncBatchNorm.forward}


def is_plain(m: nn.Module) -> bool:
    """Whether ``m``'s forward is batch norm's own (torch.nn's or bnlab's BatchNorm/SyncBatchNorm)."""
    return isinstance(m, _TorchBatchNorm) and type(m).forward in _plain_forwards()


def looks_like_batchnorm(m: nn.Module) -> bool:
    """A ``_BatchNorm`` subclass, or a module with batch norm's four tensors and an eps."""
    if isinstance(m, _TorchBatchNorm):
        return True
    names = set(m._buffers) | set(m._parameters)
    return {"weight", "bias", "running_mean", "running_var"} <= names and hasattr(m, "eps")


def _bn(kind: str, m: nn.Module, tail=(), weight=None, bias=None) -> Layout:
    return Layout(kind, m.weight if weight is None else weight, m.bias if bias is None else bias,
                  m.running_mean, m.running_var, float(m.eps), tuple(tail))


def _bnlab_norm_act(m: nn.Module) -> Layout:
    from .fused import ACTIVATIONS, GAMMA_EPS, _invertible
    if m.activation == "module":
        return _bn("norm_act", m, (m.drop, m.act))
    tail = {"relu": (nn.ReLU(),), "leaky_relu": (nn.LeakyReLU(m.negative_slope),), "identity": ()}[m.activation]
    weight = m.weight
    if m.memory_efficient and _invertible(ACTIVATIONS[m.activation], m.negative_slope):
        base = weight if weight is not None else torch.ones_like(m.running_mean)
        weight = base.detach().abs() + GAMMA_EPS                       # what its forward applies
    return _bn("norm_act", m, tail, weight=weight)


# (module of forward, qualname of forward) → describer, for layers of libraries bnlab does not import
_KNOWN = {
    ("timm.layers.norm_act", "BatchNormAct2d.forward"): lambda m: _bn("norm_act", m, (m.drop, m.act)),
    ("timm.layers.norm_act", "SyncBatchNormAct.forward"): lambda m: _bn("norm_act", m, (m.drop, m.act)),
    ("timm.layers.norm_act", "FrozenBatchNormAct2d.forward"): lambda m: _bn("frozen", m, (m.drop, m.act)),
    ("torchvision.ops.misc", "FrozenBatchNorm2d.forward"): lambda m: _bn("frozen", m),
}


def layout(m: nn.Module) -> Optional[Layout]:
    """The :class:`Layout` of a known batch-norm-like layer, or None (not BN, or unknown)."""
    for matches, describe in _REGISTERED:
        if matches(m):
            return describe(m)
    if is_plain(m):
        return _bn("plain", m)
    from .fused import BatchNormAct2d
    from .variants.frozen import FrozenBatchNorm
    if type(m).forward is BatchNormAct2d.forward:
        return _bnlab_norm_act(m)
    if type(m).forward is FrozenBatchNorm.forward:
        return _bn("frozen", m, m.tail_modules())
    module, qualname = _forward_of(m)
    if (module, qualname) in _KNOWN:
        return _KNOWN[(module, qualname)](m)
    if module.startswith("bnlab.") and isinstance(m, _TorchBatchNorm) and getattr(m, "_eval_is_bn", False):
        return _bn("variant", m)
    return None
