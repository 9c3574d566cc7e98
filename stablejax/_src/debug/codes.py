r"""Finiteness codes on device, cheaply: one packed reduction per run of leaves.

The compiled pass of ``locate`` (:mod:`compiled`) needs, per flagged value
:math:`x`, a code: 1 if :math:`x` holds a NaN or an Inf, 0 if it is finite (the
host's replay of the taint rules needs no more; the kind is measured eagerly on
the chosen region). One reduction per value makes XLA compile one kernel per
value, thousands on a 12-layer transformer. :func:`packed_codes` turns every
value into a non-finite mask, cuts the masks into rows of ``ROW`` and reduces
the rows of all values of a run of leaves together in one fused reduction; the
host (:func:`decode`) takes the ``any`` over each value's rows. (``max |x|``,
the code used before, also misses NaN on CPU: see :func:`nonfinite`.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROW = 256  # elements per partial code in packed_codes


def nonfinite(x: Any) -> jax.Array:
    """Per element, whether it is NaN or +-Inf (``bool``).

    A boolean, not ``max|x|``: XLA's CPU ``reduce_max`` over float rows drops NaN
    on this jaxlib (``jnp.max`` of a ``(16, 256)`` float32 array holding a NaN
    gives the largest finite value), while a boolean ``any`` is exact.
    """
    return jnp.logical_not(jnp.isfinite(jnp.asarray(x)))


def packed_codes(vals: Sequence[Any]) -> tuple[jax.Array, list[tuple[int, int]]]:
    """Partial codes of many values from one fused reduction; decoded on the host.

    Each value's :func:`nonfinite` mask is raveled, padded with ``False`` to a
    multiple of ``ROW`` and cut into rows of ``ROW``; the rows of all values are
    concatenated and reduced with ``any`` along the row, so XLA compiles one
    kernel for the lot instead of one per value, and the concatenation is fused
    into the reduction. :func:`decode` turns the partial codes back into one
    code per value.

    Args:
      vals: floating (or complex) arrays, traced or concrete.

    Returns:
      ``(partials, where)``: a ``bool`` vector, and per value
      ``(first_row, end_row)`` into it.
    """
    groups: dict[str, list[Any]] = {}  # sharding type -> rows, concatenated together
    counts: dict[str, int] = {}  # rows so far in each group
    local: list[tuple[str, int, int]] = []
    for v in vals:
        c = nonfinite(v).ravel()
        n = -(-c.size // ROW)
        if not n:
            local.append(("", 0, 0))
            continue
        c = jnp.pad(c, (0, n * ROW - c.size)) if c.size % ROW else c
        c = c.reshape(n, ROW)
        key = _sharding_key(c)
        lo = counts.get(key, 0)
        groups.setdefault(key, []).append(c)
        counts[key] = lo + n
        local.append((key, lo, lo + n))
    if not groups:
        return jnp.zeros((0,), bool), [(0, 0) for _ in local]
    base, parts, total = {}, [], 0
    for key, group in groups.items():
        base[key], total = total, total + counts[key]
        parts.append(jnp.any(jnp.concatenate(group) if len(group) > 1 else group[0], axis=1))
    where = [(base.get(k, 0) + lo, base.get(k, 0) + hi) for k, lo, hi in local]
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0], where


def _sharding_key(rows: Any) -> str:
    """The explicit sharding of a traced value's type, ``''`` for none.

    Under an Explicit mesh (``jax.make_mesh`` with ``jax.set_mesh``) values carry
    their sharding in their type and ``concatenate`` refuses to mix them, so rows
    are concatenated per type and only the reduced (unsharded) vectors together.
    """
    try:
        spec = jax.typeof(rows).sharding.spec
    except (AttributeError, TypeError):
        return ""
    return str(spec) if any(s is not None for s in spec) else ""


def decode(partials: Any, where: Sequence[tuple[int, int]]) -> list[int]:
    """Per value, 1 if it holds a NaN or an Inf, else 0, from :func:`packed_codes`'s output."""
    host = np.asarray(partials)
    return [int(host[lo:hi].any()) for lo, hi in where]


def compile_once(fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
    """``fn`` lowered and compiled for ``args`` with XLA's default options.

    Cheaper CPU options for a program that runs once were measured and rejected:
    ``xla_backend_optimization_level=0`` compiles the 12-layer d 768 bench step's
    flagged program no faster (16-19 CPU-s either way) but runs it 3x slower
    (14.5 s instead of 5.1 s), and XLA's classic fusion emitters alone made the
    d 512 one compile in 56 CPU-s instead of 21.
    """
    return jax.jit(fn).lower(*args).compile()
