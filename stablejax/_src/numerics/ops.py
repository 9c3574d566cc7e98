"""Safe element-wise numerics: sqrt, rsqrt, log and div with finite derivatives.

Each op is a ``jax.custom_jvp`` (so forward mode, reverse mode and higher
orders all work) with one contract:

1. Forward equals the ``jnp`` formula wherever that is finite, exactly.
2. The derivative equals the ``jnp`` derivative wherever that is finite and the
   input is above the op's *gradient floor*.
3. At the singular point (the edge of the domain) value and derivative are
   finite and documented; below the domain the op is clamped to it, so the
   derivative there is 0.
4. Between the singular point and the floor the derivative is evaluated at the
   floor: it stays bounded, and the forward value is untouched.
5. NaN and Inf inputs go out as ``jnp`` would produce them: a safe op never hides
   a non-finite input, it only refuses to create one.
6. Every higher derivative follows the same rule: the derivative coefficients are
   themselves ``custom_jvp`` functions (``_coef``), floored at each order, 0 at the
   singular point; each floor is raised, where needed, so that the bound it gives
   is at most ``BOUND_FRACTION`` of the largest number of the input dtype.
7. The singular point includes the subnormal numbers: XLA flushes them to zero on
   CPU and GPU, so ``safe_log(1e-40)`` is ``log(tiny)`` in and out of ``jit``.

Arithmetic happens in at least float32 and the result has the input dtype
(:mod:`stablejax._src.numerics.dtypes`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from stablejax._src import validation
from stablejax._src.numerics.dtypes import compute_dtype
from stablejax._src.typing import Array, ArrayLike

SQRT_GRAD_FLOOR = 1e-30
RSQRT_GRAD_FLOOR = 1e-12
LOG_GRAD_FLOOR = 1e-30
DIV_GRAD_FLOOR = 1e-15

# A derivative of any order is at most this fraction of the largest finite number
# of the input dtype: the floor of that order is raised until it is.
BOUND_FRACTION = 1 / 16


def _singular(x: Array) -> Array:
    """True where ``x`` is finite and below the smallest normal number (0 included).

    Subnormal inputs count as 0, in and out of ``jit``: XLA flushes them to zero
    on CPU and GPU, so any other rule would make the result depend on where it runs.
    NaN and -Inf keep jnp's result.
    """
    return (x < jnp.finfo(x.dtype).tiny) & jnp.isfinite(x)


def _prepare(name: str, x: ArrayLike, where: str) -> tuple[Array, jnp.dtype]:
    validation.check_float(name, x, where)
    x = jnp.asarray(x)
    return x.astype(compute_dtype(x.dtype)), x.dtype


def dtype_floor(c: float, p: float, dtype) -> float:
    r"""The smallest ``f`` with :math:`|c| f^p \le` ``BOUND_FRACTION * max(dtype)`` (``p < 0``)."""
    big = float(jnp.finfo(dtype).max) * BOUND_FRACTION
    return float((big / abs(c)) ** (1.0 / p)) if c else 0.0


def _floor(value: float, name: str, c: float, p: float, dtype) -> float:
    """The user's floor, raised where needed so ``|c| f**p`` is finite in ``dtype``."""
    f = validation.check_positive("grad_floor", value, name)
    return max(f, dtype_floor(c, p, dtype))


def _pow(x: Array, p: float) -> Array:
    """``x**p`` for ``x > 0`` and a negative integer or half-integer ``p`` (no exp or log)."""
    m = int(-p)  # the integer part of -p
    if m != -p:  # half-integer: x**p = rsqrt(x) / x**m
        r = jax.lax.rsqrt(x)
        return r if m == 0 else r / jax.lax.integer_pow(x, m)
    return 1.0 / jax.lax.integer_pow(x, m)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _coef(x: Array, c: float, p: float, floor: float, dtype: str) -> Array:
    r"""A derivative coefficient :math:`c\,\max(x, f)^p` for ``x > 0``, 0 at and below 0.

    It is itself a ``custom_jvp``, so the derivative rules built from it can be
    differentiated again: the derivative of this coefficient is the coefficient
    :math:`c p\,\max(x, f')^{p-1}` above ``f`` and 0 below it (where the floored
    function is constant), with the floor ``f' >= f`` of the next order raised
    until that order too is finite in ``dtype``. Every order is finite, and 0 at
    the singular point.
    """
    del dtype
    return jnp.where(_singular(x), 0.0, c * _pow(jnp.maximum(x, floor), p))


@_coef.defjvp
def _coef_jvp(c, p, floor, dtype, primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _coef(x, c, p, floor, dtype)
    nxt = max(floor, dtype_floor(c * p, p - 1, dtype))
    slope = jnp.where(_singular(x) | (x <= floor), 0.0, _coef(x, c * p, p - 1, nxt, dtype))
    return y, slope * dx


# --------------------------------------------------------------------------- sqrt


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _sqrt(x: Array, floor: float, dtype: str) -> Array:
    del floor, dtype
    return jnp.sqrt(jnp.where(_singular(x), 0.0, x).astype(x.dtype))


@_sqrt.defjvp
def _sqrt_jvp(floor, dtype, primals, tangents):
    r"""Derivative of :func:`safe_sqrt`.

    .. math::
        \frac{d}{dx}\sqrt{x} = \begin{cases}
          \tfrac{1}{2\sqrt{\max(x, f)}} & x > 0 \\ 0 & x \le 0 \end{cases}

    with ``f`` the gradient floor: the derivative is bounded by
    :math:`1 / (2\sqrt f)`, and it is 0 at the singular point ``x = 0``. The
    coefficient is built by ``_coef``, so higher derivatives are finite too.
    """
    (x,), (dx,) = primals, tangents
    y = _sqrt(x, floor, dtype)
    return y, (_coef(x, 0.5, -0.5, floor, dtype) * dx).astype(y.dtype)


def safe_sqrt(x: ArrayLike, *, grad_floor: float = SQRT_GRAD_FLOOR) -> Array:
    r"""Square root with a finite derivative at 0.

    .. math::
        \mathrm{safe\_sqrt}(x) = \sqrt{\max(x, 0)}

    Forward: :math:`\sqrt{x}` for :math:`x \ge 0`, and 0 for finite
    :math:`x < 0` (rounding noise in a variance, say, is clamped instead of
    turned into NaN). Derivative: :math:`1/(2\sqrt{x})` for :math:`x` above
    ``grad_floor``, :math:`1/(2\sqrt{\text{grad\_floor}})` between 0 and the
    floor, and 0 at and below 0, so ``safe_sqrt(x**2)`` has gradient 0 at
    ``x = 0`` (where ``jnp.sqrt`` gives NaN). NaN and Inf pass through.

    Args:
      x: floating-point array.
      grad_floor: positive number; the derivative is evaluated at
        ``max(x, grad_floor)`` for positive ``x`` (bound ``5e14`` by default).

    Inputs below the smallest normal number count as 0. In a low-precision dtype
    the floor is raised where needed so that the bound is finite there (float16:
    at most 4094); higher derivatives are finite and 0 at and below 0.

    Returns:
      An array of the dtype of ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Examples:
      >>> import jax, jax.numpy as jnp, stablejax
      >>> float(jax.grad(lambda x: stablejax.safe_sqrt(x**2))(0.0))
      0.0
      >>> float(stablejax.safe_sqrt(jnp.float32(4.0)))
      2.0
    """
    xc, dtype = _prepare("x", x, "safe_sqrt")
    name = dtype.name
    return _sqrt(xc, _floor(grad_floor, "safe_sqrt", 0.5, -0.5, name), name).astype(dtype)


# --------------------------------------------------------------------------- rsqrt


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _rsqrt(x: Array, floor: float, dtype: str) -> Array:
    del floor, dtype
    sing = _singular(x)
    return jnp.where(sing, 0.0, jax.lax.rsqrt(jnp.where(sing, 1.0, x))).astype(x.dtype)


@_rsqrt.defjvp
def _rsqrt_jvp(floor, dtype, primals, tangents):
    r"""Derivative of :func:`safe_rsqrt`.

    .. math::
        \frac{d}{dx} x^{-1/2} = \begin{cases}
          -\tfrac12 \max(x, f)^{-3/2} & x > 0 \\ 0 & x \le 0 \end{cases}
    """
    (x,), (dx,) = primals, tangents
    y = _rsqrt(x, floor, dtype)
    return y, (_coef(x, -0.5, -1.5, floor, dtype) * dx).astype(y.dtype)


def safe_rsqrt(x: ArrayLike, *, grad_floor: float = RSQRT_GRAD_FLOOR) -> Array:
    r"""Reciprocal square root that is 0, not Inf, at 0.

    .. math::
        \mathrm{safe\_rsqrt}(x) = \begin{cases} x^{-1/2} & x > 0 \\
          0 & x \le 0 \end{cases}

    The value 0 at the singular point is the pseudo-inverse convention
    (:math:`1/0 \to 0`, as in ``pinv``): ``(x - mean) * safe_rsqrt(var)`` is 0
    on a constant row instead of ``0 * inf = NaN``. The derivative is
    :math:`-\tfrac12 x^{-3/2}` above ``grad_floor``, evaluated at the floor
    between 0 and the floor, and 0 at and below 0. NaN and Inf pass through.

    Args:
      x: floating-point array.
      grad_floor: positive number bounding the derivative by
        :math:`\tfrac12 \text{grad\_floor}^{-3/2}`.

    Inputs below the smallest normal number count as 0. In a low-precision dtype
    the floor is raised where needed so that the bound is finite there (float16:
    at most 4094); higher derivatives are finite and 0 at and below 0.

    Returns:
      An array of the dtype of ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Examples:
      >>> import jax.numpy as jnp, stablejax
      >>> stablejax.safe_rsqrt(jnp.array([4.0, 0.0]))
      Array([0.5, 0. ], dtype=float32)
    """
    xc, dtype = _prepare("x", x, "safe_rsqrt")
    name = dtype.name
    floor = _floor(grad_floor, "safe_rsqrt", -0.5, -1.5, name)
    return _rsqrt(xc, floor, name).astype(dtype)


# --------------------------------------------------------------------------- log


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _log(x: Array, floor: float, dtype: str) -> Array:
    del floor, dtype
    sing = _singular(x)
    tiny = jnp.finfo(x.dtype).tiny
    return jnp.log(jnp.where(sing, tiny, x)).astype(x.dtype)


@_log.defjvp
def _log_jvp(floor, dtype, primals, tangents):
    r"""Derivative of :func:`safe_log`: :math:`1/\max(x, f)` for ``x > 0``, else 0."""
    (x,), (dx,) = primals, tangents
    y = _log(x, floor, dtype)
    return y, (_coef(x, 1.0, -1.0, floor, dtype) * dx).astype(y.dtype)


def safe_log(x: ArrayLike, *, grad_floor: float = LOG_GRAD_FLOOR) -> Array:
    r"""Natural logarithm that is finite at 0.

    .. math::
        \mathrm{safe\_log}(x) = \begin{cases} \log x & x > 0 \\
          \log(\mathrm{tiny}) & x \le 0 \end{cases}

    where ``tiny`` is the smallest normal number of the compute dtype
    (``log(tiny) = -87.34`` in float32), the value ``log`` takes at the
    smallest probability the dtype can hold. The derivative is :math:`1/x` above
    ``grad_floor``, :math:`1/\text{grad\_floor}` between 0 and the floor, and 0
    at and below 0 (the forward is constant there). NaN and +Inf pass through.

    Args:
      x: floating-point array.
      grad_floor: positive number bounding the derivative by its reciprocal.

    Inputs below the smallest normal number count as 0. In a low-precision dtype
    the floor is raised where needed so that the bound is finite there (float16:
    at most 4094); higher derivatives are finite and 0 at and below 0.

    Returns:
      An array of the dtype of ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Examples:
      >>> import jax, stablejax
      >>> round(float(stablejax.safe_log(0.0)), 2)
      -87.34
      >>> float(jax.grad(stablejax.safe_log)(0.0))
      0.0
    """
    xc, dtype = _prepare("x", x, "safe_log")
    name = dtype.name
    return _log(xc, _floor(grad_floor, "safe_log", 1.0, -1.0, name), name).astype(dtype)


# --------------------------------------------------------------------------- div


def _div_singular(a: Array, b: Array) -> Array:
    return (jnp.abs(b) < jnp.finfo(b.dtype).tiny) & jnp.isfinite(a)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _div(a: Array, b: Array, floor: float, dtype: str) -> Array:
    del floor, dtype
    sing = _div_singular(a, b)
    return jnp.where(sing, 0.0, a / jnp.where(sing, 1.0, b)).astype(a.dtype)


@_div.defjvp
def _div_jvp(floor, dtype, primals, tangents):
    r"""Derivative of :func:`safe_div`, evaluated at :math:`\tilde b`.

    .. math::
        \partial_a = 1/\tilde b, \qquad \partial_b = -a/\tilde b^2, \qquad
        \tilde b = \mathrm{sign}(b)\max(|b|, f)

    and both are 0 where ``b == 0`` (the forward is the constant 0 there).
    """
    (a, b), (da, db) = primals, tangents
    q = _div(a, b, floor, dtype)
    sing = _div_singular(a, b)
    sign = jnp.where(b < 0, -1.0, 1.0)
    inv = jnp.where(sing, 0.0, sign * _coef(jnp.abs(b), 1.0, -1.0, floor, dtype))
    # 1/b**2 as one coefficient (not inv * inv), so that each order is floored as a whole
    inv2 = jnp.where(sing, 0.0, _coef(jnp.abs(b), 1.0, -2.0, floor, dtype))
    return q, (inv * da - a * inv2 * db).astype(q.dtype)


def safe_div(a: ArrayLike, b: ArrayLike, *, grad_floor: float = DIV_GRAD_FLOOR) -> Array:
    r"""Division that gives 0, not Inf or NaN, where the divisor is 0.

    .. math::
        \mathrm{safe\_div}(a, b) = \begin{cases} a / b & b \ne 0 \\
          0 & b = 0 \end{cases}

    The value 0 at ``b = 0`` is the pseudo-inverse convention; both partial
    derivatives are 0 there. Elsewhere the derivatives are those of ``a / b``,
    evaluated at ``sign(b) * max(|b|, grad_floor)`` so they stay bounded as
    ``b`` approaches 0. A NaN or Inf in ``a`` or ``b`` passes through; a
    quotient too large for the dtype overflows as ``jnp.divide`` does.

    Args:
      a: floating-point numerator.
      b: floating-point denominator, broadcast against ``a``.
      grad_floor: positive number; the smallest ``|b|`` the derivatives see.

    A divisor below the smallest normal number counts as 0. In a low-precision
    dtype the floor is raised where needed so that ``1/b`` and ``1/b**2`` are
    bounded there; higher derivatives are finite.

    Returns:
      ``a / b`` broadcast, in the dtype ``jnp`` would give.

    Raises:
      TypeError: if ``a`` or ``b`` is not floating point.

    Examples:
      >>> import jax.numpy as jnp, stablejax
      >>> stablejax.safe_div(jnp.array([1.0, 0.0, 3.0]), jnp.array([2.0, 0.0, 0.0]))
      Array([0.5, 0. , 0. ], dtype=float32)
    """
    validation.check_float("a", a, "safe_div")
    validation.check_float("b", b, "safe_div")
    a, b = jnp.asarray(a), jnp.asarray(b)
    out_dtype = jnp.result_type(a, b)
    ct = compute_dtype(out_dtype)
    a, b = jnp.broadcast_arrays(a.astype(ct), b.astype(ct))
    name = jnp.dtype(out_dtype).name
    floor = _floor(grad_floor, "safe_div", 1.0, -1.0, name)
    floor = max(floor, dtype_floor(1.0, -2.0, name))
    return _div(a, b, floor, name).astype(out_dtype)
