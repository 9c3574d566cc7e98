"""The float16 policy: float32 parameters, float16 matmuls, float32 norms/softmax/loss."""

from collections import Counter

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stablejax import nn as sjnn
from stablejax import nnx as sjnnx
from stablejax import optim

F16, F32 = jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h)
        return nn.Dense(5)(sjnn.RMSNorm()(x))


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 8, qkv_features=8, decode=False, rngs=rngs)
        self.out = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm(x))
        return self.out(x)


def op_dtypes(fn, *args):
    eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns

    def walk(eqns):
        for e in eqns:
            yield e
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from walk(sub.eqns)

    return Counter((e.primitive.name, str(e.outvars[0].aval.dtype)) for e in walk(eqns))


X = jax.random.normal(jax.random.key(1), (2, 4, 8))


@pytest.fixture(scope="module")
def linen_setup():
    model, policy = Block(), sjnn.mixed_precision()
    params = policy.apply(model.init)(jax.random.key(0), X)
    return model, policy, params


def test_linen_matmuls_in_float16_norms_softmax_output_in_float32(linen_setup):
    model, policy, params = linen_setup
    assert {x.dtype for x in jax.tree.leaves(params)} == {F32}
    ops = op_dtypes(policy.apply(model.apply), params, X)
    # Projections (q, k, v, out, the final Dense) in float16; the attention
    # logits, q.k and weights.v, in float32 for the softmax.
    assert ops[("dot_general", "float16")] >= 5
    assert ops[("exp", "float32")] >= 1 and ops[("exp", "float16")] == 0
    assert ops[("rsqrt", "float32")] == 2 and ops[("rsqrt", "float16")] == 0
    out = policy.apply(model.apply)(params, X)
    assert out.dtype == F32
    ref = model.apply(params, X)
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2)
    assert float(jnp.max(jnp.abs(out - ref))) > 0  # float16 compute did happen
    # The model object is left as it was.
    assert model.apply(params, X).dtype == F32


def test_linen_gradients_are_float32_and_match(linen_setup):
    model, policy, params = linen_setup
    loss = lambda f: lambda p: jnp.mean(f(p, X) ** 2)
    g16 = jax.grad(loss(policy.apply(model.apply)))(params)
    g32 = jax.grad(loss(model.apply))(params)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        assert a.dtype == F32
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-3)


def test_policy_keeps_float16_activations_finite_where_plain_float16_overflows():
    # A LayerNorm fed activations of ~600: the mean of squares (~4e5) overflows
    # float16 (max 65504) when flax computes the norm in float16 without its
    # float32 reductions: the variance is Inf and the output silently 0. The
    # policy computes the norm in float32.
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.LayerNorm(force_float32_reductions=False)(nn.Dense(8)(x))

    x = jax.random.normal(jax.random.key(2), (2, 8))
    net = Net()
    params = net.init(jax.random.key(0), x)
    k = params["params"]["Dense_0"]["kernel"]
    params["params"]["Dense_0"]["kernel"] = 200.0 * k / jnp.std(k)
    naive = sjnn.mixed_precision(norm_dtype=jnp.float16).apply(net.apply)(params, x)
    good = sjnn.mixed_precision().apply(net.apply)(params, x)
    assert bool((naive == 0).all())
    np.testing.assert_allclose(jnp.std(good, axis=-1), 1.0, rtol=1e-3)
    np.testing.assert_allclose(good, net.apply(params, x), atol=2e-2)


def test_nnx_configure_sets_every_layer_and_trains():
    model = NnxBlock(nnx.Rngs(0))
    ref = model(X)
    policy = sjnnx.mixed_precision()
    assert policy.configure(model) is model
    assert model.norm.dtype == F32 and model.out.dtype == F16 and model.attn.dtype == F16
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {F32}
    ops = op_dtypes(lambda m, x: m(x), model, X)
    assert ops[("dot_general", "float16")] >= 4 and ops[("exp", "float16")] == 0
    assert ops[("exp", "float32")] >= 1 and ops[("rsqrt", "float32")] == 1
    out = model(X)
    assert out.dtype == F16
    np.testing.assert_allclose(policy.cast_output(out), ref, rtol=2e-2, atol=2e-2)
    # Configuring twice does not wrap the attention twice.
    fn = model.attn.attention_fn
    policy.configure(model)
    assert model.attn.attention_fn._stablejax_inner is fn._stablejax_inner

    tx = optim.dynamic_loss_scale(optax.adam(1e-2))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return optim.scale_loss(jnp.mean(policy.cast_output(m(X)) ** 2), opt.opt_state)

        loss, g = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, g)
        return loss / optim.metrics(opt.opt_state)["loss_scale"]

    losses = [float(step(model, opt)) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0]


def test_bad_dtypes_and_models_are_refused():
    with pytest.raises(TypeError, match="compute_dtype.*jnp.float16"):
        sjnn.mixed_precision(jnp.int32)
    with pytest.raises(TypeError, match="policy.apply"):
        sjnn.mixed_precision().configure(Block())
    policy = sjnn.mixed_precision("bfloat16")
    assert policy.compute_dtype == jnp.bfloat16
    for layer in (sjnn.StdPool(), sjnn.L2Normalize(), nn.GroupNorm(), sjnnx.StdPool()):
        assert policy.dtype_for(layer) == F32
    assert policy.dtype_for(nn.Dense(2)) == jnp.bfloat16
