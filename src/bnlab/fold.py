r"""Fold batch norm into the linear or convolution layer before it, for deployment.

In eval mode BN is a fixed per-channel affine map (Algorithm 2), so a Linear/Conv followed by
BN is one Linear/Conv::

    s  = γ · rsqrt(σ² + ε)                    per output channel
    W′ = W · s                                (scaled along the output-channel axis)
    b′ = (b − μ) · s + β                      (b = 0 when the layer has no bias)

computed in float64 and cast back to the layer's dtype; affine=False means γ = 1, β = 0.
ConvTranspose keeps output channels on weight axis 1 (in groups), which is handled.

Which layers are batch norm is read from their forward (:mod:`bnlab.layouts`), not their class:
plain BN, bnlab's variants whose eval is BN's, frozen BN (bnlab's, torchvision's, timm's) and
norm-act layers (bnlab's and timm's BatchNormAct2d: BN, then drop and act), whose drop and act
stay in place of the folded BN. A layer that derives from ``_BatchNorm`` but computes something
else is kept, with the reason in the report. Given an example input, fold compares the folded
model's output with the original's and raises rather than return a model that computes
something else.

Which BN follows which layer is read from the model's graph (torch.fx, with BN layers as
leaves): a pair is folded only when the layer's output feeds the BN and nothing else, and
neither module is used twice. Models fx cannot trace fall back to neighbours inside
``nn.Sequential`` containers. BN layers without running statistics cannot be folded (they
normalize with batch statistics even in eval) and are left in place, as are BN layers that
follow anything else.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .errors import BnlabError, ModeError
from .layouts import layout, looks_like_batchnorm

__all__ = ["fold", "fold_weights", "FoldReport", "FoldError"]

_LINEAR_LIKE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class FoldError(BnlabError, RuntimeError):
    """The folded model's output differs from the original's on the example input."""


@dataclass
class FoldReport:
    folded: list[tuple[str, str]] = field(default_factory=list)      # (layer, bn)
    skipped: list[tuple[str, str]] = field(default_factory=list)     # (bn, why)
    method: str = "fx"
    max_abs_diff: Optional[float] = None

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BN layer(s) ({self.method})"]
        lines += [f"  {bn} → {layer}" for layer, bn in self.folded]
        lines += [f"  kept {bn}: {why}" for bn, why in self.skipped]
        if self.max_abs_diff is not None:
            lines.append(f"  max |folded − original| on the example input: {self.max_abs_diff:.3g}")
        return "\n".join(lines)


@torch.no_grad()
def fold_weights(weight: Tensor, bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
                 eps: float, gamma: Optional[Tensor], beta: Optional[Tensor],
                 transposed: bool = False, groups: int = 1) -> tuple[Tensor, Tensor]:
    """(W′, b′) of the layer that equals ``bn(layer(x))`` in eval mode, in weight's dtype.

    weight: (C_out, ...) for Linear/Conv; (C_in, C_out/groups, ...) for ConvTranspose.
    """
    f64 = torch.float64
    scale = torch.rsqrt(running_var.to(f64) + eps)                                  # C_out
    if gamma is not None:
        scale = scale * gamma.to(f64)
    b = torch.zeros_like(scale) if bias is None else bias.to(f64)
    new_bias = (b - running_mean.to(f64)) * scale
    if beta is not None:
        new_bias = new_bias + beta.to(f64)
    w = weight.to(f64)
    if transposed:
        c_in, c_out_per_group = w.shape[0], w.shape[1]
        grouped = w.reshape(groups, c_in // groups, c_out_per_group, *w.shape[2:])
        s = scale.reshape(groups, 1, c_out_per_group, *([1] * (w.dim() - 2)))
        new_weight = (grouped * s).reshape(w.shape)
    else:
        new_weight = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


def _candidates_fx(model: nn.Module) -> list[tuple[str, str]]:
    import torch.fx as fx

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return (looks_like_batchnorm(m) or layout(m) is not None or isinstance(m, _LINEAR_LIKE)
                    or super().is_leaf_module(m, qualname))

    graph = _Tracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        producer = node.args[0]
        if not isinstance(producer, fx.Node) or producer.op != "call_module":
            continue
        if len(producer.users) != 1 or calls[node.target] != 1 or calls[producer.target] != 1:
            continue
        pairs.append((producer.target, node.target))
    return pairs


def _candidates_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container._modules.items())
        for (a, first), (b, second) in zip(children, children[1:]):
            prefix = f"{name}." if name else ""
            pairs.append((prefix + a, prefix + b))
    return pairs


def _set_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[child] = new


def _refuse_training(module: nn.Module, args: Any) -> None:
    if module.training:
        raise ModeError("this model has batch norm folded into its layers and is for inference "
                        "only: call .eval() (train the original model instead)")


def _first_tensor_diff(a: Any, b: Any) -> float:
    if isinstance(a, Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        return max((_first_tensor_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        return max((_first_tensor_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0


def fold(model: nn.Module, example_input: Any = None, *, return_report: bool = False):
    """An eval-only copy of ``model`` with every foldable BN folded into the layer before it.

    Args:
        model: a model in eval mode (``model.eval()``): folding uses the running statistics.
        example_input: optional input (a tensor, or a tuple of positional arguments); if given,
            the maximum absolute difference between the folded and the original outputs is
            measured and stored in the report.
        return_report: return ``(folded, FoldReport)`` instead of the model alone. The report
            is also attached to the returned model as ``fold_report``.

    Raises:
        ModeError: if the model (or any BN layer in it) is in training mode.
        FoldError: if, on ``example_input``, the folded model's output differs from the original's.
    """
    training = [n for n, m in model.named_modules()
                if m.training and (n == "" or (looks_like_batchnorm(m) and getattr(layout(m), "kind", "") != "frozen"))]
    if training:
        raise ModeError(f"fold needs an eval-mode model (call model.eval() first): folding "
                        f"bakes the running statistics into the weights, which training mode "
                        f"does not use. In training mode: {training[:5]}")
    folded = copy.deepcopy(model).eval()
    report = FoldReport()
    try:
        pairs = _candidates_fx(folded)
    except Exception:                      # data-dependent control flow and the like
        pairs = _candidates_sequential(folded)
        report.method = "sequential"
    uses: dict[int, int] = {}
    for _, m in folded.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    followed = set()
    for layer_name, bn_name in pairs:
        layer, bn = folded.get_submodule(layer_name), folded.get_submodule(bn_name)
        lay = layout(bn)
        if not isinstance(layer, _LINEAR_LIKE) or (lay is None and not looks_like_batchnorm(bn)):
            continue
        followed.add(bn_name)
        if lay is None:
            report.skipped.append((bn_name, f"{type(bn).__name__}: its forward is not batch norm's"))
            continue
        if lay.running_mean is None or lay.running_var is None:
            report.skipped.append((bn_name, "no running statistics (track_running_stats=False)"))
            continue
        if uses[id(layer)] > 1 or uses[id(bn)] > 1:
            report.skipped.append((bn_name, "a module used in more than one place"))
            continue
        out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if out_channels != lay.running_mean.numel():
            report.skipped.append((bn_name, f"{out_channels} outputs vs {lay.running_mean.numel()} features"))
            continue
        transposed = isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
        gamma = None if lay.weight is None else lay.weight.reshape(-1)
        beta = None if lay.bias is None else lay.bias.reshape(-1)
        weight, bias = fold_weights(layer.weight, layer.bias, lay.running_mean, lay.running_var,
                                    lay.eps, gamma, beta, transposed=transposed,
                                    groups=getattr(layer, "groups", 1))
        layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
        tail = [m for m in lay.tail if type(m) is not nn.Identity]
        _set_submodule(folded, bn_name, nn.Sequential(*tail) if tail else nn.Identity())
        report.folded.append((layer_name, bn_name))
    for name, m in folded.named_modules():
        if (looks_like_batchnorm(m) or layout(m) is not None) and name not in followed:
            report.skipped.append((name, "does not follow a Linear/Conv layer"))
    folded.register_forward_pre_hook(_refuse_training)
    if example_input is not None:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        with torch.no_grad():
            out, expected = folded(*args), model(*args)
        report.max_abs_diff = _first_tensor_diff(out, expected)
        tolerance = _tolerance(expected)
        if report.max_abs_diff > tolerance:
            raise FoldError(f"folding changed the model's output by {report.max_abs_diff:.3g} (tolerance "
                            f"{tolerance:.3g}) on the example input; nothing was returned.\n{report}")
    folded.fold_report = report
    return (folded, report) if return_report else folded


def _tolerance(expected: Any) -> float:
    """How far a correct fold may move the output: rounding of the reordered products, in the
    output's dtype, relative to its magnitude."""
    tensors = [t for t in _tensors(expected) if t.is_floating_point() and t.numel()]
    if not tensors:
        return float("inf")
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
    scale = max(t.detach().double().abs().max().item() for t in tensors)
    return (5e-2 if low else 1e-3) * (1.0 + scale)


def _tensors(a: Any) -> list:
    if isinstance(a, Tensor):
        return [a]
    if isinstance(a, dict):
        return [t for v in a.values() for t in _tensors(v)]
    if isinstance(a, (list, tuple)):
        return [t for v in a for t in _tensors(v)]
    return []
