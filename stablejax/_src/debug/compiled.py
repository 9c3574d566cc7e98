"""The compiled pass of ``locate``: one finiteness flag per equation, computed on device.

The walker of :mod:`interpreter` evaluates a program op by op, which on a large
model costs a compilation per distinct primitive and a host round trip per
equation. ``locate`` first runs this pass instead:

1. :func:`flatten` inlines every call (``jit``, ``closed_call``, ``remat``,
   ``custom_jvp_call``, ``custom_vjp_call``) into one list of :class:`Leaf`
   equations in execution order, each with the site, phase and label the walker
   would give it. Control flow and mapped bodies (``scan``, ``while``,
   ``cond``, ``shard_map``, ``pmap``) stay whole: they are *regions*.
2. :func:`flag_values` evaluates that list once, compiled, and returns per
   flagged floating value a code (1 holds a NaN or an Inf, 0 finite). Only the
   values a block passes on are candidates (:func:`blocks` cuts where few
   short-lived values cross), and of those, the ones whose code follows from
   their operands' are not flagged but inferred on the host (:mod:`sparse`).
   The masks of a run of leaves are reduced together in one fused reduction
   (:mod:`codes`); only those small vectors leave the device. In a program
   larger than ``SMALL``, the outputs are not flagged: the pass returns them
   and their codes are measured on the host.
3. :func:`taint_walk` replays the walker's rules on the host from the codes
   alone: an origin is a leaf whose output is flagged while no input carries a
   taint; taints flow to outputs; the origins that reach an output are known.
4. :func:`values_of` compiles the part of the program the chosen block depends
   on (dead-code eliminated) with the block itself, and returns the block's
   operands and its leaves' outputs, so the walker reads, rather than compiles,
   each equation of that block (regions excepted), with every statistic of the
   report.

``io_callback`` equations are not run in this pass unless asked: their outputs
are zeros of the right shape (the report says so).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util
from jax.extend import core as jcore

from stablejax._src.debug import codes, sparse
from stablejax._src.debug import phase as phase_labels
from stablejax._src.debug.source import scopes, traceback_frames
from stablejax._src.debug.values import is_float, nonfinite_kind
from stablejax._src.jaxpr_bind import bind_equation

CALLBACKS = frozenset({"io_callback"})
BLOCK = 64  # leaves per flagged block
# Leaves whose flags are packed into one reduction. Each packed reduction is a
# concatenation and a reduce kernel of its own: on the 12-layer d 512 bench step,
# one per 64 leaves cost 7.4 CPU-s of compile, one per 512 leaves 4.9 (3.9 with
# no flags; one for the whole program 5.3, its concatenation being that large).
PACK = 512
SMALL = 600  # up to this many leaves, every value is flagged
# Primitives whose sub-jaxpr is a scalar combiner, not a body the walker enters.
_BODY_OPS = ("scatter", "reduce", "select_and_", "sort", "argsort", "cumsum", "cumprod")
_SKIPPED = frozenset({"debug_callback", "debug_print"})


@dataclasses.dataclass
class Leaf:
    """One equation of the flattened program with its context.

    ``ins`` holds, per operand, a value id (``int``) or ``("lit", value)``;
    ``outs`` a value id per output (``None`` for a dropped one).
    """

    eqn: Any
    site: Any
    phase: str
    label: str
    in_grad: bool
    out_flags: tuple[bool, ...]
    ins: list[Any]
    outs: list[int | None]
    producers: list[str | None]
    region: bool


@dataclasses.dataclass
class Program:
    """A flattened program: leaves, its constants and where its outputs live."""

    leaves: list[Leaf]
    n_args: int
    consts: dict[int, Any]  # value id -> host/device value of a constant
    const_taint: dict[int, Any]  # value id -> taint decided by the walker's rule
    outputs: list[Any]  # value id or ("lit", value)
    scoped: bool
    n_ids: int
    callbacks: int = 0  # io_callback equations in the program


def _sub_jaxpr(obj: Any) -> tuple[Any, Sequence[Any]]:
    if hasattr(obj, "consts") and hasattr(obj, "jaxpr"):
        return obj.jaxpr, obj.consts
    return obj, ()


def _any_scoped(jaxpr: Any, seen: set[int]) -> bool:
    if id(jaxpr) in seen:
        return False
    seen.add(id(jaxpr))
    for eqn in jaxpr.eqns:
        if eqn.source_info.name_stack.stack and scopes(eqn.source_info.name_stack):
            return True
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    inner, _ = _sub_jaxpr(sub)
                    if hasattr(inner, "eqns") and _any_scoped(inner, seen):
                        return True
    return False


def flatten(walker: Any, closed: Any, call_params: dict[str, str], site0: Any) -> Program:
    """Inlines every call of ``closed`` into a list of leaves, in execution order."""
    leaves: list[Leaf] = []
    consts: dict[int, Any] = {}
    const_taint: dict[int, Any] = {}
    producer: dict[int, str] = {}
    counter = [len(closed.jaxpr.invars)]
    n_callbacks = [0]
    frames_of: dict[Any, tuple[Any, ...]] = {}

    def new_id() -> int:
        counter[0] += 1
        return counter[0] - 1

    def run(jaxpr, sub_consts, in_ids, in_grads, site, out_fwd):
        env: dict[Any, Any] = {}
        grad: dict[Any, bool] = {}
        for v, val in zip(jaxpr.constvars, sub_consts):
            i = new_id()
            consts[i] = val
            const_taint[i] = walker.const_taint(v, val)
            env[v], grad[v] = i, False
        for v, i, g in zip(jaxpr.invars, in_ids, in_grads):
            env[v], grad[v] = i, g
        labels, eqn_flags = walker._labels_for(jaxpr, tuple(out_fwd), site.backward)

        def read(v):
            return ("lit", v.val) if isinstance(v, jcore.Literal) else env[v]

        for k, eqn in enumerate(jaxpr.eqns):
            name = eqn.primitive.name
            if name in _SKIPPED:
                continue
            ins = [read(v) for v in eqn.invars]
            in_grad = any(
                grad.get(v, False) for v in eqn.invars if not isinstance(v, jcore.Literal)
            )
            label = labels[k]
            tb = eqn.source_info.traceback
            tb_frames = frames_of.get(tb) if tb is not None else ()
            if tb_frames is None:  # equations of one line share a traceback's content
                tb_frames = frames_of[tb] = traceback_frames(tb)
            phase = walker._phase(label, in_grad, tb_frames)
            sub_site = dataclasses.replace(
                site,
                name_stack=site.name_stack + eqn.source_info.name_stack,
                frames=tb_frames + site.frames,
                backward=site.backward or label == phase_labels.BACKWARD,
            )
            out_grad = in_grad or label == phase_labels.BACKWARD
            outs: list[Any] | None = None
            key = call_params.get(name)
            if key is not None and key in eqn.params:
                sub, sc = _sub_jaxpr(eqn.params[key])
                if len(sub.invars) == len(ins) and len(sub.constvars) == len(sc):
                    outs = run(sub, sc, ins, [in_grad] * len(ins), sub_site, eqn_flags[k])
            if outs is None:
                outs = [None if isinstance(v, jcore.DropVar) else new_id() for v in eqn.outvars]
                n_callbacks[0] += name in CALLBACKS
                leaves.append(
                    Leaf(
                        eqn=eqn,
                        site=sub_site,
                        phase=phase,
                        label=label,
                        in_grad=in_grad,
                        out_flags=tuple(eqn_flags[k]),
                        ins=ins,
                        outs=outs,
                        producers=[None if isinstance(i, tuple) else producer.get(i) for i in ins],
                        region=_has_sub_jaxpr(eqn) and not name.startswith(_BODY_OPS),
                    )
                )
            made_by = eqn.params.get("name") or name
            for v, o in zip(eqn.outvars, outs):
                if isinstance(v, jcore.DropVar):
                    continue
                env[v], grad[v] = o, out_grad
                if not isinstance(o, tuple):
                    producer[o] = made_by
        return [read(v) for v in jaxpr.outvars]

    n = len(closed.jaxpr.invars)
    outputs = run(
        closed.jaxpr,
        closed.consts,
        list(range(n)),
        [False] * n,
        site0,
        tuple(True for _ in closed.jaxpr.outvars),
    )
    return Program(
        leaves=leaves,
        n_args=n,
        consts=consts,
        const_taint=const_taint,
        outputs=outputs,
        scoped=_any_scoped(closed.jaxpr, set()),
        n_ids=counter[0],
        callbacks=n_callbacks[0],
    )


def _has_sub_jaxpr(eqn: Any) -> bool:
    for p in eqn.params.values():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
            if hasattr(sub, "eqns") or (hasattr(sub, "jaxpr") and hasattr(sub, "consts")):
                return True
    return False


def _bind_leaf(leaf: Leaf, vals: list[Any], run_callbacks: bool) -> list[Any]:
    eqn = leaf.eqn
    if eqn.primitive.name in CALLBACKS and not run_callbacks:
        return [jnp.zeros(v.aval.shape, v.aval.dtype) for v in eqn.outvars]
    with (
        source_info_util.user_context(eqn.source_info.traceback, name_stack=leaf.site.name_stack),
        eqn.ctx.manager,
    ):
        return bind_equation(eqn, vals)


def _run_leaf(leaf: Leaf, env: dict[int, Any], run_callbacks: bool) -> list[Any]:
    """Binds ``leaf`` on its operands from ``env``, stores its outputs there and returns them."""
    vals = [i[1] if isinstance(i, tuple) else env[i] for i in leaf.ins]
    outs = _bind_leaf(leaf, vals, run_callbacks)
    for o, val in zip(leaf.outs, outs):
        if o is not None:
            env[o] = val
    return outs


def _last_uses(prog: Program, upto: int) -> dict[int, int]:
    last: dict[int, int] = {}
    for k, leaf in enumerate(prog.leaves[:upto]):
        for i in leaf.ins:
            if not isinstance(i, tuple):
                last[i] = k
    return last


def cone(prog: Program, need: set[Any], upto: int) -> list[int]:
    """The leaves before ``upto`` that the values ``need`` depend on, in order.

    ``need`` grows to every value those leaves read.
    """
    keep: list[int] = []
    for k in range(upto - 1, -1, -1):
        leaf = prog.leaves[k]
        if any(o in need for o in leaf.outs if o is not None):
            keep.append(k)
            need.update(i for i in leaf.ins if not isinstance(i, tuple))
    keep.reverse()
    return keep


def large(prog: Program) -> bool:
    """Whether ``prog`` has more than ``SMALL`` leaves: cut into blocks, births inferred."""
    return len(prog.leaves) > SMALL


def blocks(prog: Program, size: int | None = None) -> list[range]:
    """Consecutive runs of at most ``size`` leaves: the unit the compiled pass flags.

    By default a program of up to ``SMALL`` leaves flags every value (a NaN masked
    inside any block is then seen too); a larger one, blocks of ``BLOCK//2`` to
    ``BLOCK`` leaves cut where the fewest short-lived values cross (:func:`cuts`).
    An explicit ``size`` gives blocks of exactly ``size`` (the last one shorter).
    """
    n = len(prog.leaves)
    if size is None and large(prog):
        ends = cuts(prog, max(1, BLOCK // 2), BLOCK)
        return [range(s, e) for s, e in zip([0, *ends[:-1]], ends)]
    size = size or 1
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def cuts(prog: Program, lo: int, hi: int) -> list[int]:
    """Block ends (exclusive, the last one ``len(prog.leaves)``), blocks of ``lo`` to ``hi``.

    A flagged value costs the flagged program's compile most when it is short-lived:
    it would have been fused into its readers, and its flag makes XLA materialize
    it. The cost of a cut before leaf ``k`` is the number of floating values made
    before ``k`` and read at or after it that live fewer than ``4 * hi`` leaves and
    whose finiteness does not follow from their operands' (:func:`sparse.derivable`);
    the cuts minimize the total (dynamic programming over the block lengths).
    """
    n = len(prog.leaves)
    if n <= hi:
        return [n]
    made: dict[int, int] = {}
    last: dict[int, int] = {}
    for k, leaf in enumerate(prog.leaves):
        for i in leaf.ins:
            if not isinstance(i, tuple) and i in made:
                last[i] = k
        if leaf.region or not sparse.derivable(leaf.eqn):
            for v, o in zip(leaf.eqn.outvars, leaf.outs):
                if o is not None and is_float(v.aval):
                    made[o] = k
    delta = [0] * (n + 2)  # cost[k] = values alive across the cut before leaf k
    for o, k in made.items():
        end = last.get(o)
        if end is not None and end - k < 4 * hi:
            delta[k + 1] += 1
            delta[end + 1] -= 1
    cost = [0] * (n + 1)
    run = 0
    for k in range(n + 1):
        run += delta[k]
        cost[k] = run
    inf = float("inf")
    best = [inf] * (n + 1)
    back = [0] * (n + 1)
    best[0] = 0.0
    for e in range(1, n + 1):
        c = 0 if e == n else cost[e]
        for s in range(max(0, e - hi), e - lo + 1 if e < n else e):
            if best[s] + c < best[e]:
                best[e], back[e] = best[s] + c, s
    if best[n] == inf:  # no split fits (n < lo): one block per hi leaves
        return [min(s + hi, n) for s in range(0, n, hi)]
    ends = []
    e = n
    while e > 0:
        ends.append(e)
        e = back[e]
    return ends[::-1]


def escaping(prog: Program, spans: Sequence[range]) -> list[list[int]]:
    """Per block, the floating values it makes that are read after it or are outputs."""
    owner: dict[int, int] = {}
    is_float_id: dict[int, bool] = {}
    for b, span in enumerate(spans):
        for k in span:
            for v, o in zip(prog.leaves[k].eqn.outvars, prog.leaves[k].outs):
                if o is not None:
                    owner[o] = b
                    is_float_id[o] = is_float(v.aval) and bool(np.prod(v.aval.shape, dtype=int))
    out: list[set[int]] = [set() for _ in spans]
    for b, span in enumerate(spans):
        for k in span:
            for i in prog.leaves[k].ins:
                if not isinstance(i, tuple) and owner.get(i, b) < b and is_float_id[i]:
                    out[owner[i]].add(i)
    for i in prog.outputs:
        if not isinstance(i, tuple) and i in owner and is_float_id[i]:
            out[owner[i]].add(i)
    return [sorted(e) for e in out]


def flag_values(
    prog: Program,
    args: Sequence[Any],
    run_callbacks: bool,
    ids: Sequence[int],
    outputs: bool = False,
) -> dict[int, int]:
    """Runs the flattened program once, compiled; the code of each value of ``ids``.

    The code is 1 if the value holds a NaN or an Inf, else 0. Only the values
    a block passes on are flagged: what XLA materializes anyway, so fusion inside
    a block is kept. The values of each run of ``PACK`` leaves are reduced
    together in one fused reduction (:func:`codes.packed_codes`).

    With ``outputs``, the program also returns its outputs and their codes are
    measured on the host (:func:`values.nonfinite_kind`) and returned too: the
    plain step holds them as well, and a flag per output (hundreds on a train
    step: new parameters, optimizer moments) would cost the compile more than
    checking them once they exist (on the 12-layer d 512 bench step, 3 CPU-s of
    compile against 0.6 s of host check).
    """
    wanted = set(ids)
    const_ids = sorted(prog.consts)
    out_ids = (
        [
            i
            for i in dict.fromkeys(prog.outputs)
            if not isinstance(i, tuple) and i >= prog.n_args and i not in prog.consts
        ]
        if outputs
        else []
    )
    keep = set(out_ids)
    layout: list[tuple[list[int], int, list[tuple[int, int]]]] = []
    # Without the outputs (a second pass over a few values), only their cone is traced.
    run = range(len(prog.leaves)) if outputs else cone(prog, set(ids), len(prog.leaves))

    def body(arg_vals, const_vals):
        env: dict[int, Any] = dict(enumerate(arg_vals))
        env.update(zip(const_ids, const_vals))
        last = _last_uses(prog, len(prog.leaves))
        partials: list[Any] = []
        pending: list[tuple[int, Any]] = []
        last_k = run[-1] if len(run) else -1
        layout.clear()
        for k in run:
            leaf = prog.leaves[k]
            outs = _run_leaf(leaf, env, run_callbacks)
            pending.extend((o, val) for o, val in zip(leaf.outs, outs) if o in wanted)
            if pending and ((k + 1) % PACK == 0 or k == last_k):
                got, where = codes.packed_codes([v for _, v in pending])
                layout.append(([o for o, _ in pending], len(partials), where))
                partials.append(got)
                pending = []
            for i in leaf.ins:
                if (
                    not isinstance(i, tuple)
                    and last.get(i) == k
                    and i >= prog.n_args
                    and i not in keep
                ):
                    env.pop(i, None)
        return partials, [env[i] for i in out_ids]

    call_args = (list(args), [prog.consts[i] for i in const_ids])
    partials, out_vals = codes.compile_once(body, *call_args)(*call_args)
    found: dict[int, int] = {}
    for value_ids, j, where in layout:
        found.update(zip(value_ids, codes.decode(partials[j], where)))
    result = {i: found[i] for i in ids}
    for i, val in zip(out_ids, out_vals):
        if is_float(val) and val.size:
            result[i] = int(nonfinite_kind(val) is not None)
    del out_vals
    return result


def values_of(
    prog: Program,
    args: Sequence[Any],
    ids: Sequence[int],
    upto: int,
    run_callbacks: bool,
    block: range | None = None,
) -> Any:
    """The values ``ids`` (made before leaf ``upto``), from a compiled dead-code-free prefix.

    With ``block``, the same compiled program also runs the leaves of ``block``
    (which starts at ``upto``) and the answer is ``(values, outs)``, ``outs``
    mapping each leaf index of ``block`` to its outputs: the walker then reads
    them instead of compiling each primitive of the block on its own.
    """
    span = list(block) if block is not None else []
    made_in = {o for k in span for o in prog.leaves[k].outs if o is not None}
    need = set(ids)
    for k in span:  # the block's operands made before it: the prefix makes them too
        need.update(i for i in prog.leaves[k].ins if not isinstance(i, tuple) and i not in made_in)
    keep = cone(prog, need, upto)
    const_ids = sorted(i for i in need if i in prog.consts)
    arg_ids = sorted(i for i in need if i < prog.n_args)
    made = [i for i in ids if i >= prog.n_args and i not in prog.consts]

    def body(arg_vals, const_vals):
        env: dict[int, Any] = dict(zip(arg_ids, arg_vals))
        env.update(zip(const_ids, const_vals))
        for k in keep:
            _run_leaf(prog.leaves[k], env, run_callbacks)
        picked = [env[i] for i in made]
        return picked, [_run_leaf(prog.leaves[k], env, run_callbacks) for k in span]

    call_args = ([args[i] for i in arg_ids], [prog.consts[i] for i in const_ids])
    if made or span:
        picked, outs = codes.compile_once(body, *call_args)(*call_args)
    else:
        picked, outs = [], []
    out = dict(zip(made, picked))
    for i in ids:
        if i < prog.n_args:
            out[i] = args[i]
        elif i in prog.consts:
            out[i] = prog.consts[i]
    if block is None:
        return out
    return out, {k: list(o) for k, o in zip(span, outs)}
