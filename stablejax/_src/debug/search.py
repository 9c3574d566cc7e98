"""From the compiled flags to the origin: the walker's rules replayed on the host.

:mod:`compiled` gives a code per floating output of every equation (finite,
holds an Inf, holds a NaN). :func:`search` replays the taint rules of
:class:`~stablejax._src.debug.interpreter.Walker` on those codes alone (no
values): the origins in execution order, the ones whose taint reaches an
output, and the chosen one, the first that reaches an output (the first of
all when a mask hid every one). Only then is a value computed: the operands of
that one equation, or of the region (``scan``, ``while``, ``cond``,
``shard_map``, ``pmap``) holding it, which the walker then evaluates eagerly.

The answer is :data:`FALLBACK` when the codes cannot decide: no flagged output
reaches an output while the program has regions (a masked NaN inside a loop
body leaves no trace outside it), or the region's walk finds nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jax.extend import core as jcore

from stablejax._src.debug import compiled
from stablejax._src.debug import phase as phase_labels
from stablejax._src.debug.interpreter import INTENTIONAL, Walker
from stablejax._src.debug.source import traceback_frames
from stablejax._src.debug.values import Origin, is_float, nonfinite_kind

FALLBACK = "fallback"
_KINDS = {0: None, 1: "inf", 2: "nan"}


@dataclasses.dataclass
class Found:
    """The chosen origin and what the report needs around it."""

    origin: Origin
    reaches: bool
    origins: int
    scoped: bool
    walker: Walker


def _lit_taint(val: Any) -> int | None:
    return INTENTIONAL if is_float(val) and nonfinite_kind(val) else None


def taint_walk(
    prog: compiled.Program,
    codes: dict[tuple[int, int], int],
    arg_taints: Sequence[int | None],
    arg_kinds: Sequence[str | None],
    n_known: int,
) -> tuple[list[Any], list[int], dict[int, int | None]]:
    """Origins (a known origin's index or ``('leaf', k)``), the reached ones, the taints."""
    taint: dict[int, int | None] = dict(enumerate(arg_taints))
    kind: dict[int, str | None] = dict(enumerate(arg_kinds))
    for i, val in prog.consts.items():
        taint[i] = prog.const_taint[i]
        kind[i] = nonfinite_kind(val) if is_float(val) else None
    cands: list[Any] = list(range(n_known))

    def read(i):
        if isinstance(i, tuple):
            return _lit_taint(i[1]), (nonfinite_kind(i[1]) if is_float(i[1]) else None)
        return taint.get(i), kind.get(i)

    for k, leaf in enumerate(prog.leaves):
        out_kinds = [_KINDS[codes.get((k, j), 0)] for j in range(len(leaf.outs))]
        if not any(out_kinds):
            continue
        ins = [read(i) for i in leaf.ins]
        real = [t for t, _ in ins if t is not None and t != INTENTIONAL]
        if real:
            t = min(real)
        else:
            intentional = any(t == INTENTIONAL for t, _ in ins)
            made_nan = "nan" in out_kinds and not any(
                t == INTENTIONAL and kd == "nan" for t, kd in ins
            )
            if intentional and not made_nan:
                t = INTENTIONAL
            else:
                t = len(cands)
                cands.append(("leaf", k))
        for o, kd in zip(leaf.outs, out_kinds):
            if o is not None and kd:
                taint[o], kind[o] = t, kd
    out_t = [read(i)[0] for i in prog.outputs]
    return cands, sorted({t for t in out_t if t is not None and t >= 0}), taint


def _remember_static(walker: Walker, jaxpr: Any, site: Any, out_flags, in_grad: bool) -> None:
    """Records the forward ops of a region's body (static: no values needed)."""
    labels, eqn_flags = walker._labels_for(jaxpr, tuple(out_flags), site.backward)
    grad = dict.fromkeys(jaxpr.invars, in_grad)
    for k, eqn in enumerate(jaxpr.eqns):
        g = any(grad.get(v, False) for v in eqn.invars if not isinstance(v, jcore.Literal))
        frames = traceback_frames(eqn.source_info.traceback)
        phase = walker._phase(labels[k], g, frames)
        sub = dataclasses.replace(
            site,
            name_stack=site.name_stack + eqn.source_info.name_stack,
            frames=frames + site.frames,
            backward=site.backward or labels[k] == phase_labels.BACKWARD,
        )
        if labels[k] in (phase_labels.FORWARD, phase_labels.FEEDS_BACKWARD) and phase == "forward":
            walker._remember_forward_op(eqn, sub)
        _remember_inner(walker, eqn, sub, eqn_flags[k], g)
        for v in eqn.outvars:
            grad[v] = g or labels[k] == phase_labels.BACKWARD


def _remember_inner(walker: Walker, eqn: Any, site: Any, flags, in_grad: bool) -> None:
    for key, p in eqn.params.items():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
            inner, _ = compiled._sub_jaxpr(sub)
            if not hasattr(inner, "eqns"):
                continue
            n_out = len(inner.outvars)
            if eqn.primitive.name == "scan":
                nc = eqn.params["num_carry"]
                f = (True,) * nc + tuple(flags[nc:])
            elif len(flags) == n_out and key not in ("cond_jaxpr", "body_jaxpr"):
                f = tuple(flags)
            else:
                f = (True,) * n_out
            _remember_static(walker, inner, site, f, in_grad)


def _remember_upto(walker: Walker, prog: compiled.Program, upto: int) -> None:
    for leaf in prog.leaves[: upto + 1]:
        fwd = leaf.label in (phase_labels.FORWARD, phase_labels.FEEDS_BACKWARD)
        if fwd and leaf.phase == "forward":
            walker._remember_forward_op(leaf.eqn, leaf.site)
        if leaf.region:
            _remember_inner(walker, leaf.eqn, leaf.site, leaf.out_flags, leaf.in_grad)


def search(
    closed: Any,
    args: Sequence[Any],
    arg_taints: Sequence[int | None],
    walker: Walker,
    site0: Any,
    call_params: dict[str, str],
) -> Found | None | str:
    """The chosen origin (``Found``), ``None`` when all is finite, or ``FALLBACK``."""
    prog = compiled.flatten(walker, closed, call_params, site0)
    n_known_all = len(walker.origins)  # arguments, then NaN constants
    codes = compiled.flag_values(prog, args, walker.run_callbacks)
    arg_kinds = [nonfinite_kind(a) if is_float(a) else None for a in args]
    cands, reached, taint = taint_walk(prog, codes, arg_taints, arg_kinds, n_known_all)
    has_regions = any(leaf.region for leaf in prog.leaves)
    if not cands:
        return FALLBACK if has_regions else None
    if not reached and has_regions:
        return FALLBACK
    first = cands[reached[0]] if reached else cands[0]
    walker.skipped_callbacks = prog.callbacks if not walker.run_callbacks else 0
    if not isinstance(first, tuple):  # an argument or a constant came in bad
        return Found(walker.origins[first], bool(reached), len(cands), prog.scoped, walker)
    k = first[1]
    leaf = prog.leaves[k]
    _remember_upto(walker, prog, k)
    invals = compiled.values_at(prog, args, k, walker.run_callbacks)
    base = len(walker.origins)
    if leaf.region:
        in_t = [
            INTENTIONAL
            if (_lit_taint(i[1]) if isinstance(i, tuple) else taint.get(i)) == INTENTIONAL
            else None
            for i in leaf.ins
        ]
        _, out_t = walker._eqn(
            leaf.eqn, invals, in_t, leaf.site, leaf.phase, leaf.out_flags, leaf.in_grad, leaf.label
        )
        inner = sorted(t for t in out_t if t is not None and t >= base)
        if not inner and len(walker.origins) == base:
            return FALLBACK
        idx = inner[0] if inner else base
    else:
        with_vals = walker._bind(leaf.eqn, invals, leaf.site)
        kinds = [
            nonfinite_kind(o) if is_float(v.aval) else None
            for v, o in zip(leaf.eqn.outvars, with_vals)
        ]
        if not any(kinds):
            return FALLBACK
        idx = walker._new_origin(leaf.eqn, invals, with_vals, kinds, leaf.site, leaf.phase)
        if idx is None:
            return FALLBACK
        walker.origins[idx].extra["producers"] = list(leaf.producers)
    extra = len(walker.origins) - base - 1
    return Found(walker.origins[idx], bool(reached), len(cands) + extra, prog.scoped, walker)
