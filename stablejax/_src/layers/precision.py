"""A float16 (or bfloat16) compute policy for flax models, linen and NNX.

Flax layers keep two dtypes: ``param_dtype``, what the parameters are stored in,
and ``dtype``, what the layer computes in (parameters are cast to it on the fly,
so their gradients come back in ``param_dtype``). Mixed precision is therefore a
choice of ``dtype`` per layer: the matmuls in float16, the layers whose
reductions overflow or lose precision in float16 (normalisations, the attention
softmax) in float32, and the loss on float32 logits. :class:`Policy` makes that
choice for every flax layer of a model, without editing the model's code:

* linen: ``policy.apply(model.apply)`` runs ``apply`` with every layer's
  ``dtype`` set for the call (through ``flax.linen.intercept_methods``);
* NNX: ``policy.configure(model)`` sets the ``dtype`` attribute of every layer
  of the (already built) model in place.

Parameters are never cast in the tree: they stay in float32 (master weights),
and the optimizer sees float32 gradients.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from stablejax._src.layers import linen as sj_linen
from stablejax._src.layers import nnx as sj_nnx
from stablejax._src.typing import PyTree

_WHERE = "stablejax.nn.mixed_precision"

# Layers that normalise or pool statistics: their reductions run in float32
# (flax's own norms upcast the statistics only when their dtype says so).
_LINEN_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm, nn.InstanceNorm,
                sj_linen.L2Normalize, sj_linen.StdPool)
_NNX_NORMS = (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm, nnx.BatchNorm, nnx.InstanceNorm,
              sj_nnx.L2Normalize, sj_nnx.StdPool)


def _float_dtype(name: str, value: Any) -> jnp.dtype:
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{_WHERE}: `{name}` must be a floating-point dtype, got {value!r} "
            "(e.g. jnp.float16)."
        )
    return dtype


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtype each kind of flax layer computes in.

    Attributes:
      compute_dtype: dtype of every layer that is not a normalisation (Dense,
        Conv, Embed, attention projections...), e.g. float16.
      param_dtype: dtype the parameters are created and kept in (float32).
      norm_dtype: dtype of the normalisation layers (LayerNorm, RMSNorm,
        GroupNorm, BatchNorm, InstanceNorm, and stablejax's, L2Normalize and
        StdPool included), of the attention
        softmax, and of the model's outputs (so the loss is computed on float32
        logits).
    """

    compute_dtype: Any = jnp.float16
    param_dtype: Any = jnp.float32
    norm_dtype: Any = jnp.float32

    def dtype_for(self, layer: Any) -> Any:
        """The ``dtype`` this policy gives ``layer`` (a linen or NNX module)."""
        if isinstance(layer, _LINEN_NORMS + _NNX_NORMS):
            return self.norm_dtype
        return self.compute_dtype

    def cast_output(self, tree: PyTree) -> PyTree:
        """Casts the floating-point leaves of ``tree`` to ``norm_dtype`` (for the loss)."""

        def cast(x):
            if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
                return x.astype(self.norm_dtype)
            return x

        return jax.tree.map(cast, tree)

    # ----------------------------------------------------------------- linen
    def _intercept(self, next_fun, args, kwargs, context):
        module = context.module
        fields = getattr(type(module), "__dataclass_fields__", {})
        if context.method_name != "__call__" and context.method_name != "attend":
            return next_fun(*args, **kwargs)
        saved = {}
        if "dtype" in fields:
            saved["dtype"] = module.dtype
        if "param_dtype" in fields:
            saved["param_dtype"] = module.param_dtype
        if "force_fp32_for_softmax" in fields and self.norm_dtype == jnp.float32:
            saved["force_fp32_for_softmax"] = module.force_fp32_for_softmax
        if not saved:
            return next_fun(*args, **kwargs)
        # Linen modules are frozen dataclasses: the fields are set for this call
        # only and restored after it, so the model object itself is unchanged.
        if "dtype" in saved:
            object.__setattr__(module, "dtype", self.dtype_for(module))
        if "param_dtype" in saved:
            object.__setattr__(module, "param_dtype", self.param_dtype)
        if "force_fp32_for_softmax" in saved:
            object.__setattr__(module, "force_fp32_for_softmax", True)
        try:
            return next_fun(*args, **kwargs)
        finally:
            for name, value in saved.items():
                object.__setattr__(module, name, value)

    def apply(self, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
        """Wraps a linen ``model.apply`` (or ``model.init``) to run under this policy.

        Every linen layer with a ``dtype`` field computes in :meth:`dtype_for`
        it for the duration of the call; attention modules compute their
        softmax in float32; floating-point outputs are cast to ``norm_dtype``.
        Under ``init`` every layer creates its parameters in ``param_dtype``.

        Examples:
          >>> import jax, jax.numpy as jnp, flax.linen as nn
          >>> from stablejax.nn import mixed_precision
          >>> model, policy = nn.Dense(3), mixed_precision()
          >>> params = model.init(jax.random.key(0), jnp.ones((1, 2)))
          >>> jax.make_jaxpr(policy.apply(model.apply))(params, jnp.ones((1, 2))).out_avals
          [ShapedArray(float32[1,3])]
        """

        @functools.wraps(apply_fn)
        def wrapped(*args, **kwargs):
            with nn.intercept_methods(self._intercept):
                return self.cast_output(apply_fn(*args, **kwargs))

        return wrapped

    # ------------------------------------------------------------------- nnx
    def configure(self, model: nnx.Module) -> nnx.Module:
        """Sets the ``dtype`` of every layer of an NNX model in place; returns it.

        The parameters exist already and are left as they are (build the model
        with flax's default ``param_dtype=float32``). Attention modules keep
        their softmax in float32 (their ``attention_fn`` is wrapped to compute
        the attention weights in ``norm_dtype``). Calling it again with another
        policy re-configures the model.

        Examples:
          >>> import jax.numpy as jnp
          >>> from flax import nnx
          >>> from stablejax.nn import mixed_precision
          >>> model = mixed_precision().configure(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
          >>> model(jnp.ones((1, 2))).dtype, model.kernel[...].dtype
          (dtype('float16'), dtype('float32'))
        """
        if not isinstance(model, nnx.Module):
            raise TypeError(
                f"stablejax.nn.Policy.configure: expected an flax.nnx.Module, got "
                f"{type(model).__name__}; for linen use policy.apply(model.apply)."
            )
        for _, node in nnx.iter_graph(model):
            if not isinstance(node, nnx.Module):
                continue
            if hasattr(node, "dtype") and not isinstance(node, nnx.Variable):
                node.dtype = self.dtype_for(node)
            if isinstance(node, nnx.MultiHeadAttention):
                fn = getattr(node.attention_fn, "_stablejax_inner", node.attention_fn)
                node.attention_fn = _attention_in(fn, self.norm_dtype)
        return model


def _attention_in(fn: Callable[..., Any], dtype: Any) -> Callable[..., Any]:
    """``fn`` with query, key and value cast to ``dtype``; the result in the caller's dtype."""

    def attention(query, key, value, *args, **kwargs):
        out_dtype = kwargs.pop("dtype", None) or query.dtype
        kwargs["dtype"] = dtype
        out = fn(query.astype(dtype), key.astype(dtype), value.astype(dtype), *args, **kwargs)
        return out.astype(out_dtype)

    attention._stablejax_inner = fn  # so that configure() can be called again
    return attention


def mixed_precision(
    compute_dtype: Any = jnp.float16,
    *,
    param_dtype: Any = jnp.float32,
    norm_dtype: Any = jnp.float32,
) -> Policy:
    """The float16 policy: float32 parameters, float16 compute, float32 norms/softmax/loss.

    One line on an existing model, linen or NNX::

        policy = stablejax.nn.mixed_precision()
        logits = policy.apply(model.apply)(params, tokens)   # linen
        model = policy.configure(model)                      # NNX, in place

    With float16 compute, train with :func:`stablejax.optim.dynamic_loss_scale`
    (float16's range is too small for unscaled gradients); bfloat16 needs none.

    Args:
      compute_dtype: dtype of the matmuls (float16 or bfloat16).
      param_dtype: dtype of the parameters (float32).
      norm_dtype: dtype of the norms, the attention softmax and the outputs.

    Returns:
      A :class:`Policy`.

    Raises:
      TypeError: if a dtype is not a floating-point dtype.
    """
    return Policy(
        compute_dtype=_float_dtype("compute_dtype", compute_dtype),
        param_dtype=_float_dtype("param_dtype", param_dtype),
        norm_dtype=_float_dtype("norm_dtype", norm_dtype),
    )
