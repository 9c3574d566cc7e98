"""Argument checks shared by every public entry point.

Each check runs in Python when a function is traced or a module is built, so a
bad argument raises at once with a message that names the value and the fix,
never later as a NaN under ``jit``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from stablejax._src.typing import ArrayLike


def check_float(name: str, x: ArrayLike, where: str) -> None:
    """Raises ``TypeError`` unless ``x`` has a floating-point dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{where}: `{name}` must be a floating-point array, got dtype {dtype}. "
            f"Cast it first, e.g. `{name}.astype(jnp.float32)`."
        )


def canonical_axes(ndim: int, axis: int | Sequence[int] | None, where: str) -> tuple[int, ...]:
    """Returns ``axis`` as a sorted tuple of non-negative ints, validated for ``ndim``.

    ``None`` means every axis. Raises ``ValueError`` naming the bad axis.
    """
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, numbers.Integral):
        axes = (axis,)
    elif isinstance(axis, (tuple, list)):
        axes = tuple(axis)
    else:
        raise TypeError(
            f"{where}: axis must be an int, a tuple of ints or None, got {axis!r} "
            f"({type(axis).__name__}); pass a Python int, e.g. axis=-1."
        )
    out = []
    for a in axes:
        if not isinstance(a, numbers.Integral) or isinstance(a, bool):
            raise TypeError(f"{where}: axis entries must be ints, got {a!r} in axis={axis!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{where}: axis {a} is out of range for an input with {ndim} dimension(s); "
                f"use an axis in [{-ndim}, {ndim - 1}]."
            )
        out.append(int(a) % ndim if ndim else 0)
    if len(set(out)) != len(out):
        raise ValueError(f"{where}: repeated axis in axis={axis!r}; list each axis once.")
    return tuple(sorted(out))


def broadcast_mask(mask: ArrayLike | None, shape: tuple[int, ...], where: str):
    """Returns ``mask`` as a boolean array of ``shape`` (None stays None).

    Raises ``ValueError`` naming both shapes when ``mask`` does not broadcast.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if not (mask.dtype == bool or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise TypeError(
            f"{where}: the mask must be boolean (True on valid entries), got dtype {mask.dtype}; "
            "a fractional value has no meaning as a mask: pass e.g. `mask > 0.5`."
        )
    try:
        return jnp.broadcast_to(mask.astype(bool), shape)
    except ValueError:
        raise ValueError(
            f"{where}: the mask of shape {mask.shape} does not broadcast to the input shape "
            f"{shape}; pass a boolean mask shaped like the input (or broadcastable to it)."
        ) from None


def check_nonnegative(name: str, value: float, where: str) -> float:
    """Raises ``ValueError`` unless ``value`` is a finite, non-negative real number.

    Python, numpy and concrete 0-d jax scalars (``jnp.float32(1e-6)``) are accepted.
    """
    value = real_scalar(name, value, where)
    if not np.isfinite(value) or value < 0:
        raise ValueError(
            f"{where}: `{name}` must be finite and >= 0, got {value!r}. "
            f"Use {name}=0.0 for the exact formula or a small positive value such as 1e-6."
        )
    return float(value)


def real_scalar(name: str, value, where: str) -> float:
    """Returns ``value`` as a Python float: a real Python, numpy or concrete 0-d jax scalar."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: `{name}` must be a real number, got {value!r}.")
    if isinstance(value, numbers.Real):
        return value
    dtype = getattr(value, "dtype", None)
    if getattr(value, "shape", None) == () and dtype is not None and (
            jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        try:
            return float(value)
        except Exception:  # a tracer: the value is not known when the module is built
            raise TypeError(
                f"{where}: `{name}` must be a concrete number, got the traced value {value!r}; "
                f"pass it as a Python float, e.g. {name}=1e-6."
            ) from None
    raise TypeError(f"{where}: `{name}` must be a real number, got {value!r}.")


def check_keepdims(value, where: str) -> bool:
    """Returns ``keepdims`` as a bool; raises ``TypeError`` for anything but a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: keepdims must be True or False, got {value!r}.")
    return bool(value)


def check_positive(name: str, value: float, where: str) -> float:
    """Raises ``ValueError`` unless ``value`` is a finite, strictly positive Python number."""
    check_nonnegative(name, value, where)
    if value == 0:
        raise ValueError(f"{where}: `{name}` must be > 0, got {value!r}.")
    return float(value)


def check_unit_interval(name: str, value: float, where: str) -> float:
    """Raises ``ValueError`` unless ``0 < value < 1``."""
    check_positive(name, value, where)
    if value >= 1:
        raise ValueError(f"{where}: `{name}` must be in (0, 1), got {value!r}; e.g. {name}=0.5.")
    return float(value)


def check_fraction(name: str, value: float, where: str) -> float:
    """Raises ``ValueError`` unless ``0 < value <= 1``."""
    check_positive(name, value, where)
    if value > 1:
        raise ValueError(f"{where}: `{name}` must be in (0, 1], got {value!r}.")
    return float(value)


def check_count(name: str, value: int, where: str, minimum: int = 0) -> int:
    """Raises ``ValueError`` unless ``value`` is an int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: `{name}` must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(
            f"{where}: `{name}` must be >= {minimum}, got {value!r}; e.g. {name}={max(minimum, 1)}."
        )
    return value
