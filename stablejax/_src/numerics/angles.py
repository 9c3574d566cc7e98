"""Safe angles: arctan2 at the origin, arccos and arcsin at +-1.

Angular and margin losses (ArcFace, CosFace, angular triplet) take
``arccos`` of a cosine similarity, which reaches exactly 1 for a feature aligned
with its class weight and can round past it; ``jnp.arccos`` then gives NaN
forward (``|x| > 1``) or an infinite derivative (``|x| = 1``). Polar coordinates
and rotation losses take ``arctan2(y, x)``, whose derivative is ``0/0`` at the
origin. Same contract as :mod:`stablejax._src.numerics.ops`: exact forward wherever
``jnp``'s is finite, derivative equal to ``jnp``'s above a floor, 0 at the
singular point, NaN and Inf passed through.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from stablejax._src import validation
from stablejax._src.numerics.dtypes import compute_dtype
from stablejax._src.numerics.ops import BOUND_FRACTION, _floor, _prepare
from stablejax._src.typing import Array, ArrayLike

ATAN2_GRAD_FLOOR = 1e-15
ACOS_GRAD_FLOOR = 1e-20


def checked_floor(value: float, where: str, dtype, power: float = 1.0) -> float:
    r"""The user's ``grad_floor`` (a positive number), raised so that a derivative
    bounded by ``floor**-power`` is at most half the largest number of ``dtype``.

    Derivatives are computed in float32 and cast to the input dtype on the way
    back; in float16 (largest value 65504) a float32 bound such as ``1e15`` would
    become Inf. ``power`` is that of the second derivative (so gradient penalties
    stay finite too); nothing changes for float32, bfloat16 and float64. The
    arithmetic is :func:`stablejax._src.numerics.ops.dtype_floor`'s, with the
    bound ``2 * BOUND_FRACTION * floor**-power <= BOUND_FRACTION * max``.
    """
    return _floor(value, where, 2.0 * BOUND_FRACTION, -power, dtype)


# --------------------------------------------------------------------------- arctan2


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _arctan2(y: Array, x: Array, floor: float) -> Array:
    del floor
    return jnp.arctan2(y, x)


@_arctan2.defjvp
def _arctan2_jvp(floor, primals, tangents):
    r"""Derivative of :func:`safe_arctan2`.

    .. math::
        \partial_y = \frac{x}{\tilde r^2}, \qquad \partial_x = -\frac{y}{\tilde r^2},
        \qquad \tilde r = \begin{cases} \sqrt{x^2 + y^2} & \max(|x|, |y|) \ge f \\
          f & \text{otherwise} \end{cases}

    so both are 0 at the origin and bounded by :math:`1/f` near it. :math:`\tilde r`
    is computed as ``hypot`` (no overflow or underflow in :math:`x^2 + y^2`).
    """
    (y, x), (dy, dx) = primals, tangents
    out = _arctan2(y, x, floor)
    small = jnp.maximum(jnp.abs(x), jnp.abs(y)) < floor
    r = jnp.where(small, floor, jnp.hypot(jnp.where(small, floor, x), jnp.where(small, 0.0, y)))
    cy, cx = (x / r) / r, ((0.0 - y) / r) / r  # 0 - y: +0, not -0, at the origin
    return out, (cy * dy + cx * dx).astype(out.dtype)


def safe_arctan2(y: ArrayLike, x: ArrayLike, *, grad_floor: float = ATAN2_GRAD_FLOOR) -> Array:
    r"""``arctan2(y, x)`` with a finite derivative at the origin.

    .. math::
        \mathrm{safe\_arctan2}(y, x) = \operatorname{atan2}(y, x)

    The forward is ``jnp.arctan2`` everywhere (0 at the origin, with its signed
    zero rules). The derivatives :math:`x/r^2` and :math:`-y/r^2` are ``jnp``'s
    where ``max(|x|, |y|) >= grad_floor``; nearer the origin ``r`` is replaced by
    the floor, so they are bounded by ``1/grad_floor`` and are exactly 0 at the
    origin, where ``jnp.arctan2`` gives NaN. NaN passes through.

    Args:
      y: floating-point array, the ordinate.
      x: floating-point array, the abscissa, broadcast against ``y``.
      grad_floor: positive number; the smallest radius the derivatives see
        (raised in float16 to ``5.5e-3`` so the bounds fit the dtype).

    Returns:
      The angle in ``[-pi, pi]``, in the dtype ``jnp.arctan2`` gives.

    Raises:
      TypeError: if ``y`` or ``x`` is not floating point.

    Examples:
      >>> import jax, stablejax
      >>> jax.grad(stablejax.safe_arctan2, argnums=(0, 1))(0.0, 0.0)
      (Array(0., dtype=float32, weak_type=True), Array(0., dtype=float32, weak_type=True))
    """
    validation.check_float("y", y, "safe_arctan2")
    validation.check_float("x", x, "safe_arctan2")
    y, x = jnp.asarray(y), jnp.asarray(x)
    out_dtype = jnp.result_type(y, x)
    ct = compute_dtype(out_dtype)
    y, x = jnp.broadcast_arrays(y.astype(ct), x.astype(ct))
    floor = checked_floor(grad_floor, "safe_arctan2", out_dtype, power=2.0)
    return _arctan2(y, x, floor).astype(out_dtype)


# --------------------------------------------------------------------------- arccos / arcsin


def _clamp_unit(x: Array) -> Array:
    """Clamps finite ``x`` to ``[-1, 1]``; NaN and Inf stay (jnp gives NaN for them)."""
    return jnp.where(jnp.isfinite(x), jnp.clip(x, -1.0, 1.0), x)


def _unit_coef(x: Array, floor: float, sign: float) -> Array:
    r"""``sign/sqrt(max(1 - x^2, f))`` inside ``(-1, 1)``, 0 at and beyond +-1, NaN for NaN."""
    edge = jnp.isfinite(x) & (jnp.abs(x) >= 1)
    w = (1.0 - x) * (1.0 + x)  # exact near +-1, unlike 1 - x*x
    return jnp.where(edge, 0.0, sign * jax.lax.rsqrt(jnp.maximum(w, floor)))


def _unit_angle(fn, sign: float):
    r"""``fn`` (``jnp.arccos`` or ``jnp.arcsin``) on the clamped input, as a ``custom_jvp``.

    .. math::
        \frac{d}{dx}\arccos x = -\frac{d}{dx}\arcsin x = \begin{cases}
          -1/\sqrt{\max(1 - x^2, f)} & |x| < 1 \\ 0 & |x| \ge 1 \end{cases}

    ``sign`` is that of the derivative: -1 for ``arccos``, +1 for ``arcsin``.
    """

    @functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
    def angle(x: Array, floor: float) -> Array:
        del floor
        return fn(_clamp_unit(x))

    @angle.defjvp
    def angle_jvp(floor, primals, tangents):
        (x,), (dx,) = primals, tangents
        y = angle(x, floor)
        return y, (_unit_coef(x, floor, sign) * dx).astype(y.dtype)

    return angle


_arccos = _unit_angle(jnp.arccos, -1.0)
_arcsin = _unit_angle(jnp.arcsin, 1.0)


def safe_arccos(x: ArrayLike, *, grad_floor: float = ACOS_GRAD_FLOOR) -> Array:
    r"""``arccos`` with a finite derivative at +-1, clamped beyond them.

    .. math::
        \mathrm{safe\_arccos}(x) = \arccos(\min(\max(x, -1), 1))

    Forward: ``jnp.arccos(x)`` on ``[-1, 1]``; a finite ``x`` past +-1 (a cosine
    similarity that rounded to ``1.0000001``) gives ``arccos(+-1)`` (0 or
    :math:`\pi`) instead of NaN. Derivative: :math:`-1/\sqrt{1 - x^2}` inside,
    evaluated at ``max(1 - x^2, grad_floor)`` (bound ``1e10`` by default; in
    float32 the floor never acts, since ``1 - x^2 >= 1.2e-7`` for ``|x| < 1``), and
    0 at and beyond +-1, where ``jnp.arccos`` gives -Inf or NaN. NaN and Inf pass
    through as NaN, as in ``jnp``.

    Args:
      x: floating-point array.
      grad_floor: positive number; the smallest ``1 - x**2`` the derivative sees.

    Returns:
      An array of the dtype of ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Examples:
      >>> import jax, stablejax
      >>> float(stablejax.safe_arccos(1.0000001)), float(jax.grad(stablejax.safe_arccos)(1.0))
      (0.0, 0.0)
    """
    xc, dtype = _prepare("x", x, "safe_arccos")
    floor = checked_floor(grad_floor, "safe_arccos", dtype, power=1.5)
    return _arccos(xc, floor).astype(dtype)


def safe_arcsin(x: ArrayLike, *, grad_floor: float = ACOS_GRAD_FLOOR) -> Array:
    r"""``arcsin`` with a finite derivative at +-1, clamped beyond them.

    .. math::
        \mathrm{safe\_arcsin}(x) = \arcsin(\min(\max(x, -1), 1))

    As :func:`safe_arccos`: exact on ``[-1, 1]``, :math:`\pm\pi/2` past +-1,
    derivative :math:`1/\sqrt{\max(1 - x^2, f)}` inside and 0 at and beyond +-1.

    Args:
      x: floating-point array.
      grad_floor: positive number; the smallest ``1 - x**2`` the derivative sees.

    Returns:
      An array of the dtype of ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Examples:
      >>> import jax, stablejax
      >>> float(jax.grad(stablejax.safe_arcsin)(-1.0))
      0.0
    """
    xc, dtype = _prepare("x", x, "safe_arcsin")
    floor = checked_floor(grad_floor, "safe_arcsin", dtype, power=1.5)
    return _arcsin(xc, floor).astype(dtype)
