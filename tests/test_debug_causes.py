"""The cause of real NaN/Inf bugs: one program per category and per known miss.

Each bug is asserted on ``locate`` (primitive, phase, category) and, for the
jitted ones, ``nan_trap`` must say the same. The programs are tiny: the whole
file costs a few seconds.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from stablejax.debug import locate, nan_trap

# ---------------------------------------------------------------- the bugs


def loss(w, x):
    """A whole model in a function named ``loss``: the sqrt is the model's, not the loss's."""
    h = jnp.sqrt(x @ w)  # zero pre-activations: d sqrt / dx = inf
    return jnp.sum(h)


def mae_loss(pred, y):
    return jnp.mean(jnp.sqrt((pred - y) ** 2))


def gaussian_nll_loss(params, x):
    """The variance parameter went negative (a bad update): log leaves its domain."""
    var = params["var"]
    return jnp.mean(x**2 / var[None] + jnp.log(var)[None])


def bce_loss(logits, y):
    p = jax.nn.sigmoid(logits)
    return -jnp.mean(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))


def per_example_loss(w, x):
    """The log of a linear model's output: the log is the model's, not a loss construct."""
    per_example = jnp.log(x @ w)  # x @ w is 0 for the second example
    return jnp.mean(per_example)


def f16_adam_step(params, grads):
    """float16 parameters and Adam state: eps=1e-8 rounds to 0 in float16, 0/0 where g = 0."""
    opt = optax.adam(1e-3, eps=1e-8)
    updates, _ = opt.update(grads, opt.init(params), params)
    return optax.apply_updates(params, updates)


class Pool(nn.Module):
    @nn.compact
    def __call__(self, h):
        return jnp.std(h, axis=1)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Pool()(nn.Dense(3)(x)).sum()


class Normalize(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Normalize()(nn.Dense(2)(x))


def xent(params, model, x, labels):
    probs = jax.nn.softmax(model.apply(params, x) * 1e4)
    return -jnp.mean(jnp.log(probs[jnp.arange(x.shape[0]), labels]))


def f16_energy(x):
    return jnp.sum(jnp.exp(x))


def batch_loss(w, batch):
    return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)


def deep_product(w, x):
    return jnp.sum((x * w) * w)


_NET = Net()
_NET_P = _NET.init(jax.random.key(0), jnp.ones((2, 5, 4)))
_CLS = Classifier()
_CLS_P = _CLS.init(jax.random.key(1), jnp.ones((2, 3)))
_GROWING = [{"loss": 1.0, "grad_norm": g} for g in (1.0, 1.2, 0.9, 1.1, 8.0, 60.0, 900.0)]

# name: (function, args, expected (primitive, phase, category), history)
ZOO = {
    "derivative_in_fn_named_loss": (
        jax.grad(loss),
        (jnp.array([1.0, -1.0]), jnp.array([[1.0, 1.0], [2.0, 1.0]])),
        ("div", "backward", "derivative_singularity"),
        None,
    ),
    "mae_in_loss": (
        jax.grad(mae_loss),
        (jnp.array([1.0, 2.0]), jnp.array([1.0, 0.0])),
        ("div", "backward", "loss_nan"),
        None,
    ),
    "log_of_parameter_out_of_domain": (
        gaussian_nll_loss,
        ({"var": jnp.array([0.5, -0.1])}, jnp.ones((3, 2))),
        ("log", "forward", "forward_singularity"),
        None,
    ),
    "log_of_activation_in_loss": (
        per_example_loss,
        (jnp.array([1.0, -1.0]), jnp.array([[2.0, 1.0], [1.0, 1.0]])),
        ("log", "forward", "forward_singularity"),
        None,
    ),
    "bf16_one_minus_sigmoid": (
        bce_loss,
        (jnp.array([8.0, -1.0], jnp.bfloat16), jnp.array([0.0, 0.0], jnp.bfloat16)),
        ("log", "forward", "overflow_low_precision"),
        None,
    ),
    "f32_sigmoid_saturated": (
        bce_loss,
        (jnp.array([-200.0, 3.0]), jnp.array([1.0, 0.0])),
        ("log", "forward", "loss_nan"),
        None,
    ),
    "f16_adam_eps_underflow": (
        f16_adam_step,
        (jnp.ones(3, jnp.float16), jnp.array([0.5, 0.0, 0.25], jnp.float16)),
        ("div", "update", "overflow_low_precision"),
        None,
    ),
    "std_pool_in_module": (
        jax.grad(lambda p, x: _NET.apply(p, x)),
        (_NET_P, jnp.ones((2, 5, 4))),
        ("div", "backward", "derivative_singularity"),
        None,
    ),
    "zero_norm_in_module": (
        lambda p, x: _CLS.apply(p, x).sum(),
        (jax.tree.map(jnp.zeros_like, _CLS_P), jnp.ones((2, 3))),
        ("div", "forward", "forward_singularity"),
        None,
    ),
    "xent_after_model": (
        lambda p, x, y: xent(p, _CLS, x, y),
        (_CLS_P, jnp.array([[1.0, 2.0, 3.0], [3.0, -1.0, 0.5]]), jnp.array([0, 1])),
        ("log", "forward", "loss_nan"),
        None,
    ),
    "f16_exp_overflow": (
        f16_energy,
        (jnp.array([1.0, 12.0], jnp.float16),),
        ("exp", "forward", "overflow_low_precision"),
        None,
    ),
    "nan_in_batch": (
        batch_loss,
        (jnp.ones(2), {"x": jnp.array([[1.0, jnp.nan], [1.0, 2.0]]), "y": jnp.zeros(2)}),
        (None, "forward", "bad_input"),
        None,
    ),
    "growing_gradients": (
        deep_product,
        (jnp.full(3, 1e20), jnp.ones(3)),
        ("mul", "forward", "grad_explosion"),
        _GROWING,
    ),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_locate_names_the_cause(name):
    fn, args, want, history = ZOO[name]
    r = locate(jax.jit(fn), history=history)(*args)
    assert r is not None, name
    assert (r.primitive, r.phase, r.category) == want, str(r)


@pytest.mark.parametrize(
    "name",
    ["derivative_in_fn_named_loss", "bf16_one_minus_sigmoid", "std_pool_in_module"],
)
def test_nan_trap_agrees_with_locate(name):
    fn, args, want, history = ZOO[name]
    step = jax.jit(fn)
    step(*args)  # compiled before the block, on jax's fast call path
    with pytest.raises(FloatingPointError) as info:
        with nan_trap(history=history):
            step(*args)
    r, ref = info.value.report, locate(step, history=history)(*args)
    got = (r.primitive, r.phase, r.module, r.category, r.source)
    assert got == (ref.primitive, ref.phase, ref.module, ref.category, ref.source)
    assert (r.primitive, r.phase, r.category) == want


def test_grad_explosion_fix_names_the_inf_safe_clip():
    fn, args, _, history = ZOO["growing_gradients"]
    r = locate(fn, history=history)(*args)
    assert "stablejax.optim.clip_by_global_norm(1.2)" in r.suggestion
    assert "optax.clip_by_global_norm" not in r.suggestion


def test_precision_fixes_name_float32_and_log_sigmoid():
    fn, args, _, _ = ZOO["bf16_one_minus_sigmoid"]
    assert "log_sigmoid" in locate(fn)(*args).suggestion
    fn, args, _, _ = ZOO["f16_adam_eps_underflow"]
    assert "float32" in locate(fn)(*args).suggestion
