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

import numpy as np

from stablejax._src.debug import intervals as iv
from stablejax._src.debug.intervals import AV, INF

HARDEN = "or wrap the function with stablejax.harden(fn)"
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
_NEGATE = {"gt": "le", "ge": "lt", "lt": "ge", "le": "gt", "eq": "ne", "ne": "eq"}
_EXP_MAX = {"float16": math.log(65504.0), "bfloat16": 88.7, "float32": 88.7, "float64": 709.0}


def _dtype(v: Any) -> str:
    return str(getattr(getattr(v, "aval", None), "dtype", ""))


def _finding(prim, phase, category, severity, why, suggestion, nonfinite=True) -> dict:
    return dict(primitive=prim, phase=phase, category=category, severity=severity, why=why,
                suggestion=suggestion, nonfinite=nonfinite)


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
    if len(cases) == 2:
        dt = _dtype(eqn.outvars[0])
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
    dt = _dtype(eqn.outvars[0]) if eqn.outvars else ""
    # A NaN carried into a reduction or a matmul is no longer "the value jnp.where masks".
    taint = (frozenset().union(*(a.taint for a in ins)) if ins and name not in _MIXING
             else frozenset())
    found: list[dict] = []
    out: AV | None = None
    a = ins[0] if ins else None
    b = ins[1] if len(ins) > 1 else None

    if name in _SHAPE or name == "convert_element_type" and dt.startswith(("float", "bfloat")):
        src_bool = name == "convert_element_type" and _dtype(eqn.invars[0]) == "bool"
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
        if b.lo == b.hi and not b.empty:
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
            found.append(_overflow_sq(name, dt))
    elif name == "square" or (name == "integer_pow" and eqn.params["y"] == 2):
        out = mk(iv.square(a), tag="sq_diff" if a.tag == "diff" else "sq", z=a.z)
        if low and out.hi > 65504.0 and dt == "float16":
            found.append(_overflow_sq(name, dt))
    elif name == "integer_pow":
        y = eqn.params["y"]
        out = mk(iv.ipow(a, y), z=a.z)
        if y < 0 and a.can_be(0):
            found.append(_finding(name, "forward", "forward_singularity", "high",
                                  f"x ** {y} is Inf at x = 0 and x can be 0.",
                                  f"stablejax.safe_div(1, x ** {-y}) or add an epsilon; " + HARDEN))
    elif name == "div":
        out = _div(eqn, a, b, mk, found)
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
            found.append(_finding(name, "forward", "overflow_low_precision", "low",
                                  "a float16 sum can exceed 65504.",
                                  "accumulate in float32 (dtype=jnp.float32)"))
    elif name in ("reduce_max", "reduce_min", "cummax", "cummin", "argmax", "argmin"):
        out = mk((a.lo, a.hi), max_of=a.ident if name == "reduce_max" else None, tag=a.tag)
    elif name in ("dot_general", "conv_general_dilated"):
        n = _contract_size(eqn) if name == "dot_general" else _conv_size(eqn)
        out = mk(iv.scale(AV(*iv.mul(a, b)), n))
        if dt == "float16" and out.hi > 65504.0:
            found.append(_finding(name, "forward", "overflow_low_precision", "low",
                                  "a float16 matmul can exceed 65504 on large inputs.",
                                  "compute this layer in float32 (dtype=jnp.float32) or keep "
                                  "its inputs normalised", nonfinite=False))
    else:
        out = _unary(eqn, name, dt, ins, mk, found)
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


def _overflow_sq(name: str, dt: str) -> dict:
    return _finding(name, "forward", "overflow_low_precision", "high",
                    f"a square in {dt} overflows above |x| = 256 (65504 is the largest float16).",
                    "compute it in float32 (dtype=jnp.float32 for the layer)")


def _div(eqn, a: AV, b: AV, mk, found) -> AV:
    if b.can_be(0):
        what = {
            "norm": ("x / ||x|| of a zero vector is 0/0.",
                     "stablejax.safe_normalize (layer stablejax.nn.L2Normalize), or "
                     "x / (norm + eps)"),
            "std": ("division by a std that is 0 on a constant row.",
                    "stablejax.safe_std plus an epsilon: x / (safe_std(x) + eps)"),
            "masksum": ("a mean over a mask that can be empty divides by 0.",
                        "divide by jnp.maximum(mask.sum(), 1)"),
            "sumexp": ("the denominator can be 0.", "jax.nn.softmax"),
        }.get(b.tag, ("the divisor can be 0.", "stablejax.safe_div(a, b), or a / (b + eps) "
                      "for a positive b; " + HARDEN))
        found.append(_finding("div", "forward", "forward_singularity", "high", what[0], what[1]))
    elif b.z:
        found.append(_finding("div", "forward", "forward_singularity", "low",
                              "the divisor can underflow to 0 for extreme inputs.",
                              "stablejax.safe_div(a, b) or a larger epsilon; " + HARDEN))
    if a.tag == "rawexp" and b.tag == "sumexp":
        found.append(_finding("div", "forward", "loss_nan", "high",
                              "softmax written as exp(x) / sum(exp(x)): exp overflows for "
                              "logits above 88 (float32), giving Inf / Inf = NaN.",
                              "jax.nn.softmax (it subtracts the max)"))
        return mk((0.0, 1.0), z=True, one=True, tag="prob")
    if b.lo > 0 and a.lo >= 0 and a.peak is not None and a.hi <= 1.0:
        return mk((0.0, 1.0), z=True, one=True, tag="prob")
    tag = a.tag if (b.lo == b.hi and b.lo > 0) else None
    return mk(iv.div(a, b), z=a.z or (b.hi == INF and a.lo > 0), tag=tag)


def _unary(eqn, name, dt, ins, mk, found) -> AV:
    a = ins[0]
    if name == "exp" or name == "exp2" or name == "expm1":
        x = a if name != "exp2" else a.replace(lo=a.lo * math.log(2), hi=a.hi * math.log(2))
        lo, hi = iv.exp(x)
        if name == "expm1":
            lo, hi = lo - 1.0, hi - 1.0
        limit = _EXP_MAX.get(dt, 88.7)
        if x.hi > limit:
            sev = "high" if dt == "float16" else "low"
            cat = "overflow_low_precision" if dt in ("float16", "bfloat16") else (
                "forward_singularity")
            found.append(_finding(name, "forward", cat, sev,
                                  f"exp overflows {dt} for inputs above {limit:.1f}.",
                                  "subtract the max first (jax.nn.softmax, jax.nn.logsumexp), "
                                  "or compute in float32", nonfinite=dt == "float16"))
        tag = None if a.peak is not None else "rawexp"
        return mk((lo, hi), z=x.lo < -87 and name != "expm1", one=a.peak is not None,
                  peak=math.exp(a.peak) if a.peak is not None else None, tag=tag)
    if name in ("log", "log1p"):
        x = a if name == "log" else a.replace(lo=a.lo + 1.0, hi=a.hi + 1.0, z=False)
        if x.lo < 0:
            found.append(_finding(name, "forward", "forward_singularity", "high",
                                  f"{name} is NaN for negative inputs and the input can be "
                                  "negative.", "stablejax.safe_log(x) on a positive x, or "
                                  "jnp.log(jnp.maximum(x, eps)); " + HARDEN))
        elif x.lo == 0:
            prob = a.tag == "prob" or a.hi <= 1.0
            found.append(_finding(
                name, "forward", "loss_nan" if prob else "forward_singularity", "high",
                f"{name}(0) = -Inf and the input can be 0.",
                "a log-space loss (jax.nn.log_softmax, optax.softmax_cross_entropy, "
                "jax.nn.log_sigmoid)" if prob else "stablejax.safe_log(x); " + HARDEN))
        elif x.z:
            prob = a.tag == "prob"
            found.append(_finding(
                name, "forward", "loss_nan" if prob else "forward_singularity",
                "high" if prob else "low",
                "cross-entropy written as log(softmax) or log(sigmoid): the probability "
                "underflows to 0 for confident logits, log(0) = -Inf." if prob else
                f"the input of {name} can underflow to 0 for extreme values.",
                "a log-space loss (jax.nn.log_softmax, optax.softmax_cross_entropy, "
                "optax.sigmoid_binary_cross_entropy)" if prob else "stablejax.safe_log(x)"))
        return mk(iv.log(x))
    if name in ("sqrt", "rsqrt", "cbrt"):
        return _sqrt(name, a, mk, found)
    if name == "pow":
        return _pow(ins, mk, found)
    if name in ("acos", "asin", "atanh"):
        if a.lo < -1 or a.hi > 1:
            found.append(_finding(name, "forward", "forward_singularity", "high",
                                  f"{name} is NaN outside [-1, 1] and its input can leave it.",
                                  "clip the input to [-1 + eps, 1 - eps]; " + HARDEN))
        elif a.can_be(1) or a.can_be(-1):
            found.append(_finding(name, "backward", "derivative_singularity", "high",
                                  f"the derivative of {name} is infinite at +-1 and the input "
                                  "can reach it.", "clip the input to [-1 + eps, 1 - eps]"))
        return mk((-INF, INF) if name == "atanh" else (-math.pi, math.pi))
    if name == "atan2":
        b = ins[1]
        if a.can_be(0) and b.can_be(0):
            found.append(_finding(name, "backward", "derivative_singularity", "high",
                                  "the derivative of atan2(y, x) is 0/0 at y = x = 0.",
                                  "add an epsilon to x, or mask the origin on both branches"))
        return mk((-math.pi, math.pi))
    if name == "cholesky":
        found.append(_finding(name, "forward", "forward_singularity", "high",
                              "Cholesky of a matrix that can be singular or indefinite is NaN.",
                              "add jitter: cholesky(A + eps * I)"))
        return mk((-INF, INF))
    if name == "eigh":
        found.append(_finding(name, "backward", "derivative_singularity", "high",
                              "the derivative of eigh divides by eigenvalue gaps: Inf/NaN at "
                              "repeated eigenvalues.", "avoid differentiating through eigh of "
                              "degenerate matrices, or add a small random perturbation"))
        return mk((-INF, INF))
    if name == "logistic":
        return mk((iv.POS, 1.0 - 2.0**-53), z=True, one=True, tag="prob")
    if name in ("tanh", "erf", "sin", "cos"):
        return mk((-1.0, 1.0))
    if name in ("atan",):
        return mk((-math.pi / 2, math.pi / 2))
    if name in ("floor", "ceil", "round", "nextafter", "clamp"):
        if name == "clamp":
            lo_b, x, hi_b = ins
            return mk((max(x.lo, lo_b.lo), min(x.hi, hi_b.hi)))
        return mk((a.lo - 1, a.hi + 1))
    if name == "erf_inv":
        if a.can_be(1) or a.can_be(-1):
            found.append(_finding(name, "forward", "forward_singularity", "low",
                                  "erf_inv is infinite at +-1.", "clip the input"))
        return mk((-INF, INF))
    return iv.top(np.dtype(eqn.outvars[0].aval.dtype) if eqn.outvars else None).replace(
        taint=frozenset().union(*(x.taint for x in ins)) if ins else frozenset())


def _sqrt(name, a: AV, mk, found) -> AV:
    neg_why = f"{name} is NaN for negative inputs and the input can be negative."
    if a.lo < 0:
        sugg = ("clamp the variance: jnp.maximum(var, 0) + eps" if a.tag == "diff" else
                f"stablejax.safe_{name}(x) of a non-negative x, or jnp.{name}(jnp.maximum(x, 0));"
                f" {HARDEN}")
        found.append(_finding(name, "forward", "forward_singularity", "high", neg_why, sugg))
    elif a.can_be(0) and name == "rsqrt":
        found.append(_finding(name, "forward", "forward_singularity", "high",
                              "rsqrt(0) = Inf and the input can be 0.",
                              "rsqrt(x + eps), or stablejax.safe_rsqrt; " + HARDEN))
    elif a.can_be(0) and name == "sqrt":
        why, sugg = {
            "sumsq": ("the derivative of a norm sqrt(sum(x**2)) is 0/0 at the zero vector.",
                      "stablejax.safe_norm / stablejax.safe_normalize (layer "
                      "stablejax.nn.L2Normalize), or optax.safe_norm"),
            "var": ("the derivative of a std (or RMSE) sqrt(var) is Inf on a constant row "
                    "(var = 0).", "stablejax.safe_std (layer stablejax.nn.StdPool), or "
                    "stablejax.losses.rmse for an RMSE"),
            "sq_diff": ("sqrt((a - b) ** 2) has an infinite derivative where a == b.",
                        "jnp.abs(a - b), or stablejax.losses.mae"),
            "sq": ("sqrt(x ** 2) has an infinite derivative at x = 0.", "jnp.abs(x)"),
        }.get(a.tag, ("the derivative of sqrt is Inf at 0 and the input can be 0.",
                      "stablejax.safe_sqrt(x); " + HARDEN))
        found.append(_finding(name, "backward", "derivative_singularity", "high", why, sugg,
                              nonfinite=False))
    elif a.z and a.lo < 1e-30:
        found.append(_finding(name, "backward", "derivative_singularity", "low",
                              f"the input of {name} can underflow to 0 for extreme values.",
                              f"stablejax.safe_{name}(x)", nonfinite=False))
    lo, hi = iv.sqrt(a)
    tag = {"sumsq": "norm", "var": "std"}.get(a.tag)
    if name == "rsqrt":
        lo, hi = iv.recip(AV(lo, hi))
        tag = None
    elif name == "cbrt":
        lo, hi = -INF, INF
    return mk((lo, hi), tag=tag, z=a.z)


def _pow(ins, mk, found) -> AV:
    x, y = ins
    const_y = y.lo == y.hi and not y.empty
    if const_y and float(y.lo).is_integer():
        return mk(iv.ipow(x, int(y.lo)))
    if x.lo < 0:
        found.append(_finding("pow", "forward", "forward_singularity", "high",
                              "x ** y is NaN for a negative x and a non-integer y.",
                              "jnp.abs(x) ** y or clamp x at 0; " + HARDEN))
    elif x.can_be(0):
        if const_y and y.lo < 0:
            found.append(_finding("pow", "forward", "forward_singularity", "high",
                                  f"x ** {y.lo:g} is Inf at x = 0 and x can be 0.",
                                  "add an epsilon to x; " + HARDEN))
        elif not const_y or y.lo < 1:
            found.append(_finding("pow", "backward", "derivative_singularity", "high",
                                  "the derivative of x ** y is infinite (or NaN) at x = 0 for "
                                  "y < 1.", "stablejax.safe_sqrt for y = 0.5, or add an "
                                  "epsilon to x; " + HARDEN, nonfinite=False))
    if x.lo >= 0 and const_y:
        if y.lo > 0:
            return mk(iv.monotone(lambda t: t ** y.lo, x, 0.0, INF))
        return mk((0.0, INF))
    return mk((-INF, INF))
