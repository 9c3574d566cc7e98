"""guard: NaN, Inf, overflow and spike steps, compared bit by bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stablejax import optim


def bits_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).shape == np.asarray(y).shape
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb)
    )


PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}, "scale": jnp.ones(4)}


def grads(scale=1.0, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    leaves, tdef = jax.tree.flatten(PARAMS)
    noisy = [scale * (1.0 + 0.1 * jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(tdef, noisy)


def with_value(g, path_leaf_index, value):
    leaves, tdef = jax.tree.flatten(g)
    leaves[path_leaf_index] = leaves[path_leaf_index].at[0].set(value)
    return jax.tree.unflatten(tdef, leaves)


def run(tx, grad_seq, losses=None):
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    states, updates = [state], []
    for i, g in enumerate(grad_seq):
        kw = {} if losses is None else {"loss": losses[i]}
        u, state = update(g, state, PARAMS, **kw)
        states.append(state)
        updates.append(u)
    return updates, states


def stats(s):
    return (s.norm_count, s.norm_mean, s.norm_var)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf, 1e20])
def test_nonfinite_step_changes_nothing(bad):
    tx = optim.guard(optax.adam(1e-2))
    seq = [grads(seed=i) for i in range(3)]
    leaf = 1  # dense/kernel in flatten order: dense/bias, dense/kernel, scale
    seq.append(with_value(grads(seed=9), leaf, bad))
    updates, states = run(tx, seq)
    before, after = states[-2], states[-1]
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates[-1]))
    assert bits_equal(before.inner_state, after.inner_state)
    assert bits_equal(stats(before), stats(after))
    assert int(after.skipped_nonfinite) == 1 and int(after.skipped_total) == 1
    assert int(after.skipped_spike) == 0 and int(after.consecutive) == 1
    assert int(after.last_skipped_step) == 3 and int(after.steps) == 4
    assert int(after.first_nonfinite_leaf) == leaf
    assert optim.nonfinite_leaf_path(after, PARAMS) == "['dense']['kernel']"
    # The non-finite norm is a flag in the state (no NaN or Inf stored), +inf in metrics().
    assert not bool(after.grad_norm_finite) and float(after.grad_norm) == 0.0
    assert float(optim.metrics(after)["grad_norm"]) == np.inf


def test_nonfinite_loss_alone_skips():
    tx = optim.guard(optax.sgd(0.1))
    updates, states = run(tx, [grads(), grads()], losses=[1.0, jnp.nan])
    assert not all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates[0]))
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates[1]))
    assert int(states[-1].skipped_nonfinite) == 1
    assert int(states[-1].first_nonfinite_leaf) == -1


@pytest.mark.parametrize("with_clip", [False, True])
def test_accepted_steps_are_the_inner_ones(with_clip):
    parts = [optim.clip_by_global_norm(1.0)] if with_clip else []
    inner = optax.chain(*parts, optax.adamw(1e-2))
    seq = [grads(seed=i) for i in range(4)]
    g_updates, g_states = run(optim.guard(inner), seq)
    p_updates = []
    state, step = inner.init(PARAMS), jax.jit(inner.update)
    for g in seq:
        u, state = step(g, state, PARAMS)
        p_updates.append(u)
    if not with_clip:
        assert bits_equal(g_updates, p_updates)
        assert bits_equal(g_states[-1].inner_state, state)
    else:  # the clip reuses the guard's norm, summed in another order: last-bit differences
        for a, b in zip(
            jax.tree.leaves((g_updates, g_states[-1].inner_state)),
            jax.tree.leaves((p_updates, state)),
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=0)


def test_spike_is_skipped_and_stats_untouched():
    tx = optim.guard(optax.adam(1e-2), spike_threshold=6.0, spike_warmup=10)
    seq = [grads(seed=i) for i in range(12)] + [grads(100.0, seed=50), grads(seed=51)]
    updates, states = run(tx, seq)
    before, spiked, after = states[-3], states[-2], states[-1]
    assert int(spiked.skipped_spike) == 1 and int(spiked.skipped_nonfinite) == 0
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates[-2]))
    assert bits_equal(before.inner_state, spiked.inner_state)
    assert bits_equal(stats(before), stats(spiked))
    assert int(after.consecutive) == 0 and int(after.skipped_total) == 1
    assert int(after.norm_count) == 13  # 12 + the good step after the spike


def test_loss_spike_is_skipped_when_asked():
    tx = optim.guard(optax.sgd(0.1), spike_threshold=None, loss_spike_threshold=6.0, spike_warmup=5)
    seq = [grads(seed=i) for i in range(8)]
    losses = [2.0, 2.1, 1.9, 2.0, 2.05, 1.95, 2.0, 9.0]
    updates, states = run(tx, seq, losses)
    assert int(states[-1].skipped_spike) == 1 and int(states[-2].skipped_total) == 0
    assert bits_equal(stats(states[-2]), stats(states[-1]))
    assert float(states[-1].loss_mean) == float(states[-2].loss_mean)
    np.testing.assert_allclose(float(states[-2].loss_mean), np.mean(losses[:7]), rtol=1e-6)
    # Off by default: the same losses pass.
    _, states = run(optim.guard(optax.sgd(0.1), spike_threshold=None), seq, losses)
    assert int(states[-1].skipped_total) == 0


def test_no_spike_test_before_warmup():
    tx = optim.guard(optax.sgd(0.1), spike_warmup=20)
    _, states = run(tx, [grads(seed=i) for i in range(5)] + [grads(100.0)])
    assert int(states[-1].skipped_total) == 0


def test_constant_history_does_not_flag_small_rises():
    # std is 0 for a constant history; the 0.1 * mean floor keeps 1.5x acceptable.
    tx = optim.guard(optax.sgd(0.1), spike_threshold=6.0, spike_warmup=5)
    const = jax.tree.map(jnp.ones_like, PARAMS)
    big = lambda k: jax.tree.map(lambda x: k * x, const)
    _, states = run(tx, [const] * 8 + [big(1.5), big(3.0)])
    assert int(states[-2].skipped_spike) == 0
    assert int(states[-1].skipped_spike) == 1


def test_one_nan_does_not_poison_the_statistics():
    # MaxText/Levanter windows skip ~a whole window after one NaN loss; here it
    # costs exactly one step, and the statistics equal those of the run without it.
    tx = optim.guard(optax.adam(1e-2), spike_warmup=5, stats_decay=0.9)
    clean = [grads(seed=i) for i in range(30)]
    dirty = clean[:10] + [with_value(clean[0], 0, jnp.nan)] + clean[10:]
    losses = [1.0] * 10 + [jnp.nan] + [1.0] * 20
    _, s_dirty = run(tx, dirty, losses)
    _, s_clean = run(tx, clean, [1.0] * 30)
    assert int(s_dirty[-1].skipped_total) == 1
    assert bits_equal(stats(s_dirty[-1]), stats(s_clean[-1]))
    assert bits_equal(s_dirty[-1].inner_state, s_clean[-1].inner_state)


def test_halt_never_lets_nan_into_adam_moments():
    limit = 3
    nan_g = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), PARAMS)
    seq = [grads()] + [nan_g] * (limit + 3) + [grads(seed=1)]
    _, states = run(optim.guard(optax.adam(1e-2), max_consecutive_skips=limit), seq)
    last = states[-1]
    assert bool(last.halted) and int(last.give_ups) == 1
    assert int(last.skipped_total) == limit + 4  # the healthy last step is refused too
    assert bits_equal(states[1].inner_state, last.inner_state)
    # Contrast: optax.apply_if_finite gives up and writes NaN into Adam's mu.
    tx = optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=limit)
    state, step = tx.init(PARAMS), jax.jit(tx.update)
    for g in seq[:-1]:
        _, state = step(g, state, PARAMS)
    mu = state.inner_state[0].mu
    assert any(np.isnan(np.asarray(x)).any() for x in jax.tree.leaves(mu))


def test_reset_reinitialises_and_trains_on():
    limit = 4
    inner = optax.adam(1e-2)
    nan_g = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), PARAMS)
    seq = [grads(seed=i) for i in range(6)] + [nan_g] * limit + [grads(seed=7)]
    tx = optim.guard(inner, max_consecutive_skips=limit, on_give_up="reset", spike_warmup=3)
    updates, states = run(tx, seq)
    gave_up, after = states[-2], states[-1]
    assert int(gave_up.give_ups) == 1 and not bool(gave_up.halted)
    assert int(gave_up.consecutive) == 0 and int(gave_up.norm_count) == 0
    assert bits_equal(gave_up.inner_state, inner.init(PARAMS))
    assert float(gave_up.norm_mean) == 0.0 and float(gave_up.norm_var) == 0.0
    # The next healthy step is the first step of a fresh Adam.
    fresh_u, _ = jax.jit(inner.update)(seq[-1], inner.init(PARAMS), PARAMS)
    assert bits_equal(updates[-1], fresh_u)
    assert int(after.skipped_total) == limit


def test_never_gives_up_without_limit():
    nan_g = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), PARAMS)
    tx = optim.guard(optax.sgd(0.1), max_consecutive_skips=None)
    updates, states = run(tx, [nan_g] * 5 + [grads()])
    assert int(states[-1].give_ups) == 0 and int(states[-2].consecutive) == 5
    assert not all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates[-1]))


def test_lr_backoff_scales_once_per_run_and_recovers():
    inner = optax.sgd(1.0)
    nan_g = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), PARAMS)
    tx = optim.guard(
        inner, lr_backoff=0.5, lr_recovery_steps=2, min_lr_scale=0.25, spike_threshold=None
    )
    g = grads()
    seq = [nan_g, nan_g, g, nan_g, nan_g, nan_g, g, nan_g, g, g, g]
    updates, states = run(tx, seq)
    scales = [float(s.lr_scale) for s in states[1:]]
    assert scales == [0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.5, 0.5]
    # An accepted update is the inner update times the scale in force before the step.
    assert bits_equal(updates[6], jax.tree.map(lambda x: -0.25 * x, g))
    assert bits_equal(updates[10], jax.tree.map(lambda x: -0.5 * x, g))
    assert int(states[-1].good_streak) == 1


def test_low_precision_gradients():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    tx = optim.guard(optax.sgd(0.1))
    state = tx.init(params)
    g = jax.tree.map(lambda x: jnp.full_like(x, 300.0), params)  # 300^2 * 6 overflows f16
    u, state = jax.jit(tx.update)(g, state, params)
    assert int(state.skipped_total) == 0 and np.isfinite(float(state.grad_norm))
    assert jax.tree.leaves(u)[0].dtype == jnp.bfloat16
    g = with_value(g, 2, jnp.nan)
    u, state = jax.jit(tx.update)(g, state, params)
    assert int(state.skipped_nonfinite) == 1 and int(state.first_nonfinite_leaf) == 2


def test_metrics_keys_and_values():
    tx = optax.chain(optim.guard(optax.adam(1e-2)), optax.scale(1.0))
    state = tx.init(PARAMS)
    _, state = tx.update(with_value(grads(), 2, jnp.nan), state, PARAMS)
    m = optim.metrics(state)
    for key in (
        "skipped_total",
        "skipped_nonfinite",
        "skipped_spike",
        "consecutive_skips",
        "grad_norm",
        "halted",
        "lr_scale",
        "first_nonfinite_leaf",
        "give_ups",
    ):
        assert key in m and np.ndim(m[key]) == 0
    assert int(m["skipped_total"]) == 1 and int(m["first_nonfinite_leaf"]) == 2
    assert optim.leaf_path(PARAMS, m["first_nonfinite_leaf"]) == "['scale']"
    assert optim.leaf_path(PARAMS, -1) is None
    with pytest.raises(IndexError, match="out of range"):
        optim.leaf_path(PARAMS, 3)
    with pytest.raises(ValueError, match="no GuardState"):
        optim.metrics(optax.adam(1e-2).init(PARAMS))


def test_metrics_under_jit():
    tx = optim.guard(optax.sgd(0.1))
    state = tx.init(PARAMS)
    m = jax.jit(optim.metrics)(state)
    assert int(m["steps"]) == 0 and float(m["lr_scale"]) == 1.0


def test_reset_without_params_uses_the_gradient_as_template():
    inner = optax.adam(1e-2)
    tx = optim.guard(inner, max_consecutive_skips=1, on_give_up="reset")
    state = tx.init(PARAMS)
    update = jax.jit(lambda g, s: tx.update(g, s))
    _, state = update(grads(), state)
    assert int(state.inner_state[0].count) == 1
    _, state = update(with_value(grads(), 0, jnp.nan), state)
    assert int(state.give_ups) == 1
    assert bits_equal(state.inner_state, inner.init(PARAMS))
