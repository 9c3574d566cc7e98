"""harden on a zoo of real singularity bugs, and on clean models it must not change.

Each bug is a program as it is written in the wild, at the input that breaks
it: the plain value or gradient is NaN or Inf. Hardened, the value and the
gradient must be finite and, where a stablejax op is the fix, equal that op's
documented value and gradient. Three bugs are out of reach by design (a
user's own ``custom_jvp`` rule, a primitive's own derivative, a factorisation);
they are kept in the zoo so that the fixed rate is measured, not assumed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stablejax
from stablejax import harden

sys.path.insert(0, os.path.dirname(__file__))
import nan_bugs  # noqa: E402  (bugs from the trackers, shared with the lint zoo)
from harden_clean import CLEAN  # noqa: E402  (the clean reference models)


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Bug:
    name: str
    fn: Callable  # scalar loss of one array
    x: np.ndarray
    reference: Callable | None = None  # the same loss written with stablejax's safe ops
    fixable: bool = True


def _cos(a, b):
    return jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


def _pairwise(x):
    d = x[:, None, :] - x[None, :, :]
    return jnp.sqrt(jnp.sum(d * d, axis=-1))


@jax.custom_jvp
def _user_sqrt(x):
    return jnp.sqrt(x)


@_user_sqrt.defjvp
def _user_sqrt_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return jnp.sqrt(x), dx / (2 * jnp.sqrt(x))  # the user's own rule: Inf at 0


def _gru_normalized(x):
    def cell(h, xt):
        h = jnp.tanh(h + xt)
        return h / jnp.linalg.norm(h), None

    return jnp.sum(jax.lax.scan(cell, jnp.zeros(x.shape[1]), x)[0])


def _gru_reference(x):
    def cell(h, xt):
        return stablejax.safe_normalize(jnp.tanh(h + xt)), None

    return jnp.sum(jax.lax.scan(cell, jnp.zeros(x.shape[1]), x)[0])


ZERO = np.zeros(4, np.float32)
ROWS = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
CONST = np.full((2, 4), 3.0, np.float32)
ONEHOT = np.array([0.0, 1.0, 0.0], np.float32)

ZOO = [
    Bug("norm of a zero vector", lambda x: jnp.linalg.norm(x), ZERO,
        lambda x: stablejax.safe_norm(x)),
    Bug("l2-normalized embeddings, a zero padding row",
        lambda x: jnp.sum(x / jnp.linalg.norm(x, axis=-1, keepdims=True) * jnp.arange(3.0)[None]),
        ROWS, lambda x: jnp.sum(stablejax.safe_normalize(x) * jnp.arange(3.0)[None])),
    Bug("cosine similarity with a zero embedding", lambda x: _cos(x[0], x[1]), ROWS,
        lambda x: stablejax.safe_div(jnp.dot(x[0], x[1]),
                                      stablejax.safe_norm(x[0]) * stablejax.safe_norm(x[1]))),
    Bug("jnp.std of a constant feature", lambda x: jnp.sum(jnp.std(x, axis=0)), CONST,
        lambda x: jnp.sum(stablejax.safe_std(x, axis=0))),
    Bug("standardization (x - mean) / std, constant row",
        lambda x: jnp.sum(((x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)) ** 2),
        CONST, lambda x: jnp.sum(stablejax.safe_div(x - x.mean(-1, keepdims=True),
                                                    stablejax.safe_std(x, -1, True)) ** 2)),
    Bug("layer norm without eps via sqrt(var)",
        lambda x: jnp.sum((x - x.mean(-1, keepdims=True))
                          / jnp.sqrt(jnp.mean((x - x.mean(-1, keepdims=True)) ** 2, -1,
                                              keepdims=True)) * jnp.arange(4.0)[None]),
        CONST),
    Bug("variance as E[x^2] - E[x]^2 under a sqrt",
        lambda x: jnp.sum(jnp.sqrt(jnp.mean(x * x, -1) - jnp.mean(x, -1) ** 2)), CONST),
    Bug("RMSNorm without eps, zero row",
        lambda x: jnp.sum(x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True))), ROWS,
        lambda x: jnp.sum(x * stablejax.safe_rsqrt(jnp.mean(x * x, -1, keepdims=True)))),
    Bug("jnp.where(x > 0, log(x), 0) double-branch trap",
        lambda x: jnp.sum(jnp.where(x > 0, jnp.log(x), 0.0)), ONEHOT,
        lambda x: jnp.sum(jnp.where(x > 0, stablejax.safe_log(x), 0.0))),
    Bug("entropy -sum(p log p) of a one-hot distribution",
        lambda p: -jnp.sum(p * jnp.log(p)), ONEHOT,
        lambda p: -jnp.sum(p * stablejax.safe_log(p))),
    Bug("pairwise distances, the diagonal", lambda x: jnp.sum(_pairwise(x)), ROWS),
    Bug("masked mean with an empty mask",
        lambda x: jnp.sum(x * (x > 5)) / jnp.sum((x > 5).astype(x.dtype)), ROWS,
        lambda x: stablejax.safe_div(jnp.sum(x * (x > 5)), jnp.sum((x > 5).astype(x.dtype)))),
    Bug("inverse-count weights 1 / count, an empty class",
        lambda x: jnp.sum(x[0] / jnp.sum(x, axis=0)), ROWS[::-1] * np.array([1, 0, 1])),
    Bug("angle arccos(cos) of two equal vectors",
        lambda x: jnp.arccos(jnp.dot(x, x) / jnp.dot(x, x)), np.array([0.3, 0.4], np.float32)),
    Bug("arcsin of a clipped correlation", lambda x: jnp.sum(jnp.arcsin(jnp.tanh(10 * x))),
        np.array([1.0, 0.0], np.float32)),
    Bug("phase atan2 of a zero complex pair", lambda x: jnp.arctan2(x[1], x[0]), ZERO[:2]),
    Bug("p-norm pooling |x| ** 0.5", lambda x: jnp.sum(jnp.abs(x) ** 0.5),
        np.array([-1.0, 0.0, 4.0], np.float32)),
    Bug("inverse temperature x ** -1 at 0", lambda x: jnp.sum(jnp.exp(-(x ** -2))), ZERO[:2]),
    Bug("Bernoulli log-likelihood log(1 - sigmoid) saturated",
        lambda x: -jnp.sum(jnp.log1p(-jax.nn.sigmoid(x))), np.array([20.0, 0.0], np.float32)),
    Bug("recurrent state normalized in a scan, zero start", _gru_normalized,
        np.zeros((3, 2), np.float32), _gru_reference),
    Bug("remat block with sqrt of a sum of squares",
        jax.checkpoint(lambda x: jnp.sqrt(jnp.sum(x ** 2))), ZERO,
        lambda x: stablejax.safe_norm(x)),
    # Out of reach by design.
    Bug("a user's custom_jvp rule dividing by 2 sqrt(x)", lambda x: jnp.sum(_user_sqrt(x)),
        ZERO, fixable=False),
    Bug("eigh of a degenerate matrix (the primitive's derivative)",
        lambda x: jnp.sum(jnp.linalg.eigh(jnp.outer(x, x) * 0 + jnp.eye(2))[1][:, 0] * x),
        np.array([1.0, 2.0], np.float32), fixable=False),
    Bug("cholesky of a singular matrix",
        lambda x: jnp.sum(jnp.linalg.cholesky(jnp.outer(x, x))), np.array([1.0, 2.0], np.float32),
        fixable=False),
]
ZOO += [Bug(b.name, b.fn, b.x, fixable=b.fixable) for b in nan_bugs.BUGS]


def _value_and_grad(fn, x):
    return jax.jit(jax.value_and_grad(fn))(jnp.asarray(x))


@pytest.fixture(scope="module")
def outcomes():
    results = {}
    for bug in ZOO:
        plain = _value_and_grad(bug.fn, bug.x)
        hard = _value_and_grad(harden(bug.fn), bug.x)
        back = jax.jit(harden(jax.grad(bug.fn)))(jnp.asarray(bug.x))
        results[bug.name] = (plain, hard, back)
    return results


def test_zoo_size_and_rate(outcomes):
    assert len(ZOO) >= 36
    fixed = [name for name, (_, hard, _) in outcomes.items() if _finite(hard)]
    rate = len(fixed) / len(ZOO)
    assert rate >= 0.7, (rate, sorted(set(outcomes) - set(fixed)))
    assert set(fixed) == {b.name for b in ZOO if b.fixable}


@pytest.mark.parametrize("bug", ZOO, ids=[b.name for b in ZOO])
def test_zoo_case(bug, outcomes):
    plain, hard, back = outcomes[bug.name]
    assert not _finite(plain), "not a bug: the plain program is finite here"
    assert _finite(hard) == bug.fixable
    if not bug.fixable:
        return
    assert _finite(back), "harden(jax.grad(fn)) must be finite too"
    np.testing.assert_allclose(back, hard[1], rtol=1e-6, atol=1e-6)
    if bug.reference is not None:
        value, grad = _value_and_grad(bug.reference, bug.x)
        np.testing.assert_allclose(hard[0], value, rtol=1e-6)
        np.testing.assert_allclose(hard[1], grad, rtol=1e-6, atol=1e-7)


def test_zoo_singular_gradients_exact(outcomes):
    """At the zero vector and the constant row the documented gradient is exactly 0."""
    for name in ("norm of a zero vector", "jnp.std of a constant feature",
                 "remat block with sqrt of a sum of squares", "phase atan2 of a zero complex pair"):
        _, (_, grad), back = outcomes[name]
        assert np.array_equal(np.asarray(grad), np.zeros_like(grad)), name
        assert np.array_equal(np.asarray(back), np.zeros_like(back)), name


# --------------------------------------------------------------------------- clean models


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_models_unchanged_bit_for_bit(name):
    """Values and gradients of ``grad(harden(f))`` and ``harden(grad(f))`` equal the plain ones.

    Bit for bit, not to a tolerance: off the singular set each rule is jax's own
    primitive and derivative on the same operands, and the rewritten program
    keeps jax's structure (``jit`` calls, implicit broadcasts), so XLA compiles
    the same arithmetic in the same order.
    """
    loss, args = CLEAN[name](False)
    plain = jax.jit(jax.value_and_grad(loss))(*args)
    hard = jax.jit(jax.value_and_grad(harden(loss)))(*args)
    back = jax.jit(harden(jax.grad(loss)))(*args)
    assert _finite(plain)
    assert jax.tree.structure(hard) == jax.tree.structure(plain)
    assert jax.tree.structure(back) == jax.tree.structure(plain[1])
    for a, b in zip(jax.tree.leaves(hard) + jax.tree.leaves(back),
                    jax.tree.leaves(plain) + jax.tree.leaves(plain[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_clean_zoo_holds_rewritten_rules():
    """The bit-for-bit test is not vacuous: most clean models hold a rule harden rewrites."""
    rewritten = []
    for name in ("cnn", "contrastive_head", "cosine_loss", "log_prob_eps", "std_whitening",
                 "gaussian_nll", "mlp"):
        loss, args = CLEAN[name](False)
        plain = jax.make_jaxpr(jax.grad(loss))(*args)
        hard = jax.make_jaxpr(jax.grad(harden(loss)))(*args)
        if str(hard).count("select_n") > str(plain).count("select_n"):  # a rule's selects
            rewritten.append(name)
    # Not the Gaussian NLL: softplus(x) + eps is positive by construction.
    assert rewritten == ["cnn", "contrastive_head", "cosine_loss", "log_prob_eps",
                         "std_whitening", "mlp"], rewritten
