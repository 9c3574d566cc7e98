"""Safe powers: ``|x|**p`` for ``0 < p < 1`` and ``x log x``, finite derivatives at 0.

``|x|**p`` with ``p < 1`` (robust losses such as the Charbonnier/Barron family
with small exponents, ``L_p`` penalties, gamma curves) has derivative
``p |x|**(p - 1)``, infinite at 0; its derivative in ``p``, ``|x|**p log|x|``,
is ``0 * -inf = NaN`` there under autodiff. ``x log x`` (the entropy of a
probability vector with zeros) is 0 at 0 but its derivative ``log x + 1`` is
``-inf``. Same contract as :mod:`stablejax._src.numerics.ops`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from stablejax._src import validation
from stablejax._src.numerics.angles import checked_floor
from stablejax._src.numerics.dtypes import compute_dtype
from stablejax._src.numerics.ops import _prepare, _singular
from stablejax._src.typing import Array, ArrayLike

POW_GRAD_FLOOR = 1e-15
XLOGX_GRAD_FLOOR = 1e-15


# --------------------------------------------------------------------------- pow


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _pow(x: Array, p: Array, floor: float) -> Array:
    del floor
    return jnp.power(jnp.abs(x), p)


@_pow.defjvp
def _pow_jvp(floor, primals, tangents):
    r"""Derivative of :func:`safe_pow`.

    .. math::
        \partial_x = \begin{cases} p\,\mathrm{sign}(x) \max(|x|, f)^{p-1} & x \ne 0 \\
          0 & x = 0 \end{cases} \qquad
        \partial_p = \begin{cases} |x|^p \log|x| & x \ne 0 \\ 0 & x = 0 \end{cases}

    :math:`\partial_p` at 0 is the limit of :math:`|x|^p \log|x|` for ``p > 0``.
    """
    (x, p), (dx, dp) = primals, tangents
    y = _pow(x, p, floor)
    zero = x == 0
    a = jnp.abs(x)
    cx = jnp.where(zero, 0.0, p * jnp.sign(x) * jnp.power(jnp.maximum(a, floor), p - 1))
    cp = jnp.where(zero, 0.0, y * jnp.log(jnp.where(zero, 1.0, a)))
    return y, (cx * dx + cp * dp).astype(y.dtype)


def _check_exponent(p: Array) -> None:
    """Raises for a concrete exponent that is not > 0 (a traced one cannot be checked)."""
    try:
        values = np.asarray(p)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if values.size and not (values > 0).all():
        bad = values[~(values > 0)].ravel()[0]
        raise ValueError(
            f"safe_pow: the exponent `p` must be > 0, got {bad!r}; |x|**p with p <= 0 is "
            f"infinite at 0. Use a positive exponent such as p=0.5."
        )


def safe_pow(x: ArrayLike, p: ArrayLike, *, grad_floor: float = POW_GRAD_FLOOR) -> Array:
    r"""``|x|**p`` for ``p > 0`` with finite derivatives at ``x = 0``.

    .. math::
        \mathrm{safe\_pow}(x, p) = |x|^p

    The forward is ``jnp.abs(x) ** p`` exactly (0 at 0). The derivative in ``x``
    is :math:`p\,\mathrm{sign}(x)|x|^{p-1}` for ``|x| >= grad_floor``, evaluated at
    the floor nearer 0 (bound :math:`p f^{p-1} \le 1/f` for ``p < 1``), and 0 at
    ``x = 0``, where ``jnp`` gives Inf for ``p < 1``. The derivative in ``p`` is
    :math:`|x|^p \log|x|`, and 0 at ``x = 0`` (``jnp`` gives NaN). ``p`` may be an
    array (broadcast against ``x``) and is differentiable. NaN and Inf pass
    through.

    Args:
      x: floating-point array.
      p: positive exponent (a number or an array); a concrete ``p <= 0`` is an
        error, a traced one is the caller's to keep positive.
      grad_floor: positive number; the smallest ``|x|`` the derivative sees
        (raised in float16 to ``5.5e-3`` so the bounds fit the dtype).

    Returns:
      ``|x|**p`` broadcast, in the dtype ``jnp.power`` gives for floating ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.
      ValueError: if a concrete ``p`` has an entry ``<= 0``.

    Examples:
      >>> import jax, stablejax
      >>> float(stablejax.safe_pow(-4.0, 0.5)), float(jax.grad(stablejax.safe_pow)(0.0, 0.5))
      (2.0, 0.0)
    """
    validation.check_float("x", x, "safe_pow")
    x = jnp.asarray(x)
    if jnp.issubdtype(jnp.result_type(p), jnp.complexfloating):
        raise TypeError(f"safe_pow: the exponent `p` must be real, got {p!r}.")
    _check_exponent(p)
    out_dtype = x.dtype
    ct = compute_dtype(out_dtype)
    x, pc = jnp.broadcast_arrays(x.astype(ct), jnp.asarray(p).astype(ct))
    floor = checked_floor(grad_floor, "safe_pow", out_dtype, power=2.0)
    return _pow(x, pc, floor).astype(out_dtype)


# --------------------------------------------------------------------------- xlogx


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _xlogx(x: Array, floor: float) -> Array:
    del floor
    sing = _singular(x)
    # log of a subnormal x may be -inf under jit on CPU (denormals flushed); the
    # smallest normal number keeps the product finite there.
    tiny = jnp.finfo(x.dtype).tiny
    return jnp.where(sing, 0.0, x * jnp.log(jnp.where(sing, 1.0, jnp.maximum(x, tiny))))


@_xlogx.defjvp
def _xlogx_jvp(floor, primals, tangents):
    r"""Derivative of :func:`safe_xlogx`: :math:`\log\max(x, f) + 1` for ``x > 0``, else 0."""
    (x,), (dx,) = primals, tangents
    y = _xlogx(x, floor)
    coef = jnp.where(_singular(x), 0.0, jnp.log(jnp.maximum(x, floor)) + 1.0)
    return y, (coef * dx).astype(y.dtype)


def safe_xlogx(x: ArrayLike, *, grad_floor: float = XLOGX_GRAD_FLOOR) -> Array:
    r"""``x log x`` with value 0 and a finite derivative at 0.

    .. math::
        \mathrm{safe\_xlogx}(x) = \begin{cases} x \log x & x > 0 \\
          0 & x \le 0 \end{cases}

    The entropy of a probability vector with zeros is ``-safe_xlogx(p).sum()``.
    Forward: ``x * log(x)`` for normal ``x > 0`` (``jax.scipy.special.xlogy(x, x)``
    there), 0 at 0 and for finite ``x < 0`` (rounding noise in a probability is
    clamped, not turned into NaN); for a subnormal ``x`` the log is taken at the
    smallest normal number (an absolute error below ``1e-39`` in float32).
    Derivative: :math:`\log x + 1` above ``grad_floor``, :math:`\log f + 1`
    (``-33.5`` by default) between 0 and the floor, and 0 at and below 0, where
    ``xlogy`` gives -Inf. NaN and +Inf pass through.

    Args:
      x: floating-point array.
      grad_floor: positive number; the smallest ``x`` the derivative sees (raised
        in float16 to ``3.1e-5``, so the second derivative ``1/x`` fits the dtype).

    Returns:
      An array of the dtype of ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Examples:
      >>> import jax, jax.numpy as jnp, stablejax
      >>> stablejax.safe_xlogx(jnp.array([0.0, 0.5, 1.0]))
      Array([ 0.       , -0.3465736,  0.       ], dtype=float32)
      >>> float(jax.grad(stablejax.safe_xlogx)(0.0))
      0.0
    """
    xc, dtype = _prepare("x", x, "safe_xlogx")
    return _xlogx(xc, checked_floor(grad_floor, "safe_xlogx", dtype)).astype(dtype)
