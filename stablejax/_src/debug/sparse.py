"""Fewer flags for the compiled pass of ``locate``: codes that follow from others.

The compiled pass (:mod:`compiled`) flags every floating value a block of
equations passes on; each flag is a reduction XLA must compile, and on a
12-layer transformer's train step the flags, not the step, dominate the compile.
Many of those values are made by an operation whose finiteness is the OR of its
operands': if every operand is finite so is the output, and a non-finite operand
element always lands in some output element. :func:`thin` leaves such a value
unflagged and records its operands instead; :func:`infer` recovers its code on
the host, following chains of such operations back to flagged values, arguments,
constants and literals.

The rule: a value is *derived* when it is not a program output and its equation
is one of

* operations that move, copy or widen elements (``reshape``, ``transpose``,
  ``broadcast_in_dim``, ``squeeze``, ``expand_dims``, ``concatenate``, ``rev``,
  ``copy``, ``neg``, ``abs``, and ``convert_element_type`` to a float type
  whose range holds the operand's): the OR is exact;
* ``add``, ``sub``, ``mul``, ``add_any``, ``square``, ``sqrt`` and
  ``integer_pow`` with a positive exponent: a non-finite operand element always
  makes a non-finite output element (``nan + x``, ``inf * 0``, ``inf - inf``,
  ``sqrt(-inf)``), but finite operands can overflow to an infinity, or leave the
  domain (``sqrt(-1)``). The OR then says *finite* for a value that is not;
* ``div`` by a scalar (a literal, a one-element value or a broadcast of one, as
  optimizers' bias corrections are): while the scalar is finite this is the
  case above (a zero or tiny divisor makes the birth); a non-finite scalar makes
  the code unknown (``x / inf`` is 0), and :func:`infer` says so.

and every floating operand is flagged, derived, an argument, a constant or a
literal. Program outputs are always flagged, so a non-finite output is always
seen. An overflow born in a derived value is caught by :func:`search.search`:
the block the taint walk chooses is evaluated eagerly with its real operands,
and a non-finite operand whose inferred code said finite moves the search to
the block that made it (its code is then taken as measured), until the block
holding the birth is reached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from stablejax._src.debug.values import is_float, nonfinite_kind

EXACT = frozenset(
    {
        "reshape",
        "transpose",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "concatenate",
        "rev",
        "copy",
        "copy_p",
        "neg",
        "abs",
    }
)
OVERFLOW = frozenset({"add", "sub", "mul", "add_any", "square", "sqrt"})


def _widening(eqn: Any) -> bool:
    src = eqn.invars[0].aval.dtype
    dst = eqn.outvars[0].aval.dtype
    if not (is_float(eqn.invars[0].aval) and is_float(eqn.outvars[0].aval)):
        return False
    if np.dtype(src).kind == "c" or np.dtype(dst).kind == "c":
        return src == dst
    return float(jnp.finfo(dst).max) >= float(jnp.finfo(src).max)


def derivable(eqn: Any) -> bool:
    """Whether the finiteness of ``eqn``'s outputs is the OR of its operands' (see module)."""
    name = eqn.primitive.name
    if name in EXACT or name in OVERFLOW:
        return True
    if name == "div":  # by a scalar: see thin
        return is_float(eqn.outvars[0].aval)
    if name == "integer_pow":
        return int(eqn.params.get("y", 0)) >= 1
    if name == "convert_element_type":
        return _widening(eqn)
    return False


def _size(aval: Any) -> int:
    return int(np.prod(aval.shape, dtype=int))


def thin(
    prog: Any, esc: Sequence[Sequence[int]]
) -> tuple[list[int], dict[int, tuple[list[Any], Any]]]:
    """The escaping values to flag on device, and the derived ones with their operands.

    Args:
      prog: a flattened :class:`compiled.Program`.
      esc: per block, the floating values it passes on (:func:`compiled.escaping`).

    Returns:
      ``(flagged, derived)``: the value ids to flag, in ``esc``'s order, and per
      derived value id (escaping or not, in execution order) its floating
      operands (value ids or ``("lit", value)``) and, for a ``div``, its
      divisor (else ``None``).
    """
    escaping = {i for e in esc for i in e}
    outputs = {i for i in prog.outputs if not isinstance(i, tuple)}
    known: set[int] = set(range(prog.n_args)) | set(prog.consts)
    derived: dict[int, tuple[list[Any], Any]] = {}
    scalar: set[int] = set()  # one element, or a broadcast of one
    for leaf in prog.leaves:
        eqn = leaf.eqn
        name = eqn.primitive.name
        ok = not leaf.region and derivable(eqn)
        ops: list[Any] = []
        den = leaf.ins[1] if name == "div" else None
        if name == "div" and not (
            isinstance(den, tuple) or den in scalar or _size(eqn.invars[1].aval) == 1
        ):
            ok = False
        if ok:
            for v, i in zip(eqn.invars, leaf.ins):
                if not is_float(v.aval) or not _size(v.aval):
                    continue
                if not isinstance(i, tuple) and i not in known:
                    ok = False
                    break
                ops.append(i)
        for v, o in zip(eqn.outvars, leaf.outs):
            if o is None:
                continue
            if _size(v.aval) == 1 or (
                name == "broadcast_in_dim" and _size(eqn.invars[0].aval) == 1
            ):
                scalar.add(o)
            if not is_float(v.aval):
                continue
            if ok and o not in outputs:
                derived[o] = (ops, den)
                known.add(o)
            elif o in escaping or not _size(v.aval):
                known.add(o)
    flagged = [i for e in esc for i in e if i not in derived]
    return flagged, derived


def infer(
    prog: Any,
    derived: Mapping[int, tuple[Sequence[Any], Any]],
    measured: Mapping[int, int],
    args: Sequence[Any],
) -> tuple[dict[int, int], list[int]]:
    """Every code: the measured ones, and each derived value's as the OR of its operands'.

    Returns the codes and the derived values whose code is unknown (a ``div`` by
    a non-finite scalar); those are given the code 1.
    """
    codes: dict[int, int] = dict(measured)
    unknown: list[int] = []
    cache: dict[int, int] = {}

    def code(i: Any) -> int:
        if isinstance(i, tuple):
            return int(is_float(i[1]) and nonfinite_kind(i[1]) is not None)
        if i in codes:
            return codes[i]
        if i not in cache:
            if i < prog.n_args:
                val = args[i]
            elif i in prog.consts:
                val = prog.consts[i]
            else:
                return 0  # empty or not floating
            cache[i] = int(is_float(val) and nonfinite_kind(val) is not None)
        return cache[i]

    for o, (ops, den) in derived.items():
        if o not in codes:
            codes[o] = max((code(i) for i in ops), default=0)
            if den is not None and code(den):
                unknown.append(o)
    return codes, unknown
