"""``lint``: the equations of a function that can make a NaN or an Inf, before any run.

``lint(fn)(*args)`` traces ``fn`` to a jaxpr (shapes and dtypes only; it
accepts ``jax.ShapeDtypeStruct`` arguments) and interprets it abstractly: each
value is an interval with a few facts (:mod:`stablejax._src.debug.intervals`),
float arguments are unbounded, constants are their own range. Each equation
whose singular point lies in the interval of its operands is a :class:`Risk`;
the rules are in :mod:`stablejax._src.debug.lint_rules`. Code safe by
construction, ``rsqrt(max(var, 0) + eps)``, ``x / (norm + eps)``,
``x - max(x)`` before ``exp``, ``jnp.where(x > 0, x, 1)`` under a ``sqrt``,
raises nothing.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax._src import source_info_util
from jax.extend import core as jcore

from stablejax._src.debug import intervals as iv
from stablejax._src.debug import lint_rules as rules
from stablejax._src.debug import nnx_names
from stablejax._src.debug import phase as phase_labels
from stablejax._src.debug.fresh_trace import fresh_trace
from stablejax._src.debug.interpreter import CALL_PARAMS
from stablejax._src.debug.risk import Risk, Risks
from stablejax._src.debug.source import (
    Frame,
    innermost_user_frame,
    is_optimizer_file,
    is_user_file,
    module_path,
    scopes,
    traceback_frames,
)

_CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
# Functions written safe on purpose whose safety interval arithmetic cannot see
# (optax.safe_norm replaces x by ones where its norm is small).
_TRUSTED_FUNCTIONS = frozenset({"safe_norm", "safe_root_mean_squares"})
_STABLEJAX = f"{os.sep}stablejax{os.sep}_src{os.sep}"
_DEMO = f"{os.sep}stablejax{os.sep}_src{os.sep}demo{os.sep}"
_SELF = f"{os.sep}stablejax{os.sep}_src{os.sep}debug{os.sep}"  # lint's own frames
_FIXPOINT_PASSES = 3


class LintTraceError(TypeError):
    """``lint`` could not trace the function on the given arguments."""


def lint(fn: Callable[..., Any]) -> Callable[..., Risks]:
    """Finds the equations of ``fn`` that can make a NaN or an Inf, without running it.

    ``lint(fn)(*args, **kwargs)`` traces ``fn`` with ``jax.make_jaxpr`` and reads
    only shapes and dtypes: arguments may be arrays or ``jax.ShapeDtypeStruct``
    and their values are never looked at (every float argument may hold any
    real number; Python scalars are constants). It propagates intervals through
    the jaxpr, into ``jit``, ``remat``, ``custom_jvp``/``custom_vjp``, ``scan``,
    ``while_loop`` and ``cond``, and flags:

    - ``sqrt``, ``rsqrt``, ``log``, ``div``, ``pow``, ``acos``/``asin``,
      ``atan2`` whose operand can reach the singular point (forward), or
      whose derivative is infinite there (backward: a norm of a zero vector,
      the std of a constant row, ``sqrt((p - y) ** 2)``);
    - the ``jnp.where`` double-branch trap (the forward value is masked, its
      gradient is NaN);
    - a mean over a mask that can be empty;
    - ``exp`` overflow (float16 above 11.1, float32 above 88.7), squares and
      matmuls beyond float16's 65504;
    - ``cholesky`` of a matrix that can be singular, ``eigh``'s derivative at
      repeated eigenvalues;
    - a softmax written as ``exp(x) / sum(exp(x))``, a cross-entropy as
      ``log(softmax)`` or ``log(sigmoid)``.

    The derivative of a ``custom_jvp``/``custom_vjp`` function is its author's:
    only its forward is checked. stablejax's own ops and optax's ``safe_norm``
    are trusted. A function of ``jax.grad`` is read through its forward sweep.

    Args:
      fn: anything traceable: a loss, ``jax.grad(loss)``, a train step, a
        ``model.apply``, an NNX function taking a module.

    Returns:
      A function of ``fn``'s arguments returning :class:`Risks`, a ``list`` of
      :class:`Risk`, high severity first, one per equation, phase and line.

    Raises:
      TypeError: if ``fn`` is not callable; the returned function raises
        ``LintTraceError`` (a ``TypeError``) if ``fn`` does not trace.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from stablejax.debug import lint
      >>> def normalize(x):
      ...     return x / jnp.linalg.norm(x, axis=-1, keepdims=True)
      >>> [(r.primitive, r.phase, r.severity) for r in lint(normalize)(jnp.ones((4, 3)))]
      [('sqrt', 'backward', 'high'), ('div', 'forward', 'high')]
      >>> def safe(x):
      ...     return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
      >>> lint(safe)(jax.ShapeDtypeStruct((4, 3), jnp.float32)).high
      []
    """
    if not callable(fn):
        raise TypeError(
            "lint: `fn` must be callable (a loss, jax.grad(loss), a train step, ...); "
            f"got {type(fn).__name__}: {repr(fn)[:80]}."
        )

    def linted(*args: Any, **kwargs: Any) -> Risks:
        return _lint(fn, args, kwargs)

    linted.__name__ = f"lint({getattr(fn, '__name__', type(fn).__name__)})"
    return linted


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _is_running_variance(path: str) -> bool:
    """A BatchNorm running variance (linen ``batch_stats/.../var``): non-negative."""
    return "'batch_stats'" in path and path.endswith("['var']")


def _lint(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Risks:
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dyn = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def flat_fn(*dyn_vals: Any) -> Any:
        full = list(leaves)
        for i, v in zip(dyn, dyn_vals):
            full[i] = v
        a, k = jax.tree_util.tree_unflatten(treedef, full)
        return fn(*a, **k)

    specs = [jax.ShapeDtypeStruct(np.shape(leaves[i]), leaves[i].dtype) for i in dyn]
    roots: set[str] = set()  # the NNX root class names of this trace
    try:
        with (
            nnx_names.nnx_module_names(),
            nnx_names.collect_roots(roots),
            fresh_trace("stablejax.debug.lint"),
        ):
            closed = jax.make_jaxpr(flat_fn)(*specs)
    except Exception as e:
        shapes = ", ".join(f"{s.dtype}{list(s.shape)}" for s in specs[:6])
        raise LintTraceError(
            f"lint: could not trace {repr(fn)[:80]} on arguments ({shapes}"
            f"{', ...' if len(specs) > 6 else ''}): {type(e).__name__}: {e}"
        ) from e
    linter = _Linter(frozenset(roots))
    in_avs = [iv.top(v.aval.dtype) for v in closed.jaxpr.invars]
    paths = [jax.tree_util.keystr(p)
             for p, _ in jax.tree_util.tree_flatten_with_path((args, kwargs))[0]]
    for k, i in enumerate(dyn):
        if _is_running_variance(paths[i]) and k < len(in_avs):
            in_avs[k] = in_avs[k].replace(lo=0.0)
    linter.run(closed, in_avs)
    return linter.risks()


class _Ctx:
    """Where a jaxpr runs: the call chain's tracebacks and name stacks (composed on demand)."""

    __slots__ = ("tbs", "stacks", "trusted", "custom", "record")

    def __init__(self, tbs, stacks, trusted, custom, record):
        self.tbs = tbs  # innermost first
        self.stacks = stacks  # outermost first
        self.trusted = trusted
        self.custom = custom
        self.record = record

    def child(self, eqn: Any, trusted: bool, custom: bool = False) -> _Ctx:
        return _Ctx(
            (eqn.source_info.traceback,) + self.tbs,
            self.stacks + (eqn.source_info.name_stack,),
            self.trusted or trusted,
            self.custom or custom,
            self.record,
        )

    def frames(self) -> tuple[Frame, ...]:
        return tuple(f for tb in self.tbs for f in traceback_frames(tb))

    def name_stack(self) -> Any:
        stack = source_info_util.new_name_stack()
        for s in self.stacks:
            stack = stack + s
        return stack


@functools.lru_cache(maxsize=4096)
def _file_kind(file: str) -> str:
    """``'user'``, ``'trusted'`` (stablejax internals, optax optimizers) or ``'library'``."""
    if is_user_file(file) or _SELF in file:
        return "user"
    if _STABLEJAX in file and _DEMO not in file:
        return "trusted"
    if is_optimizer_file(file) and f"{os.sep}losses{os.sep}" not in file:
        return "trusted"
    return "library"


def _trusted(frames: Sequence[Frame]) -> bool:
    """Whether the innermost frames, up to the first of the user's, are trusted code."""
    for f in frames:
        kind = _file_kind(f.file)
        if kind == "user":
            return False
        if kind == "trusted":
            return True
        if f.function in _TRUSTED_FUNCTIONS and f"{os.sep}optax{os.sep}" in f.file:
            return True
    return False


class _Linter:
    """Abstract interpreter of a closed jaxpr collecting risks."""

    def __init__(self, roots: frozenset[str]) -> None:
        self.roots = roots  # NNX root class names, dropped from module paths
        self._trust: dict[int, tuple[Any, bool]] = {}
        self.found: list[dict[str, Any]] = []
        self._labels: dict[int, Any] = {}
        self._keep: list[Any] = []

    def run(self, closed: Any, in_avs: list[iv.AV]) -> list[iv.AV]:
        ctx = _Ctx((), (), False, False, True)
        consts = [iv.const(c) for c in closed.consts]
        return self._eval(closed.jaxpr, consts, in_avs, ctx, (True,) * len(closed.jaxpr.outvars))

    def _trusted_tb(self, tb: Any) -> bool:
        hit = self._trust.get(id(tb))
        if hit is None or hit[0] is not tb:
            hit = (tb, _trusted(traceback_frames(tb)))
            self._trust[id(tb)] = hit
        return hit[1]

    def _labels_for(self, jaxpr: Any, out_fwd: tuple[bool, ...]) -> Any:
        key = (id(jaxpr), out_fwd)
        if key not in self._labels:
            self._keep.append(jaxpr)
            self._labels[key] = phase_labels.label_equations(jaxpr, out_fwd, False)
        return self._labels[key]

    def _eval(self, jaxpr, consts, in_avs, ctx, out_fwd) -> list[iv.AV]:
        env: dict[Any, iv.AV] = {}
        for v, a in zip(jaxpr.constvars, consts):
            env[v] = a
        for v, a in zip(jaxpr.invars, in_avs):
            env[v] = a
        labels, flags = self._labels_for(jaxpr, tuple(out_fwd))

        def read(v: Any) -> iv.AV:
            if isinstance(v, jcore.Literal):
                return iv.const(v.val)
            return env.get(v) or iv.top(getattr(v.aval, "dtype", None))

        for i, eqn in enumerate(jaxpr.eqns):
            if labels[i] in (phase_labels.BACKWARD, phase_labels.DERIVATIVE):
                outs = [iv.top(getattr(v.aval, "dtype", None)) for v in eqn.outvars]
            else:
                ins = [read(v) for v in eqn.invars]
                outs = self._eqn(eqn, ins, ctx, flags[i])
            for v, a in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = iv.rounded(a, getattr(v.aval, "dtype", None))
        return [read(v) for v in jaxpr.outvars]

    def _eqn(self, eqn, ins, ctx, out_flags) -> list[iv.AV]:
        name = eqn.primitive.name
        sub = ctx.child(eqn, self._trusted_tb(eqn.source_info.traceback), name in _CUSTOM)
        if name in CALL_PARAMS and CALL_PARAMS[name] in eqn.params:
            obj = eqn.params[CALL_PARAMS[name]]
            jaxpr, consts = (obj.jaxpr, obj.consts) if hasattr(obj, "consts") else (obj, ())
            if len(jaxpr.invars) == len(ins):
                return self._eval(jaxpr, [iv.const(c) for c in consts], ins, sub, out_flags)
        if name == "scan":
            return self._scan(eqn, ins, sub, out_flags)
        if name == "while":
            return self._while(eqn, ins, sub, out_flags)
        if name == "cond":
            outs = None
            for br in eqn.params["branches"]:
                o = self._eval(br.jaxpr, [iv.const(c) for c in br.consts], ins[1:], sub,
                               out_flags)
                outs = o if outs is None else [iv.union(a, b) for a, b in zip(outs, o)]
            return outs
        outs, found = rules.apply(eqn, ins, self._pending)
        if sub.trusted and name == "select_n":
            outs = [rules.trusted_clamp(ins, outs[0])]
        if sub.record:
            for f in found:
                if not sub.trusted and not (sub.custom and f["phase"] == "backward"):
                    self._add(f, eqn, sub, outs)
        return outs

    def _pending(self, taint: frozenset[int], event: str = "masked") -> None:
        """Called for values masked by ``select_n`` (their forward risks become the trap)
        and for a norm given an epsilon (its backward risk is reached only at 0 exactly)."""
        for t in taint:
            f = self.found[t]
            if event == "eps":
                if f["primitive"] == "sqrt" and f["phase"] == "backward":
                    f.update(rules.norm_plus_eps(f))
                continue
            if f["phase"] == "forward" and f["category"] != "overflow_low_precision" and (
                f["primitive"] != "cholesky"
            ):
                f.update(rules.where_trap(f))

    def _add(self, f: dict[str, Any], eqn: Any, ctx: _Ctx, outs: list[iv.AV]) -> None:
        user = innermost_user_frame(ctx.frames())
        f = dict(f)
        f["source"] = _source(user) if user else None
        f["line_text"] = _line(user) if user else ""
        f["module"] = module_path(scopes(ctx.name_stack()), self.roots)
        idx = len(self.found)
        self.found.append(f)
        if (f["phase"] == "forward" and f.get("nonfinite", True)) or f["primitive"] == "sqrt":
            for k, a in enumerate(outs):
                outs[k] = a.replace(taint=a.taint | {idx})

    # -- loops ------------------------------------------------------------------

    def _fixpoint(self, body, consts, carry, rest, ctx, n_carry, order, out_fwd):
        quiet = _Ctx(ctx.tbs, ctx.stacks, ctx.trusted, ctx.custom, False)
        for k in range(_FIXPOINT_PASSES + 1):
            outs = self._eval(body.jaxpr, [iv.const(c) for c in body.consts],
                              order(consts, carry, rest), quiet, out_fwd)
            new = [iv.union(a, b) for a, b in zip(carry, outs[:n_carry])]
            if all((a.lo, a.hi) == (b.lo, b.hi) for a, b in zip(carry, new)):
                break
            if k == _FIXPOINT_PASSES:  # widen what still moves
                new = [
                    b.replace(lo=-iv.INF if b.lo < a.lo else b.lo,
                              hi=iv.INF if b.hi > a.hi else b.hi)
                    for a, b in zip(carry, new)
                ]
            carry = new
        return self._eval(body.jaxpr, [iv.const(c) for c in body.consts],
                          order(consts, carry, rest), ctx, out_fwd), carry

    def _scan(self, eqn, ins, ctx, out_flags) -> list[iv.AV]:
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
        outs, carry = self._fixpoint(
            p["jaxpr"], consts, carry, xs, ctx, nk, lambda c, k, r: list(c) + list(k) + list(r),
            tuple(out_flags),
        )
        return carry + outs[nk:]

    def _while(self, eqn, ins, ctx, out_flags) -> list[iv.AV]:
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        bconsts, carry = ins[cn:cn + bn], ins[cn + bn:]
        _, carry = self._fixpoint(
            p["body_jaxpr"], bconsts, carry, [], ctx, len(carry),
            lambda c, k, r: list(c) + list(k), tuple(out_flags),
        )
        return carry

    # -- result -----------------------------------------------------------------

    def risks(self) -> Risks:
        seen: dict[tuple, Risk] = {}
        for f in self.found:
            risk = Risk(
                primitive=f["primitive"], source=f["source"], module=f["module"],
                phase=f["phase"], category=f["category"], severity=f["severity"],
                suggestion=f["suggestion"], why=f["why"], line=f["line_text"],
            )
            key = (risk.primitive, risk.source, risk.module, risk.phase, risk.category)
            old = seen.get(key)
            if old is None or (old.severity == "low" and risk.severity == "high"):
                seen[key] = risk
        out = sorted(seen.values(), key=lambda r: r.severity != "high")
        return Risks(out)


def _source(frame: Frame) -> str:
    try:
        rel = os.path.relpath(frame.file)
    except ValueError:
        rel = frame.file
    return f"{frame.file if rel.startswith('..') else rel}:{frame.line}"


def _line(frame: Frame) -> str:
    import linecache

    return linecache.getline(frame.file, frame.line).strip()
