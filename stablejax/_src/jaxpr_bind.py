"""Binding one jaxpr equation again, across the jax versions this package supports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def bind_equation(eqn: Any, invals: Sequence[Any], params: dict | None = None) -> list:
    """Binds ``eqn``'s primitive to ``invals`` with ``params`` (default: the equation's own).

    ``Primitive.get_bind_params`` returns the bind parameters in recent jax and a
    ``(subfuns, params)`` pair in older releases (0.8 and before); both are handled.
    The caller sets any context (``eqn.ctx.manager``, source info) around the call.

    Returns:
      The outputs as a list (one element for a single-result primitive).
    """
    bind = eqn.primitive.get_bind_params(eqn.params if params is None else params)
    subfuns, bind_params = bind if isinstance(bind, tuple) else ((), bind)
    outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return list(outs) if eqn.primitive.multiple_results else [outs]
