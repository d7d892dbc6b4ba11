r"""``bnlab.functional.batch_norm``: torch.nn.functional.batch_norm's signature and semantics.

The math is in :mod:`bnlab.definition`; this module checks a call — refusing what BN cannot
normalize with a message that says what to do, in torch.nn's order and with its exception types
— and hands it to one dispatch (:mod:`bnlab.kernels.dispatch`), which picks the backend.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .options import VarCorrection
from . import definition as D
from .definition import (VAR_CORRECTIONS, accumulation_dtype, channel_view, reduction_dims,  # noqa: F401
                         update_running_stats, values_per_channel)
from .errors import ArgumentError, BatchSizeError, DeviceError, DTypeError, ModeError, ShapeError
from .kernels import dispatch

__all__ = ["batch_norm", "check_input", "check_batch_size"]


def check_input(x: Tensor, num_features: Optional[int] = None) -> None:
    """Refuse what BN cannot normalize: not a tensor, integer dtype, < 2 dims, wrong channels."""
    if not isinstance(x, Tensor):
        raise TypeError(f"batch_norm expects a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise DTypeError(
            f"batch_norm needs a floating-point input, got {x.dtype}: convert it first, "
            f"e.g. x.float() (uint8 images: x.float() / 255)")
    if x.dim() < 2:
        raise ShapeError(
            f"batch_norm expects an input of shape (N, C, *) with at least 2 dimensions, got "
            f"shape {tuple(x.shape)}; for a single sample add a batch dimension with x[None]")
    if num_features is not None and x.shape[1] != num_features:
        raise ShapeError(
            f"batch_norm expects {num_features} channels in dimension 1, got input of shape "
            f"{tuple(x.shape)} ({x.shape[1]} channels): check the layer's num_features, or "
            f"move the feature dimension to position 1 (e.g. x.transpose(1, -1))")


def check_batch_size(x: Tensor) -> None:
    """Training statistics of a single value are undefined (σ²_B = 0, unbiased var = 0/0)."""
    if values_per_channel(x) == 1:
        raise BatchSizeError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{tuple(x.shape)}: batch statistics of one value are undefined. Use a batch of at "
            f"least 2, call model.eval() to normalize with the running statistics, or build the "
            f"layer with batch_of_one='use_running_stats'.")


def _check_param(name: str, t: Optional[Tensor], x: Tensor) -> None:
    """A per-channel argument: C values (running statistics 1-D, as torch.nn requires; weight and
    bias any shape, e.g. (1, C)), on the input's device."""
    if t is None:
        return
    channels = x.shape[1]
    if t.numel() != channels:
        raise ShapeError(f"{name} has {t.numel()} elements but the input has {channels} channels "
                         f"(dimension 1): {name} needs one element per channel")
    if name.startswith("running") and t.dim() != 1:
        raise ShapeError(f"{name} must be 1-D with {channels} values, got shape {tuple(t.shape)}")
    # (the is_cpu flags first: building two device objects per argument costs µs a call)
    if not (t.is_cpu and x.is_cpu) and t.device != x.device:
        raise DeviceError(f"{name} is on {t.device} but the input is on {x.device}: move the layer "
                          f"and its buffers to the input's device (module.to(x.device))")


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               running_var_correction: VarCorrection = "unbiased") -> Tensor:
    r"""Batch Normalization, with the signature and semantics of ``torch.nn.functional.batch_norm``.

    training=True:  normalize with the batch's mean and biased variance (Algorithm 1) and, if
                    running buffers are given, update them in place:
                    r ← (1 − momentum)·r + momentum·x_t, where x_t for the variance is the
                    unbiased batch variance (``running_var_correction="biased"`` to store σ²_B).
    training=False: normalize with ``running_mean``/``running_var`` (Algorithm 2); they must
                    be given.

    y = (x − E[x]) / √(Var[x] + ε) · γ + β, per channel of dimension 1.

    Shape:
        input (N, C, *), running_mean/running_var (C,), weight/bias C values; output like input
        (also its memory format, e.g. channels_last).

    Raises:
        DTypeError: (a TypeError) for integer inputs.
        ShapeError: (ValueError, RuntimeError) for < 2 dims or a channel mismatch.
        BatchSizeError: (ValueError) for one value per channel in training.
        ArgumentError: (ValueError) for eps ≤ 0 in training or < 0 in eval.
        ModeError: for eval without running statistics.
        DeviceError: (RuntimeError) for buffers on another device.

    An empty batch (N = 0) returns an empty output and leaves the running buffers unchanged.
    NaN/Inf in the input propagate to that channel's output and, in training, its running
    statistics (as in torch.nn); modules can check for them with ``check_finite=True``.
    """
    fast = (dispatch.train_fast(input, weight, bias, eps, running_mean, running_var, momentum,
                                running_var_correction) if training
            else dispatch.eval_fast(input, running_mean, running_var, weight, bias, eps))
    if fast is not None:
        return fast
    if isinstance(input, Tensor) and input.dim() < 2 and input.numel() == 0 and input.dtype.is_floating_point:
        # torch.nn.functional.batch_norm returns an empty 1-D input as it is (PyTorch's own OpInfo
        # samples include it); a non-empty one has no channel dimension and is refused below
        return _empty_output(input, weight, bias)
    check_input(input)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_param(name, t, input)
    if training:
        check_batch_size(input)
        if eps <= 0.0:                       # torch.nn's checks, in its order (a NaN eps passes both)
            raise ArgumentError(f"batch_norm eps must be positive during training, but got {eps}")
        if momentum is None:
            raise TypeError(
                "batch_norm's momentum must be a float; the module form's momentum=None "
                "(cumulative average) passes momentum = 1/num_batches_tracked")
        if running_var_correction not in VAR_CORRECTIONS:
            raise ValueError(f"running_var_correction must be one of {VAR_CORRECTIONS}, "
                             f"got {running_var_correction!r}")
        if input.numel() == 0:
            return _empty_output(input, weight, bias)
        return dispatch.train(input, weight, bias, eps, (running_mean, running_var, momentum, running_var_correction))
    if eps < 0.0:
        raise ArgumentError(f"batch_norm eps must be non-negative, but got {eps}")
    if running_mean is None or running_var is None:
        raise ModeError(
            "running_mean must be defined in evaluation mode: pass the running statistics, or "
            "training=True to normalize with the batch's statistics")
    if input.numel() == 0:
        return _empty_output(input, weight, bias)
    return dispatch.evaluate(input, running_mean, running_var, weight, bias, eps)


def _empty_output(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """An empty batch has nothing to normalize; keep the graph so backward still runs (the
    parameters' gradients are then zeros)."""
    y = x * 1.0
    if x.dim() < 2:                              # no channel dimension to broadcast along
        for t in (weight, bias):
            if t is not None:
                y = y + t.sum() * 0
        return y.to(x.dtype)
    return D.affine(y, weight, bias).to(x.dtype)
