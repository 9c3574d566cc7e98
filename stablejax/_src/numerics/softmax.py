"""Softmax, log-softmax and logsumexp that stay finite on a row with no valid entry.

A row with no valid entry is one where every entry is masked out by ``where``,
or every unmasked logit is ``-inf`` (a mask the user wrote into the logits, as
padding and causal masks often are). ``jax.nn`` gives NaN there (``softmax`` of
an all ``-inf`` row is ``0/0``), or ``-inf`` (``log_softmax`` and ``logsumexp`` of
an empty row), and the NaN reaches every gradient of the batch.

Here such a row gives:

- ``safe_softmax``: probabilities 0 (the pseudo-inverse convention ``0/0 -> 0``,
  PyTorch's ``_safe_softmax`` choice for fully masked attention rows);
- ``safe_log_softmax`` and ``safe_logsumexp``: ``log(tiny)``, the value
  :func:`stablejax.safe_log` takes at 0 (``-87.34`` in float32, ``-708.4`` in
  float64), ``tiny`` being the smallest normal number of the compute dtype;

and gradient 0 for every entry of the row. A row with at least one valid entry
gives what ``jax.nn`` gives, computed operation for operation as ``jax.nn`` does
(bit for bit in float32 and float64; in bfloat16 and float16 the arithmetic is
float32, so the result is ``jax.nn``'s on the float32 input, rounded once). This
includes ``-inf`` from ``safe_log_softmax`` at a masked entry or a ``-inf`` logit
of such a row: that is the exact log of probability 0. A NaN among the valid
entries, or ``+inf``, gives NaN as in ``jax.nn``; a NaN in a masked slot is
ignored.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from stablejax._src import validation
from stablejax._src.numerics.dtypes import compute_dtype
from stablejax._src.typing import Array, ArrayLike, Axis


def _check_where(where: ArrayLike | None, shape: tuple[int, ...], name: str) -> Array | None:
    """Returns ``where`` broadcast to ``shape`` as bool; a non-boolean mask is an error."""
    if where is None:
        return None
    where = jnp.asarray(where)
    dtype = where.dtype
    if dtype != jnp.bool_:
        raise TypeError(
            f"{name}: `where` must be a boolean mask, got dtype {dtype} (a float mask would "
            f"count 0.5 as True). Pass a boolean array, e.g. `where=mask > 0`."
        )
    return validation.broadcast_mask(where, shape, name)


def _check_axis(axis: Axis, name: str) -> None:
    entries = axis if isinstance(axis, (tuple, list)) else (axis,)
    if axis is None:
        return
    if not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in entries):
        raise TypeError(
            f"{name}: `axis` must be an int, a tuple of ints or None, got {axis!r}; "
            f"e.g. axis=-1."
        )


def _prepare(x: ArrayLike, axis: Axis, where: ArrayLike | None, name: str):
    validation.check_float("x", x, name)
    _check_axis(axis, name)
    x = jnp.asarray(x)
    axes = validation.canonical_axes(x.ndim, axis, name)
    mask = _check_where(where, x.shape, name)
    return x.astype(compute_dtype(x.dtype)), x.dtype, axes, mask


def _row_max(x: Array, axes: tuple[int, ...], where: Array | None) -> tuple[Array, Array]:
    """Returns the row maximum over the valid entries and whether the row is empty."""
    m = jnp.max(x, axes, where=where, initial=-jnp.inf, keepdims=True)
    return m, m == -jnp.inf


def _log_tiny(dtype) -> float:
    return float(np.log(float(jnp.finfo(dtype).tiny)))


# --------------------------------------------------------------------------- softmax


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _softmax(x: Array, axes: tuple[int, ...], where: Array | None) -> Array:
    m, empty = _row_max(x, axes, where)
    x_safe = x if where is None else jnp.where(where, x, -jnp.inf)
    unnormalized = jnp.exp(x_safe - jnp.where(empty, 0.0, m))
    total = jnp.sum(unnormalized, axes, where=where, keepdims=True)
    y = unnormalized / jnp.where(empty, 1.0, total)
    return y if where is None else jnp.where(where, y, 0.0)


@_softmax.defjvp
def _softmax_jvp(axes, primals, tangents):
    r"""Derivative of :func:`safe_softmax`, the one ``jax.nn.softmax`` uses.

    .. math::
        \dot y_i = y_i \Big(\dot x_i - \sum_{j\ \mathrm{valid}} y_j \dot x_j\Big)

    It is 0 at masked entries and on a row with no valid entry, where every
    :math:`y_i = 0`.
    """
    (x, where), (dx, _) = primals, tangents
    y = _softmax(x, axes, where)
    return y, y * (dx - jnp.sum(y * dx, axes, where=where, keepdims=True))


def safe_softmax(x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None) -> Array:
    r"""Softmax that gives 0, not NaN, on a row with no valid entry.

    .. math::
        \mathrm{softmax}(x)_i = \frac{\exp(x_i - m)}{\sum_{j\ \mathrm{valid}}
          \exp(x_j - m)}, \qquad m = \max_{j\ \mathrm{valid}} x_j

    A row with a valid entry gives ``jax.nn.softmax(x, axis, where)`` (masked
    entries 0). A row where every entry is masked out or ``-inf`` gives 0
    everywhere (``jax.nn.softmax`` gives NaN for the ``-inf`` row), and its
    gradient is 0. The derivative is ``jax.nn.softmax``'s custom one elsewhere.

    Args:
      x: floating-point logits.
      axis: the axis or axes the probabilities sum over (``None``: all).
      where: optional boolean mask broadcastable to ``x``; ``False`` entries are
        left out (probability 0).

    Returns:
      An array of the shape and dtype of ``x``.

    Raises:
      TypeError: for integer ``x``, a non-boolean ``where`` or a non-int axis.
      ValueError: for an axis out of range or a mask that does not broadcast.

    Examples:
      >>> import jax, jax.numpy as jnp, stablejax
      >>> stablejax.safe_softmax(jnp.array([-jnp.inf, -jnp.inf]))
      Array([0., 0.], dtype=float32)
      >>> stablejax.safe_softmax(jnp.zeros(2), where=jnp.array([True, False]))
      Array([1., 0.], dtype=float32)
    """
    xc, dtype, axes, mask = _prepare(x, axis, where, "safe_softmax")
    return _softmax(xc, axes, mask).astype(dtype)


# --------------------------------------------------------------------------- log_softmax


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _log_softmax(x: Array, axes: tuple[int, ...], where: Array | None) -> Array:
    m, empty = _row_max(x, axes, where)
    x_safe = x if where is None else jnp.where(where, x, -jnp.inf)
    shifted = x_safe - jnp.where(empty, 0.0, m)
    total = jnp.sum(jnp.exp(shifted), axes, where=where, keepdims=True)
    result = shifted - jnp.log(jnp.where(empty, 1.0, total))
    if where is not None:
        result = jnp.where(where, result, -jnp.inf)
    return jnp.where(empty, _log_tiny(x.dtype), result)


@_log_softmax.defjvp
def _log_softmax_jvp(axes, primals, tangents):
    r"""Derivative of :func:`safe_log_softmax`.

    .. math::
        \dot y_i = \dot x_i - \sum_{j\ \mathrm{valid}} \mathrm{softmax}(x)_j \dot x_j

    at valid entries of a row with a valid entry (as autodiff of
    ``jax.nn.log_softmax``), 0 at masked entries and on a row with no valid
    entry (whose value is the constant ``log(tiny)``).
    """
    (x, where), (dx, _) = primals, tangents
    y = _log_softmax(x, axes, where)
    _, empty = _row_max(x, axes, where)
    p = _softmax(x, axes, where)
    dy = dx - jnp.sum(p * dx, axes, where=where, keepdims=True)
    keep = ~empty if where is None else where & ~empty
    return y, jnp.where(keep, dy, 0.0)


def safe_log_softmax(x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None) -> Array:
    r"""Log-softmax that is finite, with gradient 0, on a row with no valid entry.

    .. math::
        \mathrm{log\_softmax}(x)_i = x_i - m - \log \sum_{j\ \mathrm{valid}}
          \exp(x_j - m)

    A row with a valid entry gives ``jax.nn.log_softmax(x, axis, where)``
    (``-inf`` at its masked entries and ``-inf`` logits: the exact log of
    probability 0). A row where every entry is masked out or ``-inf`` gives
    ``log(tiny)`` everywhere (``-87.34`` for float32 and the half types,
    ``-708.4`` for float64; the value of :func:`stablejax.safe_log` at 0), with
    gradient 0.

    Args:
      x: floating-point logits.
      axis: the axis or axes normalized over (``None``: all).
      where: optional boolean mask broadcastable to ``x``.

    Returns:
      An array of the shape and dtype of ``x``.

    Raises:
      TypeError: for integer ``x``, a non-boolean ``where`` or a non-int axis.
      ValueError: for an axis out of range or a mask that does not broadcast.

    Examples:
      >>> import jax.numpy as jnp, stablejax
      >>> stablejax.safe_log_softmax(jnp.zeros(2), where=jnp.array([False, False]))
      Array([-87.33655, -87.33655], dtype=float32)
    """
    xc, dtype, axes, mask = _prepare(x, axis, where, "safe_log_softmax")
    return _log_softmax(xc, axes, mask).astype(dtype)


# --------------------------------------------------------------------------- logsumexp


def _logsumexp_parts(x: Array, axes: tuple[int, ...], where: Array | None):
    """jax.nn.logsumexp's arithmetic, keepdims; also returns the row's softmax.

    Masked entries are set to ``-inf`` (jax sets 0): they are left out of the max
    and the sum either way, so the result is the same, and their ``exp`` is 0.
    """
    a = x if where is None else jnp.where(where, x, -jnp.inf)
    amax = jnp.max(a, axes, where=where, initial=-jnp.inf, keepdims=True)
    empty = amax == -jnp.inf
    amax = jax.lax.stop_gradient(jnp.where(jnp.isfinite(amax), amax, 0.0))
    e = jnp.exp(a - amax)
    total = jnp.abs(jnp.sum(e, axes, where=where, keepdims=True))
    safe_total = jnp.where(empty, 1.0, total)
    out = jnp.where(empty, _log_tiny(x.dtype), jnp.log(safe_total) + amax)
    return out, e / safe_total


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 3))
def _logsumexp(x: Array, axes: tuple[int, ...], where: Array | None, keepdims: bool) -> Array:
    out, _ = _logsumexp_parts(x, axes, where)
    return out if keepdims else jnp.squeeze(out, axes)


@_logsumexp.defjvp
def _logsumexp_jvp(axes, keepdims, primals, tangents):
    r"""Derivative of :func:`safe_logsumexp`.

    .. math::
        \dot y = \sum_{j\ \mathrm{valid}} \mathrm{softmax}(x)_j \dot x_j

    which is 0 on a row with no valid entry (every probability is 0 there). The
    probabilities reuse the forward's exponentials (one pass, as autodiff of
    ``jax.nn.logsumexp``).
    """
    (x, where), (dx, _) = primals, tangents
    out, p = _logsumexp_parts(x, axes, where)
    y = out if keepdims else jnp.squeeze(out, axes)
    return y, jnp.sum(p * dx, axes, where=where, keepdims=keepdims)


def safe_logsumexp(
    x: ArrayLike, axis: Axis = None, *, where: ArrayLike | None = None, keepdims: bool = False
) -> Array:
    r"""Logsumexp that is finite, with gradient 0, on a row with no valid entry.

    .. math::
        \mathrm{logsumexp}(x) = m + \log \sum_{j\ \mathrm{valid}} \exp(x_j - m)

    A row with a valid entry gives ``jax.nn.logsumexp(x, axis, keepdims=...,
    where=...)``. A row where every entry is masked out or ``-inf`` gives
    ``log(tiny)`` (``-87.34`` in float32; ``jax.nn`` gives ``-inf``) with gradient
    0. The derivative is the softmax of the row elsewhere. The ``b=`` and
    ``return_sign=`` arguments of ``jax.nn.logsumexp`` are not offered.

    Args:
      x: floating-point array.
      axis: the axis or axes reduced over (``None``, the default: all, as in jax).
      where: optional boolean mask broadcastable to ``x``.
      keepdims: keep the reduced axes with size 1.

    Returns:
      The reduction, in the dtype of ``x``.

    Raises:
      TypeError: for integer ``x``, a non-boolean ``where``, a non-int axis or a
        non-bool ``keepdims``.
      ValueError: for an axis out of range or a mask that does not broadcast.

    Examples:
      >>> import jax, jax.numpy as jnp, stablejax
      >>> x = jnp.array([[0.0, 0.0], [-jnp.inf, -jnp.inf]])
      >>> stablejax.safe_logsumexp(x, axis=1)
      Array([  0.6931472, -87.33655  ], dtype=float32)
      >>> jax.grad(lambda v: stablejax.safe_logsumexp(v, axis=1).sum())(x)
      Array([[0.5, 0.5],
             [0. , 0. ]], dtype=float32)
    """
    if not isinstance(keepdims, bool):
        raise TypeError(f"safe_logsumexp: `keepdims` must be a bool, got {keepdims!r}.")
    xc, dtype, axes, mask = _prepare(x, axis, where, "safe_logsumexp")
    return _logsumexp(xc, axes, mask, keepdims).astype(dtype)
