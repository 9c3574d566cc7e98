"""safe_softmax, safe_log_softmax, safe_logsumexp: jax.nn's on rows with a valid entry,
finite with gradient 0 on rows without one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import stablejax as sj

LOG_TINY = float(np.log(np.finfo(np.float32).tiny))

# Row 0: partly masked; row 1: every logit -inf (the user's own mask); row 2: some -inf
# logits; row 3: every entry masked by `where`; row 4: plain.
_X = jax.random.normal(jax.random.key(0), (5, 6)) * 3.0
X = _X.at[1].set(-jnp.inf).at[2, :3].set(-jnp.inf)
WHERE = jnp.ones((5, 6), bool).at[0, 2].set(False).at[3].set(False)
EMPTY = np.array([False, True, False, True, False])

OPS = {
    "softmax": (sj.safe_softmax, jax.nn.softmax),
    "log_softmax": (sj.safe_log_softmax, jax.nn.log_softmax),
    "logsumexp": (lambda x, axis=-1, where=None: sj.safe_logsumexp(x, axis, where=where),
                  lambda x, axis=-1, where=None: jax.nn.logsumexp(x, axis, where=where)),
}


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("jit", [False, True])
def test_rows_with_a_valid_entry_equal_jax_bit_for_bit(name, jit):
    ours, theirs = OPS[name]
    if jit:
        ours, theirs = (jax.jit(f, static_argnames="axis") for f in (ours, theirs))
    a, b = np.asarray(ours(X, where=WHERE)), np.asarray(theirs(X, where=WHERE))
    np.testing.assert_array_equal(a[~EMPTY], b[~EMPTY])
    a, b = np.asarray(ours(_X)), np.asarray(theirs(_X))
    np.testing.assert_array_equal(a, b)
    if not jit:
        return
    # another axis, and a tuple of axes
    np.testing.assert_array_equal(np.asarray(ours(_X, axis=0)), np.asarray(theirs(_X, axis=0)))
    if name != "logsumexp":
        np.testing.assert_array_equal(
            np.asarray(ours(_X.reshape(5, 2, 3), axis=(1, 2))),
            np.asarray(theirs(_X.reshape(5, 2, 3), axis=(1, 2))))


def test_rows_without_a_valid_entry_have_the_documented_values():
    p = sj.safe_softmax(X, where=WHERE)
    assert (np.asarray(p)[EMPTY] == 0).all()
    assert np.isnan(np.asarray(jax.nn.softmax(X, where=WHERE))[1]).all()  # the baseline's NaN
    lp = sj.safe_log_softmax(X, where=WHERE)
    assert (np.asarray(lp)[EMPTY] == np.float32(LOG_TINY)).all()
    lse = sj.safe_logsumexp(X, axis=-1, where=WHERE)
    assert (np.asarray(lse)[EMPTY] == np.float32(LOG_TINY)).all()
    # -inf at a masked entry of a row with a valid entry, as jax.nn (exact log of 0)
    assert np.asarray(lp)[0, 2] == -np.inf and np.asarray(lp)[2, 0] == -np.inf
    assert float(sj.safe_logsumexp(jnp.full(3, -jnp.inf))) == np.float32(LOG_TINY)


def _losses(x):
    w = jnp.arange(1.0, 7.0)[None]
    return {
        "softmax": jnp.sum(sj.safe_softmax(x, where=WHERE) * w),
        "log_softmax": jnp.sum(jnp.where(WHERE, sj.safe_log_softmax(x, where=WHERE), 0.0) * w),
        "logsumexp": jnp.sum(sj.safe_logsumexp(x, axis=-1, where=WHERE) * jnp.arange(1.0, 6.0)),
    }


@pytest.fixture(scope="module")
def grads():
    def run(x):
        out = {}
        for k in _losses(x):
            f = lambda v, k=k: _losses(v)[k]
            penalty = lambda v, f=f: jnp.sum(jax.grad(f)(v) ** 2)
            out[k] = (jax.grad(f)(x), jax.jvp(f, (x,), (jnp.ones_like(x),))[1],
                      jax.grad(penalty)(x))
        return out
    return jax.jit(run)(X)


@pytest.mark.parametrize("name", sorted(OPS))
def test_gradient_zero_on_empty_rows_and_finite_to_second_order(grads, name):
    g, _, gg = grads[name]
    assert (np.asarray(g)[EMPTY] == 0).all()
    assert (np.asarray(gg)[EMPTY] == 0).all()
    assert np.isfinite(np.asarray(g)).all() and np.isfinite(np.asarray(gg)).all()
    # masked entries and -inf logits of valid rows get no gradient through softmax
    if name == "softmax":
        assert np.asarray(g)[0, 2] == 0 and (np.asarray(g)[2, :3] == 0).all()


def test_gradient_equals_jax_on_rows_with_a_valid_entry(grads):
    valid = ~EMPTY
    w = jnp.arange(1.0, 7.0)[None]
    refs = {
        "softmax": lambda x: jnp.sum(jax.nn.softmax(x, where=WHERE)[valid] * w),
        "log_softmax": lambda x: jnp.sum(
            jnp.where(WHERE, jax.nn.log_softmax(x, where=WHERE), 0.0)[valid] * w),
        "logsumexp": lambda x: jnp.sum(
            jax.nn.logsumexp(x, axis=-1, where=WHERE)[valid] * jnp.arange(1.0, 6.0)[valid]),
    }
    for name, ref in refs.items():
        expect = np.asarray(jax.jit(jax.grad(ref))(X))
        np.testing.assert_allclose(np.asarray(grads[name][0])[valid], expect[valid],
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(OPS))
def test_check_grads_second_order_on_regular_rows(name):
    ours, _ = OPS[name]
    where = WHERE.at[3].set(True)
    check_grads(lambda x: ours(x, where=where[:3, :4]), (_X[:3, :4],), order=2, modes=("rev",),
                atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(OPS))
def test_half_dtypes_are_jax_on_float32_rounded_once(name, dtype):
    ours, theirs = OPS[name]
    x = X.astype(dtype)
    out = ours(x, where=WHERE)
    assert out.dtype == dtype
    ref = np.asarray(theirs(x.astype(jnp.float32), where=WHERE).astype(dtype))
    np.testing.assert_array_equal(np.asarray(out)[~EMPTY], ref[~EMPTY])
    assert np.isfinite(np.asarray(out[EMPTY].astype(jnp.float32))).all()
    g = jax.grad(lambda v: jnp.sum(jnp.where(jnp.isfinite(ours(v, where=WHERE)),
                                             ours(v, where=WHERE), 0.0)))(x)
    assert g.dtype == dtype and (np.asarray(g.astype(jnp.float32))[EMPTY] == 0).all()


def test_nan_in_a_valid_entry_goes_out_nan_in_a_masked_slot_is_ignored():
    x = jnp.array([[1.0, jnp.nan, 2.0], [1.0, jnp.nan, 2.0]])
    where = jnp.array([[True, True, True], [True, False, True]])
    p = np.asarray(sj.safe_softmax(x, where=where))
    assert np.isnan(p[0]).all()
    np.testing.assert_array_equal(p[1, ::2], np.asarray(sj.safe_softmax(x[1, ::2])))
    assert p[1, 1] == 0
    lp = np.asarray(sj.safe_log_softmax(x, where=where))
    assert np.isnan(lp[0]).all() and np.isfinite(lp[1, ::2]).all()
    lse = np.asarray(sj.safe_logsumexp(x, axis=1, where=where))
    assert np.isnan(lse[0]) and np.isfinite(lse[1])


def test_vmap_and_keepdims():
    f = jax.vmap(lambda r, w: sj.safe_softmax(r, where=w))
    np.testing.assert_array_equal(np.asarray(f(X, WHERE)),
                                  np.asarray(sj.safe_softmax(X, where=WHERE)))
    out = sj.safe_logsumexp(X, axis=1, where=WHERE, keepdims=True)
    assert out.shape == (5, 1)
    assert sj.safe_logsumexp(_X).shape == ()
    assert sj.safe_softmax(jnp.zeros((3, 0))).shape == (3, 0)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="where=mask > 0"):
        sj.safe_softmax(X, where=WHERE.astype(jnp.float32))
    sj.safe_softmax(X, where=WHERE.astype(jnp.float32) > 0)  # the suggested fix is accepted
    with pytest.raises(TypeError, match="axis"):
        sj.safe_log_softmax(X, axis=1.0)
    with pytest.raises(ValueError, match="out of range"):
        sj.safe_softmax(X, axis=2)
    with pytest.raises(TypeError, match="floating-point"):
        sj.safe_logsumexp(jnp.arange(3))
    with pytest.raises(TypeError, match="keepdims"):
        sj.safe_logsumexp(X, keepdims="yes")
    with pytest.raises(ValueError, match="broadcast"):
        sj.safe_softmax(X, where=jnp.ones(4, bool))


def test_float64_under_x64():
    with jax.enable_x64(True):
        x, where = jnp.asarray(np.asarray(X), jnp.float64), WHERE
        for name, (ours, theirs) in OPS.items():
            a, b = np.asarray(ours(x, where=where)), np.asarray(theirs(x, where=where))
            assert a.dtype == np.float64, name
            np.testing.assert_array_equal(a[~EMPTY], b[~EMPTY], err_msg=name)
        lse = np.asarray(sj.safe_logsumexp(x, axis=1, where=where))
        assert (lse[EMPTY] == np.log(np.finfo(np.float64).tiny)).all()
        g = jax.grad(lambda v: sj.safe_log_softmax(v, where=where)[EMPTY].sum())(x)
        assert g.dtype == jnp.float64 and (np.asarray(g) == 0).all()
