"""dynamic_loss_scale and scale_loss: GradScaler semantics, bounds, nesting, replicas, state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from stablejax import optim

PARAMS = {"b": jnp.zeros(3), "w": jnp.ones((2, 3))}
GOOD = {"b": jnp.full(3, 8.0), "w": jnp.full((2, 3), -4.0)}
INF = {"b": jnp.array([1.0, jnp.inf, 2.0]), "w": jnp.ones((2, 3))}
NAN = {"b": jnp.ones(3), "w": jnp.full((2, 3), jnp.nan)}


def bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def bits_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and bits(a) == bits(b)


def run(tx, grads_seq, params=PARAMS):
    update = jax.jit(tx.update)
    state = tx.init(params)
    outs = []
    for g in grads_seq:
        u, state = update(g, state, params)
        outs.append(u)
    return outs, state


def test_finite_step_is_unscaled_in_float32_and_overflow_skips_and_backs_off():
    tx = optim.dynamic_loss_scale(optax.sgd(1.0), init_scale=4.0)
    f16 = jax.tree.map(lambda x: x.astype(jnp.float16), GOOD)
    (u1, u2, u3), state = run(tx, [f16, INF, GOOD])
    # Unscaled by 4 then by 2 (after the back-off), exactly, and in float32.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(u1))
    assert bits_equal(u1, jax.tree.map(lambda g: -g / 4.0, GOOD))
    assert bits_equal(u2, jax.tree.map(jnp.zeros_like, GOOD))
    assert bits_equal(u3, jax.tree.map(lambda g: -g / 2.0, GOOD))
    m = optim.metrics(state)
    assert float(m["loss_scale"]) == 2.0 and int(m["overflows"]) == 1
    assert int(m["loss_scale_good_steps"]) == 1 and int(state.steps) == 3


def test_overflow_leaves_inner_state_bitwise_unchanged():
    tx = optim.dynamic_loss_scale(optax.adam(0.1))
    _, before = run(tx, [GOOD, GOOD])
    update = jax.jit(tx.update)
    for bad in (INF, NAN):
        u, after = update(bad, before, PARAMS)
        assert bits_equal(after.inner_state, before.inner_state)
        assert all(bool((x == 0).all()) for x in jax.tree.leaves(u))
        assert float(after.scale) == float(before.scale) / 2


def test_growth_after_interval_and_bounds_hold_without_inf():
    tx = optim.dynamic_loss_scale(
        optax.sgd(1.0), init_scale=2.0**20, growth_interval=3, max_scale=2.0**22
    )
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    scales = []
    for _ in range(12):
        _, state = update(GOOD, state, PARAMS)
        scales.append(float(state.scale))
    # Grows on the 3rd, 6th finite step, then holds at max_scale (flax's
    # DynamicScale has no cap).
    assert scales == [2.0**20] * 2 + [2.0**21] * 3 + [2.0**22] * 7
    # Backs off to min_scale and stays there however many overflows come.
    tx = optim.dynamic_loss_scale(optax.sgd(1.0), init_scale=8.0, min_scale=2.0)
    _, state = run(tx, [NAN] * 6)
    assert float(state.scale) == 2.0 and int(state.overflows) == 6
    assert int(state.good_steps) == 0


def test_an_overflow_restarts_the_growth_count():
    tx = optim.dynamic_loss_scale(optax.sgd(1.0), init_scale=8.0, growth_interval=3)
    _, state = run(tx, [GOOD, GOOD, INF, GOOD, GOOD])
    assert float(state.scale) == 4.0 and int(state.good_steps) == 2
    _, state = run(tx, [GOOD, GOOD, INF, GOOD, GOOD, GOOD])
    assert float(state.scale) == 8.0 and int(state.good_steps) == 0


def test_guard_inside_sees_no_overflow_and_never_gives_up():
    tx = optim.dynamic_loss_scale(optim.guard(optax.adam(0.1), max_consecutive_skips=5))
    _, state = run(tx, [GOOD] + [INF] * 12 + [GOOD])
    m = optim.metrics(state)
    assert int(m["overflows"]) == 12 and float(m["loss_scale"]) == 2.0**15 / 2**12
    assert int(m["steps"]) == 2 and int(m["skipped_total"]) == 0 and int(m["give_ups"]) == 0


def test_stable_adamw_builds_it_in_and_scale_loss_finds_it():
    tx = optim.stable_adamw(1e-2, warmup_steps=1, total_steps=50, loss_scale=True)
    assert isinstance(tx.init(PARAMS), optim.LossScaleState)
    loss_fn = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"])
    state = tx.init(PARAMS)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(lambda q: optim.scale_loss(loss_fn(q), s))(p)
        u, s = tx.update(g, s, p, loss=loss)
        return optax.apply_updates(p, u), s, loss, g

    p, s, loss, g = step(PARAMS, state)
    assert float(loss) == 2.0**15 * 6.0
    assert bits_equal(g, jax.tree.map(lambda x: 2.0**15 * x, jax.grad(loss_fn)(PARAMS)))
    # The guard inside saw the unscaled loss (overshoot_control too).
    assert float(optim.find_guard_state(s).loss_mean) == pytest.approx(6.0)
    p, s, _, _ = step(p, s)
    m = optim.metrics(s)
    assert int(m["steps"]) == 2 and int(m["overflows"]) == 0
    assert float(m["loss_scale"]) == 2.0**15


def test_scale_loss_sees_through_wrappers_and_stops_the_gradient():
    inner = optim.dynamic_loss_scale(optax.adam(1e-3), init_scale=8.0)
    for tx in (optax.chain(optax.identity(), inner), optax.MultiSteps(inner, 2)):
        state = tx.init(PARAMS)
        assert float(optim.scale_loss(jnp.float16(1.5), state)) == 12.0
        assert optim.scale_loss(jnp.float16(1.5), state).dtype == jnp.float32
        # d(scale_loss)/d(scale) is not taken: the state is a constant.
        g = jax.grad(lambda s: optim.scale_loss(1.0, s), allow_int=True)(state)
        assert all(float(jnp.sum(jnp.abs(x))) == 0 for x in jax.tree.leaves(g)
                   if jnp.issubdtype(x.dtype, jnp.floating))
    with pytest.raises(ValueError, match="dynamic_loss_scale"):
        optim.scale_loss(1.0, optax.adam(1e-3).init(PARAMS))
    with pytest.raises(ValueError, match="no GuardState"):
        optim.metrics(optax.adam(1e-3).init(PARAMS))


def test_float16_underflow_recovered_by_scaling():
    # A gradient of 1e-9 per entry is 0 in float16; the scaled one is not.
    x = jnp.linspace(1.0, 2.0, 8)
    loss = lambda w: jnp.sum(w.astype(jnp.float16) * x.astype(jnp.float16)).astype(
        jnp.float32) * 1e-9
    w = jnp.zeros(8, jnp.float32)
    assert bool((jax.grad(loss)(w) == 0).all())
    tx = optim.dynamic_loss_scale(optax.sgd(1.0), init_scale=2.0**24)
    state = tx.init(w)
    g = jax.grad(lambda v: optim.scale_loss(loss(v), state))(w)
    u, _ = tx.update(g, state, w)
    np.testing.assert_allclose(-u, 1e-9 * x, rtol=2e-3)


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (virtual) devices")
    return jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))


@pytest.mark.parametrize("axis_name", ["x", None])
def test_replicas_agree_with_axis_name(mesh, axis_name):
    tx = optim.dynamic_loss_scale(optax.adam(0.1), init_scale=8.0, axis_name=axis_name)

    def step(params, g):
        state = tx.init(params)
        u, state = tx.update(g[0], state, params)
        return optax.apply_updates(params, u)[None], state.scale[None]

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("x")),
                              out_specs=(P("x"), P("x")), check_vma=False))
    g = jnp.ones((8, 4)).at[3, 1].set(jnp.inf)
    new, scales = f(jnp.zeros(4), g)
    if axis_name is None:  # replica 3 alone skipped: the replicas diverge
        assert scales.tolist() == [8.0] * 3 + [4.0] + [8.0] * 4
        assert bool((new[3] == 0).all()) and not bool((new[0] == 0).all())
    else:
        assert scales.tolist() == [4.0] * 8 and bool((new == 0).all())


def nondefault_state():
    tx = optim.dynamic_loss_scale(optim.guard(optax.adam(0.1)), init_scale=16.0,
                                  growth_interval=4)
    _, state = run(tx, [GOOD, INF, GOOD])
    assert all(float(x) != 0 for x in (state.scale, state.good_steps, state.overflows))
    return tx, state


def test_state_round_trips_through_jit_and_donation():
    tx, state = nondefault_state()
    back = jax.jit(lambda s: s)(state)
    assert type(back) is optim.LossScaleState and bits_equal(state, back)
    copy = jax.tree.map(jnp.copy, state)
    expect = jax.jit(tx.update)(GOOD, state, PARAMS)
    donated = jax.jit(tx.update, donate_argnums=(1,))(GOOD, copy, PARAMS)
    assert bits_equal(expect, donated)


def test_state_round_trips_through_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx, state = nondefault_state()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "s", state)
        ckpt.wait_until_finished()
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        restored = ckpt.restore(tmp_path / "s", target)
    assert type(restored) is optim.LossScaleState and bits_equal(state, restored)
    update = jax.jit(tx.update)
    assert bits_equal(update(INF, state, PARAMS), update(INF, restored, PARAMS))


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"init_scale": 0.5}, {"init_scale": 32768.0}),
        ({"init_scale": 2.0**30}, {"init_scale": 32768.0}),
        ({"growth_interval": 0}, {"growth_interval": 2000}),
        ({"growth_factor": 1.0}, {"growth_factor": 2.0}),
        ({"backoff_factor": 1.0}, {"backoff_factor": 0.5}),
        ({"min_scale": 0.0}, {"min_scale": 1.0}),
        ({"max_scale": float("inf")}, {"max_scale": 16777216.0}),
    ],
)
def test_bad_settings_name_the_value_and_the_proposed_fix_is_accepted(kwargs, fix):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=f"{name}={value!r}") as err:
        optim.dynamic_loss_scale(optax.sgd(1.0), **kwargs)
    assert f"e.g. {fix[name]!r}" in str(err.value)
    optim.dynamic_loss_scale(optax.sgd(1.0), **fix)


def test_types_accepted_and_refused():
    tx = optim.dynamic_loss_scale(optax.sgd(1.0), init_scale=jnp.float32(8.0),
                                  growth_interval=np.int64(10), backoff_factor=np.float64(0.25))
    assert float(tx.init(PARAMS).scale) == 8.0
    with pytest.raises(TypeError, match="optax.adam\\(1e-3\\)"):
        optim.dynamic_loss_scale(optax.adam)
    with pytest.raises(TypeError, match="growth_interval"):
        optim.dynamic_loss_scale(optax.sgd(1.0), growth_interval=2.5)
    with pytest.raises(TypeError, match="init_scale"):
        optim.dynamic_loss_scale(optax.sgd(1.0), init_scale=True)
    with pytest.raises(TypeError, match="axis_name"):
        optim.dynamic_loss_scale(optax.sgd(1.0), axis_name=3)
    with pytest.raises(TypeError, match="loss_scale"):
        optim.stable_adamw(1e-3, warmup_steps=1, total_steps=10, loss_scale=1)


def test_inject_hyperparams_of_the_loss_scale_settings():
    # Every numeric setting traced at update (checked concrete at init).
    tx = optax.inject_hyperparams(optim.dynamic_loss_scale)(
        optax.sgd(1.0), init_scale=8.0, growth_interval=2, backoff_factor=0.25
    )
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    g = jax.tree.map(lambda p: jnp.full_like(p, 8.0), PARAMS)
    u, state = update(g, state)
    assert all(np.all(np.asarray(x) == -1.0) for x in jax.tree.leaves(u))
    u, state = update(g, state)
    assert float(optim.metrics(state)["loss_scale"]) == 16.0  # grown after 2 finite steps
    bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.inf), PARAMS)
    u, state = update(bad, state)
    assert float(optim.metrics(state)["loss_scale"]) == 4.0  # backed off by 0.25
    assert all(np.all(np.asarray(x) == 0.0) for x in jax.tree.leaves(u))
    assert sorted(state.hyperparams) == [
        "backoff_factor", "growth_factor", "growth_interval", "init_scale", "max_scale",
        "min_scale",
    ]
    with pytest.raises(ValueError, match="backoff_factor"):
        optax.inject_hyperparams(optim.dynamic_loss_scale)(
            optax.sgd(1.0), backoff_factor=2.0
        ).init(PARAMS)
