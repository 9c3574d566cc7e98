"""``lint``'s rules: per primitive, the output interval and the risks of one equation.

``apply(eqn, ins, on_masked)`` returns the abstract outputs of ``eqn`` given
its abstract inputs, and a list of findings (dicts with ``primitive``,
``phase``, ``category``, ``severity``, ``why``, ``suggestion``). Severity is
``'high'`` when the singular point is inside the operand's interval (reached by
ordinary values: a zero vector, a constant row, a negative number) and
``'low'`` when only rounding of extreme values reaches it (``z``: underflow to
0; overflow of float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from stablejax._src.debug import intervals as iv
from stablejax._src.debug.intervals import AV, INF
from stablejax._src.debug.lint_singular import (
    HARDEN,
    div_rule,
    dtype_name,
    finding,
    overflow_sq,
    unary_rule,
)

_SHAPE = frozenset({
    "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose", "copy", "copy_p",
    "stop_gradient", "reduce_precision", "slice", "dynamic_slice", "rev", "gather",
    "dynamic_update_slice", "sort", "optimization_barrier", "real", "sharding_constraint",
    "mesh_cast", "reshard", "pvary", "device_put",
})
_MIXING = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "cumsum",
    "cumprod", "cummax", "cummin", "dot_general", "conv_general_dilated", "sort",
})
_COMPARE = {"gt": "gt", "ge": "ge", "lt": "lt", "le": "le", "eq": "eq", "ne": "ne"}
_FLIP = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge", "eq": "eq", "ne": "ne"}
_ISNAN = ("isnan", "isnan", 0.0)  # the shape of a (ident, op, constant) comparison
_NEGATE = {"gt": "le", "ge": "lt", "lt": "ge", "le": "gt", "eq": "ne", "ne": "eq"}




def where_trap(f: dict[str, Any]) -> dict[str, Any]:
    """The update turning a masked forward risk into the ``jnp.where`` double-branch trap."""
    return dict(
        phase="backward",
        category="derivative_singularity",
        why="jnp.where double-branch trap: the forward NaN/Inf is masked by jnp.where, its "
        "gradient is not (0 * inf = NaN). " + f["why"],
        suggestion="mask the input too: jnp.where(ok, f(jnp.where(ok, x, safe_x)), y), "
        "or " + f["suggestion"],
    )


def norm_plus_eps(f: dict[str, Any]) -> dict[str, Any]:
    """The update for a norm used as ``norm + eps``: only the exact zero vector reaches it."""
    if f["severity"] != "high" or "norm" not in f["why"]:
        return {}
    return dict(
        severity="low",
        why="the norm is used as norm + eps, but its own derivative is still 0/0 at an exactly "
        "zero vector.",
    )


def _reduced_size(eqn: Any) -> float:
    shape = eqn.invars[0].aval.shape
    axes = eqn.params.get("axes", ())
    n = 1
    for a in axes:
        n *= shape[a]
    return float(max(n, 1))


def _contract_size(eqn: Any) -> float:
    (lc, _), _ = eqn.params["dimension_numbers"]
    shape = eqn.invars[0].aval.shape
    n = 1
    for a in lc:
        n *= shape[a]
    return float(max(n, 1))


def _refine(a: AV, cmp: tuple[int, str, float] | None, truth: bool, dt: str) -> AV:
    """``a`` restricted to where the comparison ``cmp`` is ``truth``, when it is about ``a``."""
    if cmp is None or cmp[0] != a.ident:
        return a
    op = cmp[1] if truth else _NEGATE[cmp[1]]
    c = cmp[2]
    fi = iv.float_info(dt) if dt.startswith(("float", "bfloat")) else None
    pos = fi[0] if fi else 1.0  # the smallest value > 0 of the dtype
    lo, hi = a.lo, a.hi
    if op == "gt":
        lo = max(lo, c if c != 0 else pos)
    elif op == "ge":
        lo = max(lo, c)
    elif op == "lt":
        hi = min(hi, c if c != 0 else -pos)
    elif op == "le":
        hi = min(hi, c)
    elif op == "eq":
        lo, hi = max(lo, c), min(hi, c)
    elif op == "ne" and c == 0 and lo == 0:
        lo = pos
    if lo > hi:
        return a.replace(empty=True)
    return a.replace(lo=lo, hi=hi)


def _select(eqn, ins, on_masked, trusted_clamp=False) -> AV:
    pred, cases = ins[0], ins[1:]
    for c in cases:
        if c.taint:
            on_masked(c.taint)
    if len(cases) == 2 and pred.cmp == _ISNAN:
        return cases[0].replace(taint=frozenset())  # the other case is taken for NaN only
    if len(cases) == 2:
        dt = dtype_name(eqn.outvars[0])
        f, t = _refine(cases[0], pred.cmp, False, dt), _refine(cases[1], pred.cmp, True, dt)
        out = iv.union(f, t)
        # jnp.where(isfinite(m), m, 0) of a max keeps "is the max".
        for a, b in ((f, t), (t, f)):
            if a.max_of is not None and b.lo == b.hi == 0:
                out = out.replace(max_of=a.max_of)
        return out.replace(taint=frozenset())
    out = cases[0]
    for c in cases[1:]:
        out = iv.union(out, c)
    return out.replace(taint=frozenset())


def trusted_clamp(ins: list[AV], out: AV) -> AV:
    """``where(v <= c, c, y)`` in trusted code (optax.safe_norm): taken as ``>= c``."""
    pred, cases = ins[0], ins[1:]
    if pred.cmp is None or pred.cmp[1] not in ("le", "lt") or len(cases) != 2:
        return out
    c = pred.cmp[2]
    if c > 0 and any(x.lo == x.hi and math.isclose(x.lo, c, rel_tol=1e-6) for x in cases):
        return out.replace(lo=max(out.lo, c))
    return out


def apply(eqn: Any, ins: list[AV], on_masked: Callable[[frozenset[int]], None]):
    """The abstract outputs of ``eqn`` and its findings."""
    name = eqn.primitive.name
    dt = dtype_name(eqn.outvars[0]) if eqn.outvars else ""
    # A NaN carried into a reduction or a matmul is no longer "the value jnp.where masks".
    taint = (frozenset().union(*(a.taint for a in ins)) if ins and name not in _MIXING
             else frozenset())
    found: list[dict] = []
    out: AV | None = None
    a = ins[0] if ins else None
    b = ins[1] if len(ins) > 1 else None

    if name in _SHAPE or name == "convert_element_type" and dt.startswith(("float", "bfloat")):
        src_bool = name == "convert_element_type" and dtype_name(eqn.invars[0]) == "bool"
        out = a.replace(tag="mask" if src_bool else a.tag)
        if name in ("gather", "dynamic_update_slice", "pad") and len(ins) > 1 and b is not None:
            if name == "dynamic_update_slice":
                out = iv.union(a, b).replace(tag=a.tag)
        return [out.replace(taint=taint)] + [out] * (len(eqn.outvars) - 1), found
    if name in ("concatenate", "pad"):
        out = ins[0]
        for x in ins[1:]:
            out = iv.union(out, x)
        return [out], found
    if name == "iota":
        n = eqn.outvars[0].aval.shape[eqn.params.get("dimension", 0)]
        return [AV(0.0, float(max(n - 1, 0)), ident=iv.new_ident())], found
    if name in _COMPARE:
        cmp = None
        if name == "ne" and eqn.invars[0] is eqn.invars[1]:
            cmp = _ISNAN  # x != x: true only where x is NaN (jnp.logaddexp's guard)
        elif b.lo == b.hi and not b.empty:
            cmp = (a.ident, name, b.lo)
        elif a.lo == a.hi and not a.empty:
            cmp = (b.ident, _FLIP[name], a.lo)
        return [AV(0.0, 1.0, ident=iv.new_ident(), cmp=cmp, tag="mask")], found
    if name == "select_n":
        return [_select(eqn, ins, on_masked)], found
    if not dt.startswith(("float", "bfloat")):
        return [iv.top(v.aval.dtype) for v in eqn.outvars], found

    def mk(lohi, **kw) -> AV:
        return AV(lohi[0], lohi[1], ident=iv.new_ident(), taint=taint, **kw)

    low = dt in ("float16", "bfloat16")
    if name == "add" or name == "add_any":
        for x, y in ((a, b), (b, a)):
            if x.tag == "norm" and y.lo == y.hi and y.lo > 0:
                on_masked(x.taint, "eps")
        out = mk(iv.add(a, b), z=(a.z and b.z), tag=a.tag if b.lo == b.hi == 0 else None)
        if a.tag == b.tag and a.tag in ("sumsq", "var"):
            out = out.replace(tag=a.tag)
    elif name == "sub":
        if b.max_of is not None and b.max_of == a.ident:
            out = mk((-INF, 0.0), peak=0.0)
        else:
            one = a.lo == a.hi == 1.0 and b.one
            out = mk(iv.add(a, AV(*iv.neg(b))), z=one, tag="diff")
    elif name == "neg":
        out = mk(iv.neg(a))
    elif name == "mul":
        if a.ident == b.ident:
            out = mk(iv.square(a), tag="sq_diff" if a.tag == "diff" else "sq", z=a.z)
        else:
            out = mk(iv.mul(a, b), z=a.z or b.z, tag=_mul_tag(a, b))
        if low and a.ident == b.ident and out.hi > 65504.0:
            found.append(overflow_sq(name, dt))
    elif name == "square" or (name == "integer_pow" and eqn.params["y"] == 2):
        out = mk(iv.square(a), tag="sq_diff" if a.tag == "diff" else "sq", z=a.z)
        if low and out.hi > 65504.0 and dt == "float16":
            found.append(overflow_sq(name, dt))
    elif name == "integer_pow":
        y = eqn.params["y"]
        out = mk(iv.ipow(a, y), z=a.z)
        if y < 0 and a.can_be(0):
            found.append(finding(name, "forward", "forward_singularity", "high",
                                  f"x ** {y} is Inf at x = 0 and x can be 0.",
                                  f"stablejax.safe_div(1, x ** {-y}) or add an epsilon; " + HARDEN))
    elif name == "div":
        out = div_rule(eqn, a, b, mk, found)
    elif name in ("max", "min"):
        f = max if name == "max" else min
        out = mk((f(a.lo, b.lo), f(a.hi, b.hi)), tag=a.tag if a.tag == b.tag else None)
        if name == "max":
            if a.max_of is not None and b.hi == -INF:
                out = out.replace(max_of=a.max_of)
            elif b.max_of is not None and a.hi == -INF:
                out = out.replace(max_of=b.max_of)
    elif name == "abs":
        out = mk((0.0 if a.can_be(0) else min(abs(a.lo), abs(a.hi)), max(abs(a.lo), abs(a.hi))),
                 tag="diff" if a.tag == "diff" else None)
    elif name == "sign":
        out = mk((-1.0, 1.0))
    elif name in ("reduce_sum", "cumsum"):
        n = _reduced_size(eqn) if name == "reduce_sum" else float(eqn.invars[0].aval.shape[
            eqn.params.get("axis", 0)])
        lo, hi = iv.scale(a, n)
        if a.lo >= 0 and a.peak is not None:
            lo = max(lo, a.peak)
        tag = {"sq": "sumsq", "sq_diff": "var", "mask": "masksum", "rawexp": "sumexp"}.get(
            a.tag, a.tag if a.tag in ("sumsq", "var") else None)
        out = mk((lo, hi), z=a.z, tag=tag)
        if low and out.hi > 65504.0 and dt == "float16" and a.hi > 1.0:
            found.append(finding(name, "forward", "overflow_low_precision", "low",
                                  "a float16 sum can exceed 65504.",
                                  "accumulate in float32 (dtype=jnp.float32)"))
    elif name in ("reduce_max", "reduce_min", "cummax", "cummin", "argmax", "argmin"):
        out = mk((a.lo, a.hi), max_of=a.ident if name == "reduce_max" else None, tag=a.tag)
    elif name in ("dot_general", "conv_general_dilated"):
        n = _contract_size(eqn) if name == "dot_general" else _conv_size(eqn)
        out = mk(iv.scale(AV(*iv.mul(a, b)), n))
        if dt == "float16" and out.hi > 65504.0:
            found.append(finding(name, "forward", "overflow_low_precision", "low",
                                  "a float16 matmul can exceed 65504 on large inputs.",
                                  "compute this layer in float32 (dtype=jnp.float32) or keep "
                                  "its inputs normalised", nonfinite=False))
    else:
        out = unary_rule(eqn, name, dt, ins, mk, found)
    return [out] + [out] * (len(eqn.outvars) - 1), found

def _mul_tag(a: AV, b: AV) -> str | None:
    for x, y in ((a, b), (b, a)):
        if y.lo == y.hi and y.lo > 0 and x.tag in ("sumsq", "var", "sq", "sq_diff"):
            return x.tag
    return None


def _conv_size(eqn: Any) -> float:
    rhs = eqn.invars[1].aval.shape
    n = 1
    for d in rhs:
        n *= d
    out_feat = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return float(max(n // max(out_feat, 1), 1))
