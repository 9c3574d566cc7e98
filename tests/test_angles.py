"""safe_arctan2, safe_arccos, safe_arcsin, safe_pow, safe_xlogx: exact at the singular
points, jnp's forward and derivative elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import stablejax as sj

UNIT = jnp.array([-1.0, -0.999, -0.5, 0.0, 0.3, 0.999, 1.0], jnp.float32)
POS = jnp.array([0.0, 1e-20, 1e-3, 0.5, 1.0, 3.0, 1e30], jnp.float32)
YX = (jnp.array([0.0, 1.0, -1.0, 0.0, 3.0, -2e-3, 1e20]),
      jnp.array([0.0, 0.0, 1.0, -1.0, -4.0, 5e-3, 1e20]))


def _grad1(f):
    return jax.jit(jax.vmap(jax.grad(f)))


def _grad2(f):
    return jax.jit(jax.vmap(jax.grad(jax.grad(f))))


def test_singular_points_exact():
    for f in (sj.safe_arccos, sj.safe_arcsin):
        for x in (1.0, -1.0):
            assert float(jax.grad(f)(x)) == 0.0 and float(jax.grad(jax.grad(f))(x)) == 0.0
    assert float(sj.safe_arccos(1.0)) == 0.0 and float(sj.safe_arccos(-1.0)) == np.float32(np.pi)
    gy, gx = jax.grad(sj.safe_arctan2, argnums=(0, 1))(0.0, 0.0)
    assert float(gy) == 0.0 and float(gx) == 0.0
    assert float(sj.safe_arctan2(0.0, 0.0)) == 0.0
    h = jax.hessian(sj.safe_arctan2, argnums=(0, 1))(0.0, 0.0)
    assert np.isfinite(np.asarray(h)).all()
    for p in (0.1, 0.5, 0.9):
        gx, gp = jax.grad(sj.safe_pow, argnums=(0, 1))(0.0, p)
        assert float(gx) == 0.0 and float(gp) == 0.0 and float(sj.safe_pow(0.0, p)) == 0.0
        assert np.isfinite(np.asarray(jax.hessian(sj.safe_pow, argnums=(0, 1))(0.0, p))).all()
    assert float(sj.safe_xlogx(0.0)) == 0.0 and float(jax.grad(sj.safe_xlogx)(0.0)) == 0.0
    assert float(jax.grad(jax.grad(sj.safe_xlogx))(0.0)) == 0.0
    # the baselines at the same points
    assert not np.isfinite(float(jax.grad(jnp.arccos)(1.0)))
    assert np.isnan(float(jax.grad(jnp.arctan2)(0.0, 0.0)))
    assert not np.isfinite(float(jax.grad(lambda x: jnp.abs(x) ** 0.5)(0.0)))
    assert not np.isfinite(float(jax.grad(lambda x: jax.scipy.special.xlogy(x, x))(0.0)))


def test_beyond_the_domain_is_clamped_with_gradient_zero():
    x = jnp.array([1.0000001, -1.5, 2.0])
    np.testing.assert_array_equal(np.asarray(sj.safe_arccos(x)), [0.0, np.float32(np.pi), 0.0])
    np.testing.assert_array_equal(np.asarray(sj.safe_arcsin(x)),
                                  np.float32([np.pi / 2, -np.pi / 2, np.pi / 2]))
    assert (np.asarray(_grad1(sj.safe_arccos)(x)) == 0).all()
    neg = jnp.array([-1e-30, -0.5])
    assert (np.asarray(sj.safe_xlogx(neg)) == 0).all()
    assert (np.asarray(_grad1(sj.safe_xlogx)(neg)) == 0).all()


def test_forward_equals_jnp_where_finite():
    np.testing.assert_array_equal(np.asarray(sj.safe_arccos(UNIT)), np.asarray(jnp.arccos(UNIT)))
    np.testing.assert_array_equal(np.asarray(sj.safe_arcsin(UNIT)), np.asarray(jnp.arcsin(UNIT)))
    np.testing.assert_array_equal(np.asarray(sj.safe_arctan2(*YX)),
                                  np.asarray(jnp.arctan2(*YX)))
    np.testing.assert_array_equal(np.asarray(sj.safe_pow(POS - 0.5, 0.3)),
                                  np.asarray(jnp.abs(POS - 0.5) ** 0.3))
    np.testing.assert_array_equal(np.asarray(sj.safe_xlogx(POS)),
                                  np.asarray(jax.scipy.special.xlogy(POS, POS)))


def test_derivatives_equal_jnp_above_the_floor():
    inner = UNIT[1:-1]
    np.testing.assert_allclose(np.asarray(_grad1(sj.safe_arccos)(inner)),
                               np.asarray(_grad1(jnp.arccos)(inner)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(_grad2(sj.safe_arcsin)(inner)),
                               np.asarray(_grad2(jnp.arcsin)(inner)), rtol=1e-4)
    y, x = YX[0][1:], YX[1][1:]
    ours = jax.jit(jax.vmap(jax.grad(sj.safe_arctan2, argnums=(0, 1))))(y, x)
    ref = jax.jit(jax.vmap(jax.grad(jnp.arctan2, argnums=(0, 1))))(y, x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6)
    v = jnp.array([-2.0, -1e-3, 1e-6, 0.7, 5.0])
    for p in (0.25, 0.5, 2.5):
        f = jax.vmap(jax.grad(sj.safe_pow, argnums=(0, 1)), (0, None))
        g = jax.vmap(jax.grad(lambda a, q: jnp.abs(a) ** q, argnums=(0, 1)), (0, None))
        np.testing.assert_allclose(np.asarray(f(v, p)), np.asarray(g(v, p)), rtol=1e-5)
    xs = POS[2:-1]
    ref = _grad2(lambda a: jax.scipy.special.xlogy(a, a))(xs)
    np.testing.assert_allclose(np.asarray(_grad2(sj.safe_xlogx)(xs)), np.asarray(ref), rtol=1e-5)


def test_check_grads_second_order_at_regular_points():
    check_grads(sj.safe_arccos, (jnp.array([-0.6, 0.1, 0.7]),), order=2, modes=("rev",))
    check_grads(sj.safe_arcsin, (jnp.array([-0.6, 0.1, 0.7]),), order=2, modes=("rev",))
    check_grads(sj.safe_arctan2, (jnp.array([0.5, -1.0]), jnp.array([2.0, -0.5])), order=2,
                modes=("rev",))
    check_grads(sj.safe_pow, (jnp.array([-1.5, 0.8]), jnp.array([0.5, 0.3])), order=2,
                modes=("rev",), rtol=2e-2)
    check_grads(sj.safe_xlogx, (jnp.array([0.2, 1.5]),), order=2, modes=("rev",), atol=1e-2,
                rtol=1e-2)


def test_near_singular_bounded_and_second_order_finite():
    tiny = jnp.array([0.0, 1e-38, 1e-30, 1e-20, 1e-10])
    for fn in (lambda v: sj.safe_pow(v, 0.5), sj.safe_xlogx, lambda v: sj.safe_arctan2(v, v),
               lambda v: sj.safe_arccos(1.0 - v), lambda v: sj.safe_arcsin(v - 1.0)):
        assert np.isfinite(np.asarray(_grad1(fn)(tiny))).all()
        assert np.isfinite(np.asarray(_grad2(fn)(tiny))).all()
    assert float(jnp.max(jnp.abs(_grad1(lambda v: sj.safe_pow(v, 0.5))(tiny)))) <= 0.5e15 * 1.001


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_dtypes_keep_dtype_and_finite_derivatives(dtype):
    x = jnp.array([0.0, 6e-8, 1e-4, 0.5], dtype)
    fns = {"pow": lambda v: sj.safe_pow(v, 0.5), "xlogx": sj.safe_xlogx,
           "atan2": lambda v: sj.safe_arctan2(v, v), "acos": lambda v: sj.safe_arccos(1 - v),
           "asin": lambda v: sj.safe_arcsin(v)}
    for name, fn in fns.items():
        out = fn(x)
        assert out.dtype == dtype, name
        ref = {"pow": jnp.abs(x.astype(jnp.float32)) ** 0.5,
               "acos": jnp.arccos(1 - x), "asin": jnp.arcsin(x.astype(jnp.float32))}.get(name)
        if ref is not None:
            np.testing.assert_array_equal(np.asarray(out), np.asarray(ref.astype(dtype)))
        for d in (_grad1(fn)(x), _grad2(fn)(x)):
            assert d.dtype == dtype and np.isfinite(np.asarray(d.astype(jnp.float32))).all(), name


def test_nan_and_inf_pass_through():
    nan = jnp.array([jnp.nan])
    for fn in (sj.safe_arccos, sj.safe_arcsin, sj.safe_xlogx, lambda v: sj.safe_pow(v, 0.5),
               lambda v: sj.safe_arctan2(v, v)):
        assert np.isnan(np.asarray(fn(nan))).all()
        assert np.isnan(np.asarray(_grad1(fn)(nan))).all()
    assert np.isnan(float(sj.safe_arccos(jnp.inf)))  # as jnp: not clamped to 0
    assert float(sj.safe_xlogx(jnp.inf)) == np.inf


def test_traced_exponent_and_vmap():
    f = jax.jit(lambda x, p: sj.safe_pow(x, p))
    np.testing.assert_allclose(np.asarray(f(jnp.array([4.0, 0.0]), jnp.array([0.5, 0.5]))),
                               [2.0, 0.0])
    g = jax.jit(jax.grad(lambda p: sj.safe_pow(jnp.zeros(3), p).sum()))(jnp.float32(0.5))
    assert float(g) == 0.0
    assert sj.safe_pow(jnp.ones((2, 3)), jnp.array([0.5, 1.0, 2.0])).shape == (2, 3)


def test_bad_arguments_raise_clear_errors():
    for fn in (sj.safe_arccos, sj.safe_arcsin, sj.safe_xlogx):
        with pytest.raises(TypeError, match="floating-point"):
            fn(jnp.arange(3))
    with pytest.raises(TypeError, match="floating-point"):
        sj.safe_arctan2(jnp.arange(3), jnp.ones(3))
    with pytest.raises(ValueError, match="p=0.5"):
        sj.safe_pow(jnp.ones(3), 0.0)
    with pytest.raises(ValueError, match="> 0"):
        sj.safe_pow(jnp.ones(3), jnp.array([0.5, -1.0, 0.5]))
    sj.safe_pow(jnp.ones(3), 0.5)  # the suggested fix is accepted
    with pytest.raises(ValueError, match="grad_floor"):
        sj.safe_arctan2(1.0, 1.0, grad_floor=-1.0)


def test_float64_under_x64():
    with jax.enable_x64(True):
        u = jnp.asarray(np.asarray(UNIT), jnp.float64)
        np.testing.assert_array_equal(np.asarray(sj.safe_arccos(u)), np.asarray(jnp.arccos(u)))
        for fn in (sj.safe_arccos, sj.safe_arcsin):
            g = _grad1(fn)(u)
            assert g.dtype == jnp.float64 and g[0] == 0 and g[-1] == 0
            np.testing.assert_allclose(np.asarray(g[1:-1]), np.asarray(_grad1(
                jnp.arccos if fn is sj.safe_arccos else jnp.arcsin)(u[1:-1])), rtol=1e-12)
        zero = jnp.float64(0.0)
        assert float(jax.grad(sj.safe_pow)(zero, 0.5)) == 0.0
        assert float(jax.grad(sj.safe_xlogx)(zero)) == 0.0
        gy, gx = jax.grad(sj.safe_arctan2, argnums=(0, 1))(zero, zero)
        assert gy.dtype == jnp.float64 and float(gy) == 0.0 and float(gx) == 0.0
