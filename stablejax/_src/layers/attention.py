"""Dot-product attention that survives fully masked rows, for linen and NNX from one core.

Flax replaces masked logits by ``finfo(dtype).min`` before ``jax.nn.softmax``. A
query whose keys are all masked (a padding query, an empty segment, a causal
mask over left padding) then attends uniformly to every key: its output is the
mean of the values, which leaks padding into the model and its gradient. With a
``-inf`` bias instead of a mask the row is ``0/0 = NaN``. Here the softmax is
:func:`stablejax.safe_softmax` with the mask as ``where``: a row with no valid
key gets weights 0, so its output is 0 and no gradient flows through it.

A row with a valid key gives flax's weights: masked logits contribute ``exp`` of
``-inf`` (exactly 0) where flax's contribute ``exp(finfo.min - max)`` (also
exactly 0), so float32 and float64 outputs equal ``flax.linen``'s bit for bit.
In bfloat16 and float16 the softmax arithmetic is float32 (flax's is in the
input dtype unless ``force_fp32_for_softmax``). ``flax.nnx.dot_product_attention``
takes ``jax.nn.dot_product_attention``'s path without dropout, which scales the
logits in a different order: equal to rounding.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype as linen_promote_dtype

from stablejax._src.numerics.softmax import safe_softmax
from stablejax._src.typing import Array


def _check_mask(mask: Any) -> Any:
    if mask is not None and jnp.result_type(mask) != jnp.bool_:
        raise TypeError(
            "dot_product_attention: `mask` must be boolean, got dtype "
            f"{jnp.result_type(mask)} (a float mask would count 0.5 as True). "
            "Pass `mask=mask > 0`, or a bias for soft masking."
        )
    return mask


def attention_weights(
    query: Array,
    key: Array,
    bias: Array | None,
    mask: Array | None,
    *,
    broadcast_dropout: bool,
    dropout_rng: Any,
    dropout_rate: float,
    deterministic: bool,
    einsum: Callable[..., Array],
    force_fp32_for_softmax: bool = False,
    sow: Callable[[Array], None] | None = None,
) -> Array:
    r"""The core: masked, scaled dot-product weights with the safe softmax.

    .. math::
        w = \mathrm{safe\_softmax}\Big(\frac{q k^\top}{\sqrt d} + b,\
          \mathrm{where}=m\Big)

    ``query``/``key`` are ``[batch..., length, heads, depth]`` and already promoted
    to one dtype; query heads may be a multiple of key heads (grouped-query
    attention, as ``flax.nnx``). Returns ``[batch..., heads, q_length, kv_length]``.
    """
    dtype = query.dtype
    if query.ndim != key.ndim or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"dot_product_attention: query {query.shape} and key {key.shape} must have the same "
            "rank and depth ([batch..., length, heads, depth])."
        )
    q_heads, k_heads = query.shape[-2], key.shape[-2]
    if q_heads % k_heads:
        raise ValueError(
            f"dot_product_attention: query heads ({q_heads}) must be a multiple of key heads "
            f"({k_heads})."
        )
    query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
    if q_heads == k_heads:
        logits = einsum("...qhd,...khd->...hqk", query, key)
    else:
        rep = q_heads // k_heads
        query = query.reshape(query.shape[:-2] + (k_heads, rep, query.shape[-1]))
        logits = einsum("...qhgd,...kh1d->...hgqk", query, jnp.expand_dims(key, -2))
        logits = logits.reshape(logits.shape[:-4] + (q_heads,) + logits.shape[-2:])
    if bias is not None:
        logits = logits + bias
    where = None if mask is None else jnp.broadcast_to(mask, logits.shape)
    if force_fp32_for_softmax and dtype != jnp.float32:
        weights = safe_softmax(logits.astype(jnp.float32), where=where)
    else:
        weights = safe_softmax(logits, where=where).astype(dtype)
    if sow is not None:
        sow(weights)
    if not deterministic and dropout_rate > 0.0:
        keep_prob = 1.0 - dropout_rate
        shape = (1,) * (key.ndim - 2) + weights.shape[-2:] if broadcast_dropout else weights.shape
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
        weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype))
    return weights


def attend(weights: Array, value: Array, einsum: Callable[..., Array]) -> Array:
    """``[batch..., heads, q, k] x [batch..., k, heads_v, d] -> [batch..., q, heads, d]``."""
    q_heads, v_heads = weights.shape[-3], value.shape[-2]
    if q_heads == v_heads:
        return einsum("...hqk,...khd->...qhd", weights, value)
    if q_heads % v_heads:
        raise ValueError(
            f"dot_product_attention: query heads ({q_heads}) must be a multiple of value heads "
            f"({v_heads})."
        )
    w = weights.reshape(weights.shape[:-3] + (v_heads, q_heads // v_heads) + weights.shape[-2:])
    out = einsum("...hgqk,...kh1d->...qhgd", w, jnp.expand_dims(value, -2))
    return out.reshape(out.shape[:-3] + (q_heads, out.shape[-1]))


def _linen_einsum(precision, einsum_dot_general, einsum):
    if (precision or einsum_dot_general) and einsum:
        raise ValueError(
            "dot_product_attention: precision/einsum_dot_general and an einsum are mutually "
            "exclusive; pass only one of them."
        )
    return einsum or functools.partial(
        jnp.einsum, precision=precision, _dot_general=einsum_dot_general or jax.lax.dot_general)


def linen_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Any = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Callable[..., Array] | None = None,
    qk_attn_weights_einsum: Callable[..., Array] | None = None,
    attn_weights_value_einsum: Callable[..., Array] | None = None,
) -> Array:
    r"""Drop-in for :func:`flax.linen.dot_product_attention`, zero on fully masked rows.

    Same arguments and result as flax's; a query with no valid key (every key
    masked, or every logit ``-inf``) gives output 0 and gradient 0 where flax
    gives the mean of the values (or NaN for ``-inf`` logits). Pass it to a layer
    as ``flax.linen.MultiHeadDotProductAttention(attention_fn=...)``.

    Raises:
      TypeError: for a non-boolean ``mask``.
      ValueError: for mismatched shapes or conflicting einsum arguments.

    Examples:
      >>> import jax.numpy as jnp
      >>> from stablejax import nn
      >>> q = k = v = jnp.ones((1, 2, 1, 4))                      # [batch, length, heads, depth]
      >>> mask = jnp.array([[True, True], [False, False]])[None, None]  # query 1 sees nothing
      >>> nn.dot_product_attention(q, k, v, mask=mask)[0, :, 0, 0]
      Array([1., 0.], dtype=float32)
    """
    if bool(qk_attn_weights_einsum) != bool(attn_weights_value_einsum):
        raise ValueError(
            "dot_product_attention: qk_attn_weights_einsum and attn_weights_value_einsum must be "
            "given together."
        )
    query, key, value = linen_promote_dtype(query, key, value, dtype=dtype)
    sow = None if not module else (
        lambda w: module.sow("intermediates", "attention_weights", w))
    weights = attention_weights(
        query, key, bias, _check_mask(mask), broadcast_dropout=broadcast_dropout,
        dropout_rng=dropout_rng, dropout_rate=dropout_rate, deterministic=deterministic,
        einsum=_linen_einsum(precision, einsum_dot_general, qk_attn_weights_einsum),
        force_fp32_for_softmax=force_fp32_for_softmax, sow=sow)
    return attend(weights, value,
                  _linen_einsum(precision, einsum_dot_general, attn_weights_value_einsum))


def nnx_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    promote_dtype: Callable[..., Any] = nnx.nn.dtypes.promote_dtype,
    is_causal: bool = False,
) -> Array:
    r"""Drop-in for :func:`flax.nnx.dot_product_attention`, zero on fully masked rows.

    Same arguments as flax's (``is_causal`` included, grouped-query heads
    allowed); a query with no valid key gives output 0 and gradient 0. Pass it to
    a layer as ``flax.nnx.MultiHeadAttention(..., attention_fn=...)``.

    Raises:
      TypeError: for a non-boolean ``mask``.
      ValueError: for mismatched shapes.

    Examples:
      >>> import jax.numpy as jnp
      >>> from stablejax import nnx as snnx
      >>> q = k = v = jnp.ones((1, 2, 1, 4))
      >>> mask = jnp.array([[True, True], [False, False]])[None, None]
      >>> snnx.dot_product_attention(q, k, v, mask=mask)[0, :, 0, 0]
      Array([1., 0.], dtype=float32)
    """
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    mask = _check_mask(mask)
    if is_causal:
        causal = jnp.tril(jnp.ones((query.shape[-3], key.shape[-3]), bool))
        if mask is not None:
            shape = jnp.broadcast_shapes(jnp.shape(mask), causal.shape)
            causal = jnp.broadcast_to(mask, shape) & jnp.broadcast_to(causal, shape)
        mask = causal
    sow = None if not module else (
        lambda w: module.sow(nnx.Intermediate, "attention_weights", w))
    einsum = functools.partial(jnp.einsum, precision=precision)
    weights = attention_weights(
        query, key, bias, mask, broadcast_dropout=broadcast_dropout, dropout_rng=dropout_rng,
        dropout_rate=dropout_rate, deterministic=deterministic, einsum=einsum, sow=sow)
    return attend(weights, value, einsum)


class MultiHeadDotProductAttention(linen.MultiHeadDotProductAttention):
    r"""``flax.linen.MultiHeadDotProductAttention`` with the safe attention function.

    Same fields, parameters and outputs as flax's layer, except that
    ``attention_fn`` defaults to :func:`stablejax.nn.dot_product_attention`: a
    query with every key masked gives the output projection of 0 (its bias)
    and passes no gradient, where flax's layer attends uniformly.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from stablejax import nn
      >>> layer = nn.MultiHeadDotProductAttention(num_heads=2)
      >>> x = jnp.ones((1, 3, 4))
      >>> params = layer.init(jax.random.key(0), x)
      >>> layer.apply(params, x, mask=jnp.zeros((1, 1, 3, 3), bool))[0, 0]
      Array([0., 0., 0., 0.], dtype=float32)
    """

    attention_fn: Callable[..., Array] = linen_dot_product_attention


class MultiHeadAttention(nnx.MultiHeadAttention):
    r"""``flax.nnx.MultiHeadAttention`` with the safe attention function.

    Takes exactly the arguments of ``nnx.MultiHeadAttention``; ``attention_fn``
    defaults to :func:`stablejax.nnx.dot_product_attention`, so a query with every
    key masked gives the output projection of 0 and passes no gradient.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from stablejax import nnx as snnx
      >>> layer = snnx.MultiHeadAttention(2, 4, rngs=nnx.Rngs(0), decode=False)
      >>> layer(jnp.ones((1, 3, 4)), mask=jnp.zeros((1, 1, 3, 3), bool))[0, 0]
      Array([0., 0., 0., 0.], dtype=float32)
    """

    def __init__(self, *args: Any, attention_fn: Callable[..., Array] = nnx_dot_product_attention,
                 **kwargs: Any):
        super().__init__(*args, attention_fn=attention_fn, **kwargs)


def _with_default(sig: inspect.Signature, name: str, default: Any) -> inspect.Signature:
    return sig.replace(parameters=[
        p.replace(default=default) if p.name == name else p for p in sig.parameters.values()])


# inspect.signature shows flax's parameters, with the new default.
MultiHeadAttention.__init__.__signature__ = _with_default(
    inspect.signature(nnx.MultiHeadAttention.__init__), "attention_fn", nnx_dot_product_attention)
