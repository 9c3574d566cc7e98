r"""Sums of squares a wrapper already knows, answered where the inner chain asks again.

:func:`~stablejax.optim.dynamic_loss_scale` hands its inner chain the unscaled
gradient :math:`g_\ell = g_{s,\ell} / s` and has already summed the squares
of the scaled one for its overflow check, so it knows
:math:`S_\ell = \sum g_\ell^2 = s^{-2} \sum g_{s,\ell}^2`. A norm inside the
inner chain that is not ours (optax's own ``clip_by_global_norm``, through
``optax.tree.norm``) sums those squares again, over the *unscaled* gradient:
XLA:CPU cannot fuse the unscaling into that reduction and writes the whole
unscaled gradient to memory for it, one more write and read per parameter.

:class:`KnownSums` recognises, in the inner chain's jaxpr as it is bound
equation by equation, a ``reduce_sum`` over every axis of the square of one of
those leaves (``square``, ``integer_pow`` with ``y=2`` or ``mul`` of the leaf
by itself, plus any number of zero arrays, as ``optax.tree.norm`` writes it)
and answers it with :math:`S_\ell` instead. For a power-of-two scale (the
defaults) the answer is the sum of the same numbers, exact up to the order of
the additions; for any other scale it differs from the re-computed sum by
rounding only. Anything else the chain computes from the gradient is bound as
written; only top-level equations are matched (a norm under a ``jit`` of its
own is left alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.extend.core as jex_core
import numpy as np

from stablejax._src.jaxpr_bind import bind_equation

_SQUARE = ("square", "integer_pow", "mul")


class KnownSums:
    """Per-leaf sums of squares ``sums[i]`` of the traced ``leaves[i]``.

    Use: :meth:`start` with the closed jaxpr to be bound, then :meth:`bind` for
    each of its equations in order.
    """

    def __init__(self, leaves: Sequence[Any], sums: Any):
        self._index = {id(x): i for i, x in enumerate(leaves)}
        self._sums = sums
        self._kind: dict[Any, tuple] = {}

    def start(self, closed: Any) -> None:
        """Marks the constants of ``closed`` that are known leaves."""
        self._kind = {
            v: ("leaf", self._index[id(c)])
            for v, c in zip(closed.jaxpr.constvars, closed.consts)
            if id(c) in self._index
        }

    def _of(self, v: Any) -> tuple | None:
        if isinstance(v, jex_core.Literal):
            return ("zero",) if np.all(np.asarray(v.val) == 0) else None
        return self._kind.get(v)

    def _classify(self, eqn: Any) -> tuple | None:
        name = eqn.primitive.name
        kinds = [self._of(v) for v in eqn.invars]
        if name == "broadcast_in_dim" and kinds[0] == ("zero",):
            return ("zero",)
        if name in _SQUARE and kinds[0] is not None:
            if name == "integer_pow" and eqn.params.get("y") != 2:
                return None
            if name == "mul" and eqn.invars[0] is not eqn.invars[1] and kinds[0] != ("zero",):
                return None
            if kinds[0] == ("zero",):
                return ("zero",)
            return ("square", kinds[0][1]) if kinds[0][0] == "leaf" else None
        if name == "add" and len(kinds) == 2:
            squares = [k for k in kinds if k is not None and k[0] == "square"]
            zeros = [k for k in kinds if k == ("zero",)]
            if len(squares) == 1 and len(zeros) == 1:
                return squares[0]
            if len(zeros) == 2:
                return ("zero",)
        return None

    def answer(self, eqn: Any) -> list[Any] | None:
        """``[S_i]`` if ``eqn`` sums all of a known leaf's squares, else None."""
        if eqn.primitive.name != "reduce_sum":
            return None
        kind = self._of(eqn.invars[0])
        if kind is None or kind[0] != "square":
            return None
        aval = eqn.invars[0].aval
        out = eqn.outvars[0].aval
        if tuple(eqn.params.get("axes", ())) != tuple(range(len(aval.shape))):
            return None
        if out.shape != () or np.dtype(out.dtype) != np.dtype(self._sums.dtype):
            return None
        return [self._sums[kind[1]]]

    def note(self, eqn: Any) -> None:
        """Records what the outputs of ``eqn`` are, for the equations after it."""
        kind = self._classify(eqn)
        if kind is not None and len(eqn.outvars) == 1:
            self._kind[eqn.outvars[0]] = kind

    def bind(self, eqn: Any, read: Any) -> list[Any]:
        """The outputs of ``eqn``: a known sum (:meth:`answer`), or the equation
        bound on its operands (``read`` of each input var); then :meth:`note`."""
        out = self.answer(eqn)
        if out is None:
            with eqn.ctx.manager:
                out = bind_equation(eqn, [read(v) for v in eqn.invars])
        self.note(eqn)
        return out

    def replayed(self, closed: Any) -> Any:
        """``closed`` (a jaxpr with no inputs) traced again with the known sums
        answered: what XLA will be given, for a cost heuristic to inspect."""

        def run():
            env: dict[Any, Any] = dict(zip(closed.jaxpr.constvars, closed.consts))
            read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
            self.start(closed)
            for eqn in closed.jaxpr.eqns:
                env.update(zip(eqn.outvars, self.bind(eqn, read)))
            return [read(v) for v in closed.jaxpr.outvars]

        return jax.make_jaxpr(run)()
