"""The abstract values ``lint`` propagates through a jaxpr: intervals and a few facts.

Each value is summarised by an interval ``[lo, hi]`` of the real numbers its
entries can take (over the reals, so ``exp`` of anything is ``> 0``) and a few
facts interval arithmetic alone would lose:

- ``z``: the interval excludes 0 but the float value can still round to 0
  (``exp(x)`` for very negative ``x``, ``sigmoid``); ``one``: it can round to 1
  (``sigmoid(x)`` for large ``x``). A singular point reached only this way is
  reached by extreme values only: a ``'low'`` severity risk.
- ``tag``: what the value is (``'sumsq'`` a sum of squares, ``'var'`` a
  variance, ``'norm'``, ``'std'``, ``'sq'`` a square, ``'mask'`` a 0/1 value,
  ``'masksum'`` a count of a mask, ``'prob'`` a probability, ``'rawexp'``
  ``exp`` of an unshifted value): it picks the message and the fix.
- ``max_of``: the identity of ``x`` for ``max(x)``, so ``x - max(x) <= 0`` and
  ``sum(exp(x - max(x))) >= 1``, the pattern of every stable softmax;
  ``peak``: a value whose maximum along the reduced axes is at least ``peak``.
- ``cmp``: for a boolean ``x > c``, ``(identity of x, op, c)``, so
  ``jnp.where(x > 0, x, 1)`` is known to be positive.
- ``taint``: indices of pending forward risks whose non-finite values this
  value may carry, to recognise the ``jnp.where`` double-branch trap.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np

INF = math.inf
POS = 5e-324  # the smallest positive float64: stands for an open bound "> 0"
_ids = itertools.count(1)


def new_ident() -> int:
    """A fresh identity for a value."""
    return next(_ids)


@dataclasses.dataclass(frozen=True)
class AV:
    """An abstract value: an interval and facts (see the module docstring)."""

    lo: float = -INF
    hi: float = INF
    z: bool = False
    one: bool = False
    tag: str | None = None
    ident: int = 0
    max_of: int | None = None
    peak: float | None = None
    cmp: tuple[int, str, float] | None = None
    taint: frozenset[int] = frozenset()
    empty: bool = False  # a NaN literal: contributes nothing to a union

    def can_be(self, v: float) -> bool:
        """Whether ``v`` lies in the interval."""
        return not self.empty and self.lo <= v <= self.hi

    def replace(self, **kw: Any) -> AV:
        """A copy with fields replaced."""
        return dataclasses.replace(self, **kw)


def top(dtype: Any = None) -> AV:
    """The value that can be anything its dtype holds."""
    return AV(*dtype_range(dtype), ident=new_ident())


def dtype_range(dtype: Any) -> tuple[float, float]:
    """The range of a dtype: ``[0, 1]`` for bool, the integer range, else unbounded."""
    if dtype is None:
        return -INF, INF
    try:
        dt = np.dtype(dtype)
    except TypeError:  # PRNG key types
        return -INF, INF
    if dt == np.bool_:
        return 0.0, 1.0
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return float(info.min), float(info.max)
    return -INF, INF


def const(value: Any) -> AV:
    """The abstract value of a concrete array (a literal or a captured constant)."""
    arr = np.asarray(value)
    if arr.dtype.kind == "V" or (arr.dtype.kind == "f" and arr.dtype.itemsize < 4):
        arr = arr.astype(np.float32)
    if arr.dtype.kind == "c":
        arr = np.abs(arr)
    if arr.size == 0:
        return AV(ident=new_ident(), empty=True)
    arr = arr.astype(np.float64)
    finite_or_inf = arr[~np.isnan(arr)]
    if finite_or_inf.size == 0:
        return AV(ident=new_ident(), empty=True)
    return AV(float(finite_or_inf.min()), float(finite_or_inf.max()), ident=new_ident())


def float_info(dtype: Any) -> tuple[float, float] | None:
    """``(smallest positive subnormal, largest finite)`` of a float dtype, else ``None``."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return None
    name = dt.name
    if name == "bfloat16":
        return 9.2e-41, 3.3895e38
    if dt.kind != "f":
        return None
    info = np.finfo(dt)
    return float(info.smallest_subnormal), float(info.max)


def rounded(av: AV, dtype: Any) -> AV:
    """Marks ``z`` when the interval's positive lower bound underflows in ``dtype``."""
    fi = float_info(dtype)
    if fi is None:
        return av
    if 0 < av.lo < fi[0] or -fi[0] < av.hi < 0:
        return av.replace(z=True)
    return av


def union(a: AV, b: AV) -> AV:
    """The join of two values (facts kept only where both agree)."""
    if a.empty:
        return b.replace(ident=new_ident())
    if b.empty:
        return a.replace(ident=new_ident())
    return AV(
        min(a.lo, b.lo),
        max(a.hi, b.hi),
        z=a.z or b.z,
        one=a.one or b.one,
        tag=a.tag if a.tag == b.tag else (a.tag or b.tag if "mask" in (a.tag, b.tag) else None),
        ident=new_ident(),
        taint=a.taint | b.taint,
    )


# -- arithmetic -------------------------------------------------------------------


def _m(x: float, y: float) -> float:
    if x == 0 or y == 0:
        return 0.0
    return x * y


def add(a: AV, b: AV) -> tuple[float, float]:
    """``a + b``."""
    lo, hi = a.lo + b.lo, a.hi + b.hi
    lo = -INF if math.isnan(lo) else lo
    hi = INF if math.isnan(hi) else hi
    if a.lo >= 0 and b.lo >= 0 and (a.lo > 0 or b.lo > 0):
        lo = max(lo, POS)
    return lo, hi


def neg(a: AV) -> tuple[float, float]:
    """``-a``."""
    return -a.hi, -a.lo


def mul(a: AV, b: AV) -> tuple[float, float]:
    """``a * b``, with ``0 * inf = 0`` (the bounds are reals, never reached infinities)."""
    cs = [_m(a.lo, b.lo), _m(a.lo, b.hi), _m(a.hi, b.lo), _m(a.hi, b.hi)]
    lo, hi = min(cs), max(cs)
    if (a.lo > 0 or a.hi < 0) and (b.lo > 0 or b.hi < 0):  # nonzero times nonzero
        if lo == 0 and hi > 0:
            lo = POS
        elif hi == 0 and lo < 0:
            hi = -POS
    return lo, hi


def square(a: AV) -> tuple[float, float]:
    """``a * a`` of one value."""
    if a.lo >= 0:
        lo, hi = _m(a.lo, a.lo), _m(a.hi, a.hi)
    elif a.hi <= 0:
        lo, hi = _m(a.hi, a.hi), _m(a.lo, a.lo)
    else:
        lo, hi = 0.0, max(_m(a.lo, a.lo), _m(a.hi, a.hi))
    if (a.lo > 0 or a.hi < 0) and lo == 0:
        lo = POS
    return lo, hi


def recip(b: AV) -> tuple[float, float]:
    """``1 / b``."""
    if b.lo > 0 or b.hi < 0:
        lo, hi = 1.0 / b.hi if b.hi != 0 else -INF, 1.0 / b.lo if b.lo != 0 else INF
        lo, hi = min(lo, hi), max(lo, hi)
        if b.lo > 0:
            lo = max(lo, POS) if math.isfinite(b.hi) else max(lo, 0.0)
        return lo, hi
    if b.lo == 0 and b.hi > 0:
        return (1.0 / b.hi) if math.isfinite(b.hi) else 0.0, INF
    if b.hi == 0 and b.lo < 0:
        return -INF, (1.0 / b.lo) if math.isfinite(b.lo) else 0.0
    return -INF, INF


def div(a: AV, b: AV) -> tuple[float, float]:
    """``a / b`` (unbounded when ``b`` can be 0)."""
    r = AV(*recip(b))
    return mul(a, r)


def monotone(f: Any, a: AV, lo_default: float = -INF, hi_default: float = INF) -> tuple:
    """An increasing function applied to the bounds; overflow and domain errors widen."""

    def ev(x: float, default: float) -> float:
        try:
            v = f(x)
        except (OverflowError, ValueError):
            return default
        return default if math.isnan(v) else v

    return ev(a.lo, lo_default), ev(a.hi, hi_default)


def exp(a: AV) -> tuple[float, float]:
    """``exp(a)``, ``> 0`` over the reals."""
    lo, hi = monotone(math.exp, a, 0.0, INF)
    return max(lo, POS), hi


def log(a: AV) -> tuple[float, float]:
    """``log(a)`` on the part of the interval where it is defined."""
    lo = math.log(a.lo) if a.lo > 0 else -INF
    hi = math.log(a.hi) if 0 < a.hi < INF else (INF if a.hi == INF else -INF)
    return lo, hi


def sqrt(a: AV) -> tuple[float, float]:
    """``sqrt(a)`` on the non-negative part."""
    lo = math.sqrt(a.lo) if a.lo > 0 else 0.0
    hi = math.sqrt(a.hi) if a.hi > 0 else 0.0
    return (max(lo, POS) if a.lo > 0 else lo), hi


def ipow(a: AV, n: int) -> tuple[float, float]:
    """``a ** n`` for an integer ``n``."""
    if n == 0:
        return 1.0, 1.0
    if n < 0:
        return recip(AV(*ipow(a, -n)))
    if n > 8:  # by monotonicity, not by repeated products
        if a.lo >= 0:
            return monotone(lambda t: t**n, a, 0.0, INF)
        if n % 2 == 0:
            return 0.0, monotone(lambda t: t**n, AV(0.0, max(-a.lo, a.hi)), 0.0, INF)[1]
        return monotone(lambda t: t**n, a, -INF, INF)
    if n % 2 == 0:
        s = AV(*square(a))
        return ipow(s, n // 2) if n > 2 else (s.lo, s.hi)
    p = a
    for _ in range(n - 1):
        p = AV(*mul(p, a))
    return p.lo, p.hi


def scale(a: AV, n: float) -> tuple[float, float]:
    """``n`` summed copies of ``a`` (``n >= 1``): a sum reduction of ``n`` entries."""
    lo = a.lo * n if a.lo < 0 else a.lo
    hi = a.hi * n if a.hi > 0 else a.hi
    lo = -INF if math.isnan(lo) else lo
    hi = INF if math.isnan(hi) else hi
    return lo, hi
