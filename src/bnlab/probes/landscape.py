"""Landscape: loss and gradient along the gradient direction (Santurkar et al. 2018, §3.1)."""

from __future__ import annotations

import math
from typing import Optional, Sequence


from ..options import ProbeMode
from .base import Evaluator, Probe

__all__ = ["Landscape"]


class Landscape(Probe):
    r"""At step t, with g = ∇L(w_t) on the current batch, for η in a grid, evaluate w_t − ηg:

      loss, loss_min, loss_max   L(w_t) and the band of L(w_t − ηg) over the grid (Fig. 4a)
      grad_pred                  max_η ‖∇L(w_t) − ∇L(w_t − ηg)‖ — gradient predictiveness (4b)
      beta_smooth                max_η ‖∇L(w_t) − ∇L(w_t − ηg)‖ / ‖ηg‖ — effective β-smoothness (4c)
      grad_norm                  ‖g‖

    Args:
        etas: explicit step sizes; default ``points`` values geometrically spaced over
            ``eta_range`` × the optimizer's learning rate (Santurkar: [½, 4]×lr for VGG,
            [1/100, 30]×lr for the deep linear network).
        keep_curve: also record every L(w_t − ηg) as metric "loss@eta=<η>".
    Cost per measurement: (1 + points) forward and backward passes.
    """

    name = "landscape"
    needs_loss = True

    def __init__(self, every: Optional[int] = None, etas: Optional[Sequence[float]] = None,
                 eta_range: tuple[float, float] = (0.5, 4.0), points: int = 8, keep_curve: bool = False,
                 mode: ProbeMode = "train") -> None:
        super().__init__(every, mode)
        self.etas, self.eta_range, self.points, self.keep_curve = etas, eta_range, points, keep_curve

    def grid(self, lr: float) -> list[float]:
        if self.etas is not None:
            return list(self.etas)
        lo, hi = self.eta_range[0] * lr, self.eta_range[1] * lr
        if self.points == 1:
            return [lo]
        r = (hi / lo) ** (1 / (self.points - 1))
        return [lo * r ** i for i in range(self.points)]

    def measure(self, monitor, step, x, y):
        if self.etas is None and monitor.lr is None:
            raise ValueError("Landscape needs etas=... or a learning rate (an optimizer on the Monitor, or lr=)")
        ev = Evaluator(monitor.model, monitor.loss_fn, x, y, monitor.forward, self.mode)
        with ev:
            loss0, g = ev.loss_and_grad()
            gnorm = math.sqrt(sum(v.double().square().sum().item() for v in g.values()))
            losses, pred, beta = [], 0.0, 0.0
            rows = []
            for eta in self.grid(monitor.lr or 1.0):
                moved = {n: ev.params[n] - eta * g[n] for n in g}
                loss, g_eta = ev.loss_and_grad(moved)
                diff = math.sqrt(sum((g[n] - g_eta[n]).double().square().sum().item() for n in g))
                losses.append(loss)
                pred = max(pred, diff)
                if gnorm > 0:
                    beta = max(beta, diff / (eta * gnorm))
                if self.keep_curve:
                    rows.append(("*", f"loss@eta={eta:.4g}", loss))
        self.cost.forward += ev.forwards
        self.cost.backward += ev.backwards
        return rows + [("*", "loss", loss0), ("*", "loss_min", min(losses)), ("*", "loss_max", max(losses)),
                       ("*", "grad_pred", pred), ("*", "beta_smooth", beta), ("*", "grad_norm", gnorm)]
