"""The optimizer chain at every edge: x64, float16, jax.Array settings,
zero-size leaves, collapsed statistics, non-finite inner output, MultiSteps, and
error messages whose proposed fixes are accepted."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stablejax import optim


def finite_state(state) -> bool:
    """True iff every floating leaf of ``state`` is finite (no NaN or Inf stored)."""
    return all(
        bool(np.all(np.isfinite(np.asarray(x))))
        for x in jax.tree.leaves(state)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    )


def bits_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb)
    )


def scan(tx, grads_seq, params):
    """All steps in one compiled ``lax.scan``: returns the stacked updates and the last state."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads_seq)

    def body(state, g):
        u, state = tx.update(g, state, params)
        return state, u

    state, us = jax.jit(lambda s, gs: jax.lax.scan(body, s, gs))(tx.init(params), stacked)
    return us, state


def run(tx, grads_seq, params, **extra):
    update = jax.jit(tx.update)
    state = tx.init(params)
    outs = []
    for g in grads_seq:
        u, state = update(g, state, params, **extra)
        outs.append(u)
    return outs, state


# --- x64 -------------------------------------------------------------------------


def test_clips_and_guard_work_under_x64():
    with jax.enable_x64(True):
        g32 = {"a": jnp.array([3.0, 4.0], jnp.float32), "b": jnp.array([jnp.inf], jnp.float32)}
        u, _ = optim.clip_by_global_norm(1.0).update(g32, optax.EmptyState())
        np.testing.assert_array_equal(u["a"], [0.0, 0.0])
        np.testing.assert_array_equal(u["b"], [1.0])
        assert u["a"].dtype == jnp.float32
        tx = optim.adaptive_clip(2.0, warmup_steps=1)
        u, s = tx.update({"a": jnp.array([3.0, 4.0], jnp.float32)}, tx.init(None))
        np.testing.assert_allclose(u["a"], [3.0, 4.0])
        assert s.mean.dtype == jnp.float32
        # float64 gradients above 1.8e19 are finite in float64: clipped, not refused.
        g64 = {"w": jnp.array([3e20, 4e20], jnp.float64)}
        tx = optim.guard(optax.chain(optim.clip_by_global_norm(1.0), optax.sgd(1.0)))
        state = tx.init(jax.tree.map(jnp.zeros_like, g64))
        u, state = jax.jit(tx.update)(g64, state)
        np.testing.assert_allclose(u["w"], [-0.6, -0.8], rtol=1e-12)
        assert int(state.skipped_total) == 0 and bool(state.grad_norm_finite)
        assert state.norm_mean.dtype == jnp.float32 and finite_state(state)
        # The state keeps its dtypes from init (a scan carry would break otherwise).
        assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(
            lambda x: x.dtype, tx.init(jax.tree.map(jnp.zeros_like, g64))
        )
    assert jnp.zeros(1).dtype == jnp.float32  # x64 did not leak out of the context


# --- jax.Array hyperparameters, numpy scalars -------------------------------------


def test_inject_hyperparams_with_jax_arrays():
    g = {"w": jnp.array([3.0, 4.0])}
    for factory in (optim.clip_by_global_norm, optax.clip_by_global_norm):
        tx = optax.inject_hyperparams(factory)(0.1)
        state = tx.init(g)
        u, state = jax.jit(tx.update)(g, state)
        np.testing.assert_allclose(u["w"], [0.06, 0.08], rtol=1e-6)
    tx = optax.inject_hyperparams(optim.adaptive_clip)(2.0)
    u, _ = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_allclose(u["w"], [3.0, 4.0])


def test_numpy_and_jax_scalar_settings_are_accepted():
    optim.guard(optax.sgd(1.0), spike_threshold=np.float32(4.0), spike_warmup=np.int32(5))
    optim.clip_by_global_norm(np.float64(1.0))
    optim.adaptive_clip(jnp.float32(2.0), warmup_steps=jnp.int32(3))
    # b1=0 (optax accepts it): Adam's first step is g / |g| = 1, plus weight decay 0.1 * w.
    params = {"w": jnp.ones((2, 2))}
    tx = optim.stable_adamw(
        jnp.float32(1.0),
        warmup_steps=np.int64(0),
        total_steps=np.int64(10),
        b1=0,
        clip=None,
        overshoot=False,
    )
    u, state = jax.jit(tx.update)({"w": jnp.full((2, 2), 2.0)}, tx.init(params), params)
    lr0 = optax.warmup_cosine_decay_schedule(0.0, 1.0, 0, 10, 0.1)(0)
    np.testing.assert_allclose(u["w"], -1.1 * lr0, rtol=1e-5)
    assert finite_state(state)


# --- zero-size leaves ---------------------------------------------------------------


def test_zero_size_leaves():
    g = {"empty": jnp.zeros((0, 3)), "w": jnp.array([3.0, 4.0])}
    # adaptive_clip's first step is warm-up: nothing clipped.
    cases = [(optim.clip_by_global_norm(1.0), [0.6, 0.8]), (optim.adaptive_clip(2.0), [3.0, 4.0])]
    for tx, want in cases:
        u, _ = jax.jit(tx.update)(g, tx.init(g))
        assert u["empty"].shape == (0, 3)
        np.testing.assert_allclose(u["w"], want, rtol=1e-6)
    u, _ = optim.clip_by_global_norm(1.0).update(
        {"empty": jnp.zeros((0,)), "w": jnp.array([jnp.inf])}, optax.EmptyState()
    )
    np.testing.assert_array_equal(u["w"], [1.0])
    tx = optim.guard(optax.chain(optim.clip_by_global_norm(1.0), optax.adam(1e-3)))
    _, state = run(tx, [g, g], g)
    assert int(state.skipped_total) == 0


# --- float16 ------------------------------------------------------------------------


def test_float16_norm_is_taken_in_float32():
    # Global norm 94,868 (float16's maximum is 65,504): inside a guard, as outside.
    g = {"w": jnp.full((9,), 31622.0, jnp.float16), "b": jnp.full((1,), 3.0, jnp.float16)}
    norm = float(np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in g.values())))
    assert 94_000 < norm < 95_000
    want = {k: np.asarray(v, np.float32) / norm for k, v in g.items()}
    chain = optax.chain(optim.clip_by_global_norm(1.0), optax.sgd(-1.0))
    for tx in (chain, optim.guard(chain)):
        u, _ = jax.jit(tx.update)(g, tx.init(g), g)
        for k in g:
            assert u[k].dtype == jnp.float16
            np.testing.assert_allclose(np.asarray(u[k], np.float32), want[k], rtol=2e-3)
    tx = optim.guard(optax.sgd(1.0))
    _, state = jax.jit(tx.update)(g, tx.init(g), g)
    np.testing.assert_allclose(float(state.grad_norm), norm, rtol=1e-5)


def test_inner_made_nonfinite_update_is_refused_and_counted():
    # float16 Adam: eps=1e-8 is 0 in float16, so a zero gradient entry gives 0/0.
    params = {"w": jnp.ones((4,), jnp.float16)}
    g = {"w": jnp.array([1.0, 0.0, -1.0, 0.5], jnp.float16)}
    tx = optim.guard(optax.adam(1e-3))
    state0 = tx.init(params)
    u, state = jax.jit(tx.update)(g, state0, params)
    assert np.all(np.asarray(u["w"]) == 0)
    assert int(state.skipped_nonfinite_update) == 1 and int(state.skipped_total) == 1
    assert int(state.skipped_nonfinite) == 0 and int(state.first_nonfinite_leaf) == -1
    assert bits_equal(state.inner_state, state0.inner_state) and finite_state(state)
    assert int(optim.metrics(state)["skipped_nonfinite_update"]) == 1
    # stable_adamw keeps Adam's moments in float32 for float16 params: it trains.
    tx = optim.stable_adamw(1e-2, warmup_steps=0, total_steps=10)
    u, state = jax.jit(tx.update)(g, tx.init(params), params, loss=jnp.float32(1.0))
    uw = np.asarray(u["w"], np.float32)
    assert u["w"].dtype == jnp.float16 and np.all(np.isfinite(uw))
    assert uw[1] == 0 and uw[0] < 0 < uw[2]  # a vector: no weight decay
    assert int(optim.metrics(state)["skipped_total"]) == 0 and finite_state(state)


def test_check_updates_in_float32():
    # eps=0 Adam makes 0/0 in float32 too. Checked: refused; unchecked: zeros per element.
    params = {"w": jnp.ones(3)}
    g = {"w": jnp.array([1.0, 0.0, 2.0])}
    inner = optax.scale_by_adam(eps=0.0)
    tx = optim.guard(inner, check_updates=True)
    u, state = jax.jit(tx.update)(g, tx.init(params), params)
    assert np.all(np.asarray(u["w"]) == 0) and int(state.skipped_nonfinite_update) == 1
    tx = optim.guard(inner)
    u, state = jax.jit(tx.update)(g, tx.init(params), params)
    np.testing.assert_allclose(u["w"], [1.0, 0.0, 1.0], rtol=1e-4)
    assert int(state.skipped_total) == 0 and finite_state(state)


# --- statistics that cannot collapse ----------------------------------------------------


def _noisy(n, scale, seed):
    draws = scale * (1 + 0.1 * np.random.default_rng(seed).standard_normal((n, 8)))
    return [{"w": jnp.asarray(d, jnp.float32)} for d in draws]


def test_frozen_phase_does_not_make_every_later_step_a_spike():
    params = {"w": jnp.zeros(8)}
    seq = [{"w": jnp.zeros(8)}] * 25 + _noisy(150, 1.0, 0)
    _, state = scan(optim.guard(optax.adam(1e-3)), seq, params)
    assert int(state.skipped_spike) == 0 and not bool(state.halted)
    assert int(state.norm_count) == 150
    tx = optim.adaptive_clip()
    outs, state = scan(tx, seq, params)
    out_norms = np.linalg.norm(np.asarray(outs["w"][25:]), axis=1)
    in_norms = np.linalg.norm(np.stack([np.asarray(g["w"]) for g in seq[25:]]), axis=1)
    assert np.min(out_norms / in_norms) > 0.5  # not clipped to 0
    assert int(state.count) == 150 and finite_state(state)


def test_run_of_spikes_rebaselines_instead_of_halting():
    params = {"w": jnp.zeros(8)}
    seq = _noisy(30, 1.0, 1) + _noisy(130, 100.0, 2)  # the norm's level moves 100x
    tx = optim.guard(optax.sgd(1e-3))  # defaults: halt after 100 refusals in a row
    outs, state = scan(tx, seq, params)
    assert not bool(state.halted) and int(state.give_ups) == 0
    assert int(state.rebaselines) == 1 and int(state.skipped_spike) == 20
    assert np.all(np.any(np.asarray(outs["w"][50:]) != 0, axis=1))  # training goes on


# --- nothing non-finite stored ---------------------------------------------------------


def test_no_nan_or_inf_in_any_state_after_nonfinite_steps():
    params = {"w": jnp.ones((2, 2))}
    bad = [{"w": jnp.full((2, 2), v)} for v in (jnp.nan, jnp.inf, 1e30)]
    tx = optim.guard(optax.adam(1e-3), max_consecutive_skips=2)  # halts
    _, state = run(tx, bad, params)
    assert bool(state.halted) and finite_state(state)
    assert float(optim.metrics(state)["grad_norm"]) == np.inf
    tx = optim.stable_adamw(1e-3, warmup_steps=1, total_steps=10)
    assert finite_state(tx.init(params))  # overshoot's last_ratio was NaN at init
    _, state = run(tx, bad, params, loss=jnp.float32(jnp.nan))
    assert finite_state(state)
    tx = optim.adaptive_clip(warmup_steps=1)
    assert finite_state(tx.init(params))  # last_threshold was +inf at init
    _, state = run(tx, bad, params)
    assert finite_state(state) and not bool(state.last_finite)


# --- MultiSteps -------------------------------------------------------------------------


@pytest.mark.parametrize("nesting", ["guard_outside", "multisteps_outside"])
def test_multisteps_nesting_survives_a_nan_micro_batch(nesting):
    params = {"w": jnp.ones(3)}
    if nesting == "guard_outside":
        tx = optim.guard(optax.MultiSteps(optax.adam(0.1), every_k_schedule=2))
    else:
        tx = optax.MultiSteps(
            optim.guard(optax.adam(0.1)),
            every_k_schedule=2,
            should_skip_update_fn=optax.skip_not_finite,
        )
    seq = [{"w": jnp.full(3, jnp.nan)}] + [{"w": jnp.ones(3)}] * 6
    update = jax.jit(tx.update)
    state, p, moved = tx.init(params), params, []
    for g in seq:
        u, state = update(g, state, p)
        new = optax.apply_updates(p, u)
        moved.append(bool(np.any(np.asarray(new["w"]) != np.asarray(p["w"]))))
        p = new
    assert np.all(np.isfinite(np.asarray(p["w"])))
    assert sum(moved[1:]) == 3  # every second finite micro-batch steps
    assert not bool(optim.metrics(state)["halted"])


# --- construction-time errors ---------------------------------------------------------


def test_factory_instead_of_transformation_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"adam\(1e-3\) instead of adam"):
        optim.guard(optax.adam)
    with pytest.raises(TypeError, match="GradientTransformation"):
        optim.overshoot_control(optax.sgd)


@pytest.mark.parametrize(
    "build",
    [
        lambda: optim.guard(optax.sgd(1.0), axis_name=3),
        lambda: optim.clip_by_global_norm(1.0, axis_name=3),
        lambda: optim.adaptive_clip(axis_name=3),
        lambda: optim.overshoot_control(optax.sgd(1.0), axis_name=3),
        lambda: optim.stable_adamw(1e-3, warmup_steps=1, total_steps=10, axis_name=3),
    ],
)
def test_bad_axis_name_is_rejected_at_construction(build):
    with pytest.raises(TypeError, match="axis_name=3|got 3"):
        build()


def _sgd():
    return optax.sgd(1.0)


def _adamw(**kw):
    return optim.stable_adamw(**{"learning_rate": 1e-3, "warmup_steps": 1, "total_steps": 10, **kw})


# (factory, positional args, bad keyword settings)
BAD = [
    (optim.guard, (_sgd(),), {"spike_threshold": -1.0}),
    (optim.guard, (_sgd(),), {"spike_threshold": float("nan")}),
    (optim.guard, (_sgd(),), {"loss_spike_threshold": 0.0}),
    (optim.guard, (_sgd(),), {"stats_decay": 1.0}),
    (optim.guard, (_sgd(),), {"stats_decay": -0.5}),
    (optim.guard, (_sgd(),), {"lr_backoff": 1.5}),
    (optim.guard, (_sgd(),), {"min_lr_scale": 2.0}),
    (optim.guard, (_sgd(),), {"min_lr_scale": 0.0}),
    (optim.guard, (_sgd(),), {"max_consecutive_skips": 0}),
    (optim.guard, (_sgd(),), {"spike_warmup": 1}),
    (optim.guard, (_sgd(),), {"lr_recovery_steps": 0}),
    (optim.clip_by_global_norm, (), {"max_norm": -1.0}),
    (optim.adaptive_clip, (), {"z_threshold": -1.0}),
    (optim.adaptive_clip, (), {"decay": 1.0}),
    (optim.adaptive_clip, (), {"warmup_steps": 0}),
    (optim.overshoot_control, (_sgd(),), {"min_ratio": 0.0}),
    (optim.overshoot_control, (_sgd(),), {"noise_sigmas": 0.0}),
    (optim.overshoot_control, (_sgd(),), {"min_scale": 0.0}),
    (optim.overshoot_control, (_sgd(),), {"recovery_steps": 0}),
    (_adamw, (), {"learning_rate": -1e-3}),
    (_adamw, (), {"learning_rate": 0.0}),
    (_adamw, (), {"clip": 0.0}),
    (_adamw, (), {"clip": -1.0}),
    (_adamw, (), {"b1": 1.0}),
    (_adamw, (), {"b2": -0.1}),
    (_adamw, (), {"eps": 0.0}),
    (_adamw, (), {"weight_decay": -1.0}),
    (_adamw, (), {"end_lr_ratio": 2.0}),
    (_adamw, (), {"max_update_ratio": 0.0}),
    (_adamw, (), {"total_steps": 1}),
]


@pytest.mark.parametrize("factory,args,kwargs", BAD, ids=[str(b[2]) for b in BAD])
def test_every_error_proposes_a_value_that_is_accepted(factory, args, kwargs):
    with pytest.raises(ValueError) as err:
        factory(*args, **kwargs)
    message = str(err.value)
    proposals = re.findall(r"e\.g\. (\w+)=([-+\w.]+)", message)
    assert proposals, message
    for name, value in proposals:
        value = value.rstrip(".")
        fixed = {**kwargs, name: float(value) if "." in value or "e" in value else int(value)}
        factory(*args, **fixed)  # the proposed fix constructs


# --- docs against behaviour ----------------------------------------------------------


def test_metrics_diagnoses_a_checkpoint_restored_without_target(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = optax.chain(optim.guard(optax.adam(1e-3)))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "s", state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "s")
        with pytest.raises(ValueError, match="restored without a target"):
            optim.metrics(restored)
        # The fix the message proposes restores a state metrics() reads.
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tx.init(params))
        assert int(optim.metrics(ckpt.restore(tmp_path / "s", target))["steps"]) == 0
    with pytest.raises(ValueError, match="no GuardState found"):
        optim.metrics(optax.adam(1e-3).init(params))
