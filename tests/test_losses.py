"""Losses with finite gradients at a perfect prediction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stablejax import losses

P = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])


def test_perfect_prediction_gradient_is_zero():
    naive_mae = lambda p, y: jnp.mean(jnp.sqrt((p - y) ** 2))
    naive_rmse = lambda p, y: jnp.sqrt(jnp.mean((p - y) ** 2))
    assert np.isnan(jax.grad(naive_mae)(P, P)).all()
    assert np.isnan(jax.grad(naive_rmse)(P, P)).all()
    for loss in (losses.mae, losses.rmse):
        assert jax.jit(loss)(P, P) == 0.0
        np.testing.assert_array_equal(jax.jit(jax.grad(loss))(P, P), np.zeros(P.shape))


def test_values_and_gradients_match_plain_formula_elsewhere():
    y = P + jnp.array([[0.1, -0.2, 0.3], [-0.4, 0.5, -0.6]])
    np.testing.assert_allclose(losses.mae(P, y), jnp.mean(jnp.abs(P - y)), rtol=1e-6)
    np.testing.assert_allclose(losses.rmse(P, y), jnp.sqrt(jnp.mean((P - y) ** 2)), rtol=1e-6)
    g = jax.grad(losses.rmse)(P, y)
    np.testing.assert_allclose(g, jax.grad(lambda p: jnp.sqrt(jnp.mean((p - y) ** 2)))(P),
                               rtol=1e-5)
    np.testing.assert_allclose(jax.grad(losses.mae)(P, y), jnp.sign(P - y) / 6, rtol=1e-6)


def test_where_and_axis():
    y = P + 1.0
    mask = jnp.array([[True, True, False], [False, False, False]])
    yn = y.at[0, 2].set(jnp.nan)
    np.testing.assert_allclose(losses.mae(P, yn, where=mask), 1.0)
    np.testing.assert_allclose(losses.rmse(P, yn, where=mask), 1.0)
    per_row = losses.rmse(P, yn, axis=-1, where=mask)
    np.testing.assert_allclose(per_row, [1.0, 0.0])
    g = jax.grad(lambda p: losses.rmse(p, yn, axis=-1, where=mask).sum())(P)
    assert np.isfinite(g).all() and (g[1] == 0).all()


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3,\)"):
        losses.mae(P, jnp.ones(3))
    with pytest.raises(TypeError, match="target"):
        losses.rmse(P, jnp.ones((2, 3), jnp.int32))
