"""The one normalization core behind every stablejax layer, linen and NNX alike.

Layers only fetch their parameters and call these functions, as flax's own
``LayerNorm`` calls ``_compute_stats`` and ``_normalize``; unlike flax, the
linen and NNX modules share this single copy.

``epsilon > 0`` follows flax's arithmetic operation for operation (fast variance
``E[x^2] - E[x]^2`` clamped at 0, ``rsqrt(var + epsilon)``), so outputs equal
flax's bit for bit and a flax checkpoint loads unchanged. ``epsilon = 0`` is the
exact formula ``(x - mean) / std``, where flax returns NaN on a constant row:
the mean is computed shifted by a reference entry of the row (a constant row
centres to exactly 0), the division goes through the safe normalize core
(:func:`stablejax._src.numerics.reductions.unit`), and a constant or zero row gives 0
with gradient 0.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from jax import lax

from stablejax._src import validation
from stablejax._src.numerics.dtypes import compute_dtype
from stablejax._src.numerics.reductions import (
    NORMALIZE_GRAD_FLOOR,
    mean_spread,
    standardize,
    unit,
)
from stablejax._src.typing import Array, Axis


def compute_stats(
    x: Array,
    axes: tuple[int, ...],
    dtype: Any,
    axis_name: str | None,
    axis_index_groups: Any,
    use_mean: bool,
    use_fast_variance: bool,
    mask: Array | None,
    force_float32_reductions: bool = True,
) -> tuple[Array, Array]:
    """Mean and variance exactly as flax computes them (see module docstring)."""
    if dtype is None:
        dtype = jnp.result_type(x)
    if force_float32_reductions:
        dtype = jnp.promote_types(dtype, jnp.float32)
    x = jnp.asarray(x, dtype)

    def mean(*xs):
        mus = tuple(v.mean(axes, where=mask) for v in xs)
        if axis_name is None:
            return mus if len(xs) > 1 else mus[0]
        if len(xs) > 1:
            stacked = lax.pmean(jnp.stack(mus, 0), axis_name, axis_index_groups=axis_index_groups)
            return tuple(stacked[i] for i in range(len(xs)))
        return lax.pmean(mus[0], axis_name, axis_index_groups=axis_index_groups)

    if not use_mean:
        var = mean(lax.square(x))
        return jnp.zeros_like(var), var
    if use_fast_variance:
        mu, mu2 = mean(x, lax.square(x))
        return mu, jnp.maximum(0.0, mu2 - lax.square(mu))
    mu = mean(x)
    return mu, mean(lax.square(x - jnp.expand_dims(mu, axes)))


def _exact_standardize(
    x: Array, axes: tuple[int, ...], use_mean: bool, mask: Array | None, dtype: Any,
    out_dtype: Any,
) -> Array:
    """``(x - mean) / std`` (or ``x / rms``) with no epsilon, through the safe core."""
    ct = compute_dtype(jnp.result_type(x) if dtype is None else dtype)
    x = x.astype(ct)
    if use_mean:
        return standardize(x, mask, axes, floor=NORMALIZE_GRAD_FLOOR, dtype=out_dtype)
    return unit(x, mask, axes, mean=True, floor=NORMALIZE_GRAD_FLOOR, dtype=out_dtype)


def layer_norm(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    *,
    reduction_axes: Axis,
    feature_axes: Axis,
    epsilon: float,
    dtype: Any = None,
    use_mean: bool = True,
    use_fast_variance: bool = True,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    mask: Array | None = None,
    force_float32_reductions: bool = True,
    where: str = "LayerNorm",
) -> Array:
    r"""Normalizes ``x`` over ``reduction_axes`` and applies ``scale`` and ``bias``.

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    (``use_mean=False`` gives RMSNorm: :math:`\mu = 0`, :math:`\sigma^2` the
    mean square). ``scale`` and ``bias`` are shaped like the feature axes.
    """
    validation.check_float("x", x, where)
    x = jnp.asarray(x)
    red = validation.canonical_axes(x.ndim, reduction_axes, where)
    feat = validation.canonical_axes(x.ndim, feature_axes, where)
    mask = validation.broadcast_mask(mask, x.shape, where)
    feature_shape = [1] * x.ndim
    for ax in feat:
        feature_shape[ax] = x.shape[ax]
    args = [x]
    if epsilon == 0:
        if axis_name is not None:
            raise ValueError(
                f"{where}: epsilon=0 with axis_name={axis_name!r} is not supported; "
                "use a positive epsilon for statistics reduced across devices."
            )
        out_dtype = flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=dtype)
        y = _exact_standardize(x, red, use_mean, mask, dtype if force_float32_reductions else None,
                               out_dtype)
        mul = None
    else:
        mean, var = compute_stats(
            x, red, dtype, axis_name, axis_index_groups, use_mean, use_fast_variance, mask,
            force_float32_reductions,
        )
        y = x - jnp.expand_dims(mean, red)
        mul = lax.rsqrt(jnp.expand_dims(var, red) + epsilon)
    if scale is not None:
        scale = scale.reshape(feature_shape)
        args.append(scale)
        mul = scale if mul is None else mul * scale
    if mul is not None:
        y = y * mul
    if bias is not None:
        bias = bias.reshape(feature_shape)
        y = y + bias
        args.append(bias)
    return jnp.asarray(y, flax_dtypes.canonicalize_dtype(*args, dtype=dtype))


def l2_normalize(x: Array, axis: Axis, scale: Array | None, dtype: Any, where: str) -> Array:
    r"""``scale * x / ||x||`` over ``axis``, 0 with gradient 0 at the zero vector."""
    validation.check_float("x", x, where)
    x = jnp.asarray(x)
    axes = validation.canonical_axes(x.ndim, axis, where)
    out_dtype = flax_dtypes.canonicalize_dtype(x, scale, dtype=dtype)
    y = unit(x.astype(compute_dtype(x.dtype)), None, axes, mean=False, floor=NORMALIZE_GRAD_FLOOR,
             dtype=out_dtype)
    if scale is not None:
        y = y * scale
    return y.astype(out_dtype)


STD_POOL_OUTPUTS = ("mean_std", "std")


def std_pool(
    x: Array, mask: Array | None, axis: int, output: str, dtype: Any, where: str
) -> Array:
    r"""Statistics pooling over the time ``axis`` (x-vector style).

    .. math::
        \mu_f = \tfrac1c \textstyle\sum_{t \in v} x_{tf}, \qquad
        \sigma_f = \sqrt{\tfrac1c \sum_{t \in v} (x_{tf} - \mu_f)^2}

    over the ``c`` valid frames; returns ``concat([mu, sigma], -1)`` or
    ``sigma``. A silent (constant) utterance gives ``sigma = 0`` with gradient 0,
    a fully masked one gives zeros.
    """
    validation.check_float("x", x, where)
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"{where}: input must have a time axis and a feature axis, got shape {x.shape}."
        )
    (time,) = validation.canonical_axes(x.ndim, axis, where)
    if time == x.ndim - 1:
        raise ValueError(
            f"{where}: axis={axis} is the feature axis (the last one); pass the time axis, "
            "e.g. axis=-2 for inputs shaped (batch, time, features)."
        )
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != x.shape[:-1]:
            raise ValueError(
                f"{where}: mask must be shaped like the input without its feature axis, "
                f"{x.shape[:-1]}, got {mask.shape}."
            )
        mask = validation.broadcast_mask(mask[..., None], x.shape, where)
    out_dtype = x.dtype if dtype is None else dtype
    mean, std = mean_spread(x, mask, (time,), False, True)
    out = jnp.concatenate([mean, std], axis=-1) if output == "mean_std" else std
    return out.astype(out_dtype)


def check_layer_input(
    x: Array, mask: Any, epsilon: float, reduction_axes: Axis, feature_axes: Axis, where: str
) -> None:
    """Call-time checks of the norm layers: a float (or, at ``epsilon=0``, real) input
    and a boolean mask. Complex input is accepted for ``epsilon > 0``, as flax does."""
    dtype = jnp.result_type(x)
    if epsilon != 0 and jnp.issubdtype(dtype, jnp.complexfloating):
        pass
    elif jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"{where}: complex input needs epsilon > 0 (flax's arithmetic), got epsilon=0; "
            "pass e.g. epsilon=1e-6, or normalize the real and imaginary parts separately."
        )
    else:
        validation.check_float("x", x, where)
    validation.canonical_axes(jnp.ndim(x), reduction_axes, where)
    validation.canonical_axes(jnp.ndim(x), feature_axes, where)
    if mask is not None:
        validation.broadcast_mask(mask, jnp.shape(x), where)


def check_std_pool_config(axis: int, output: str, where: str, dtype: Any = None) -> None:
    """Construction-time checks of ``StdPool``: the output kind, the time axis, the dtype."""
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(
            f"{where}: dtype={dtype!r} is not a floating-point dtype; the pooled mean and "
            "std are real numbers: pass e.g. dtype=jnp.float32, or None for the input's."
        )
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"{where}: axis must be an int (the time axis), got {axis!r}.")
    if axis == -1:
        raise ValueError(
            f"{where}: axis=-1 is the feature axis; pass the time axis, "
            "e.g. axis=-2 for inputs shaped (batch, time, features)."
        )
    if output not in STD_POOL_OUTPUTS:
        raise ValueError(
            f"{where}: output={output!r} is not one of {STD_POOL_OUTPUTS}; use 'mean_std' "
            "for [mean, std] concatenated on the feature axis or 'std' for std only."
        )
