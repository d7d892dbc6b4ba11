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

Where the numbers go, besides ``records``: ``on_records`` (a function called with each step's new
rows, e.g. ``wandb.log``), ``tensorboard`` (a log directory or a SummaryWriter: scalars and, with
``histograms=True``, histograms of each layer's pre-activations and weight gradients, written
live as training runs), and ``bnlab.integrations.lightning.MonitorCallback`` for Lightning.
With mixed precision pass the ``GradScaler`` (``scaler=``): gradients are reported unscaled,
whether or not ``scaler.unscale_(optimizer)`` ran before ``observe``.

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

from torch import Tensor, nn

from .._files import atomic_write_text
from ..options import PlotKind, ProbeMode
from .base import Probe

__all__ = ["Monitor"]

COLUMNS = ("step", "layer", "metric", "value", "probe", "mode")


class Monitor:
    def __init__(self, model: nn.Module, loss_fn: Optional[Callable], optimizer=None,
                 probes: Sequence[Probe] = (), every: int = 10, probe_batch: Any = None,
                 forward: Optional[Callable[[nn.Module, Any], Any]] = None, lr: Optional[float] = None,
                 start_step: int = 0, at: Iterable[int] = (), *, scaler=None,
                 on_records: Optional[Callable[[list[dict]], None]] = None, tensorboard: Any = None,
                 histograms: bool = True, tensorboard_scalars: bool = True) -> None:
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        for p in probes:
            if getattr(p, "needs_loss", False) and loss_fn is None:
                raise ValueError(f"{type(p).__name__} evaluates the loss: pass loss_fn to the Monitor")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.probes = list(probes)
        self.every = every
        self.at = frozenset(int(s) for s in at)          # extra steps to measure (e.g. the first)
        self.probe_batch = probe_batch
        self.forward = forward or (lambda m, x: m(x))
        self._lr = lr
        self.records: list[dict] = []
        self.scaler = scaler
        self.on_records = on_records
        self._writer, self._own_writer = _summary_writer(tensorboard)
        self.tensorboard_scalars = tensorboard_scalars
        self.histograms = histograms and self._writer is not None
        for p in self.probes:
            p.keep_histograms = self.histograms
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

    def loss_scale(self) -> float:
        """The GradScaler's current scale (1 without one): every gradient the backward computes —
        of parameters before ``unscale_``, of activations always — is multiplied by it."""
        if self.scaler is None or not self.scaler.is_enabled():
            return 1.0
        return float(self.scaler.get_scale())

    def parameter_grad_scale(self) -> float:
        """What the parameters' ``.grad`` are multiplied by right now: the loss scale, or 1 once
        ``scaler.unscale_(optimizer)`` has run for this step."""
        if self.scaler is None or self.optimizer is None:
            return self.loss_scale()
        states = getattr(self.scaler, "_per_optimizer_states", {})
        stage = states.get(id(self.optimizer), {}).get("stage") if id(self.optimizer) in states else None
        return 1.0 if getattr(stage, "name", "") == "UNSCALED" else self.loss_scale()

    def due(self, probe: Probe, step: int) -> bool:
        return step % (probe.every or self.every) == 0 or step in self.at

    def _arm(self, step: int) -> None:
        for p in self.probes:
            if self.due(p, step):
                p.arm(self)

    def arm(self, step: int) -> None:
        """Register the hooks of the probes due at ``step`` (and only those). ``observe`` does it
        for the next step by itself; call it when forwards that are not training steps ran in
        between (a validation loop) after :meth:`disarm`."""
        self.disarm()
        self._arm(step)

    def disarm(self) -> None:
        """Remove every probe's hooks (e.g. before a validation loop)."""
        for p in self.probes:
            p.disarm()

    def observe(self, step: int, x: Any, y: Any) -> list[dict]:
        """Measure what is due at ``step``; call after backward and before optimizer.step()."""
        new: list[dict] = []
        histograms: dict[str, Tensor] = {}
        try:
            for p in self.probes:
                if self.due(p, step):
                    for layer, metric, value in p._timed(p.measure, self, step, x, y):
                        new.append(dict(step=int(step), layer=layer, metric=metric, value=float(value),
                                        probe=p.name, mode=p.mode))
                    histograms.update({f"{p.name}/{tag}": t for tag, t in p.take_histograms().items()})
        finally:
            for p in self.probes:
                p.disarm()
            self._arm(step + 1)
        self.records.extend(new)
        if new or histograms:
            self._emit(int(step), new, histograms)
        return new

    def _emit(self, step: int, new: list[dict], histograms: dict[str, Tensor]) -> None:
        if self._writer is not None:
            for r in (new if self.tensorboard_scalars else ()):
                self._writer.add_scalar(_tag(r), r["value"], step)
            for tag, values in histograms.items():
                if values.numel():
                    self._writer.add_histogram(tag, values.float(), step)
            self._writer.flush()
        if self.on_records is not None and new:
            self.on_records(new)

    def close(self) -> None:
        """Remove every hook; close the TensorBoard writer if the Monitor opened it."""
        self.disarm()
        if self._writer is not None and self._own_writer:
            self._writer.close()
            self._writer = None

    def plot(self, kind: PlotKind, path=None, title: str = "", mode: ProbeMode = "train"):
        """One standard figure of the records so far (see :func:`bnlab.probes.plot`)."""
        from .plot import plot
        return plot(self.records, kind, path, title, mode)

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
        """Write every record so far as TensorBoard scalars (for live output: ``tensorboard=``)."""
        writer, _ = _summary_writer(logdir)
        try:
            for r in self.records:
                writer.add_scalar(_tag(r), r["value"], r["step"])
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


def _tag(record: dict) -> str:
    mode = "" if record.get("mode", "train") == "train" else f"[{record['mode']}]"
    return f"{record['probe']}{mode}/{record['metric']}/{record['layer']}"


def _summary_writer(target: Any):
    """(writer, opened here) for a log directory, a SummaryWriter (used as is), or None."""
    if target is None:
        return None, False
    if hasattr(target, "add_scalar"):
        return target, False
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("TensorBoard output needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(str(target)), True
