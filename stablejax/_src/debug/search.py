"""From the compiled flags to the origin: the walker's rules replayed on the host.

:mod:`compiled` gives a code per floating value a block passes on (finite, or
holds a NaN or an Inf). :func:`search` replays the taint rules of
:class:`~stablejax._src.debug.interpreter.Walker` on those codes alone (no
values): the origins in execution order, the ones whose taint reaches an
output, and the chosen one, the first that reaches an output (the first of
all when a mask hid every one). Only then is a value computed: the operands of
that one equation, or of the region (``scan``, ``while``, ``cond``,
``shard_map``, ``pmap``) holding it, which the walker then evaluates eagerly.

Codes inferred on the host (:mod:`sparse`) can call finite a value born
non-finite from finite operands (an overflow, a division by zero, ``sqrt`` of a
negative); the chosen block then shows such an operand, its code is taken as
measured and the search moves to the block that made it. A code implied from
an output downstream (:func:`sparse.imply`) can call non-finite a value that is
finite (the path after it overflowed); the chosen block then shows it finite,
its code is taken as measured and the search moves on.

The answer is :data:`FALLBACK` when the codes cannot decide: no flagged output
reaches an output while the program has regions (a masked NaN inside a loop
body leaves no trace outside it), or the region's walk finds nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.extend import core as jcore

from stablejax._src.debug import compiled, sparse
from stablejax._src.debug import phase as phase_labels
from stablejax._src.debug.interpreter import CALL_PARAMS, INTENTIONAL, Walker
from stablejax._src.debug.source import traceback_frames
from stablejax._src.debug.values import Origin, is_float, nonfinite_kind

FALLBACK = "fallback"
_KINDS = {0: None, 1: "nonfinite"}
_MAX_WALKS = 4  # blocks walked before giving up on the compiled pass
_MAX_MOVES = 8  # moves to the block making a non-finite value whose inferred code was 0


@dataclasses.dataclass
class Found:
    """The chosen origin and what the report needs around it."""

    origin: Origin
    reaches: bool
    origins: int
    scoped: bool
    walker: Walker
    # For a bad argument or constant: (frames, name stack) of its first consumer.
    consumer: tuple[tuple[Any, ...], Any] | None = None


def _lit_taint(val: Any) -> int | None:
    return INTENTIONAL if is_float(val) and nonfinite_kind(val) else None


def taint_walk(
    prog: compiled.Program,
    spans: Sequence[range],
    esc: Sequence[Sequence[int]],
    codes: dict[int, int],
    arg_taints: Sequence[int | None],
    arg_kinds: Sequence[str | None],
    n_known: int,
    intentional: frozenset[int] = frozenset(),
) -> tuple[list[Any], list[int], dict[int, int | None]]:
    """The walker's rules, block by block, on the codes of the values blocks pass on.

    Returns the origins (a known origin's index, or ``('block', b)`` for one born
    inside block ``b``), the indices of those whose taint reaches an output, and
    the taint of every flagged value.
    """
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

    for b, span in enumerate(spans):
        out_kinds = {i: _KINDS[codes.get(i, 0)] for i in esc[b]}
        if not any(out_kinds.values()):
            continue
        made = {o for k in span for o in prog.leaves[k].outs if o is not None}
        ins = [
            read(i)
            for k in span
            for i in prog.leaves[k].ins
            if isinstance(i, tuple) or i not in made
        ]
        real = [t for t, _ in ins if t is not None and t != INTENTIONAL]
        if real:
            t = min(real)
        elif b in intentional:  # its walk found only masks written on purpose
            t = INTENTIONAL
        else:  # born here, or made from a -inf mask: the block's walk tells
            t = len(cands)
            cands.append(("block", b))
        for o, kd in out_kinds.items():
            if kd:
                taint[o], kind[o] = t, kd
    out_t = [read(i)[0] for i in prog.outputs]
    return cands, sorted({t for t in out_t if t is not None and t >= 0}), taint


_TENTATIVE_VALUES = 32  # at most this many undecided values are read with the chosen block
_TENTATIVE_SIZE = 1 << 22  # of at most this many elements in all


def _tentative(
    prog: compiled.Program, unknown: Sequence[int], witnesses: dict[int, int], made_at: dict
) -> list[int]:
    """Undecided witnessed codes few and small enough to read with the chosen block.

    Taking them as finite and reading their values with the chosen block's
    operands (:func:`compiled.values_of`) saves a compiled pass of their own
    when they are finite, as forward values whose outputs all hold a NaN born
    later usually are.
    """
    if not unknown or len(unknown) > _TENTATIVE_VALUES or not all(u in witnesses for u in unknown):
        return []
    size = 0
    for u in unknown:
        leaf = prog.leaves[made_at[u]]
        aval = leaf.eqn.outvars[leaf.outs.index(u)].aval
        size += int(np.prod(aval.shape, dtype=np.int64))
    return list(unknown) if size <= _TENTATIVE_SIZE else []


def walk_block(
    walker: Walker,
    prog: compiled.Program,
    span: range,
    env: dict[int, Any],
    taint: dict[int, int | None],
    given: dict[int, list[Any]] | None = None,
) -> None:
    """Evaluates the leaves of ``span`` with the walker (exact taints inside).

    ``given`` maps a leaf index to its outputs, computed already
    (:func:`compiled.values_of`): those leaves are not bound again, except
    regions and calls, whose bodies the walker enters.
    """
    last: dict[int, int] = {}
    for k in span:
        for i in prog.leaves[k].ins:
            if not isinstance(i, tuple):
                last[i] = k
    for k in span:
        leaf = prog.leaves[k]
        eqn = leaf.eqn
        invals = [i[1] if isinstance(i, tuple) else env[i] for i in leaf.ins]
        in_t = [_lit_taint(i[1]) if isinstance(i, tuple) else taint.get(i) for i in leaf.ins]
        for v, p in zip(eqn.invars, leaf.producers):
            if p is not None and not isinstance(v, jcore.Literal):
                walker._producer[v] = p
        if given is not None and not leaf.region and eqn.primitive.name not in CALL_PARAMS:
            walker.given = given[k]
        try:
            outs, out_t = walker._eqn(
                eqn, invals, in_t, leaf.site, leaf.phase, leaf.out_flags, leaf.in_grad, leaf.label
            )
        finally:
            walker.given = None
        for o, val, t in zip(leaf.outs, outs, out_t):
            if o is not None:
                env[o], taint[o] = val, t
        for i in leaf.ins:
            if not isinstance(i, tuple) and last.get(i) == k:
                env.pop(i, None)


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


def _value_id(prog: compiled.Program, origin: Origin) -> int | None:
    """The value id of a bad argument (its flat index) or of a captured constant."""
    if origin.leaf is not None:
        return origin.leaf
    return next((i for i, t in prog.const_taint.items() if t == origin.index), None)


def first_consumer(
    prog: compiled.Program, value_id: int | None
) -> tuple[tuple[Any, ...], Any] | None:
    """Frames and name stack of the first equation, in execution order, reading a value.

    Descends into ``scan``/``while`` bodies and other regions whose operands map one
    to one onto the body's inputs, so a bad parameter consumed inside a scanned
    layer names that layer's line and module. ``None`` if nothing reads it.
    """
    if value_id is None:
        return None
    for leaf in prog.leaves:
        pos = [p for p, i in enumerate(leaf.ins) if not isinstance(i, tuple) and i == value_id]
        if pos:
            return _consumer_inside(leaf.eqn, pos, leaf.site.frames, leaf.site.name_stack)
    return None


def _bodies(eqn: Any, pos: list[int]) -> list[tuple[Any, list[int]]]:
    """The sub-jaxprs of a region and where the operands ``pos`` enter each."""
    p = eqn.params
    name = eqn.primitive.name
    if name == "while":
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cond = [q if q < nc else q - nb for q in pos if q < nc or q >= nc + nb]
        body = [q - nc for q in pos if q >= nc]
        return [(p["cond_jaxpr"], cond), (p["body_jaxpr"], body)]
    if name == "cond":  # which branch runs is data: the cond's own line answers
        return []
    subs = [
        sub
        for v in p.values()
        for sub in (v if isinstance(v, (tuple, list)) else (v,))
        if hasattr(compiled._sub_jaxpr(sub)[0], "eqns")
    ]
    if len(subs) == 1 and len(compiled._sub_jaxpr(subs[0])[0].invars) == len(eqn.invars):
        return [(subs[0], pos)]
    return []


def _consumer_inside(
    eqn: Any, pos: list[int], frames: tuple[Any, ...], name_stack: Any
) -> tuple[tuple[Any, ...], Any]:
    for sub, sub_pos in _bodies(eqn, pos):
        jaxpr, _ = compiled._sub_jaxpr(sub)
        wanted = {jaxpr.invars[q] for q in sub_pos}
        for inner in jaxpr.eqns:
            hit = [
                q
                for q, v in enumerate(inner.invars)
                if not isinstance(v, jcore.Literal) and v in wanted
            ]
            if hit:
                return _consumer_inside(
                    inner,
                    hit,
                    traceback_frames(inner.source_info.traceback) + frames,
                    name_stack + inner.source_info.name_stack,
                )
    return frames, name_stack


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
    n_known = len(walker.origins)  # arguments, then NaN constants
    spans = compiled.blocks(prog)
    esc = compiled.escaping(prog, spans)
    births = compiled.large(prog)
    # A large program's outputs are measured on the host, not flagged, and many
    # codes follow from them (sparse.plan).
    flagged, derived, implied, witnesses = sparse.plan(prog, esc, births)
    measured = compiled.flag_values(prog, args, walker.run_callbacks, flagged, outputs=births)
    arg_kinds = [nonfinite_kind(a) if is_float(a) else None for a in args]
    has_regions = any(leaf.region for leaf in prog.leaves)
    walker.skipped_callbacks = prog.callbacks if not walker.run_callbacks else 0
    intentional: set[int] = set()
    walks = moves = 0
    made_at = {o: k for k, leaf in enumerate(prog.leaves) for o in leaf.outs if o is not None}
    while True:
        codes, unknown = sparse.infer(prog, derived, measured, args, implied, witnesses)
        tentative = _tentative(prog, unknown, witnesses, made_at)
        if tentative:  # a few witnessed values: taken as finite, read with the chosen block
            trial = dict(measured)
            trial.update(dict.fromkeys(tentative, 0))
            codes, _ = sparse.infer(prog, derived, trial, args, implied, witnesses)
        elif unknown:  # undecided codes are measured, on device
            measured.update(compiled.flag_values(prog, args, walker.run_callbacks, unknown))
            continue
        cands, reached, taint = taint_walk(
            prog, spans, esc, codes, arg_taints, arg_kinds, n_known, frozenset(intentional)
        )
        first = (cands[reached[0]] if reached else cands[0]) if cands else None
        if tentative and (
            not isinstance(first, tuple)
            or spans[first[1]].start <= max(made_at[u] for u in tentative)
        ):  # the choice does not come after them: measure them first
            measured.update(compiled.flag_values(prog, args, walker.run_callbacks, tentative))
            continue
        if not cands:
            return FALLBACK if has_regions else None
        if not reached and has_regions:
            return FALLBACK
        if not isinstance(first, tuple):  # an argument or a constant came in bad
            origin = walker.origins[first]
            return Found(
                origin,
                bool(reached),
                len(cands),
                prog.scoped,
                walker,
                first_consumer(prog, _value_id(prog, origin)),
            )
        span = spans[first[1]]
        made = {o for k in span for o in prog.leaves[k].outs if o is not None}
        needed = sorted(
            {i for k in span for i in prog.leaves[k].ins if not isinstance(i, tuple)} - made
        )
        env, given = compiled.values_of(
            prog, args, needed + tentative, span.start, walker.run_callbacks, block=span
        )
        if tentative:
            real = {
                u: int(nonfinite_kind(env[u] if u in needed else env.pop(u)) is not None)
                for u in tentative
            }
            measured.update(real)
            if any(real.values()):  # one was not finite: choose again with it
                continue
        cleared = {  # implied non-finite, yet finite: the path downstream made it
            o: 0
            for k in (span if implied and given is not None else ())
            for o, val in zip(prog.leaves[k].outs, given[k])
            if o in implied
            and o not in measured
            and codes.get(o)
            and is_float(val)
            and not nonfinite_kind(val)
        }
        if cleared and moves < _MAX_MOVES:
            measured.update(cleared)
            moves += 1
            continue
        block_taint = {i: (INTENTIONAL if taint.get(i) == INTENTIONAL else None) for i in needed}
        wrong = [
            i
            for i in needed
            if block_taint[i] is None and is_float(env[i]) and nonfinite_kind(env[i])
        ]
        if wrong:
            if moves < _MAX_MOVES and all(i in derived and not codes.get(i) for i in wrong):
                # Born by overflow in a value whose code was inferred finite: take
                # its code as measured, so the taint walk moves to the block making it.
                measured.update(dict.fromkeys(wrong, 1))
                moves += 1
                continue
            # The cut-down program disagrees with the flagged one (XLA fused the
            # two differently, e.g. a variance exactly 0 in one, tiny in the
            # other): only the full walk is consistent.
            return FALLBACK
        trial = Walker(walker.run_callbacks)
        trial.origins = list(walker.origins)
        walk_block(trial, prog, span, dict(env), dict(block_taint), given)
        if len(trial.origins) > n_known:
            break
        walks += 1
        if walks >= _MAX_WALKS:
            return FALLBACK
        intentional.add(first[1])  # only -inf masks in there: look again
    del trial
    base = len(walker.origins)
    _remember_upto(walker, prog, span.start - 1)
    walk_block(walker, prog, span, env, block_taint, given)
    walker.skipped_callbacks = prog.callbacks if not walker.run_callbacks else 0
    out_t = {block_taint.get(i) for i in esc[first[1]] if codes.get(i)}
    inner = sorted(t for t in out_t if t is not None and t >= base)
    idx = inner[0] if inner else base
    extra = len(walker.origins) - base - 1
    return Found(walker.origins[idx], bool(reached), len(cands) + extra, prog.scoped, walker)
