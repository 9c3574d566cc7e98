"""Clean reference models for ``harden`` (unchanged outputs, cost) and ``lint`` (no alarm).

Each entry of :data:`CLEAN` is ``build(big) -> (loss, args)``: a scalar loss of
``args`` written as users write it (flax layers, hand-written normalisations
with an ``eps``, masked attention, optax losses). ``big=False`` gives the test
size (tests/test_harden_zoo.py, tests/lint_zoo.py), ``big=True`` a size at which
one jitted gradient takes milliseconds (bench/bench_harden.py). None of them
can produce a NaN at these inputs; several hold a ``div``, ``sqrt`` or ``log``
that is not provably safe, so harden's rules are in the program and must
change nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def _uniform(seed, shape):
    return jax.random.uniform(jax.random.key(seed), shape)


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


def _linen(model: nn.Module, small: tuple, large: tuple) -> Callable:
    """A linen model under ``mean(out**2) + mean(logsumexp(out))``."""

    def build(big: bool):
        x = _uniform(1, large if big else small)
        params = model.init(jax.random.key(0), x)

        def loss(p, x):
            out = model.apply(p, x)
            return jnp.mean(out ** 2) + jnp.mean(jax.nn.logsumexp(out, -1))

        return loss, (params, x)

    return build


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(16)(x))
        return nn.Dense(3)(nn.LayerNorm()(x))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(h, h)
        h = nn.RMSNorm()(x)
        return x + nn.Dense(8)(nn.gelu(nn.Dense(16)(h)))


class GRU(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.RNN(nn.GRUCell(8))(x)[:, -1]


class VAE(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(16)(x))
        mu, logvar = nn.Dense(4)(h), nn.Dense(4)(h)
        z = mu + jnp.exp(0.5 * logvar) * 0.3
        logits = nn.Dense(x.shape[-1])(nn.tanh(nn.Dense(16)(z)))
        rec = jnp.sum(jax.nn.softplus(logits) - x * logits)
        kl = -0.5 * jnp.sum(1 + logvar - mu ** 2 - jnp.exp(logvar))
        return (rec + kl)[None] / x.shape[0]


class Contrastive(nn.Module):
    """A SimCLR-style head: ``z / ||z||`` (its divisor is not provably non-zero)."""

    @nn.compact
    def __call__(self, x):
        z = nn.Dense(8)(x)
        z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
        return z @ z.T / 0.1


class GroupNormCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(num_groups=2)(nn.Conv(8, (3, 3))(x)))
        x = nn.relu(nn.GroupNorm(num_groups=4)(x))
        return nn.Dense(4)(x.mean(axis=(1, 2)))


class ResNetBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3))(x)))
        h = nn.BatchNorm(use_running_average=True, scale_init=nn.initializers.zeros)(
            nn.Conv(8, (3, 3))(h))
        x = nn.relu(nn.Conv(8, (1, 1))(x) + h)
        return nn.Dense(4)(x.mean(axis=(1, 2)))


class FlaxDefaults(nn.Module):
    """Flax's own layers at their defaults."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16)(x)
        h = nn.LayerNorm()(h) + nn.RMSNorm()(h)
        h = nn.MultiHeadDotProductAttention(num_heads=4)(h[:, None], h[:, None])[:, 0]
        h = nn.Dropout(0.1, deterministic=True)(nn.gelu(h))
        h = nn.BatchNorm(use_running_average=True)(nn.GroupNorm(num_groups=4)(h))
        return nn.Dense(4)(nn.silu(h)) + nn.Embed(10, 4)(jnp.argmax(x, -1))


def cosine_loss(big: bool):
    n = 65536 if big else 8

    def loss(w, a, b):
        za, zb = a @ w, b @ w
        cos = jnp.sum(za * zb, -1) / (jnp.linalg.norm(za, axis=-1) * jnp.linalg.norm(zb, axis=-1))
        return jnp.mean(1.0 - cos)

    return loss, (_normal(0, (16, 16)), _normal(1, (n, 16)), _normal(2, (n, 16)))


def rmsnorm_by_hand(big: bool):
    n = 32768 if big else 8

    def loss(w, x):
        h = x @ w
        h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)
        h = h / jnp.sqrt(jnp.mean(h ** 2, -1, keepdims=True) + 1e-6)
        return jnp.mean(jnp.tanh(h) ** 2)

    return loss, (_normal(0, (32, 32)), _normal(1, (n, 32)))


def masked_attention(big: bool):
    b, t, d = (64, 64, 32) if big else (2, 5, 8)

    def loss(wq, x, lengths):
        q = x @ wq
        s = q @ jnp.swapaxes(x, -1, -2) / jnp.sqrt(jnp.float32(d))
        mask = jnp.arange(t)[None, None, :] < lengths[:, None, None]
        s = jnp.where(mask, s, -1e9)
        w = jnp.exp(s - jnp.max(s, -1, keepdims=True))
        w = w / jnp.sum(w, -1, keepdims=True)
        return jnp.mean((w @ x) ** 2)

    lengths = jnp.arange(b) % t + 1
    return loss, (_normal(0, (d, d)) / d, _normal(1, (b, t, d)), lengths)


def log_prob_eps(big: bool):
    n = 32768 if big else 8

    def loss(w, x, y):
        logits = x @ w
        p = jax.nn.softmax(logits)
        xent = -jnp.mean(jnp.sum(jax.nn.one_hot(y, 10) * jnp.log(p + 1e-8), -1))
        q = jax.nn.sigmoid(logits[:, 0])
        bce = -jnp.mean(jnp.log(q + 1e-7) + jnp.log(1 - q + 1e-7))
        return xent + bce

    return loss, (_normal(0, (16, 10)), _normal(1, (n, 16)), jnp.arange(n) % 10)


def std_whitening(big: bool):
    n = 32768 if big else 8

    def loss(w, x):
        h = x @ w
        h = (h - jnp.mean(h, 0, keepdims=True)) / (jnp.std(h, 0, keepdims=True) + 1e-5)
        h = (h - h.mean(-1, keepdims=True)) / (h.std(-1, keepdims=True) + 1e-5)
        return jnp.mean(jnp.sin(h))

    return loss, (_normal(0, (16, 16)), _normal(1, (n, 16)))


def optax_losses(big: bool):
    n = 32768 if big else 8

    def loss(w, x, y):
        out = x @ w
        labels = jax.nn.one_hot(y, 8)
        return (optax.softmax_cross_entropy(out, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
                + optax.sigmoid_binary_cross_entropy(out, labels).mean()
                + optax.l2_loss(out, labels).mean() + optax.huber_loss(out, labels).mean()
                + optax.cosine_distance(out, labels).mean()
                + optax.kl_divergence(jax.nn.log_softmax(out), labels * 0.9 + 0.0125).mean())

    return loss, (_normal(0, (16, 8)), _normal(1, (n, 16)), jnp.arange(n) % 8)


def gaussian_nll(big: bool):
    n = 262144 if big else 8

    def loss(w, x, y):
        out = x @ w
        mu, var = out[:, 0], jax.nn.softplus(out[:, 1]) + 1e-6
        return jnp.mean(0.5 * (jnp.log(var) + (y - mu) ** 2 / var))

    return loss, (_normal(0, (8, 2)), _normal(1, (n, 8)), _normal(2, (n,)))


def contrastive_hand_normalize(big: bool):
    """The bench's SimCLR head: hand-written ``z / ||z||`` and a logsumexp."""
    n = 1024 if big else 16

    def loss(p, x):
        z = x @ p
        z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
        return jnp.mean(jax.nn.logsumexp(z @ z.T / 0.1, -1))

    return loss, (_normal(3, (64, 64)), _normal(2, (n, 64)))


CLEAN: dict[str, Callable] = {
    "mlp": _linen(MLP(), (4, 6), (8192, 6)),
    "cnn": _linen(CNN(), (2, 8, 8, 1), (128, 16, 16, 1)),
    "transformer_block": _linen(Block(), (2, 5, 8), (32, 64, 8)),
    "gru": _linen(GRU(), (2, 5, 3), (128, 32, 3)),
    "vae": _linen(VAE(), (4, 6), (8192, 6)),
    "contrastive": _linen(Contrastive(), (8, 6), (1024, 6)),
    "contrastive_head": contrastive_hand_normalize,
    "cnn_groupnorm": _linen(GroupNormCNN(), (2, 8, 8, 3), (64, 16, 16, 3)),
    "resnet_block": _linen(ResNetBlock(), (2, 8, 8, 3), (64, 16, 16, 3)),
    "flax_defaults": _linen(FlaxDefaults(), (4, 10), (8192, 10)),
    "cosine_loss": cosine_loss,
    "rmsnorm_by_hand": rmsnorm_by_hand,
    "masked_attention": masked_attention,
    "log_prob_eps": log_prob_eps,
    "std_whitening": std_whitening,
    "optax_losses": optax_losses,
    "gaussian_nll": gaussian_nll,
}
