"""Flax linen layers: thin adapters that fetch parameters and call the core.

``LayerNorm`` and ``RMSNorm`` subclass flax's own, so they take the same
constructor arguments, create the same parameters (``scale``, ``bias``) with the
same shapes, and give the same outputs for ``epsilon > 0``; ``epsilon = 0`` is
exact and finite (see :mod:`stablejax._src.layers.core`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stablejax._src import validation
from stablejax._src.layers import core
from stablejax._src.typing import Array


def _params(mdl: nn.Module, x: Array, use_scale: bool, use_bias: bool, bias_init=None):
    """Creates ``scale``/``bias`` exactly as flax's ``_normalize`` does."""
    feat = validation.canonical_axes(jnp.ndim(x), mdl.feature_axes, type(mdl).__name__)
    shape = [jnp.shape(x)[a] for a in feat]
    cast = (lambda p: p) if mdl.force_float32_reductions else (
        lambda p: jnp.asarray(p, mdl.param_dtype))
    scale = cast(mdl.param("scale", mdl.scale_init, shape, mdl.param_dtype)) if use_scale else None
    bias = cast(mdl.param("bias", bias_init, shape, mdl.param_dtype)) if use_bias else None
    return scale, bias


class LayerNorm(nn.LayerNorm):
    r"""Drop-in for :class:`flax.linen.LayerNorm` that is exact and finite at ``epsilon=0``.

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    Same fields, parameter names and shapes as flax's layer, and the same output
    for ``epsilon > 0``. With ``epsilon=0`` the formula is exact (no bias at small
    scale, where flax's default epsilon makes an input of std 1e-3 come out with
    std 0.71), a constant row gives :math:`\beta` and gradient 0 (flax gives NaN),
    and the derivative is bounded near constant rows by a floor on :math:`\sigma`
    that acts in the backward pass only.

    Raises:
      ValueError: for a negative or non-finite ``epsilon`` (at construction) or an
        axis out of range (at the first call).
      TypeError: for an integer input.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from stablejax import nn
      >>> layer = nn.LayerNorm(epsilon=0.0)
      >>> x = jnp.ones((2, 4))
      >>> params = layer.init(jax.random.key(0), x)
      >>> layer.apply(params, x)
      Array([[0., 0., 0., 0.],
             [0., 0., 0., 0.]], dtype=float32)
    """

    def __post_init__(self):
        validation.check_nonnegative("epsilon", self.epsilon, "stablejax.nn.LayerNorm")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, *, mask: jax.Array | None = None) -> Array:
        where = "stablejax.nn.LayerNorm"
        core.check_layer_input(
            x, mask, self.epsilon, self.reduction_axes, self.feature_axes, where)
        if self.epsilon != 0:  # flax's own code: equal bit for bit, eager and jitted
            return super().__call__(x, mask=mask)
        scale, bias = _params(self, x, self.use_scale, self.use_bias, self.bias_init)
        return core.layer_norm(
            x, scale, bias, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
            epsilon=0.0, dtype=self.dtype, use_mean=True,
            use_fast_variance=self.use_fast_variance, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, mask=mask,
            force_float32_reductions=self.force_float32_reductions, where=where,
        )


class RMSNorm(nn.RMSNorm):
    r"""Drop-in for :class:`flax.linen.RMSNorm` that is exact and finite at ``epsilon=0``.

    .. math::
        y = \frac{x}{\sqrt{\overline{x^2} + \epsilon}}\,\gamma

    Same fields, parameter and output as flax's layer for ``epsilon > 0``; at
    ``epsilon=0`` a zero row gives 0 with gradient 0 instead of NaN.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from stablejax import nn
      >>> layer = nn.RMSNorm(epsilon=0.0)
      >>> params = layer.init(jax.random.key(0), jnp.zeros((1, 3)))
      >>> jax.grad(lambda x: layer.apply(params, x).sum())(jnp.zeros((1, 3)))
      Array([[0., 0., 0.]], dtype=float32)
    """

    def __post_init__(self):
        validation.check_nonnegative("epsilon", self.epsilon, "stablejax.nn.RMSNorm")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, *, mask: jax.Array | None = None) -> Array:
        where = "stablejax.nn.RMSNorm"
        core.check_layer_input(
            x, mask, self.epsilon, self.reduction_axes, self.feature_axes, where)
        if self.epsilon != 0:
            return super().__call__(x, mask=mask)
        scale, _ = _params(self, x, self.use_scale, False)
        return core.layer_norm(
            x, scale, None, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
            epsilon=0.0, dtype=self.dtype, use_mean=False,
            use_fast_variance=self.use_fast_variance, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, mask=mask,
            force_float32_reductions=self.force_float32_reductions, where=where,
        )


class L2Normalize(nn.Module):
    r"""``x / ||x||`` over ``axis``, with an optional learnable scalar scale.

    .. math::
        y = s\,\frac{x}{\|x\|}

    As in cosine-similarity heads. The zero vector maps to 0 with gradient 0
    (``x / jnp.linalg.norm(x)`` gives NaN forward and backward); the forward is
    exact elsewhere (no epsilon), see :func:`stablejax.safe_normalize`.

    Attributes:
      axis: the axis or axes the norm runs over.
      use_scale: learn a scalar ``scale`` parameter.
      scale_init: initializer of the scale (e.g. ``nn.initializers.constant(10.)``).
      dtype: output dtype (default: inferred from input and parameters).
      param_dtype: dtype of the scale.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from stablejax import nn
      >>> nn.L2Normalize().apply({}, jnp.array([[3.0, 4.0], [0.0, 0.0]]))
      Array([[0.6, 0.8],
             [0. , 0. ]], dtype=float32)
    """

    axis: int | tuple[int, ...] = -1
    use_scale: bool = False
    scale_init: Any = nn.initializers.ones
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = None
        if self.use_scale:
            scale = self.param("scale", self.scale_init, (), self.param_dtype)
        return core.l2_normalize(x, self.axis, scale, self.dtype, "stablejax.nn.L2Normalize")


class StdPool(nn.Module):
    r"""Statistics pooling: mean and standard deviation over the time axis.

    .. math::
        \mathrm{StdPool}(x) = [\mu, \sigma], \quad
        \sigma = \sqrt{\tfrac1c \textstyle\sum_{t \in v}(x_t - \mu)^2}

    As in x-vector speaker embeddings. A silent (constant) utterance gives
    :math:`\sigma = 0` with gradient 0, where ``jnp.std`` gives NaN gradients.

    Attributes:
      axis: the time axis (default -2, for inputs shaped ``(batch, time, features)``).
      output: ``'mean_std'`` (concatenated on the feature axis) or ``'std'``.
      dtype: output dtype (default: the input's).

    The call takes an optional ``mask`` shaped like the input without its feature
    axis, True on valid frames.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from stablejax import nn
      >>> x = jnp.zeros((1, 5, 2))  # a silent utterance
      >>> jax.grad(lambda x: nn.StdPool().apply({}, x).sum())(x).max()
      Array(0.2, dtype=float32)
    """

    axis: int = -2
    output: str = "mean_std"
    dtype: Any = None

    def __post_init__(self):
        core.check_std_pool_config(self.axis, self.output, "stablejax.nn.StdPool", self.dtype)
        super().__post_init__()

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        return core.std_pool(x, mask, self.axis, self.output, self.dtype, "stablejax.nn.StdPool")
