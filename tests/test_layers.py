"""Safe Flax layers: parity with flax, exactness at epsilon=0, pooling, masks."""

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stablejax import nn, safe_std
from stablejax import nnx as snnx

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (4, 6, 8)) * 3.0 + 1.0

LINEN_PAIRS = [
    (nn.LayerNorm, fnn.LayerNorm, {}),
    (nn.LayerNorm, fnn.LayerNorm, {"use_fast_variance": False, "use_bias": False}),
    (nn.LayerNorm, fnn.LayerNorm, {"reduction_axes": (-2, -1), "feature_axes": -1}),
    (nn.LayerNorm, fnn.LayerNorm, {"epsilon": 1e-3, "dtype": jnp.bfloat16}),
    (nn.RMSNorm, fnn.RMSNorm, {}),
    (nn.RMSNorm, fnn.RMSNorm, {"use_scale": False, "param_dtype": jnp.bfloat16}),
]


def _perturbed(params):
    """Non-trivial parameters, so parity covers the scale and bias arithmetic."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(KEY, len(leaves))
    return jax.tree.unflatten(
        tree, [v + jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)])


@pytest.mark.parametrize("ours, theirs, kw", LINEN_PAIRS)
def test_linen_parity_with_flax(ours, theirs, kw):
    p_flax = theirs(**kw).init(KEY, X)
    p_ours = ours(**kw).init(KEY, X)
    assert jax.tree.structure(p_flax) == jax.tree.structure(p_ours)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), p_flax) == jax.tree.map(
        lambda a: (a.shape, a.dtype), p_ours)
    params = _perturbed(p_flax)  # a flax checkpoint loads into ours
    mask = jax.random.bernoulli(KEY, 0.7, X.shape)
    for m in (None, mask):
        y_f = jax.jit(lambda p, x, m=m: theirs(**kw).apply(p, x, mask=m))(params, X)
        y_o = jax.jit(lambda p, x, m=m: ours(**kw).apply(p, x, mask=m))(params, X)
        assert y_f.dtype == y_o.dtype
        np.testing.assert_array_equal(y_o, y_f)
    g_f = jax.grad(lambda p: theirs(**kw).apply(p, X).astype(jnp.float32).sum())(params)
    g_o = jax.jit(jax.grad(lambda p: ours(**kw).apply(p, X).astype(jnp.float32).sum()))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g_o, g_f)


NNX_PAIRS = [
    (snnx.LayerNorm, nnx.LayerNorm, {}),
    (snnx.LayerNorm, nnx.LayerNorm, {"use_fast_variance": False, "epsilon": 1e-4}),
    (snnx.RMSNorm, nnx.RMSNorm, {}),
    (snnx.RMSNorm, nnx.RMSNorm, {"dtype": jnp.bfloat16}),
]


@pytest.mark.parametrize("ours, theirs, kw", NNX_PAIRS)
def test_nnx_parity_with_flax(ours, theirs, kw):
    m_f = theirs(8, rngs=nnx.Rngs(0), **kw)
    m_o = ours(8, rngs=nnx.Rngs(0), **kw)
    s_f, s_o = nnx.state(m_f, nnx.Param), nnx.state(m_o, nnx.Param)
    assert jax.tree.structure(s_f) == jax.tree.structure(s_o)
    nnx.update(m_f, _perturbed(s_f))
    nnx.update(m_o, nnx.state(m_f, nnx.Param))  # flax's weights load into ours
    y_f = nnx.jit(lambda m, x: m(x))(m_f, X)
    y_o = nnx.jit(lambda m, x: m(x))(m_o, X)
    assert y_f.dtype == y_o.dtype
    np.testing.assert_array_equal(y_o, y_f)


def test_linen_and_nnx_share_one_core():
    lin = nn.LayerNorm(epsilon=0.0)
    params = _perturbed(lin.init(KEY, X))
    mod = snnx.LayerNorm(8, epsilon=0.0, rngs=nnx.Rngs(0))
    mod.scale[...] = params["params"]["scale"]
    mod.bias[...] = params["params"]["bias"]
    np.testing.assert_array_equal(lin.apply(params, X), mod(X))


# ----------------------------------------------------------------- epsilon = 0


def _constant_rows():
    c = jnp.full((2, 3, 8), 0.1)
    return c.at[1].set(-7.3)


@pytest.mark.parametrize("layer", [nn.LayerNorm, nn.RMSNorm])
def test_epsilon_zero_is_exact_and_finite_where_flax_is_nan(layer):
    flax_layer = {nn.LayerNorm: fnn.LayerNorm, nn.RMSNorm: fnn.RMSNorm}[layer]
    rows = _constant_rows() if layer is nn.LayerNorm else jnp.zeros((2, 3, 8))
    params = _perturbed(layer(epsilon=0.0).init(KEY, rows))
    w = jnp.arange(8.0)[None, None, :]

    def loss(x, mod):
        return jnp.sum(mod.apply(params, x) * w)

    # flax at epsilon 0: non-finite forward and backward on constant (zero) rows.
    assert not np.isfinite(flax_layer(epsilon=0.0).apply(params, rows)).all()
    assert not np.isfinite(jax.grad(loss)(rows, flax_layer(epsilon=0.0))).all()
    y = jax.jit(lambda x: layer(epsilon=0.0).apply(params, x))(rows)
    bias = params["params"].get("bias", jnp.zeros(8))
    np.testing.assert_array_equal(y, jnp.broadcast_to(bias, rows.shape))
    g = jax.jit(jax.grad(loss), static_argnums=1)(rows, layer(epsilon=0.0))
    np.testing.assert_array_equal(g, np.zeros(rows.shape))
    # Away from constant rows, epsilon 0 equals the exact formula (flax two-pass at eps 0).
    ref = flax_layer(epsilon=0.0, use_fast_variance=False).apply(params, X)
    np.testing.assert_allclose(layer(epsilon=0.0).apply(params, X), ref, rtol=2e-5, atol=2e-5)


def test_epsilon_zero_has_no_bias_at_small_scale():
    x = jnp.array([[1.0, -1.0, 1.0, -1.0]]) * 1e-3
    params = {"params": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}
    np.testing.assert_allclose(nn.LayerNorm(epsilon=0.0).apply(params, x), x * 1e3, rtol=1e-5)
    biased = fnn.LayerNorm().apply(params, x)
    assert abs(float(jnp.std(biased)) - 0.71) < 0.01  # flax's default epsilon


def test_epsilon_zero_gradient_bounded_near_constant_row():
    x = jnp.full((1, 8), 3.0).at[0, 0].add(1e-5)
    params = nn.LayerNorm(epsilon=0.0).init(KEY, x)
    j = jax.jacobian(lambda v: nn.LayerNorm(epsilon=0.0).apply(params, v))(x)
    assert np.isfinite(j).all() and np.abs(j).max() <= 2.0 / 1e-6


# ----------------------------------------------------------------- L2Normalize and StdPool


@pytest.mark.parametrize("use_scale", [False, True])
def test_l2normalize_linen_and_nnx(use_scale):
    x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    lin = nn.L2Normalize(use_scale=use_scale, scale_init=fnn.initializers.constant(2.0))
    params = lin.init(KEY, x)
    mod = snnx.L2Normalize(use_scale=use_scale, scale_init=fnn.initializers.constant(2.0),
                           rngs=nnx.Rngs(0))
    s = 2.0 if use_scale else 1.0
    for y in (jax.jit(lin.apply)(params, x), mod(x)):
        np.testing.assert_allclose(y, s * np.array([[0.6, 0.8], [0.0, 0.0]]), rtol=1e-6)
    g = jax.jit(jax.grad(lambda v: jnp.sum(lin.apply(params, v) * jnp.array([[1.0, 2.0]]))))(x)
    np.testing.assert_array_equal(g[1], [0.0, 0.0])
    if use_scale:
        assert params["params"]["scale"].shape == ()
        gs = jax.grad(lambda p: lin.apply(p, x).sum())(params)["params"]["scale"]
        np.testing.assert_allclose(gs, 1.4, rtol=1e-6)


def test_stdpool_silent_utterance_trains_where_jnp_std_does_not():
    x = jnp.zeros((2, 10, 4)).at[0].set(jax.random.normal(KEY, (10, 4)))

    def naive(v):
        return jnp.concatenate([v.mean(-2), jnp.std(v, axis=-2)], -1)

    assert np.isnan(jax.grad(lambda v: naive(v).sum())(x)).any()
    for pool in (lambda v: nn.StdPool().apply({}, v), snnx.StdPool()):
        out = jax.jit(pool)(x)
        np.testing.assert_allclose(out, naive(x), rtol=1e-5, atol=1e-6)
        g = jax.jit(jax.grad(lambda v, pool=pool: pool(v).sum()))(x)
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g[1], np.full((10, 4), 0.1), rtol=1e-6)  # mean part only


def test_stdpool_mask_and_std_only():
    x = jax.random.normal(KEY, (2, 6, 3))
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
    x = x.at[0, 4:].set(jnp.nan)  # padded frames may hold anything
    out = jax.jit(lambda v, m: nn.StdPool().apply({}, v, m))(x, mask)
    np.testing.assert_allclose(out[0, :3], x[0, :4].mean(0), rtol=1e-5)
    np.testing.assert_allclose(out[0, 3:], np.std(np.asarray(x[0, :4]), 0), rtol=1e-5)
    np.testing.assert_array_equal(out[1], np.zeros(6))
    g = jax.grad(lambda v: nn.StdPool().apply({}, v, mask).sum())(x)
    assert np.isfinite(g).all() and (g[0, 4:] == 0).all()
    s = snnx.StdPool(output="std")(x, mask)
    np.testing.assert_allclose(s, out[:, 3:], rtol=1e-6)
    np.testing.assert_allclose(s[0], safe_std(x[0, :4], axis=0), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_layers_low_precision(dtype):
    x = X.astype(dtype)
    assert nn.StdPool().apply({}, x).dtype == dtype
    assert nn.L2Normalize().apply({}, x).dtype == dtype
    params = nn.LayerNorm(epsilon=0.0).init(KEY, x)
    y = nn.LayerNorm(epsilon=0.0, dtype=dtype).apply(params, jnp.ones_like(x))
    assert y.dtype == dtype and np.isfinite(np.asarray(y, np.float32)).all()


# ----------------------------------------------------------------- bad input


def test_bad_input_errors():
    with pytest.raises(ValueError, match="epsilon.*-0.1"):
        nn.LayerNorm(epsilon=-0.1)
    with pytest.raises(ValueError, match="epsilon"):
        snnx.RMSNorm(4, epsilon=float("nan"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        nn.LayerNorm(reduction_axes=3).init(KEY, X)
    with pytest.raises(TypeError, match="int32"):
        nn.RMSNorm().init(KEY, jnp.arange(8).reshape(1, 8))
    with pytest.raises(ValueError, match="output='max'"):
        nn.StdPool(output="max")
    with pytest.raises(ValueError, match="feature axis"):
        snnx.StdPool(axis=-1)
    with pytest.raises(ValueError, match="axis=2 is the feature axis"):
        nn.StdPool(axis=2).apply({}, X)
    with pytest.raises(ValueError, match="mask must be shaped"):
        nn.StdPool().apply({}, X, jnp.ones(X.shape, bool))
    with pytest.raises(ValueError, match="rngs"):
        snnx.L2Normalize(use_scale=True)


# ----------------------------------------------------------------- drop-in: eager masks, scalars

X5 = jax.random.normal(jax.random.key(0), (10, 5))
MASK5 = np.array([True, False, True, False, True])


@pytest.mark.parametrize("ours, theirs", [(snnx.LayerNorm, nnx.LayerNorm),
                                          (snnx.RMSNorm, nnx.RMSNorm)])
def test_nnx_masked_eager_equals_flax_bit_for_bit(ours, theirs):
    # flax's own tests/nnx/nn/normalization_test.py setting: a (5,) mask, eager calls.
    import inspect

    assert inspect.signature(ours.__init__) == inspect.signature(theirs.__init__)
    for kw in ({}, {"use_fast_variance": False}, {"dtype": jnp.float16}):
        y_o = ours(5, rngs=nnx.Rngs(42), **kw)(X5, mask=MASK5)
        y_f = theirs(5, rngs=nnx.Rngs(42), **kw)(X5, mask=MASK5)
        assert y_o.dtype == y_f.dtype
        np.testing.assert_array_equal(y_o, y_f)


@pytest.mark.parametrize("ours, theirs", [(nn.LayerNorm, fnn.LayerNorm), (nn.RMSNorm, fnn.RMSNorm)])
def test_linen_masked_eager_equals_flax_bit_for_bit(ours, theirs):
    params = _perturbed(theirs().init(KEY, X5))
    np.testing.assert_array_equal(ours().apply(params, X5, mask=MASK5),
                                  theirs().apply(params, X5, mask=MASK5))


def test_scalars_and_complex_as_flax_accepts():
    params = fnn.LayerNorm().init(KEY, X5)
    for eps in (jnp.float32(1e-6), np.float64(1e-6), jnp.array(1e-6)):
        np.testing.assert_array_equal(nn.LayerNorm(epsilon=eps).apply(params, X5),
                                      fnn.LayerNorm(epsilon=eps).apply(params, X5))
        assert snnx.RMSNorm(5, epsilon=eps, rngs=nnx.Rngs(0))(X5).shape == (10, 5)
    xc = X5 + 1j * X5[::-1]
    np.testing.assert_array_equal(nn.LayerNorm().apply(params, xc),
                                  fnn.LayerNorm().apply(params, xc))
    np.testing.assert_array_equal(snnx.LayerNorm(5, rngs=nnx.Rngs(0))(xc),
                                  nnx.LayerNorm(5, rngs=nnx.Rngs(0))(xc))
    with pytest.raises(TypeError, match="complex input needs epsilon > 0"):
        nn.LayerNorm(epsilon=0.0).apply(params, xc)


def test_drop_in_bad_input_errors():
    params = fnn.LayerNorm().init(KEY, X5)
    with pytest.raises(TypeError, match="mask must be boolean.*float32"):
        nn.LayerNorm().apply(params, X5, mask=jnp.full(5, 0.5))
    with pytest.raises(TypeError, match="mask must be boolean"):
        snnx.RMSNorm(5, rngs=nnx.Rngs(0))(X5, mask=jnp.full(5, 0.5))
    with pytest.raises(TypeError, match="mask must be boolean"):
        nn.StdPool().apply({}, X, jnp.full(X.shape[:-1], 0.5))
    for bad in (jnp.int32, "int8", np.dtype(bool)):
        with pytest.raises(TypeError, match="not a floating-point dtype"):
            nn.StdPool(dtype=bad)
        with pytest.raises(TypeError, match="not a floating-point dtype"):
            snnx.StdPool(dtype=bad)
    assert nn.StdPool(dtype=jnp.bfloat16).apply({}, X).dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="axis must be an int.*1.0"):
        nn.L2Normalize(axis=1.0).apply({}, X5)
    with pytest.raises(TypeError, match="epsilon.*traced|real number"):
        nn.LayerNorm(epsilon="1e-6")


EMPTY_FRAMES = jnp.ones((2, 0, 3))


def test_layers_on_zero_frames_give_zeros():
    np.testing.assert_array_equal(nn.StdPool().apply({}, EMPTY_FRAMES), jnp.zeros((2, 6)))
    np.testing.assert_array_equal(snnx.StdPool(output="std")(EMPTY_FRAMES), jnp.zeros((2, 3)))
    g = jax.jit(jax.grad(lambda x: nn.StdPool().apply({}, x).sum()))(EMPTY_FRAMES)
    assert g.shape == EMPTY_FRAMES.shape
    empty = jnp.ones((2, 0))
    for layer in (nn.LayerNorm(epsilon=0.0), nn.RMSNorm(epsilon=0.0), nn.L2Normalize()):
        params = layer.init(KEY, empty)
        assert layer.apply(params, empty).shape == (2, 0)
    for layer in (snnx.LayerNorm(0, epsilon=0.0, rngs=nnx.Rngs(0)),
                  snnx.RMSNorm(0, epsilon=0.0, rngs=nnx.Rngs(0))):
        assert layer(empty).shape == (2, 0)
