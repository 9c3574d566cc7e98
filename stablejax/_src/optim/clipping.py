"""Global-norm clipping that never manufactures a NaN, and z-score adaptive clipping.

Both transformations compute the gradient's global norm from per-leaf sums of
squares in float32. When they run as the first transformation inside
:func:`stablejax.optim.guard`, they reuse the norm the guard already computed
for its skip decision, so the gradient is read once for both (see
:func:`shared_norm`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from stablejax._src import validation
from stablejax._src.typing import Array, PyTree

_WHERE_CLIP = "stablejax.optim.clip_by_global_norm"
_WHERE_ADAPTIVE = "stablejax.optim.adaptive_clip"


def _acc_dtype(dtype: Any) -> Any:
    """float64 for float64/complex128 leaves (x64 mode), float32 for every other dtype."""
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)):
        return jnp.float64
    return jnp.float32


def leaf_sumsq(leaves: Sequence[Any], isolated: bool = False) -> Array:
    """Returns the sum of squares of each leaf, in float32 (float64 for float64 leaves).

    float16 and bfloat16 leaves are squared in float32, so their norm never
    overflows the gradient's own dtype. A leaf's entry is non-finite iff the
    leaf holds a NaN or Inf, or its sum of squares overflows the accumulation
    dtype (float32: entries beyond about 1.8e19). Non-float leaves (integer or
    ``float0`` gradients) and zero-size leaves contribute 0.

    With ``isolated`` each leaf is squared behind ``lax.optimization_barrier``
    (the same numbers): for a guard whose inner Adam squares the very same
    gradient, XLA would otherwise merge the two ``g * g`` into one array and,
    with two readers (this reduction and Adam's loop), write it to memory: one
    more write and read of every leaf. An inner norm of the same squares is
    answered from these sums instead (:mod:`known_sums`).
    """
    out = []
    for x in leaves:
        x = jnp.asarray(x)
        if isolated and jnp.issubdtype(x.dtype, jnp.floating) and x.size:
            x = lax.optimization_barrier(x)
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            acc = _acc_dtype(x.dtype)
            out.append(jnp.sum(jnp.square(jnp.abs(x).astype(acc))))
        elif jnp.issubdtype(x.dtype, jnp.floating):
            out.append(jnp.sum(jnp.square(x.astype(_acc_dtype(x.dtype)))))
        else:
            out.append(jnp.zeros([], jnp.float32))
    if not out:
        return jnp.zeros([0], jnp.float32)
    return jnp.stack(out)


@dataclasses.dataclass(eq=False)
class Offer:
    """What an enclosing wrapper knows of the gradient its inner chain receives.

    ``leaves`` are the very traced leaves handed to the inner chain; a piece of
    it uses the offer only if the updates it receives are those objects (it is
    the first to see the gradient), so an offer can never give a wrong answer.
    ``taken`` records whether anything used it.
    """

    leaves: tuple[Any, ...]
    norm: Array | None = None  # the global norm; the offerer refuses non-finite ones
    sumsq: Array | None = None  # per-leaf sums of squares, as leaf_sumsq, before psum
    raw: tuple[Any, ...] | None = None  # leaves == raw * factor (a scalar)
    factor: Array | None = None
    taken: bool = False


def unscaled_offer(leaves: Sequence[Any], sumsq: Array, raw: Sequence[Any], factor: Array) -> Offer:
    """The offer of :func:`~stablejax.optim.dynamic_loss_scale`: ``leaves`` are
    ``raw * factor`` and their per-leaf sums of squares are ``sumsq``.

    It takes the sums of squares of the *scaled* gradient ``raw`` for its
    overflow check anyway. A guard or clip inside then takes its norm from
    ``sumsq``, and :func:`~stablejax.optim.overshoot_control` its dot product
    from ``raw``: nothing reduces over the unscaled gradient, so XLA fuses the
    unscaling into the elementwise loops that read it instead of writing it to
    memory for a reduction. The loss scale does not refuse non-finite sums, so
    a clip taking them keeps its non-finite paths.
    """
    return Offer(tuple(leaves), sumsq=sumsq, raw=tuple(raw), factor=factor)


_HINTS = threading.local()


@contextlib.contextmanager
def offering(offer: Offer) -> Iterator[None]:
    """Makes ``offer`` visible to the transformations traced inside the block."""
    stack = getattr(_HINTS, "stack", None)
    if stack is None:
        stack = _HINTS.stack = []
    stack.append(offer)
    try:
        yield
    finally:
        stack.pop()


def shared_norm(leaves: Sequence[Any], norm: Array) -> contextlib.AbstractContextManager[None]:
    """Offers ``norm`` to the clipping transformations traced inside the block.

    A clip reuses the norm only if the updates it receives are *the same traced
    objects* as ``leaves``, that is, if it is the first transformation to see
    the gradient. Anywhere else it computes its own norm, so the hint can never
    give a wrong answer; it only removes a second pass over the gradient. The
    offerer (the guard) refuses every step whose norm is not finite, so a clip
    that takes it builds only its finite path.
    """
    return offering(Offer(tuple(leaves), norm=norm))


def _hint(leaves: Sequence[Any], field: str) -> Offer | None:
    for hint in reversed(getattr(_HINTS, "stack", None) or ()):
        if getattr(hint, field) is None:
            continue
        if len(hint.leaves) == len(leaves) and all(a is b for a, b in zip(hint.leaves, leaves)):
            hint.taken = True
            return hint
    return None


def unscale(raw: Any, factor: Array) -> Array:
    """The unscaled gradient leaf :func:`~stablejax.optim.dynamic_loss_scale`
    hands its inner chain: ``raw`` in float32 times ``factor``."""
    return jnp.asarray(raw).astype(jnp.float32) * factor


def unscaled_view(leaves: Sequence[Any]) -> tuple[tuple[Any, ...], Array] | None:
    """``(raw, factor)`` with ``leaves == raw * factor`` from an enclosing offer
    for these very leaves, or None."""
    hint = _hint(leaves, "raw")
    return None if hint is None else (hint.raw, hint.factor)


def hinted_sumsq(leaves: Sequence[Any], isolated: bool = False) -> Array:
    """:func:`leaf_sumsq` of ``leaves``, taken from an enclosing offer for these
    very leaves when there is one."""
    hint = _hint(leaves, "sumsq")
    return leaf_sumsq(leaves, isolated) if hint is None else hint.sumsq


def global_norm(updates: PyTree, axis_name: str | None = None) -> tuple[Array, bool]:
    """Float32 global norm :math:`\\sqrt{\\sum_i \\|g_i\\|^2}`, summed over ``axis_name``.

    Returns the norm and whether it came from an enclosing guard (see
    :func:`shared_norm`); the guard refuses every step whose norm is not finite.
    """
    leaves = jax.tree.leaves(updates)
    hint = _hint(leaves, "norm")
    if hint is not None:
        return hint.norm, True
    total = jnp.sum(hinted_sumsq(leaves))
    if axis_name is not None:
        total = lax.psum(total, axis_name)
    return jnp.sqrt(total), False


def clip_to(
    updates: PyTree,
    norm: Array,
    threshold: Array,
    axis_name: str | None,
    guarded: bool = False,
) -> PyTree:
    """Rescales ``updates`` to global norm ``threshold`` when ``norm`` exceeds it.

    The finite case is :math:`g \\cdot \\min(1, c/\\|g\\|)`, with the scale 1 when
    :math:`\\|g\\| \\le c` (so zero gradients with :math:`c = 0` stay 0). For a
    non-finite ``norm`` a few scalars are computed under ``lax.cond`` (the
    finite path never pays for them) and the result, chosen per element by
    ``jnp.where`` in the same fused loop, is:

    * overflow (every entry finite, the sum of squares is not): the norm is
      recomputed after dividing by the largest magnitude, then clipped as usual;
    * some entries are :math:`\\pm\\infty` and none NaN: the limit of clipping
      as those entries grow, :math:`c\\,\\mathrm{sign}(g_j)/\\sqrt{k}` on the
      :math:`k` infinite entries and 0 elsewhere, so Inf never becomes NaN;
    * some entry is NaN, or ``threshold`` is Inf: the updates pass through
      unchanged and :func:`stablejax.optim.guard` skips the step.

    With ``guarded=True`` (the norm came from an enclosing guard, which discards
    the result of any non-finite step) only the finite path is built.
    """
    leaves, treedef = jax.tree.flatten(updates)
    floats = [
        x for x in leaves if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) and jnp.size(x) > 0
    ]
    if not floats:
        return updates
    acc = jnp.result_type(norm)  # float32, or float64 for float64 leaves under x64
    norm = jnp.asarray(norm, acc)
    threshold = jnp.asarray(threshold, acc)

    def wide(x):
        # The arithmetic of the clip runs in the norm's dtype (at least float32):
        # in float16 a norm of 94,868 is Inf and c / norm underflows.
        return jnp.promote_types(jnp.asarray(x).dtype, acc)

    scale = jnp.where(norm > threshold, threshold / jnp.where(norm > 0, norm, 1.0), 1.0)
    if guarded:
        # (x / n) * c rather than x * (c / n): XLA materialises the divide once
        # instead of re-deriving the clipped gradient inside every consumer loop,
        # which measured 1.4x vs 2.3x of the plain chain with donated buffers.
        def guarded_one(x):
            if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact):
                return x
            w = wide(x)
            clipped = ((x.astype(w) / norm.astype(w)) * threshold.astype(w)).astype(x.dtype)
            return jnp.where(norm > threshold, clipped, x)

        return jax.tree.map(guarded_one, updates)

    red = (lambda v: lax.psum(v, axis_name)) if axis_name else (lambda v: v)
    redmax = (lambda v: lax.pmax(v, axis_name)) if axis_name else (lambda v: v)

    def slow_scalars(floats):
        n_nan = red(sum(jnp.sum(jnp.isnan(x)).astype(acc) for x in floats))
        n_inf = red(sum(jnp.sum(jnp.isinf(x)).astype(acc) for x in floats))
        big = redmax(jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(acc) for x in floats])))
        big = jnp.where(jnp.isfinite(big) & (big > 0), big, 1.0)
        scaled_sq = red(sum(jnp.sum(jnp.square(jnp.abs(x).astype(acc) / big)) for x in floats))
        return jnp.stack([n_nan, n_inf, big, jnp.sqrt(scaled_sq)]).astype(acc)

    finite = jnp.isfinite(norm)
    operands, rebuild = floats, lambda xs: xs
    view = unscaled_view(leaves)
    if view is not None:
        # Inside dynamic_loss_scale: the branch rebuilds the unscaled gradient
        # from the scaled one, so the cond's operands (which XLA materialises)
        # are buffers that exist anyway.
        raw, factor = view
        operands = [r for r, x in zip(raw, leaves) if any(x is f for f in floats)]
        rebuild = lambda rs: [unscale(r, factor) for r in rs]
    n_nan, n_inf, big, norm_over_big = lax.cond(
        finite,
        lambda f: jnp.array([0.0, 0.0, 1.0, 1.0], acc),
        lambda rs: slow_scalars(rebuild(rs)),
        operands,
    )
    passthrough = (n_nan > 0) | ~jnp.isfinite(threshold)
    inf_scale = threshold / jnp.sqrt(jnp.maximum(n_inf, 1.0))
    overflow_scale = jnp.minimum(threshold / norm_over_big, big)

    def one(x):
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) or jnp.size(x) == 0:
            return x
        w = wide(x)
        fast = (x.astype(w) * scale.astype(w)).astype(x.dtype)
        xf = x.astype(w)
        inf_dir = jnp.where(jnp.isinf(xf), jnp.sign(xf), 0.0) * inf_scale.astype(w)
        slow = jnp.where(n_inf > 0, inf_dir, xf / big.astype(w) * overflow_scale.astype(w))
        slow = jnp.where(passthrough, xf, slow).astype(x.dtype)
        return jnp.where(finite, fast, slow)

    return jax.tree.unflatten(treedef, [one(x) for x in leaves])


def clip_by_global_norm(
    max_norm: float, *, axis_name: str | None = None
) -> optax.GradientTransformation:
    """Clips updates to a global norm, without ever turning Inf into NaN.

    .. math::

        g \\leftarrow g \\cdot \\min\\left(1, \\frac{c}{\\|g\\|_2}\\right),
        \\qquad \\|g\\|_2 = \\sqrt{\\textstyle\\sum_{\\text{leaves}} \\sum g^2}.

    Differences from ``optax.clip_by_global_norm`` (where ``[1, inf, 1]`` becomes
    ``[0, nan, 0]`` and ``max_norm=0`` on zeros gives NaN): an Inf entry gives
    the limit of clipping, :math:`c\\,\\mathrm{sign}(g_j)/\\sqrt{k}` on the
    :math:`k` infinite entries and 0 elsewhere; a finite gradient whose sum of
    squares overflows float32 is clipped correctly; zero gradients stay 0 for
    any ``max_norm`` including 0. A NaN entry passes through unchanged for
    :func:`stablejax.optim.guard` to skip. The norm is reduced in float32 for
    every input dtype.

    Args:
      max_norm: the largest global norm :math:`c \\ge 0` let through.
      axis_name: a ``shard_map``/``pmap`` axis over which the leaves are shards
        of one gradient; the squared norm is summed over it.

    Returns:
      An ``optax.GradientTransformation`` with empty state.

    Raises:
      ValueError: if ``max_norm`` is negative or not finite.

    Examples:
      >>> import jax.numpy as jnp
      >>> from stablejax.optim import clip_by_global_norm
      >>> tx = clip_by_global_norm(1.0)
      >>> u, _ = tx.update(jnp.array([1.0, jnp.inf, 1.0]), tx.init(None))
      >>> u.tolist()
      [0.0, 1.0, 0.0]
    """
    max_norm = validation.check_nonnegative("max_norm", max_norm, _WHERE_CLIP, example=1.0)
    validation.check_axis_name(axis_name, _WHERE_CLIP)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        norm, guarded = global_norm(updates, axis_name)
        return clip_to(updates, norm, max_norm, axis_name, guarded), state

    return optax.GradientTransformation(init_fn, update_fn)


class AdaptiveClipState(NamedTuple):
    """State of :func:`adaptive_clip`.

    Attributes:
      count: finite steps seen (int32).
      mean: EMA of the (clipped) global norm (float32).
      var: EMA of its variance (float32).
      last_norm: global norm of the latest gradient, before clipping (float32);
        0 when it was not finite (see ``last_finite``): no NaN or Inf is stored.
      last_threshold: the threshold applied at the latest step (float32); the
        largest float32 when nothing was clipped (warm-up, or no outlier).
      last_finite: whether the latest gradient's norm was finite (bool).
    """

    count: Array
    mean: Array
    var: Array
    last_norm: Array
    last_threshold: Array
    last_finite: Array


def adaptive_clip(
    z_threshold: float = 2.5,
    *,
    decay: float = 0.97,
    warmup_steps: int = 25,
    axis_name: str | None = None,
) -> optax.GradientTransformation:
    """Clips the global norm at a z-score threshold of its own running statistics (ZClip).

    With :math:`\\mu, \\sigma^2` exponential moving averages of past norms and
    :math:`z = (\\|g\\| - \\mu)/\\sigma`, a step with :math:`z > z_{thr}` is clipped
    to the reciprocal threshold of ZClip,

    .. math::

        \\|g\\| \\leftarrow \\mu + \\frac{z_{thr}^2}{z}\\,\\sigma ,

    which equals :math:`\\mu + z_{thr}\\sigma` at the threshold and tightens for
    larger outliers. The statistics are then updated with the clipped norm,
    :math:`\\delta = n - \\mu`, :math:`\\mu \\mathrel{+}= \\alpha\\delta`,
    :math:`\\sigma^2 \\leftarrow (1-\\alpha)(\\sigma^2 + \\alpha\\delta^2)` with
    :math:`\\alpha = \\max(1/t, 1 - \\text{decay})` (exact mean and variance for the
    first :math:`1/(1-\\text{decay})` steps). During ``warmup_steps`` nothing is
    clipped. A step with a non-finite norm leaves the statistics untouched and
    is handled as in :func:`clip_by_global_norm` at the current threshold.
    :math:`\\sigma` is floored at :math:`0.01\\mu` so a constant history does not
    clip every increase. A step with a zero norm (a frozen or fully masked
    phase) is clipped at the current threshold but not entered into the
    statistics, so such a phase cannot collapse them to a zero mean and spread
    (which would clip every later gradient to 0); with no spread at all
    (:math:`\\sigma = 0`) nothing is clipped. The statistics and the telemetry
    in the state are always finite.

    Args:
      z_threshold: z-score above which a norm is clipped (> 0).
      decay: EMA decay of the statistics, in (0, 1).
      warmup_steps: steps that only collect statistics (>= 1).
      axis_name: axis over which the leaves are shards of one gradient.

    Returns:
      An ``optax.GradientTransformation`` with :class:`AdaptiveClipState`.

    Raises:
      ValueError: for a non-positive threshold, a decay outside (0, 1) or a
        warm-up below 1.

    References:
      Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
      arXiv:2504.02507, 2025.
    """
    z_threshold = validation.check_positive(
        "z_threshold", z_threshold, _WHERE_ADAPTIVE, example=2.5
    )
    decay = validation.check_unit_interval("decay", decay, _WHERE_ADAPTIVE, example=0.97)
    warmup_steps = validation.check_count("warmup_steps", warmup_steps, _WHERE_ADAPTIVE, minimum=1)
    validation.check_axis_name(axis_name, _WHERE_ADAPTIVE)
    f32_max = float(jnp.finfo(jnp.float32).max)

    def init_fn(params):
        del params
        f = lambda v: jnp.asarray(v, jnp.float32)
        return AdaptiveClipState(
            jnp.zeros([], jnp.int32), f(0.0), f(0.0), f(0.0), f(f32_max), jnp.asarray(True)
        )

    def update_fn(updates, state, params=None):
        del params
        norm, guarded = global_norm(updates, axis_name)
        std = jnp.maximum(jnp.sqrt(state.var), 0.01 * state.mean)
        z = (norm - state.mean) / jnp.where(std > 0, std, 1.0)
        warm = state.count >= warmup_steps
        over = warm & (z > z_threshold) & (std > 0)
        safe_z = jnp.where(over, z, 1.0)
        threshold = jnp.where(over, state.mean + z_threshold**2 / safe_z * std, jnp.inf)
        # A non-finite norm has no z-score; clip it at the plain z_threshold bound.
        bound = jnp.where(warm, state.mean + z_threshold * std, jnp.inf)
        threshold = jnp.where(jnp.isfinite(norm), threshold, bound)
        out = clip_to(updates, norm, threshold, axis_name, guarded)
        finite = jnp.isfinite(norm)
        # A zero norm carries no scale: keep it out of the statistics.
        enter = finite & (norm > 0)
        clipped = jnp.minimum(jnp.where(over, threshold, norm), f32_max).astype(jnp.float32)
        count = state.count + 1
        alpha = jnp.maximum(1.0 / count.astype(jnp.float32), 1.0 - decay)
        delta = clipped - state.mean
        mean = state.mean + alpha * delta
        sq = jnp.minimum(jnp.square(delta), f32_max)  # or 0 * Inf = NaN at alpha = 1
        var = (1.0 - alpha) * jnp.minimum(state.var + alpha * sq, f32_max)
        f32 = lambda v: jnp.asarray(v).astype(jnp.float32)
        new = AdaptiveClipState(
            count=jnp.where(enter, count, state.count),
            mean=jnp.where(enter, mean, state.mean),
            var=jnp.where(enter, var, state.var),
            last_norm=jnp.where(finite, jnp.minimum(f32(norm), f32_max), 0.0),
            last_threshold=jnp.minimum(
                jnp.where(jnp.isnan(threshold), f32_max, f32(threshold)), f32_max
            ),
            last_finite=finite,
        )
        return out, new

    return optax.GradientTransformation(init_fn, update_fn)
