"""``lint``'s rules of the singular primitives: ``div``, the unary functions, ``sqrt``, ``pow``.

Each rule returns the abstract output of one equation and appends its findings
(dicts with ``primitive``, ``phase``, ``category``, ``severity``, ``why``,
``suggestion``) through ``found``. Severity is ``'high'`` when the singular
point is inside the operand's interval and ``'low'`` when only rounding of
extreme values reaches it. The dispatcher is :mod:`stablejax._src.debug.lint_rules`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stablejax._src.debug import intervals as iv
from stablejax._src.debug.intervals import AV, INF

HARDEN = "or wrap the function with stablejax.harden(fn)"
_EXP_MAX = {"float16": math.log(65504.0), "bfloat16": 88.7, "float32": 88.7, "float64": 709.0}


def dtype_name(v: Any) -> str:
    return str(getattr(getattr(v, "aval", None), "dtype", ""))


def finding(prim, phase, category, severity, why, suggestion, nonfinite=True) -> dict:
    return dict(primitive=prim, phase=phase, category=category, severity=severity, why=why,
                suggestion=suggestion, nonfinite=nonfinite)

def overflow_sq(name: str, dt: str) -> dict:
    return finding(name, "forward", "overflow_low_precision", "high",
                    f"a square in {dt} overflows above |x| = 256 (65504 is the largest float16).",
                    "compute it in float32 (dtype=jnp.float32 for the layer)")

def div_rule(eqn, a: AV, b: AV, mk, found) -> AV:
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
        found.append(finding("div", "forward", "forward_singularity", "high", what[0], what[1]))
    elif b.z:
        found.append(finding("div", "forward", "forward_singularity", "low",
                              "the divisor can underflow to 0 for extreme inputs.",
                              "stablejax.safe_div(a, b) or a larger epsilon; " + HARDEN))
    if a.tag == "rawexp" and b.tag == "sumexp":
        found.append(finding("div", "forward", "loss_nan", "high",
                              "softmax written as exp(x) / sum(exp(x)): exp overflows for "
                              "logits above 88 (float32), giving Inf / Inf = NaN.",
                              "jax.nn.softmax (it subtracts the max)"))
        return mk((0.0, 1.0), z=True, one=True, tag="prob")
    if b.lo > 0 and a.lo >= 0 and a.peak is not None and a.hi <= 1.0:
        return mk((0.0, 1.0), z=True, one=True, tag="prob")
    tag = a.tag if (b.lo == b.hi and b.lo > 0) else None
    return mk(iv.div(a, b), z=a.z or (b.hi == INF and a.lo > 0), tag=tag)


def unary_rule(eqn, name, dt, ins, mk, found) -> AV:
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
            found.append(finding(name, "forward", cat, sev,
                                  f"exp overflows {dt} for inputs above {limit:.1f}.",
                                  "subtract the max first (jax.nn.softmax, jax.nn.logsumexp), "
                                  "or compute in float32", nonfinite=dt == "float16"))
        tag = None if a.peak is not None else "rawexp"
        return mk((lo, hi), z=x.lo < -87 and name != "expm1", one=a.peak is not None,
                  peak=math.exp(a.peak) if a.peak is not None else None, tag=tag)
    if name in ("log", "log1p"):
        x = a if name == "log" else a.replace(lo=a.lo + 1.0, hi=a.hi + 1.0, z=False)
        if x.lo < 0:
            found.append(finding(name, "forward", "forward_singularity", "high",
                                  f"{name} is NaN for negative inputs and the input can be "
                                  "negative.", "stablejax.safe_log(x) on a positive x, or "
                                  "jnp.log(jnp.maximum(x, eps)); " + HARDEN))
        elif x.lo == 0:
            prob = a.tag == "prob" or a.hi <= 1.0
            found.append(finding(
                name, "forward", "loss_nan" if prob else "forward_singularity", "high",
                f"{name}(0) = -Inf and the input can be 0.",
                "a log-space loss (jax.nn.log_softmax, optax.softmax_cross_entropy, "
                "jax.nn.log_sigmoid)" if prob else "stablejax.safe_log(x); " + HARDEN))
        elif x.z:
            prob = a.tag == "prob"
            found.append(finding(
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
            found.append(finding(name, "forward", "forward_singularity", "high",
                                  f"{name} is NaN outside [-1, 1] and its input can leave it.",
                                  "clip the input to [-1 + eps, 1 - eps]; " + HARDEN))
        elif a.can_be(1) or a.can_be(-1):
            found.append(finding(name, "backward", "derivative_singularity", "high",
                                  f"the derivative of {name} is infinite at +-1 and the input "
                                  "can reach it.", "clip the input to [-1 + eps, 1 - eps]"))
        return mk((-INF, INF) if name == "atanh" else (-math.pi, math.pi))
    if name == "acosh":
        if a.lo < 1:
            found.append(finding(name, "forward", "forward_singularity", "high",
                                  "acosh is NaN below 1 and its input can be below 1 (or round "
                                  "there, as 1 + 2 d / den does at d = 0).",
                                  "acosh(jnp.maximum(x, 1 + eps)); " + HARDEN))
        elif a.can_be(1):
            found.append(finding(name, "backward", "derivative_singularity", "high",
                                  "the derivative of acosh is infinite at 1 (a distance of a "
                                  "point to itself) and the input can reach it.",
                                  "acosh(jnp.maximum(x, 1 + eps)); " + HARDEN))
        return mk((0.0, INF))
    if name == "atan2":
        b = ins[1]
        if a.can_be(0) and b.can_be(0):
            found.append(finding(name, "backward", "derivative_singularity", "high",
                                  "the derivative of atan2(y, x) is 0/0 at y = x = 0.",
                                  "add an epsilon to x, or mask the origin on both branches"))
        return mk((-math.pi, math.pi))
    if name == "cholesky":
        found.append(finding(name, "forward", "forward_singularity", "high",
                              "Cholesky of a matrix that can be singular or indefinite is NaN.",
                              "add jitter: cholesky(A + eps * I)"))
        return mk((-INF, INF))
    if name == "eigh":
        found.append(finding(name, "backward", "derivative_singularity", "high",
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
            found.append(finding(name, "forward", "forward_singularity", "low",
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
        found.append(finding(name, "forward", "forward_singularity", "high", neg_why, sugg))
    elif a.can_be(0) and name == "rsqrt":
        found.append(finding(name, "forward", "forward_singularity", "high",
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
        found.append(finding(name, "backward", "derivative_singularity", "high", why, sugg,
                              nonfinite=False))
    elif a.z and a.lo < 1e-30:
        found.append(finding(name, "backward", "derivative_singularity", "low",
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
        found.append(finding("pow", "forward", "forward_singularity", "high",
                              "x ** y is NaN for a negative x and a non-integer y.",
                              "jnp.abs(x) ** y or clamp x at 0; " + HARDEN))
    elif x.can_be(0):
        if const_y and y.lo < 0:
            found.append(finding("pow", "forward", "forward_singularity", "high",
                                  f"x ** {y.lo:g} is Inf at x = 0 and x can be 0.",
                                  "add an epsilon to x; " + HARDEN))
        elif not const_y or y.lo < 1:
            found.append(finding("pow", "backward", "derivative_singularity", "high",
                                  "the derivative of x ** y is infinite (or NaN) at x = 0 for "
                                  "y < 1.", "stablejax.safe_sqrt for y = 0.5, or add an "
                                  "epsilon to x; " + HARDEN, nonfinite=False))
    if x.lo >= 0 and const_y:
        if y.lo > 0:
            return mk(iv.monotone(lambda t: t ** y.lo, x, 0.0, INF))
        return mk((0.0, INF))
    return mk((-INF, INF))
