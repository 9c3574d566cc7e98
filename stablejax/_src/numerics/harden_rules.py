r"""The safe rule of each singular primitive, and the sign facts that skip it.

:func:`stablejax.harden` re-evaluates a jaxpr equation by equation and, for the
primitives listed in :data:`RULES`, binds the safe rule instead of the plain
one. Every rule has the contract of :mod:`stablejax._src.numerics.ops`: the
forward equals the plain primitive wherever that is finite, the derivative
equals the plain derivative wherever that is finite, and at the singular point
value and derivative are finite and documented.

======================  ====================================  =====================
primitive               at the singular point                 rule
======================  ====================================  =====================
``sqrt``                ``x <= 0``: 0, derivative 0           :func:`safe_sqrt`
``rsqrt``               ``x <= 0``: 0, derivative 0           :func:`safe_rsqrt`
``log``                 ``x <= 0``: ``log(tiny)``, deriv. 0   :func:`safe_log`
``div``                 ``b == 0``: 0, derivatives 0          :func:`safe_div`
``log1p``               ``x <= -1``: ``log(tiny)``, deriv. 0  :func:`safe_log1p`
``integer_pow`` (n<0)   ``x == 0``: 0, derivative 0           :func:`safe_integer_pow`
``pow``                 ``x == 0, y < 0`` or ``x < 0`` with   :func:`safe_pow`
                        fractional ``y``: 0, derivatives 0
``acos``, ``asin``      ``|x| >= 1``: value at ``clip(x)``,   :func:`safe_acos`,
                        derivative 0                          :func:`safe_asin`
``atan2``               ``(0, 0)``: value 0, derivatives 0    :func:`safe_atan2`
======================  ====================================  =====================

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

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stablejax._src.numerics.ops import safe_div, safe_log, safe_rsqrt, safe_sqrt

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
_NONNEG_OPS = frozenset({"exp", "exp2", "sqrt", "abs", "logistic", "square"})


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
    if name in ("concatenate", "select_n"):
        data = f[1:] if name == "select_n" else f
        out = POS
        for g in data:
            out &= g
        return out
    return 0


# --------------------------------------------------------------------------- new safe ops


def _sing_tiny(x):
    return jnp.asarray(jnp.log(jnp.finfo(x.dtype).tiny), x.dtype)


@jax.custom_jvp
def safe_log1p(x):
    r""":math:`\log(1 + x)`, equal to ``log(tiny)`` with derivative 0 for ``x <= -1``."""
    sing = (x <= -1) & jnp.isfinite(x)
    return jnp.where(sing, _sing_tiny(x), jnp.log1p(jnp.where(sing, 0.0, x)))


@safe_log1p.defjvp
def _safe_log1p_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    sing = (x <= -1) & jnp.isfinite(x)
    coef = jnp.where(sing, 0.0, 1.0 / jnp.where(sing, 1.0, 1.0 + x))
    return safe_log1p(x), coef.astype(x.dtype) * dx


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def safe_integer_pow(x, n: int):
    r""":math:`x^n` for ``n < 0``: 0, with derivative 0, at ``x = 0``."""
    sing = x == 0
    return jnp.where(sing, 0.0, lax.integer_pow(jnp.where(sing, 1.0, x), n)).astype(x.dtype)


@safe_integer_pow.defjvp
def _safe_integer_pow_jvp(n, primals, tangents):
    r""":math:`n\,x^{n-1}`, with the same rule for :math:`x^{n-1}` (0 at ``x = 0``)."""
    (x,), (dx,) = primals, tangents
    return safe_integer_pow(x, n), (n * safe_integer_pow(x, n - 1)) * dx


def _pow_singular(x, y):
    frac = y != jnp.round(y)
    return ((x == 0) & (y < 0)) | ((x < 0) & frac & jnp.isfinite(y))


@jax.custom_jvp
def safe_pow(x, y):
    r""":math:`x^y`, 0 where it is undefined (``x = 0, y < 0``; ``x < 0``, fractional ``y``).

    .. math::
        \partial_x = y\,x^{y-1}, \qquad \partial_y = \log(x)\,x^y \ (x > 0)

    with :math:`x^{y-1}` under the same rule (0 at ``x = 0`` for ``y < 1``, the
    ``safe_sqrt`` convention) and :math:`\partial_y = 0` for ``x <= 0``.
    """
    sing = _pow_singular(x, y)
    return jnp.where(sing, 0.0, lax.pow(jnp.where(sing, 1.0, x), y)).astype(x.dtype)


@safe_pow.defjvp
def _safe_pow_jvp(primals, tangents):
    (x, y), (dx, dy) = primals, tangents
    out = safe_pow(x, y)
    sing = _pow_singular(x, y)
    cx = jnp.where(sing | (y == 0), 0.0, y * safe_pow(x, y - 1))
    pos = x > 0
    cy = jnp.where(pos, jnp.log(jnp.where(pos, x, 1.0)) * out, 0.0)
    return out, (cx * dx + cy * dy).astype(out.dtype)


def _inside(x):
    return jnp.abs(x) < 1


@jax.custom_jvp
def safe_acos(x):
    r""":math:`\arccos x`, evaluated at :math:`\mathrm{clip}(x, -1, 1)`; derivative 0 at ``|x| >= 1``."""
    return lax.acos(jnp.clip(x, -1.0, 1.0).astype(x.dtype))


@jax.custom_jvp
def safe_asin(x):
    r""":math:`\arcsin x`, evaluated at :math:`\mathrm{clip}(x, -1, 1)`; derivative 0 at ``|x| >= 1``."""
    return lax.asin(jnp.clip(x, -1.0, 1.0).astype(x.dtype))


def _arc_coef(x):
    inside = _inside(x)
    return jnp.where(inside, lax.rsqrt(jnp.where(inside, 1.0 - x * x, 1.0)), 0.0)


@safe_acos.defjvp
def _safe_acos_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return safe_acos(x), (-_arc_coef(x) * dx).astype(x.dtype)


@safe_asin.defjvp
def _safe_asin_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return safe_asin(x), (_arc_coef(x) * dx).astype(x.dtype)


@jax.custom_jvp
def safe_atan2(y, x):
    r""":math:`\mathrm{atan2}(y, x)` with derivatives 0 at the origin.

    .. math::
        \partial_y = \frac{x}{x^2 + y^2}, \qquad \partial_x = \frac{-y}{x^2 + y^2}
    """
    return lax.atan2(y, x)


@safe_atan2.defjvp
def _safe_atan2_jvp(primals, tangents):
    (y, x), (dy, dx) = primals, tangents
    r2 = x * x + y * y
    zero = r2 == 0
    inv = jnp.where(zero, 0.0, 1.0 / jnp.where(zero, 1.0, r2))
    return lax.atan2(y, x), ((x * dy - y * dx) * inv).astype(y.dtype)


# --------------------------------------------------------------------------- rule table


def _real_float(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.floating)


Rule = Callable[[dict, list, list], "Any | None"]


def _unary(op, needs: int):
    def rule(params, invals, facts):
        if facts[0] & needs == needs:
            return None
        return op(invals[0])

    return rule


def _div(params, invals, facts):
    if facts[1] & NONZERO:
        return None
    return safe_div(invals[0], invals[1])


def _integer_pow(params, invals, facts):
    n = params["y"]
    if n >= 0 or facts[0] & NONZERO:
        return None
    return safe_integer_pow(invals[0], n)


def _pow(params, invals, facts):
    x, y = invals
    if facts[0] == POS or not jnp.issubdtype(jnp.result_type(y), jnp.floating):
        return None
    if jnp.shape(x) != jnp.shape(y) or jnp.result_type(x) != jnp.result_type(y):
        return None
    return safe_pow(x, y)


def _log1p(params, invals, facts):
    return None if facts[0] & NONNEG else safe_log1p(invals[0])


RULES: dict[str, Rule] = {
    "sqrt": _unary(safe_sqrt, POS),
    "rsqrt": _unary(safe_rsqrt, POS),
    "log": _unary(safe_log, POS),
    "div": _div,
    "log1p": _log1p,
    "integer_pow": _integer_pow,
    "pow": _pow,
    "acos": _unary(safe_acos, 1 << 8),
    "asin": _unary(safe_asin, 1 << 8),
    "atan2": lambda params, invals, facts: safe_atan2(*invals),
}


def applies(name: str, out_avals: Sequence[Any]) -> bool:
    """Whether ``name`` has a safe rule for these (real floating) outputs."""
    return name in RULES and all(_real_float(a) for a in out_avals)
