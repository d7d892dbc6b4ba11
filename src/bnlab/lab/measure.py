"""Measurements the lab's experiments share: pre-activation distributions per seed (and how
they move), and a trainer that runs bnlab.probes on a seed's model during training."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..isolation import isolated
from ..probes import Monitor
from .trainers import ClassifierTrainer

__all__ = ["preactivations", "moments", "drift", "DriftEval", "ProbedTrainer", "batched_ce"]


@torch.no_grad()
def preactivations(model: nn.Module, x: Tensor, mode: str = "train") -> list[Tensor]:
    """Each block's activation input on ``x``, (S, P, C) per block, in training semantics (batch
    statistics over x, noise layers drawing as in training) with nothing changed afterwards."""
    captured: list = []
    with isolated(model, mode):
        model(x, capture=captured)
    return [z.detach() for z in captured]


def moments(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per seed and unit: mean and variance over the probe examples. z (S, P, C) → (S, C) each."""
    return z.mean(1), z.var(1, unbiased=False)


def drift(prev: tuple[Tensor, Tensor], cur: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """How far each seed's layer-input distribution moved between two measurements, averaged over
    units: |Δμ| in units of the previous std, and |Δ log σ²|. Returns two (S,) tensors."""
    (m0, v0), (m1, v1) = prev, cur
    shift = ((m1 - m0).abs() / v0.clamp_min(1e-12).sqrt()).mean(1)
    scale = (torch.log(v1.clamp_min(1e-12)) - torch.log(v0.clamp_min(1e-12))).abs().mean(1)
    return shift, scale


class DriftEval:
    """extra_eval: how much each layer's input distribution moves in *one training step* (on a
    fixed probe batch, training semantics). Schedule evaluations at t − 1 and t: the moments at
    t − 1 are kept, and at t it records per seed ``drift_mean`` (|Δμ|/σ), ``drift_logvar``
    (|Δ log σ²|) and their sum ``drift`` — the whole scale-free shift of location and scale — each
    averaged over units and layers. Stateful and resumable."""

    def __init__(self, probe_x: Tensor) -> None:
        self.probe_x = probe_x
        self.previous: Optional[tuple[int, list]] = None

    @staticmethod
    def schedule(every: int, steps: int) -> list[int]:
        """Evaluation steps giving one per-step drift every ``every`` steps."""
        out = []
        for t in range(every, steps + 1, every):
            out += [t - 1, t] if t > 1 else [t]
        return out

    def __call__(self, trainer, step: int):
        current = [moments(z) for z in preactivations(trainer.model, self.probe_x)]
        if self.previous is not None and self.previous[0] == step - 1:
            shifts = [drift(p, c) for p, c in zip(self.previous[1], current)]
            mean_shift = torch.stack([s for s, _ in shifts]).mean(0)                      # S
            scale_shift = torch.stack([v for _, v in shifts]).mean(0)
            for i, seed in enumerate(trainer.seeds):
                yield seed, "drift_mean", mean_shift[i].item()
                yield seed, "drift_logvar", scale_shift[i].item()
                yield seed, "drift", (mean_shift[i] + scale_shift[i]).item()
        self.previous = (step, current)

    def state_dict(self) -> dict:
        return {"previous": self.previous}

    def load_state_dict(self, s: dict) -> None:
        self.previous = s["previous"]


def batched_ce(out: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of a seed-batched model's (S, B, K) output against (S, B) labels."""
    K = out.shape[-1]
    return nn.functional.cross_entropy(out.reshape(-1, K), y.reshape(-1))


class ProbedTrainer(ClassifierTrainer):
    """A ClassifierTrainer (one seed: S = 1) with a bnlab.probes.Monitor observing its training
    steps; the Monitor's records are reported at the next evaluation as ``<metric>@<layer>``."""

    def __init__(self, *args, probes: Sequence = (), probe_every: int = 100, probe_at: Sequence[int] = (),
                 **kwargs) -> None:
        super().__init__(*args, loss_hook=self._observe, **kwargs)
        if len(self.seeds) != 1:
            raise ValueError("ProbedTrainer measures one seed per model (S = 1)")
        self.monitor = Monitor(self.model, batched_ce, self.opt, probes=probes, every=probe_every,
                               start_step=1, at=probe_at)
        self._pending: list = []

    def _observe(self, trainer, loss) -> None:
        x, y = self.last_batch
        step = self._step
        self._pending.extend(self.monitor.observe(step, x, y))

    def train_step(self, step: int) -> None:
        self._step = step
        super().train_step(step)

    def evaluate(self, step: int):
        yield from super().evaluate(step)
        seed = self.seeds[0]
        for r in self._pending:
            if r["step"] == step:
                yield seed, self.arm, f"{r['metric']}@{r['layer']}", r["value"]
        self._pending = [r for r in self._pending if r["step"] > step]
