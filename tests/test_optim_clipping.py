"""clip_by_global_norm and adaptive_clip at their singular points."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stablejax import optim


def clip(g, max_norm=1.0):
    tx = optim.clip_by_global_norm(max_norm)
    return jax.jit(tx.update)(g, tx.init(g))[0]


def test_matches_optax_on_finite_input():
    g = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([-3.0, 4.0])}
    ours, ref = clip(g, 2.0), optax.clip_by_global_norm(2.0).update(g, optax.EmptyState())[0]
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    small = {"a": jnp.full((2, 3), 0.01), "b": jnp.zeros(2)}
    assert all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(clip(small)), jax.tree.leaves(small))
    )


def test_inf_becomes_the_limit_direction_never_nan():
    assert clip(jnp.array([1.0, jnp.inf, 1.0])).tolist() == [0.0, 1.0, 0.0]
    two = clip({"a": jnp.array([-jnp.inf, 5.0]), "b": jnp.array([jnp.inf])}, 2.0)
    np.testing.assert_allclose(two["a"], [-np.sqrt(2.0), 0.0], rtol=1e-6)
    np.testing.assert_allclose(two["b"], [np.sqrt(2.0)], rtol=1e-6)
    # Contrast: optax turns the same input into NaN.
    ref = optax.clip_by_global_norm(1.0).update(jnp.array([1.0, jnp.inf, 1.0]), None)[0]
    assert np.isnan(np.asarray(ref)).any()


def test_overflowing_finite_gradient_is_clipped_correctly():
    out = clip(jnp.array([3e19, -4e19]), 5.0)
    np.testing.assert_allclose(out, [3.0, -4.0], rtol=1e-5)


def test_zero_gradient_with_zero_max_norm_is_zero():
    out = clip({"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}, 0.0)
    assert all(np.array_equal(x, np.zeros_like(x)) for x in jax.tree.leaves(out))
    assert np.isnan(optax.clip_by_global_norm(0.0).update(jnp.zeros(3), None)[0]).all()
    assert clip(jnp.array([3.0, 4.0]), 0.0).tolist() == [0.0, 0.0]


def test_nan_passes_through_for_the_guard():
    out = clip(jnp.array([2.0, jnp.nan]))
    assert out[0] == 2.0 and np.isnan(out[1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_are_kept_and_norm_is_float32(dtype):
    g = jnp.full((4,), 300.0, dtype)  # squares overflow float16
    out = clip(g, 1.0)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), 0.5, rtol=1e-2)
    inf = clip(jnp.array([1.0, jnp.inf], dtype))
    assert inf.dtype == dtype and np.asarray(inf, np.float32).tolist() == [0.0, 1.0]


def adaptive_run(norms, **kw):
    tx = optim.adaptive_clip(**kw)
    state, update = tx.init(None), jax.jit(tx.update)
    outs = []
    for n in norms:
        u, state = update(jnp.array([n, 0.0]), state)
        outs.append(float(u[0]))
    return outs, state


def test_adaptive_clip_warmup_then_reciprocal_threshold():
    base = [1.0, 1.2] * 5
    outs, state = adaptive_run(base + [50.0], z_threshold=2.5, warmup_steps=10, decay=0.9)
    assert outs[:10] == [float(np.float32(b)) for b in base]  # nothing clipped in warm-up
    prev_mean, prev_std = 1.1, 0.1  # exact mean/std of the warm-up (alpha = 1/t)
    z = (50.0 - prev_mean) / prev_std
    expect = prev_mean + 2.5**2 / z * prev_std
    assert outs[-1] == pytest.approx(expect, rel=1e-4)
    assert float(state.last_threshold) == pytest.approx(expect, rel=1e-4)
    assert int(state.count) == 11


def test_adaptive_clip_nonfinite_leaves_stats_alone():
    _, s1 = adaptive_run([1.0, 2.0, 1.5], warmup_steps=2)
    tx = optim.adaptive_clip(warmup_steps=2)
    u, s2 = jax.jit(tx.update)(jnp.array([jnp.inf, 0.0]), s1)
    assert (int(s2.count), float(s2.mean), float(s2.var)) == (
        int(s1.count),
        float(s1.mean),
        float(s1.var),
    )
    assert np.isfinite(np.asarray(u)).all()
    u, s3 = jax.jit(tx.update)(jnp.array([jnp.nan, 0.0]), s1)
    assert int(s3.count) == int(s1.count) and np.isnan(u[0])


def test_guard_with_adaptive_clip_inside():
    tx = optim.guard(optax.chain(optim.adaptive_clip(warmup_steps=2), optax.sgd(1.0)))
    state = tx.init(jnp.zeros(2))
    for g in ([1.0, 0.0], [1.2, 0.0], [jnp.nan, 0.0]):
        u, state = jax.jit(tx.update)(jnp.array(g), state)
    assert (np.asarray(u) == 0).all() and int(state.inner_state[0].count) == 2
