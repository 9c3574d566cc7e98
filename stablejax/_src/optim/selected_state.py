"""The guard's inner update with each new state leaf selected where it is made.

Kept apart from :mod:`stablejax._src.optim.guard` because it is a piece of
tracing machinery (a jaxpr replayed equation by equation), not a decision.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp

from stablejax._src.jaxpr_bind import bind_equation


def update_reading_selected_state(inner_update, old_state, choose, known=None):
    """Runs ``inner_update()`` with every new state leaf replaced, as soon as it is
    computed, by ``choose(i, new)`` (the guard's select of flat leaf ``i``: the
    old leaf on a refused step, the fresh one on a reset); returns
    ``(updates, new_state)``.

    Selecting after the fact, the updates read the *unselected* new moments
    while the state outputs are the selected ones, so XLA computes Adam's
    moments twice (once in the select that writes them, once in the loop that
    writes the parameters) and the parameter loop reads the old moments: two
    extra passes over them, and with donated buffers a copy of each, since the
    old moments are overwritten in place before that loop runs. Here every later
    use reads the selected leaf, exactly as the plain chain reads its new state.
    On an accepted step the selected leaf *is* the new one, bit for bit; on a
    refused step every output is replaced by a select anyway (the updates by
    exact zeros, the state by the old or fresh state), so the results are
    unchanged. A second select on an already selected leaf would undo this (XLA
    does not fold the pair and copies the first into its readers again).

    The inner update is traced once to a jaxpr and its equations bound in order,
    which inlines into the enclosing trace like the direct call. A leaf the
    substitution cannot reach (an input passed through, a constant, a value
    that is also another leaf, another shape) is selected after the fact.

    With ``known`` (a :class:`~stablejax._src.optim.known_sums.KnownSums`), a
    sum of squares of a gradient leaf that the caller already has is taken
    from it instead of being computed again.
    """
    closed, out_shape = jax.make_jaxpr(inner_update, return_shape=True)()
    jaxpr = closed.jaxpr
    out_tree = jax.tree.structure(out_shape)
    n_updates = len(jax.tree.leaves(out_shape[0]))
    old_leaves = jax.tree.leaves(old_state)
    state_vars = jaxpr.outvars[n_updates:]
    if len(state_vars) != len(old_leaves):  # a structure mismatch: let tree.map say so
        _, new_state = jax.tree.unflatten(out_tree, jex_core.jaxpr_as_fun(closed)())
        jax.tree.map(lambda n, o: None, new_state, old_state)
    produced = {v for eqn in jaxpr.eqns for v in eqn.outvars}
    count: dict[Any, int] = {}
    for v in state_vars:
        if isinstance(v, jex_core.Var):
            count[v] = count.get(v, 0) + 1
    index: dict[Any, int] = {}
    for i, (v, old) in enumerate(zip(state_vars, old_leaves)):
        if isinstance(v, jex_core.Var) and v in produced and count[v] == 1:
            old = jnp.asarray(old)
            if old.shape == v.aval.shape and old.dtype == v.aval.dtype:
                index[v] = i

    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    def write(v, value):
        env[v] = choose(index[v], value) if v in index else value

    for v, c in zip(jaxpr.constvars, closed.consts):
        env[v] = c
    if known is not None:
        known.start(closed)
    for eqn in jaxpr.eqns:
        if known is not None:
            out = known.bind(eqn, read)
        else:
            with eqn.ctx.manager:
                out = bind_equation(eqn, [read(v) for v in eqn.invars])
        for v, value in zip(eqn.outvars, out):
            write(v, value)
    out = [read(v) for v in jaxpr.outvars]
    for i, v in enumerate(state_vars):
        if not (isinstance(v, jex_core.Var) and v in index):
            out[n_updates + i] = choose(i, out[n_updates + i])
    return jax.tree.unflatten(out_tree, out)
