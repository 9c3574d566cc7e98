r"""The safe rule of each singular primitive, and the sign facts that skip it.

:func:`stablejax.harden` re-evaluates a jaxpr equation by equation and, for the
primitives listed in :data:`RULES`, binds the safe rule instead of the plain
one. Every rule keeps the value and derivative of the plain primitive, bit for
bit, wherever those are finite, and at the singular point takes the value and
derivative (0) that the matching stablejax op documents:

=======================  ======================================  ==================
primitive                singular set: value, derivative         convention of
=======================  ======================================  ==================
``sqrt``                 finite ``x <= 0``: 0, 0                 ``safe_sqrt``
``rsqrt``                finite ``x <= 0``: 0, 0                 ``safe_rsqrt``
``log``                  finite ``x <= 0``: ``log(tiny)``, 0     ``safe_log``
``div``                  ``b == 0``, finite ``a``: 0, 0          ``safe_div``
``log1p``                finite ``x <= -1``: ``log(tiny)``, 0    ``safe_log``
``integer_pow`` (n < 0)  ``x == 0``: 0, 0                        ``safe_div``
``pow``                  ``x == 0, y < 1, y != 0``: 0, 0;        ``safe_pow``
                         ``x < 0``, fractional ``y``: ``|x|**y``
``acos``, ``asin``       ``|x| >= 1``: value at ``clip(x)``, 0   ``safe_sqrt``
``acosh``                finite ``x <= 1``: 0, 0                 ``safe_sqrt``
``atan2``                ``x == y == 0``: ``atan2``'s value, 0   ``safe_norm``
=======================  ======================================  ==================

Unlike the ops themselves, the rules floor no derivative: the brief of
``harden`` is to change nothing where the program is finite.

The derivative rules of these primitives are themselves made of the same
primitives (``sqrt``'s is ``0.5 / sqrt(x)``, ``log``'s is ``g / x``, ``acos``'s
``-rsqrt(1 - x**2)``), so hardening a gradient function, whose jaxpr holds
those derivative ops, gives the same finite values as the gradient of the
hardened function: at ``x = 0`` ``0.5 / 0`` becomes 0, the ``safe_sqrt``
convention.

Sign facts. A divisor, ``sqrt``, ``rsqrt`` or ``log`` argument that is positive
by construction keeps the plain primitive (no extra operation): positive
literals and constants, ``nonneg + positive`` (flax's ``rsqrt(var + eps)``),
``max(positive, .)``, and shape-only operations of those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.extend import core as jcore

NONNEG = 1
NONZERO = 2
POS = NONNEG | NONZERO


# --------------------------------------------------------------------------- sign facts


def constant_fact(value: Any) -> int:
    """The sign facts of a concrete constant (0 for a tracer or a non-float)."""
    if isinstance(value, jax.core.Tracer):
        return 0
    try:
        arr = np.asarray(value)
    except Exception:  # a key array or an opaque constant
        return 0
    if arr.dtype.kind not in "fiu" or arr.size > 1 << 16:
        return 0
    fact = 0
    if np.all(arr >= 0):
        fact |= NONNEG
    if np.all(arr != 0):
        fact |= NONZERO
    return fact


_SHAPE_OPS = frozenset({
    "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose", "copy",
    "copy_p", "slice", "dynamic_slice", "rev", "reduce_max", "reduce_min",
    "reduce_precision", "optimization_barrier",
})
_NONNEG_OPS = frozenset({"exp", "exp2", "logistic", "square"})
# Not select_n: logsumexp replaces a non-finite max by 0, and a row of -inf then sums to 0.
_TAG_KEEP = frozenset({"broadcast_in_dim", "stop_gradient", "reshape", "max"})


def shift_tag(name: str, params: dict, invars: Sequence[Any], tags: dict) -> Any:
    """Recognises the shifted exponential of a softmax or a logsumexp.

    ``exp(x - max(x, axes))`` has a 1 along ``axes``, so its sum over ``axes``
    is at least 1: the divisor of ``jax.nn.softmax`` and the argument of the
    ``log`` in ``logsumexp`` are positive by construction. Tags:
    ``("max", x, axes)``, ``("shifted", axes)``, ``("exp", axes)``.
    """
    tagged = [tags.get(v) for v in invars if not _is_literal(v)]
    if name == "reduce_max":
        return ("max", invars[0], tuple(params["axes"]))
    if name in _TAG_KEEP:
        found = [t for t in tagged if t is not None and t[0] == "max"]
        return found[0] if len(found) == 1 else None
    if name == "sub" and not _is_literal(invars[1]):
        t = tags.get(invars[1])
        if t is not None and t[0] == "max" and t[1] is invars[0]:
            return ("shifted", t[2])
    if name == "exp" and tagged and tagged[0] is not None and tagged[0][0] == "shifted":
        return ("exp", tagged[0][1])
    return None


def shift_fact(name: str, params: dict, invars: Sequence[Any], tags: dict) -> int:
    """``POS`` for ``reduce_sum`` over ``axes`` of a tagged ``("exp", axes)``, else 0."""
    if name == "reduce_sum" and not _is_literal(invars[0]):
        t = tags.get(invars[0])
        if t is not None and t[0] == "exp" and t[1] == tuple(params["axes"]):
            return POS
    return 0


def _is_literal(v: Any) -> bool:
    return isinstance(v, jcore.Literal)


def _custom_name(params: dict) -> str:
    """The function name of a ``custom_jvp_call`` (from its jaxpr's debug info)."""
    info = getattr(getattr(params.get("call_jaxpr"), "jaxpr", None), "debug_info", None)
    src = getattr(info, "func_src_info", None) or ""
    return src.split(" ", 1)[0]


def propagate(name: str, params: dict, in_facts: Sequence[int], same_operand: bool) -> int:
    """Sign facts of an equation's first output, from those of its operands."""
    f = list(in_facts) or [0]
    if name in _SHAPE_OPS:
        return f[0]
    if name == "convert_element_type":
        dtype = params.get("new_dtype")
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and (
            jnp.finfo(dtype).bits >= 32 or jnp.dtype(dtype) == jnp.bfloat16
        ):
            return f[0]
        return f[0] & NONNEG
    if name in _NONNEG_OPS:
        return NONNEG
    if name in ("abs", "sqrt"):
        return NONNEG | (f[0] & NONZERO)
    if name == "integer_pow":
        return NONNEG if params["y"] % 2 == 0 else f[0] & NONNEG
    if name == "mul":
        return NONNEG if same_operand or (f[0] & f[1] & NONNEG) else 0
    if name in ("add", "add_any"):
        if f[0] & f[1] & NONNEG:
            return POS if (f[0] | f[1]) == POS else NONNEG
        return 0
    if name == "max":
        return f[0] | f[1] if (f[0] | f[1]) & NONNEG else 0
    if name == "min":
        return f[0] & f[1]
    if name in ("reduce_sum", "cumsum"):
        return f[0] & NONNEG
    if name == "div":
        return NONNEG if (f[0] & NONNEG) and f[1] == POS else 0
    if name == "neg":
        return f[0] & NONZERO
    if name == "custom_jvp_call" and _custom_name(params) == "logaddexp":
        # log(exp(a) + exp(b)) >= max(a, b): jax.nn.softplus is logaddexp(x, 0).
        return NONNEG if any(g & NONNEG for g in f) else 0
    if name in ("concatenate", "select_n"):
        data = f[1:] if name == "select_n" else f
        out = POS
        for g in data:
            out &= g
        return out
    return 0


# --------------------------------------------------------------------------- safe rules
#
# Each rule is a ``custom_jvp`` whose value is the plain primitive (``prim``,
# bound with the equation's own parameters) at a harmless input where the point
# is singular, selected away there, and whose derivative is jax's own JVP
# formula for that primitive (jax/_src/lax/lax.py: ``sqrt``'s
# ``g * (0.5 / ans)``, ``div``'s ``g / y`` and ``-g * x * y**-2``, ...) on the
# same operands, in the same order, with one ``select`` on the output tangent:
# 0 on the singular set. Transposed, that select acts on the incoming
# cotangent before jax's own chain, so the backward program is the plain one
# op for op. No select sits between a multiply and the add that consumes it
# (XLA's CPU backend contracts those into a fused multiply-add, and a select in
# between would change the rounding). Off the singular set value and gradient
# are therefore jax's bit for bit; on it the value is the documented constant
# and the derivative 0, to every order (the JVP rule reads only the harmless
# operands).
#
# The rules are written with ``lax`` and keep each operand's own shape: an
# operand that jax broadcasts implicitly (the ``[n, 1]`` divisor of
# ``x / norm(x, keepdims=True)``) is not broadcast by hand, so the transposed
# program reduces the same array in the same place.


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def _const(x: Any, value: float) -> np.ndarray:
    return np.array(value, dtype=_dtype(x))


def _broadcast(x: Any, shape: tuple) -> Any:
    return x if np.shape(x) == shape else jnp.broadcast_to(x, shape)


def _replace(mask: Any, value: float, x: Any) -> Any:
    """``x`` with ``value`` where ``mask`` (``mask``'s shape, ``x`` broadcast to it if needed)."""
    x = _broadcast(x, np.shape(mask))
    return lax.select(mask, lax.full_like(x, value), x)


def _finite_le(x: Any, bound: float) -> Any:
    return lax.bitwise_and(lax.le(x, _const(x, bound)), lax.gt(x, _const(x, -np.inf)))


def _log_tiny(x: Any) -> float:
    return float(np.log(np.finfo(_dtype(x)).tiny))


def _safe(primal: Callable, tangents: Callable) -> Callable:
    """The ``custom_jvp`` of a rule.

    ``primal(*args) -> (out, sing, ctx)``: the safe value, the singular set (the
    output's shape) and the harmless operands. ``tangents(ctx, *ts)``: jax's JVP
    term of each operand (``None`` for an operand that is not perturbed).
    """

    @jax.custom_jvp
    def rule(*args):
        return primal(*args)[0]

    def jvp(args, ts):
        out, sing, ctx = primal(*args)
        live = [t if not isinstance(t, SymbolicZero) else None for t in ts]
        terms = [t for t in tangents(ctx, *live) if t is not None]
        total = terms[0]
        for t in terms[1:]:
            total = lax.add(total, t)
        return out, _replace(sing, 0, _broadcast(total, np.shape(out)))

    rule.defjvp(jvp, symbolic_zeros=True)
    return rule


def _unary_safe(prim: Callable, singular: Callable, harmless: float, value: Callable,
                term: Callable) -> Callable:
    def primal(x):
        sing = singular(x)
        xs = _replace(sing, harmless, x)
        ans = prim(xs)
        return _replace(sing, value(x), ans), sing, (xs, ans)

    return _safe(primal, lambda ctx, g: [None if g is None else term(g, *ctx)])


def safe_sqrt_rule(prim: Callable, x: Any) -> Any:
    r"""``safe_sqrt``'s rule: :math:`\sqrt{x}`; 0 with derivative 0 at finite ``x <= 0``."""
    return _unary_safe(prim, lambda x: _finite_le(x, 0), 1, lambda x: 0,
                       lambda g, xs, ans: lax.mul(g, lax.div(_const(xs, 0.5), ans)))(x)


def safe_rsqrt_rule(prim: Callable, x: Any) -> Any:
    r"""``safe_rsqrt``'s rule: :math:`x^{-1/2}`; 0 with derivative 0 at finite ``x <= 0``."""
    return _unary_safe(
        prim, lambda x: _finite_le(x, 0), 1, lambda x: 0,
        lambda g, xs, ans: lax.mul(g, lax.mul(_const(xs, -0.5), lax.div(ans, xs))))(x)


def safe_log_rule(prim: Callable, x: Any) -> Any:
    r"""``safe_log``'s rule: :math:`\log x`; ``log(tiny)`` with derivative 0 at ``x <= 0``."""
    return _unary_safe(prim, lambda x: _finite_le(x, 0), 1, _log_tiny,
                       lambda g, xs, ans: lax.div(g, xs))(x)


def safe_log1p_rule(prim: Callable, x: Any) -> Any:
    r""":math:`\log(1 + x)`; ``log(tiny)`` with derivative 0 at finite ``x <= -1``."""
    return _unary_safe(prim, lambda x: _finite_le(x, -1), 0, _log_tiny,
                       lambda g, xs, ans: lax.div(g, lax.add(xs, _const(xs, 1))))(x)


def safe_integer_pow_rule(prim: Callable, x: Any, n: int) -> Any:
    r""":math:`x^n` for ``n < 0``: 0 with derivative 0 at ``x = 0`` (pseudo-inverse)."""
    return _unary_safe(
        prim, lambda x: lax.eq(x, _const(x, 0)), 1, lambda x: 0,
        lambda g, xs, ans: lax.mul(g, lax.mul(_const(xs, n), lax.integer_pow(xs, n - 1))))(x)


def safe_div_rule(prim: Callable, a: Any, b: Any) -> Any:
    r"""``safe_div``'s rule: :math:`a / b`; 0 with derivatives 0 where ``b == 0`` (finite ``a``).

    The divisor is replaced in its own shape (1 where it is 0); the output mask
    adds the finiteness of ``a``, so ``inf / 0`` stays non-finite.
    """

    def primal(a, b):
        zero = lax.eq(b, _const(b, 0))
        bs = _replace(zero, 1, b)
        out = prim(a, bs)
        sing = _broadcast(lax.bitwise_and(zero, lax.is_finite(a)), np.shape(out))
        return _replace(sing, 0, out), sing, (a, bs)

    def tangents(ctx, ga, gb):
        a, bs = ctx
        return [None if ga is None else lax.div(ga, bs),
                None if gb is None else lax.mul(lax.mul(lax.neg(gb), a), lax.integer_pow(bs, -2))]

    return _safe(primal, tangents)(a, b)


def safe_pow_rule(prim: Callable, x: Any, y: Any) -> Any:
    r""":math:`x^y`, finite with finite derivatives where it or its derivative is singular.

    At ``x = 0`` with ``y < 1, y != 0`` (the value is 0 or Inf there and
    :math:`y\,x^{y-1}` is Inf) the value is 0 and the derivatives 0: the
    ``safe_sqrt`` and ``safe_pow`` convention. At ``x < 0`` with a fractional
    ``y`` (NaN) it is ``|x| ** y``, ``safe_pow``'s value, with that function's
    derivative. Elsewhere it is ``x ** y`` exactly, with jax's derivative.
    """

    def primal(x, y):
        zero = lax.bitwise_and(lax.eq(x, _const(x, 0)), lax.bitwise_and(
            lax.lt(y, _const(y, 1)), lax.ne(y, _const(y, 0))))
        fractional = lax.ne(y, lax.round(y, lax.RoundingMethod.TO_NEAREST_EVEN))
        neg = lax.bitwise_and(lax.lt(x, _const(x, 0)),
                              lax.bitwise_and(fractional, lax.is_finite(y)))
        shape = np.shape(lax.bitwise_and(zero, neg))
        zero, neg, xb = (_broadcast(v, shape) for v in (zero, neg, x))
        base = lax.select(neg, lax.neg(xb), _replace(zero, 1, xb))
        ans = prim(base, y)
        return _replace(zero, 0, ans), zero, (base, y, ans, neg)

    def tangents(ctx, gx, gy):
        base, y, ans, neg = ctx
        terms = [None, None]
        if gx is not None:  # jax: g * (y * x ** (y - 1)); d|x|^y/dx = -that at x < 0
            jac = lax.mul(y, prim(base, lax.sub(y, _const(y, 1))))
            terms[0] = lax.mul(gx, lax.select(neg, lax.neg(jac), jac))
        if gy is not None:  # jax: g * (log(x, 1 where x == 0) * ans)
            logx = lax.log(_replace(lax.eq(base, _const(base, 0)), 1, base))
            terms[1] = lax.mul(gy, lax.mul(logx, ans))
        return terms

    return _safe(primal, tangents)(x, y)


def _arc(name: str, sign: int) -> Callable:
    def rule(prim: Callable, x: Any) -> Any:
        def primal(x):
            sing = lax.bitwise_and(lax.ge(lax.abs(x), _const(x, 1)), lax.is_finite(x))
            xs = _replace(sing, 0, x)
            edge = prim(lax.clamp(_const(x, -1), x, _const(x, 1)))
            return lax.select(sing, edge, prim(xs)), sing, (xs,)

        def tangents(ctx, g):  # jax: g * (+-rsqrt(1 - x**2))
            (xs,) = ctx
            if g is None:
                return [None]
            r = lax.rsqrt(lax.sub(_const(xs, 1), lax.square(xs)))
            return [lax.mul(g, lax.neg(r) if sign < 0 else r)]

        return _safe(primal, tangents)(x)

    rule.__doc__ = (f":math:`\\{name}(x)` at ``clip(x, -1, 1)``; derivative 0 at "
                    "``|x| >= 1``, where it is infinite or undefined.")
    return rule


safe_acos_rule = _arc("arccos", -1)
safe_asin_rule = _arc("arcsin", 1)


def safe_acosh_rule(prim: Callable, x: Any) -> Any:
    r""":math:`\operatorname{arccosh}(x)` at ``max(x, 1)``; derivative 0 at finite ``x <= 1``.

    At 1 (the distance of a point to itself in the Poincare ball) the value is
    0 and jax's derivative ``g * rsqrt(x**2 - 1)`` is Inf.
    """

    def primal(x):
        sing = _finite_le(x, 1)
        xs = _replace(sing, 2, x)
        return _replace(sing, 0, prim(xs)), sing, (xs,)

    def tangents(ctx, g):  # jax: g * rsqrt(x**2 - 1)
        (xs,) = ctx
        return [None if g is None else
                lax.mul(g, lax.rsqrt(lax.sub(lax.square(xs), _const(xs, 1))))]

    return _safe(primal, tangents)(x)


def safe_atan2_rule(prim: Callable, y: Any, x: Any) -> Any:
    r""":math:`\mathrm{atan2}(y, x)` exactly; derivatives 0 at the origin (they are 0/0)."""

    def primal(y, x):
        sing = lax.bitwise_and(lax.eq(x, _const(x, 0)), lax.eq(y, _const(y, 0)))
        ys, xs = _replace(sing, 1, y), _replace(sing, 1, x)
        edge = _broadcast(prim(y, x), np.shape(sing))
        return lax.select(sing, edge, prim(ys, xs)), sing, (ys, xs)

    def tangents(ctx, gy, gx):  # jax's atan2_p(x, y) rules, x the first operand
        ys, xs = ctx
        den = lax.add(lax.square(ys), lax.square(xs))
        return [None if gy is None else lax.mul(gy, lax.div(xs, den)),
                None if gx is None else lax.mul(gx, lax.div(lax.neg(ys), den))]

    return _safe(primal, tangents)(y, x)


# --------------------------------------------------------------------------- rule table


def _real_float(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.floating)


# A rule: (prim, params, invals, facts) -> the safe output, or None for the plain
# primitive. ``prim`` binds the equation's own primitive and parameters.
Rule = Callable[[Callable, dict, list, list], "Any | None"]


def _unary(op: Callable, needs: int) -> Rule:
    def rule(prim, params, invals, facts):
        if facts[0] & needs == needs:
            return None
        return op(prim, invals[0])

    return rule


def _div(prim, params, invals, facts):
    if facts[1] & NONZERO:
        return None
    return safe_div_rule(prim, invals[0], invals[1])


def _integer_pow(prim, params, invals, facts):
    if params["y"] >= 0 or facts[0] & NONZERO:
        return None
    return safe_integer_pow_rule(prim, invals[0], params["y"])


def _pow(prim, params, invals, facts):
    x, y = invals
    if facts[0] == POS or not jnp.issubdtype(jnp.result_type(y), jnp.floating):
        return None
    if jnp.result_type(x) != jnp.result_type(y):
        return None
    return safe_pow_rule(prim, x, y)


def _log1p(prim, params, invals, facts):
    return None if facts[0] & NONNEG else safe_log1p_rule(prim, invals[0])


RULES: dict[str, Rule] = {
    "sqrt": _unary(safe_sqrt_rule, POS),
    "rsqrt": _unary(safe_rsqrt_rule, POS),
    "log": _unary(safe_log_rule, POS),
    "div": _div,
    "log1p": _log1p,
    "integer_pow": _integer_pow,
    "pow": _pow,
    "acos": _unary(safe_acos_rule, 1 << 8),
    "asin": _unary(safe_asin_rule, 1 << 8),
    "acosh": _unary(safe_acosh_rule, 1 << 8),
    "atan2": lambda prim, params, invals, facts: safe_atan2_rule(prim, *invals),
}


def applies(name: str, out_avals: Sequence[Any]) -> bool:
    """Whether ``name`` has a safe rule for these (real floating) outputs."""
    return name in RULES and all(_real_float(a) for a in out_avals)
