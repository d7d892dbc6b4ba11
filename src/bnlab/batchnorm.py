r"""Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

The modules hold state (γ, β, running_mean, running_var, num_batches_tracked) and call the pure
functions of :mod:`bnlab.functional`. They subclass ``torch.nn.modules.batchnorm._BatchNorm``
for its plumbing only — constructor arguments, parameter/buffer registration, ``state_dict``
keys, ``_version = 2`` and its loader for old checkpoints — so that a torch checkpoint loads into
bnlab and back, and tools that look for ``_BatchNorm`` (weight-decay filters, SyncBN converters,
precise-BN utilities) see bnlab's layers. ``BatchNorm1d/2d/3d`` are also instances of
``torch.nn.BatchNorm1d/2d/3d`` (as drop-ins should be: model code checks
``isinstance(m, nn.BatchNorm2d)`` to initialize, fuse or exclude layers); bnlab's methods come
first in the MRO. The forward is bnlab's own. Layers whose forward is not plain BN
(``BatchNormAct2d``) derive from ``_BatchNorm`` only.

Semantics match ``torch.nn`` by default: momentum 0.1 EMA of the mean and the
*unbiased* batch variance; ``momentum=None`` gives the cumulative average 1/num_batches_tracked;
ε inside the square root; ``num_batches_tracked`` increments on every training forward;
``track_running_stats=False`` normalizes with batch statistics in eval too.

What torch.nn lacks, as explicit options:
  * ``running_var_correction="unbiased"|"biased"`` — which batch variance the EMA averages;
  * ``freeze()``/``unfreeze()`` — a frozen layer normalizes with its running statistics and
    updates nothing (no statistics, no counter, and by default no γ/β gradients), and it stays
    frozen through ``model.train()``;
  * ``batch_of_one="raise"|"use_running_stats"`` — what a training batch with a single value per
    channel does: a clear error (default), or normalization with the running statistics;
  * ``check_finite=True`` — raise before any buffer is touched when the input holds NaN/Inf;
  * ``ema="debiased"`` — Haiku's debiased moving average (m_t = m/(1 − (1 − m)^t)) instead of
    PyTorch's plain EMA, so early running statistics are not pulled towards the initial 0/1;
  * float16/bfloat16 inputs are normalized in float32; a float32 module fed low-precision
    inputs (autocast style) keeps float32 statistics and returns the input's dtype.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .options import EMA, BatchOfOne, VarCorrection
from . import definition as D
from . import functional as BF
from .errors import ModeError, NonFiniteError, ShapeError

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "is_batchnorm", "BATCH_OF_ONE"]

BATCH_OF_ONE = ("raise", "use_running_stats")
_TORCH_HAS_BIAS_KWARG = "bias" in inspect.signature(_TorchBatchNorm.__init__).parameters


class _BatchNorm(_TorchBatchNorm):
    """Common module of bnlab.BatchNorm1d/2d/3d (see the module docstring)."""

    _expected_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True, running_var_correction: VarCorrection = "unbiased",
                 batch_of_one: BatchOfOne = "raise", check_finite: bool = False,
                 ema: EMA = "pytorch") -> None:
        if running_var_correction not in D.VAR_CORRECTIONS:
            raise ValueError(f"running_var_correction must be one of {D.VAR_CORRECTIONS}, "
                             f"got {running_var_correction!r}")
        if batch_of_one not in BATCH_OF_ONE:
            raise ValueError(f"batch_of_one must be one of {BATCH_OF_ONE}, got {batch_of_one!r}")
        if ema not in ("pytorch", "debiased"):
            raise ValueError(f"ema must be 'pytorch' or 'debiased' (cumulative: momentum=None), got {ema!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum}")
        if _TORCH_HAS_BIAS_KWARG:
            super().__init__(num_features, eps, momentum, affine, track_running_stats,
                             device, dtype, bias=bias)
        else:  # torch < 2.6: no bias= argument, emulate it
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
            if affine and not bias:
                self.register_parameter("bias", None)
        self.running_var_correction = running_var_correction
        self.batch_of_one = batch_of_one
        self.check_finite = check_finite
        self.ema = ema
        self.frozen = False
        self._requires_grad_before_freeze: Optional[dict[str, bool]] = None

    # -- input checks --------------------------------------------------------------------------

    def _check_input_dim(self, input: Tensor) -> None:
        # one check_input call on the way through (each small step costs µs when a large kernel
        # has just flushed the caches); a wrong rank is reported after check_input's own errors
        if not isinstance(input, Tensor) or input.dim() not in self._expected_dims:
            BF.check_input(input)
            want = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ShapeError(
                f"{type(self).__name__} expected {want} input (got {input.dim()}D input of "
                f"shape {tuple(input.shape)}); {self._shape_hint}")
        BF.check_input(input, self.num_features)

    _shape_hint = ""

    # -- freezing ------------------------------------------------------------------------------

    def freeze(self, parameters: bool = True) -> "_BatchNorm":
        """Normalize with the running statistics and update nothing, whatever ``train()`` says.

        ``parameters=True`` also stops γ and β from learning (``requires_grad=False``);
        ``unfreeze()`` restores their previous flags. Returns self.
        """
        if self.running_mean is None or self.running_var is None:
            raise ModeError(f"{type(self).__name__} has no running statistics "
                            f"(track_running_stats=False): there is nothing to freeze to")
        if parameters and self._requires_grad_before_freeze is None:
            self._requires_grad_before_freeze = {}
            for name, p in self.named_parameters(recurse=False):
                self._requires_grad_before_freeze[name] = p.requires_grad
                p.requires_grad_(False)
        self.frozen = True
        return self

    def unfreeze(self) -> "_BatchNorm":
        """Undo ``freeze()``: batch statistics in training again, γ/β flags as before. Returns self."""
        if self._requires_grad_before_freeze is not None:
            for name, p in self.named_parameters(recurse=False):
                p.requires_grad_(self._requires_grad_before_freeze.get(name, True))
            self._requires_grad_before_freeze = None
        self.frozen = False
        return self

    # -- forward -------------------------------------------------------------------------------

    def _uses_batch_stats(self) -> bool:
        """Batch statistics in training, and in eval when there are no running buffers."""
        if self.frozen:
            return False
        return self.training or (self.running_mean is None and self.running_var is None)

    def forward(self, input: Tensor) -> Tensor:
        return self._forward_with(input, self.weight, self.bias)

    def _updates_running_stats(self) -> bool:
        return self.training and self.track_running_stats and not self.frozen and self.num_batches_tracked is not None

    def _momentum_step(self, update: Optional[bool] = None) -> float:
        """Count a training step (num_batches_tracked) and return its EMA momentum m_t (the layer's
        momentum, 1/t for momentum=None, or the debiased m/(1 − (1 − m)^t) for ema="debiased").
        The one place every layer deriving _BatchNorm (variants, SyncBatchNorm, BatchNormAct2d)
        turns its options into a momentum; returns the plain momentum (0 if None) when no step is
        counted. ``update``: the caller's _updates_running_stats(), when it has it."""
        if not (self._updates_running_stats() if update is None else update):
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        if self.momentum is None or self.ema != "pytorch":               # cumulative or debiased EMA
            return D.momentum_at("cumulative" if self.momentum is None else self.ema, self.momentum,
                                 int(self.num_batches_tracked))
        return self.momentum

    def _forward_with(self, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        """BN of ``input`` with this layer's statistics and modes, scaled and shifted by (weight,
        bias) — the layer's own γ, β, or a reparameterization of them (BatchNormAct2d)."""
        if isinstance(input, torch.fx.Proxy):
            return self._forward_fx(input, weight, bias)
        self._check_input_dim(input)
        use_batch_stats = self._uses_batch_stats()
        if use_batch_stats and BF.values_per_channel(input) == 1:
            if self.batch_of_one == "use_running_stats" and self.running_mean is not None:
                return BF.batch_norm(input, self.running_mean, self.running_var, weight, bias,
                                     training=False, eps=self.eps)
            BF.check_batch_size(input)
        self._check_finite(input)

        update = self._updates_running_stats()
        momentum = self._momentum_step(update)
        return BF.batch_norm(
            input,
            self.running_mean if (update or not use_batch_stats) else None,
            self.running_var if (update or not use_batch_stats) else None,
            weight, bias, use_batch_stats, momentum, self.eps,
            running_var_correction=self.running_var_correction)

    def _forward_fx(self, input: "torch.fx.Proxy", weight, bias):
        """Under FX symbolic tracing the input is a Proxy (no shape, no data): record
        torch.nn.functional.batch_norm, as torch.nn.BatchNorm's own forward does, so FX tools
        (quantization, feature extraction) see the op they know. The checks that need data
        (shape, batch of one, check_finite) are not part of the graph."""
        use_batch_stats = self._uses_batch_stats()
        update = self._updates_running_stats()
        if update and (self.running_var_correction != "unbiased" or self.momentum is None or self.ema != "pytorch"):
            raise NotImplementedError(
                f"{type(self).__name__}: FX records torch's batch_norm, which updates the running "
                f"statistics only as a momentum EMA of the unbiased variance; trace this layer in eval "
                f"mode, or use torch.export, which records its exact update")
        if update:                          # the step counter's increment, as a node of the graph
            path = input.tracer.path_of_module(self)
            target = f"{path}.num_batches_tracked" if path else "num_batches_tracked"
            input.tracer.create_proxy("get_attr", target, (), {}).add_(1)
        momentum = 0.0 if self.momentum is None else self.momentum
        buffers = update or not use_batch_stats
        return torch.nn.functional.batch_norm(
            input, self.running_mean if buffers else None, self.running_var if buffers else None,
            weight, bias, use_batch_stats, momentum, self.eps)

    def _check_finite(self, input: Tensor) -> None:
        """With ``check_finite=True``: raise NonFiniteError for NaN/Inf in the input, before any
        buffer changes. Every forward of every layer that takes the option calls it."""
        if self.check_finite and not torch.isfinite(input).all():
            bad = (~torch.isfinite(input)).transpose(0, 1).reshape(input.shape[1], -1).any(1)
            raise NonFiniteError(
                f"{type(self).__name__}: NaN/Inf in the input of channels "
                f"{bad.nonzero().flatten().tolist()[:20]}; no statistics were updated")

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.running_var_correction != "unbiased":
            s += f", running_var_correction={self.running_var_correction!r}"
        if self.batch_of_one != "raise":
            s += f", batch_of_one={self.batch_of_one!r}"
        if self.check_finite:
            s += ", check_finite=True"
        if self.ema != "pytorch":
            s += f", ema={self.ema!r}"
        if self.frozen:
            s += ", frozen=True"
        return s

    def __setstate__(self, state):
        # Modules pickled by an older bnlab lack the newer attributes: give them their defaults.
        state.setdefault("running_var_correction", "unbiased")
        state.setdefault("batch_of_one", "raise")
        state.setdefault("check_finite", False)
        state.setdefault("ema", "pytorch")
        state.setdefault("frozen", False)
        state.setdefault("_requires_grad_before_freeze", None)
        super().__setstate__(state)


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    r"""Batch Normalization over a 2D (N, C) or 3D (N, C, L) input (Ioffe & Szegedy 2015).

    y = (x − E[x]) / √(Var[x] + ε) · γ + β, statistics per channel over N (and L).

    Shape: input (N, C) or (N, C, L); output the same.

    Example::

        >>> bn = bnlab.BatchNorm1d(100)
        >>> y = bn(torch.randn(20, 100))
    """

    _expected_dims = (2, 3)
    _shape_hint = "use BatchNorm2d for images (N, C, H, W)"


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    r"""Batch Normalization over a 4D input (N, C, H, W) (Ioffe & Szegedy 2015, §3.2).

    y = (x − E[x]) / √(Var[x] + ε) · γ + β, statistics per channel over the N·H·W values.
    channels_last inputs keep their memory format.

    Shape: input (N, C, H, W); output the same.

    Example::

        >>> bn = bnlab.BatchNorm2d(64)
        >>> y = bn(torch.randn(8, 64, 32, 32))
    """

    _expected_dims = (4,)
    _shape_hint = "add a batch dimension (x[None]) for a single image, or use BatchNorm1d for (N, C)"


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    r"""Batch Normalization over a 5D input (N, C, D, H, W) (Ioffe & Szegedy 2015).

    y = (x − E[x]) / √(Var[x] + ε) · γ + β, statistics per channel over the N·D·H·W values.

    Shape: input (N, C, D, H, W); output the same.
    """

    _expected_dims = (5,)
    _shape_hint = "add a batch dimension (x[None]) for a single volume"


def is_batchnorm(module: torch.nn.Module) -> bool:
    """True for any batch-norm layer, torch.nn's or bnlab's (anything deriving ``_BatchNorm``)."""
    return isinstance(module, _TorchBatchNorm)
