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
    hooks would break on in-place activations (``nn.ReLU(inplace=True)``). A layer called more
    than once per forward has one ``preact_grad_std`` per call: "name", "name#2", ...

    With a GradScaler on the Monitor every value is unscaled. With ``keep_histograms`` (a
    Monitor writing TensorBoard) each layer's ∂L/∂W is kept as a histogram.

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
        calls: dict[str, int] = {}

        def forward_hook(name):
            def hook(module, inputs, out):
                if name not in self._order:
                    self._order.append(name)
                calls[name] = calls.get(name, 0) + 1
                label = name if calls[name] == 1 else f"{name}#{calls[name]}"
                if isinstance(out, Tensor) and out.requires_grad:
                    def grad_hook(g, label=label):
                        self._preact_std[label] = g.detach().float().std().item() if g.numel() > 1 else 0.0
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
        grad_scale = monitor.parameter_grad_scale() if hasattr(monitor, "parameter_grad_scale") else 1.0
        loss_scale = monitor.loss_scale() if hasattr(monitor, "loss_scale") else 1.0
        for name in order:
            w = layers[name].weight
            if w.grad is None:
                continue
            g = w.grad.norm().item() / grad_scale
            norms[name] = g
            rows.append((name, "grad_norm", g))
            rows.append((name, "grad_to_weight", g / max(w.norm().item(), 1e-30)))
            self._keep_histogram(f"grad/{name}", w.grad / grad_scale)
            calls = [label for label in self._preact_std if label == name or label.startswith(f"{name}#")]
            for label in calls:
                rows.append((label, "preact_grad_std", self._preact_std[label] / loss_scale))
        if len(norms) >= 2:
            first, last = norms[next(iter(norms))], norms[list(norms)[-1]]
            rows.append(("*", "first_last_grad_ratio", first / last if last > 0 else float("inf")))
        return rows
