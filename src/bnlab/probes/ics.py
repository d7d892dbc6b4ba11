"""ICS: internal covariate shift measured on gradients (Santurkar et al. 2018, Definition 2.1)."""

from __future__ import annotations

from typing import Optional, Sequence


from ..options import ProbeMode
from .base import Evaluator, Probe, execution_order, simulate_optimizer_step, weight_layers

__all__ = ["ICS"]


class ICS(Probe):
    r"""Per layer i, on the same batch (x, y):

        G  = ∇_{W_i} L(W_1^t, …, W_k^t)
        G′ = ∇_{W_i} L(W_1^{t+1}, …, W_{i−1}^{t+1}, W_i^t, …, W_k^t)

    records ``ics_l2`` = ‖G − G′‖₂, ``ics_cos`` = cos(G, G′) and the scale-free ``ics_rel`` =
    ‖G − G′‖₂ / ‖G‖₂ (comparable across networks whose gradients differ in scale, as BN's
    and plain networks' do). W^{t+1} is the step a *copy*
    of the real optimizer (momentum, weight decay, state) takes from the real gradient; "layers
    before i" are all parameters of modules that run before layer i's module. Cost per
    measurement: (1 + number of layers) forward and backward passes.

    Args:
        layers: weight-layer names (default: every module with a ≥ 2-D weight), measured in
            execution order.
    """

    name = "ics"
    needs_loss = True
    needs_optimizer = True

    def __init__(self, every: Optional[int] = None, layers: Optional[Sequence[str]] = None,
                 mode: ProbeMode = "train") -> None:
        super().__init__(every, mode)
        self.layer_names = layers

    def measure(self, monitor, step, x, y):
        model = monitor.model
        layers = weight_layers(model) if self.layer_names is None else \
            {n: dict(model.named_modules())[n] for n in self.layer_names}
        real_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        ev = Evaluator(model, monitor.loss_fn, x, y, monitor.forward, self.mode)
        rows = []
        with ev:
            _, G = ev.loss_and_grad()
            # the update the real optimizer is about to apply (its real gradient where it has one)
            new = simulate_optimizer_step(monitor.optimizer, model, {**G, **real_grads})
            owners = {n: m for n, m in model.named_modules() if m._parameters and
                      any(p is not None and p.requires_grad for p in m._parameters.values())}
            order = execution_order(model, ev, owners)
            position = {n: i for i, n in enumerate(order)}
            param_owner = {}
            for mod_name, m in owners.items():
                for pname, p in m._parameters.items():
                    if p is not None and p.requires_grad:
                        param_owner[f"{mod_name}.{pname}" if mod_name else pname] = mod_name
            for name in sorted(layers, key=lambda n: position.get(n, 1 << 30)):
                weight = f"{name}.weight" if name != "<root>" else "weight"
                earlier = {p: new[p] for p, owner in param_owner.items()
                           if position.get(owner, 1 << 30) < position.get(name, 1 << 30) and p in new}
                _, Gp = ev.loss_and_grad(earlier, wrt=[weight])
                g, gp = G[weight].flatten().double(), Gp[weight].flatten().double()
                diff = (g - gp).norm().item()
                rows.append((name, "ics_l2", diff))
                rows.append((name, "ics_rel", diff / g.norm().item() if g.norm().item() > 0 else float("nan")))
                denom = g.norm().item() * gp.norm().item()
                rows.append((name, "ics_cos", (g @ gp).item() / denom if denom > 0 else float("nan")))
        self.cost.forward += ev.forwards
        self.cost.backward += ev.backwards
        return rows
