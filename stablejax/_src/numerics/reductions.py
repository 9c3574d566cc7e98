r"""Safe reductions: norm, normalize, var and std with finite derivatives.

The numerics core that every stablejax layer calls. Each function is a
``jax.custom_jvp``: forward mode, reverse mode, ``vmap`` and second-order
derivatives (gradient penalties) all work, and the derivative rules are written
with the double-``where`` guard so that differentiating them again stays finite.

Accuracy. Rows are rescaled by an exact power of two before squaring, so the
norm of a float32 row of ``1e30`` (whose squares overflow) or ``1e-30`` (whose
squares underflow) is computed correctly. Variances are computed two-pass around
the row's mid-range, so a constant row gives exactly 0 and a large offset does
not cancel catastrophically. No epsilon enters any forward value.

Singular points. At the zero vector (norm, normalize) or a constant row (var,
std) the value is 0 and the derivative is 0, the minimum-norm subgradient.
Near them the derivative stays bounded: for norm, var and std the derivative is
bounded by construction (:math:`\|\partial\,\mathrm{std}/\partial x\| \le 1`);
for normalize, whose true derivative grows as :math:`1/\|x\|`, the denominator
of the derivative is floored at ``grad_floor`` (the forward is not).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from stablejax._src import validation
from stablejax._src.numerics.dtypes import compute_dtype, pow2_scale
from stablejax._src.typing import Array, ArrayLike, Axis

NORMALIZE_GRAD_FLOOR = 1e-6


def _count(x: Array, mask: Array | None, axes: tuple[int, ...]) -> Array:
    if mask is None:
        return jnp.asarray(math.prod(x.shape[a] for a in axes), x.dtype)
    return jnp.sum(mask, axis=axes, keepdims=True, dtype=x.dtype)


def _valid(x: Array, mask: Array | None, fill: float = 0.0) -> Array:
    return x if mask is None else jnp.where(mask, x, fill)


def _root(ss: Array) -> Array:
    """``sqrt(ss)`` for ``ss >= 0``, written so its own derivative is 0, not Inf, at 0."""
    zero = ss == 0
    return jnp.where(zero, 0.0, jnp.sqrt(jnp.where(zero, 1.0, ss)))


def _safe_recip(r: Array) -> Array:
    """``1/r`` with 0 at ``r == 0``, written so its own derivative is finite there."""
    zero = r == 0
    return jnp.where(zero, 0.0, 1.0 / jnp.where(zero, 1.0, r))


# --------------------------------------------------------------------------- norm


def _scaled(x: Array, mask: Array | None, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Returns ``(z, s)`` with ``x = s * z`` and ``max|z|`` in ``[0.5, 4)`` per row."""
    m = jnp.max(jnp.abs(_valid(x, mask)), axis=axes, keepdims=True)
    s, inv = pow2_scale(m)
    return x * inv, s


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _norm(x: Array, axes: tuple[int, ...], keepdims: bool) -> Array:
    z, s = _scaled(x, None, axes)
    n = s * _root(jnp.sum(z * z, axis=axes, keepdims=True))
    return n if keepdims else jnp.squeeze(n, axes)


@_norm.defjvp
def _norm_jvp(axes, keepdims, primals, tangents):
    r"""Derivative of :func:`safe_norm`: :math:`d\|x\| = \langle x/\|x\|, dx\rangle`.

    At the zero vector the unit vector is replaced by 0 (the minimum-norm
    subgradient), so the derivative is 0 there. It is bounded by 1 everywhere.
    """
    (x,), (dx,) = primals, tangents
    z, s = _scaled(x, None, axes)
    r = _root(jnp.sum(z * z, axis=axes, keepdims=True))
    n = s * r
    unit = z * _safe_recip(r)
    dn = jnp.sum(unit * dx, axis=axes, keepdims=True)
    if not keepdims:
        n, dn = jnp.squeeze(n, axes), jnp.squeeze(dn, axes)
    return n, dn


# --------------------------------------------------------------------------- normalize


def _unit_parts(x: Array, mask: Array | None, axes: tuple[int, ...], mean: bool):
    """Returns ``(y, norm)``: ``y = x / norm`` (0 where ``norm == 0``) over the valid entries.

    ``norm`` is the Euclidean norm over the valid entries of each row, or their
    root-mean-square when ``mean`` is true. ``y`` is computed for every entry,
    masked ones too, with the statistics of the valid ones.
    """
    z, s = _scaled(x, mask, axes)
    zv = _valid(z, mask)
    ss = jnp.sum(zv * zv, axis=axes, keepdims=True)
    if mean:
        ss = ss / jnp.maximum(_count(x, mask, axes), 1.0)
    r = _root(ss)
    return z * _safe_recip(r), s * r


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _unit(x: Array, mask: Array | None, axes: tuple[int, ...], mean: bool, floor: float):
    del floor
    return _unit_parts(x, mask, axes, mean)[0]


@_unit.defjvp
def _unit_jvp(axes, mean, floor, primals, tangents):
    r"""Derivative of ``y = x / N(x)`` with a floored denominator.

    .. math::
        dy = \frac{dx - y\,\langle y, dx\rangle_v / c}{\max(N, f)}

    where :math:`\langle\cdot,\cdot\rangle_v` sums over the valid entries,
    ``c`` is 1 (norm) or their count (root-mean-square), and ``f`` the floor.
    At ``N = 0`` the derivative is 0.
    """
    x, mask = primals
    dx = tangents[0]
    y, n = _unit_parts(x, mask, axes, mean)
    proj = jnp.sum(_valid(y * dx, mask), axis=axes, keepdims=True)
    if mean:
        proj = proj / jnp.maximum(_count(x, mask, axes), 1.0)
    coef = jnp.where(n == 0, 0.0, 1.0 / jnp.maximum(n, floor))
    return y, coef * (dx - y * proj)


def unit(x: Array, mask: Array | None, axes: tuple[int, ...], *, mean: bool, floor: float):
    """Core of :func:`safe_normalize` and of the layers at ``epsilon=0`` (compute dtype in)."""
    return _unit(x, mask, axes, mean, floor)


# --------------------------------------------------------------------------- moments


def _moment_parts(x: Array, mask: Array | None, axes: tuple[int, ...]):
    """Shifted, rescaled two-pass moments.

    Returns ``(mean, var_z, dz, s, count)`` with ``x - mean = s * dz`` on the
    valid entries (0 elsewhere) and ``var = s**2 * var_z``.
    """
    count = _count(x, mask, axes)
    hi = jnp.max(_valid(x, mask, -jnp.inf), axis=axes, keepdims=True)
    lo = jnp.min(_valid(x, mask, jnp.inf), axis=axes, keepdims=True)
    empty = count == 0
    mid = jnp.where(empty, 0.0, 0.5 * hi + 0.5 * lo)
    s, inv = pow2_scale(jnp.where(empty, 0.0, 0.5 * hi - 0.5 * lo))
    z = _valid((x - mid) * inv, mask)
    denom = jnp.maximum(count, 1.0)
    mean_z = jnp.sum(z, axis=axes, keepdims=True) / denom
    dz = _valid(z - mean_z, mask)
    var_z = jnp.sum(dz * dz, axis=axes, keepdims=True) / denom
    return mid + s * mean_z, var_z, dz, s, count


def _squeeze(keepdims: bool, axes: tuple[int, ...], *xs: Array):
    return xs if keepdims else tuple(jnp.squeeze(v, axes) for v in xs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _mean_spread(x: Array, mask: Array | None, axes, keepdims: bool, std: bool):
    mean, var_z, _, s, _ = _moment_parts(x, mask, axes)
    spread = s * _root(var_z) if std else (s * s) * var_z
    return _squeeze(keepdims, axes, mean, spread)


@_mean_spread.defjvp
def _mean_spread_jvp(axes, keepdims, std, primals, tangents):
    r"""Derivatives of the mean and of the variance or standard deviation.

    .. math::
        d\mu = \tfrac1c \textstyle\sum_v dx_i, \quad
        d\sigma^2 = \tfrac2c \sum_v (x_i - \mu)\,dx_i, \quad
        d\sigma = \frac{\sum_v (x_i - \mu)\,dx_i}{c\,\sigma}

    with ``c`` the count of valid entries. The last is bounded, since
    :math:`|x_i - \mu| \le \sqrt{c}\,\sigma`, and it is 0 on a constant row.
    """
    x, mask = primals
    dx = _valid(tangents[0], mask)
    mean, var_z, dz, s, count = _moment_parts(x, mask, axes)
    denom = jnp.maximum(count, 1.0)
    dmean = jnp.sum(dx, axis=axes, keepdims=True) / denom
    inner = jnp.sum(dz * dx, axis=axes, keepdims=True) / denom
    if std:
        root = _root(var_z)
        spread = s * root
        dspread = inner * _safe_recip(root)
    else:
        spread = (s * s) * var_z
        dspread = 2.0 * s * inner
    return _squeeze(keepdims, axes, mean, spread), _squeeze(keepdims, axes, dmean, dspread)


def mean_spread(x: Array, mask: Array | None, axes: tuple[int, ...], keepdims: bool, std: bool):
    """Core of :func:`safe_var`, :func:`safe_std` and ``StdPool`` (compute dtype in)."""
    return _mean_spread(x, mask, axes, keepdims, std)


# --------------------------------------------------------------------------- public


def _prepare(name: str, x: ArrayLike, axis: Axis, where: ArrayLike | None):
    validation.check_float("x", x, name)
    x = jnp.asarray(x)
    axes = validation.canonical_axes(x.ndim, axis, name)
    mask = validation.broadcast_mask(where, x.shape, name)
    return x.astype(compute_dtype(x.dtype)), x.dtype, axes, mask


def safe_norm(x: ArrayLike, axis: Axis = None, keepdims: bool = False) -> Array:
    r"""Euclidean norm with gradient 0 at the zero vector.

    .. math::
        \|x\| = \sqrt{\textstyle\sum_i x_i^2}, \qquad
        \nabla\|x\| = \begin{cases} x/\|x\| & x \ne 0 \\ 0 & x = 0 \end{cases}

    The forward is exact (no epsilon) and overflow-free: rows are rescaled by a
    power of two before squaring. The gradient is a unit vector (or 0), bounded
    by 1 everywhere. ``jnp.linalg.norm`` has gradient NaN at 0.

    Args:
      x: floating-point array.
      axis: int, tuple of ints, or None for all axes.
      keepdims: keep the reduced axes with size 1.

    Returns:
      The norm, in the dtype of ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.
      ValueError: if an axis is out of range.

    Examples:
      >>> import jax, jax.numpy as jnp, stablejax
      >>> jax.grad(stablejax.safe_norm)(jnp.zeros(3))
      Array([0., 0., 0.], dtype=float32)
      >>> stablejax.safe_norm(jnp.array([3e30, 4e30]))  # jnp.linalg.norm gives inf
      Array(5.e+30, dtype=float32)
    """
    xc, dtype, axes, _ = _prepare("safe_norm", x, axis, None)
    return _norm(xc, axes, bool(keepdims)).astype(dtype)


def safe_normalize(
    x: ArrayLike, axis: Axis = -1, *, grad_floor: float = NORMALIZE_GRAD_FLOOR
) -> Array:
    r"""``x / ||x||`` that is 0, with gradient 0, at the zero vector.

    .. math::
        y = \frac{x}{\|x\|}, \qquad
        \frac{\partial y}{\partial x} = \frac{I - y y^\top}{\max(\|x\|, f)}

    The forward is exact (no epsilon) wherever ``x != 0``; at ``x = 0`` it is 0
    and so is the derivative. The derivative's denominator is floored at
    ``f = grad_floor`` in the backward pass only, which bounds it by
    ``1/grad_floor`` for nearly zero vectors.

    Args:
      x: floating-point array.
      axis: int, tuple of ints, or None: the axes the norm runs over.
      grad_floor: positive floor of the norm in the derivative.

    Returns:
      An array shaped and typed like ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.
      ValueError: if an axis is out of range or ``grad_floor <= 0``.

    Examples:
      >>> import jax.numpy as jnp, stablejax
      >>> stablejax.safe_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]]))
      Array([[0.6, 0.8],
             [0. , 0. ]], dtype=float32)
    """
    xc, dtype, axes, _ = _prepare("safe_normalize", x, axis, None)
    floor = validation.check_positive("grad_floor", grad_floor, "safe_normalize")
    return unit(xc, None, axes, mean=False, floor=floor).astype(dtype)


def safe_var(
    x: ArrayLike, axis: Axis = None, keepdims: bool = False, where: ArrayLike | None = None
) -> Array:
    r"""Variance, computed stably, with a ``where`` mask that never gives NaN.

    .. math::
        \sigma^2 = \tfrac1c \textstyle\sum_{i \in v} (x_i - \mu)^2, \qquad
        \partial \sigma^2 / \partial x_i = \tfrac2c (x_i - \mu)

    over the ``c`` valid entries ``v``. Two-pass around the row's mid-range: a
    constant row gives exactly 0 with gradient 0, a fully masked row gives 0,
    and NaN in masked-out slots is ignored. The variance of a row whose spread
    exceeds the square root of the dtype's largest number overflows to Inf, as
    the true value is not representable; use :func:`safe_std` for such rows.

    Args:
      x: floating-point array.
      axis: int, tuple of ints, or None for all axes.
      keepdims: keep the reduced axes with size 1.
      where: optional boolean mask broadcastable to ``x``; True marks valid entries.

    Returns:
      The variance, in the dtype of ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.
      ValueError: if an axis is out of range or ``where`` does not broadcast.

    Examples:
      >>> import jax.numpy as jnp, stablejax
      >>> float(stablejax.safe_var(jnp.array([1.0, 3.0, 99.0]), where=jnp.array([1, 1, 0])))
      1.0
    """
    xc, dtype, axes, mask = _prepare("safe_var", x, axis, where)
    return mean_spread(xc, mask, axes, bool(keepdims), False)[1].astype(dtype)


def safe_std(
    x: ArrayLike, axis: Axis = None, keepdims: bool = False, where: ArrayLike | None = None
) -> Array:
    r"""Standard deviation whose gradient is finite, and 0, on a constant input.

    .. math::
        \sigma = \sqrt{\tfrac1c \textstyle\sum_{i \in v} (x_i - \mu)^2}, \qquad
        \frac{\partial\sigma}{\partial x_i} = \begin{cases}
          \frac{x_i - \mu}{c\,\sigma} & \sigma > 0 \\ 0 & \sigma = 0 \end{cases}

    ``jnp.std`` has gradient NaN on a constant input (``d sqrt`` at 0 times 0);
    ``sqrt(var + eps)`` is finite but biased (3.3x too large at std 1e-3 with
    eps 1e-5). This is exact: ``safe_std`` of data with std 1e-6 is 1e-6. The
    gradient is bounded by construction (each entry by :math:`1/\sqrt c`), so a
    nearly constant input cannot blow it up. Rows of ``1e30`` or ``1e-30``
    (float32) are rescaled by a power of two and stay exact.

    Args:
      x: floating-point array.
      axis: int, tuple of ints, or None for all axes.
      keepdims: keep the reduced axes with size 1.
      where: optional boolean mask broadcastable to ``x``; True marks valid
        entries. A fully masked row gives 0.

    Returns:
      The standard deviation, in the dtype of ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.
      ValueError: if an axis is out of range or ``where`` does not broadcast.

    Examples:
      >>> import jax, jax.numpy as jnp, stablejax
      >>> jax.grad(stablejax.safe_std)(jnp.ones(3))
      Array([0., 0., 0.], dtype=float32)
      >>> stablejax.safe_std(jnp.array([1.0, -1.0]) * 1e-6)
      Array(1.e-06, dtype=float32)
    """
    xc, dtype, axes, mask = _prepare("safe_std", x, axis, where)
    return mean_spread(xc, mask, axes, bool(keepdims), True)[1].astype(dtype)
