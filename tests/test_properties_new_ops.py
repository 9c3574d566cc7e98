"""Hypothesis over the softmax, angle and power ops: singular, near-singular, subnormal and
huge inputs, every half dtype, to second order. One jitted evaluation per dtype."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import stablejax as sj

N = 8
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# Singular points (0, +-1), their neighbours, subnormals, tiny, ordinary and huge values.
SPECIAL = [0.0, 1e-40, 1e-38, 1e-30, 1e-20, 1e-8, 1e-3, 0.5, 1.0 - 6e-8, 1.0, 1.0 + 1.2e-7,
           2.0, 1e20, 1e30, 3e38]


@st.composite
def vectors(draw):
    values = draw(st.lists(st.one_of(st.sampled_from(SPECIAL), st.floats(-3, 3, width=32)),
                           min_size=N, max_size=N))
    signs = draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=N, max_size=N))
    p = draw(st.floats(0.0625, 0.9375, width=32))
    return np.float32(values) * np.float32(signs), np.float32(p), draw(st.sampled_from(DTYPES))


ELEMENTWISE = {
    "arccos": (sj.safe_arccos, jnp.arccos),
    "arcsin": (sj.safe_arcsin, jnp.arcsin),
    "arctan2": (lambda v, p: sj.safe_arctan2(v, jnp.flip(v)),
                lambda v, p: jnp.arctan2(v, jnp.flip(v))),
    "pow": (sj.safe_pow, lambda v, p: jnp.abs(v) ** p),
    "xlogx": (sj.safe_xlogx, lambda v: jax.scipy.special.xlogy(v, v)),
}
TAKES_P = {"arctan2", "pow"}


@jax.jit
def _elementwise(x, p):
    out = {}
    for name, (ours, plain) in ELEMENTWISE.items():
        f = (lambda v, ours=ours: ours(v, p)) if name in TAKES_P else ours
        g = (lambda v, plain=plain: plain(v, p)) if name in TAKES_P else plain
        total = lambda v, f=f: jnp.sum(f(v).astype(jnp.float32))
        grad = jax.grad(total)
        penalty = jax.grad(lambda v, grad=grad: jnp.sum(grad(v).astype(jnp.float32) ** 2))
        ref_grad = jax.grad(lambda v, g=g: jnp.sum(g(v)))
        xf = x.astype(jnp.float32)
        out[name] = (f(x), g(xf).astype(x.dtype), grad(x), penalty(x), ref_grad(xf))
    return out


@SETTINGS
@given(vectors())
def test_elementwise_ops_keep_their_contract(draw):
    values, p, dtype = draw
    x = jnp.asarray(values).astype(dtype)
    xf = np.asarray(x.astype(jnp.float32))
    normal = (np.abs(xf) >= np.finfo(np.float32).tiny) | (xf == 0)
    for name, (y, ref, g, gg, ref_g) in _elementwise(x, jnp.asarray(p, dtype)).items():
        y, ref = np.asarray(y.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))
        assert y.dtype == ref.dtype and g.dtype == dtype and gg.dtype == dtype, name
        # an entry that overflowed in the cast to a half dtype is an Inf input
        fin = np.isfinite(xf) & (np.isfinite(xf[::-1]) if name == "arctan2" else True)
        finite_ref = np.isfinite(ref)
        check = finite_ref & normal if name == "xlogx" else finite_ref
        np.testing.assert_array_equal(y[check], ref[check], err_msg=name)
        if name != "xlogx":  # x log x overflows at 3e38, as the plain formula does
            assert np.isfinite(y[fin]).all(), (name, xf, y)
        g, gg = np.asarray(g.astype(jnp.float32)), np.asarray(gg.astype(jnp.float32))
        assert np.isfinite(g[fin]).all(), (name, dtype, xf, g)
        assert np.isfinite(gg[fin]).all(), (name, dtype, xf, gg)
        if dtype == jnp.float32:
            ref_g = np.asarray(ref_g)
            if name in ("arccos", "arcsin"):
                far = np.abs(xf) < 1.0
            elif name == "arctan2":  # both uses of a coordinate away from the origin
                far = np.maximum(np.abs(xf), np.abs(xf[::-1])) > 1e-6
            else:
                far = np.abs(xf) > 1e-6
            ok = far & np.isfinite(ref_g) & finite_ref
            if name == "arctan2":
                ok = ok & ok[::-1]
            np.testing.assert_allclose(g[ok], ref_g[ok], rtol=2e-3, atol=1e-30, err_msg=name)


@st.composite
def logit_rows(draw):
    rows, masks = [], []
    for _ in range(4):
        kind = draw(st.sampled_from(["random", "all_masked", "all_neginf", "some_neginf",
                                     "huge", "tiny", "nan_masked"]))
        row = np.float32(draw(st.lists(st.floats(-5, 5, width=32), min_size=N, max_size=N)))
        mask = np.array(draw(st.lists(st.booleans(), min_size=N, max_size=N)))
        mask[draw(st.integers(0, N - 1))] = True
        if kind == "all_masked":
            mask[:] = False
        elif kind == "all_neginf":
            row[:] = -np.inf
        elif kind == "some_neginf":
            row[: N // 2] = -np.inf
        elif kind == "huge":
            row = row * np.float32(1e30)
        elif kind == "tiny":
            row = row * np.float32(1e-30)
        elif kind == "nan_masked":
            mask[0] = False
            row[0] = np.nan
        rows.append(row)
        masks.append(mask)
    return np.stack(rows), np.stack(masks), draw(st.sampled_from(DTYPES))


SOFTMAXES = {
    "softmax": (sj.safe_softmax, jax.nn.softmax),
    "log_softmax": (sj.safe_log_softmax, jax.nn.log_softmax),
    "logsumexp": (lambda x, where: sj.safe_logsumexp(x, -1, where=where, keepdims=True),
                  lambda x, where: jax.nn.logsumexp(x, -1, where=where, keepdims=True)),
}


@jax.jit
def _softmaxes(x, where):
    out = {}
    for name, (ours, theirs) in SOFTMAXES.items():
        f = lambda v, ours=ours: ours(v, where=where)
        total = lambda v, f=f: jnp.sum(jnp.where(where, f(v), 0.0).astype(jnp.float32)
                                       * jnp.arange(1.0, N + 1)[None])
        grad = jax.grad(total)
        penalty = jax.grad(lambda v, grad=grad: jnp.sum(grad(v).astype(jnp.float32) ** 2))
        out[name] = (f(x), theirs(x.astype(jnp.float32), where=where).astype(x.dtype),
                     grad(x), penalty(x))
    return out


@SETTINGS
@given(logit_rows())
def test_softmax_family_keeps_its_contract(draw):
    rows, masks, dtype = draw
    x = jnp.asarray(rows).astype(dtype)
    xf = np.asarray(x.astype(jnp.float32))
    valid = masks & (xf > -np.inf)
    empty = ~valid.any(-1)
    # rows with +inf (a half-dtype overflow) or NaN among the valid entries give NaN, as jax.nn
    bad = (masks & ~np.isfinite(xf) & (xf != -np.inf)).any(-1)
    log_tiny = np.float32(np.log(np.finfo(np.float32).tiny)).astype(dtype)
    for name, (y, ref, g, gg) in _softmaxes(x, jnp.asarray(masks)).items():
        y, ref = np.asarray(y), np.asarray(ref)
        assert y.dtype == dtype, name
        np.testing.assert_array_equal(y[~empty], ref[~empty], err_msg=name)
        expect = 0 if name == "softmax" else log_tiny
        assert (y[empty] == expect).all(), (name, y[empty])
        g, gg = np.asarray(g.astype(jnp.float32)), np.asarray(gg.astype(jnp.float32))
        assert (g[empty] == 0).all() and (gg[empty] == 0).all(), name
        assert np.isfinite(g[~bad]).all() and np.isfinite(gg[~bad]).all(), (name, xf, g)
