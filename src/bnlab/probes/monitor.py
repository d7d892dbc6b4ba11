"""Monitor: one way to drive every probe from any training loop.

    monitor = bnlab.probes.Monitor(model, loss_fn, optimizer,
                                   probes=[GradientFlow(), ActivationStats(), ICS(), Landscape()],
                                   every=10)
    for step, (x, y) in enumerate(batches):
        loss = loss_fn(model(x), y); optimizer.zero_grad(); loss.backward()
        monitor.observe(step, x, y)   # between backward and optimizer.step()
        optimizer.step()
    monitor.records                   # list of dicts: step, layer, metric, value (+ probe, mode)
    monitor.to_csv(path)

On a step that no probe measures, ``observe`` only compares two integers: probes that read the
training pass register their hooks just before the forward of a step they will measure (at the
end of the previous ``observe``) and remove them right after. Nothing a probe does changes the
training: it never steps the optimizer, never writes parameters, gradients or buffers, and
never draws from the training random stream (bnlab.probes.base.Evaluator, bnlab.isolation).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Callable, Iterable, Optional, Sequence

from torch import nn

from .._files import atomic_write_text
from .base import Probe

__all__ = ["Monitor"]

COLUMNS = ("step", "layer", "metric", "value", "probe", "mode")


class Monitor:
    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer=None,
                 probes: Sequence[Probe] = (), every: int = 10, probe_batch: Any = None,
                 forward: Optional[Callable[[nn.Module, Any], Any]] = None, lr: Optional[float] = None,
                 start_step: int = 0, at: Iterable[int] = ()) -> None:
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.probes = list(probes)
        self.every = every
        self.at = frozenset(int(s) for s in at)          # extra steps to measure (e.g. the first)
        self.probe_batch = probe_batch
        self.forward = forward or (lambda m, x: m(x))
        self._lr = lr
        self.records: list[dict] = []
        for p in self.probes:
            if getattr(p, "needs_optimizer", False) and optimizer is None:
                raise ValueError(f"{type(p).__name__} needs the optimizer (Monitor(..., optimizer))")
        self._arm(start_step)

    @property
    def lr(self) -> Optional[float]:
        if self._lr is not None:
            return self._lr
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0]["lr"])
        return None

    def due(self, probe: Probe, step: int) -> bool:
        return step % (probe.every or self.every) == 0 or step in self.at

    def _arm(self, step: int) -> None:
        for p in self.probes:
            if self.due(p, step):
                p.arm(self)

    def observe(self, step: int, x: Any, y: Any) -> list[dict]:
        """Measure what is due at ``step``; call after backward and before optimizer.step()."""
        new: list[dict] = []
        try:
            for p in self.probes:
                if self.due(p, step):
                    for layer, metric, value in p._timed(p.measure, self, step, x, y):
                        new.append(dict(step=int(step), layer=layer, metric=metric, value=float(value),
                                        probe=p.name, mode=p.mode))
        finally:
            for p in self.probes:
                p.disarm()
            self._arm(step + 1)
        self.records.extend(new)
        return new

    def close(self) -> None:
        for p in self.probes:
            p.disarm()

    # -- output ---------------------------------------------------------------------------------
    def select(self, metric: str, layer: Optional[str] = None, probe: Optional[str] = None) -> list[dict]:
        return [r for r in self.records if r["metric"] == metric and (layer is None or r["layer"] == layer)
                and (probe is None or r["probe"] == probe)]

    def to_csv(self, path) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in self.records:
            w.writerow(r)
        atomic_write_text(path, buf.getvalue())

    def to_json(self, path) -> None:
        atomic_write_text(path, json.dumps(self.records) + "\n")

    def to_tensorboard(self, logdir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("to_tensorboard needs the tensorboard package: pip install tensorboard") from e
        writer = SummaryWriter(logdir)
        try:
            for r in self.records:
                writer.add_scalar(f"{r['probe']}/{r['metric']}/{r['layer']}", r["value"], r["step"])
        finally:
            writer.close()

    def costs(self) -> dict[str, dict]:
        """Per probe: measurements, extra forward/backward passes per measurement, seconds."""
        out = {}
        for p in self.probes:
            f, b = p.passes_per_measurement()
            out[p.name] = dict(measurements=p.cost.measurements, forward_per_measurement=f,
                               backward_per_measurement=b, seconds=p.cost.seconds)
        return out
