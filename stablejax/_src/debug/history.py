"""The ``history`` given to ``locate``: recent losses and gradient norms, one per step."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class History:
    """Per-step losses and gradient norms given to ``locate(history=...)``."""

    losses: tuple[float, ...]
    grad_norms: tuple[float, ...]

    @property
    def growing(self) -> bool:
        """Whether the loss or the gradient norm grew step over step before the failure."""
        return _growing(self.grad_norms) or _growing(self.losses)

    def clip_value(self) -> float | None:
        """A clipping threshold from the healthy gradient norms: their 90th percentile."""
        g = np.asarray([x for x in self.grad_norms if math.isfinite(x)], float)
        if g.size < 2:
            return None
        median = float(np.median(g[: max(2, g.size // 2)]))
        healthy = g[g <= 5 * median] if median > 0 else g
        return _round2(float(np.percentile(healthy, 90)))


def parse_history(history: Any) -> History | None:
    """Validates ``history``: a sequence of losses, or of dicts with ``loss``/``grad_norm``.

    Raises:
      TypeError: if ``history`` is not a sequence of numbers or mappings.
    """
    if history is None:
        return None
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise TypeError(
            "locate: `history` must be a list with one entry per step, each a loss or a dict "
            f"with 'loss' and/or 'grad_norm'; got {type(history).__name__}."
        )
    losses, norms = [], []
    for i, item in enumerate(history):
        if isinstance(item, Mapping):
            if "loss" in item:
                losses.append(float(np.asarray(item["loss"])))
            if "grad_norm" in item:
                norms.append(float(np.asarray(item["grad_norm"])))
        else:
            try:
                losses.append(float(np.asarray(item)))
            except (TypeError, ValueError):
                raise TypeError(
                    f"locate: history[{i}] = {item!r} is neither a number nor a dict with "
                    "'loss'/'grad_norm'."
                ) from None
    return History(tuple(losses), tuple(norms))


def _growing(values: Sequence[float]) -> bool:
    vals = [v for v in values if math.isfinite(v)]
    if len(vals) < 3:
        return False
    tail = vals[-4:]
    rising = all(b > a for a, b in zip(tail, tail[1:]))
    base = float(np.median(vals[: max(1, len(vals) // 2)]))
    return (rising and tail[-1] > 3 * abs(tail[0])) or (base > 0 and vals[-1] > 10 * base)


def _round2(x: float) -> float:
    if x <= 0 or not math.isfinite(x):
        return x
    digits = 1 - int(math.floor(math.log10(x)))
    return round(x, digits)
