r"""Moments in one fused pass: no ``lax.cond`` and no select on the first-order path.

XLA on CPU fuses a chain of reductions and arithmetic (``+ - * /``, ``max``,
``min``, ``abs``, ``sqrt``) over one input into a single pass, as it does for
the naive ``jnp.std`` and its gradient; a select or a ``lax.cond`` between the
reductions cuts that pass in two, and the input is read again (the exact
two-pass moments with their rescaling under a ``lax.cond`` in
:mod:`stablejax._src.numerics.reductions` read it four times for ``StdPool``'s
forward and backward). Here the exactness the cond bought is kept by arithmetic
alone:

* scale: each row is divided by :func:`_band_scale` of its largest magnitude,
  exactly 1 for rows whose largest magnitude lies in ``[2**-20, 2**40]`` (so they
  are computed unscaled), and a factor that brings the row into that band
  otherwise (no square overflows or underflows, entries up to the dtype's
  largest number included);
* shift: the row is centred on its largest entry before the two-pass
  moments, so a constant row gives exactly 0, with derivative 0;
* singular points: the square root and the ratio ``dz / std`` are ``custom_jvp``
  functions whose selects appear only when they are differentiated (second
  order), so the first-order program has none.

Outside the band the scale is not a power of two: the result carries one more
rounding per entry (relative ``2**-24`` in float32) than the unscaled formula.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from stablejax._src.typing import Array

# Rows whose largest magnitude lies in this band are computed unscaled: their
# squares, sums of squares and the spreads of nearly constant rows neither
# overflow nor underflow (for rows of up to 2**20 entries).
_BAND_LO, _BAND_HI = 2.0**-20, 2.0**40


def _band_scale(m: Array) -> Array:
    """A positive scale ``s`` per row with ``m / s`` in the band: exactly 1 inside it.

    ``m`` is the row's largest magnitude: above the band ``s = m / 2**40``, below it
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


def _band_moments(x: Array, axes: tuple[int, ...]):
    r"""One fused pass of moments, scaled only outside the band.

    Returns ``(c, s, mean_z, dz, var_z)``, shaped like reductions over ``axes``
    except ``dz``: ``z = (x - c) / s`` has mean ``mean_z``, ``dz = z - mean_z``, and
    its variance is ``var_z``, so ``mean = c + s mean_z`` and ``var = s^2 var_z``.
    The shift ``c`` is the row's largest entry, so a constant row gives ``z = 0``,
    a variance of exactly 0 and its own value as the mean. ``x - c`` is taken as
    ``x/2 - c/2`` (exact, and the same with or without a fused multiply-add), so it
    cannot overflow. Scale and shift are constants for differentiation: the
    moments do not depend on them. Everything is arithmetic and reductions (no
    select, no ``lax.cond``), so XLA fuses the forward and the backward into one
    pass over ``x``.
    """
    n = math.prod(x.shape[a] for a in axes)
    s = jax.lax.stop_gradient(_band_scale(jnp.max(jnp.abs(x), axis=axes)))
    c = jax.lax.stop_gradient(jnp.max(x, axis=axes))
    z = (x * 0.5 - jnp.expand_dims(c * 0.5, axes)) * jnp.expand_dims(2.0 / s, axes)
    mean_z = jnp.sum(z, axis=axes) / n
    dz = z - jnp.expand_dims(mean_z, axes)
    return c, s, mean_z, dz, jnp.sum(dz * dz, axis=axes) / n


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
    ``x`` is in the compute dtype and unmasked, with at least one entry per row.
    """
    c, s, mean_z, _, var_z = _band_moments(x, axes)
    spread = s * _sqrt0(var_z) if std else s * (s * var_z)
    return _unsqueeze(keepdims, axes, c + s * mean_z, spread)


@band_mean_spread.defjvp
def _band_mean_spread_jvp(axes, keepdims, std, primals, tangents):
    """The derivatives in :func:`band_mean_spread`'s docstring, from the same pass."""
    (x,), (dx,) = primals, tangents
    c, s, mean_z, dz, var_z = _band_moments(x, axes)
    n = math.prod(x.shape[a] for a in axes)
    dmean = jnp.sum(dx, axis=axes) / n
    if std:
        root = _sqrt0(var_z)
        spread = s * root
        dspread = jnp.sum(_ratio0(dz, jnp.expand_dims(root, axes)) * dx, axis=axes) / n
    else:
        spread = s * (s * var_z)
        dspread = 2.0 * s * (jnp.sum(dz * dx, axis=axes) / n)
    return (_unsqueeze(keepdims, axes, c + s * mean_z, spread),
            _unsqueeze(keepdims, axes, dmean, dspread))
