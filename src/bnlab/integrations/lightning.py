"""Probes in a Lightning Trainer: ``MonitorCallback`` drives a :class:`bnlab.probes.Monitor`.

    from bnlab.integrations.lightning import MonitorCallback
    from bnlab.probes import ActivationStats, GradientFlow
    trainer = Trainer(callbacks=[MonitorCallback([GradientFlow(), ActivationStats()], every=50)])

The callback measures between backward and the optimizer step (``on_before_optimizer_step``),
at the trainer's ``global_step``; it arms the probes' hooks at the start of each training batch
and removes them for validation, so validation forwards are never measured. Records go to
every logger of the trainer (``log_metrics``, tagged ``probe/metric/layer``) and stay in
``callback.monitor.records``; with a TensorBoardLogger, histograms of each layer's
pre-activations and weight gradients are written to it as well. Under mixed precision the
trainer's GradScaler is handed to the Monitor, so gradients are reported unscaled.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

try:
    import lightning.pytorch as pl
except ImportError:                                    # the standalone package
    import pytorch_lightning as pl

from ..probes.base import Probe
from ..probes.monitor import Monitor, _tag

__all__ = ["MonitorCallback"]


def _default_batch_to_xy(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        raise TypeError("MonitorCallback: the batch is a dict; pass batch_to_xy=lambda b: (b['x'], b['y'])")
    return batch, None


class MonitorCallback(pl.Callback):
    """A Lightning callback driving a :class:`bnlab.probes.Monitor` (see the module docstring).

    Args:
        probes: the probes to run.
        every: measure every this many optimizer steps (a probe's own ``every`` wins).
        loss_fn: ``loss_fn(output, y)``, needed by probes that evaluate the loss themselves (ICS,
            Landscape, HessianTopEig).
        batch_to_xy: maps a training batch to ``(x, y)``; default: a tensor is ``(batch, None)``, a
            tuple or list ``(batch[0], batch[1])``.
        forward: ``forward(module, x)``; default ``module(x)``.
        histograms: write histograms to a TensorBoardLogger if the trainer has one.
        log: send the records to the trainer's loggers.
    """

    def __init__(self, probes: Sequence[Probe], every: int = 10, loss_fn: Optional[Callable] = None,
                 batch_to_xy: Optional[Callable[[Any], tuple[Any, Any]]] = None,
                 forward: Optional[Callable] = None, histograms: bool = True, log: bool = True) -> None:
        super().__init__()
        self.probes, self.every, self.loss_fn = list(probes), every, loss_fn
        self.batch_to_xy = batch_to_xy or _default_batch_to_xy
        self.forward, self.histograms, self.log = forward, histograms, log
        self.monitor: Optional[Monitor] = None
        self._batch: Any = None
        self._trainer = None

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._trainer = trainer
        precision = getattr(trainer.strategy, "precision_plugin", None)
        writer = None
        if self.histograms:
            for logger in trainer.loggers:
                if type(logger).__name__ == "TensorBoardLogger":
                    writer = logger.experiment
        self.monitor = Monitor(pl_module, self.loss_fn, trainer.optimizers[0] if trainer.optimizers else None,
                               probes=self.probes, every=self.every, forward=self.forward,
                               start_step=trainer.global_step, scaler=getattr(precision, "scaler", None),
                               on_records=self._send if self.log else None, tensorboard=writer,
                               histograms=self.histograms, tensorboard_scalars=False)
        self.monitor.disarm()

    def _send(self, records: list[dict]) -> None:
        if self._trainer is None or not records:
            return
        metrics = {f"bnlab/{_tag(r)}": r["value"] for r in records}
        for logger in self._trainer.loggers:
            logger.log_metrics(metrics, step=records[0]["step"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = batch
        if self.monitor is not None:
            self.monitor.arm(trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.monitor is None or self._batch is None:
            return
        x, y = self.batch_to_xy(self._batch)
        self.monitor.observe(trainer.global_step, x, y)
        self.monitor.disarm()

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.disarm()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.monitor is not None:
            self.monitor.close()
