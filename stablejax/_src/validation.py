"""Argument checks shared by every public entry point.

Each check runs in Python when a function is traced or a module is built, so a
bad argument raises at once with a message that names the value and the fix,
never later as a NaN under ``jit``.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

import jax
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


def _real_scalar(name: str, value, where: str):
    """Returns ``value`` as a Python float, or as is when it is traced.

    Accepts Python, numpy and jax real scalars (0-d arrays), as optax does:
    ``optax.inject_hyperparams`` passes jax arrays, traced inside ``jit``. A
    traced value cannot be checked in Python; it is returned unchanged.
    """
    if isinstance(value, bool) or isinstance(value, np.bool_):
        raise TypeError(f"{where}: `{name}` must be a real number, got {value!r}.")
    if isinstance(value, numbers.Real):
        return float(value)
    dtype = getattr(value, "dtype", None)
    shape = getattr(value, "shape", None)
    if dtype is None or shape is None:
        raise TypeError(f"{where}: `{name}` must be a real number, got {value!r}.")
    if shape != () or not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
        raise TypeError(
            f"{where}: `{name}` must be a real scalar, got an array of shape {shape} and "
            f"dtype {dtype}."
        )
    if isinstance(value, jax.core.Tracer):
        return value
    return float(value)


def _traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def check_nonnegative(name: str, value: float, where: str, example: float | None = None):
    """Raises ``ValueError`` unless ``value`` is a finite, non-negative real scalar.

    Python, numpy and jax scalars are accepted; the value is returned as a float
    (a traced jax value, which cannot be checked, is returned as is). The error
    proposes ``example`` (which must itself pass), by default 0.0.
    """
    value = _real_scalar(name, value, where)
    if _traced(value):
        return value
    if not np.isfinite(value) or value < 0:
        if example is None:
            hint = f"Use {name}=0.0 for the exact formula or a small positive value such as 1e-6."
        else:
            hint = f"Use e.g. {name}={example!r}."
        raise ValueError(f"{where}: `{name}` must be finite and >= 0, got {name}={value!r}. {hint}")
    return value


def check_positive(name: str, value: float, where: str, example: float = 1e-3):
    """Raises ``ValueError`` unless ``value`` is a finite, strictly positive real scalar.

    The error proposes ``example`` (which must itself pass).
    """
    value = _real_scalar(name, value, where)
    if _traced(value):
        return value
    if not np.isfinite(value) or value <= 0:
        raise ValueError(
            f"{where}: `{name}` must be finite and > 0, got {name}={value!r}. "
            f"Use e.g. {name}={example!r}."
        )
    return value


def check_unit_interval(
    name: str, value: float, where: str, example: float = 0.5, allow_zero: bool = False
):
    """Raises ``ValueError`` unless ``0 < value < 1`` (``0 <= value < 1`` with ``allow_zero``)."""
    value = _real_scalar(name, value, where)
    if _traced(value):
        return value
    low_ok = value >= 0 if allow_zero else value > 0
    if not (np.isfinite(value) and low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(
            f"{where}: `{name}` must be in {interval}, got {name}={value!r}. "
            f"Use e.g. {name}={example!r}."
        )
    return value


def check_fraction(name: str, value: float, where: str, example: float = 0.5):
    """Raises ``ValueError`` unless ``0 < value <= 1``."""
    value = _real_scalar(name, value, where)
    if _traced(value):
        return value
    if not (np.isfinite(value) and 0 < value <= 1):
        raise ValueError(
            f"{where}: `{name}` must be in (0, 1], got {name}={value!r}. "
            f"Use e.g. {name}={example!r}."
        )
    return value


def check_count(name: str, value: int, where: str, minimum: int = 0) -> int:
    """Raises ``ValueError`` unless ``value`` is an integer ``>= minimum``.

    Python, numpy and jax integers are accepted and returned as ``int`` (a
    traced jax value, which cannot be checked, is returned as is).
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: `{name}` must be an int, got {value!r}.")
    dtype = getattr(value, "dtype", None)
    int_array = dtype is not None and jnp.issubdtype(dtype, jnp.integer)
    if not isinstance(value, numbers.Integral) and not (
        int_array and getattr(value, "shape", None) == ()
    ):
        raise TypeError(f"{where}: `{name}` must be an int, got {value!r}.")
    if _traced(value):  # optax.inject_hyperparams traces every numeric setting
        return value
    value = operator.index(value)
    if value < minimum:
        raise ValueError(
            f"{where}: `{name}` must be >= {minimum}, got {name}={value!r}. "
            f"Use e.g. {name}={max(minimum, 1)}."
        )
    return value


def check_axis_name(axis_name, where: str):
    """Raises ``TypeError`` unless ``axis_name`` is None, a str or a tuple of str."""
    ok = axis_name is None or isinstance(axis_name, str)
    if isinstance(axis_name, tuple):
        ok = len(axis_name) > 0 and all(isinstance(a, str) for a in axis_name)
    if not ok:
        raise TypeError(
            f"{where}: `axis_name` must be None, the name of a shard_map/pmap axis (a str) or a "
            f"tuple of names, got {axis_name!r}. Use e.g. axis_name='data' (the name given to "
            "the mesh axis), or None outside shard_map/pmap."
        )
    return axis_name


def check_transformation(inner, where: str):
    """Raises ``TypeError`` unless ``inner`` looks like an optax GradientTransformation."""
    if callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None)):
        return inner
    name = getattr(inner, "__name__", None)
    if callable(inner) and name is not None:
        raise TypeError(
            f"{where}: expected an optax GradientTransformation, got the function {name!r}; "
            f"call it first, e.g. {name}(1e-3) instead of {name}."
        )
    raise TypeError(
        f"{where}: expected an optax GradientTransformation (with `init` and `update`), "
        f"got {inner!r}."
    )


def check_keepdims(value, where: str) -> bool:
    """Returns ``keepdims`` as a bool; raises ``TypeError`` for anything but a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: keepdims must be True or False, got {value!r}.")
    return bool(value)
