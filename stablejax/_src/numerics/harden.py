r"""``harden(fn)``: ``fn`` with every singular primitive given its safe rule.

A jaxpr rewrite. The hardened function traces ``fn`` with the actual
arguments (``jax.make_jaxpr``, pytrees kept) and evaluates the jaxpr equation
by equation in the caller's trace, so ``jit``, ``grad``, ``vmap`` and any other
transformation of the hardened function apply to the rewritten program. Each
``sqrt``, ``rsqrt``, ``log``, ``log1p``, ``div``, negative ``integer_pow``,
``pow``, ``acos``, ``asin`` and ``atan2`` is bound as the matching safe op of
:mod:`stablejax._src.numerics.harden_rules`, unless its argument is positive
(or its divisor non-zero) by construction, as in ``rsqrt(var + eps)``.

Sub-jaxprs are rewritten too and keep their structure: ``jit`` and
``closed_call`` are inlined; ``scan``, ``while``, ``cond`` and ``checkpoint``
(remat) are rebuilt with ``lax.scan``, ``lax.while_loop``, ``lax.switch`` and
``jax.checkpoint`` around the rewritten bodies. ``custom_jvp`` and
``custom_vjp`` calls (``jax.nn.softmax``, ``jax.nn.relu``, stablejax's own safe
ops) are kept as they are: their authors chose their derivative rules.

Flax NNX modules among the arguments are split into their graph and state,
merged inside the traced function, and updated afterwards with the state the
function left them in (BatchNorm statistics, RNG counters), as ``nnx.jit``
does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax import lax
from jax._src import source_info_util
from jax.extend import core as jcore

from stablejax._src.jaxpr_bind import bind_equation
from stablejax._src.numerics import harden_rules as rules

_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}
_REMAT = ("checkpoint", "remat2", "remat")


def _closed(obj: Any) -> tuple[Any, Sequence[Any]]:
    if hasattr(obj, "consts") and hasattr(obj, "jaxpr"):
        return obj.jaxpr, obj.consts
    return obj, ()


def _match(value: Any, aval: Any) -> Any:
    """``value`` with exactly ``aval``'s dtype and weak type (loop carries must match)."""
    from jax._src.lax import lax as lax_internal

    if not hasattr(aval, "dtype") or not hasattr(value, "dtype"):
        return value
    same_weak = getattr(jax.typeof(value), "weak_type", False) == aval.weak_type
    if value.dtype == aval.dtype and same_weak:
        return value
    return lax_internal._convert_element_type(value, aval.dtype, weak_type=aval.weak_type)


_FOLD = frozenset({"convert_element_type", "add", "sub", "mul", "div", "neg", "max", "min",
                   "integer_pow", "square", "abs"})


def _fold(eqn: Any, known: Sequence[Any]) -> Any:
    """The value of a scalar equation whose operands are all known at trace time, else None.

    ``jnp.var`` divides by ``n - ddof`` computed from a literal ``ddof``: a
    divisor known to be non-zero keeps the plain ``div``.
    """
    if (eqn.primitive.name not in _FOLD or not known or any(k is None for k in known)
            or len(eqn.outvars) != 1 or getattr(eqn.outvars[0].aval, "shape", None) != ()):
        return None
    try:
        with jax.ensure_compile_time_eval():
            out = bind_equation(eqn, [np.asarray(k) for k in known])[0]
        return np.asarray(out)
    except Exception:  # an operand jax will not evaluate eagerly: no fact
        return None


def _needs_facts(eqn: Any) -> bool:
    """Constants' facts are worth reading only where a rule or a fact can use them."""
    return eqn.primitive.name not in ("dot_general", "conv_general_dilated")


class _Evaluator:
    """Evaluates jaxprs with the safe rules, in whatever trace the caller is in."""

    def __init__(self) -> None:
        self._const_facts: dict[int, int] = {}
        self.out_facts: list[int] = []
        self.sub_facts: list[int] | None = None

    def _fact_of_value(self, value: Any) -> int:
        key = id(value)
        if key not in self._const_facts:
            self._const_facts[key] = rules.constant_fact(value)
        return self._const_facts[key]

    def eval(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any],
             arg_facts: Sequence[int] | None = None, name_stack: Any = None,
             arg_known: Sequence[Any] | None = None) -> list:
        env: dict[Any, Any] = {}
        known: dict[Any, Any] = {}  # scalars whose value is known at trace time (ddof, counts)
        facts: dict[Any, int] = {}
        tags: dict[Any, Any] = {}
        lazy: dict[Any, Any] = {}  # constants: their facts are computed when a rule asks
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
            lazy[v] = c
        arg_facts = arg_facts if arg_facts is not None else [0] * len(args)
        for v, a, f in zip(jaxpr.invars, args, arg_facts):
            env[v] = a
            facts[v] = f
        for v, k in zip(jaxpr.invars, arg_known or ()):
            if k is not None:
                known[v] = k
                facts[v] = rules.constant_fact(k)

        def known_of(v):
            if isinstance(v, jcore.Literal):
                return v.val if np.ndim(v.val) == 0 else None
            return known.get(v)

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        def fact(v):
            if isinstance(v, jcore.Literal):
                return rules.constant_fact(v.val)
            if v not in facts and v in lazy:
                facts[v] = self._fact_of_value(lazy[v])
            return facts.get(v, 0)

        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            in_facts = [fact(v) for v in eqn.invars] if _needs_facts(eqn) else [0] * len(invals)
            stack = eqn.source_info.name_stack
            if name_stack is not None:
                stack = name_stack + stack
            self.sub_facts = None  # a jit body's output facts, when the handler knows them
            in_known = [known_of(v) for v in eqn.invars]
            with source_info_util.user_context(eqn.source_info.traceback, name_stack=stack), \
                    eqn.ctx.manager:
                outs = self._eqn(eqn, invals, in_facts, stack, in_known)
            sub = self.sub_facts if eqn.primitive.name in ("jit", "pjit") else None
            folded = _fold(eqn, in_known)
            same = len(eqn.invars) == 2 and eqn.invars[0] is eqn.invars[1]
            out_fact = rules.propagate(eqn.primitive.name, eqn.params, in_facts, same)
            out_fact |= rules.shift_fact(eqn.primitive.name, eqn.params, eqn.invars, tags)
            tag = rules.shift_tag(eqn.primitive.name, eqn.params, eqn.invars, tags)
            if tag is not None:
                tags[eqn.outvars[0]] = tag
            for i, (v, o) in enumerate(zip(eqn.outvars, outs)):
                if isinstance(v, jcore.DropVar):
                    continue
                env[v] = _match(o, v.aval)
                facts[v] = (out_fact if i == 0 else 0) | (sub[i] if sub else 0)
            if folded is not None:
                known[eqn.outvars[0]] = folded
                facts[eqn.outvars[0]] = rules.constant_fact(folded)
        self.out_facts = [fact(v) for v in jaxpr.outvars]
        return [read(v) for v in jaxpr.outvars]

    def _eqn(self, eqn: Any, invals: list, in_facts: list, stack: Any, in_known: list) -> list:
        name = eqn.primitive.name
        p = eqn.params
        if name in ("jit", "pjit") and "jaxpr" in p:
            return self._jit(eqn, invals, in_facts, stack, in_known)
        if name in _INLINE and _INLINE[name] in p:
            jaxpr, consts = _closed(p[_INLINE[name]])
            return self.eval(jaxpr, consts, invals, in_facts, stack)
        if name == "scan":
            return self._scan(eqn, invals, in_facts, stack)
        if name == "while":
            return self._while(eqn, invals, in_facts, stack)
        if name == "cond":
            return self._cond(eqn, invals, in_facts, stack)
        if name in _REMAT and "jaxpr" in p:
            return self._remat(eqn, invals, in_facts, stack)
        if rules.applies(name, [v.aval for v in eqn.outvars]):
            def prim(*args):
                return bind_equation(eqn, args)[0]

            out = rules.RULES[name](prim, p, invals, in_facts)
            if out is not None:
                return [out]
        return bind_equation(eqn, invals)

    # -- control flow ---------------------------------------------------------------

    def _body(self, closed: Any, facts: Sequence[int], stack: Any,
              known: Sequence[Any] | None = None) -> Callable:
        jaxpr, consts = _closed(closed)

        def run(*args):
            outs = self.eval(jaxpr, consts, args, list(facts) + [0] * (len(args) - len(facts)),
                             stack, known)
            run.out_facts = self.out_facts
            return [_match(o, v.aval) for o, v in zip(outs, jaxpr.outvars)]

        return run

    def _jit(self, eqn, invals, in_facts, stack, in_known):
        p = eqn.params
        body = self._body(p["jaxpr"], in_facts, stack, in_known)
        body.__name__ = body.__qualname__ = p.get("name", "jit")
        fn = jax.jit(body, keep_unused=p.get("keep_unused", False), inline=p.get("inline", False))
        outs = list(fn(*invals))
        self.sub_facts = getattr(body, "out_facts", None)  # set while jax.jit traced the body
        return outs

    def _scan(self, eqn, invals, in_facts, stack):
        p = eqn.params
        nc, ncarry = p["num_consts"], p["num_carry"]
        consts, init, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
        xs_facts = in_facts[nc + ncarry:]
        body_jaxpr, _ = _closed(p["jaxpr"])
        carry_avals = [v.aval for v in body_jaxpr.invars[nc:nc + ncarry]]

        def step(carry, x):
            facts = list(in_facts[:nc]) + [0] * ncarry + list(xs_facts)
            outs = self.eval(*_closed(p["jaxpr"]), [*consts, *carry, *x], facts, stack)
            outs = [_match(o, v.aval) for o, v in zip(outs, body_jaxpr.outvars)]
            return outs[:ncarry], outs[ncarry:]

        init = [_match(c, a) for c, a in zip(init, carry_avals)]
        kwargs = {}
        if "_split_transpose" in p:
            kwargs["_split_transpose"] = p["_split_transpose"]
        carry, ys = lax.scan(step, init, list(xs), length=p["length"], reverse=p["reverse"],
                             unroll=p["unroll"], **kwargs)
        return [*carry, *ys]

    def _while(self, eqn, invals, in_facts, stack):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        c_args, b_args, carry = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
        cond = self._body(p["cond_jaxpr"], in_facts[:cn], stack)
        body = self._body(p["body_jaxpr"], in_facts[cn:cn + bn], stack)
        body_jaxpr, _ = _closed(p["body_jaxpr"])
        carry = [_match(c, v.aval) for c, v in zip(carry, body_jaxpr.invars[bn:])]
        out = lax.while_loop(lambda c: cond(*c_args, *c)[0], lambda c: body(*b_args, *c), carry)
        return list(out)

    def _cond(self, eqn, invals, in_facts, stack):
        branches = [self._body(b, in_facts[1:], stack) for b in eqn.params["branches"]]
        index, ops = invals[0], invals[1:]
        return list(lax.switch(index, branches, *ops))

    def _remat(self, eqn, invals, in_facts, stack):
        p = eqn.params
        body = self._body(p["jaxpr"], in_facts, stack)
        fn = jax.checkpoint(lambda *a: body(*a), prevent_cse=p.get("prevent_cse", True),
                            policy=p.get("policy"))
        return list(fn(*invals))


# --------------------------------------------------------------------------- arguments


def _is_graph_node(x: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return False
    return isinstance(x, nnx.Module)


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


class _Node:
    """An NNX module among the arguments: its graph definition and state leaves."""

    def __init__(self, module: Any) -> None:
        from flax import nnx

        self.module = module
        self.graphdef, state = nnx.split(module)
        self.leaves, self.treedef = jax.tree.flatten(state)


class _Traced(NamedTuple):
    """The rewritten program of one argument signature, and how to rebuild the outputs."""

    jaxpr: Any  # ClosedJaxpr of the rewritten program, flat dynamic leaves in and out
    out_tree: Any
    out_static: list


_CACHE_SIZE = 64


def _signature(treedef: Any, slots: list, nodes: list, dynamic: list) -> Any:
    """The cache key: tree structure, static leaves, NNX graph definitions, avals."""
    static = tuple((type(info), info) for kind, info in slots if kind == "static")
    key = (treedef, static, tuple(n.graphdef for n in nodes),
           tuple(jax.typeof(x) for x in dynamic))
    hash(key)  # TypeError for an unhashable static argument: not cached
    return key


def _trace(fn: Callable, treedef: Any, slots: list, nodes: list, dynamic: list) -> _Traced:
    from flax import nnx

    def pure(dyn):
        rebuilt, merged = [], []
        for kind, info in slots:
            if kind == "array":
                rebuilt.append(dyn[info])
            elif kind == "static":
                rebuilt.append(info)
            else:
                k, start, n = info
                state = jax.tree.unflatten(nodes[k].treedef, dyn[start:start + n])
                module = nnx.merge(nodes[k].graphdef, state)
                merged.append(module)
                rebuilt.append(module)
        a, kw = jax.tree.unflatten(treedef, rebuilt)
        out_leaves, out_tree[0] = jax.tree.flatten((fn(*a, **kw), [nnx.state(m) for m in merged]))
        out_static[:] = [None if _is_dynamic(o) else (o,) for o in out_leaves]
        return [o for o in out_leaves if _is_dynamic(o)]

    out_tree: list[Any] = [None]
    out_static: list[Any] = []
    closed = jax.make_jaxpr(pure)(dynamic)
    rewritten = jax.make_jaxpr(
        lambda dyn: _Evaluator().eval(closed.jaxpr, closed.consts, dyn))(list(dynamic))
    return _Traced(rewritten, out_tree[0], out_static)


def _call(fn: Callable, args: tuple, kwargs: dict, cache: dict) -> Any:
    from flax import nnx

    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_graph_node)
    slots: list[tuple[str, Any]] = []
    dynamic: list[Any] = []
    nodes: list[_Node] = []
    for leaf in leaves:
        if _is_graph_node(leaf):
            node = _Node(leaf)
            slots.append(("node", (len(nodes), len(dynamic), len(node.leaves))))
            nodes.append(node)
            dynamic.extend(node.leaves)
        elif _is_dynamic(leaf):
            slots.append(("array", len(dynamic)))
            dynamic.append(leaf)
        else:
            slots.append(("static", leaf))

    try:
        key = _signature(treedef, slots, nodes, dynamic)
    except TypeError:
        key = None
    traced = cache.get(key) if key is not None else None
    if traced is None:
        traced = _trace(fn, treedef, slots, nodes, dynamic)
        # A program that closes over a tracer of the caller's trace is not reusable.
        if key is not None and not any(isinstance(c, jax.core.Tracer)
                                       for c in traced.jaxpr.consts):
            if len(cache) >= _CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[key] = traced
    # eval_jaxpr puts the caller's name stack (a linen scope, a jax.named_scope) in
    # front of the recorded ones, as the plain call has it.
    flat = iter(jax.core.eval_jaxpr(traced.jaxpr.jaxpr, traced.jaxpr.consts, *dynamic))
    leaves_out = [next(flat) if st is None else st[0] for st in traced.out_static]
    out, states = jax.tree.unflatten(traced.out_tree, leaves_out)
    for node, state in zip(nodes, states):
        nnx.update(node.module, state)
    return out


def harden(fn: Callable) -> Callable:
    r"""Returns ``fn`` with every singular primitive given its safe rule.

    The hardened function computes exactly what ``fn`` computes wherever the
    plain formula is finite, and at the singular points the documented finite
    value and derivative of the matching stablejax op:

    .. math::
        \sqrt{x} \to \mathrm{safe\_sqrt}, \quad x^{-1/2} \to \mathrm{safe\_rsqrt},
        \quad \log x \to \mathrm{safe\_log}, \quad a / b \to \mathrm{safe\_div},

    and ``log1p``, negative integer powers, ``x ** y``, ``arccos``, ``arcsin``
    and ``arctan2`` likewise (:mod:`stablejax._src.numerics.harden_rules`).
    So ``jnp.linalg.norm``, ``x / jnp.linalg.norm(x)`` and ``jnp.std`` get the
    values and gradients of :func:`safe_norm`, :func:`safe_normalize` and
    :func:`safe_std` at the zero vector and the constant row (0 and 0), and the
    ``jnp.where(x > 0, jnp.log(x), 0)`` trap a gradient of 0 instead of NaN.

    It is a one-line fix for code the user cannot edit: a loss, a
    ``jax.grad`` of one (whose backward ``0.5 / sqrt(x)`` becomes 0 at 0), a
    train step, a linen ``apply``, a function taking NNX modules, or an NNX
    module itself. It works under ``jit``, ``grad``, ``vmap``, ``scan``,
    ``while_loop``, ``cond`` and ``checkpoint``; the output pytree is ``fn``'s.

    Python scalars and other non-array arguments are fixed at trace time (as
    ``static_argnums`` would); arrays, tracers and NNX state are traced.
    ``custom_jvp`` / ``custom_vjp`` functions are kept as written.

    Args:
      fn: a callable, or an ``nnx.Module`` (called as ``module(*args)``).

    Returns:
      A callable with ``fn``'s signature and output structure.

    Raises:
      TypeError: if ``fn`` is not callable.

    Examples:
      >>> import jax, jax.numpy as jnp, stablejax
      >>> loss = lambda x: jnp.linalg.norm(x)
      >>> jax.grad(stablejax.harden(loss))(jnp.zeros(3))
      Array([0., 0., 0.], dtype=float32)
      >>> stablejax.harden(jax.grad(loss))(jnp.zeros(3))
      Array([0., 0., 0.], dtype=float32)
    """
    if _is_graph_node(fn):
        module = fn
        inner = harden(lambda m, *a, **k: m(*a, **k))
        return functools.wraps(type(module).__call__)(lambda *a, **k: inner(module, *a, **k))
    if not callable(fn):
        raise TypeError(
            f"harden expects a function (or an nnx.Module), got {fn!r} of type "
            f"{type(fn).__name__}; pass the function itself, e.g. harden(loss)(x), "
            "not harden(loss(x))."
        )

    cache: dict[Any, _Traced] = {}

    @functools.wraps(fn)
    def hardened(*args: Any, **kwargs: Any) -> Any:
        return _call(fn, args, kwargs, cache)

    hardened._cache = cache  # the rewritten programs by argument signature (tests read it)

    return hardened
