"""Errors bnlab raises on bad input.

Each error also derives from the builtin type that ``torch.nn`` raises for the same mistake, so
code written against ``torch.nn.BatchNorm*`` (``except ValueError``/``except RuntimeError``)
keeps working after switching to bnlab, while the message says what to do.
"""

from __future__ import annotations


class BnlabError(Exception):
    """Base class of every error bnlab raises on purpose."""


class ShapeError(BnlabError, ValueError, RuntimeError):
    """The input's number of dimensions or channels does not fit the layer."""


class BatchSizeError(BnlabError, ValueError):
    """Training-mode statistics need more than one value per channel."""


class DTypeError(BnlabError, TypeError, NotImplementedError):
    """The input's dtype cannot be normalized (integer or boolean tensors)."""


class ModeError(BnlabError, ValueError, RuntimeError):
    """The call does not fit the layer's or model's mode (eval without statistics, fold in training...)."""


class ArgumentError(BnlabError, ValueError):
    """An argument outside its domain (eps ≤ 0 in training, a negative momentum, a slope that is
    not a number...)."""


class DeviceError(BnlabError, RuntimeError):
    """Tensors of one call live on different devices."""


class NonFiniteError(BnlabError, FloatingPointError):
    """A NaN or Inf reached a layer that was asked to check for them."""


class DataError(BnlabError, ValueError):
    """A data file is missing, truncated, corrupt or unreadable, or a checkpoint is not what it
    claims to be."""


class UsageError(BnlabError, ValueError):
    """A command or configuration asks for something invalid (an unknown key, a value out of its
    range, a directory that cannot be used)."""
