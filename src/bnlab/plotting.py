"""Matplotlib helpers for bnlab's figures — the probes' plots and the lab's (Agg backend, atomic
PNG writes)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ._files import atomic_write_bytes  # noqa: E402

__all__ = ["plt", "save", "mean_band", "COLORS"]

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf"]


def save(fig, path: Path | str, dpi: int = 110) -> str:
    """Write a figure atomically as PNG and close it; returns the file name."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path).name


def mean_band(ax, curves: Sequence[tuple[Sequence[float], Sequence[float]]], label: str,
              color: str, log: bool = False, alpha: float = 0.2) -> None:
    """Plot the mean over seeds with a min–max band; curves are (steps, values) per seed."""
    curves = [(np.asarray(s), np.asarray(v, dtype=float)) for s, v in curves if len(s)]
    if not curves:
        return
    n = min(len(s) for s, _ in curves)
    steps = curves[0][0][:n]
    values = np.stack([v[:n] for _, v in curves])
    mean = np.nanmean(values, axis=0)
    ax.plot(steps, mean, color=color, label=label, lw=1.6)
    if len(curves) > 1:
        ax.fill_between(steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=color,
                        alpha=alpha, lw=0)
    if log:
        ax.set_yscale("log")
