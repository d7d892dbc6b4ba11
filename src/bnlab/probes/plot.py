"""Standard figures of probe records (matplotlib): percentile bands over steps, per-layer gradient
norms, ICS per layer, landscape bands."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

from ..options import PlotKind, ProbeMode

__all__ = ["plot", "KINDS"]

KINDS = ("percentiles", "gradients", "ics", "landscape", "hessian")


# the probe whose records each kind of figure draws: Landscape's whole-model "grad_norm" must not
# appear among GradientFlow's per-layer curves
_PROBE = {"percentiles": "activation_stats", "gradients": "gradient_flow", "ics": "ics",
          "landscape": "landscape", "hessian": "hessian_top_eig"}


def _by_layer(records, metric):
    out = defaultdict(list)
    for r in records:
        if r["metric"] == metric:
            out[r["layer"]].append((r["step"], r["value"]))
    return {k: sorted(v) for k, v in out.items()}


def plot(records: Iterable[dict], kind: PlotKind, path: Optional[str | Path] = None, title: str = "",
         mode: ProbeMode = "train"):
    """Draw one standard figure from Monitor.records; save it to ``path`` if given.

    kind: "percentiles" (ActivationStats p15/p50/p85 per layer), "gradients" (grad_norm per
    layer, log scale), "ics" (ics_l2 and ics_cos per layer), "landscape" (loss band, gradient
    predictiveness, β-smoothness), "hessian" (top eigenvalue). Only the records of the probe that
    kind belongs to, measured in ``mode`` ("train" or "eval"), are drawn. Returns the Figure.
    """
    from ..plotting import COLORS, plt, save
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    records = [r for r in records if r.get("probe", _PROBE[kind]) == _PROBE[kind]
               and r.get("mode", "train") == mode]
    if kind == "percentiles":
        p50 = _by_layer(records, "p50")
        layers = list(p50)
        fig, axes = plt.subplots(1, max(1, len(layers)), figsize=(3.6 * max(1, len(layers)), 3.2), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            lo, hi = dict(_by_layer(records, "p15")).get(layer, []), dict(_by_layer(records, "p85")).get(layer, [])
            steps = [s for s, _ in p50[layer]]
            ax.plot(steps, [v for _, v in p50[layer]], "k-", label="p50")
            if lo and hi:
                ax.fill_between([s for s, _ in lo], [v for _, v in lo], [v for _, v in hi], alpha=0.25, label="p15–p85")
            ax.set(title=layer, xlabel="step")
        axes[0][0].set_ylabel("pre-activation")
        axes[0][0].legend()
    elif kind == "gradients":
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for i, (layer, pts) in enumerate(_by_layer(records, "grad_norm").items()):
            ax.plot([s for s, _ in pts], [v for _, v in pts], color=COLORS[i % len(COLORS)], label=layer)
        ax.set(yscale="log", xlabel="step", ylabel="‖∂L/∂W‖")
        ax.legend(fontsize=7)
    elif kind == "ics":
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for metric, ax in zip(("ics_l2", "ics_cos"), axes):
            for i, (layer, pts) in enumerate(_by_layer(records, metric).items()):
                ax.plot([s for s, _ in pts], [v for _, v in pts], color=COLORS[i % len(COLORS)], label=layer)
            ax.set(xlabel="step", ylabel=metric)
        axes[0].set_yscale("log")
        axes[1].legend(fontsize=7)
    elif kind == "landscape":
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        lo, hi = _by_layer(records, "loss_min").get("*", []), _by_layer(records, "loss_max").get("*", [])
        if lo:
            axes[0].fill_between([s for s, _ in lo], [v for _, v in lo], [v for _, v in hi], alpha=0.4)
        axes[0].set(title="loss band along −∇L", xlabel="step")
        for ax, metric, label in ((axes[1], "grad_pred", "gradient predictiveness"),
                                  (axes[2], "beta_smooth", "effective β-smoothness")):
            pts = _by_layer(records, metric).get("*", [])
            ax.plot([s for s, _ in pts], [v for _, v in pts])
            ax.set(title=label, xlabel="step")
    else:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        pts = _by_layer(records, "top_eig").get("*", [])
        ax.plot([s for s, _ in pts], [v for _, v in pts])
        ax.set(xlabel="step", ylabel="λ_max(∇²L)")
    if title:
        fig.suptitle(title)
    if path is not None:
        save(fig, path)
    return fig
