"""stable_adamw, bad settings, and the public surface of stablejax.optim."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stablejax.optim as optim


def test_public_surface():
    # isidentifier: pytest's assertion rewriting adds '@py_builtins' when it collects doctests.
    exported = {n for n in dir(optim) if not n.startswith("_") and n.isidentifier()}
    assert set(optim.__all__) == exported
    for name in optim.__all__:
        assert getattr(optim, name) is not None


def regression(tx, steps, nan_steps=(), scale_steps=()):
    key = jax.random.key(0)
    x = jax.random.normal(key, (64, 4))
    w_true = jnp.array([1.0, -2.0, 0.5, 3.0])
    y = x @ w_true
    params = {"w": jnp.zeros((4, 1)), "b": jnp.zeros(1)}
    state = tx.init(params)

    def loss_fn(p, scale):
        return scale * jnp.mean(jnp.square((x @ p["w"])[:, 0] + p["b"][0] - y))

    @jax.jit
    def step(p, s, scale):
        loss, g = jax.value_and_grad(loss_fn)(p, scale)
        u, s = tx.update(g, s, p, loss=loss)
        return optax.apply_updates(p, u), s, loss

    for i in range(steps):
        scale = jnp.nan if i in nan_steps else (1000.0 if i in scale_steps else 1.0)
        params, state, _ = step(params, state, scale)
    return params, state, float(loss_fn(params, 1.0))


def test_stable_adamw_trains_and_rides_out_faults():
    tx = optim.stable_adamw(0.05, warmup_steps=10, total_steps=300, weight_decay=0.0)
    _, _, clean = regression(tx, 300)
    assert clean < 1e-2
    faults = dict(nan_steps=set(range(100, 180)), scale_steps={200})
    params, state, loss = regression(tx, 300, **faults)
    m = optim.metrics(state)
    assert int(m["skipped_nonfinite"]) == 80 and int(m["skipped_spike"]) == 1
    assert int(m["give_ups"]) == 1  # 50 NaN steps in a row reset Adam, the run went on
    assert not bool(m["halted"])
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(params))
    assert loss < 1e-2


def test_stable_adamw_first_update_is_zero_and_schedule_advances_on_skips():
    tx = optim.stable_adamw(1e-2, warmup_steps=4, total_steps=20)
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    u, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
    assert (np.asarray(u["w"]) == 0).all()  # lr(0) = 0 in warm-up
    u, state = tx.update({"w": jnp.full((2, 2), jnp.nan)}, state, params)
    assert (np.asarray(u["w"]) == 0).all()
    # The schedule counts data steps, skipped ones too (inside overshoot_control's chain).
    assert int(state.inner_state[1].count) == 2


def test_weight_decay_only_on_matrices():
    tx = optim.stable_adamw(1.0, warmup_steps=0, total_steps=10, weight_decay=0.5, clip=None)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = jax.jit(tx.update)(zeros, state, params)
    assert (np.asarray(u["b"]) == 0).all()
    np.testing.assert_allclose(u["w"], -0.5, rtol=1e-6)


def _ratio(value):
    return optim.stable_adamw(1e-3, warmup_steps=1, total_steps=10, max_update_ratio=value)


BAD = [
    (lambda: optim.guard(optax.sgd(1.0), on_give_up="explode"), "on_give_up='explode'"),
    (lambda: optim.guard(optax.sgd(1.0), spike_threshold=-1.0), "spike_threshold"),
    (lambda: optim.guard(optax.sgd(1.0), spike_threshold=float("nan")), "spike_threshold"),
    (lambda: optim.guard(optax.sgd(1.0), max_consecutive_skips=0), "max_consecutive_skips"),
    (lambda: optim.guard(optax.sgd(1.0), spike_warmup=0), "spike_warmup"),
    (lambda: optim.guard(optax.sgd(1.0), loss_spike_threshold=0.0), "loss_spike_threshold"),
    (lambda: optim.guard(optax.sgd(1.0), stats_decay=1.0), "stats_decay"),
    (lambda: optim.guard(optax.sgd(1.0), lr_backoff=1.5), "lr_backoff"),
    (lambda: optim.guard(optax.sgd(1.0), lr_backoff=0.0), "lr_backoff"),
    (lambda: optim.guard(optax.sgd(1.0), lr_recovery_steps=0), "lr_recovery_steps"),
    (lambda: optim.guard(optax.sgd(1.0), min_lr_scale=2.0), "min_lr_scale"),
    (lambda: optim.clip_by_global_norm(-1.0), "max_norm"),
    (lambda: optim.clip_by_global_norm(float("inf")), "max_norm"),
    (lambda: optim.adaptive_clip(0.0), "z_threshold"),
    (lambda: optim.adaptive_clip(decay=0.0), "decay"),
    (lambda: optim.adaptive_clip(warmup_steps=0), "warmup_steps"),
    (lambda: optim.stable_adamw(-1e-3, warmup_steps=1, total_steps=10), "learning_rate"),
    (lambda: optim.stable_adamw(1e-3, warmup_steps=10, total_steps=10), "total_steps=10"),
    (lambda: optim.stable_adamw(1e-3, warmup_steps=1, total_steps=10, clip=0.0), "clip"),
    (lambda: optim.stable_adamw(1e-3, warmup_steps=1, total_steps=10, b2=1.0), "b2"),
    (lambda: optim.stable_adamw(1e-3, warmup_steps=1, total_steps=10, weight_decay=-1), "weight"),
    (lambda: _ratio(0.0), "max_update_ratio=0.0"),
    (lambda: _ratio(-0.1), "max_update_ratio=-0.1"),
    (lambda: _ratio(float("nan")), "max_update_ratio=nan"),
    (lambda: _ratio(float("inf")), "max_update_ratio=inf"),
]


@pytest.mark.parametrize("build,name", BAD, ids=[b[1] for b in BAD])
def test_bad_settings_raise_at_construction(build, name):
    with pytest.raises(ValueError, match=name.replace("(", r"\(")) as err:
        build()
    assert "stablejax.optim" in str(err.value)


def _leaf_norms(tree):
    return [float(jnp.linalg.norm(x.ravel())) for x in jax.tree.leaves(tree)]


def test_update_ratio_bound_holds_at_a_huge_learning_rate():
    ratio = 0.05
    tx = optim.stable_adamw(1e3, warmup_steps=0, total_steps=50, max_update_ratio=ratio)
    x = jax.random.normal(jax.random.key(0), (32, 3))
    y = jnp.tanh(x @ jnp.array([[1.0], [-2.0], [0.5]]))
    params = {"w": jax.random.normal(jax.random.key(1), (3, 1)), "b": jnp.zeros(1)}
    state = tx.init(params)

    def loss_fn(p):
        return jnp.mean(jnp.square(jnp.tanh(x @ p["w"] + p["b"][None, :]) - y))

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p, loss=loss)
        return optax.apply_updates(p, u), s, u

    for _ in range(30):
        new_params, state, u = step(params, state)
        for un, wn in zip(_leaf_norms(u), _leaf_norms(params)):
            assert un <= ratio * max(wn, 1e-3) * (1 + 1e-5)
        params = new_params
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(params))
    # Without the bound the same rate moves the weights by ~1e3 in one step.
    loose = optim.stable_adamw(1e3, warmup_steps=0, total_steps=50)
    p0 = {"w": jnp.ones((3, 1)), "b": jnp.zeros(1)}
    g0 = jax.grad(loss_fn)(p0)
    s0 = loose.init(p0)
    _, s0 = loose.update(g0, s0, p0)  # step 0 of the schedule
    u0, _ = loose.update(g0, s0, p0)
    assert max(_leaf_norms(u0)) > 100


def test_update_ratio_keeps_a_refused_step_exactly_zero():
    tx = optim.stable_adamw(10.0, warmup_steps=0, total_steps=20, max_update_ratio=0.01)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        _, state = update(jax.tree.map(jnp.ones_like, params), state, params)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        grads = {"w": jnp.full((3, 2), bad), "b": jnp.ones(2)}
        u, state = update(grads, state, params)
        for leaf in jax.tree.leaves(u):
            assert (np.asarray(leaf) == 0).all()


def test_update_ratio_is_finite_at_zero_params():
    ratio = 0.01
    tx = optim.stable_adamw(10.0, warmup_steps=0, total_steps=20, max_update_ratio=ratio)
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in (jax.tree.map(jnp.ones_like, params), jax.tree.map(jnp.zeros_like, params)):
        _, state = update(grads, state, params)  # the first step has lr(0) = 0
        u, state = update(grads, state, params)
        for leaf in jax.tree.leaves(u):
            assert np.isfinite(np.asarray(leaf)).all()
        # A zero leaf's update is bounded by ratio * eps (eps = 1e-3).
        assert max(_leaf_norms(u)) <= ratio * 1e-3 * (1 + 1e-5)


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="spike_warmup"):
        optim.guard(optax.sgd(1.0), spike_warmup=2.5)
    with pytest.raises(TypeError, match="max_norm"):
        optim.clip_by_global_norm("1.0")
