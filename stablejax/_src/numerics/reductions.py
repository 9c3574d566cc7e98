r"""Safe reductions: norm, normalize, var and std with finite derivatives.

The numerics core that every stablejax layer calls. Each function is a
``jax.custom_jvp``: forward mode, reverse mode, ``vmap`` and second-order
derivatives (gradient penalties) all work, and the derivative rules are written
with the double-``where`` guard so that differentiating them again stays finite.

Accuracy. The plain two-pass statistics are taken first; where some row's sum
of squares overflows, underflows, or (for variances) the row is so nearly
constant that the rounding of its mean would show, the batch is recomputed with
each row rescaled by an exact power of two around its mid-range (``lax.cond``,
so this pass is paid only then). The norm of a float32 row of ``1e30`` (whose
squares overflow), ``1e-30`` (whose squares underflow) or of entries up to the
dtype's largest number is computed correctly, a constant row gives exactly 0,
and a large offset does not cancel catastrophically. No epsilon enters any
forward value. Inputs below the smallest normal number count as 0 for the
derivatives (XLA flushes them to zero on CPU and GPU). Unmasked variances and
standard deviations take another route to the same contract, with no
``lax.cond``: :mod:`stablejax._src.numerics.fused`.

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
from stablejax._src.numerics.fused import band_mean_spread
from stablejax._src.numerics.ops import _coef, dtype_floor
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


def _exact_floor(x: Array, axes: tuple[int, ...]) -> float:
    """The smallest sum of ``n`` squares that the plain formula computes as exactly as
    the rescaled one: every square it could lose to underflow is below one rounding."""
    info = jnp.finfo(x.dtype)
    n = math.prod(x.shape[a] for a in axes)
    return float(info.tiny) * 2.0 ** (info.nmant + 1) * max(n, 1)


def _ones(like: Array) -> Array:
    return jnp.ones_like(like)


# --------------------------------------------------------------------------- norm


def _norm_stats(x: Array, mask: Array | None, axes: tuple[int, ...], mean: bool):
    """Returns ``(inv, s, ss)`` per row: ``z = x * inv``, ``norm = s * sqrt(ss)``.

    The plain sum of squares is taken first. Only when some row's sum is not
    finite (an entry near the dtype's largest number) or so small that a square
    could have underflowed (zero rows included) is the batch recomputed with the
    exact power-of-two rescaling (``lax.cond``: the second pass is paid only then).
    Where both are computed they agree bit for bit: scaling by a power of two is exact.
    """
    xv = _valid(x, mask)
    ss = jnp.sum(xv * xv, axis=axes, keepdims=True)
    ok = jnp.all(jnp.isfinite(ss) & (ss >= _exact_floor(x, axes)))
    count = jnp.maximum(_count(x, mask, axes), 1.0) if mean else None

    def plain():
        return _ones(ss), _ones(ss), ss

    def rescaled():
        m = jnp.max(jnp.abs(xv), axis=axes, keepdims=True, initial=0.0)
        s, inv = pow2_scale(m)
        zv = xv * inv
        return inv, s, jnp.sum(zv * zv, axis=axes, keepdims=True)

    inv, s, ssz = jax.lax.cond(ok, plain, rescaled)
    if mean:
        ssz = ssz / count
    return inv, s, ssz


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _norm(x: Array, axes: tuple[int, ...], keepdims: bool) -> Array:
    _, s, ss = _norm_stats(x, None, axes, False)
    n = s * _root(ss)
    return n if keepdims else jnp.squeeze(n, axes)


@_norm.defjvp
def _norm_jvp(axes, keepdims, primals, tangents):
    r"""Derivative of :func:`safe_norm`: :math:`d\|x\| = \langle x/\|x\|, dx\rangle`.

    At the zero vector the unit vector is replaced by 0 (the minimum-norm
    subgradient), so the derivative is 0 there. It is bounded by 1 everywhere.
    """
    (x,), (dx,) = primals, tangents
    inv, s, ss = _norm_stats(x, None, axes, False)
    r = _root(ss)
    n = s * r
    unit = (x * inv) * _safe_recip(r)
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
    inv, s, ss = _norm_stats(x, mask, axes, mean)
    r = _root(ss)
    return (x * inv) * _safe_recip(r), s * r


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _unit(x: Array, mask, axes: tuple[int, ...], mean: bool, floor: float, dtype: str):
    """Returns ``(y, N)``: the unit vector and the norm (or root-mean-square)."""
    del floor, dtype
    return _unit_parts(x, mask, axes, mean)


@_unit.defjvp
def _unit_jvp(axes, mean, floor, dtype, primals, tangents):
    r"""Derivative of ``y = x / N(x)`` with a floored denominator, and of ``N``.

    .. math::
        dy = \frac{dx - y\,\langle y, dx\rangle_v / c}{\max(N, f)}, \qquad
        dN = \langle y, dx\rangle_v / c

    where :math:`\langle\cdot,\cdot\rangle_v` sums over the valid entries,
    ``c`` is 1 (norm) or their count (root-mean-square), and ``f`` the floor.
    At ``N = 0`` the derivative is 0. ``y``, ``N`` and the coefficient
    :math:`1/\max(N, f)` are computed by floored ops themselves (this one, and
    ``_coef``), so differentiating this rule again is floored in turn.
    """
    x, mask = primals
    dx = tangents[0]
    y, n = _unit(x, mask, axes, mean, floor, dtype)
    proj = jnp.sum(_valid(y * dx, mask), axis=axes, keepdims=True)
    if mean:
        proj = proj / jnp.maximum(_count(x, mask, axes), 1.0)
    return (y, n), (_coef(n, 1.0, -1.0, floor, dtype) * (dx - y * proj), proj)


def unit(x: Array, mask: Array | None, axes: tuple[int, ...], *, mean: bool, floor: float,
         dtype: str | None = None):
    """Core of :func:`safe_normalize` and of the layers at ``epsilon=0`` (compute dtype in).

    ``dtype`` (the output dtype, default ``x``'s) raises ``floor`` where needed so
    that the derivative bounds ``2/floor`` and, one order up, ``8/floor**2`` are
    finite in it.
    """
    dtype = jnp.dtype(x.dtype if dtype is None else dtype).name
    return _unit(x, mask, axes, mean, _layer_floor(floor, dtype), dtype)[0]


def _layer_floor(floor: float, dtype: str) -> float:
    return max(floor, dtype_floor(2.0, -1.0, dtype), dtype_floor(8.0, -2.0, dtype))


# --------------------------------------------------------------------------- moments

# A row whose standard deviation is below this many roundings of its mean is
# nearly constant: the rounding of the plain mean would show in its variance.
_NEAR_CONSTANT = 4096.0


def _moment_parts(x: Array, mask: Array | None, axes: tuple[int, ...]):
    """Two-pass moments, rescaled only where needed.

    Returns ``(center, inv, s, mean_z, var_z, count)``: on the valid entries
    ``z = (x - center) * inv`` has mean ``mean_z`` and variance ``var_z``, so
    ``mean = center + s * mean_z`` and ``var = s * (s * var_z)``.

    The plain two-pass moments (``center = mean``, ``s = 1``) are taken first;
    the batch is recomputed around each row's mid-range with a power-of-two
    rescaling (``lax.cond``) only when some row overflows or underflows, or is
    so nearly constant that the rounding of its mean would show in its variance
    (a constant row then gives exactly 0). The mid-range is taken as
    ``lo + (hi - lo)/2`` for rows of one sign and ``(hi + lo)/2`` otherwise, so
    neither sum can overflow.
    """
    count = _count(x, mask, axes)
    denom = jnp.maximum(count, 1.0)
    xv = _valid(x, mask)
    mean = jnp.sum(xv, axis=axes, keepdims=True) / denom
    d = _valid(x - mean, mask)
    # An overflowed mean makes d infinite; zeroed (the rescaled branch is taken then) so
    # that the zero cotangent of the branch not taken cannot turn into inf * 0 = NaN.
    d = jnp.where(jnp.isfinite(d), d, 0.0)
    ssd = jnp.sum(d * d, axis=axes, keepdims=True)
    var = ssd / denom
    eps = float(jnp.finfo(x.dtype).eps) * _NEAR_CONSTANT
    ok = jnp.isfinite(ssd) & (ssd >= _exact_floor(x, axes)) & jnp.isfinite(mean)
    ok = ok & (var > eps * eps * (mean * mean))
    ok = jnp.all(ok)

    def plain():
        return mean, _ones(mean), _ones(mean), jnp.zeros_like(mean), var

    def rescaled():
        hi = jnp.max(_valid(x, mask, -jnp.inf), axis=axes, keepdims=True, initial=-jnp.inf)
        lo = jnp.min(_valid(x, mask, jnp.inf), axis=axes, keepdims=True, initial=jnp.inf)
        empty = count == 0
        same_sign = (hi >= 0) == (lo >= 0)
        mid = jnp.where(same_sign, lo + (hi - lo) * 0.5, (hi + lo) * 0.5)
        mid = jnp.where(empty, 0.0, mid)
        s, inv = pow2_scale(jnp.where(empty, 0.0, hi - mid))
        z = _valid((x - mid) * inv, mask)
        mean_z = jnp.sum(z, axis=axes, keepdims=True) / denom
        dz = _valid(z - mean_z, mask)
        return mid, inv, s, mean_z, jnp.sum(dz * dz, axis=axes, keepdims=True) / denom

    center, inv, s, mean_z, var_z = jax.lax.cond(ok, plain, rescaled)
    return center, inv, s, mean_z, var_z, count


def _centred(x: Array, mask: Array | None, center, inv, mean_z) -> Array:
    """``(x - mean) / s`` on every entry (0 on masked ones when ``mask`` is given)."""
    return _valid((x - center) * inv - mean_z, mask)


def _squeeze(keepdims: bool, axes: tuple[int, ...], *xs: Array):
    return xs if keepdims else tuple(jnp.squeeze(v, axes) for v in xs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _mean_spread(x: Array, mask: Array | None, axes, keepdims: bool, std: bool):
    center, _, s, mean_z, var_z, _ = _moment_parts(x, mask, axes)
    spread = s * _root(var_z) if std else s * (s * var_z)
    return _squeeze(keepdims, axes, center + s * mean_z, spread)


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
    center, inv, s, mean_z, var_z, count = _moment_parts(x, mask, axes)
    dz = _centred(x, mask, center, inv, mean_z)
    denom = jnp.maximum(count, 1.0)
    mean = center + s * mean_z
    dmean = jnp.sum(dx, axis=axes, keepdims=True) / denom
    inner = jnp.sum(dz * dx, axis=axes, keepdims=True) / denom
    if std:
        root = _root(var_z)
        spread = s * root
        dspread = inner * _safe_recip(root)
    else:
        spread = s * (s * var_z)
        dspread = 2.0 * s * inner
    return _squeeze(keepdims, axes, mean, spread), _squeeze(keepdims, axes, dmean, dspread)


def mean_spread(x: Array, mask: Array | None, axes: tuple[int, ...], keepdims: bool, std: bool):
    """Core of :func:`safe_var`, :func:`safe_std` and ``StdPool`` (input dtype in).

    Without a mask the moments come from one fused pass
    (:func:`stablejax._src.numerics.fused.band_mean_spread`, which upcasts inside);
    with one, from the two-pass moments rescaled where needed (:func:`_moment_parts`),
    in the compute dtype. The results are in the compute dtype.
    """
    if mask is None and math.prod(x.shape[a] for a in axes) > 0:
        return band_mean_spread(x, axes, keepdims, std)
    return _mean_spread(x.astype(compute_dtype(x.dtype)), mask, axes, keepdims, std)


# --------------------------------------------------------------------------- standardize


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _standardize(x: Array, mask: Array | None, axes, floor: float, dtype: str):
    """Returns ``(y, sigma)``: the standardized row and its standard deviation."""
    del floor, dtype
    center, inv, s, mean_z, var_z, _ = _moment_parts(x, mask, axes)
    r = _root(var_z)
    return ((x - center) * inv - mean_z) * _safe_recip(r), s * r


@_standardize.defjvp
def _standardize_jvp(axes, floor, dtype, primals, tangents):
    r"""Derivative of :math:`y = (x - \mu)/\sigma` with a floored denominator, and of σ.

    .. math::
        dy = \frac{dx - \overline{dx}_v - y\,\overline{y\,dx}_v}{\max(\sigma, f)},
        \qquad d\sigma = \overline{y\,dx}_v

    (means over the valid entries); 0 on a constant row. ``y`` and σ come from
    this op itself, so differentiating the rule again is floored in turn.
    """
    x, mask = primals
    dx = tangents[0]
    y, sigma = _standardize(x, mask, axes, floor, dtype)
    denom = jnp.maximum(_count(x, mask, axes), 1.0)
    dmean = jnp.sum(_valid(dx, mask), axis=axes, keepdims=True) / denom
    proj = jnp.sum(_valid(y * dx, mask), axis=axes, keepdims=True) / denom
    dy = _coef(sigma, 1.0, -1.0, floor, dtype) * (dx - dmean - y * proj)
    return (y, sigma), (dy, proj)


def standardize(x: Array, mask: Array | None, axes: tuple[int, ...], *, floor: float,
                dtype: str | None = None) -> Array:
    """``(x - mean) / std`` over ``axes`` with no epsilon: the layers at ``epsilon=0``.

    One pass of statistics (the plain two-pass moments, rescaled only where a row
    needs it); a constant row gives 0 with gradient 0.
    """
    dtype = jnp.dtype(x.dtype if dtype is None else dtype).name
    return _standardize(x, mask, axes, _layer_floor(floor, dtype), dtype)[0]


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
    return _norm(xc, axes, validation.check_keepdims(keepdims, "safe_norm")).astype(dtype)


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
    return unit(xc, None, axes, mean=False, floor=floor, dtype=dtype).astype(dtype)


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
    _, dtype, axes, mask = _prepare("safe_var", x, axis, where)
    keepdims = validation.check_keepdims(keepdims, "safe_var")
    return mean_spread(jnp.asarray(x), mask, axes, keepdims, False)[1].astype(dtype)


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
    _, dtype, axes, mask = _prepare("safe_std", x, axis, where)
    keepdims = validation.check_keepdims(keepdims, "safe_std")
    return mean_spread(jnp.asarray(x), mask, axes, keepdims, True)[1].astype(dtype)
