"""Real NaN bugs and clean reference models: the suites ``lint`` is measured on.

Each buggy program is ``(name, build)`` where ``build()`` returns
``(fn, args, marker)``: the function to lint, example arguments and the text of
the faulty line (the line holds ``# bug``). Each clean model's ``build()``
returns ``(fn, args)``. ``tests/test_lint.py`` asserts the rates and
``bench/bench_lint.py`` times them. The file is the user's code (outside
``stablejax/``), so the lines lint reports are its lines. Every cause is in
the code, not in the data and not a learning-rate explosion.
"""

from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stablejax import nn as snn

sys.path.insert(0, os.path.dirname(__file__))
import harden_clean  # noqa: E402  (clean models shared with the harden zoo)
import nan_bugs  # noqa: E402  (bugs from the trackers, shared with the harden zoo)

F32 = jnp.float32


def _spec(*shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _params(model, *xs):
    return jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *xs)


# -- buggy programs ---------------------------------------------------------------


class _UnitNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8)(x)
        return h / jnp.linalg.norm(h, axis=-1, keepdims=True)  # bug


def bug_unit_norm():
    m = _UnitNorm()
    x = _spec(4, 6)
    return jax.grad(lambda p, x: m.apply(p, x).sum()), (_params(m, x), x), "bug"


class _StdPool(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(8)(x))
        return nn.Dense(3)(jnp.std(h, axis=1))  # bug


def bug_std_pool():
    m = _StdPool()
    x = _spec(2, 5, 4)
    return jax.grad(lambda p, x: m.apply(p, x).sum()), (_params(m, x), x), "bug"


def bug_sqrt_mae():
    def loss(w, x, y):
        pred = jnp.maximum(x @ w, 0.0)
        return jnp.mean(jnp.sqrt((pred - y) ** 2))  # bug

    return jax.grad(loss), (_spec(3), _spec(8, 3), _spec(8)), "bug"


def bug_where_log():
    def loss(w, x):
        z = x @ w
        return jnp.where(z > 0, jnp.log(z), 0.0).sum()  # bug

    return jax.grad(loss), (_spec(3), _spec(8, 3)), "bug"


def bug_masked_mean():
    def loss(w, x, lengths):
        mask = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
        err = (x @ w) ** 2
        return jnp.sum(err * mask) / jnp.sum(mask)  # bug

    return loss, (_spec(4), _spec(2, 6, 4), _spec(2, dtype=jnp.int32)), "bug"


def bug_naive_softmax():
    def attend(q, k, v):
        s = q @ k.T
        w = jnp.exp(s) / jnp.sum(jnp.exp(s), axis=-1, keepdims=True)  # bug
        return (w @ v).sum()

    return jax.grad(attend), (_spec(4, 8), _spec(4, 8), _spec(4, 8)), "bug"


def bug_log_softmax_xent():
    def loss(logits, labels):
        p = jax.nn.softmax(logits)
        return -jnp.mean(jnp.log(p[jnp.arange(4), labels]))  # bug

    return loss, (_spec(4, 10), _spec(4, dtype=jnp.int32)), "bug"


def bug_log_sigmoid_bce():
    def loss(logits, y):
        p = jax.nn.sigmoid(logits)
        return -jnp.mean(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))  # bug

    return loss, (_spec(16), _spec(16)), "bug"


class _Energy(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, dtype=jnp.float16)(x.astype(jnp.float16))
        e = jnp.mean(h * h, axis=-1)  # bug
        return jnp.log1p(e.astype(F32))


def bug_fp16_square():
    m = _Energy()
    x = _spec(4, 8)
    return (lambda p, x: m.apply(p, x).sum()), (_params(m, x), x), "bug"


def bug_acos_angle():
    def loss(a, b):
        cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
                                    + 1e-8)
        return jnp.mean(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))  # bug

    return jax.grad(loss), (_spec(4, 3), _spec(4, 3)), "bug"


def bug_pow_half():
    def loss(w, x):
        return jnp.sum(jax.nn.relu(x @ w) ** 0.5)  # bug

    return jax.grad(loss), (_spec(3), _spec(8, 3)), "bug"


def bug_layernorm_no_eps():
    def layer(x):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return ((x - mu) * jax.lax.rsqrt(var)).sum()  # bug

    return layer, (_spec(4, 8),), "bug"


def bug_cholesky():
    def gp_nll(x, y):
        k = x @ x.T
        chol = jnp.linalg.cholesky(k)  # bug
        return jnp.sum(jax.scipy.linalg.solve_triangular(chol, y, lower=True) ** 2)

    return gp_nll, (_spec(6, 2), _spec(6)), "bug"


def bug_log_variance():
    def nll(w, x, y):
        var = x @ w  # a predicted variance with no positivity constraint
        return jnp.mean(jnp.log(var) + y**2 / var)  # bug

    return nll, (_spec(3), _spec(8, 3), _spec(8)), "bug"


def bug_atan2_heading():
    def loss(v):
        return jnp.sum(jnp.arctan2(v[:, 1], v[:, 0]))  # bug

    return jax.grad(loss), (_spec(8, 2),), "bug"


def bug_scan_rnn_norm():
    def run(w, xs):
        def step(h, x):
            h = jnp.tanh(h @ w + x)
            return h / jnp.linalg.norm(h), h.sum()  # bug

        h, ys = jax.lax.scan(step, jnp.zeros(4), xs)
        return ys.sum()

    return jax.grad(run), (_spec(4, 4), _spec(5, 4)), "bug"


class _NNXNorm(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(4, 6, rngs=rngs)

    def __call__(self, x):
        h = self.proj(x)
        return h / jnp.sqrt(jnp.sum(h * h, axis=-1, keepdims=True))  # bug


def bug_nnx_norm():
    model = _NNXNorm(nnx.Rngs(0))
    x = jnp.ones((3, 4))
    return (lambda m, x: m(x).sum()), (model, x), "bug"


def bug_vmap_std():
    def per_example(x):
        return jnp.std(x)  # bug

    return jax.grad(lambda x: jax.vmap(per_example)(x).sum()), (_spec(4, 6),), "bug"


def bug_remat_rms():
    @jax.checkpoint
    def block(x):
        return x / jnp.sqrt(jnp.mean(x**2, axis=-1, keepdims=True))  # bug

    return jax.grad(lambda x: block(x).sum()), (_spec(4, 6),), "bug"


def bug_while_power_iteration():
    def top_eig(a):
        def body(c):
            i, v = c
            v = a @ v
            return i + 1, v / jnp.linalg.norm(v)  # bug

        _, v = jax.lax.while_loop(lambda c: c[0] < 10, body, (0, jnp.ones(a.shape[0])))
        return v @ a @ v

    return top_eig, (_spec(4, 4),), "bug"


BUGS = {
    f.__name__[4:]: f
    for f in (
        bug_unit_norm, bug_std_pool, bug_sqrt_mae, bug_where_log, bug_masked_mean,
        bug_naive_softmax, bug_log_softmax_xent, bug_log_sigmoid_bce, bug_fp16_square,
        bug_acos_angle, bug_pow_half, bug_layernorm_no_eps, bug_cholesky, bug_log_variance,
        bug_atan2_heading, bug_scan_rnn_norm, bug_nnx_norm, bug_vmap_std, bug_remat_rms,
        bug_while_power_iteration,
    )
}


# -- clean reference models --------------------------------------------------------


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for w in (32, 32):
            x = nn.gelu(nn.Dense(w)(x))
        return nn.Dense(10)(x)


def _xent_step(model, x, labels, **apply_kw):
    def loss(p, x, y):
        logits = model.apply(p, x, **apply_kw)
        if isinstance(logits, tuple):
            logits = logits[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.jit(jax.value_and_grad(loss))


def clean_mlp():
    m = _MLP()
    x, y = _spec(8, 16), _spec(8, dtype=jnp.int32)
    return _xent_step(m, x, y), (_params(m, x), x, y)


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def clean_cnn_batchnorm():
    m = _CNN()
    x, y = _spec(4, 8, 8, 3), _spec(4, dtype=jnp.int32)
    v = _params(m, x)

    def loss(v, x, y):
        logits, _ = m.apply(v, x, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.jit(jax.grad(loss)), (v, x, y)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(4 * x.shape[-1])(h)))


class _LM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        pos = self.param("pos", nn.initializers.normal(0.02), (8, 16))
        x = nn.Embed(50, 16)(tokens) + pos[None, : tokens.shape[-1]]
        mask = nn.make_causal_mask(tokens)
        for _ in range(2):
            x = _Block()(x, mask)
        return nn.Dense(50)(nn.LayerNorm()(x))


def clean_transformer_lm():
    m = _LM()
    tokens = _spec(2, 8, dtype=jnp.int32)
    p = _params(m, tokens)

    def loss(p, t):
        logits = m.apply(p, t[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss)), (p, tokens)


class _VAE(nn.Module):
    @nn.compact
    def __call__(self, x, key):
        h = nn.relu(nn.Dense(32)(x))
        mu, logvar = nn.Dense(4)(h), nn.Dense(4)(h)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)
        logits = nn.Dense(x.shape[-1])(nn.relu(nn.Dense(32)(z)))
        return logits, mu, logvar


def clean_vae():
    m = _VAE()
    x = _spec(8, 16)
    key = jax.random.key(0)
    p = jax.eval_shape(lambda x: m.init(jax.random.key(1), x, key), x)

    def loss(p, x):
        logits, mu, logvar = m.apply(p, x, jax.random.key(2))
        rec = optax.sigmoid_binary_cross_entropy(logits, x).sum(-1)
        kl = -0.5 * jnp.sum(1 + logvar - mu**2 - jnp.exp(logvar), -1)
        return jnp.mean(rec + kl)

    return jax.jit(jax.grad(loss)), (p, x)


class _GRU(nn.Module):
    @nn.compact
    def __call__(self, xs):
        h = nn.RNN(nn.GRUCell(16))(xs)
        return nn.Dense(5)(h[:, -1])


def clean_gru():
    m = _GRU()
    x, y = _spec(2, 6, 4), _spec(2, dtype=jnp.int32)
    return _xent_step(m, x, y), (_params(m, x), x, y)


class _Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16)(nn.relu(nn.Dense(32)(x)))
        return snn.L2Normalize()(h)


def clean_contrastive():
    m = _Encoder()
    a, b = _spec(8, 12), _spec(8, 12)
    p = _params(m, a)

    def info_nce(p, a, b):
        za, zb = m.apply(p, a), m.apply(p, b)
        logits = za @ zb.T / 0.1
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(8)).mean()

    return jax.jit(jax.grad(info_nce)), (p, a, b)


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.l2 = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.norm(self.l1(x)))))


def clean_nnx_mlp():
    model = _NNXNet(nnx.Rngs(0))
    x, y = jnp.ones((4, 8)), jnp.zeros((4,), jnp.int32)

    @nnx.jit
    def step(model, x, y):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        return nnx.grad(loss)(model)

    return step, (model, x, y)


def clean_regression_optax_step():
    m = _MLP()
    x, y = _spec(8, 16), _spec(8, 10)
    p = _params(m, x)
    tx = optax.adamw(1e-3)
    state = jax.eval_shape(tx.init, p)

    def step(p, s, x, y):
        loss, g = jax.value_and_grad(lambda p: optax.l2_loss(m.apply(p, x), y).mean())(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    return jax.jit(step), (p, state, x, y)


def _tracker_bug(bug):
    return lambda: (jax.grad(bug.fn), (_spec(*bug.x.shape),), "bug")


# Bugs from the trackers whose faulty line lint flags under jax.grad (the rest,
# with ``linted=False``, are asserted missed in tests/test_lint.py).
BUGS.update({f"tracker: {b.name}": _tracker_bug(b) for b in nan_bugs.BUGS})


def _shared_clean(name):
    def build():  # traced abstractly: lint reads shapes only, and eager inits are slow
        box = {}

        def make():
            box["loss"], args = harden_clean.CLEAN[name](False)
            return args

        args = jax.eval_shape(make)
        return jax.grad(box["loss"]), args

    return build


CLEAN = {
    f.__name__[6:]: f
    for f in (
        clean_mlp, clean_cnn_batchnorm, clean_transformer_lm, clean_vae, clean_gru,
        clean_contrastive, clean_nnx_mlp, clean_regression_optax_step,
    )
}
# Safe by construction, shared with the harden zoo: BatchNorm at its running
# statistics, GroupNorm, a ResNet block, flax's layers at their defaults, a
# hand-written RMSNorm with eps, attention masked with jnp.where(mask, s, -1e9),
# log(p + eps) losses and a Gaussian NLL with a softplus variance.
CLEAN.update({f"shared: {n}": _shared_clean(n) for n in (
    "cnn", "cnn_groupnorm", "resnet_block", "flax_defaults", "rmsnorm_by_hand",
    "masked_attention", "log_prob_eps", "gaussian_nll")})


def cli_std_pool():
    """``stablejax lint tests/lint_zoo.py:cli_std_pool``: the convention, ``(fn, args)``."""
    fn, args, _ = bug_std_pool()
    return fn, args
