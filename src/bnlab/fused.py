r"""BatchNormAct2d: batch norm fused with its activation, memory-efficient in the style of In-Place
Activated BatchNorm (Rota Bulò, Porzi & Kontschieder 2018, arXiv:1712.02616).

A conv → BN → activation block normally keeps, for backward, the BN input x (for BN's gradient),
the BN output z (for a leaky ReLU's or an identity-free activation's gradient) and the block's
output a (which the next conv keeps anyway). Since BN's backward only needs x̂ = (x − μ)·invstd,
and x̂ can be recovered from a when the activation is invertible, only a needs to be kept::

    identity, leaky ReLU:  z = act⁻¹(a),  x̂ = (z − β)/γ,  dz = da·act'(z)
    dx = γ·invstd·(dz − mean(dz) − x̂·mean(dz·x̂)),  dγ = Σ dz·x̂,  dβ = Σ dz

so the block keeps one tensor (a, shared with the next layer) instead of three. Recovering x̂
divides by γ, so — as In-Place ABN does — the scale is used as |γ| + ε for these activations.

ReLU is not invertible (a = 0 erases z ≤ 0, and x̂ at those positions enters dx through the
x̂·mean(dz·x̂) term), nor is a leaky ReLU with slope ≤ 0 (slope 0 is ReLU; a negative slope maps
both signs of z to a ≥ 0), so these keep the *input* x instead and recompute x̂, z and the mask
in backward: one tensor besides the output, like torch's BN + ReLU — the fused kernel still
saves the intermediate z and a pass over memory. Every finite slope is supported.

Forward and backward run in bnlab's compiled CPU kernel (one pass for statistics, one for
normalize + activation; two passes backward). ``memory_efficient=False`` is BN followed by the
activation with the usual autograd bookkeeping (and γ as is). Eval mode: the inference transform
with the activation fused. The state_dict is BatchNorm2d's: torch checkpoints load.

The activation may also be a module (``activation=nn.SiLU(), drop=...``): y = act(drop(BN(x))),
the layout of timm's BatchNormAct2d, to which ``bnlab.convert`` maps timm's layers (same
state_dict keys). A module ReLU (or a leaky ReLU with slope ≤ 0) after an identity drop runs in
the fused kernel, which keeps the input and so computes exactly BN + activation; any other module
runs after bnlab's BN.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .options import Activation
from . import definition as D
from . import functional as BF
from .batchnorm import BatchNorm2d, _BatchNorm
from .errors import ArgumentError
from .kernels import dispatch

__all__ = ["BatchNormAct2d", "ACTIVATIONS"]

ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2}
GAMMA_EPS = 1e-5


def _activation(z: Tensor, name: str, slope: float) -> Tensor:
    if name == "relu":
        return F.relu(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, slope)
    return z


def _invertible(act: int, slope: float) -> bool:
    """Whether z can be recovered from a = act(z): the identity, or a leaky ReLU with slope > 0."""
    return act == ACTIVATIONS["identity"] or (act == ACTIVATIONS["leaky_relu"] and slope > 0)


class _BNActFn(torch.autograd.Function):
    """Training forward/backward of BN + activation keeping only one full-size tensor."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, act: int, slope: float,
                running: Optional[tuple], kernels):
        rm, rv, momentum, unbiased = running if running is not None else (None, None, 0.0, True)
        a, mean, var, invstd = kernels.forward_train(x, weight.detach(), bias.detach(), eps, act, slope,
                                                     rm, rv, momentum, unbiased)
        from_input = not _invertible(act, slope)
        ctx.save_for_backward(x if from_input else a, weight, bias, mean, invstd)
        ctx.act, ctx.slope, ctx.from_input, ctx.kernels = act, slope, from_input, kernels
        return a

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, da: Tensor):
        kept, weight, bias, mean, invstd = ctx.saved_tensors
        dx, dweight, dbias = ctx.kernels.bn_act_backward(da, kept, mean, invstd, weight.detach(),
                                                         bias.detach(), ctx.act, ctx.slope, ctx.from_input)
        return dx, dweight.to(weight.dtype), dbias.to(bias.dtype), None, None, None, None, None


class BatchNormAct2d(_BatchNorm):
    r"""BatchNorm2d followed by an activation, fused; optionally memory-efficient (In-Place ABN).

    A batch-norm layer (a ``_BatchNorm``, with BatchNorm2d's arguments, state_dict and input
    checks) but deliberately not a ``BatchNorm2d``: code that folds or converts "every
    BatchNorm2d" (``bnlab.fold``, ``torch.nn.utils.fusion``, init loops) must not take it for a
    plain BN and drop its activation. ``num_features``, ``eps``, ``momentum``, ``affine`` and
    ``track_running_stats`` are BatchNorm2d's.

    Args:
        activation: "relu", "leaky_relu" or "identity", or a module applied after ``drop``.
        negative_slope: the leaky ReLU's slope (0.01); any finite value (≤ 0: not invertible,
            the input is kept as for ReLU).
        memory_efficient: keep only the output (identity, leaky ReLU with slope > 0) or only the
            input (ReLU, slope ≤ 0) for backward, recomputing the rest; uses |γ| + ε as the scale
            when the output is kept. Falls back to BN + activation when the compiled kernel cannot run
            (non-CPU tensors, unusual layouts, a graph of the backward requested).
        drop: with a module activation, a module applied between BN and it (dropout, DropBlock);
            identity when omitted.

    Shape: (N, C, H, W) → (N, C, H, W).
    """

    _expected_dims = BatchNorm2d._expected_dims
    _shape_hint = BatchNorm2d._shape_hint
    _eval_is_bn = False              # its eval output is not BN's (activation; |γ| + ε): not frozen/folded

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 activation: Union[Activation, nn.Module] = "relu", negative_slope: float = 0.01,
                 memory_efficient: bool = True, drop: Optional[nn.Module] = None, **kwargs) -> None:
        is_module = isinstance(activation, nn.Module)
        if not is_module and activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a module, got {activation!r}")
        if drop is not None and not (is_module and isinstance(drop, nn.Module)):
            raise ValueError("drop must be a module, and needs a module activation (activation=nn.SiLU() ...)")
        if not isinstance(negative_slope, (int, float)) or not math.isfinite(negative_slope):
            raise ValueError(f"negative_slope must be a finite number, got {negative_slope!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.negative_slope = float(negative_slope)
        if is_module:
            self.activation = "module"
            self.drop = drop if drop is not None else nn.Identity()
            self.act = activation
        else:
            self.activation = activation
        self.memory_efficient = memory_efficient

    def _fused(self) -> Optional[tuple[int, float]]:
        """(activation code, slope) for the fused kernel, or None when the tail runs as modules."""
        if self.activation != "module":
            return ACTIVATIONS[self.activation], self.negative_slope
        if type(self.drop) is not nn.Identity:
            return None
        if type(self.act) is nn.ReLU:
            return ACTIVATIONS["relu"], 0.0
        if type(self.act) is nn.LeakyReLU and self.act.negative_slope <= 0:   # kept input: exact
            return ACTIVATIONS["leaky_relu"], float(self.act.negative_slope)
        return None

    def _tail(self, z: Tensor) -> Tensor:
        if self.activation == "module":
            return self.act(self.drop(z))
        return _activation(z, self.activation, self.negative_slope)

    def _scale_shift(self, x: Tensor) -> tuple[Tensor, Tensor]:
        acc = D.accumulation_dtype(x.dtype)
        w = self.weight if self.weight is not None else torch.ones(self.num_features, dtype=acc)
        b = self.bias if self.bias is not None else torch.zeros(self.num_features, dtype=acc)
        if self.activation != "module" and self.memory_efficient \
                and _invertible(ACTIVATIONS[self.activation], self.negative_slope):
            w = w.abs() + GAMMA_EPS                                   # kept output: x̂ = (z − β)/γ
        return w, b

    def forward(self, input: Tensor) -> Tensor:
        w, b = self._scale_shift(input)
        fused = self._fused()
        kernels = None
        if self.memory_efficient and fused is not None and not isinstance(input, torch.fx.Proxy):
            kernels = dispatch.select(input)
        if kernels is not None and not hasattr(kernels, "bn_act_backward"):
            kernels = None                                 # only the C++ backend fuses the activation
        if kernels is None:                                            # BN, then the activation
            return self._tail(self._forward_with(input, w, b))
        self._check_input_dim(input)
        self._check_finite(input)
        act, slope = fused
        if not self._uses_batch_stats():                               # eval / frozen: fused transform
            if torch.is_grad_enabled() and (input.requires_grad or w.requires_grad or b.requires_grad):
                # the fused eval kernel records no graph: with gradients wanted, BN's (autograd) path
                return self._tail(self._forward_with(input, w, b))
            return kernels.forward_eval(input, self.running_mean, self.running_var, w.detach(), b.detach(),
                                        self.eps, act, slope)
        BF.check_batch_size(input)
        if self.eps <= 0.0:
            raise ArgumentError(f"batch_norm eps must be positive during training, but got {self.eps}")
        running = None
        if self.training and self.track_running_stats and not self.frozen:
            running = (self.running_mean, self.running_var, self._momentum_step(),
                       self.running_var_correction == "unbiased")
        return _BNActFn.apply(input, w, b, self.eps, act, slope, running, kernels)

    def extra_repr(self) -> str:
        if self.activation == "module":                                # act and drop print as children
            return super().extra_repr()
        s = super().extra_repr() + f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        return s + f", memory_efficient={self.memory_efficient}"
