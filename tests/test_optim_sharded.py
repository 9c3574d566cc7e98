"""guard on 8 CPU devices: every replica takes the same decision."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stablejax import optim

N = 8


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < N:
        pytest.skip("needs 8 (virtual) devices")
    return jax.sharding.Mesh(np.array(jax.devices()[:N]), ("x",))


def leaves_bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def replicated_step(mesh, axis_name):
    """Data parallel: every device holds the full params and its own gradient."""
    tx = optim.guard(optax.adam(0.1), axis_name=axis_name)

    def step(params, g):
        state = tx.init(params)
        u, state = tx.update(g[0], state, params)
        new = optax.apply_updates(params, u)
        counters = jnp.stack([state.skipped_total, state.skipped_nonfinite])
        return new[None], counters[None]

    return jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(P(), P("x")), out_specs=(P("x"), P("x")), check_vma=False
        )
    )


def test_nan_on_one_device_makes_every_device_skip(mesh):
    params = jnp.arange(4.0)
    g = jnp.ones((N, 4)).at[3, 1].set(jnp.nan)
    new, counters = replicated_step(mesh, "x")(params, g)
    new, counters = np.asarray(new), np.asarray(counters)
    assert (counters == [[1, 1]] * N).all()
    assert all(row.tobytes() == np.asarray(params).tobytes() for row in new)


def test_without_axis_name_replicas_diverge(mesh):
    # The contrast the axis_name exists for (optax.apply_if_finite behaves so too).
    params = jnp.arange(4.0)
    g = jnp.ones((N, 4)).at[3, 1].set(jnp.nan)
    new, counters = replicated_step(mesh, None)(params, g)
    assert np.asarray(counters)[:, 0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert not np.array_equal(np.asarray(new)[3], np.asarray(new)[0])


def test_healthy_step_keeps_replicas_identical(mesh):
    params = jnp.arange(4.0)
    new, counters = replicated_step(mesh, "x")(params, jnp.ones((N, 4)))
    new = np.asarray(new)
    assert (np.asarray(counters) == 0).all()
    assert not np.array_equal(new[0], np.asarray(params))
    assert all(row.tobytes() == new[0].tobytes() for row in new)


def sharded_update(mesh, inner, g, params):
    """Parameters and gradients split over the axis (FSDP-style) inside shard_map."""
    tx = optim.guard(inner, axis_name="x")

    def step(params, g):
        state = tx.init(params)
        u, state = tx.update(g, state, params)
        return u, jnp.stack([state.skipped_total.astype(jnp.float32), state.grad_norm])[None]

    f = jax.shard_map(step, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=(P("x"), P("x")))
    return jax.jit(f)(params, g)


def test_sharded_leaves_use_the_global_norm(mesh):
    key = jax.random.key(0)
    g = {"w": jax.random.normal(key, (N * 2, 3)), "b": jnp.linspace(-1.0, 1.0, N)}
    params = jax.tree.map(jnp.zeros_like, g)
    inner = optax.chain(optim.clip_by_global_norm(1.0), optax.sgd(1.0))
    u, info = sharded_update(mesh, inner, g, params)
    info = np.asarray(info)
    expect_norm = float(optax.tree.norm(g))
    np.testing.assert_allclose(info[:, 1], expect_norm, rtol=1e-6)
    assert (info[:, 0] == 0).all()
    ref = jax.jit(optim.guard(inner).update)(g, optim.guard(inner).init(params), params)[0]
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_sharded_nan_in_one_shard_skips_everywhere(mesh):
    g = {"w": jnp.ones((N * 2, 3)).at[11, 0].set(jnp.inf), "b": jnp.ones(N)}
    params = jax.tree.map(jnp.zeros_like, g)
    u, info = sharded_update(mesh, optax.adam(0.1), g, params)
    assert (np.asarray(info)[:, 0] == 1).all()
    assert all((np.asarray(x) == 0).all() for x in jax.tree.leaves(u))


def test_jit_with_sharded_arrays_decides_globally(mesh):
    sharding = NamedSharding(mesh, P("x"))
    params = jax.device_put(jnp.ones((N * 4,)), sharding)
    g = jax.device_put(jnp.ones((N * 4,)).at[29].set(jnp.nan), sharding)
    tx = optim.guard(optax.adam(0.1))
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    new, state = step(params, state, g)
    assert int(state.skipped_nonfinite) == 1 and int(state.first_nonfinite_leaf) == 0
    assert np.asarray(new).tobytes() == np.asarray(params).tobytes()
    assert new.sharding.is_equivalent_to(sharding, 1)
    new, state = step(params, state, jax.device_put(jnp.ones((N * 4,)), sharding))
    assert int(state.skipped_total) == 1 and not np.array_equal(np.asarray(new), np.ones(N * 4))


def test_loss_flag_is_shared(mesh):
    tx = optim.guard(optax.sgd(1.0), axis_name="x")

    def step(params, loss):
        state = tx.init(params)
        _, state = tx.update(jnp.ones_like(params), state, params, loss=loss[0])
        return state.skipped_nonfinite[None]

    f = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("x")), out_specs=P("x"), check_vma=False)
    losses = jnp.ones(N).at[5].set(jnp.nan)
    assert (np.asarray(jax.jit(f)(jnp.zeros(2), losses)) == 1).all()
