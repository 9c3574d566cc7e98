"""Binding one jaxpr equation again: the guard's replay and the debugger's interpreter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def bind_equation(eqn: Any, invals: Sequence[Any], params: dict | None = None) -> list:
    """Binds ``eqn``'s primitive to ``invals`` with ``params`` (default: the equation's own).

    The caller sets any context (``eqn.ctx.manager``, source info) around the call.

    Returns:
      The outputs as a list (one element for a single-result primitive).
    """
    bind_params = eqn.primitive.get_bind_params(eqn.params if params is None else params)
    outs = eqn.primitive.bind(*invals, **bind_params)
    return list(outs) if eqn.primitive.multiple_results else [outs]
