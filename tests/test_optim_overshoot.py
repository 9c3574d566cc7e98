"""overshoot_control: the loss-feedback step control that answers a learning rate too high."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stablejax import optim


def bits_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def quadratic_run(tx, steps=40, w0=(1.0, -2.0)):
    """SGD-like run on sum(w**2); returns w, the state and the per-step states seen."""
    loss_fn = lambda w: jnp.sum(w**2)
    w = jnp.array(w0)
    state = tx.init(w)
    update = jax.jit(tx.update)
    losses, states = [], []
    for _ in range(steps):
        loss, g = jax.value_and_grad(loss_fn)(w)
        u, state = update(g, state, w, loss=loss)
        w = w + u
        losses.append(float(loss))
        states.append(state)
    return w, state, losses, states


def test_a_rate_too_high_is_brought_down_by_the_loss():
    # SGD on w**2 is stable only for lr < 1: at 1.5 each step doubles |w|.
    w, *_ = quadratic_run(optax.sgd(1.5))
    assert float(jnp.sum(w**2)) > 1e10
    w, state, losses, _ = quadratic_run(optim.overshoot_control(optax.sgd(1.5)))
    assert float(jnp.sum(w**2)) < 1e-3
    assert int(state.overshoots) >= 1 and int(state.judged) >= int(state.overshoots)
    assert float(state.scale) < 1.0
    assert np.isfinite(float(state.last_ratio))
    # The first noise_warmup=5 transitions only measure the loss noise (x4 per
    # step here); the first judged step shrinks the rate, then the loss falls.
    peak = int(np.argmax(losses))
    assert peak <= 8 and losses[-1] < 1e-3 * losses[peak]


def test_scale_one_leaves_the_inner_updates_bitwise_unchanged():
    # A well-tuned rate: nothing is judged, so the wrapper changes no bit.
    inner = optax.adam(0.05)
    tx = optim.overshoot_control(inner)
    loss_fn = lambda w: jnp.mean((w - jnp.arange(4.0)) ** 2)
    w_ref = w = jnp.zeros(4)
    s_ref, s = inner.init(w), tx.init(w)
    for _ in range(50):
        loss, g = jax.value_and_grad(loss_fn)(w)
        u_ref, s_ref = inner.update(g, s_ref, w_ref)
        u, s = tx.update(g, s, w, loss=loss)
        assert bits_equal(u, u_ref)
        w_ref, w = w_ref + u_ref, w + u
    assert int(s.overshoots) == 0 and float(s.scale) == 1.0
    assert bits_equal(s.inner_state, s_ref)


def test_without_loss_it_passes_through():
    tx = optim.overshoot_control(optax.sgd(1.5))
    state = tx.init(jnp.zeros(2))
    g = jnp.array([1.0, 2.0])
    u, new = tx.update(g, state)
    assert bits_equal(u, -1.5 * g)
    assert bits_equal(new._replace(inner_state=()), state._replace(inner_state=()))


def test_refused_steps_are_not_judged_and_stay_exact_zeros():
    tx = optim.overshoot_control(optim.guard(optax.sgd(1.5)))
    loss_fn = lambda w: jnp.sum(w**2)
    w = jnp.array([1.0, -2.0])
    state = tx.init(w)
    update = jax.jit(tx.update)
    for i in range(12):
        loss, g = jax.value_and_grad(loss_fn)(w)
        if i == 8:
            g, loss = g.at[0].set(jnp.nan), jnp.nan
        before = state
        u, state = update(g, state, w, loss=loss)
        if i == 8:
            assert (np.asarray(u) == 0).all() and not np.signbit(np.asarray(u)).any()
            # Neither judged nor counted in the noise, and the next step is not judged either.
            assert int(state.judged) == int(before.judged)
            assert int(state.noise_count) == int(before.noise_count)
            assert float(state.noise_var) == float(before.noise_var)
            assert float(state.prev_pred) == 0.0
        if i == 9:
            assert int(state.judged) == int(before.judged)
        w = w + u
    assert np.isfinite(np.asarray(w)).all()


def test_a_loss_spike_refused_by_the_guard_does_not_shrink_the_step():
    # lr 0.3 on w**2 is well inside the stable range; one batch's loss x1000
    # (refused by the guard as a spike) must not read as an overshoot.
    loss_fn = lambda w, k: k * jnp.sum(w**2)
    tx = optim.overshoot_control(optim.guard(optax.sgd(0.05), spike_warmup=5))
    w = jnp.array([1.0, -2.0])
    state = tx.init(w)
    for i in range(30):
        k = 1000.0 if i == 20 else 1.0
        loss, g = jax.value_and_grad(loss_fn)(w, k)
        u, state = tx.update(g, state, w, loss=loss)
        w = w + u
    assert int(optim.metrics(state)["skipped_spike"]) == 1
    assert int(state.overshoots) == 0 and float(state.scale) == 1.0


@pytest.mark.parametrize("refused", ["nonfinite_gradient", "zero_update", "accepted"])
def test_only_a_transition_between_accepted_steps_is_judged(refused):
    # A state whose last step predicted a decrease of 1.0 with almost no loss noise:
    # a loss that jumps to 1000 is an overshoot only if the step that sees it was accepted.
    inner = optax.set_to_zero() if refused == "zero_update" else optax.sgd(0.1)
    tx = optim.overshoot_control(inner)
    w = jnp.ones(2)
    state = tx.init(w)._replace(
        noise_var=jnp.float32(1e-6),
        noise_count=jnp.int32(10),
        prev_loss=jnp.float32(1.0),
        prev_pred=jnp.float32(1.0),
    )
    g = jnp.array([jnp.nan, 1.0]) if refused == "nonfinite_gradient" else jnp.ones(2)
    _, new = tx.update(g, state, w, loss=jnp.float32(1000.0))
    if refused == "accepted":
        assert int(new.overshoots) == 1 and float(new.scale) == 0.5
    else:
        assert int(new.judged) == 0 and int(new.overshoots) == 0
        assert float(new.scale) == 1.0 and float(new.prev_pred) == 0.0
        assert float(new.noise_var) == pytest.approx(1e-6) and int(new.noise_count) == 10


def test_scale_is_bounded_and_recovers():
    def scales(tx, steps):
        _, state, _, states = quadratic_run(tx, steps)
        return [float(st.scale) for st in states], state

    # The scale never goes below min_scale, and reaches it (many overshoots here).
    history, state = scales(
        optim.overshoot_control(optax.sgd(1.5), min_scale=0.6, recovery_steps=4), 60
    )
    assert int(state.overshoots) > 1
    assert min(history) == pytest.approx(0.6, rel=1e-6)
    # After the first overshoot halves it, the scale grows back 2x every 4 steps.
    history, _ = scales(optim.overshoot_control(optax.sgd(1.5), recovery_steps=4), 30)
    drops = [i for i in range(1, 30) if history[i] < history[i - 1]]
    assert drops, history
    i = drops[0]
    assert history[i] == pytest.approx(0.5, rel=1e-6)
    assert history[i + 1] == pytest.approx(history[i] * 2**0.25, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(min_ratio=0.0), "min_ratio"),
        (dict(min_ratio=1.5), "min_ratio"),
        (dict(noise_sigmas=-1.0), "noise_sigmas"),
        (dict(shrink=1.0), "shrink"),
        (dict(recovery_steps=0), "recovery_steps"),
        (dict(min_scale=0.0), "min_scale"),
        (dict(min_scale=2.0), "min_scale"),
        (dict(noise_decay=1.0), "noise_decay"),
        (dict(noise_warmup=0), "noise_warmup"),
    ],
)
def test_bad_settings_raise_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        optim.overshoot_control(optax.sgd(0.1), **kwargs)


def test_replicas_agree_under_shard_map():
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    devices = np.array(jax.devices()[:8])
    assert len(devices) == 8
    mesh = Mesh(devices, ("d",))
    tx = optim.overshoot_control(optax.sgd(1.5), axis_name="d")

    def loss_fn(w, x):
        return jnp.mean(jnp.sum((w[None, :] * x) ** 2, axis=-1))

    def step(w, s, x):
        # Each device sees its own batch: without the axis reductions the scales would differ.
        loss, g = jax.value_and_grad(loss_fn)(w, x)
        g = jax.lax.pmean(g, "d")
        u, s = tx.update(g, s, w, loss=loss)
        return w + u, s, s.scale[None], (w + u)[None]

    x = 1.0 + 0.5 * jax.random.normal(jax.random.key(0), (8, 2))
    shard = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P(), P(), P("d")),
            out_specs=(P(), P(), P("d"), P("d")),
            check_vma=False,
        )
    )
    w = jnp.array([1.0, -2.0])
    s = tx.init(w)
    for _ in range(100):
        w, s, scales, ws = shard(w, s, x)
        assert len(set(np.asarray(scales).tolist())) == 1
        assert (np.asarray(ws) == np.asarray(ws)[0]).all()
    assert int(s.overshoots) >= 1
    # Without the control the same run diverges (|w| grows x2.75 per step).
    start = float(loss_fn(jnp.array([1.0, -2.0]), x))
    assert np.isfinite(np.asarray(w)).all() and float(loss_fn(w, x)) < 0.1 * start


def test_stable_adamw_includes_it_by_default():
    params = {"w": jnp.ones((2, 2))}
    on = optim.stable_adamw(1e-2, warmup_steps=2, total_steps=10)
    off = optim.stable_adamw(1e-2, warmup_steps=2, total_steps=10, overshoot=False)
    s_on, s_off = on.init(params), off.init(params)
    assert isinstance(s_on, optim.OvershootState)
    m_on, m_off = optim.metrics(s_on), optim.metrics(s_off)
    assert float(m_on["overshoot_scale"]) == 1.0 and int(m_on["overshoots"]) == 0
    assert "overshoots" not in m_off
    # Nothing judged yet: the same bits as without it, step by step.
    g = {"w": jnp.full((2, 2), 0.5)}
    for _ in range(4):
        u_on, s_on = on.update(g, s_on, params, loss=jnp.float32(1.0))
        u_off, s_off = off.update(g, s_off, params, loss=jnp.float32(1.0))
        assert bits_equal(u_on, u_off)
    with pytest.raises(TypeError, match="overshoot"):
        optim.stable_adamw(1e-2, warmup_steps=2, total_steps=10, overshoot="yes")
