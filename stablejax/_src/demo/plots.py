"""One figure per scenario: loss and gradient norm over steps, naive against fixed.

Drawn with matplotlib's Agg canvas directly (no ``pyplot``), so the demo never
changes the user's matplotlib backend and needs no display.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from stablejax._src.demo.runner import ScenarioResult


def _finite(values: list[float]) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(a), a, np.nan)


def plot_scenario(result: ScenarioResult, path: str | os.PathLike[str]) -> None:
    """Saves the scenario's figure (:func:`scenario_figure`) as a PNG at ``path``."""
    scenario_figure(result).savefig(path, dpi=100)


def scenario_figure(result: ScenarioResult) -> Any:
    """The scenario's ``matplotlib.figure.Figure``.

    Two panels (loss, gradient norm; log scale): the naive run up to its first
    non-finite step, marked with a red cross and its value (at that value when it
    is finite, at the top of the axis for NaN/Inf) and a dashed line, and
    the fixed run, with the steps its guard skipped marked by orange triangles.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    naive, fixed = result.naive, result.fixed
    bad = naive.nonfinite_step
    for ax, key, label in zip(axes, ("losses", "grad_norms"), ("loss", "gradient norm")):
        n_vals, f_vals = _finite(getattr(naive, key)), _finite(getattr(fixed, key))
        # The naive run is drawn wide underneath: until its fault it matches the fixed run.
        ax.plot(np.arange(len(n_vals)), n_vals, color="tab:red", lw=3, alpha=0.5, label="naive")
        ax.plot(np.arange(len(f_vals)), f_vals, color="tab:green", lw=1.2, label="fixed")
        both = np.concatenate([n_vals, f_vals])
        if (both[np.isfinite(both)] > 0).any():
            ax.set_yscale("log")
        edge = ax.get_xaxis_transform()  # x in data, y in axes fraction
        if bad is not None:
            raw = getattr(naive, key)[bad]
            ax.axvline(bad, color="tab:red", ls="--", lw=1)
            # A finite value (the loss of a step whose gradient is NaN) is marked where it
            # is; NaN and Inf have no place on the axis and are marked at its top.
            finite = math.isfinite(raw)
            y, where = (raw, ax.transData) if finite else (0.96, edge)
            ax.plot(
                [bad], [y], "X", color="tab:red", ms=10, transform=where, clip_on=False,
                label=f"naive non-finite at step {bad}",
            )
            ax.annotate(
                _word(raw), (bad, y), xytext=(6, -4), textcoords="offset points",
                xycoords=where, color="tab:red", fontsize=8,
            )
        if fixed.skipped:
            ax.plot(
                fixed.skipped, [0.03] * len(fixed.skipped), "^", color="tab:orange", ms=9,
                transform=edge, clip_on=False, label="step skipped by the guard",
            )
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_xlim(0, max(len(f_vals), len(n_vals), 1))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(f"{result.scenario.title}\nfix: {result.scenario.fix}", fontsize=10)
    return fig


def _word(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf"
    return f"{x:.3g}"
