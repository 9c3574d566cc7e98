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
* ``div``: a non-finite numerator element always makes a non-finite output
  element (``nan / y``, ``inf / inf``, ``inf / 0``) and finite operands make a
  finite one but for a zero or tiny divisor (the birth, as above); only a
  finite numerator over a non-finite divisor is undecided (``x / inf`` is 0).
  :func:`infer` lists those values, and the search flags them on device.

and every floating operand is flagged, derived, an argument, a constant or a
literal. A program small enough to flag every value (``compiled.SMALL``) infers
only the first kind: a NaN born and masked anywhere in it is still seen; in a
larger one, a NaN born in a derived value and masked before any flagged value
is not (as one born and masked inside a block).

Program outputs are never derived: their codes are always measured, so a
non-finite output is always seen. In a small program they are flagged like
any other value; in a larger one (``births``) they are not flagged but
returned by the compiled pass and checked on the host
(``compiled.flag_values(..., outputs=True)``): a flag per output (hundreds on
a train step) costs the compile more than the check. A NaN or Inf born in a
derived value is caught by :func:`search.search`: the block the taint walk
chooses (for a derived chain feeding an output, the block making the output,
whose measured code is non-finite while its operands' say finite) is evaluated
with its real operands, and a non-finite operand whose inferred code said
finite moves the search to the block that made it (its code is then taken as
measured), until the block holding the birth is reached.
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


def derivable(eqn: Any, births: bool = True) -> bool:
    """Whether the finiteness of ``eqn``'s outputs is the OR of its operands' (see module).

    With ``births=False``, only the operations that cannot make a non-finite value
    from finite operands (moves, copies, widening converts) qualify.
    """
    name = eqn.primitive.name
    if name in EXACT:
        return True
    if name == "convert_element_type":
        return _widening(eqn)
    if not births:
        return False
    if name in OVERFLOW:
        return True
    if name == "div":
        return is_float(eqn.outvars[0].aval)
    if name == "integer_pow":
        return int(eqn.params.get("y", 0)) >= 1
    return False


def _size(aval: Any) -> int:
    return int(np.prod(aval.shape, dtype=int))


def thin(
    prog: Any, esc: Sequence[Sequence[int]], births: bool = True
) -> tuple[list[int], dict[int, tuple[list[Any], Any]]]:
    """The escaping values to flag on device, and the derived ones with their operands.

    Args:
      prog: a flattened :class:`compiled.Program`.
      esc: per block, the floating values it passes on (:func:`compiled.escaping`).
      births: whether operations that can make a non-finite value from finite
        operands are inferred too (see :func:`derivable`). A small program, where
        every value is flagged so that a NaN born and masked is seen too, is
        thinned without them.

    Returns:
      ``(flagged, derived)``: the value ids to flag, in ``esc``'s order (with
      ``births``, the program outputs left out: measured on the host), and per
      derived value id (escaping or not, in execution order) its floating
      operands (value ids or ``("lit", value)``) and, for a ``div``, its
      ``(numerator, divisor)`` (else ``None``).
    """
    escaping = {i for e in esc for i in e}
    outputs = {i for i in prog.outputs if not isinstance(i, tuple)}
    known: set[int] = set(range(prog.n_args)) | set(prog.consts)
    derived: dict[int, tuple[list[Any], Any]] = {}
    for leaf in prog.leaves:
        eqn = leaf.eqn
        name = eqn.primitive.name
        ok = not leaf.region and derivable(eqn, births)
        ops: list[Any] = []
        den = (leaf.ins[0], leaf.ins[1]) if name == "div" else None
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
            if not is_float(v.aval):
                continue
            if ok and o not in outputs:
                derived[o] = (ops, den)
                known.add(o)
            elif o in escaping or not _size(v.aval):
                known.add(o)
    flagged = [i for e in esc for i in e if i not in derived and not (births and i in outputs)]
    return flagged, derived


def infer(
    prog: Any,
    derived: Mapping[int, tuple[Sequence[Any], Any]],
    measured: Mapping[int, int],
    args: Sequence[Any],
) -> tuple[dict[int, int], list[int]]:
    """Every code: the measured ones, and each derived value's as the OR of its operands'.

    Returns the codes and the derived values whose code is undecided (a ``div``
    of a finite numerator by a non-finite divisor); those are given the code 1.
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
            if den is not None and code(den[1]) and not code(den[0]):
                unknown.append(o)
    return codes, unknown
