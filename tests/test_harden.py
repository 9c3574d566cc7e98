"""harden under the transformations, on linen, NNX and a train step, and on bad input."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stablejax import harden


def _norm_loss(x):
    return jnp.sum(x / jnp.linalg.norm(x, axis=-1, keepdims=True)) + jnp.sum(jnp.std(x, -1))


X = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])


def test_values_exact_off_the_singular_set():
    x = jnp.array([[3.0, 4.0, 0.5], [1.0, 2.0, 2.0]])
    np.testing.assert_array_equal(harden(_norm_loss)(x), _norm_loss(x))
    np.testing.assert_array_equal(jax.grad(harden(_norm_loss))(x), jax.grad(_norm_loss)(x))


@pytest.mark.parametrize("how", ["grad_of_harden", "harden_of_grad", "jit", "vmap", "jit_vmap"])
def test_transformations(how):
    g = {
        "grad_of_harden": lambda: jax.grad(harden(_norm_loss))(X),
        "harden_of_grad": lambda: harden(jax.grad(_norm_loss))(X),
        "jit": lambda: jax.jit(jax.grad(harden(_norm_loss)))(X),
        "vmap": lambda: jax.vmap(jax.grad(harden(_norm_loss)))(X[:, None]),
        "jit_vmap": lambda: jax.jit(jax.vmap(harden(jax.grad(_norm_loss))))(X[:, None]),
    }[how]()
    g = np.asarray(g).reshape(X.shape)
    assert np.array_equal(g[0], np.zeros(3))  # the zero row: safe_normalize's and safe_std's 0
    np.testing.assert_allclose(g[1], np.asarray(jax.grad(_norm_loss)(X[1:]))[0], rtol=1e-6)
    assert not np.isfinite(np.asarray(jax.grad(_norm_loss)(X))).all()


def test_second_order_finite():
    h = jax.hessian(harden(lambda x: jnp.linalg.norm(x) + jnp.sum(jnp.sqrt(x * x))))(jnp.zeros(2))
    assert np.array_equal(np.asarray(h), np.zeros((2, 2)))


def test_control_flow_kept_and_rewritten():
    def loop(x):
        def body(c, xt):
            return c + jnp.sqrt(xt), jnp.log(xt)

        c, ys = jax.lax.scan(body, 0.0, x)
        c = jax.lax.fori_loop(0, 2, lambda i, c: c + jnp.sqrt(x[0]), c)
        c = jax.lax.cond(c > 100, lambda c: c, lambda c: c / x[0], c)
        return c + jnp.sum(jax.checkpoint(lambda y: jnp.sqrt(y))(ys * 0.0))

    x = jnp.array([0.0, 4.0])
    jaxpr = jax.make_jaxpr(harden(loop))(x)
    prims = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert {"scan", "cond"} <= prims  # structure kept, nothing unrolled
    assert not np.isfinite(jax.grad(loop)(x)).all()
    g = jax.jit(jax.grad(harden(loop)))(x)
    assert np.isfinite(g).all() and np.isfinite(harden(loop)(x))
    np.testing.assert_allclose(g, harden(jax.grad(loop))(x), rtol=1e-6)


def test_while_loop_rewritten():
    def loop(x):
        return jax.lax.while_loop(lambda c: c < 50, lambda c: c + 10 + 0 * jnp.log(x), 0.0)

    jaxpr = jax.make_jaxpr(harden(loop))(0.0)
    assert "while" in {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert np.isnan(jax.jit(loop)(0.0))  # 0 * log(0) is NaN, which ends the loop
    assert float(jax.jit(harden(loop))(0.0)) == 50.0  # 0 * log(tiny) is 0: five steps


def test_pytrees_and_statics_kept():
    def fn(tree, scale, *, mode="sum"):
        out = {"n": jnp.linalg.norm(tree["a"]) * scale, "parts": (tree["b"] / tree["b"], mode)}
        return out if mode == "sum" else None

    tree = {"a": jnp.zeros(2), "b": jnp.array([0.0, 2.0])}
    out = harden(fn)(tree, 2.0, mode="sum")
    ref = fn(tree, 2.0, mode="sum")
    assert jax.tree.structure(out) == jax.tree.structure(ref)
    np.testing.assert_array_equal(out["parts"][0], [0.0, 1.0])
    assert out["parts"][1] == "sum"


class Head(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(3)(x)
        return h / jnp.linalg.norm(h, axis=-1, keepdims=True)  # the library's bug


def test_linen_apply_and_train_step():
    model = Head()
    x = jnp.zeros((2, 4))
    params = model.init(jax.random.key(0), x)
    params = jax.tree.map(jnp.zeros_like, params)  # a zero output row
    opt = optax.sgd(0.1)

    def step(params, opt_state, x):
        loss, g = jax.value_and_grad(lambda p: jnp.sum(model.apply(p, x)))(params)
        updates, opt_state = opt.update(g, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    state = opt.init(params)
    bad = jax.jit(step)(params, state, x)
    assert not all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(bad[0]))
    new, new_state, loss = jax.jit(harden(step))(params, state, x)
    assert jax.tree.structure(new) == jax.tree.structure(params)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(new))
    apply = harden(model.apply)
    np.testing.assert_array_equal(apply(params, x), np.zeros((2, 3)))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)

    def __call__(self, x):
        h = self.bn(self.dense(x))
        return jnp.sum(jnp.sqrt(jnp.sum(h * h, -1)))


def test_nnx_module_state_and_grad():
    x = jnp.ones((4, 3))  # a constant batch: BatchNorm's output rows are all 0
    plain, hard = NNXNet(nnx.Rngs(0)), NNXNet(nnx.Rngs(0))
    plain(x)
    out = harden(hard)(x)
    np.testing.assert_array_equal(hard.bn.mean[...], plain.bn.mean[...])  # stats updated
    assert np.isfinite(out)

    def loss(m, x):
        return m(x)

    g_plain = nnx.grad(loss)(NNXNet(nnx.Rngs(0)), x)
    g = nnx.grad(harden(loss))(NNXNet(nnx.Rngs(0)), x)
    assert not all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(g_plain))
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(g))


@pytest.mark.parametrize("bad", [3.0, None, "loss"])
def test_not_callable_is_a_clear_error(bad):
    with pytest.raises(TypeError, match="harden expects a function"):
        harden(bad)
    assert callable(harden(lambda x: x))  # the fix named in the message is accepted


class DropNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def test_linen_mutable_batch_stats_and_dropout_rngs():
    model, x = DropNet(), jnp.zeros((3, 2))  # zero rows after BatchNorm: x / 0
    variables = model.init(jax.random.key(0), x, False)

    def fwd(v, x, key):
        return model.apply(v, x, True, mutable=["batch_stats"], rngs={"dropout": key})

    (out_p, upd_p), (out_h, upd_h) = fwd(variables, x, jax.random.key(1)), harden(fwd)(
        variables, x, jax.random.key(1))
    assert np.isnan(out_p).all()
    np.testing.assert_array_equal(out_h, np.zeros((3, 4)))
    assert jax.tree.structure(upd_h) == jax.tree.structure(upd_p)
    jax.tree.map(np.testing.assert_array_equal, upd_h, upd_p)


def test_name_stacks_kept():
    """A scope around the call and inside fn stay on the rewritten equations (for locate)."""
    def f(x):
        with jax.named_scope("inner"):
            return jnp.sqrt(x) * 2

    def stacks(g):
        def outer(x):
            with jax.named_scope("outer"):
                return g(x)

        return {str(e.source_info.name_stack) for e in jax.make_jaxpr(outer)(1.0).jaxpr.eqns}

    assert stacks(f) == {"outer/inner"}
    assert stacks(harden(f)) == {"outer/inner"}


def test_pow_follows_safe_pow():
    """x ** y: 0 with gradient 0 at x = 0 for y < 1; |x| ** y for a negative base."""
    f = harden(lambda x: jnp.sum(x ** 0.5))
    assert float(f(jnp.array([-4.0]))) == 2.0  # safe_pow(-4.0, 0.5)
    g = jax.grad(f)(jnp.array([0.0, -4.0, 4.0]))
    np.testing.assert_allclose(g, [0.0, -0.25, 0.25])
    assert np.isnan(jnp.array(-4.0) ** 0.5)


def test_rewritten_program_cached_by_signature():
    """Eager calls trace and rewrite ``fn`` once per argument signature, then reuse it."""
    traces = []

    def fn(x, scale, *, mode="sum"):
        traces.append(mode)
        y = jnp.sqrt(x) * scale
        return jnp.sum(y) if mode == "sum" else jnp.max(y)

    h = harden(fn)
    x = jnp.array([0.0, 4.0])
    assert float(h(x, 2.0)) == 4.0
    want = float(jnp.sum(jnp.sqrt(x + 1.0)) * 2.0)
    assert float(h(x + 1.0, 2.0)) == want  # same avals and statics: reused, not stale
    assert len(traces) == 1 and len(h._cache) == 1
    h(jnp.ones(3), 2.0)  # a new shape
    h(x, 3.0)  # a new static scale
    assert float(h(x, 2.0, mode="max")) == 4.0  # a new static keyword
    h(np.float32(1.0), 2.0)  # a numpy scalar is traced, its aval a new key
    assert len(traces) == 5 and len(h._cache) == 5
    h(x, 2.0, mode="max")
    jax.grad(h)(x + 1.0, 2.0)  # under grad the tracers' avals match: reused
    assert len(traces) == 5
    # A closure over a tracer of the caller's trace is rewritten per call, never cached.
    g = harden(lambda x, s=None: jnp.sum(jnp.sqrt(x) * s))
    assert float(jax.jit(lambda s: g(x, s))(2.0)) == 4.0  # s is an argument: a tracer leaf
    closure = jax.jit(lambda s: harden(lambda x: jnp.sum(jnp.sqrt(x) * s))(x))
    assert float(closure(2.0)) == 4.0 and float(closure(3.0)) == 6.0
    np.testing.assert_array_equal(jax.grad(h)(x, 2.0), jax.grad(harden(fn))(x, 2.0))
