r"""Moments in one fused pass: no ``lax.cond`` and no select on the first-order path.

XLA on CPU fuses a chain of reductions and arithmetic (``+ - * /``, ``max``,
``min``, ``abs``, ``sqrt``) over one input into a single pass, as it does for
the naive ``jnp.std`` and its gradient; a select or a ``lax.cond`` between the
reductions cuts that pass in two, and the input is read again (the exact
two-pass moments with their rescaling under a ``lax.cond`` in
:mod:`stablejax._src.numerics.reductions` read it four times for ``StdPool``'s
forward and backward). Inside the pass, each reduction and each full-size
operation costs about the same, so the pass is kept to three reductions (the
naive formula and its gradient make three too) and the exactness the cond
bought is kept by arithmetic alone:

* shift: the row's smallest entry ``lo``, so the deviations ``d = x - lo`` are
  non-negative and a constant row gives exactly ``d = 0``, a variance of exactly
  0 with derivative 0;
* range: ``x`` and ``lo`` are first multiplied by the power of two
  ``h = 2**-(ceil(log2 n) + 1)`` (exact), so neither ``d`` nor the sum of the
  ``n`` deviations can overflow, entries up to the dtype's largest number
  included;
* scale: that sum is at least the row's largest deviation and at most ``n``
  times it, so it gives the band scale :func:`_band_scale` with no reduction of
  its own: exactly 1 for rows whose sum lies in ``[2**-20, 2**40]`` (computed
  unscaled), and a factor that brings the row into that band otherwise (no
  square overflows or underflows);
* singular points: the square root and the ratio ``dz / std`` are ``custom_jvp``
  functions whose selects appear only when they are differentiated (second
  order), so the first-order program has none.

Outside the band the scale is not a power of two: the result carries one more
rounding per entry (relative ``2**-24`` in float32) than the unscaled formula.
The pre-scaling by ``h`` moves the flush-to-zero threshold: an entry is
perturbed by at most ``tiny / h`` (float32: ``2**-119``, about ``1.5e-36``, in a
row of 64), where the plain formula loses every square below about ``1e-19``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from stablejax._src.numerics.dtypes import compute_dtype
from stablejax._src.typing import Array

# Rows whose sum of deviations lies in this band are computed unscaled: their
# squares and sums of squares neither overflow nor underflow (for rows of up to
# 2**20 entries, whose largest deviation is at least 2**-20 of the sum).
_BAND_LO, _BAND_HI = 2.0**-20, 2.0**40


def _band_scale(m: Array) -> Array:
    """A positive scale ``s`` per row with ``m / s`` in the band: exactly 1 inside it.

    ``m`` is a non-negative size of the row (here the sum of its deviations from its
    smallest entry, between the largest deviation and ``n`` times it): above the
    band ``s = m / 2**40``, below it
    ``s = m / 2**-20``, and a zero row's scale is 1. Only ``max``, ``min``, ``*``
    and ``+``, so that XLA fuses the scale into the reductions around it (a select
    or a ``lax.cond`` would cut the fused pass in two).
    """
    zero = 1.0 - jnp.minimum(m * (1.0 / float(jnp.finfo(m.dtype).tiny)), 1.0)  # 1 at m = 0
    return jnp.maximum(m * (1.0 / _BAND_HI), 1.0) * jnp.minimum(m * (1.0 / _BAND_LO), 1.0) + zero


@jax.custom_jvp
def _sqrt0(v: Array) -> Array:
    """``sqrt(v)`` for ``v >= 0`` whose derivative is 0, not Inf, at 0 (a select only
    when differentiated, so the first-order pass stays fusible)."""
    return jnp.sqrt(v)


@_sqrt0.defjvp
def _sqrt0_jvp(primals, tangents):
    (v,), (dv,) = primals, tangents
    r = _sqrt0(v)
    pos = v > 0
    return r, jnp.where(pos, 0.5 / jnp.where(pos, r, 1.0), 0.0) * dv


@jax.custom_jvp
def _ratio0(a: Array, r: Array) -> Array:
    """``a / r`` where ``r > 0``; 0 where ``r = 0``, for callers whose ``a`` is exactly 0
    wherever ``r`` is: ``a`` times a finite reciprocal, with no select. Its derivative
    is 0 at ``r = 0`` (a select only when differentiated)."""
    return a * (1.0 / jnp.maximum(r, jnp.finfo(r.dtype).tiny))


@_ratio0.defjvp
def _ratio0_jvp(primals, tangents):
    (a, r), (da, dr) = primals, tangents
    q = 1.0 / jnp.maximum(r, jnp.finfo(r.dtype).tiny)
    out = a * q
    return out, jnp.where(r > 0, (da - out * dr) * q, 0.0)


def _prescale(n: int) -> float:
    """``h = 2**-(ceil(log2 n) + 1)``: ``n`` deviations ``x*h - lo*h`` cannot overflow."""
    return 2.0 ** -(max(n - 1, 0).bit_length() + 1)


def _band_moments(x: Array, axes: tuple[int, ...]):
    r"""One fused pass of moments: three reductions, scaled only outside the band.

    ``x`` is in its input dtype (upcast inside, after the smallest entry of a
    bfloat16 row is taken). Returns ``(c, s, mean_z, dz, var_z)``, shaped like
    reductions over ``axes`` except ``dz``:

    .. math::
        d = x h - c h \ge 0, \quad S = \textstyle\sum d, \quad
        z = d / b(S), \quad \bar z = S / (n\, b(S)), \quad
        dz = z - \bar z, \quad \mathrm{var}_z = \overline{dz^2}

    with ``c`` the row's smallest entry, ``h`` from :func:`_prescale` and ``b`` the
    band scale, so that ``mean = c + s \bar z`` and ``var = s^2 var_z`` with
    ``s = b(S) / h``. ``S`` lies between the largest deviation and ``n`` times it,
    so ``z`` is in the band. Scale and shift are constants for differentiation:
    the moments do not depend on them. Everything is arithmetic and reductions (no
    select, no ``lax.cond``), so XLA fuses the forward and the backward into one
    pass over ``x``.
    """
    n = math.prod(x.shape[a] for a in axes)
    h = _prescale(n)
    xc = x.astype(compute_dtype(x.dtype))
    # bfloat16's smallest entry is taken before the upcast (exact, and XLA:CPU fuses it
    # in the pass and reduces it faster); float16's after it (a float16 reduction is
    # not fused into the pass).
    low = x if x.dtype == jnp.bfloat16 else xc
    c = jax.lax.stop_gradient(jnp.min(low, axis=axes).astype(xc.dtype))
    d = xc * h - jnp.expand_dims(c * h, axes)
    total = jnp.sum(d, axis=axes)
    b = jax.lax.stop_gradient(_band_scale(total))
    inv = 1.0 / b
    mean_z = total * inv / n
    dz = d * jnp.expand_dims(inv, axes) - jnp.expand_dims(mean_z, axes)
    return c, b / h, mean_z, dz, jnp.sum(dz * dz, axis=axes) / n


def _unsqueeze(keepdims: bool, axes: tuple[int, ...], *xs: Array):
    return tuple(jnp.expand_dims(v, axes) for v in xs) if keepdims else xs


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def band_mean_spread(x: Array, axes, keepdims: bool, std: bool):
    r"""Mean and standard deviation (``std``) or variance of the rows of ``x`` over ``axes``.

    .. math::
        \mu = c + s\,\bar z, \qquad \sigma = s \sqrt{\overline{(z - \bar z)^2}},
        \qquad z = (x - c) / s

    (:func:`_band_moments`). Derivatives: :math:`d\mu = \overline{dx}`,
    :math:`d\sigma = \overline{(z - \bar z)\,dx} / \sqrt{\overline{(z - \bar z)^2}}`
    (0 on a constant row), :math:`d\sigma^2 = 2 s\,\overline{(z - \bar z)\,dx}`.
    ``x`` is unmasked, in its input dtype (bfloat16 and float16 are upcast inside),
    with at least one entry per row; the results are in the compute dtype.
    """
    c, s, mean_z, _, var_z = _band_moments(x, axes)
    spread = s * _sqrt0(var_z) if std else s * (s * var_z)
    return _unsqueeze(keepdims, axes, c + s * mean_z, spread)


@band_mean_spread.defjvp
def _band_mean_spread_jvp(axes, keepdims, std, primals, tangents):
    """The derivatives in :func:`band_mean_spread`'s docstring, from the same pass.

    The ``1/n`` of the means is folded into the row's coefficient, so the gradient
    costs one multiply and one add per entry.
    """
    (x,), (dx,) = primals, tangents
    c, s, mean_z, dz, var_z = _band_moments(x, axes)
    n = math.prod(x.shape[a] for a in axes)
    dx = dx.astype(dz.dtype)
    dmean = jnp.sum(dx, axis=axes) / n
    if std:
        root = _sqrt0(var_z)
        spread = s * root
        dspread = jnp.sum(_ratio0(dz, jnp.expand_dims(n * root, axes)) * dx, axis=axes)
    else:
        spread = s * (s * var_z)
        dspread = jnp.sum(dz * dx, axis=axes) * (2.0 * s / n)
    return (_unsqueeze(keepdims, axes, c + s * mean_z, spread),
            _unsqueeze(keepdims, axes, dmean, dspread))
