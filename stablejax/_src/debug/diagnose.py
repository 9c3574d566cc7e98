"""Why a NaN/Inf was born, and the concrete fix: category and suggestion.

Precedence, as documented on :func:`stablejax.debug.locate`: values that came
in (or invalid integer inputs) are ``bad_input``; then a float16/bfloat16
overflow that float32 would hold is ``overflow_low_precision``; then an op at
the edge of its domain is a singularity (``loss_nan`` when it sits in the loss
rather than a model layer, else ``forward_singularity`` or
``derivative_singularity`` by phase); an overflow of finite values is
``grad_explosion``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from stablejax._src.debug.history import History
from stablejax._src.debug.values import Origin

_LOSS_NAME = re.compile(
    r"loss|mae|mse|rmse|cross_?entropy|xent|nll|criterion|objective|likelihood|huber|bce"
    r"|kl_?div|kld|dice|hinge|focal|contrastive|triplet|info_?nce|elbo|perplexity",
    re.IGNORECASE,
)
_LOSS_FILES = ("optax/losses", "optax/_src/loss", "stablejax/losses", "stablejax/_src/losses")
_LOG_OPS = frozenset({"log", "log1p"})
_ROOT_OPS = frozenset({"sqrt", "rsqrt", "cbrt"})
_OVERFLOW_OPS = frozenset(
    {
        "exp",
        "exp2",
        "expm1",
        "mul",
        "add",
        "sub",
        "dot_general",
        "reduce_sum",
        "square",
        "integer_pow",
        "pow",
        "cumsum",
        "conv_general_dilated",
        "convert_element_type",
        "reduce_precision",
        "sinh",
        "cosh",
        "add_any",
        "reduce_max",
        "reduce_min",
        "max",
        "min",
    }
)


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """Category, one-sentence cause and the fix."""

    category: str
    why: str
    suggestion: str


def in_loss(
    origin: Origin,
    module: str | None,
    model_scopes_seen: bool,
    func: str | None,
    context: str = "",
) -> bool:
    """Whether the culprit sits in the loss rather than in a model layer.

    Code outside every module of a model that has modules is the loss. Without
    modules, a function named like a loss (``loss``, ``mae``, ``nll``, ...) often
    holds the whole model too: there the culprit is the loss's only when the
    construct at the line is one a loss is made of (see :func:`_loss_construct`).
    """
    if origin.phase == "update":
        return False
    if any(part in f.file for f in origin.frames[:16] for part in _LOSS_FILES):
        return True
    if module is None and model_scopes_seen:
        return True
    named = bool(func and _LOSS_NAME.search(func))
    return named and _loss_construct(origin.forward_op or origin.primitive, origin, context)


# A log's argument that reads as a probability: ``exp(``, a sigmoid, ``1 - p``, or a
# variable named ``p`` (not any word that ends in p, such as ``jnp``).
_PROB_TEXT = re.compile(r"sigmoid|softmax|logistic|prob|exp2?\(|gather|1-|(?<![\w.])p\b")


def _loss_construct(op: str | None, origin: Origin, context: str) -> bool:
    """Whether the op at the culprit line is a loss's own: log of a probability,
    the sqrt of a square (MAE/RMSE), a division by a count or a sum of weights.

    A log or sqrt of a value that came straight in (a parameter out of its
    domain) or of a model's activations is not.
    """
    text = context.replace(" ", "")
    if op in _LOG_OPS:
        if _producer(origin, 0) is None and "sigmoid" not in text and "softmax" not in text:
            return False
        return bool(_PROB_TEXT.search(text))
    if op in _ROOT_OPS:
        return bool(re.search(r"\*\*2|square|abs\(|integer_pow|\(pred|-y\)|err", text))
    if op == "div":
        return bool(re.search(r"sum\(|mean\(|count|size|len\(|\.shape|reduce_sum", text))
    return True


def _producer(origin: Origin, i: int) -> str | None:
    producers = origin.extra.get("producers") or []
    return producers[i] if i < len(producers) else None


# Ops that round: an exact 0 they make in float16/bfloat16 is often a value float32 holds.
_ROUNDING_OPS = frozenset(
    {"sub", "add", "add_any", "logistic", "exp", "exp2", "mul", "div", "convert_element_type",
     "integer_pow", "square", "dot_general", "reduce_sum", "tanh", "erf", "log_softmax"}
)


def _rounded_to_zero(origin: Origin, dtype: str | None) -> bool:
    """A singular op in float16/bfloat16 whose 0 operand was made by an op that rounds.

    ``log(1 - sigmoid(x))`` in bfloat16 at x = 8 (``sigmoid`` rounds to 1), Adam's
    ``sqrt(nu) + eps`` with ``eps=1e-8`` in float16 (eps rounds to 0): the
    singularity is float16/bfloat16's, float32 would not hit it.
    """
    if dtype is None:
        return False
    p, ins = origin.primitive, origin.inputs
    if p == "div" and len(ins) == 2 and ins[1].zeros:
        return _producer(origin, 1) in _ROUNDING_OPS
    if p in _LOG_OPS | {"rsqrt"} and ins and ins[0].zeros:
        return _producer(origin, 0) in _ROUNDING_OPS
    if p == "log1p" and ins and ins[0].min is not None and ins[0].min <= -1:
        return _producer(origin, 0) in _ROUNDING_OPS
    return False


def _singularity(origin: Origin) -> str | None:
    """A short description of the domain edge the op sits on, or ``None``."""
    p = origin.primitive
    ins = origin.inputs
    if p == "div" and len(ins) == 2:
        num, den = ins
        if den.zeros:
            if num.zeros and origin.kind == "nan":
                return "0/0: the divisor and the numerator are both 0"
            return f"division by zero ({den.zeros} zero divisor entries)"
        return None
    if p in _LOG_OPS and ins:
        lim = -1.0 if p == "log1p" else 0.0
        if ins[0].zeros and p == "log":
            return "log(0)"
        if ins[0].min is not None and ins[0].min < lim + (0 if p == "log" else 1e-30):
            return f"{p} of a negative value (min {ins[0].min:.3g})"
        if p == "log1p" and ins[0].min is not None and ins[0].min <= -1:
            return "log1p(-1)"
        return None
    if p in _ROOT_OPS and ins:
        if ins[0].negatives:
            return f"{p} of a negative value (min {ins[0].min:.3g})"
        if p == "rsqrt" and ins[0].zeros:
            return "rsqrt(0)"
        return None
    if p in ("acos", "asin", "atanh") and ins:
        return f"{p} outside [-1, 1] (range {ins[0].min:.3g}..{ins[0].max:.3g})"
    if p == "pow" and len(ins) == 2 and ins[0].negatives:
        return f"pow of a negative base (min {ins[0].min:.3g}) with a non-integer exponent"
    if p == "pow" and ins and ins[0].zeros:
        return "pow at base 0 with a negative exponent"
    if p == "integer_pow" and ins and ins[0].zeros and origin.params.get("y", 1) < 0:
        return "negative integer power of 0"
    if p in ("lgamma", "digamma") and ins and (ins[0].zeros or ins[0].negatives):
        return f"{p} at a non-positive value"
    return None


def _huge(origin: Origin) -> bool:
    big = [abs(v) for s in origin.inputs for v in (s.min, s.max) if v is not None]
    return bool(big) and max(big) > 1e18


def _frame_functions(origin: Origin) -> list[str]:
    return [f.function for f in origin.frames[:24]]


def _layer_fix(origin: Origin, line_text: str) -> str | None:
    """The stablejax op or layer that replaces the construct at the culprit line."""
    text = line_text.replace(" ", "")
    op = origin.forward_op or origin.primitive
    if "where(" in text and op in ("sqrt", "log", "div", "rsqrt", "pow", "log1p"):
        return (
            "the `jnp.where` double-branch trap: the untaken branch is still differentiated. "
            "Make its input safe first, `x_safe = jnp.where(mask, x, 1.0)`, then "
            f"`jnp.where(mask, jnp.{op}(x_safe), 0.0)`, or use stablejax.safe_{op}"
        )
    funcs_set = set(_frame_functions(origin))
    if "std(" in text or "_std" in funcs_set:
        return (
            "stablejax.safe_std(h, axis=...) or the layer stablejax.nn.StdPool "
            "(NNX: stablejax.nnx.StdPool)"
        )
    if "var(" in text or "_var" in funcs_set:
        return "stablejax.safe_var(h, axis=...)"
    if op == "rsqrt" or "rsqrt" in text or "layernorm" in text.lower().replace("_", ""):
        return (
            "stablejax.nn.LayerNorm / stablejax.nn.RMSNorm (NNX: stablejax.nnx.*), or "
            "stablejax.safe_rsqrt on a variance clamped at 0"
        )
    if "normalize" in text or ("norm(" in text and (op == "div" or "/" in text)):
        return (
            "stablejax.safe_normalize(x, axis=-1) (layer: stablejax.nn.L2Normalize / "
            "stablejax.nnx.L2Normalize)"
        )
    if "norm(" in text or "norm" in funcs_set:
        return "stablejax.safe_norm(x, axis=-1)"
    return None


def diagnose(
    origin: Origin,
    *,
    module: str | None,
    func: str | None,
    line_text: str,
    model_scopes_seen: bool,
    history: History | None,
    input_path: str | None,
    rows: Sequence[int] | None,
    int_input: dict[str, Any] | None,
) -> Diagnosis:
    """Category, cause and fix for one origin. See the module docstring for precedence."""
    if origin.primitive is None:
        rows_s = _rows_str(rows)
        return Diagnosis(
            "bad_input",
            f"argument {input_path} already holds {origin.kind.upper()} values{rows_s}",
            f"clean {input_path}{rows_s} before the step: drop or repair those examples in the "
            "data pipeline (e.g. `x = jnp.nan_to_num(x)` or keep rows where "
            "`jnp.isfinite(x).all(axis)`)"
            f"; if the values are intentional padding, mask them out before any arithmetic.",
        )
    if int_input is not None:
        size, top = int_input["size"], int_input["max"]
        return Diagnosis(
            "bad_input",
            f"integer input {input_path} has values up to {top} but the gathered axis has "
            f"{size} entries, and jax fills out-of-range gathers with NaN",
            f"fix the indices in {input_path}{_rows_str(rows)}: every value must be in "
            f"[0, {size}) (check the vocabulary / number of classes), or mask those rows.",
        )
    low = origin.extra.get("float32_finite")
    dtype = next((s.dtype for s in origin.outputs if s.dtype in ("float16", "bfloat16")), None)
    dtype = dtype or next(
        (s.dtype for s in origin.inputs if s.dtype in ("float16", "bfloat16")), None
    )
    op = origin.forward_op or origin.primitive
    if low and dtype is not None:
        return Diagnosis(
            "overflow_low_precision",
            f"{origin.primitive} overflowed {dtype} (max {_dtype_max(dtype):.3g}); "
            "float32 holds it",
            "compute this op in float32: cast its operands with `.astype(jnp.float32)` at the "
            "line, or give the layer `dtype=jnp.float32` (keep param_dtype); with float16 "
            "also use dynamic loss scaling.",
        )
    sing = _singularity(origin)
    fix = _layer_fix(origin, line_text)
    loss = in_loss(origin, module, model_scopes_seen, func, _context(origin, line_text))
    if sing is not None and origin.phase != "backward" and _rounded_to_zero(origin, dtype):
        return Diagnosis(
            "overflow_low_precision",
            f"{origin.primitive} hit {sing}, a 0 that {dtype} rounding made: "
            f"{_producer(origin, 1 if origin.primitive == 'div' else 0)} rounded a small "
            "value to 0 (or 1 - x to 0), which float32 would hold",
            _precision_fix(origin, dtype, _context(origin, line_text)),
        )
    if sing is not None:
        backward = origin.phase == "backward"
        if backward:
            why = f"the forward value is finite but the derivative of {op} is not: {sing}"
        else:
            why = f"{origin.primitive} at the edge of its domain: {sing}"
        if loss:
            return Diagnosis("loss_nan", why, _loss_fix(op, _context(origin, line_text), fix))
        if origin.phase == "update":
            return Diagnosis(
                "forward_singularity",
                f"the optimizer update hit {sing}",
                "give the optimizer a positive eps (e.g. optax.adam(lr, eps=1e-8)) and check its "
                "schedule; stablejax.optim.stable_adamw, or stablejax.optim.guard around the "
                "optimizer, keeps such a step from reaching the parameters",
            )
        category = "derivative_singularity" if backward else "forward_singularity"
        if (
            not backward
            and origin.primitive in _LOG_OPS | _ROOT_OPS
            and _producer(origin, 0) is None
            and origin.inputs[0].negatives
        ):
            why += ", of a value that came in as it is (a parameter or input out of its domain)"
            fix = fix or (
                f"keep that value in the domain of {op}: parametrize it positive "
                "(`var = jax.nn.softplus(raw)`, or learn `log_var` and use `jnp.exp(log_var)`) "
                f"or clamp it (`jnp.maximum(var, 1e-6)`) before the call; {_op_fix(op, origin)}"
            )
        return Diagnosis(category, why, fix or _op_fix(op, origin))
    if (
        history is not None
        and history.growing
        or _huge(origin)
        or (origin.primitive in _OVERFLOW_OPS and origin.phase in ("backward", "update"))
    ):
        return Diagnosis(
            "grad_explosion",
            f"{origin.primitive} overflowed: values grew until they no longer fit"
            + (" (loss/grad norm grew step over step)" if history and history.growing else ""),
            _explosion_fix(history),
        )
    if origin.primitive in ("exp", "exp2", "expm1", "sinh", "cosh"):
        return Diagnosis(
            "loss_nan" if loss else "forward_singularity",
            f"{origin.primitive} overflowed its input (max {origin.inputs[0].max:.3g})",
            "subtract the max before exponentiating: jax.nn.softmax / jax.nn.log_softmax / "
            "jax.nn.logsumexp instead of a hand-written exp",
        )
    if any(i.nonfinite for i in origin.inputs):
        why = (
            f"{origin.primitive} turned infinities written in the program (e.g. a -inf mask) "
            "into NaN: inf - inf or 0 * inf, as in a softmax over a fully masked row"
        )
        fix = (
            "mask with a large finite value (jnp.finfo(x.dtype).min) instead of -inf, or pass "
            "where=mask to jax.nn.softmax and zero the fully masked rows"
        )
        return Diagnosis("loss_nan" if loss else "forward_singularity", why, fix)
    why = f"{origin.primitive} produced {origin.kind} from finite inputs"
    if loss:
        return Diagnosis("loss_nan", why, _loss_fix(op, _context(origin, line_text), fix))
    category = "derivative_singularity" if origin.phase == "backward" else "forward_singularity"
    return Diagnosis(category, why, fix or _op_fix(op, origin))


def _context(origin: Origin, line_text: str) -> str:
    """The culprit line plus the names of the ops that made its operands."""
    made_by = " ".join(p for p in origin.extra.get("producers", []) if p)
    return f"{line_text} {made_by.replace('logistic', 'sigmoid')}"


def _rows_str(rows: Sequence[int] | None) -> str:
    if not rows:
        return ""
    shown = ", ".join(str(r) for r in list(rows)[:8])
    return f" (rows {shown}{', ...' if len(rows) > 8 else ''})"


def _dtype_max(dtype: str) -> float:
    return {"float16": 65504.0, "bfloat16": 3.39e38}.get(dtype, 3.4e38)


def _op_fix(op: str | None, origin: Origin) -> str:
    if op in ("sqrt", "cbrt"):
        return "stablejax.safe_sqrt(x) (finite gradient at 0, exact elsewhere)"
    if op == "rsqrt":
        return "stablejax.safe_rsqrt(x) or stablejax.nn.LayerNorm / stablejax.nn.RMSNorm"
    if op in _LOG_OPS:
        return "stablejax.safe_log(x), or work in log space (jax.nn.log_softmax)"
    if op == "div":
        return "stablejax.safe_div(a, b) (or stablejax.safe_normalize when b is a norm)"
    if op in ("acos", "asin", "atanh"):
        return "clip the argument to [-1 + 1e-6, 1 - 1e-6] (jnp.clip) before the call"
    if op == "pow" and origin.inputs and origin.inputs[0].negatives:
        return "take the power of jnp.abs(x) (or clamp x at 0), e.g. stablejax.safe_sqrt for ** 0.5"
    if op in ("pow", "integer_pow"):
        return "keep the base away from 0 (jnp.where(x == 0, 1.0, x)) before a negative power"
    return f"guard the operands of {op} (see the operand ranges below)"


def _loss_fix(op: str | None, line_text: str, fix: str | None) -> str:
    text = line_text.replace(" ", "")
    if op == "sqrt" and ("**2" in text or "square(" in text or "abs(" in text):
        return (
            "write MAE as jnp.abs(pred - y) or use stablejax.losses.mae(pred, y) "
            "(stablejax.losses.rmse for RMSE): sqrt(x**2) has a NaN gradient at x = 0"
        )
    if op in _LOG_OPS and "sigmoid" in text:
        return (
            "use jax.nn.log_sigmoid(x) (and log_sigmoid(-x) for 1 - sigmoid) or "
            "optax.sigmoid_binary_cross_entropy(logits, labels) instead of log(sigmoid(x))"
        )
    if op in _LOG_OPS:
        return (
            "compute the loss from logits in log space: optax.softmax_cross_entropy / "
            "jax.nn.log_softmax, or stablejax.safe_log(p) when you only have probabilities"
        )
    if op == "sqrt":
        return "stablejax.losses.rmse / stablejax.safe_sqrt for the square root in the loss"
    return fix or "stablejax.safe_div / safe_log / safe_sqrt for the op in the loss"


def _precision_fix(origin: Origin, dtype: str, context: str) -> str:
    text = context.replace(" ", "")
    if origin.phase == "update":
        return (
            f"keep the optimizer's state and update in float32: float32 master parameters "
            f"(cast to {dtype} only for the forward), or an eps {dtype} holds "
            "(float16: eps >= 1e-4, its smallest normal is 6.1e-5)"
        )
    if origin.primitive in _LOG_OPS and ("sigmoid" in text or "1-" in text):
        return (
            "for probabilities from a sigmoid use jax.nn.log_sigmoid(x) and "
            "jax.nn.log_sigmoid(-x) for log(1 - sigmoid(x)) "
            "(or optax.sigmoid_binary_cross_entropy(logits, labels)), and compute the loss "
            "in float32: `logits.astype(jnp.float32)`"
        )
    return (
        "compute this op and the one that made its operand in float32: cast with "
        "`.astype(jnp.float32)` at the line (or give the layer dtype=jnp.float32)"
    )


def _explosion_fix(history: History | None) -> str:
    clip = history.clip_value() if history is not None else None
    clip_s = f"stablejax.optim.clip_by_global_norm({clip if clip else 1.0})"
    src = " (90th percentile of the healthy grad norms in history)" if clip else ""
    return (
        f"clip gradients with {clip_s}{src} (Inf-safe: optax's turns an Inf gradient into "
        "NaN), lower the learning rate (e.g. 3-10x) and add "
        "warm-up (optax.warmup_cosine_decay_schedule), and wrap the optimizer in "
        "stablejax.optim.guard to skip non-finite steps"
    )
