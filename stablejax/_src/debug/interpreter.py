"""A jaxpr walker that finds where a NaN or an Inf is born.

The walker evaluates a ``ClosedJaxpr`` equation by equation on concrete
values, as ``jax.core.eval_jaxpr`` does, but it descends into every
sub-jaxpr it can follow (``jit``, ``closed_call``, ``remat``,
``custom_jvp_call``, ``custom_vjp_call``, ``scan``, ``while``, ``cond``) so
the culprit is a primitive, never a loop or a call. For each value it keeps a
*taint*: the index of the origin its non-finite entries came from. An origin
is an equation whose output holds a NaN or an Inf while its inputs are
finite, or an argument that came in non-finite. Taints flow through
equations; a value made finite again (masked by ``jnp.where``) drops it.

At the end the chosen origin is the earliest one whose taint reaches a
non-finite output, or, when every output is finite, the earliest one at all.
Non-finite literals written in the program (``-jnp.inf`` masks) are treated
as intentional: they do not make an origin, but a NaN made from them does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util
from jax.extend import core as jcore

from stablejax._src.debug import phase as phase_labels
from stablejax._src.debug import shards
from stablejax._src.debug.source import (
    Frame,
    is_optimizer_file,
    is_user_file,
    scopes,
    traceback_frames,
)
from stablejax._src.debug.values import (
    LOW_PRECISION,
    Origin,
    finite_in_float32,
    gather_bounds,
    is_float,
    nonfinite_kind,
    operand_stats,
)
from stablejax._src.jaxpr_bind import bind_equation

INTENTIONAL = -1  # taint of a non-finite literal written in the program
_MAX_ORIGINS = 256
# Call-like primitives and the parameter holding the jaxpr they call (shared
# with lint and the compiled search).
CALL_PARAMS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}
_SKIPPED = frozenset({"debug_callback", "debug_print"})
CALLBACKS = frozenset({"io_callback"})  # side effects: not run again unless asked


@dataclasses.dataclass(frozen=True)
class _Site:
    """The context a jaxpr runs in: composed name stack, frames, loop indices."""

    name_stack: Any
    frames: tuple[Frame, ...]
    backward: bool
    iterations: tuple[int, ...]


def _sub_jaxpr(obj: Any) -> tuple[Any, Sequence[Any]]:
    if hasattr(obj, "consts") and hasattr(obj, "jaxpr"):
        return obj.jaxpr, obj.consts
    return obj, ()


def _printable_params(params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        if isinstance(v, (int, float, str, bool, type(None))):
            out[k] = v
        elif isinstance(v, tuple) and all(isinstance(e, (int, float, str, bool)) for e in v):
            out[k] = list(v)
        elif k in ("mode", "new_dtype", "dimension_numbers", "slice_sizes"):
            out[k] = str(v)
    return out


class Walker:
    """Evaluates a closed jaxpr and records every origin of non-finite values."""

    def __init__(self, run_callbacks: bool = False) -> None:
        self.run_callbacks = run_callbacks
        self.skipped_callbacks = 0  # io_callback equations whose outputs were not re-evaluated
        self.origins: list[Origin] = []
        self._labels: dict[tuple[int, tuple[bool, ...], bool], Any] = {}
        self._keep: list[Any] = []  # keeps labelled jaxprs alive, so ids stay unique
        self._forward_ops: dict[tuple[Any, ...], str] = {}
        self._producer: dict[Any, str] = {}  # var -> primitive (or jit name) that made it
        self.reached: list[int] = []
        self.scoped = False  # whether any equation ran under a module scope
        self.mapped: shards.Mapped | None = None  # inside a shard_map body: the shards
        self.given: list[Any] | None = None  # outputs of the next leaf, computed already

    # -- public ---------------------------------------------------------------

    @staticmethod
    def root_site() -> _Site:
        """The context of the outermost jaxpr: empty name stack, no frames, no loop."""
        return _Site(source_info_util.new_name_stack(), (), False, ())

    def run(self, closed: Any, flat_args: Sequence[Any], arg_taints: Sequence[int | None]) -> list:
        """Evaluates ``closed`` on ``flat_args``; returns its outputs.

        After the call, ``self.origins`` lists every origin in execution order
        and ``self.reached`` the origin indices whose taint reached an output.
        """
        jaxpr, consts = closed.jaxpr, closed.consts
        site = _Site(source_info_util.new_name_stack(), (), False, ())
        out_fwd = tuple(True for _ in jaxpr.outvars)
        outs, taints, _ = self._eval(
            jaxpr, consts, flat_args, list(arg_taints), [False] * len(flat_args), site, out_fwd
        )
        self.reached = sorted({t for t in taints if t is not None and t >= 0})
        return outs

    def new_input_origin(self, leaf: int | None, value: Any) -> int:
        """Registers an argument that came in non-finite; returns its taint."""
        origin = Origin(
            index=len(self.origins),
            primitive=None,
            kind=nonfinite_kind(value) or "nan",
            phase="forward",
            leaf=leaf,
            inputs=(operand_stats(value),),
        )
        self.origins.append(origin)
        return origin.index

    def const_taint(self, var: Any, val: Any) -> int | None:
        """The taint of a captured constant: NaN is bad data, only +-inf a mask."""
        kind = nonfinite_kind(val) if is_float(var.aval) else None
        if kind == "nan":
            return self.new_input_origin(None, val)
        return INTENTIONAL if kind else None

    # -- evaluation -------------------------------------------------------------

    def _labels_for(self, jaxpr: Any, out_fwd: tuple[bool, ...], backward: bool) -> Any:
        key = (id(jaxpr), out_fwd, backward)
        if key not in self._labels:
            self._keep.append(jaxpr)
            self._labels[key] = phase_labels.label_equations(jaxpr, out_fwd, backward)
        return self._labels[key]

    def _eval(self, jaxpr, consts, args, arg_taints, arg_grad, site, out_fwd):
        env: dict[Any, Any] = {}
        taint: dict[Any, int | None] = {}
        grad: dict[Any, bool] = {}
        for v, val in zip(jaxpr.constvars, consts):
            env[v] = val
            taint[v] = self.const_taint(v, val)
            grad[v] = False
        for v, val, t, g in zip(jaxpr.invars, args, arg_taints, arg_grad):
            env[v] = val
            taint[v] = t
            grad[v] = g
        labels, eqn_flags = self._labels_for(jaxpr, tuple(out_fwd), site.backward)

        def read(v):
            if isinstance(v, jcore.Literal):
                return v.val
            return env[v]

        def read_taint(v):
            if isinstance(v, jcore.Literal):
                if is_float(v.aval) and nonfinite_kind(v.val):
                    return INTENTIONAL
                return None
            return taint.get(v)

        # A value is dropped after its last use: the walk holds what the program would.
        last_use: dict[Any, int] = {}
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.invars:
                if not isinstance(v, jcore.Literal):
                    last_use[v] = i
        keep = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
        for i, eqn in enumerate(jaxpr.eqns):
            invals = [read(v) for v in eqn.invars]
            in_taints = [read_taint(v) for v in eqn.invars]
            in_grad = any(
                grad.get(v, False) for v in eqn.invars if not isinstance(v, jcore.Literal)
            )
            label = labels[i]
            tb_frames = traceback_frames(eqn.source_info.traceback)
            phase = self._phase(label, in_grad, tb_frames)
            if not self.scoped and eqn.source_info.name_stack.stack:
                self.scoped = bool(scopes(eqn.source_info.name_stack))
            sub_site = _Site(
                site.name_stack + eqn.source_info.name_stack,
                tb_frames + site.frames,
                site.backward or label == phase_labels.BACKWARD,
                site.iterations,
            )
            outs, out_taints = self._eqn(
                eqn, invals, in_taints, sub_site, phase, eqn_flags[i], in_grad, label
            )
            out_grad = in_grad or label == phase_labels.BACKWARD
            for v, val, t in zip(eqn.outvars, outs, out_taints):
                if isinstance(v, jcore.DropVar):
                    continue
                env[v] = val
                taint[v] = t
                grad[v] = out_grad
                self._producer[v] = eqn.params.get("name") or eqn.primitive.name
            del invals, outs
            for v in eqn.invars:
                if not isinstance(v, jcore.Literal) and last_use.get(v) == i and v not in keep:
                    env.pop(v, None)
        outs = [read(v) for v in jaxpr.outvars]
        taints = [read_taint(v) for v in jaxpr.outvars]
        grads = [
            False if isinstance(v, jcore.Literal) else grad.get(v, False) for v in jaxpr.outvars
        ]
        return outs, taints, grads

    @staticmethod
    def _phase(label: str, in_grad: bool, frames: tuple[Frame, ...]) -> str:
        if label == phase_labels.FEEDS_BACKWARD:
            return "backward" if in_grad else "forward"
        if label != phase_labels.FORWARD:
            return "backward"
        if in_grad or any(is_optimizer_file(f.file) for f in frames[:12]):
            return "update"
        return "forward"

    def _eqn(self, eqn, invals, in_taints, site, phase, out_flags, in_grad, label):
        name = eqn.primitive.name
        params = eqn.params
        if name in _SKIPPED:
            return [], []
        if label in (phase_labels.FORWARD, phase_labels.FEEDS_BACKWARD) and phase == "forward":
            self._remember_forward_op(eqn, site)
        if name in shards.MAPPED:
            got = shards.walk_mapped(self, eqn, invals, in_taints, site, out_flags, in_grad)
            if got is not None:
                return got
        if name in CALL_PARAMS and CALL_PARAMS[name] in params:
            jaxpr, consts = _sub_jaxpr(params[CALL_PARAMS[name]])
            if len(jaxpr.invars) == len(invals) and len(jaxpr.constvars) == len(consts):
                for inner, outer in zip(jaxpr.invars, eqn.invars):
                    if not isinstance(outer, jcore.Literal) and outer in self._producer:
                        self._producer[inner] = self._producer[outer]
                outs, taints, _ = self._eval(
                    jaxpr, consts, invals, in_taints, [in_grad] * len(invals), site, out_flags
                )
                return outs, taints
        if name == "scan":
            return self._scan(eqn, invals, in_taints, site, out_flags, in_grad)
        if name == "while" and self.mapped is None:  # per shard, the trip counts may differ
            return self._while(eqn, invals, in_taints, site, in_grad)
        pred = np.asarray(invals[0]).reshape(-1) if name == "cond" else None
        if pred is not None and (self.mapped is None or (pred == pred[0]).all()):
            idx = int(np.clip(int(pred[0]), 0, len(params["branches"]) - 1))
            jaxpr, consts = _sub_jaxpr(params["branches"][idx])
            outs, taints, _ = self._eval(
                jaxpr,
                consts,
                invals[1:],
                in_taints[1:],
                [in_grad] * (len(invals) - 1),
                site,
                out_flags,
            )
            return outs, taints
        return self._leaf(eqn, invals, in_taints, site, phase)

    def _bind(self, eqn, invals, site):
        if self.given is not None:  # computed in the compiled pass: not bound again
            outs, self.given = self.given, None
            return outs
        with (
            source_info_util.user_context(eqn.source_info.traceback, name_stack=site.name_stack),
            eqn.ctx.manager,
        ):
            if self.mapped is not None:
                return self.mapped.bind(eqn, invals, site, lambda vals: bind_equation(eqn, vals))
            return bind_equation(eqn, invals)

    def _leaf(self, eqn, invals, in_taints, site, phase):
        if eqn.primitive.name in CALLBACKS and not self.run_callbacks:
            # Not run again (it may write files or count steps): zeros stand in.
            self.skipped_callbacks += 1
            zeros = [jnp.zeros(v.aval.shape, v.aval.dtype) for v in eqn.outvars]
            if self.mapped is not None:
                zeros = [self.mapped.broadcast(z) for z in zeros]
            return zeros, [None for _ in eqn.outvars]
        outs = self._bind(eqn, invals, site)
        kinds = [nonfinite_kind(o) if is_float(v.aval) else None for v, o in zip(eqn.outvars, outs)]
        if not any(kinds):
            return outs, [None] * len(outs)
        if self.mapped is not None:  # taints per shard
            return outs, shards.leaf_taints(self, eqn, invals, in_taints, outs, kinds, site, phase)
        real = [t for t in in_taints if t is not None and t != INTENTIONAL]
        if real:
            t = min(real)
        else:
            made_nan = "nan" in kinds and not any(
                t == INTENTIONAL and nonfinite_kind(val) == "nan"
                for t, val in zip(in_taints, invals)
            )
            if INTENTIONAL in in_taints and not made_nan:
                t = INTENTIONAL
            else:
                t = self._new_origin(eqn, invals, outs, kinds, site, phase)
        return outs, [t if k else None for k in kinds]

    def _new_origin(self, eqn, invals, outs, kinds, site, phase) -> int | None:
        if len(self.origins) >= _MAX_ORIGINS:
            return None
        kind = "nan" if "nan" in kinds else "inf"
        shard = None
        if self.mapped is not None:  # stacked shards: the first bad one's operands
            shard, invals, outs = self.mapped.select(eqn, invals, outs)
        key = _site_key(site.frames, eqn.source_info.traceback)
        origin = Origin(
            index=len(self.origins),
            primitive=eqn.primitive.name,
            kind=kind,
            phase=phase,
            frames=site.frames,
            scopes=tuple(_scope_names(site.name_stack)),
            name_stack=str(site.name_stack),
            iterations=site.iterations,
            inputs=tuple(operand_stats(x) for x in invals),
            outputs=tuple(operand_stats(x) for x in outs),
            params=_printable_params(eqn.params),
            forward_op=self._forward_op(key) if phase == "backward" else None,
            site=key,
        )
        origin.extra["producers"] = [
            None if isinstance(v, jcore.Literal) else self._producer.get(v) for v in eqn.invars
        ]
        if shard is not None:
            origin.extra["shard"] = shard
        if eqn.primitive.name == "gather":
            origin.extra["gather"] = gather_bounds(eqn, invals)
        if any(s.dtype in LOW_PRECISION for s in origin.inputs + origin.outputs):
            origin.extra["float32_finite"] = finite_in_float32(eqn, invals, site)
        self.origins.append(origin)
        return origin.index

    def _remember_forward_op(self, eqn, site) -> None:
        if eqn.primitive.name in CALL_PARAMS or eqn.primitive.name in ("scan", "while", "cond"):
            return
        key = _site_key(site.frames, eqn.source_info.traceback)
        self._forward_ops.setdefault(key, eqn.primitive.name)
        # Under vmap the batching rules add their own frames: also remember the
        # latest forward op per user line, as a fallback.
        self._forward_ops[("line", key[1])] = eqn.primitive.name

    def _forward_op(self, key: tuple[Any, ...]) -> str | None:
        return self._forward_ops.get(key) or self._forward_ops.get(("line", key[1]))

    # -- control flow -------------------------------------------------------------

    def _scan(self, eqn, invals, in_taints, site, out_flags, in_grad):
        p = eqn.params
        nc, ncarry, length = p["num_consts"], p["num_carry"], p["length"]
        jaxpr, consts0 = _sub_jaxpr(p["jaxpr"])
        consts, carry, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]
        c_t, carry_t, xs_t = (
            in_taints[:nc],
            in_taints[nc : nc + ncarry],
            in_taints[nc + ncarry :],
        )
        body_flags = tuple(True for _ in range(ncarry)) + tuple(out_flags[ncarry:])
        ys_vals: list[list[Any]] = [[None] * length for _ in range(len(jaxpr.outvars) - ncarry)]
        ys_taints: list[int | None] = [None] * (len(jaxpr.outvars) - ncarry)
        order = range(length - 1, -1, -1) if p["reverse"] else range(length)
        d = self.mapped.depth if self.mapped is not None else 0
        at = (slice(None),) * d
        if d:  # per shard: every scanned operand gets the leading shard axes
            xs = [
                x if np.ndim(x) == v.aval.ndim + d else self.mapped.broadcast(x)
                for x, v in zip(xs, eqn.invars[nc + ncarry :])
            ]
        for i in order:
            x_i = [x[(*at, i)] for x in xs]
            x_t = [t if t is not None and nonfinite_kind(xi) else None for t, xi in zip(xs_t, x_i)]
            it_site = dataclasses.replace(site, iterations=site.iterations + (i,))
            outs, taints, _ = self._eval(
                jaxpr,
                consts0,
                [*consts, *carry, *x_i],
                [*c_t, *carry_t, *x_t],
                [in_grad] * len(jaxpr.invars),
                it_site,
                body_flags,
            )
            carry, carry_t = outs[:ncarry], taints[:ncarry]
            for j, (y, t) in enumerate(zip(outs[ncarry:], taints[ncarry:])):
                ys_vals[j][i] = y
                if d and t is not None:
                    ys_taints[j] = shards.merge(ys_taints[j], t, len(self.mapped.coords))
                elif t is not None and (ys_taints[j] is None or _earlier(t, ys_taints[j])):
                    ys_taints[j] = t
        ys = []
        for j, v in enumerate(eqn.outvars[ncarry:]):
            if length:
                ys.append(jnp.stack([jnp.asarray(y) for y in ys_vals[j]], axis=d))
            elif self.mapped is not None:
                ys.append(self.mapped.broadcast(jnp.zeros(v.aval.shape, v.aval.dtype)))
            else:
                ys.append(jnp.zeros(v.aval.shape, v.aval.dtype))
        return [*carry, *ys], [*carry_t, *ys_taints]

    def _while(self, eqn, invals, in_taints, site, in_grad):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cj, cconsts = _sub_jaxpr(p["cond_jaxpr"])
        bj, bconsts = _sub_jaxpr(p["body_jaxpr"])
        c_args, b_args, carry = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
        c_t, b_t, carry_t = in_taints[:cn], in_taints[cn : cn + bn], in_taints[cn + bn :]
        flags = tuple(True for _ in carry)
        i = 0
        while True:
            it_site = dataclasses.replace(site, iterations=site.iterations + (i,))
            pred, _, _ = self._eval(
                cj,
                cconsts,
                [*c_args, *carry],
                [*c_t, *carry_t],
                [in_grad] * len(cj.invars),
                it_site,
                (True,),
            )
            if not bool(np.asarray(pred[0]).any()):
                break
            carry, carry_t, _ = self._eval(
                bj,
                bconsts,
                [*b_args, *carry],
                [*b_t, *carry_t],
                [in_grad] * len(bj.invars),
                it_site,
                flags,
            )
            i += 1
        return list(carry), list(carry_t)


def _earlier(a: int, b: int) -> bool:
    if a == INTENTIONAL:
        return False
    return b == INTENTIONAL or a < b


def _scope_names(name_stack: Any) -> list[str]:
    return scopes(name_stack)


def _site_key(frames: tuple[Frame, ...], traceback: Any) -> tuple[Any, ...]:
    """Identifies a traced op: jax's frames below the user's code, and the user's line.

    The forward op, the JVP-rule terms computed from it and its transposed
    equations share these, whichever jaxpr nesting they end up in.
    """
    own = traceback_frames(traceback)
    internal = []
    for f in own:
        if is_user_file(f.file):
            break
        internal.append((f.file, f.line))
    user = next((f for f in (*own, *frames) if is_user_file(f.file)), None)
    return (tuple(internal[-4:]), user)
