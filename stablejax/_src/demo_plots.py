"""One figure per scenario: loss and gradient norm over steps, naive against fixed.

Drawn with matplotlib's Agg canvas directly (no ``pyplot``), so the demo never
changes the user's matplotlib backend and needs no display.
"""

from __future__ import annotations

import math
import os

import numpy as np

from stablejax._src.demo_runner import ScenarioResult


def _finite(values: list[float]) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(a), a, np.nan)


def plot_scenario(result: ScenarioResult, path: str | os.PathLike[str]) -> None:
    """Saves the scenario's figure as a PNG at ``path``.

    Two panels (loss, gradient norm; log scale): the naive run up to its first
    non-finite step, marked with a red cross and a dashed line, and the fixed
    run, with the steps its guard skipped marked by orange triangles.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    naive, fixed = result.naive, result.fixed
    bad = naive.nonfinite_step
    for ax, key, label in zip(axes, ("losses", "grad_norms"), ("loss", "gradient norm")):
        n_vals, f_vals = _finite(getattr(naive, key)), _finite(getattr(fixed, key))
        ax.plot(np.arange(len(f_vals)), f_vals, color="tab:green", lw=1.4, label="fixed")
        ax.plot(np.arange(len(n_vals)), n_vals, color="tab:red", lw=1.4, label="naive")
        positive = np.concatenate([n_vals, f_vals])
        positive = positive[np.isfinite(positive) & (positive > 0)]
        if positive.size:
            ax.set_yscale("log")
            top = float(positive.max())
        else:
            top = 1.0
        if bad is not None:
            raw = getattr(naive, key)[bad]
            ax.axvline(bad, color="tab:red", ls="--", lw=1)
            ax.plot(
                [bad], [top], "x", color="tab:red", ms=10, mew=2,
                label=f"naive non-finite ({_word(raw)}) at step {bad}",
            )
        if fixed.skipped:
            ax.plot(
                fixed.skipped, [top] * len(fixed.skipped), "v", color="tab:orange", ms=8,
                label=f"skipped by the guard ({len(fixed.skipped)})",
            )
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_xlim(0, max(len(f_vals), len(n_vals), 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{result.scenario.title}: fix = {result.scenario.fix}", fontsize=10)
    fig.savefig(path, dpi=100)


def _word(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf"
    return f"{x:.3g}"
