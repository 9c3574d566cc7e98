"""dynamic_loss_scale folds its unscaling and overflow check into passes made anyway.

The overflow check's sums of squares of the scaled gradient are handed to a
guard, clip or overshoot_control inside (``clipping.unscaled_offer``): the
results must be those of the inner chain on the unscaled gradient (within
float32 rounding), and the compiled step must make no more passes over
parameter-sized buffers than the inner chain alone.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stablejax import optim

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.hlo_traffic import full_size_traffic  # noqa: E402

SHAPE = (128, 512)  # 64K elements: the "full-size" threshold
BIG = SHAPE[0] * SHAPE[1]
N_BIG = 3  # full-size leaves


def _params():
    return {f"l{i}": {"w": jnp.ones(SHAPE), "b": jnp.zeros(SHAPE[1:])} for i in range(N_BIG)}


def traffic(tx, with_loss: bool = False) -> dict:
    params = _params()
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)

    def step(p, s, g):
        extra = {"loss": jnp.float32(1.0)} if with_loss else {}
        u, s = tx.update(g, s, p, **extra)
        return optax.apply_updates(p, u), s

    jitted = jax.jit(step, donate_argnums=(0, 1))
    text = jitted.lower(params, tx.init(params), grads).compile().as_text()
    return full_size_traffic(text, BIG)


def _sj_chain():
    return optax.chain(optim.clip_by_global_norm(1.0), optax.adamw(1e-3))


def _guarded():
    return optim.guard(_sj_chain())


def _sa():
    return optim.stable_adamw(1e-3, warmup_steps=2, total_steps=100)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="counts XLA:CPU fusions")
@pytest.mark.parametrize(
    "name, make, with_loss",
    [
        ("guard(chain(clip, adamw))", _guarded, False),
        ("chain(stablejax clip, adamw)", _sj_chain, False),
        ("stable_adamw (loss=)", _sa, True),
        # optax's own clip sums the squares of the unscaled gradient itself:
        # that sum is answered with the check's (known_sums), so XLA need not
        # write the unscaled gradient for it.
        ("optax chain(clip, adamw)", lambda: optax.chain(
            optax.clip_by_global_norm(1.0), optax.adamw(1e-3)), False),
        ("optax clip_by_block_rms, adam", lambda: optax.chain(
            optax.clip_by_block_rms(1.0), optax.adam(1e-3)), False),
        ("guard(optax chain(clip, adamw))", lambda: optim.guard(optax.chain(
            optax.clip_by_global_norm(1.0), optax.adamw(1e-3))), False),
    ],
)
def test_no_extra_pass_when_inner_takes_the_sums(name, make, with_loss):
    inner = traffic(make(), with_loss)
    wrapped = traffic(optim.dynamic_loss_scale(make()), with_loss)
    assert wrapped["copies"] == 0, name
    assert wrapped["reads"] <= inner["reads"], (name, wrapped, inner)
    assert wrapped["writes"] <= inner["writes"], (name, wrapped, inner)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="counts XLA:CPU fusions")
def test_other_inner_chains_pay_a_bounded_price():
    # A reduction over the unscaled gradient that is not a sum of its squares
    # (optax.centralize's means over all but the last axis) makes XLA write it
    # once (and read it for that reduction and for the check).
    plain = optax.chain(optax.centralize(), optax.adamw(1e-3))
    inner, wrapped = traffic(plain), traffic(optim.dynamic_loss_scale(plain))
    assert wrapped["reads"] <= inner["reads"] + 2 * N_BIG, (wrapped, inner)
    assert wrapped["writes"] <= inner["writes"] + N_BIG, (wrapped, inner)
    # An inner chain that reduces over nothing: only the check's own read.
    inner = traffic(optax.adamw(1e-3))
    wrapped = traffic(optim.dynamic_loss_scale(optax.adamw(1e-3)))
    assert wrapped["reads"] <= inner["reads"] + N_BIG and wrapped["writes"] <= inner["writes"]


def _grads(scale, dtype):
    key = jax.random.key(3)
    tree = {}
    for i, shape in enumerate([(8, 16), (16,), (4, 4, 4)]):
        key, sub = jax.random.split(key)
        tree[f"g{i}"] = (3.0 * jax.random.normal(sub, shape)).astype(jnp.float32)
    # Large enough that clip(1.0) engages; the scaled gradient in `dtype`.
    return tree, jax.tree.map(lambda g: (g * scale).astype(dtype), tree)


@pytest.mark.parametrize(
    "name, make, with_loss",
    [
        ("guard(chain(clip, adamw))", _guarded, False),
        ("chain(stablejax clip, adamw)", _sj_chain, False),
        ("stable_adamw (loss=)", _sa, True),
        ("optax chain(clip, adamw)", lambda: optax.chain(
            optax.clip_by_global_norm(1.0), optax.adamw(1e-3)), False),
        ("optax clip_by_block_rms, adam", lambda: optax.chain(
            optax.clip_by_block_rms(1.0), optax.adam(1e-3)), False),
    ],
)
@pytest.mark.parametrize("scale", [2.0**10, 1000.0])
def test_results_are_the_inner_chain_on_the_unscaled_gradient(name, make, with_loss, scale):
    # Within float32 rounding, not bit for bit: two separately compiled steps
    # fuse (and so round) differently, the old code's included. A scale that
    # is not a power of two unscales with one rounding per entry.
    inner, wrapped = make(), optim.dynamic_loss_scale(make(), init_scale=scale)
    params = jax.tree.map(lambda g: jnp.ones_like(g, jnp.float32), _grads(1.0, jnp.float32)[0])
    s_in, s_w = inner.init(params), wrapped.init(params)
    for step in range(2):
        # float16 scaled gradients: the unscaled ones are exactly g16 / scale in float32.
        _, scaled = _grads(scale * (1 + step), jnp.float16)
        # (times 1/scale in float32, as the wrapper unscales: for 1000 that
        # differs from a division by one rounding.)
        inv = 1.0 / jnp.float32(scale)
        unscaled = jax.tree.map(lambda g, inv=inv: g.astype(jnp.float32) * inv, scaled)
        loss_in = {"loss": jnp.float32(2.0 - step)} if with_loss else {}
        loss_w = {"loss": jnp.float32((2.0 - step) * scale)} if with_loss else {}
        u_in, s_in = jax.jit(inner.update)(unscaled, s_in, params, **loss_in)
        u_w, s_w = jax.jit(wrapped.update)(scaled, s_w, params, **loss_w)
        for a, b in zip(jax.tree.leaves(u_in), jax.tree.leaves(u_w)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-12,
                                       err_msg=name)
        for a, b in zip(jax.tree.leaves(s_in), jax.tree.leaves(s_w.inner_state)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-12,
                                       err_msg=name)
        assert int(s_w.overflows) == 0
        params = optax.apply_updates(params, u_in)


def test_finite_gradients_whose_squares_overflow_are_not_an_overflow():
    # GradScaler skips on a NaN or Inf entry only; the sums of squares (and of
    # magnitudes) of these finite float32 entries overflow.
    g = jnp.array([3e38, -3e38, 1.0], jnp.float32)
    tx = optim.dynamic_loss_scale(optax.sgd(1e-30), init_scale=1.0)
    u, s = jax.jit(tx.update)(g, tx.init(jnp.zeros(3)))
    assert int(s.overflows) == 0 and float(s.scale) == 1.0 and int(s.good_steps) == 1
    assert np.all(np.isfinite(np.asarray(u))) and float(u[0]) < 0 < float(u[1])
    # And a clip inside sees the exact overflow path (norm taken after rescaling).
    tx = optim.dynamic_loss_scale(optim.clip_by_global_norm(1.0), init_scale=1.0)
    u, s = jax.jit(tx.update)(g, tx.init(jnp.zeros(3)))
    np.testing.assert_allclose(np.asarray(u), [2**-0.5, -(2**-0.5), 0.0], rtol=1e-6, atol=1e-30)
    assert int(s.overflows) == 0
    # An Inf entry is an overflow whatever the others.
    u, s = jax.jit(tx.update)(g.at[2].set(jnp.inf), s)
    assert int(s.overflows) == 1 and np.asarray(u).tolist() == [0.0, 0.0, 0.0]


def _sums_everywhere():
    """A transformation whose update depends on many reductions of the gradient,
    only some of them sums of its squares over every axis."""

    def update(u, state, params=None):
        def one(g):
            full = jnp.sum(jnp.square(g))  # answerable
            pow2 = jnp.sum(g**2 + jnp.zeros_like(g))  # answerable (optax.tree.norm's form)
            cube = jnp.sum(g**3)  # not a square
            # Not every axis (on a 1-D leaf, over the elements' negatives).
            part = jnp.sum(g * g, axis=0, keepdims=True) if g.ndim > 1 else jnp.sum(g * -g)
            other = jnp.sum(g * jnp.flip(g))  # not g times itself
            scale = (full + pow2 + jnp.abs(cube) + jnp.abs(other)) / (1.0 + jnp.sum(part))
            return g * scale + part
        return jax.tree.map(one, u), state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def test_only_sums_of_squares_over_every_axis_are_answered(monkeypatch):
    from stablejax._src.optim import known_sums

    answered = []
    original = known_sums.KnownSums.answer

    def spy(self, eqn):
        out = original(self, eqn)
        if out is not None:
            answered.append(eqn)
        return out

    monkeypatch.setattr(known_sums.KnownSums, "answer", spy)
    scale = 2.0**8
    inner, wrapped = _sums_everywhere(), optim.dynamic_loss_scale(_sums_everywhere(),
                                                                  init_scale=scale)
    grads, scaled = _grads(scale, jnp.float16)
    unscaled = jax.tree.map(lambda g: g.astype(jnp.float32) / scale, scaled)
    u_in, _ = jax.jit(inner.update)(unscaled, inner.init(grads))
    u_w, s_w = jax.jit(wrapped.update)(scaled, wrapped.init(grads))
    assert int(s_w.overflows) == 0
    for a, b in zip(jax.tree.leaves(u_in), jax.tree.leaves(u_w)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5)
    # Two answerable sums per leaf (full, pow2), three leaves, in each replay of
    # the inner chain; the rest bound as written.
    assert answered and len(answered) % 6 == 0, len(answered)
    assert {len(e.invars[0].aval.shape) for e in answered} == {1, 2, 3}
