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

In a large program, the measured outputs also decide flags *upstream* of them:

* :func:`imply`: a value read by a path of derivable operations ending in an
  output, every other operand on the path known (a gradient read only by the
  optimizer, whose moments are outputs) takes that output's code. Finite is
  exact; non-finite is a hypothesis that the path did not make the NaN or Inf
  itself (``g ** 2`` overflowing): when the block making the value shows it
  finite, its code is taken as measured and the search moves on.
* :func:`witnessed`: a forward value reaching outputs through operations that
  carry a non-finite element to their output (:data:`CARRY`, ``dot_general``
  and ``reduce_sum`` included) is finite when one of those outputs is. When
  none is (a NaN born in the forward pass reaches every output), its code is
  undecided: a few such values are read with the chosen block's operands
  (:func:`search.search`), more are measured in a second compiled pass traced
  over their cone only.

On the 12-layer d 512 bench step these leave 291 flags of 646: the gradients
read only by Adam (197) and the forward activations (158).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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


# Operations where a non-finite operand element always lands in a non-finite
# output element (births do not matter: this is only read from a finite output
# back to its operands). ``div`` only through its numerator.
CARRY = EXACT | OVERFLOW | frozenset(
    {"dot_general", "reduce_sum", "log", "log1p", "pad", "reduce_precision", "div"}
)


def _carries(eqn: Any) -> bool:
    name = eqn.primitive.name
    if name == "pad":  # a negative low or high padding crops elements
        return all(lo >= 0 and hi >= 0 for lo, hi, _ in eqn.params["padding_config"])
    if name in CARRY:
        return True
    if name == "convert_element_type":
        return is_float(eqn.invars[0].aval) and is_float(eqn.outvars[0].aval)
    if name == "integer_pow":
        return int(eqn.params.get("y", 0)) >= 1
    return False


def witnessed(
    prog: Any, flagged: Sequence[int], phase: str = "forward"
) -> tuple[list[int], dict[int, int]]:
    """Flags of ``phase`` whose code follows from the program outputs: finite or undecided.

    A forward activation of a train step reaches, through operations that
    carry a non-finite element to their output (:data:`CARRY`: ``mul``, ``add``,
    ``dot_general``, ``reduce_sum``, moves, ...), some of the step's outputs: the
    loss, and through the backward pass the gradients, the new parameters and
    the optimizer's moments. Those outputs are measured on the host. If one of
    them is finite, the activation is finite: exactly, whatever the other
    operands (``nan * 0`` is NaN, ``inf - inf`` is NaN). If none is, its code is
    undecided, and :func:`search.search` reads it with the chosen block or
    flags it in a second pass.

    Returns:
      ``(flagged, witnesses)``: the flags left, and per witnessed value id the
      bit set (over ``prog.outputs`` positions) of the outputs it reaches.
    """
    bit: dict[int, int] = {}
    for n, i in enumerate(prog.outputs):
        if not isinstance(i, tuple):
            bit[i] = bit.get(i, 0) | (1 << n)
    reach: dict[int, int] = dict(bit)
    for leaf in reversed(prog.leaves):
        if leaf.region or len(leaf.outs) != 1 or leaf.outs[0] is None:
            continue
        got = reach.get(leaf.outs[0], 0)
        if not got or not _carries(leaf.eqn) or not _size(leaf.eqn.outvars[0].aval):
            continue
        for n, (v, i) in enumerate(zip(leaf.eqn.invars, leaf.ins)):
            if isinstance(i, tuple) or not is_float(v.aval):
                continue
            if leaf.eqn.primitive.name in ("div", "pad") and n != 0:  # the numerator, the padded
                continue
            reach[i] = reach.get(i, 0) | got
    phase_of: dict[int, str] = {}
    for leaf in prog.leaves:
        for o in leaf.outs:
            if o is not None:
                phase_of[o] = leaf.phase
    outputs = set(bit)
    keep: list[int] = []
    witnesses: dict[int, int] = {}
    for i in flagged:
        if i not in outputs and phase_of.get(i) == phase and reach.get(i):
            witnesses[i] = reach[i]
        else:
            keep.append(i)
    return keep, witnesses


def _fed_by(derived: Mapping[int, tuple[Sequence[Any], Any]], seeds: Iterable[int]) -> set[int]:
    """``seeds`` and every derived value whose operands, transitively, include one."""
    fed = set(seeds)
    for o, (ops, _) in derived.items():  # in execution order: operands come first
        if any(not isinstance(i, tuple) and i in fed for i in ops):
            fed.add(o)
    return fed


def plan(
    prog: Any, esc: Sequence[Sequence[int]], births: bool
) -> tuple[list[int], dict[int, Any], dict[int, Any], dict[int, int]]:
    """What the compiled pass flags, and how every other code is found.

    Returns ``(flagged, derived, implied, witnesses)``: :func:`thin`'s flags and
    derived values, then, in a large program (``births``: its outputs measured on
    the host), the flags :func:`imply` and :func:`witnessed` take from the outputs.
    """
    flagged, derived = thin(prog, esc, births=births)
    if not births:
        return flagged, derived, {}, {}
    flagged, implied = imply(prog, flagged, derived)
    flagged, witnesses = witnessed(prog, flagged)
    return flagged, derived, implied, witnesses


def imply(
    prog: Any,
    flagged: Sequence[int],
    derived: Mapping[int, tuple[list[Any], Any]],
    depth: int = 6,
) -> tuple[list[int], dict[int, tuple[int, list[Any]]]]:
    """Flags whose code follows from a program output downstream (large programs).

    A gradient read only by the optimizer (``mu = b1 * mu + (1 - b1) * g``) is
    flagged because the operation making it (a ``dot_general``) is not
    derivable, yet the optimizer's output is measured on the host. Along a path
    of derivable operations ``g -> ... -> out`` (``g`` a numerator where a
    ``div`` is crossed), a non-finite ``g`` always makes ``out`` non-finite, so a
    finite ``out`` proves ``g`` finite. A non-finite ``out`` whose other operands
    on the path are finite says ``g`` is non-finite, unless the path itself made
    the NaN or Inf (``g ** 2`` overflowing): :func:`search.search` then evaluates
    ``g``'s block, sees it finite, takes its code as measured and moves on.
    Those other operands must not depend on an implied value (checked until
    nothing changes), so their codes are known first.

    Returns:
      ``(flagged, implied)``: the flags left, and per implied value id its
      witness (a program output's id) and the other floating operands on the path.
    """
    outputs = {i for i in prog.outputs if not isinstance(i, tuple)}
    consumers: dict[int, list[int]] = {}
    for k, leaf in enumerate(prog.leaves):
        for i in leaf.ins:
            if not isinstance(i, tuple):
                consumers.setdefault(i, []).append(k)

    def path(v: int) -> tuple[int, list[Any]] | None:
        x, sides = v, []
        for _ in range(depth):
            step = None
            for k in consumers.get(x, ()):
                leaf = prog.leaves[k]
                if leaf.region or not derivable(leaf.eqn) or len(leaf.outs) != 1:
                    continue
                y = leaf.outs[0]
                if y is None or not (y in outputs or y in derived):
                    continue
                if leaf.eqn.primitive.name == "div" and (leaf.ins[0] != x or leaf.ins[1] == x):
                    continue
                ops = [
                    i
                    for v_, i in zip(leaf.eqn.invars, leaf.ins)
                    if is_float(v_.aval) and _size(v_.aval) and i != x
                ]
                step = (y, ops)
                if y in outputs:
                    break
            if step is None:
                return None
            x, ops = step
            sides.extend(ops)
            if x in outputs:
                return x, sides
        return None

    chosen: dict[int, tuple[int, list[Any]]] = {}
    for v in flagged:
        if v not in outputs:
            found = path(v)
            if found is not None:
                chosen[v] = found
    while chosen:  # the other operands on a path must not depend on an implied value
        impure = _fed_by(derived, chosen)
        bad = [
            v
            for v, (_, sides) in chosen.items()
            if any(not isinstance(i, tuple) and i in impure for i in sides)
        ]
        if not bad:
            break
        for v in bad:
            del chosen[v]
    return [i for i in flagged if i not in chosen], chosen


def infer(
    prog: Any,
    derived: Mapping[int, tuple[Sequence[Any], Any]],
    measured: Mapping[int, int],
    args: Sequence[Any],
    implied: Mapping[int, tuple[int, Sequence[Any]]] | None = None,
    witnesses: Mapping[int, int] | None = None,
) -> tuple[dict[int, int], list[int]]:
    """Every code: the measured ones, each derived value's as the OR of its operands'.

    An implied value (:func:`imply`) takes its witness's code when the other
    operands on its path are finite; when one is not, it is undecided. A
    witnessed value (:func:`witnessed`) is finite when an output it reaches is,
    else undecided.

    Returns the codes and the values whose code is undecided (a ``div`` of a
    finite numerator by a non-finite divisor, an implied value whose path has
    another non-finite operand, a witnessed value reaching no finite output);
    those are given the code 1.
    """
    implied = implied or {}
    witnesses = witnesses or {}
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

    if witnesses:
        finite = 0
        for n, i in enumerate(prog.outputs):
            if not isinstance(i, tuple) and i in measured and not measured[i]:
                finite |= 1 << n
        for v, bits in witnesses.items():
            if v not in codes:
                codes[v] = 0 if bits & finite else 1
                if codes[v]:
                    unknown.append(v)
    impure = _fed_by(derived, [v for v in implied if v not in codes])

    def derive(o: int, ops: Sequence[Any], den: Any) -> None:
        codes[o] = max((code(i) for i in ops), default=0)
        if den is not None and code(den[1]) and not code(den[0]):
            unknown.append(o)

    for o, (ops, den) in derived.items():  # the values no implied code feeds
        if o not in codes and o not in impure:
            derive(o, ops, den)
    for v, (witness, sides) in implied.items():
        if v not in codes:
            codes[v] = measured.get(witness, 1)  # an output not measured proves nothing
            if codes[v] and (witness not in measured or any(code(i) for i in sides)):
                unknown.append(v)
    for o, (ops, den) in derived.items():
        if o not in codes:
            derive(o, ops, den)
    return codes, unknown
