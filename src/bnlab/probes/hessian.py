"""HessianTopEig: the largest Hessian eigenvalue by power iteration on Hessian-vector products."""

from __future__ import annotations

from typing import Optional

import torch

from ..options import ProbeMode
from .base import Evaluator, Probe

__all__ = ["HessianTopEig"]


class HessianTopEig(Probe):
    r"""λ_max of ∇²L(w_t) on the current batch, in the model's training semantics (BN with batch
    statistics — the function the optimizer descends), by power iteration v ← Hv/‖Hv‖ with
    λ = vᵀHv, warm-started from the previous measurement's vector. Hv is a double backward
    (bnlab's BN backward is itself differentiable). Records ``top_eig`` and ``power_iters``.

    Power iteration finds the eigenvalue of largest magnitude; near a minimum that is the top
    one. Cost per measurement: 1 forward, 1 backward with graph, ``iters`` double backwards.
    """

    name = "hessian_top_eig"
    needs_loss = True

    def __init__(self, every: Optional[int] = None, iters: int = 20, tol: float = 1e-3,
                 mode: ProbeMode = "train", seed: int = 0) -> None:
        super().__init__(every, mode)
        self.iters, self.tol = iters, tol
        self._gen = torch.Generator().manual_seed(seed)
        self._v: Optional[dict] = None

    def measure(self, monitor, step, x, y):
        ev = Evaluator(monitor.model, monitor.loss_fn, x, y, monitor.forward, self.mode)
        with ev, torch.enable_grad():
            leaves = {n: p.detach().clone().requires_grad_() for n, p in ev.params.items()}
            names = list(leaves)
            loss = ev.loss(leaves)
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=True)
            self.cost.backward += 1
            v = self._v if self._v is not None and set(self._v) == set(names) else \
                {n: torch.randn(leaves[n].shape, generator=self._gen).to(leaves[n]) for n in names}
            norm = torch.sqrt(sum(t.double().square().sum() for t in v.values())).item()
            v = {n: t / norm for n, t in v.items()}
            lam, k = float("nan"), 0
            for k in range(1, self.iters + 1):
                hv = torch.autograd.grad(grads, [leaves[n] for n in names],
                                         grad_outputs=[v[n] for n in names], retain_graph=True)
                self.cost.backward += 1
                hv = {n: h.detach() for n, h in zip(names, hv)}
                new_lam = sum((v[n].double() * hv[n].double()).sum() for n in names).item()
                norm = torch.sqrt(sum(h.double().square().sum() for h in hv.values())).item()
                if norm == 0:
                    lam = 0.0
                    break
                v = {n: h / norm for n, h in hv.items()}
                converged = abs(new_lam - lam) <= self.tol * abs(new_lam)
                lam = new_lam
                if converged:
                    break
        self._v = {n: t.detach() for n, t in v.items()}
        self.cost.forward += ev.forwards
        return [("*", "top_eig", lam), ("*", "power_iters", float(k))]
