"""Which equations of a jaxpr are derivative-only: the ``phase`` of an equation.

``jax.grad`` linearizes the function, so the forward sweep of a gradient's
jaxpr holds two kinds of equations with identical source info and name stack:
the primal ops the undifferentiated function runs, and coefficients of the JVP
rules computed from primal values (``0.5 / sqrt(x)`` for ``sqrt``, residuals of
a ``custom_vjp``'s ``fwd``). Only the second kind is "backward" in the sense a
user means. They are told apart by dataflow: a coefficient is consumed only by
the transposed (backward) equations, while every primal value is consumed by
some primal equation, is an output, or is dead (the primal loss of
``jax.grad``, which tracing keeps).

Equations under a ``transpose`` name stack are backward. This module computes,
for one jaxpr and the "forward-used" flags of its outputs, a label per
equation: ``'forward'``, ``'derivative'`` (forward sweep, derivative-only) or
``'backward'``; and the flags to pass down to each sub-jaxpr.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.extend import core as jcore

from stablejax._src.debug.source import has_transform

FORWARD = "forward"
DERIVATIVE = "derivative"
BACKWARD = "backward"
FEEDS_BACKWARD = "forward-feeds-backward"


def _is_var(v: Any) -> bool:
    return isinstance(v, jcore.Var) and not isinstance(v, jcore.DropVar)


def label_equations(
    jaxpr: Any, out_forward: Sequence[bool], backward: bool
) -> tuple[list[str], list[tuple[bool, ...]]]:
    """Labels each equation of ``jaxpr`` forward, derivative-only or backward.

    Args:
      jaxpr: an open ``Jaxpr``.
      out_forward: per output of ``jaxpr``, whether the caller consumes it as a
        primal (forward) value.
      backward: whether the whole jaxpr runs inside a transposed (backward) region.

    Returns:
      ``(labels, eqn_out_forward)``: a label per equation, and per equation the
      forward-used flag of each of its outputs (what to pass to its sub-jaxprs).
    """
    n = len(jaxpr.eqns)
    if backward:
        return [BACKWARD] * n, [tuple(False for _ in e.outvars) for e in jaxpr.eqns]
    # Values read by transposed equations, directly or through untransposed
    # glue (cotangent sums jax may emit outside the transpose name stack).
    bwd_used: set[Any] = set()
    used: set[Any] = set()
    site_of_users: dict[Any, set[int]] = {}
    first_at_site: dict[int, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        used.update(v for v in eqn.invars if _is_var(v))
        tb = eqn.source_info.traceback
        if tb is not None:
            first_at_site.setdefault(id(tb), i)
            for v in eqn.invars:
                if _is_var(v):
                    site_of_users.setdefault(v, set()).add(id(tb))
    used.update(v for v in jaxpr.outvars if _is_var(v))
    fwd_used: set[Any] = {v for v, f in zip(jaxpr.outvars, out_forward) if f and _is_var(v)}
    labels: list[str] = [FORWARD] * n
    flags: list[tuple[bool, ...]] = [()] * n
    labels_feed: set[int] = set()
    for i in range(n - 1, -1, -1):
        eqn = jaxpr.eqns[i]
        outs = [v for v in eqn.outvars if _is_var(v)]
        if has_transform(eqn.source_info.name_stack, "transpose"):
            labels[i] = BACKWARD
            flags[i] = tuple(False for _ in eqn.outvars)
            bwd_used.update(v for v in eqn.invars if _is_var(v))
            continue
        if any(v in bwd_used for v in outs):
            labels_feed.add(i)
            bwd_used.update(v for v in eqn.invars if _is_var(v))
        live = [v for v in outs if v in used]
        tb = eqn.source_info.traceback
        # The primal op is the first equation a JVP rule emits at its site; its
        # coefficients follow with the same traceback and read its result. A
        # primal op read only by its own coefficients (the discarded loss of
        # `jax.grad(jnp.sqrt)`) is still primal.
        own_primal = (
            tb is not None
            and first_at_site.get(id(tb)) == i
            and any(id(tb) in site_of_users.get(v, ()) for v in outs)
        )
        if any(v in fwd_used for v in outs) or not live or own_primal:
            labels[i] = FORWARD
            # A dead output of a primal op is a primal value too.
            flags[i] = tuple(
                (not _is_var(v)) or v in fwd_used or v not in used for v in eqn.outvars
            )
            fwd_used.update(v for v in eqn.invars if _is_var(v))
        else:
            labels[i] = DERIVATIVE
            flags[i] = tuple(False for _ in eqn.outvars)
    # A forward-labelled equation that feeds the transposed equations is glue
    # of the backward pass when it also reads backward values (the walker
    # knows that part): mark it so.
    for i in labels_feed:
        if labels[i] == FORWARD:
            labels[i] = FEEDS_BACKWARD
    return labels, flags
