"""GradientFlow: how gradients reach each layer (Glorot & Bengio 2010's measurements)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .base import Probe, weight_layers

__all__ = ["GradientFlow"]


class GradientFlow(Probe):
    """Per layer, from the real training step (no extra passes):

      grad_norm        ‖∂L/∂W‖ (Frobenius)
      grad_to_weight   ‖∂L/∂W‖ / ‖W‖ (the update scale relative to the weight)
      preact_grad_std  std of ∂L/∂z over the batch, z = the layer's output (pre-activation)

    and, as layer "*", ``first_last_grad_ratio`` = ‖∂L/∂W_first‖ / ‖∂L/∂W_last‖ in execution
    order (≪ 1: vanishing towards the input; ≫ 1: exploding). ∂L/∂z is captured with a
    *tensor* hook on the layer's output, registered only on measured steps — module backward
    hooks would break on in-place activations (``nn.ReLU(inplace=True)``).

    Args:
        layers: module names to follow (default: every module with a ≥ 2-D weight).
    """

    name = "gradient_flow"

    def __init__(self, every: Optional[int] = None, layers: Optional[Sequence[str]] = None) -> None:
        super().__init__(every, mode="train")
        self.layer_names = layers
        self._handles: list = []
        self._preact_std: dict[str, float] = {}
        self._order: list[str] = []

    def _layers(self, model):
        found = weight_layers(model)
        if self.layer_names is None:
            return found
        mods = dict(model.named_modules())
        return {n: mods[n] for n in self.layer_names}

    def arm(self, monitor) -> None:
        self._preact_std.clear()
        self._order.clear()

        def forward_hook(name):
            def hook(module, inputs, out):
                if name not in self._order:
                    self._order.append(name)
                if isinstance(out, Tensor) and out.requires_grad:
                    def grad_hook(g, name=name):
                        self._preact_std[name] = g.detach().float().std().item() if g.numel() > 1 else 0.0
                    out.register_hook(grad_hook)
            return hook

        for name, m in self._layers(monitor.model).items():
            self._handles.append(m.register_forward_hook(forward_hook(name)))

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def measure(self, monitor, step, x, y):
        rows = []
        norms = {}
        layers = self._layers(monitor.model)
        order = [n for n in self._order if n in layers] + [n for n in layers if n not in self._order]
        for name in order:
            w = layers[name].weight
            if w.grad is None:
                continue
            g = w.grad.norm().item()
            norms[name] = g
            rows.append((name, "grad_norm", g))
            rows.append((name, "grad_to_weight", g / max(w.norm().item(), 1e-30)))
            if name in self._preact_std:
                rows.append((name, "preact_grad_std", self._preact_std[name]))
        if len(norms) >= 2:
            first, last = norms[next(iter(norms))], norms[list(norms)[-1]]
            rows.append(("*", "first_last_grad_ratio", first / last if last > 0 else float("inf")))
        return rows
