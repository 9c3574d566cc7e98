"""Hypothesis: random rows, zero, constant, huge and tiny ones included."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

import stablejax as sj
from stablejax import nn

N = 6


@st.composite
def rows(draw):
    kind = draw(st.sampled_from(["random", "zero", "constant", "huge", "tiny", "near_constant"]))
    if kind == "zero":
        return np.zeros(N, np.float32)
    if kind == "constant":
        return np.full(N, draw(st.floats(-1e6, 1e6, width=32)), np.float32)
    base = np.array(draw(st.lists(st.floats(-10, 10, width=32), min_size=N, max_size=N)),
                    np.float32)
    if kind == "huge":
        return base * np.float32(1e30)
    if kind == "tiny":
        return base * np.float32(1e-30)
    if kind == "near_constant":
        return np.float32(3.0) + base * np.float32(1e-6)
    return base


W = jnp.arange(1.0, N + 1)
LN_PARAMS = {"params": {"scale": jnp.ones(N), "bias": jnp.zeros(N)}}


# One jitted function of all ops and their gradients, compiled once.
@jax.jit
def _evaluate(x):
    fns = {
        "norm": sj.safe_norm,
        "std": sj.safe_std,
        "normalize": lambda v: jnp.sum(sj.safe_normalize(v) * W),
        "layernorm0": lambda v: jnp.sum(nn.LayerNorm(epsilon=0.0).apply(LN_PARAMS, v) * W),
        "rmsnorm0": lambda v: jnp.sum(
            nn.RMSNorm(epsilon=0.0).apply({"params": {"scale": jnp.ones(N)}}, v) * W),
        "stdpool": lambda v: jnp.sum(nn.StdPool().apply({}, v.reshape(1, N, 1))),
    }
    return {k: (f(x), jax.grad(f)(x)) for k, f in fns.items()}


def _reference(x):
    x64 = x.astype(np.float64)
    # XLA flushes float32 subnormals to zero on CPU and GPU; the reference does too.
    x64[np.abs(x) < np.finfo(np.float32).tiny] = 0.0
    norm = np.linalg.norm(x64)
    std, w = np.std(x64), np.arange(1.0, N + 1)
    rms = np.sqrt(np.mean(x64**2))
    return {
        "norm": norm,
        "std": std,
        "normalize": np.sum(x64 / norm * w) if norm > 0 else 0.0,
        "layernorm0": np.sum((x64 - x64.mean()) / std * w) if std > 0 else 0.0,
        "rmsnorm0": np.sum(x64 / rms * w) if rms > 0 else 0.0,
        "stdpool": x64.mean() + std,
    }


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(rows())
@example(np.array([0.0, 0.0, 0.0, 6.0, 6.0, -9.0], np.float32))  # cancels to 0 exactly
@example(np.array([3.0, 3.0, 3.0, 3.0, 3.0, 3.000001], np.float32))
def test_forward_and_gradient_finite_and_forward_matches_plain(x):
    out = _evaluate(jnp.asarray(x))
    ref = _reference(x)
    plain = {"norm": jnp.linalg.norm(x), "std": jnp.std(x)}
    for name, (value, grad) in out.items():
        assert np.isfinite(value), (name, x)
        assert np.isfinite(grad).all(), (name, x, grad)
        # Exact where the true value is representable (float64 reference of the same
        # float32 inputs); unit-scale sums of six terms (normalize, the layers) carry
        # ~1e-6 rounding and can cancel to an exact 0 in float64.
        atol = 1e-4 if name in ("normalize", "layernorm0", "rmsnorm0") else 1e-37
        np.testing.assert_allclose(float(value), ref[name], rtol=2e-5, atol=atol)
        if name in plain and np.isfinite(plain[name]):
            # Up to the plain formula's own float32 error: rounding of order eps * max|x|
            # (cancellation in a nearly constant row), and squares that underflow below
            # ~1e-19 (jnp's norm of a 1e-30 row is 0). The float64 check above is exact.
            atol = max(1e-18, 1e-6 * float(np.abs(x).max()))
            np.testing.assert_allclose(float(value), float(plain[name]), rtol=2e-5, atol=atol)
    assert np.abs(out["std"][1]).max() <= 1.0 + 1e-6
    assert np.abs(out["norm"][1]).max() <= 1.0 + 1e-6
