"""The answer of :func:`stablejax.debug.locate`: a ``Report``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from stablejax._src.debug.values import OperandStats


@dataclasses.dataclass
class Report:
    """Where the first NaN/Inf was born, why, and what to change.

    Attributes:
      primitive: the jaxpr primitive whose output first held the value (``'div'``),
        or ``None`` when the value came in with the arguments.
      kind: ``'nan'`` or ``'inf'``.
      phase: ``'forward'`` (running the function without differentiation already
        produces it), ``'backward'`` (only derivative computation does, including
        JVP-rule terms scheduled in the forward sweep) or ``'update'`` (the
        optimizer update of a train step).
      input_path: for values that came in (or invalid integer inputs), the
        argument path, e.g. ``"batch['x']"``.
      rows: indices along the first axis of ``input_path`` that hold bad values.
      module: the module path: Flax linen ``Net/Block_0``, NNX ``encoder.blocks.2.norm``.
      source: ``'file:line'`` of the innermost frame in the user's code. For a
        backward value, the line of the forward op whose derivative produced it.
      frames: the user's frames, innermost first, as ``'file:line (function)'``.
      inputs: per operand of ``primitive``: shape, dtype, min, max, zeros,
        negatives and non-finite count.
      iteration: the index of the ``scan``/``while`` iteration (outermost loop),
        ``None`` outside loops; ``iterations`` holds every nested index.
      category: one of ``bad_input``, ``forward_singularity``,
        ``derivative_singularity``, ``loss_nan``, ``overflow_low_precision``,
        ``grad_explosion``.
      suggestion: the concrete fix.
      why: one sentence on the cause.
      op: for backward values, the forward primitive whose derivative it is
        (``'sqrt'`` for the ``div`` in ``0.5 / sqrt(x)``); else ``primitive``.
      reaches_output: whether the value reaches an output of the function (when
        ``False`` it was masked, e.g. by ``jnp.where``, and nothing else broke).
      origins: how many separate origins the walk saw.
      callbacks_skipped: how many ``io_callback`` equations were not run again
        (their outputs were not re-evaluated; zeros stood in). ``locate(fn,
        run_callbacks=True)`` runs them.
      mesh_axes: for an origin inside a ``shard_map``/``pmap`` body, the mesh axis
        names of the body (``['data']``); ``None`` outside mapped bodies.
      shard_index: the axis indices of the first shard where the value was born,
        ``{'data': 3}``.
      shards_affected: on how many shards the equation made the value.
      num_shards: how many shards the body runs on.
      device: the id of the device holding that shard.
      process: the ``jax.process_index()`` of the process holding that shard.
      origin_local: ``False`` when another process holds the shard (a
        multi-process run): the equation and shard are that process's answer,
        all-gathered, and so are the operand statistics.
    """

    primitive: str | None
    kind: str
    phase: str
    category: str
    suggestion: str
    why: str = ""
    input_path: str | None = None
    rows: list[int] | None = None
    module: str | None = None
    source: str | None = None
    frames: list[str] = dataclasses.field(default_factory=list)
    inputs: list[OperandStats] = dataclasses.field(default_factory=list)
    iteration: int | None = None
    iterations: list[int] = dataclasses.field(default_factory=list)
    op: str | None = None
    name_stack: str = ""
    reaches_output: bool = True
    origins: int = 1
    callbacks_skipped: int = 0
    mesh_axes: list[str] | None = None
    shard_index: dict[str, int] | None = None
    shards_affected: int | None = None
    num_shards: int | None = None
    device: int | None = None
    process: int | None = None
    origin_local: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (plain Python types only)."""
        out = dataclasses.asdict(self)
        out["inputs"] = [s.to_dict() for s in self.inputs]
        return out

    def to_json(self, **kwargs: Any) -> str:
        """The report as a JSON string; ``kwargs`` go to ``json.dumps``."""
        return json.dumps(self.to_dict(), **kwargs)

    @property
    def headline(self) -> str:
        """The one-line answer: op, module, phase, line, why, fix."""
        what = "NaN" if self.kind == "nan" else "Inf"
        if self.primitive is None:
            where = f"{what} came in with argument {self.input_path}"
            if self.rows:
                where += f" (rows {_rows(self.rows)})"
        else:
            op = self.primitive
            if self.op and self.op != self.primitive:
                op += f" (derivative of {self.op})"
            where = f"{what} born in {op}"
            if self.input_path:
                where += f" from {self.input_path}"
        parts = [where]
        if self.module:
            parts.append(f"module {self.module}")
        parts.append(f"{self.phase} pass" if self.phase != "update" else "optimizer update")
        if self.source:
            parts.append(f"at {self.source}")
        if self.iteration is not None:
            parts.append(f"iteration {self.iteration}")
        if self.shard_index is not None:
            parts.append(self.shard_text)
        line = ", ".join(parts) + f" [{self.category}]"
        if self.why:
            line += f": {self.why}"
        return line + f" Fix: {self.suggestion}"

    @property
    def shard_text(self) -> str:
        """Where in the mesh: ``'on shard data=3 of 8 (device 3), 1 of 8 shards'``."""
        if self.shard_index is None:
            return ""
        coord = ", ".join(f"{a}={i}" for a, i in self.shard_index.items())
        where = [f"device {self.device}"] if self.device is not None else []
        if self.process is not None and (self.process or self.origin_local is False):
            where.append(f"process {self.process}")
        text = f"on shard {coord} of {self.num_shards}"
        if where:
            text += f" ({', '.join(where)})"
        return text + f", {self.shards_affected} of {self.num_shards} shards"

    def __str__(self) -> str:
        lines = [self.headline]
        if self.frames:
            lines.append("  user frames (innermost first):")
            lines.extend(f"    {f}" for f in self.frames[:6])
        for i, s in enumerate(self.inputs):
            lines.append(
                f"  operand {i}: {s.dtype}{list(s.shape)} min={_num(s.min)} max={_num(s.max)} "
                f"zeros={s.zeros} negatives={s.negatives} non-finite={s.nonfinite}"
            )
        if not self.reaches_output:
            lines.append("  note: this value is masked before the outputs (e.g. by jnp.where).")
        if self.origin_local is False:
            lines.append(
                f"  note: the shard lives on process {self.process}; its report has the "
                "operands (all-gathered here)."
            )
        if self.callbacks_skipped:
            lines.append(
                f"  note: {self.callbacks_skipped} io_callback output(s) were not re-evaluated "
                "(zeros stood in); locate(fn, run_callbacks=True) runs them."
            )
        if self.origins > 1:
            lines.append(
                f"  ({self.origins} separate origins seen; this is the first that matters)"
            )
        return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _rows(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:8])
    return shown + (", ..." if len(rows) > 8 else "")
