r"""Whether every entry of each of many arrays is finite, read at the speed of a sum.

``jnp.isfinite(x).all()`` is a reduction over booleans, which XLA:CPU runs at
about a third of the speed of a float sum over the same bytes (8.5 ms against
2.9 ms for 40 MB in one measurement). A sum is non-finite whenever an entry is
(:math:`\mathrm{NaN} + a = \mathrm{NaN}`, :math:`\infty + a = \infty`,
:math:`\infty - \infty = \mathrm{NaN}`), so a finite sum proves every entry
finite. A non-finite sum can also come from finite entries whose sum
overflows; only then, under ``lax.cond``, is every value checked again
element by element, so the answer is always exactly
``jnp.isfinite(x).all()``. float16 and bfloat16 values are summed in
float32, where a sum of finite entries cannot overflow.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from jax import lax

from stablejax._src.typing import Array


def _sum_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating) or dtype.itemsize >= 4:
        return dtype
    return jnp.dtype(jnp.float32)


def all_finite(values: Sequence[Array]) -> list[Array]:
    """Per value of ``values`` (inexact arrays), a boolean scalar: all entries finite.

    Equal to ``[jnp.isfinite(x).all() for x in values]``; one float sum per
    value on the common path, the element-wise check only when some sum is
    not finite.
    """
    values = [jnp.asarray(x) for x in values]
    if not values:
        return []
    fast = [jnp.isfinite(jnp.sum(x, dtype=_sum_dtype(x.dtype))) for x in values]
    every = fast[0] if len(fast) == 1 else jnp.stack(fast).all()

    def finite(xs):
        return [jnp.asarray(True) for _ in xs]

    def exact(xs):
        return [jnp.isfinite(x).all() for x in xs]

    return list(lax.cond(every, finite, exact, values))
