"""guard's compiled step makes the same passes over parameter-sized buffers as the plain chain.

Counted on the XLA:CPU module: reads and writes of full-size buffers by the
top-level instructions of the entry computation, and copies of full-size
buffers (which donation brings in when a loop still reads an overwritten input).
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

from stablejax import optim

# The traffic counter is a measuring tool of bench/, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.hlo_traffic import full_size_traffic  # noqa: E402

SHAPE = (128, 512)  # 64K elements: the "full-size" threshold below
BIG = SHAPE[0] * SHAPE[1]


def traffic(tx, donate: bool) -> dict:
    params = {f"l{i}": {"w": jnp.ones(SHAPE), "b": jnp.zeros(SHAPE[1:])} for i in range(3)}
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    text = jitted.lower(params, tx.init(params), grads).compile().as_text()
    return full_size_traffic(text, BIG)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="counts XLA:CPU fusions")
@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("on_give_up", ["halt", "reset"])
def test_guard_adds_no_pass_over_the_moments(donate, on_give_up):
    plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    guarded = optim.guard(
        optax.chain(optim.clip_by_global_norm(1.0), optax.adamw(1e-3)), on_give_up=on_give_up
    )
    base, ours = traffic(plain, donate), traffic(guarded, donate)
    assert ours["copies"] == 0
    assert ours["reads"] <= base["reads"] and ours["writes"] <= base["writes"], (ours, base)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="counts XLA:CPU fusions")
@pytest.mark.parametrize("donate", [False, True])
def test_guard_of_bare_adam_reads_the_gradient_once_more_and_writes_nothing_more(donate):
    # Adam squares the same gradient the guard sums the squares of: unless the
    # guard's square is kept apart, XLA merges the two and writes g * g to memory.
    base = traffic(optax.adam(1e-3), donate)
    ours = traffic(optim.guard(optax.adam(1e-3)), donate)
    assert ours["copies"] == 0
    assert ours["writes"] <= base["writes"], (ours, base)
    assert ours["reads"] <= base["reads"] + 3, (ours, base)  # one read of each full-size leaf

