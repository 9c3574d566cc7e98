"""Regression losses with finite gradients at a perfect prediction.

``jnp.sqrt(jnp.mean((pred - y)**2))`` (RMSE) and ``jnp.sqrt((pred - y)**2)``
(MAE written through a square root) have gradient NaN when the prediction is
perfect: ``d sqrt`` at 0 is infinite and meets a zero. These losses give the
minimum-norm subgradient, 0, there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stablejax._src import validation
from stablejax._src.numerics.dtypes import compute_dtype
from stablejax._src.numerics.reductions import _norm
from stablejax._src.typing import Array, ArrayLike, Axis


@jax.custom_jvp
def _abs0(x: Array) -> Array:
    return jnp.abs(x)


@_abs0.defjvp
def _abs0_jvp(primals, tangents):
    r"""Derivative :math:`\mathrm{sign}(x)`, 0 at ``x = 0`` (``jnp.abs`` gives 1 there)."""
    (x,), (dx,) = primals, tangents
    return jnp.abs(x), jnp.sign(x) * dx


def _prepare(name: str, pred: ArrayLike, target: ArrayLike, axis: Axis, where):
    validation.check_float("pred", pred, name)
    validation.check_float("target", target, name)
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(
            f"{name}: pred has shape {pred.shape} but target has shape {target.shape}; "
            "they must match (reshape the target, e.g. target[..., None])."
        )
    dtype = jnp.result_type(pred, target)
    ct = compute_dtype(dtype)
    diff = pred.astype(ct) - target.astype(ct)
    axes = validation.canonical_axes(diff.ndim, axis, name)
    mask = validation.broadcast_mask(where, diff.shape, name)
    if mask is None:
        mask = jnp.ones(diff.shape, bool)
    diff = jnp.where(mask, diff, 0.0)
    count = jnp.maximum(jnp.sum(mask, axis=axes, dtype=ct), 1.0)
    return diff, count, axes, dtype


def mae(
    pred: ArrayLike, target: ArrayLike, *, axis: Axis = None, where: ArrayLike | None = None
) -> Array:
    r"""Mean absolute error with gradient 0 at a perfect prediction.

    .. math::
        \mathrm{MAE} = \tfrac1c \textstyle\sum_{i \in v} |p_i - y_i|, \qquad
        \partial / \partial p_i = \mathrm{sign}(p_i - y_i) / c

    over the ``c`` valid entries; ``sign(0) = 0``. Entries masked out by
    ``where`` (NaN included) are ignored; a fully masked reduction gives 0.

    Args:
      pred: floating-point predictions.
      target: floating-point targets, shaped like ``pred``.
      axis: axes to average over (None: all).
      where: optional boolean mask broadcastable to ``pred``.

    Returns:
      The loss, in the dtype of the inputs.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from stablejax import losses
      >>> jax.grad(losses.mae)(jnp.ones(2), jnp.ones(2))
      Array([0., 0.], dtype=float32)
    """
    diff, count, axes, dtype = _prepare("mae", pred, target, axis, where)
    return (jnp.sum(_abs0(diff), axis=axes) / count).astype(dtype)


def rmse(
    pred: ArrayLike, target: ArrayLike, *, axis: Axis = None, where: ArrayLike | None = None
) -> Array:
    r"""Root-mean-square error with gradient 0 at a perfect prediction.

    .. math::
        \mathrm{RMSE} = \sqrt{\tfrac1c \textstyle\sum_{i \in v} (p_i - y_i)^2}
          = \frac{\|p - y\|_v}{\sqrt c}, \qquad
        \nabla_p = \frac{p - y}{c\,\mathrm{RMSE}} \text{ (0 when RMSE = 0)}

    computed through :func:`stablejax.safe_norm`, so the gradient is bounded by
    :math:`1/\sqrt c` and finite for any finite input.

    Args:
      pred: floating-point predictions.
      target: floating-point targets, shaped like ``pred``.
      axis: axes to average over (None: all).
      where: optional boolean mask broadcastable to ``pred``.

    Returns:
      The loss, in the dtype of the inputs.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from stablejax import losses
      >>> jax.grad(losses.rmse)(jnp.ones(2), jnp.ones(2))
      Array([0., 0.], dtype=float32)
    """
    diff, count, axes, dtype = _prepare("rmse", pred, target, axis, where)
    return (_norm(diff, axes, False) / jnp.sqrt(count)).astype(dtype)
