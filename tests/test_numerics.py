"""The safe numerics core: singular points exactly, autodiff parity elsewhere."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import stablejax as sj
from stablejax._src.numerics import ops

FLOATS = [jnp.float32, jnp.bfloat16, jnp.float16]


def jgrad(f, argnums=0):
    return jax.jit(jax.grad(f, argnums=argnums))


# ----------------------------------------------------------------- singular points, exactly


def test_sqrt_at_zero_and_below():
    x = jnp.array([0.0, -1.0, 4.0])
    np.testing.assert_array_equal(jax.jit(sj.safe_sqrt)(x), [0.0, 0.0, 2.0])
    g = jax.jit(jax.vmap(jax.grad(sj.safe_sqrt)))(x)
    np.testing.assert_array_equal(g, [0.0, 0.0, 0.25])
    # The MAE-through-sqrt trap: jnp gives NaN, the safe op gives the subgradient 0.
    assert np.isnan(jax.grad(lambda x: jnp.sqrt(x**2))(0.0))
    assert jgrad(lambda x: sj.safe_sqrt(x**2))(0.0) == 0.0


def test_rsqrt_at_zero():
    x = jnp.array([0.0, -2.0, 4.0])
    np.testing.assert_array_equal(jax.jit(sj.safe_rsqrt)(x), [0.0, 0.0, 0.5])
    g = jax.jit(jax.vmap(jax.grad(sj.safe_rsqrt)))(x)
    np.testing.assert_array_equal(g, [0.0, 0.0, -0.5 * 4.0**-1.5])


def test_log_at_zero():
    tiny = np.finfo(np.float32).tiny
    assert jax.jit(sj.safe_log)(0.0) == np.float32(np.log(tiny))
    assert jax.jit(sj.safe_log)(-3.0) == np.float32(np.log(tiny))
    assert jgrad(sj.safe_log)(0.0) == 0.0
    assert jgrad(sj.safe_log)(2.0) == 0.5


def test_div_at_zero():
    a = jnp.array([1.0, 0.0, -2.0, 6.0])
    b = jnp.array([0.0, 0.0, 0.0, 3.0])
    np.testing.assert_array_equal(jax.jit(sj.safe_div)(a, b), [0.0, 0.0, 0.0, 2.0])
    ga, gb = jax.jit(jax.grad(lambda a, b: sj.safe_div(a, b).sum(), argnums=(0, 1)))(a, b)
    np.testing.assert_array_equal(ga, np.float32([0.0, 0.0, 0.0, 1 / 3]))
    np.testing.assert_allclose(gb, [0.0, 0.0, 0.0, -6.0 / 9.0], rtol=1e-6)


def test_norm_and_normalize_at_zero_vector():
    z = jnp.zeros((2, 3))
    assert np.isnan(jax.grad(lambda x: jnp.linalg.norm(x))(z)).all()
    np.testing.assert_array_equal(jax.jit(sj.safe_norm)(z), 0.0)
    np.testing.assert_array_equal(jgrad(sj.safe_norm)(z), np.zeros((2, 3)))
    np.testing.assert_array_equal(jax.jit(sj.safe_normalize)(z), np.zeros((2, 3)))
    w = jnp.arange(6.0).reshape(2, 3)
    g = jgrad(lambda x: jnp.sum(sj.safe_normalize(x) * w))(z)
    np.testing.assert_array_equal(g, np.zeros((2, 3)))


@pytest.mark.parametrize("fn", [sj.safe_std, sj.safe_var])
def test_std_var_at_constant_rows(fn):
    x = jnp.full((3, 5), 0.1) + jnp.arange(3.0)[:, None] * 7.3
    np.testing.assert_array_equal(jax.jit(lambda x: fn(x, axis=-1))(x), np.zeros(3))
    g = jgrad(lambda x: fn(x, axis=-1).sum())(x)
    np.testing.assert_array_equal(g, np.zeros((3, 5)))
    if fn is sj.safe_std:  # jnp.std: 0 * (d sqrt at 0 = inf)
        assert np.isnan(jax.grad(lambda x: jnp.std(x, axis=-1).sum())(x)).any()


# ----------------------------------------------------------------- exact forward, no eps bias


def test_std_is_exact_at_tiny_scale():
    x = jnp.array([1.0, -1.0, 1.0, -1.0]) * 1e-6
    np.testing.assert_allclose(sj.safe_std(x), 1e-6, rtol=1e-6)
    np.testing.assert_allclose(sj.safe_var(x), 1e-12, rtol=1e-6)
    np.testing.assert_allclose(sj.safe_normalize(x), np.array([1, -1, 1, -1]) / 2, rtol=1e-6)


def test_huge_and_tiny_rows_stay_finite_and_exact_float32():
    for scale in [1e30, 1e-30]:
        x = jnp.array([3.0, -4.0, 0.0, 12.0]) * scale
        x64 = np.array([3.0, -4.0, 0.0, 12.0], np.float64) * scale
        np.testing.assert_allclose(sj.safe_norm(x), np.linalg.norm(x64), rtol=1e-6)
        np.testing.assert_allclose(sj.safe_std(x), np.std(x64), rtol=1e-6)
        g = jgrad(sj.safe_std)(x)
        np.testing.assert_allclose(g, (x64 - x64.mean()) / (4 * np.std(x64)), rtol=1e-5)
    assert not np.isfinite(jnp.linalg.norm(jnp.array([1e30, 1e30])))


def test_large_offset_std():
    x = jnp.array([1.0, 2.0, 3.0, 4.0]) + 1e4
    np.testing.assert_allclose(sj.safe_std(x), np.std([1.0, 2.0, 3.0, 4.0]), rtol=1e-5)


# ----------------------------------------------------------------- autodiff parity away from 0

KEY = jax.random.key(0)
X = jax.random.normal(KEY, (3, 4)) + 0.1


@pytest.mark.parametrize(
    "safe, plain, args",
    [
        (sj.safe_sqrt, jnp.sqrt, (jnp.abs(X) + 0.5,)),
        (sj.safe_rsqrt, jax.lax.rsqrt, (jnp.abs(X) + 0.5,)),
        (sj.safe_log, jnp.log, (jnp.abs(X) + 0.5,)),
        (sj.safe_div, jnp.divide, (X, jnp.abs(X) + 0.5)),
        (functools.partial(sj.safe_norm, axis=-1), functools.partial(jnp.linalg.norm, axis=-1),
         (X,)),
        (sj.safe_normalize, lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True), (X,)),
        (functools.partial(sj.safe_std, axis=0), functools.partial(jnp.std, axis=0), (X,)),
        (functools.partial(sj.safe_var, axis=(0, 1)), functools.partial(jnp.var, axis=(0, 1)),
         (X,)),
    ],
)
def test_matches_plain_formula_and_its_gradients(safe, plain, args):
    np.testing.assert_allclose(jax.jit(safe)(*args), plain(*args), rtol=1e-6, atol=1e-6)
    check_grads(safe, args, order=2, modes=["fwd", "rev"], atol=2e-2, rtol=2e-2)
    gs = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(safe(*a))), argnums=tuple(range(len(args)))))
    gp = jax.grad(lambda *a: jnp.sum(jnp.sin(plain(*a))), argnums=tuple(range(len(args))))
    for a, b in zip(gs(*args), gp(*args)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_masked_std_matches_numpy_and_ignores_nan_in_masked_slots():
    x = np.array([[1.0, 2.0, 4.0, np.nan], [5.0, np.nan, np.nan, np.nan], [np.nan] * 4])
    mask = ~np.isnan(x)
    std = jax.jit(lambda x, m: sj.safe_std(x, axis=-1, where=m))(x, mask)
    np.testing.assert_allclose(std, [np.std([1.0, 2.0, 4.0]), 0.0, 0.0], rtol=1e-6)
    var = sj.safe_var(x, axis=-1, where=mask)
    np.testing.assert_allclose(var, [np.var([1.0, 2.0, 4.0]), 0.0, 0.0], rtol=1e-6)
    g = jgrad(lambda x: sj.safe_std(x, axis=-1, where=mask).sum())(x)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[~mask], 0.0)
    expected = (np.array([1.0, 2.0, 4.0]) - 7 / 3) / (3 * np.std([1.0, 2.0, 4.0]))
    np.testing.assert_allclose(g[0, :3], expected, rtol=1e-5)


# ----------------------------------------------------------------- bounded near singular points


def test_std_gradient_bounded_near_constant():
    for delta in [1e-3, 1e-7, 1e-20, 1e-35]:
        x = jnp.array([1.0, 1.0, 1.0 + delta, 1.0]) if delta > 1e-7 else jnp.array(
            [0.0, 0.0, delta, 0.0])
        g = jgrad(sj.safe_std)(x)
        assert np.isfinite(g).all() and np.abs(g).max() <= 1.0


def test_normalize_gradient_bounded_by_floor():
    x = jnp.array([1e-20, -2e-20, 0.0])
    g = jax.jacobian(sj.safe_normalize)(x)
    assert np.isfinite(g).all() and np.abs(g).max() <= 1.0 / 1e-6
    np.testing.assert_allclose(sj.safe_normalize(x), np.array([1, -2, 0]) / np.sqrt(5), rtol=1e-6)
    g2 = jax.jacobian(lambda x: sj.safe_normalize(x, grad_floor=1e-2))(x)
    assert np.abs(g2).max() <= 1e2


def test_elementwise_gradients_bounded_near_zero():
    # 2e-38 is the smallest decade of normal float32 numbers (1e-38 is subnormal: 0).
    assert jgrad(sj.safe_sqrt)(2e-38) == pytest.approx(0.5 / np.sqrt(1e-30), rel=1e-5)
    assert jgrad(sj.safe_log)(2e-38) == pytest.approx(1e30, rel=1e-5)
    assert np.isfinite(jgrad(sj.safe_rsqrt)(2e-38))
    assert np.isfinite(jgrad(lambda b: sj.safe_div(1.0, b))(1e-30))


# ----------------------------------------------------------------- non-finite input goes out


PAIRS = [
    (sj.safe_sqrt, jnp.sqrt),
    (sj.safe_rsqrt, jax.lax.rsqrt),
    (sj.safe_log, jnp.log),
    (lambda x: sj.safe_div(x, 2.0), lambda x: x / 2.0),
    (lambda x: sj.safe_div(1.0, x), lambda x: 1.0 / x),
    (sj.safe_norm, jnp.linalg.norm),
    (sj.safe_normalize, lambda x: x / jnp.linalg.norm(x)),
    (sj.safe_std, jnp.std),
    (sj.safe_var, jnp.var),
]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("safe, plain", PAIRS)
def test_non_finite_input_is_not_hidden(safe, plain, bad):
    x = jnp.array([1.0, bad, 2.0])
    out, ref = jax.jit(safe)(x), plain(x)
    assert np.isfinite(out).all() == np.isfinite(ref).all(), (out, ref)
    if bad != bad:  # NaN in: the gradient carries it wherever jnp's does
        g = jax.jit(jax.grad(lambda x: jnp.sum(safe(x))))(x)
        assert np.isnan(g).any() == np.isnan(jax.grad(lambda x: jnp.sum(plain(x)))(x)).any()


def test_nan_gradient_propagates_through_std():
    x = jnp.array([1.0, np.nan, 2.0])
    assert np.isnan(jgrad(sj.safe_std)(x)).all()
    assert np.isnan(sj.safe_std(x))


# ----------------------------------------------------------------- transformations and dtypes


def test_vmap_jit_and_second_order():
    x = jnp.stack([jnp.zeros(3), jnp.ones(3), jnp.array([1.0, 2.0, 4.0])])
    np.testing.assert_allclose(jax.vmap(sj.safe_std)(x), sj.safe_std(x, axis=-1), rtol=1e-6)
    # A gradient penalty: d/dx ||grad_x f||^2, at the singular points too.
    for f in [sj.safe_norm, sj.safe_std, sj.safe_var, lambda v: sj.safe_normalize(v)[0]]:
        pen = jax.jit(jax.grad(lambda v, f=f: jnp.sum(jax.grad(f)(v) ** 2)))
        for row in x:
            assert np.isfinite(pen(row)).all()
        h = jax.hessian(f)(x[0])
        assert np.isfinite(h).all()
    h = jax.hessian(lambda v: sj.safe_norm(v) ** 2)(x[2])
    np.testing.assert_allclose(h, 2 * np.eye(3), atol=1e-5)


@pytest.mark.parametrize("dtype", FLOATS)
def test_dtypes_in_equal_dtype_out(dtype):
    x = (jnp.arange(8.0).reshape(2, 4) + 1).astype(dtype)
    for fn in [sj.safe_sqrt, sj.safe_rsqrt, sj.safe_log, sj.safe_norm, sj.safe_normalize,
               sj.safe_std, sj.safe_var, lambda v: sj.safe_div(v, v)]:
        out = jax.jit(fn)(x)
        assert out.dtype == dtype
    x32 = x.astype(jnp.float32)
    np.testing.assert_allclose(
        sj.safe_std(x, axis=-1).astype(jnp.float32), jnp.std(x32, axis=-1), rtol=1e-2)
    c = jnp.ones((2, 4), dtype)
    g = jgrad(lambda v: sj.safe_std(v, axis=-1).astype(jnp.float32).sum())(c)
    assert g.dtype == dtype
    np.testing.assert_array_equal(g.astype(jnp.float32), 0.0)


# ----------------------------------------------------------------- bad input


def test_bad_input_errors_name_the_value():
    with pytest.raises(TypeError, match="int32.*astype"):
        sj.safe_sqrt(jnp.arange(3))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        sj.safe_std(jnp.ones((2, 2)), axis=2)
    with pytest.raises(ValueError, match="repeated axis"):
        sj.safe_norm(jnp.ones((2, 2)), axis=(0, -2))
    with pytest.raises(ValueError, match="grad_floor"):
        sj.safe_normalize(jnp.ones(2), grad_floor=-1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        sj.safe_var(jnp.ones((2, 3)), where=jnp.ones(4, bool))
    with pytest.raises(TypeError, match="`b`"):
        sj.safe_div(jnp.ones(2), jnp.arange(2))


# ----------------------------------------------------------------- every edge, to second order


def test_second_derivatives_at_singular_points_are_zero():
    for v in (-1.0, 0.0, -0.0, 1e-35):
        assert jax.grad(jax.grad(sj.safe_sqrt))(v) == 0.0
    assert jax.grad(jax.grad(sj.safe_log))(0.0) == 0.0
    assert jax.grad(jax.grad(sj.safe_div, 1), 1)(1.0, 1e-20) == 0.0
    # forward over reverse agrees
    assert jax.jacfwd(jax.grad(sj.safe_sqrt))(0.0) == 0.0
    assert jax.jacfwd(jax.grad(sj.safe_rsqrt))(0.0) == 0.0


def test_gradient_penalty_through_safe_sqrt_std_norm():
    f = lambda x: sj.safe_sqrt(jnp.mean(x**2) - jnp.mean(x) ** 2)  # noqa: E731
    x = jnp.full(4, 0.3)
    np.testing.assert_array_equal(jax.grad(lambda x: (jax.grad(f)(x) ** 2).sum())(x), 0.0)
    for op in (sj.safe_std, sj.safe_norm):
        pen = jax.jit(jax.grad(lambda x, op=op: (jax.grad(op)(x) ** 2).sum()))
        np.testing.assert_array_equal(pen(jnp.zeros(4)), 0.0)
        np.testing.assert_array_equal(pen(jnp.full(4, 0.3)), 0.0) if op is sj.safe_std else None
        assert np.isfinite(pen(jnp.array([1e-20, -2e-20, 3e-20, 0.0]))).all()


def test_subnormal_inputs_are_zero_in_and_out_of_jit():
    sub = jnp.float32(1e-40)
    log_tiny = np.float32(np.log(np.finfo(np.float32).tiny))
    assert jax.jit(sj.safe_log)(sub) == log_tiny == sj.safe_log(sub)
    assert jax.jit(sj.safe_rsqrt)(sub) == 0.0 == sj.safe_rsqrt(sub)
    assert jax.jit(sj.safe_sqrt)(sub) == 0.0
    assert jax.jit(lambda b: sj.safe_div(1.0, b))(sub) == 0.0
    assert jax.jit(jax.grad(sj.safe_log))(sub) == 0.0


def test_huge_entries_in_std_var_norm():
    big = jnp.full(4, 2e38)
    assert jax.jit(sj.safe_std)(big) == 0.0
    np.testing.assert_array_equal(jax.jit(jax.grad(sj.safe_var))(big), 0.0)
    np.testing.assert_array_equal(jax.jit(jax.grad(sj.safe_std))(big), 0.0)
    np.testing.assert_allclose(sj.safe_var(jnp.array([1e19, -1e19])), 1e38, rtol=1e-6)
    np.testing.assert_allclose(jnp.var(jnp.array([1e19, -1e19])), 1e38, rtol=1e-6)
    top = float(np.finfo(np.float32).max)
    np.testing.assert_allclose(jax.jit(sj.safe_std)(jnp.array([top, -top])), top, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(sj.safe_norm)(jnp.array([top / 2, 0.0])), top / 2)
    np.testing.assert_array_equal(jax.jit(jax.grad(sj.safe_norm))(jnp.array([top, 0.0])), [1, 0])


def test_floors_are_bounds_in_float16():
    big16 = float(np.finfo(np.float16).max) * ops.BOUND_FRACTION
    g = jax.grad(sj.safe_rsqrt)(jnp.float16(1e-4))
    assert g.dtype == jnp.float16 and g == np.float16(-big16)
    g = jax.grad(lambda v: sj.safe_normalize(v)[0])(jnp.array([2e-6, -5e-6], jnp.float16))
    assert np.isfinite(g).all() and np.abs(g.astype(np.float32)).max() <= big16
    for op in (sj.safe_sqrt, sj.safe_log, lambda b: sj.safe_div(jnp.float16(1), b)):
        for v in (1e-7, 1e-4, 0.0):
            for k in (1, 2, 3):
                f = op
                for _ in range(k):
                    f = jax.grad(f)
                assert np.isfinite(f(jnp.float16(v))), (op, v, k)


HIGHER = {
    "sqrt": sj.safe_sqrt,
    "rsqrt": sj.safe_rsqrt,
    "log": sj.safe_log,
    "div_b": lambda b: sj.safe_div(jnp.ones_like(b), b),
    "div_a": lambda a: sj.safe_div(a, jnp.zeros_like(a)) + sj.safe_div(a, a * 0 + 3e-30),
}
POINTS = [0.0, -0.0, -1.0, 1e-40, 1e-35, 1e-20, 1e-9, 1e-4, 1.0]


@pytest.mark.parametrize("dtype", FLOATS)
def test_higher_derivatives_finite_near_singular_points(dtype):
    x = jnp.asarray(POINTS, dtype)

    @jax.jit
    def all_orders(x):
        out = {}
        for name, f in HIGHER.items():
            g1 = jax.grad(f)
            value = g1 if name == "div_b" else f  # 1/b overflows in float16 as jnp's does
            out[name] = jax.vmap(lambda v, f=value, g1=g1: (
                f(v), g1(v), jax.grad(g1)(v), jax.jacfwd(g1)(v), jax.grad(jax.grad(g1))(v)
            ))(x)
        return out

    for name, vals in all_orders(x).items():
        for order, v in enumerate(vals):
            assert np.isfinite(np.asarray(v, np.float32)).all(), (name, order, v)
        if name == "div_a":  # singular in b, not in a
            continue
        # at (and, for the one-sided ops, below) the singular point every derivative is 0
        singular = [0, 1, 3] if name == "div_b" else [0, 1, 2, 3]
        for v in vals[1:]:
            np.testing.assert_array_equal(np.asarray(v, np.float32)[singular], 0.0)


EMPTY = jnp.zeros((3, 0))


def test_empty_reductions_give_what_jnp_linalg_norm_gives():
    np.testing.assert_array_equal(sj.safe_norm(EMPTY, axis=1), jnp.linalg.norm(EMPTY, axis=1))
    np.testing.assert_array_equal(sj.safe_norm(EMPTY, axis=1), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(sj.safe_std(EMPTY, axis=1), 0.0)
    np.testing.assert_array_equal(sj.safe_var(EMPTY, axis=1), 0.0)
    assert sj.safe_normalize(EMPTY, axis=1).shape == (3, 0)
    assert jax.jit(jax.grad(lambda x: sj.safe_std(x, axis=1).sum()))(EMPTY).shape == (3, 0)
    from stablejax import losses

    np.testing.assert_array_equal(losses.rmse(EMPTY, EMPTY, axis=1), 0.0)


def test_float64_under_x64():
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp, numpy as np, stablejax as sj\n"
        "jax.config.update('jax_enable_x64', True)\n"
        "t = np.finfo(np.float64)\n"
        "assert jax.jit(sj.safe_log)(jnp.float64(1e-310)) == np.log(t.tiny)\n"
        "assert jax.grad(jax.grad(sj.safe_sqrt))(jnp.float64(0.0)) == 0.0\n"
        "assert jax.jit(sj.safe_std)(jnp.full(4, 1.7e308)) == 0.0\n"
        "assert np.isclose(sj.safe_norm(jnp.array([t.max / 2, t.max / 2])), t.max / np.sqrt(2))\n"
        "g = jax.grad(sj.safe_rsqrt)(jnp.float64(1e-300))\n"
        "assert g.dtype == jnp.float64 and np.isfinite(g)\n"
        "assert sj.safe_std(jnp.array([1.0, 3.0])).dtype == jnp.float64\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_bad_arguments_are_clear_errors():
    x = jnp.ones((2, 3))
    with pytest.raises(TypeError, match="axis must be an int.*1.0"):
        sj.safe_norm(x, axis=1.0)
    with pytest.raises(TypeError, match="axis must be an int"):
        sj.safe_std(x, axis=jnp.array(0))
    assert sj.safe_norm(x, axis=np.int64(1)).shape == (2,)  # numpy ints, as numpy takes
    with pytest.raises(TypeError, match="keepdims must be True or False.*yes"):
        sj.safe_std(x, keepdims="yes")
    with pytest.raises(TypeError, match="mask must be boolean.*float32.*mask > 0.5"):
        sj.safe_var(x, where=jnp.full((2, 3), 0.5))
    np.testing.assert_array_equal(sj.safe_var(x, where=jnp.full((2, 3), 0.5) > 0.5), 0.0)
    assert sj.safe_sqrt(4.0, grad_floor=jnp.float32(1e-6)) == 2.0
    assert sj.safe_sqrt(4.0, grad_floor=np.float64(1e-6)) == 2.0
