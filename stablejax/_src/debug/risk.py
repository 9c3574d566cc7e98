"""What :func:`stablejax.debug.lint` returns: ``Risk`` and the list of them, ``Risks``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SEVERITIES = ("high", "low")


@dataclasses.dataclass(frozen=True)
class Risk:
    """One equation that can make a NaN or an Inf from inputs it can receive.

    Attributes:
      primitive: the jaxpr primitive (``'sqrt'``, ``'div'``, ``'exp'``, ...).
      source: ``'file.py:LINE'``, the user's line that wrote it (for a backward
        risk too: the forward op whose derivative is singular), or ``None``.
      module: the module path (linen ``Net/Block_0``, NNX ``encoder.norm``) or ``None``.
      phase: ``'forward'`` when the function's value itself can be non-finite,
        ``'backward'`` when only its derivative can (``d sqrt`` at 0, a
        ``jnp.where`` that masks the forward value but not its gradient).
      category: as :func:`stablejax.debug.locate`'s: ``forward_singularity``,
        ``derivative_singularity``, ``loss_nan``, ``overflow_low_precision``.
      severity: ``'high'`` when the singular point is reachable from the values
        the inputs can take (a zero vector, a constant row, an empty mask, a
        negative number), ``'low'`` when only extreme values reach it (underflow
        to 0, overflow of float32).
      suggestion: the fix: the stablejax op, layer or loss, or ``stablejax.harden``.
      why: one sentence on what can go wrong.
      line: the text of the source line (``''`` when unknown).
    """

    primitive: str
    source: str | None
    module: str | None
    phase: str
    category: str
    severity: str
    suggestion: str
    why: str = ""
    line: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields."""
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        """The risk as JSON (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        where = ", ".join(x for x in (self.source, self.module) if x) or "?"
        return (
            f"[{self.severity}] {self.primitive} ({self.phase}, {self.category}) at {where}: "
            f"{self.why} Fix: {self.suggestion}"
        )


class Risks(list):
    """The risks ``lint`` found, high severity first; a list with a table view.

    ``print(risks)`` writes one line per risk, ``rich.print(risks)`` a table;
    ``to_dict()``/``to_json()`` give the JSON form.
    """

    @property
    def high(self) -> list[Risk]:
        """The high-severity risks."""
        return [r for r in self if r.severity == "high"]

    def to_dict(self) -> list[dict[str, Any]]:
        """A JSON-ready list of dicts."""
        return [r.to_dict() for r in self]

    def to_json(self, **kwargs: Any) -> str:
        """The risks as a JSON list."""
        return json.dumps(self.to_dict(), **kwargs)

    def table(self, title: str = "stablejax.debug.lint") -> Any:
        """A ``rich.table.Table`` of the risks."""
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"{title}: {len(self)} risk(s), {len(self.high)} high")
        for col in ("severity", "op", "phase", "line", "module", "category", "fix"):
            table.add_column(col, overflow="fold")
        for r in self:
            style = "bold red" if r.severity == "high" else "yellow"
            table.add_row(
                Text(r.severity, style=style), r.primitive, r.phase, Text(r.source or "-"),
                Text(r.module or "-"), r.category, Text(r.suggestion, style="green"),
            )
        return table

    def __rich__(self) -> Any:
        return self.table()

    def __str__(self) -> str:
        if not self:
            return "lint: no risk found"
        return "\n".join(str(r) for r in self)

    def __repr__(self) -> str:
        return f"Risks({list.__repr__(self)})"
