"""The dtype policy, written down once.

Every safe op reduces and differentiates in at least float32 (``compute_dtype``)
and returns the dtype of its input: bfloat16 and float16 inputs are upcast for
the arithmetic, float64 stays float64. Variances are clamped at 0.

``pow2_scale`` supplies the exact power-of-two rescaling that lets norms and
standard deviations of rows such as ``1e30`` or ``1e-30`` (float32) stay finite
and accurate: multiplying by a power of two changes only the exponent, so the
scaled computation rounds exactly as the unscaled one wherever the latter
neither overflows nor underflows.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from stablejax._src.typing import Array, DTypeLike


def compute_dtype(dtype: DTypeLike) -> np.dtype:
    """Returns the dtype safe ops compute in: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _exact_pow2(e: Array, dtype: np.dtype) -> Array:
    """Returns ``2**e`` in ``dtype``, built from its bits (exact, no ``exp2`` rounding)."""
    info = jnp.finfo(dtype)
    uint = {4: jnp.uint32, 8: jnp.uint64}[dtype.itemsize]
    bias = info.maxexp - 1
    bits = (e.astype(uint) + uint(bias)) << uint(info.nmant)
    return lax.bitcast_convert_type(bits, dtype)


def pow2_scale(magnitude: Array) -> tuple[Array, Array]:
    """Returns ``(s, 1/s)``, a power of two ``s`` with ``magnitude / s`` in ``[0.5, 4)``.

    ``magnitude`` is a non-negative array (a row's largest absolute value). Zero,
    NaN and Inf give ``s = 1`` so that non-finite values pass through unchanged.
    The exponent is clamped to the normal range of the dtype, so both ``s`` and
    ``1/s`` are normal numbers and the multiplication by either is exact.
    """
    dtype = magnitude.dtype
    info = jnp.finfo(dtype)
    _, e = jnp.frexp(magnitude)
    lo, hi = info.minexp + 1, info.maxexp - 2
    e = jnp.clip(e, lo, hi)
    return _exact_pow2(e, dtype), _exact_pow2(-e, dtype)
