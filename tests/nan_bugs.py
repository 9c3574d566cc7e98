"""Real NaN bugs as users report them (jax, flax, optax, pytorch trackers), for both zoos.

Each :class:`NanBug` is a scalar loss of one array, written as in the report,
with the faulty line marked ``# bug``, and the input that breaks it: the plain
value or gradient is NaN or Inf there. ``tests/lint_zoo.py`` lints
``jax.grad(fn)`` at the input's shape and dtype (the faulty line must be
flagged, except where ``linted=False``: those misses are asserted);
``tests/test_harden_zoo.py`` requires ``harden(fn)`` to be finite in
value and gradient where ``fixable``. Every cause is in the code, not in the
data, and none is a learning-rate explosion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class NanBug:
    name: str
    fn: Callable
    x: np.ndarray
    source: str  # where the pattern is reported
    fixable: bool = True  # by grad(harden(fn)); the rest are asserted out of reach
    linted: bool = True  # lint(jax.grad(fn)) flags the line; the misses are asserted too


def squared_norm(x):
    return jnp.linalg.norm(x) ** 2  # bug


def pairwise_cosine_scores(x):
    def score(a, b):
        return jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))  # bug

    return jnp.sum(jax.vmap(score)(x[:2], x[2:]))


def semiring_logsumexp(x):
    paths = jnp.stack([jnp.full_like(x, -jnp.inf), -jnp.inf + x])  # log(0) paths
    return jnp.sum(jax.nn.logsumexp(paths, axis=0))  # bug


def fully_masked_softmax(x):
    mask = jnp.arange(x.shape[-1]) < 0  # a padding query: every key masked
    w = jax.nn.softmax(jnp.where(mask, x, -jnp.inf))  # bug
    return jnp.sum(w * x)


def rotation_geodesic(x):
    r = x.reshape(3, 3)
    return jnp.arccos((jnp.trace(r.T @ r) - 1.0) / 2.0)  # bug


def scan_running_std(x):
    def step(c, xt):
        z = (xt - jnp.mean(xt)) / jnp.std(xt)  # bug
        return c + jnp.sum(z * jnp.arange(xt.shape[0])), None

    return jax.lax.scan(step, 0.0, x)[0]


class WeightNormDense(nn.Module):
    """Weight normalization, direction initialised to zeros by mistake."""

    features: int = 3

    @nn.compact
    def __call__(self, x):
        v = self.param("v", nn.initializers.zeros, (x.shape[-1], self.features))
        g = self.param("g", nn.initializers.ones, (self.features,))
        return x @ (g[None] * v / jnp.linalg.norm(v, axis=0, keepdims=True))  # bug


_WN = WeightNormDense()
_WN_VARS = _WN.init(jax.random.key(0), jnp.ones((1, 4)))


def linen_weight_norm(x):
    return jnp.sum(_WN.apply(_WN_VARS, x))


class GaussianPolicy(nnx.Module):
    """A policy head whose std parameter was initialised with zeros."""

    def __init__(self, rngs: nnx.Rngs):
        self.mu = nnx.Linear(2, 2, rngs=rngs)
        self.std = nnx.Param(jnp.zeros(2))

    def log_prob(self, obs, a):
        z = (a - self.mu(obs)) / self.std
        return jnp.sum(-0.5 * z ** 2 - jnp.log(self.std))  # bug


_POLICY = GaussianPolicy(nnx.Rngs(0))


def nnx_policy_log_prob(x):
    return -_POLICY.log_prob(jnp.ones(2), x)


@jax.checkpoint
def _scale_norm_block(h):
    return 2.0 * h / jnp.linalg.norm(h, axis=-1, keepdims=True)  # bug


def remat_scale_norm(x):
    return jnp.sum(_scale_norm_block(x) * jnp.arange(x.shape[-1])[None])


def haversine_distance(x):
    def dist(p, q):
        dlat, dlon = (q - p)[0] / 2, (q - p)[1] / 2
        a = jnp.sin(dlat) ** 2 + jnp.cos(p[0]) * jnp.cos(q[0]) * jnp.sin(dlon) ** 2
        return 2 * jnp.arcsin(jnp.sqrt(a))  # bug

    return jnp.sum(jax.vmap(dist)(x[:2], x[2:]))


def focal_loss(x):
    p = jax.nn.sigmoid(x)
    return -jnp.sum((1 - p) ** 0.5 * jnp.log(p))  # bug


def kl_one_hot(x):
    p = jnp.array([0.0, 1.0, 0.0])
    q = jax.nn.softmax(x)
    return jnp.sum(p * jnp.log(p / q))  # bug


def wgan_gradient_penalty(w):
    """The penalty as a function of the critic's last layer, initialised to zeros."""
    inputs = jnp.array([[0.5, -1.0], [2.0, 1.0]])

    def critic(x):
        return jnp.sum(jnp.tanh(x @ w))

    g = jax.grad(critic)(inputs)
    return (jnp.linalg.norm(g) - 1.0) ** 2  # bug


@jax.custom_vjp
def _unit(x):
    return x / jnp.linalg.norm(x)


def _unit_fwd(x):
    n = jnp.linalg.norm(x)
    return x / n, (x, n)  # bug


def _unit_bwd(res, g):
    x, n = res
    return ((g - jnp.dot(g, x) * x / n ** 2) / n,)


_unit.defvjp(_unit_fwd, _unit_bwd)


def custom_vjp_normalize(x):
    return jnp.sum(_unit(x) * jnp.arange(x.shape[0]))


def poincare_distance(x):
    u, v = x[:2], x[2:]
    sq = jnp.sum((u - v) ** 2)
    den = (1 - jnp.sum(u ** 2)) * (1 - jnp.sum(v ** 2))
    return jnp.arccosh(1 + 2 * sq / den)  # bug


F = np.float32
BUGS = [
    NanBug("squared norm at zero", squared_norm, np.zeros(3, F), "jax#4177, jax#21723"),
    NanBug("vmapped cosine scores, a zero vector", pairwise_cosine_scores,
           np.array([[1, 2, 0], [0, 0, 0], [0, 0, 0], [1, 1, 1]], F), "shepherd-score#8"),
    NanBug("logsumexp of all -inf semiring paths", semiring_logsumexp, np.ones(2, F),
           "jax#6811", linted=False),
    NanBug("softmax of a fully masked row", fully_masked_softmax, np.ones(4, F),
           "tensorflow#11756", fixable=False),
    NanBug("rotation geodesic arccos at the identity", rotation_geodesic,
           np.eye(3, dtype=F).ravel(), "pose losses"),
    NanBug("scan with a per-step std, constant step", scan_running_std,
           np.full((3, 4), 2.0, F), "running normalisation", linted=False),
    NanBug("linen weight norm, zero-initialised direction", linen_weight_norm,
           np.ones((2, 4), F), "flax WeightNorm by hand"),
    NanBug("NNX policy log-prob, zero-initialised std", nnx_policy_log_prob,
           np.zeros(2, F), "RL policies"),
    NanBug("remat ScaleNorm on a zero padding row", remat_scale_norm,
           np.array([[1, 2, 3], [0, 0, 0]], F), "ScaleNorm without eps"),
    NanBug("vmapped haversine distance of equal points", haversine_distance,
           np.array([[0.1, 0.2], [0.3, 0.4], [0.1, 0.2], [0.5, 0.4]], F), "geo losses"),
    NanBug("focal loss with gamma 0.5, a saturated logit", focal_loss,
           np.array([20.0, 0.0], F), "focal loss NaN reports"),
    NanBug("KL divergence with a one-hot target", kl_one_hot, np.zeros(3, F),
           "hand-written KL"),
    NanBug("WGAN-GP gradient penalty, dead critic", wgan_gradient_penalty,
           np.zeros(2, F), "WGAN-GP NaN reports"),
    NanBug("custom_vjp normalize, a zero vector", custom_vjp_normalize, np.zeros(3, F),
           "custom_vjp rules", fixable=False),
    NanBug("Poincare distance of a point to itself", poincare_distance,
           np.array([0.1, 0.2, 0.1, 0.2], F), "hyperbolic embeddings", linted=False),
]
