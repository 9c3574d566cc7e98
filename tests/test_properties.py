"""Hypothesis: random rows, zero, constant, huge and tiny ones included."""

import functools

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
    kind = draw(st.sampled_from(["random", "zero", "constant", "huge", "tiny", "near_constant",
                                 "near_max", "subnormal"]))
    if kind == "zero":
        return np.zeros(N, np.float32)
    if kind == "constant":
        return np.full(N, draw(st.floats(-1e6, 1e6, width=32)), np.float32)
    base = np.array(draw(st.lists(st.floats(-10, 10, width=32), min_size=N, max_size=N)),
                    np.float32)
    if kind == "huge":
        return base * np.float32(1e30)
    if kind == "near_max":  # entries up to the dtype's largest number
        return base * np.float32(1e37)  # the norm of the row stays below the max
    if kind == "subnormal":  # flushed to zero by XLA; the safe ops treat them as 0
        return base * np.float32(1e-39)
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
    out = {k: (f(x), jax.grad(f)(x)) for k, f in fns.items()}
    # second order: a gradient penalty through each
    pen = {k: jax.grad(lambda v, f=f: jnp.sum(jax.grad(f)(v) ** 2))(x) for k, f in fns.items()}
    return out, pen


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
    out, pen = _evaluate(jnp.asarray(x))
    for name, g2 in pen.items():
        assert np.isfinite(g2).all(), (name, x, g2)
    ref = _reference(x)
    plain = {"norm": jnp.linalg.norm(x), "std": jnp.std(x)}
    for name, (value, grad) in out.items():
        assert np.isfinite(value), (name, x)
        assert np.isfinite(grad).all(), (name, x, grad)
        # Exact where the true value is representable (float64 reference of the same
        # float32 inputs); unit-scale sums of six terms (normalize, the layers) carry
        # ~1e-6 rounding and can cancel to an exact 0 in float64.
        atol = 1e-4 if name in ("normalize", "layernorm0", "rmsnorm0") else 1e-37
        if name == "stdpool":  # mean + std can cancel: float32 rounding of the two terms
            atol = 1e-6 * float(np.abs(x).max())
        np.testing.assert_allclose(float(value), ref[name], rtol=2e-5, atol=atol)
        if name in plain and np.isfinite(plain[name]):
            # Up to the plain formula's own float32 error: rounding of order eps * max|x|
            # (cancellation in a nearly constant row), and squares that underflow below
            # ~1e-19 (jnp's norm of a 1e-30 row is 0). The float64 check above is exact.
            atol = max(1e-18, 1e-6 * float(np.abs(x).max()))
            np.testing.assert_allclose(float(value), float(plain[name]), rtol=2e-5, atol=atol)
    assert np.abs(out["std"][1]).max() <= 1.0 + 1e-6
    assert np.abs(out["norm"][1]).max() <= 1.0 + 1e-6


# ----------------------------------------------------------------- element-wise ops, every dtype

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
M = 8


@st.composite
def points(draw):
    """Singular, near-singular, subnormal, ordinary and huge points, in one dtype."""
    name = draw(st.sampled_from(sorted(DTYPES)))
    info = np.finfo(DTYPES[name])
    kinds = st.sampled_from(["zero", "negative", "subnormal", "near", "ordinary", "huge"])
    vals = []
    for kind in draw(st.lists(kinds, min_size=M, max_size=M)):
        if kind == "zero":
            vals.append(draw(st.sampled_from([0.0, -0.0])))
        elif kind == "negative":
            vals.append(-draw(st.floats(1e-30, 1e30)))
        elif kind == "subnormal":
            vals.append(draw(st.floats(0.0, 1.0)) * 1.1e-38)
        elif kind == "near":
            vals.append(10.0 ** draw(st.floats(-37.5, -3.0)))
        elif kind == "ordinary":
            vals.append(draw(st.floats(1e-3, 1e3)))
        else:
            vals.append(draw(st.floats(0.01, 1.0)) * float(info.max))
    return name, np.array(vals, np.float32)


UNARY = {
    "sqrt": (sj.safe_sqrt, jnp.sqrt),
    "rsqrt": (sj.safe_rsqrt, jax.lax.rsqrt),
    "log": (sj.safe_log, jnp.log),
    "recip": (lambda b: sj.safe_div(jnp.ones_like(b), b), lambda b: 1.0 / b),
}


@functools.cache
def _unary(name):
    dtype = DTYPES[name]

    @jax.jit
    def run(x32):
        x = x32.astype(dtype)
        out = {}
        for op, (f, plain) in UNARY.items():
            g = jax.grad(f)
            out[op] = jax.vmap(lambda v, f=f, g=g, plain=plain: (
                f(v), plain(v.astype(jnp.float32)).astype(dtype), g(v), jax.grad(g)(v),
                jax.jacfwd(g)(v)))(x)
        return out

    return run


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(points())
def test_elementwise_finite_to_second_order_in_every_dtype(case):
    name, x32 = case
    x = np.asarray(jnp.asarray(x32).astype(DTYPES[name]), np.float32)
    tiny = np.finfo(np.float32).tiny
    for op, (value, plain, g1, g2_rr, g2_fr) in _unary(name)(jnp.asarray(x32)).items():
        value, plain = np.asarray(value, np.float32), np.asarray(plain, np.float32)
        for order, g in enumerate((g1, g2_rr, g2_fr), 1):
            assert np.isfinite(np.asarray(g, np.float32)).all(), (name, op, order, x, g)
        # reverse over reverse equals forward over reverse
        np.testing.assert_array_equal(np.asarray(g2_rr, np.float32), np.asarray(g2_fr, np.float32))
        singular = ((np.abs(x) if op == "recip" else x) < tiny) & np.isfinite(x)
        for g in (g1, g2_rr):
            np.testing.assert_array_equal(np.asarray(g, np.float32)[singular], 0.0)
        # the forward is jnp's wherever that is finite and the input is not subnormal
        keep = np.isfinite(plain) & ~singular
        np.testing.assert_array_equal(value[keep], plain[keep])
        if op != "recip":  # 1/b overflows where jnp's does
            assert np.isfinite(value[np.isfinite(x)]).all(), (name, op, x, value)
