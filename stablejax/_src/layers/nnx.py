"""Flax NNX layers: thin adapters over the same core as the linen layers.

``LayerNorm`` and ``RMSNorm`` subclass ``flax.nnx``'s own: same constructor,
same ``scale``/``bias`` parameters, same outputs for ``epsilon > 0``; exact and
finite at ``epsilon = 0``.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax.numpy as jnp
from flax import nnx

from stablejax._src import validation
from stablejax._src.layers import core
from stablejax._src.typing import Array


class LayerNorm(nnx.LayerNorm):
    r"""Drop-in for :class:`flax.nnx.LayerNorm`, exact and finite at ``epsilon=0``.

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    Takes exactly the arguments of ``nnx.LayerNorm``; see
    :class:`stablejax.nn.LayerNorm` for the behaviour at ``epsilon=0``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from stablejax import nnx as snnx
      >>> layer = snnx.LayerNorm(3, epsilon=0.0, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((1, 3)))
      Array([[0., 0., 0.]], dtype=float32)
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, **kwargs: Any):
        validation.check_nonnegative("epsilon", epsilon, "stablejax.nnx.LayerNorm")
        super().__init__(num_features, epsilon=epsilon, **kwargs)

    __init__.__signature__ = inspect.signature(nnx.LayerNorm.__init__)

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        where = "stablejax.nnx.LayerNorm"
        core.check_layer_input(
            x, mask, self.epsilon, self.reduction_axes, self.feature_axes, where)
        if self.epsilon != 0:  # flax's own code: equal bit for bit, eager and jitted
            return super().__call__(x, mask=mask)
        scale = self.scale[...] if self.use_scale else None
        bias = self.bias[...] if self.use_bias else None
        x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
        return core.layer_norm(
            x, scale, bias, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
            epsilon=0.0, dtype=self.dtype, use_mean=True,
            use_fast_variance=self.use_fast_variance, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, mask=mask, where=where,
        )


class RMSNorm(nnx.RMSNorm):
    r"""Drop-in for :class:`flax.nnx.RMSNorm`, exact and finite at ``epsilon=0``.

    .. math::
        y = \frac{x}{\sqrt{\overline{x^2} + \epsilon}}\,\gamma

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from stablejax import nnx as snnx
      >>> snnx.RMSNorm(2, epsilon=0.0, rngs=nnx.Rngs(0))(jnp.zeros((1, 2)))
      Array([[0., 0.]], dtype=float32)
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, **kwargs: Any):
        validation.check_nonnegative("epsilon", epsilon, "stablejax.nnx.RMSNorm")
        super().__init__(num_features, epsilon=epsilon, **kwargs)

    __init__.__signature__ = inspect.signature(nnx.RMSNorm.__init__)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        where = "stablejax.nnx.RMSNorm"
        core.check_layer_input(
            x, mask, self.epsilon, self.reduction_axes, self.feature_axes, where)
        if self.epsilon != 0:
            return super().__call__(x, mask=mask)
        scale = self.scale[...] if self.use_scale else None
        x, scale = self.promote_dtype((x, scale), dtype=self.dtype)
        return core.layer_norm(
            x, scale, None, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
            epsilon=0.0, dtype=self.dtype, use_mean=False,
            use_fast_variance=self.use_fast_variance, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, mask=mask, where=where,
        )


class L2Normalize(nnx.Module):
    r"""``x / ||x||`` over ``axis`` with an optional learnable scalar scale (NNX).

    .. math::
        y = s\,\frac{x}{\|x\|}

    See :class:`stablejax.nn.L2Normalize`. ``rngs`` is needed only when
    ``use_scale`` is true.

    Examples:
      >>> import jax.numpy as jnp
      >>> from stablejax import nnx as snnx
      >>> snnx.L2Normalize()(jnp.array([0.0, 0.0]))
      Array([0., 0.], dtype=float32)
    """

    def __init__(
        self,
        axis: int | tuple[int, ...] = -1,
        *,
        use_scale: bool = False,
        scale_init: Any = nnx.initializers.ones,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.axis = axis
        self.use_scale = use_scale
        self.dtype = dtype
        if use_scale:
            if rngs is None:
                raise ValueError(
                    "stablejax.nnx.L2Normalize: use_scale=True needs rngs, e.g. rngs=nnx.Rngs(0)."
                )
            self.scale = nnx.Param(scale_init(rngs.params(), (), param_dtype))
        else:
            self.scale = nnx.data(None)

    def __call__(self, x: Array) -> Array:
        scale = self.scale[...] if self.use_scale else None
        return core.l2_normalize(x, self.axis, scale, self.dtype, "stablejax.nnx.L2Normalize")


class StdPool(nnx.Module):
    r"""Statistics pooling over the time axis (NNX): ``[mean, std]`` or ``std``.

    See :class:`stablejax.nn.StdPool`; the call takes an optional ``mask``
    shaped like the input without its feature axis.

    Examples:
      >>> import jax.numpy as jnp
      >>> from stablejax import nnx as snnx
      >>> snnx.StdPool(output="std")(jnp.ones((1, 4, 2)))
      Array([[0., 0.]], dtype=float32)
    """

    def __init__(self, axis: int = -2, *, output: str = "mean_std", dtype: Any = None):
        core.check_std_pool_config(axis, output, "stablejax.nnx.StdPool", dtype)
        self.axis = axis
        self.output = output
        self.dtype = dtype

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        return core.std_pool(x, mask, self.axis, self.output, self.dtype, "stablejax.nnx.StdPool")
