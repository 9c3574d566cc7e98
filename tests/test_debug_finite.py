"""all_finite: exactly jnp.isfinite(x).all() per value, read with a float sum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stablejax._src.debug.finite import all_finite

F32_MAX = float(jnp.finfo(jnp.float32).max)


def _cases():
    big = jnp.full((64, 64), F32_MAX, jnp.float32)  # finite; its sum overflows
    return [
        jnp.ones((128, 128)),
        jnp.ones((128, 128)).at[7, 9].set(jnp.nan),
        jnp.ones(5000).at[4321].set(jnp.inf),  # beyond a vector width, far in
        jnp.ones(5000).at[0].set(-jnp.inf),
        jnp.array([jnp.inf, -jnp.inf]),  # the sum is NaN
        big,
        -big,
        jnp.zeros((0, 3)),
        jnp.full(70000, 65504.0, jnp.float16),  # float16 max: summed in float32
        jnp.array([1.0, jnp.nan], jnp.bfloat16),
        jnp.array([1 + 1j, 2 + jnp.nan * 1j], jnp.complex64),
        jnp.array([1 + 1j, 2 - 1j], jnp.complex64),
        jnp.float32(3.0),
    ]


@pytest.mark.parametrize("jit", [False, True])
def test_each_value_is_flagged_exactly(jit):
    values = _cases()
    fn = jax.jit(all_finite) if jit else all_finite
    got = [bool(v) for v in fn(values)]
    want = [bool(jnp.isfinite(x).all()) for x in values]
    assert got == want
    assert want == [True, False, False, False, False, True, True, True, True, False, False,
                    True, True]


@pytest.mark.parametrize("jit", [False, True])
def test_all_finite_values_take_the_sum_path_and_agree(jit):
    # Every sum finite: the element-wise branch is not taken, the answer is all True.
    values = [jnp.arange(10.0), jnp.ones((3, 3), jnp.bfloat16), jnp.zeros(0)]
    fn = jax.jit(all_finite) if jit else all_finite
    assert [bool(v) for v in fn(values)] == [True, True, True]
    assert all_finite([]) == []


def test_overflowing_sum_alone_is_not_a_nonfinite_value():
    # Only finite entries, the float32 sum is Inf: the exact branch says finite.
    x = jnp.array([3e38, 3e38, -1.0], jnp.float32)
    assert not np.isfinite(np.asarray(jnp.sum(x)))
    assert bool(jax.jit(all_finite)([x])[0])
