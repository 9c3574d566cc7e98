"""dot_product_attention (linen and NNX): flax's on queries with a valid key, zero output
and zero gradient on fully masked ones."""

import inspect

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stablejax import nn
from stablejax import nnx as snnx

_K = jax.random.split(jax.random.key(0), 4)
Q = jax.random.normal(_K[0], (2, 5, 4, 8))
K = jax.random.normal(_K[1], (2, 6, 4, 8))
V = jax.random.normal(_K[2], (2, 6, 4, 8))
# key 0 valid for every query, except queries (0, 1) and (1, 4): they see no key at all
MASK = jax.random.bernoulli(_K[3], 0.6, (2, 1, 5, 6)).at[:, :, :, 0].set(True)
MASK = MASK.at[0, 0, 1].set(False).at[1, 0, 4].set(False)
VALID = np.asarray(MASK.any(-1)[:, 0])[:, :, None, None]  # (batch, q, 1, 1)
DEAD = ~VALID[..., 0, 0]


@pytest.mark.parametrize("jit", [False, True])
def test_linen_equals_flax_bit_for_bit_on_queries_with_a_valid_key(jit):
    ours, theirs = nn.dot_product_attention, fnn.dot_product_attention
    if jit:
        ours, theirs = jax.jit(ours), jax.jit(theirs)
    a, b = np.asarray(ours(Q, K, V, mask=MASK)), np.asarray(theirs(Q, K, V, mask=MASK))
    np.testing.assert_array_equal(np.where(VALID, a, 0), np.where(VALID, b, 0))
    assert (a[DEAD] == 0).all()
    assert np.abs(b[DEAD]).max() > 0.1  # flax attends uniformly: the mean of the values
    np.testing.assert_array_equal(np.asarray(ours(Q, K, V)), np.asarray(theirs(Q, K, V)))


@pytest.fixture(scope="module")
def linen_grads():
    def loss(attn, q, k, v):
        out = attn(q, k, v, mask=MASK)
        return jnp.sum(jnp.where(VALID, out, 0.0) ** 2), jnp.sum(out ** 2)

    def run(q, k, v):
        ours = jax.grad(lambda *a: loss(nn.dot_product_attention, *a)[0], (0, 1, 2))(q, k, v)
        theirs = jax.grad(lambda *a: loss(fnn.dot_product_attention, *a)[0], (0, 1, 2))(q, k, v)
        full = jax.grad(lambda *a: loss(nn.dot_product_attention, *a)[1], (0, 1, 2))(q, k, v)
        dead_only = jax.grad(lambda q, k, v: jnp.sum(
            jnp.where(VALID, 0.0, nn.dot_product_attention(q, k, v, mask=MASK)) ** 2),
            (0, 1, 2))(q, k, v)
        return ours, theirs, full, dead_only
    return jax.jit(run)(Q, K, V)


def test_gradients_equal_flax_through_valid_queries_and_zero_through_dead_ones(linen_grads):
    ours, theirs, full, dead_only = linen_grads
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for g in full:
        assert np.isfinite(np.asarray(g)).all()
    for g in dead_only:
        assert (np.asarray(g) == 0).all()
    assert (np.asarray(full[0])[DEAD] == 0).all()  # no gradient reaches a dead query


def test_minus_inf_bias_gives_zero_not_nan():
    bias = jnp.where(MASK, 0.0, -jnp.inf)
    out = np.asarray(nn.dot_product_attention(Q, K, V, bias=bias))
    assert np.isnan(np.asarray(fnn.dot_product_attention(Q, K, V, bias=bias))[DEAD]).all()
    assert (out[DEAD] == 0).all() and np.isfinite(out).all()
    g = jax.grad(lambda q: nn.dot_product_attention(q, K, V, bias=bias).sum())(Q)
    assert np.isfinite(np.asarray(g)).all() and (np.asarray(g)[DEAD] == 0).all()


def test_nnx_equals_flax_nnx_on_valid_queries_with_causal_and_grouped_heads():
    a = np.asarray(snnx.dot_product_attention(Q, K, V, mask=MASK))
    b = np.asarray(nnx.dot_product_attention(Q, K, V, mask=MASK))
    np.testing.assert_allclose(np.where(VALID, a, 0), np.where(VALID, b, 0), atol=2e-6)
    assert (a[DEAD] == 0).all()
    kg, vg = K[..., :2, :], V[..., :2, :]  # 4 query heads over 2 key/value heads
    a = np.asarray(snnx.dot_product_attention(Q, kg, vg, mask=MASK, is_causal=True))
    b = np.asarray(nnx.dot_product_attention(Q, kg, vg, mask=MASK, is_causal=True))
    causal = np.tril(np.ones((5, 6), bool))[None, None]
    valid = np.asarray((MASK & causal).any(-1)[:, 0])[:, :, None, None]
    np.testing.assert_allclose(np.where(valid, a, 0), np.where(valid, b, 0), atol=2e-6)
    assert (a[~valid[..., 0, 0]] == 0).all()


def test_dropout_and_sow_as_flax():
    rng = jax.random.key(3)
    kw = dict(mask=MASK, dropout_rng=rng, dropout_rate=0.3)
    a = np.asarray(nn.dot_product_attention(Q, K, V, **kw))
    b = np.asarray(fnn.dot_product_attention(Q, K, V, **kw))
    np.testing.assert_array_equal(np.where(VALID, a, 0), np.where(VALID, b, 0))


def test_bad_mask_is_a_clear_error():
    with pytest.raises(TypeError, match="mask > 0"):
        nn.dot_product_attention(Q, K, V, mask=MASK.astype(jnp.float32))
    with pytest.raises(TypeError, match="mask > 0"):
        snnx.dot_product_attention(Q, K, V, mask=MASK.astype(jnp.float32))
    nn.dot_product_attention(Q, K, V, mask=MASK.astype(jnp.float32) > 0)
    with pytest.raises(ValueError, match="multiple"):
        nn.dot_product_attention(Q, K[..., :3, :], V[..., :3, :])


def test_layer_classes_are_flax_layers_with_the_safe_attention_fn():
    x = jax.random.normal(_K[1], (2, 3, 8))
    dead = jnp.zeros((2, 1, 3, 3), bool).at[0].set(True)
    params = fnn.MultiHeadDotProductAttention(num_heads=2).init(jax.random.key(0), x)
    ours = nn.MultiHeadDotProductAttention(num_heads=2)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(params)
    out = ours.apply(params, x, mask=dead)
    ref = fnn.MultiHeadDotProductAttention(num_heads=2).apply(params, x, mask=dead)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(ref[0]))
    assert (np.asarray(out[1]) == 0).all() and np.abs(np.asarray(ref[1])).max() > 0
    layer = snnx.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0), decode=False)
    assert isinstance(layer, nnx.MultiHeadAttention)
    assert layer.attention_fn is snnx.dot_product_attention
    assert (np.asarray(layer(x, mask=dead)[1]) == 0).all()
    params_ = inspect.signature(snnx.MultiHeadAttention.__init__).parameters
    assert list(params_) == list(inspect.signature(nnx.MultiHeadAttention.__init__).parameters)
