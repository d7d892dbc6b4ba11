"""What every probe shares: records, layer discovery, and an evaluator that computes losses and
gradients at *substituted* weights on one batch without changing anything.

The evaluator is the heart of "measure without perturbing". It calls the model through
``torch.func.functional_call`` with detached copies of the parameters and fresh clones of the
buffers, so neither the weights, nor their ``.grad``, nor the BN running statistics are touched;
it runs inside :func:`bnlab.isolation.isolated` (training flags restored, RNG forked) and resets
the forked generator before every forward so that stochastic layers (dropout, noisy BN) draw the
same masks in every evaluation of one measurement. By default the model runs in training
semantics (BN with batch statistics, as the optimizer sees it); ``mode="eval"`` measures the
inference network instead and the records say so.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..options import ProbeMode
from ..isolation import isolated, restore_extra_state, snapshot_extra_state

__all__ = ["Probe", "Evaluator", "weight_layers", "activation_layers", "simulate_optimizer_step",
           "MODES", "execution_order"]

MODES = ("train", "eval")
ForwardFn = Callable[[nn.Module, Any], Any]


def _default_forward(model: nn.Module, x: Any) -> Any:
    return model(x)


class _Call(nn.Module):
    """Lets functional_call drive a custom forward(model, x)."""

    def __init__(self, model: nn.Module, forward: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, x: Any) -> Any:
        return self._forward(self.model, x)


class Evaluator:
    """Loss and gradients of ``loss_fn(forward(model, x), y)`` at given parameter values."""

    def __init__(self, model: nn.Module, loss_fn: Callable, x: Any, y: Any,
                 forward: Optional[ForwardFn] = None, mode: ProbeMode = "train") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.loss_fn, self.x, self.y, self.mode = model, loss_fn, x, y, mode
        self.call = _Call(model, forward or _default_forward)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        self.buffers = {n: b for n, b in model.named_buffers()}
        self.forwards = 0
        self.backwards = 0
        self._rng = None

    def __enter__(self) -> "Evaluator":
        self._ctx = isolated(self.model, self.mode)
        self._ctx.__enter__()
        self._rng = torch.get_rng_state()
        self._extra = snapshot_extra_state(self.model)
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def loss(self, params: dict[str, Tensor]) -> Tensor:
        """L at ``params`` (name → tensor, missing names take the current values)."""
        torch.set_rng_state(self._rng)          # the same dropout/noise draws in every evaluation
        restore_extra_state(self._extra)
        values = {f"model.{n}": params.get(n, p) for n, p in self.params.items()}
        values.update({f"model.{n}": b.clone() for n, b in self.buffers.items()})
        self.forwards += 1
        out = functional_call(self.call, values, (self.x,), strict=False)
        return self.loss_fn(out, self.y)

    def loss_and_grad(self, params: Optional[dict[str, Tensor]] = None,
                      wrt: Optional[Iterable[str]] = None) -> tuple[float, dict[str, Tensor]]:
        """(L, ∂L/∂θ for θ in ``wrt``) at ``params``; nothing accumulates into ``.grad``."""
        params = dict(params or {})
        wrt = list(self.names if wrt is None else wrt)
        leaves = {n: params.get(n, self.params[n]).detach().requires_grad_() for n in wrt}
        params.update(leaves)
        with torch.enable_grad():
            loss = self.loss(params)
            grads = torch.autograd.grad(loss, [leaves[n] for n in wrt], allow_unused=True)
        self.backwards += 1
        return loss.item(), {n: (torch.zeros_like(leaves[n]) if g is None else g)
                             for n, g in zip(wrt, grads)}


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules owning a weight of ≥ 2 dimensions (Linear, Conv, the lab's BatchedLinear...)."""
    out = {}
    for name, m in model.named_modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if isinstance(w, Tensor) and w.dim() >= 2 and w.requires_grad:
            out[name or "<root>"] = m
    return out


_ACTIVATIONS = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.Softsign, nn.ELU, nn.GELU, nn.SiLU,
                nn.Hardtanh, nn.ReLU6, nn.Softplus)


# Activation module classes beyond torch's, and how to name their kind ("sigmoid", "relu"...):
# code with its own activation modules registers them (the lab's models do).
_REGISTERED: dict[type, Callable[[nn.Module], str]] = {}


def register_activation(cls: type, kind: Callable[[nn.Module], str]) -> None:
    """Make the probes treat modules of ``cls`` as activations; ``kind(module)`` names the
    function ("sigmoid", "tanh", "relu", ...), which decides what counts as saturation."""
    _REGISTERED[cls] = kind


def activation_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Activation modules (torch's and registered ones), whose *input* is the pre-activation."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _ACTIVATIONS) or isinstance(m, tuple(_REGISTERED)):
            out[name or "<root>"] = m
    return out


def activation_kind(module: nn.Module) -> str:
    for cls, kind in _REGISTERED.items():
        if isinstance(module, cls):
            return kind(module)
    return {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ReLU: "relu", nn.ReLU6: "relu",
            nn.LeakyReLU: "relu", nn.Softsign: "softsign", nn.Hardtanh: "tanh"}.get(type(module), "other")


def execution_order(model: nn.Module, evaluator: Evaluator, modules: dict[str, nn.Module]) -> list[str]:
    """Names of ``modules`` in the order their forward first runs (one isolated forward)."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: order.append(n) if n not in order else None)
             for n, m in modules.items()]
    try:
        with torch.no_grad():
            evaluator.loss({})
    finally:
        for h in hooks:
            h.remove()
    return order + [n for n in modules if n not in order]


def simulate_optimizer_step(optimizer: torch.optim.Optimizer, model: nn.Module,
                            grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """The parameter values a *copy* of ``optimizer`` would produce from ``grads``.

    The copy is an optimizer of the same class over shadow parameters, with the real one's
    hyperparameters and a deep copy of its state (momentum buffers, Adam moments, step counts),
    so momentum and weight decay are applied exactly; the real optimizer is never stepped.
    """
    by_id = {id(p): n for n, p in model.named_parameters()}
    shadow: dict[int, Tensor] = {}
    groups = []
    for g in optimizer.param_groups:
        params = []
        for p in g["params"]:
            s = p.detach().clone().requires_grad_(p.requires_grad)
            name = by_id.get(id(p))
            s.grad = grads[name].detach().clone() if (name in grads) else None
            shadow[id(p)] = s
            params.append(s)
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": params})
    try:
        copy_opt = type(optimizer)(groups, **optimizer.defaults)
    except TypeError:
        copy_opt = type(optimizer)(groups)
    copy_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    copy_opt.step()
    return {by_id[i]: s.detach() for i, s in shadow.items() if i in by_id}


@dataclass
class Cost:
    forward: int = 0
    backward: int = 0
    seconds: float = 0.0
    measurements: int = 0


class Probe:
    """A measurement switched on every ``every`` steps (default: the Monitor's).

    Subclasses implement ``measure(monitor, step, x, y) -> list of (layer, metric, value)`` and,
    if they read the real training pass, ``arm(monitor)``/``disarm()`` to register hooks only
    for the step about to be measured.
    """

    name = "probe"
    needs_optimizer = False
    needs_loss = False               # evaluates the loss itself (through an Evaluator)
    keep_histograms = False          # set by a Monitor that writes histograms

    def __init__(self, every: Optional[int] = None, mode: ProbeMode = "train") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.every = every
        self.mode = mode
        self.cost = Cost()

    def arm(self, monitor) -> None:        # called before the training forward of a measured step
        pass

    def disarm(self) -> None:
        pass

    def measure(self, monitor, step: int, x: Any, y: Any) -> list[tuple[str, str, float]]:
        raise NotImplementedError

    def take_histograms(self) -> dict[str, Tensor]:
        """Values to draw as histograms for the step just measured (tag → 1-D tensor); emptied."""
        out, self._histograms = getattr(self, "_histograms", {}), {}
        return out

    def _keep_histogram(self, tag: str, values: Tensor) -> None:
        if self.keep_histograms:
            if not hasattr(self, "_histograms"):
                self._histograms = {}
            self._histograms[tag] = values.detach().reshape(-1).float().cpu()

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.cost.seconds += time.perf_counter() - t0
        self.cost.measurements += 1
        return out

    def passes_per_measurement(self) -> tuple[float, float]:
        m = max(1, self.cost.measurements)
        return self.cost.forward / m, self.cost.backward / m
