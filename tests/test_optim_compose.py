"""guard within optax.chain, MultiSteps and inject_hyperparams; jit and orbax round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stablejax import optim

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
GOOD = {"w": jnp.full((3, 2), 0.5), "b": jnp.full(2, -0.5)}
BAD = {"w": jnp.full((3, 2), 0.5), "b": jnp.array([jnp.nan, 1.0])}


def bits_equal(a, b) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def steps(tx, grads):
    state, update = tx.init(PARAMS), jax.jit(tx.update)
    out = []
    for g in grads:
        u, state = update(g, state, PARAMS)
        out.append(u)
    return out, state


def is_zero(tree):
    return all((np.asarray(x) == 0).all() for x in jax.tree.leaves(tree))


def test_inside_chain_and_metrics_finds_it():
    tx = optax.chain(optax.scale(2.0), optim.guard(optax.adam(0.1)), optax.scale(1.0))
    (u1, u2), state = steps(tx, [GOOD, BAD])
    assert not is_zero(u1) and is_zero(u2)
    assert int(optim.metrics(state)["skipped_nonfinite"]) == 1


def test_inside_multisteps():
    tx = optax.MultiSteps(optim.guard(optax.adam(0.1)), every_k_schedule=2)
    us, state = steps(tx, [GOOD, GOOD, GOOD, BAD])
    # Steps 2 and 4 emit; the accumulated gradient of the 4th holds the NaN.
    assert not is_zero(us[1]) and is_zero(us[3])
    m = optim.metrics(state)
    assert int(m["steps"]) == 2 and int(m["skipped_nonfinite"]) == 1


def test_wrapping_multisteps():
    inner = optax.MultiSteps(optax.adam(0.1), every_k_schedule=2).gradient_transformation()
    tx = optim.guard(inner)
    us, state = steps(tx, [GOOD, BAD, GOOD, GOOD])
    # The NaN mini-step is refused before it reaches the accumulator; the next two
    # good mini-steps complete the pair.
    assert is_zero(us[1]) and not is_zero(us[2]) and is_zero(us[3])
    assert int(optim.metrics(state)["skipped_total"]) == 1
    assert np.isfinite(np.asarray(state.inner_state.acc_grads["b"])).all()


def test_wrapping_inject_hyperparams():
    tx = optim.guard(optax.inject_hyperparams(optax.adamw)(learning_rate=0.1))
    us, state = steps(tx, [GOOD, BAD])
    assert is_zero(us[1])
    inner = state.inner_state
    assert float(inner.hyperparams["learning_rate"]) == pytest.approx(0.1)
    state = state._replace(
        inner_state=inner._replace(hyperparams={**inner.hyperparams, "learning_rate": 0.0})
    )
    u, _ = jax.jit(tx.update)(GOOD, state, PARAMS)
    assert is_zero(u)


def test_guard_inside_inject_hyperparams():
    def make(learning_rate):
        return optim.guard(optax.sgd(learning_rate))

    tx = optax.inject_hyperparams(make)(learning_rate=0.5)
    (u1, u2), state = steps(tx, [GOOD, BAD])
    assert bits_equal(u1, jax.tree.map(lambda g: -0.5 * g, GOOD)) and is_zero(u2)
    assert int(optim.metrics(state)["skipped_total"]) == 1


def _run_both(tx, ref, n=4, with_loss=True):
    s, r = tx.init(PARAMS), ref.init(PARAMS)
    update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    extra = {"loss": jnp.float32(1.0)} if with_loss else {}
    for i in range(n):
        g = BAD if i == 2 else GOOD
        u, s = update(g, s, PARAMS, **extra)
        v, r = ref_update(g, r, PARAMS, **extra)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-12)
    return s, r


def test_inject_hyperparams_of_stable_adamw_as_of_optax_adamw():
    # optax's own warmup_cosine_decay_schedule branches in Python on its values,
    # and every numeric setting is traced here (the step counts included); the
    # default weight-decay mask must not be taken for a schedule.
    kw = dict(warmup_steps=2, total_steps=50, weight_decay=0.1, clip=1.0, b1=0.9)
    tx = optax.inject_hyperparams(optim.stable_adamw)(learning_rate=1e-2, **kw)
    ref = optim.stable_adamw(1e-2, **kw)
    s, r = _run_both(tx, ref)
    assert float(s.hyperparams["learning_rate"]) == pytest.approx(1e-2)
    assert int(optim.metrics(s)["skipped_total"]) == 1  # the guard inside still works
    # The rate in the state is the one used: doubled, the next step doubles
    # (weight decay included: both terms are proportional to the rate).
    hp = dict(s.hyperparams)
    u1, _ = jax.jit(tx.update)(GOOD, s, PARAMS, loss=jnp.float32(1.0))
    u2, _ = jax.jit(tx.update)(
        GOOD, s._replace(hyperparams={**hp, "learning_rate": jnp.float32(2e-2)}), PARAMS,
        loss=jnp.float32(1.0),
    )
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_allclose(2 * np.asarray(a), np.asarray(b), rtol=1e-5)
    assert not is_zero(u1)
    # static_args, as optax documents for integer settings, works too.
    tx = optax.inject_hyperparams(optim.stable_adamw, static_args=("warmup_steps", "total_steps"))(
        learning_rate=jnp.float32(1e-2), **kw
    )
    _run_both(tx, ref, n=1)


def test_inject_hyperparams_of_the_guard_numeric_settings():
    def make(spike_threshold, stats_decay, lr_backoff, min_lr_scale, loss_spike_threshold):
        return optim.guard(
            optax.adam(1e-2), spike_threshold=spike_threshold, stats_decay=stats_decay,
            lr_backoff=lr_backoff, min_lr_scale=min_lr_scale,
            loss_spike_threshold=loss_spike_threshold,
        )

    args = (6.0, 0.98, 0.5, 0.01, 6.0)
    tx = optax.inject_hyperparams(make)(*args)
    s, r = _run_both(tx, make(*args))
    assert set(s.hyperparams) == {
        "spike_threshold", "stats_decay", "lr_backoff", "min_lr_scale", "loss_spike_threshold",
    }
    m, ref = optim.metrics(s), optim.metrics(r)
    assert int(m["skipped_total"]) == int(ref["skipped_total"]) == 1
    assert float(m["lr_scale"]) == float(ref["lr_scale"]) == 0.5


def test_clip_reuses_the_guard_norm_only_when_first():
    # First in the chain: the guard's norm is reused, the result equals a fresh clip.
    g = {"w": jnp.full((3, 2), 3.0), "b": jnp.full(2, -4.0)}
    first = optim.guard(optax.chain(optim.clip_by_global_norm(1.0), optax.sgd(1.0)))
    (u,), _ = steps(first, [g])
    ref, _ = optim.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    np.testing.assert_allclose(optax.tree.norm(u), 1.0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, -b, rtol=1e-6)
    # After a scale the hint must be ignored: the clip sees the scaled gradient.
    later = optim.guard(optax.chain(optax.scale(0.01), optim.clip_by_global_norm(1.0)))
    (u,), _ = steps(later, [g])
    assert bits_equal(u, jax.tree.map(lambda x: 0.01 * x, g))


def nondefault_state():
    tx = optim.guard(
        optax.adam(0.1), lr_backoff=0.5, max_consecutive_skips=2, on_give_up="halt", spike_warmup=2
    )
    double = jax.tree.map(lambda x: 2 * x, GOOD)
    _, state = steps(tx, [GOOD, double, GOOD, BAD, GOOD])
    state = state._replace(
        skipped_spike=jnp.int32(3),
        give_ups=jnp.int32(2),
        halted=jnp.asarray(True),
        good_streak=jnp.int32(4),
        consecutive=jnp.int32(1),
        first_nonfinite_leaf=jnp.int32(1),
        loss_mean=jnp.float32(1.5),
        loss_var=jnp.float32(0.25),
        skipped_nonfinite_update=jnp.int32(2),
        grad_norm_finite=jnp.asarray(False),
        spike_run=jnp.int32(3),
        rebaselines=jnp.int32(1),
    )
    for name, value in state._asdict().items():
        if name != "inner_state":
            init = tx.init(PARAMS)._asdict()[name]
            assert not bits_equal(value, init), name
    return tx, state


def test_state_round_trips_through_jit():
    _, state = nondefault_state()
    back = jax.jit(lambda s: s)(state)
    assert type(back) is optim.GuardState and bits_equal(state, back)


def test_adaptive_clip_state_round_trips_through_jit():
    tx = optim.adaptive_clip(2.0, warmup_steps=1)
    _, state = steps(tx, [GOOD, jax.tree.map(lambda x: 3 * x, GOOD)])
    back = jax.jit(lambda s: s)(state)
    assert type(back) is optim.AdaptiveClipState and bits_equal(state, back)
    assert all(float(x) != 0 for x in state[1:])


def test_state_round_trips_through_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx, state = nondefault_state()
    state = state._replace(halted=jnp.asarray(False))
    path = tmp_path / "opt_state"
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, state)
        ckpt.wait_until_finished()
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        restored = ckpt.restore(path, target)
    assert type(restored) is optim.GuardState and bits_equal(state, restored)
    # Training continues identically from the restored state.
    update = jax.jit(tx.update)
    assert bits_equal(update(GOOD, state, PARAMS), update(GOOD, restored, PARAMS))


def test_metrics_of_an_nnx_optimizer_are_plain_arrays_under_jit():
    from flax import nnx

    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    tx = optim.stable_adamw(1e-3, warmup_steps=2, total_steps=10)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x):
        loss, g = nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)
        opt.update(model, g, loss=loss)
        return optim.metrics(opt.opt_state)

    m = step(model, opt, jnp.full((1, 2), jnp.nan))
    assert all(isinstance(v, jax.Array) for v in m.values())
    assert int(m["skipped_nonfinite"]) == 1 and int(m["steps"]) == 1
