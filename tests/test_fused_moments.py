"""The unmasked std/var/StdPool moments: one fused pass, exact at the band's edges.

Rows are shifted by their smallest entry and computed unscaled when the sum of their
deviations (times the power-of-two prescale h = 2**-(ceil(log2 n) + 1)) lies in
[2**-20, 2**40], and scaled into that band otherwise; each case below sits just
inside, just outside or far outside it, and is checked against float64 numpy.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stablejax as sj
from stablejax import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.hlo_traffic import full_size_traffic  # noqa: E402

BASE = np.array([3.0, -4.0, 0.5, 12.0, 12.0, -7.25], np.float32)
# BASE's deviations from its smallest entry sum to 59.75, times h = 2**-4: 3.734375
_SUM = float(np.sum(BASE - BASE.min())) / 16
SCALES = [2.0**-21, 2.0**-20, 1.0, 2.0**40, 2.0**41, 1e30, 1e-30, 1e-36, 2e37] + [
    edge / _SUM * (1 + side) for edge in (2.0**-20, 2.0**40) for side in (-2.0**-10, 2.0**-10)]


def _std64(x):
    x64 = np.asarray(x, np.float64)
    return x64.mean(-1), x64.std(-1), (x64 - x64.mean(-1, keepdims=True)) / (
        x64.shape[-1] * x64.std(-1, keepdims=True))


@jax.jit
def _moments_and_grads(x):
    return (sj.safe_std(x, axis=-1), sj.safe_var(x, axis=-1),
            jax.grad(lambda v: sj.safe_std(v, axis=-1).sum())(x),
            nn.StdPool().apply({}, x[:, :, None])[:, 0])


def test_band_edges_match_float64():
    rows = np.stack([BASE * np.float32(s) for s in SCALES]
                    + [np.float32(3.0) + BASE * np.float32(1e-6),      # nearly constant
                       np.float32(1e30) * (1 + BASE * np.float32(2e-7)),  # nearly constant, huge
                       np.float32(-1e-30) * (1 + BASE * np.float32(2e-7))])  # and tiny
    std, var, grad, mean = _moments_and_grads(jnp.asarray(rows))
    mean64, std64, grad64 = _std64(rows)
    np.testing.assert_allclose(std, std64, rtol=2e-6)
    fits = (std64**2 > np.finfo(np.float32).tiny) & (std64**2 < np.finfo(np.float32).max)
    np.testing.assert_allclose(var[fits], std64[fits] ** 2, rtol=4e-6)
    assert np.isinf(var[std64**2 > np.finfo(np.float32).max]).all()
    np.testing.assert_allclose(grad, grad64, rtol=2e-5, atol=1e-6 * np.abs(grad64).max())
    # the mean to float32 rounding of the row's largest entry
    assert (np.abs(np.asarray(mean, np.float64) - mean64) <= 1e-6 * np.abs(rows).max(-1)).all()


@pytest.mark.parametrize("value", [0.0, -0.1, 7.3, -2e38, 3e-38, 1e30, -1e-30])
def test_constant_rows_exact_zero_to_second_order(value):
    x = jnp.full((2, 5), value, jnp.float32)
    std, var, grad, mean = _moments_and_grads(x)
    np.testing.assert_array_equal(std, 0.0)
    np.testing.assert_array_equal(var, 0.0)
    np.testing.assert_array_equal(grad, 0.0)
    np.testing.assert_allclose(mean, value, rtol=1e-6)
    pen = jax.jit(jax.grad(lambda v: (jax.grad(lambda u: sj.safe_std(u, axis=-1).sum())(v)
                                      ** 2).sum()))(x)
    np.testing.assert_array_equal(pen, 0.0)
    h = jax.hessian(lambda v: sj.safe_std(v))(x[0])
    np.testing.assert_array_equal(h, 0.0)


def test_largest_float32_rows():
    top = float(np.finfo(np.float32).max)
    x = jnp.array([[top, -top, top, -top], [top, top, top, -top]])
    std, var, _, mean = _moments_and_grads(x)
    np.testing.assert_allclose(std, [top, np.sqrt(0.75) * top], rtol=1e-6)
    assert np.isinf(var).all()  # the variance itself is above float32's range
    assert (np.abs(np.asarray(mean, np.float64) - [0.0, top / 2]) <= 1e-6 * top).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stdpool_forward_and_backward_read_the_input_once(dtype):
    """No lax.cond or select between the reductions: XLA:CPU fuses the whole step, as it
    does the naive formula's at this size (a row count of at least ~4096 here)."""
    x = jnp.ones((32, 64, 128), dtype)
    step = jax.jit(jax.grad(lambda v: nn.StdPool().apply({}, v).astype(jnp.float32).sum()))
    traffic = full_size_traffic(step.lower(x).compile().as_text(), x.size)
    assert traffic == {"reads": 1, "writes": 1, "copies": 0}, traffic
    masked = jax.jit(jax.grad(
        lambda v: nn.StdPool().apply({}, v, jnp.ones(v.shape[:-1], bool)).astype(
            jnp.float32).sum()))
    # the masked path keeps the rescaling under a lax.cond: more passes, still correct
    assert full_size_traffic(masked.lower(x).compile().as_text(), x.size)["reads"] > 1


def test_huge_entries_above_a_zero_minimum_do_not_overflow_the_sum():
    """The sum of the deviations from a smallest entry near 0 would overflow float32
    (5 * 3e38) without the power-of-two prescale."""
    top = float(np.finfo(np.float32).max)
    rows = np.array([[0.0, top, top, top, 0.5 * top, top],
                     [1e-30, 3e37, 2e38, 2e38, 1e38, 0.0]], np.float32)
    std, var, grad, mean = _moments_and_grads(jnp.asarray(rows))
    mean64, std64, grad64 = _std64(rows)
    np.testing.assert_allclose(std, std64, rtol=2e-6)
    assert np.isinf(var).all()  # above float32's range, as documented
    assert (np.abs(np.asarray(mean, np.float64) - mean64) <= 1e-6 * top).all()
    np.testing.assert_allclose(grad, grad64, rtol=2e-5, atol=1e-6 * np.abs(grad64).max())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_rows_match_float64_of_their_values(dtype):
    """bfloat16's smallest entry is taken before the upcast, float16's after it."""
    rows = np.stack([BASE, BASE * 1e-3 + 7.0, np.full(6, 2.5, np.float32)]).astype(dtype)
    x64 = np.asarray(rows, np.float64)
    std = sj.safe_std(jnp.asarray(rows), axis=-1)
    assert std.dtype == dtype
    np.testing.assert_allclose(np.asarray(std, np.float64), x64.std(-1),
                               rtol=float(jnp.finfo(dtype).eps))
    assert float(std[2]) == 0.0
    g = jax.grad(lambda v: sj.safe_std(v, axis=-1).astype(jnp.float32).sum())(jnp.asarray(rows))
    np.testing.assert_array_equal(np.asarray(g[2], np.float32), 0.0)
