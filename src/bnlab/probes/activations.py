"""ActivationStats: the distribution of each nonlinearity's input (Ioffe Fig. 1b,c; Glorot &
Bengio Fig. 2–4): exact percentiles, mean, std and the fraction saturated."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..options import ActivationSource, ProbeMode
from ..isolation import isolated
from .base import Probe, activation_kind, activation_layers, weight_layers

__all__ = ["ActivationStats", "SATURATION"]

# |z| beyond which the activation counts as saturated: |σ(z) − ½| > 0.45, |tanh z| > 0.9,
# |softsign z| > 0.9; for ReLU the "saturated" (dead) fraction is z ≤ 0.
SATURATION = {"sigmoid": math.log(0.95 / 0.05), "tanh": math.atanh(0.9), "softsign": 9.0}


class ActivationStats(Probe):
    """Per layer, of the pre-activations z (the activation module's input):

      p15, p50, p85 (configurable)  exact percentiles (linear interpolation, as numpy)
      mean, std
      saturated                     fraction past the saturation threshold of that activation

    Args:
        percentiles: which percentiles (0–100).
        source: "train" — the real training batch, read by a hook during the training forward
            (no extra pass); "probe" — a fixed probe batch (``probe_batch`` or the Monitor's),
            one isolated extra forward in training semantics (batch statistics, buffers restored).
        layers: module names whose *input* to read (default: activation modules; if the model
            has none, the outputs of its weight layers).
        max_elements: larger tensors are subsampled to this many values with the probe's own
            generator (exact percentiles below it; the training RNG is never used).

    A module called more than once per forward (torchvision's BasicBlock calls one ReLU twice)
    has one set of rows per call: "name", "name#2", ... With ``keep_histograms`` (a Monitor
    writing TensorBoard) each layer's values are kept as a histogram.
    """

    name = "activation_stats"

    def __init__(self, every: Optional[int] = None, percentiles: Sequence[float] = (15, 50, 85),
                 source: ActivationSource = "train", probe_batch: Any = None, layers: Optional[Sequence[str]] = None,
                 max_elements: int = 1_000_000, mode: ProbeMode = "train") -> None:
        super().__init__(every, mode)
        if source not in ("train", "probe"):
            raise ValueError(f"source must be 'train' or 'probe', got {source!r}")
        self.percentiles = tuple(percentiles)
        self.source, self.probe_batch = source, probe_batch
        self.layer_names = layers
        self.max_elements = max_elements
        self._gen = torch.Generator().manual_seed(0)
        self._handles: list = []
        self._rows: list = []

    def _targets(self, model) -> tuple[dict, bool]:
        """(modules, read_input): activation inputs, else weight-layer outputs."""
        if self.layer_names is not None:
            mods = dict(model.named_modules())
            return {n: mods[n] for n in self.layer_names}, True
        acts = activation_layers(model)
        return (acts, True) if acts else (weight_layers(model), False)

    def stats(self, z: Tensor, kind: str, label: Optional[str] = None) -> list[tuple[str, float]]:
        z = z.detach().reshape(-1).float()
        if z.numel() > self.max_elements:
            z = z[torch.randint(z.numel(), (self.max_elements,), generator=self._gen)]
        if label is not None:
            self._keep_histogram(f"preact/{label}", z)
        q = torch.quantile(z, torch.tensor([p / 100 for p in self.percentiles]))
        out = [(f"p{p:g}", v.item()) for p, v in zip(self.percentiles, q)]
        out += [("mean", z.mean().item()), ("std", z.std().item() if z.numel() > 1 else 0.0)]
        if kind == "relu":
            out.append(("saturated", (z <= 0).float().mean().item()))
        elif kind in SATURATION:
            out.append(("saturated", (z.abs() > SATURATION[kind]).float().mean().item()))
        return out

    def _register(self, model) -> None:
        targets, read_input = self._targets(model)
        calls: dict[str, int] = {}

        def record(name: str, z: Tensor, kind: str) -> None:
            calls[name] = calls.get(name, 0) + 1
            label = name if calls[name] == 1 else f"{name}#{calls[name]}"
            self._rows.extend((label, metric, v) for metric, v in self.stats(z, kind, label))

        for name, m in targets.items():
            kind = activation_kind(m) if read_input else "other"
            if read_input:
                # computed at once: an in-place activation overwrites its input right after
                hook = (lambda mod, args, n=name, k=kind: record(n, args[0], k))
                self._handles.append(m.register_forward_pre_hook(hook))
            else:
                hook = (lambda mod, args, out, n=name: record(n, out, "other"))
                self._handles.append(m.register_forward_hook(hook))

    def arm(self, monitor) -> None:
        self._rows.clear()
        if self.source == "train":
            self._register(monitor.model)

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def measure(self, monitor, step, x, y):
        if self.source == "probe":
            batch = self.probe_batch if self.probe_batch is not None else monitor.probe_batch
            if batch is None:
                raise ValueError("ActivationStats(source='probe') needs probe_batch (here or on the Monitor)")
            self.disarm()
            self._rows.clear()
            self._register(monitor.model)
            try:
                with isolated(monitor.model, self.mode), torch.no_grad():
                    monitor.forward(monitor.model, batch)
                self.cost.forward += 1
            finally:
                self.disarm()
        rows, self._rows = list(self._rows), []
        return rows
