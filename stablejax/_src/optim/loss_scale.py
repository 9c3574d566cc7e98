"""Dynamic loss scaling for float16 training, as an optax wrapper.

float16's smallest normal number is about 6e-5 and its largest 65504: small
gradients flush to zero in the backward pass unless the loss is multiplied by a
large factor first, and too large a factor overflows to Inf. ``scale_loss``
multiplies the loss by the current scale, :func:`dynamic_loss_scale` divides the
gradients by it (in float32), skips the step on an overflow and adapts the scale,
with the semantics of PyTorch's ``GradScaler``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from stablejax._src.optim import clipping
from stablejax._src.optim.known_sums import KnownSums
from stablejax._src.optim.selected_state import update_reading_selected_state
from stablejax._src.typing import Array, ArrayLike, PyTree

_WHERE = "stablejax.optim.dynamic_loss_scale"


class LossScaleState(NamedTuple):
    """State of :func:`dynamic_loss_scale`.

    Attributes:
      scale: the current loss scale (float32, always finite, within
        ``[min_scale, max_scale]``).
      good_steps: finite steps in a row since the scale last changed (int32).
      overflows: steps skipped for non-finite gradients, in total (int32).
      steps: ``update`` calls (int32).
      inner_state: the wrapped transformation's state.
    """

    scale: Array
    good_steps: Array
    overflows: Array
    steps: Array
    inner_state: PyTree


def _real(name: str, value: Any) -> float:
    """``value`` as a Python float; jax/numpy scalars accepted, bools refused.

    A traced value is returned as is: ``optax.inject_hyperparams`` calls the
    factory with concrete values at ``init`` (checked then) and traced ones at
    ``update``.
    """
    if isinstance(value, bool) or isinstance(value, np.bool_):
        raise TypeError(f"{_WHERE}: `{name}` must be a real number, got {value!r}.")
    if isinstance(value, jax.core.Tracer):
        if not jnp.issubdtype(value.dtype, jnp.floating) or value.shape != ():
            raise TypeError(f"{_WHERE}: `{name}` must be a real number, got {value!r}.")
        return value
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything not array-like is refused below
        arr = None
    if arr is None or arr.shape != () or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{_WHERE}: `{name}` must be a real number, got {value!r}.")
    if np.iscomplexobj(arr):
        raise TypeError(f"{_WHERE}: `{name}` must be a real number, got {value!r}.")
    return float(arr)


def _check(name: str, value: Any, ok: bool, fix: str) -> None:
    if not ok:
        raise ValueError(f"{_WHERE}: {name}={value!r} {fix}")


def _run(inner, offer, updates, inner_state, params, extra):
    if offer is None:
        return inner.update(updates, inner_state, params, **extra)
    with clipping.offering(offer):
        return inner.update(updates, inner_state, params, **extra)


# Primitives through which a value stays "the gradient, elementwise" (a clip's
# square of it, a cast), and those that reduce it.
_PASS_THROUGH = frozenset({
    "convert_element_type", "mul", "square", "integer_pow", "abs", "real", "imag", "neg",
    "add", "sub", "copy", "copy_p", "reshape", "squeeze", "broadcast_in_dim",
})
_REDUCING = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "dot_general",
})


def _reduces_over(closed: Any, leaves: list[Any]) -> bool:
    """Whether the traced ``closed`` jaxpr reduces over one of ``leaves`` (closed
    over by it) or over an elementwise function of one. A cost heuristic only:
    it picks which gradient the overflow check reads, never what it decides."""
    ids = {id(x) for x in leaves}
    tainted = {v for v, c in zip(closed.jaxpr.constvars, closed.consts) if id(c) in ids}

    def scan(jaxpr, tainted) -> bool:
        for eqn in jaxpr.eqns:
            ins = [v for v in eqn.invars if not isinstance(v, jex_core.Literal)]
            if not any(v in tainted for v in ins):
                continue
            name = eqn.primitive.name
            if name in _REDUCING:
                return True
            sub = eqn.params.get("jaxpr")
            if name in ("pjit", "jit", "closed_call") and sub is not None:
                inner_jaxpr = getattr(sub, "jaxpr", sub)
                inner_taint = {
                    iv for iv, v in zip(inner_jaxpr.invars, eqn.invars)
                    if not isinstance(v, jex_core.Literal) and v in tainted
                }
                if scan(inner_jaxpr, inner_taint):
                    return True
                tainted.update(eqn.outvars)
            elif name in _PASS_THROUGH:
                tainted.update(eqn.outvars)
        return False

    return scan(closed.jaxpr, tainted)


def _overflow_check(leaves: list[Any], inv: Array | None) -> tuple[Array, Array]:
    """Whether every entry of the unscaled gradient is finite, and its per-leaf
    sums of squares (as :func:`clipping.leaf_sumsq` returns them).

    ``leaves`` is the scaled gradient :math:`g_s` and ``inv`` :math:`1/s`, or
    (``inv=None``) the unscaled float32 gradient itself. One pass reads it, for
    the per-leaf float32 sums of squares :math:`S_\\ell` a global norm needs
    anyway. If :math:`\\sum_\\ell S_\\ell` and :math:`\\sum_\\ell S_\\ell/s^2` are
    finite, every entry of :math:`g_s/s` is, and its sums of squares are
    :math:`S_\\ell / s^2` (for a power-of-two scale those of :math:`g_s/s`, up to
    the order in which XLA sums them). Only when they are not (a NaN or Inf
    entry, or finite squares overflowing float32, which float16 gradients never
    do: :math:`65504^2 \\approx 4.3\\cdot 10^9`) is the gradient read again, under
    ``lax.cond``, for GradScaler's exact answer (are all entries of the
    unscaled gradient finite?) and the exact sums: finite squares that overflow
    are not an overflow of the gradient.
    """
    f32 = jnp.float32
    if not leaves:
        return jnp.asarray(True), jnp.zeros([0], f32)
    # The unscaled gradient is float32 whatever the input (float64 under x64
    # included), so its check and sums are taken in float32 too.
    leaves = [jnp.asarray(g) for g in leaves]
    leaves = [g.astype(f32) if g.dtype == jnp.float64 else g for g in leaves]
    sums = clipping.leaf_sumsq(leaves).astype(f32)
    unscaled_sums = sums if inv is None else sums * (inv * inv)

    def fast(leaves):
        return jnp.asarray(True), unscaled_sums

    def exact(leaves):
        unscaled = [g.astype(f32) if inv is None else clipping.unscale(g, inv) for g in leaves]
        ok = jnp.asarray(True)
        for g in unscaled:
            if g.size:
                ok = ok & jnp.all(jnp.isfinite(g))
        return ok, clipping.leaf_sumsq(unscaled).astype(f32)

    # Read off a sqrt, as the guard does: XLA materialises it once instead of
    # copying the chain of per-leaf additions into the predicate's readers.
    fine = jnp.isfinite(jnp.sqrt(jnp.sum(sums)))
    if inv is not None:
        fine = fine & jnp.isfinite(jnp.sqrt(jnp.sum(unscaled_sums)))
    return lax.cond(fine, fast, exact, leaves)


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    *,
    init_scale: float = 2.0**15,
    growth_interval: int = 2000,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    min_scale: float = 1.0,
    max_scale: float = 2.0**24,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps ``inner`` with a dynamic loss scale for float16 training.

    Use with :func:`scale_loss`::

        tx = dynamic_loss_scale(optax.adamw(1e-3))
        opt_state = tx.init(params)

        def step(params, opt_state, batch):
            loss_fn = lambda p: scale_loss(model_loss(p, batch), opt_state)
            scaled_loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

    Each ``update`` with scale :math:`s` receives :math:`g_s = s\,\nabla L`:

    * if every leaf of :math:`g_s` is finite (on every replica, with
      ``axis_name``), ``inner`` is updated with :math:`g = g_s / s` computed in
      float32, and the count of finite steps in a row grows by one; when it
      reaches ``growth_interval`` the scale becomes
      :math:`\min(s \cdot \text{growth\_factor}, \text{max\_scale})` and the
      count restarts;
    * otherwise (an overflow) the step is skipped: the updates are exact zeros,
      ``inner``'s state is bitwise unchanged (a guard inside sees nothing: an
      overflow is one skipped step, never a guard give-up), the scale becomes
      :math:`\max(s \cdot \text{backoff\_factor}, \text{min\_scale})` and the
      count restarts.

    The scale therefore stays in ``[min_scale, max_scale]`` and is never
    non-finite (flax's ``DynamicScale`` has no cap and can grow to Inf). With
    the default powers of two, unscaling is exact. A NaN batch looks like an
    overflow: it is skipped and halves the scale, down to ``min_scale`` for a
    long run of them.

    Only a NaN or Inf entry is an overflow, as in GradScaler: finite float32
    gradients whose squares overflow float32 are unscaled and passed on.

    **Cost.** The check reads the scaled gradient once, for the per-leaf
    float32 sums of squares a global norm needs anyway. A
    :func:`~stablejax.optim.guard`,
    :func:`~stablejax.optim.clip_by_global_norm` or
    :func:`~stablejax.optim.overshoot_control` first in
    ``inner`` reuses them, so nothing reduces over the unscaled gradient and XLA
    fuses the unscaling into the optimizer's loops: the step then makes exactly
    the passes over parameter-sized buffers of ``inner`` alone
    (``stable_adamw(loss_scale=True)`` included). A sum of the squares of an
    unscaled gradient leaf that ``inner`` takes itself (optax's own
    ``clip_by_global_norm`` or ``clip_by_block_rms``, also under a guard) is
    answered with the check's sums (:mod:`~stablejax._src.optim.known_sums`:
    the same numbers for a power-of-two scale, up to the order of the
    additions), so the same holds there. Only an ``inner`` that reduces over
    the unscaled gradient otherwise (``optax.centralize``, say) makes XLA:CPU
    write it once; the check then shares that pass.

    A ``loss=`` extra argument (for a guard's loss check or
    :func:`~stablejax.optim.overshoot_control`) must be the *scaled* loss, as
    ``value_and_grad`` of :func:`scale_loss` returns it: it is divided by the
    scale before ``inner`` sees it.

    Args:
      inner: the optax transformation to wrap (any chain; ``guard`` and
        ``stable_adamw`` included).
      init_scale: the first scale, in ``[min_scale, max_scale]``.
      growth_interval: finite steps in a row before the scale grows (int >= 1).
      growth_factor: multiplier on growth (> 1, finite).
      backoff_factor: multiplier on overflow, in (0, 1).
      min_scale: lower bound of the scale (> 0, finite).
      max_scale: upper bound of the scale (finite, >= ``min_scale``).
      axis_name: a ``shard_map``/``pmap`` axis whose replicas must agree: the
        finiteness flag is reduced over it, so every replica skips, backs off
        and grows together.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`LossScaleState`.

    Raises:
      TypeError: if ``inner`` is not a transformation or a setting not a number.
      ValueError: for an out-of-range setting, naming it.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from stablejax.optim import dynamic_loss_scale, metrics
      >>> tx = dynamic_loss_scale(optax.sgd(1.0), init_scale=8.0)
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([jnp.inf, 8.0]), state)
      >>> updates.tolist(), float(metrics(state)["loss_scale"]), int(metrics(state)["overflows"])
      ([0.0, 0.0], 4.0, 1)
      >>> updates, state = tx.update(jnp.array([4.0, 8.0]), state)
      >>> updates.tolist()
      [-1.0, -2.0]
    """
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(
            f"{_WHERE}: `inner` must be an optax GradientTransformation, got {inner!r}; "
            "call the factory first, e.g. optax.adam(1e-3), not optax.adam."
        )
    init_scale = _real("init_scale", init_scale)
    growth_factor = _real("growth_factor", growth_factor)
    backoff_factor = _real("backoff_factor", backoff_factor)
    min_scale = _real("min_scale", min_scale)
    max_scale = _real("max_scale", max_scale)
    if isinstance(growth_interval, bool) or not isinstance(
        growth_interval, (numbers.Integral, np.integer)
    ):
        if not (isinstance(growth_interval, jax.Array) and growth_interval.shape == ()
                and jnp.issubdtype(growth_interval.dtype, jnp.integer)):
            raise TypeError(
                f"{_WHERE}: `growth_interval` must be an int, got {growth_interval!r} "
                "(e.g. 2000)."
            )
    settings = (init_scale, growth_interval, growth_factor, backoff_factor, min_scale, max_scale)
    if not any(isinstance(v, jax.core.Tracer) for v in settings):
        # (Under inject_hyperparams the update's settings are traced; the
        # same values were checked concrete at init.)
        growth_interval = int(growth_interval)
        _check("growth_interval", growth_interval, growth_interval >= 1,
               "must be >= 1 (e.g. 2000).")
        fin = math.isfinite
        _check("min_scale", min_scale, fin(min_scale) and min_scale > 0,
               "must be finite and > 0 (e.g. 1.0).")
        _check("max_scale", max_scale, fin(max_scale) and max_scale >= min_scale,
               f"must be finite and >= min_scale={min_scale!r} (e.g. {max(2.0**24, min_scale)!r}).")
        _check("max_scale", max_scale, max_scale < float(np.finfo(np.float32).max),
               "must be below float32's largest value (e.g. 16777216.0).")
        _check("init_scale", init_scale, min_scale <= init_scale <= max_scale,
               f"must be in [min_scale, max_scale] = [{min_scale!r}, {max_scale!r}] "
               f"(e.g. {min(max(2.0**15, min_scale), max_scale)!r}).")
        _check("growth_factor", growth_factor, fin(growth_factor) and growth_factor > 1,
               "must be finite and > 1 (e.g. 2.0).")
        _check("backoff_factor", backoff_factor, 0 < backoff_factor < 1,
               "must be in (0, 1) (e.g. 0.5).")
    if axis_name is not None and not isinstance(axis_name, str):
        # jax allows tuples of axis names too.
        if not (isinstance(axis_name, tuple) and all(isinstance(a, str) for a in axis_name)):
            raise TypeError(
                f"{_WHERE}: `axis_name` must be a str (the shard_map/pmap axis), a tuple of "
                f"them, or None; got {axis_name!r}."
            )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        i32 = lambda v: jnp.asarray(v, jnp.int32)
        return LossScaleState(
            scale=jnp.asarray(init_scale, jnp.float32),
            good_steps=i32(0),
            overflows=i32(0),
            steps=i32(0),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        leaves = jax.tree.leaves(updates)
        scale = jnp.asarray(state.scale, jnp.float32)
        inv = 1.0 / scale
        unscaled = jax.tree.map(lambda g: clipping.unscale(g, inv), updates)
        extra = dict(extra_args)
        if extra.get("loss") is not None:
            extra["loss"] = jnp.asarray(extra["loss"], jnp.float32) * inv
        old_leaves = jax.tree.leaves(state.inner_state)

        # The overflow check reads the gradient once, for sums of squares that
        # a norm inside `inner` can reuse. If `inner` takes them (a guard,
        # clip_by_global_norm or overshoot_control first in it: see
        # clipping.unscaled_offer), or reduces over nothing, they are taken of
        # the scaled gradient, so that nothing reduces over the unscaled one and
        # XLA fuses the unscaling into inner's elementwise loops. If it sums
        # the squares of the unscaled gradient itself (optax's own clip, say),
        # those sums are answered with these (known_sums). Only if it still
        # reduces over the unscaled gradient otherwise, which makes XLA write
        # it anyway, is the check taken of the unscaled gradient, so that XLA
        # can merge the reductions.
        floats = all(jnp.issubdtype(jnp.asarray(g).dtype, jnp.floating) for g in leaves)
        offer = known = None
        finite, sumsq = _overflow_check(leaves, inv)
        if floats and leaves:
            flat_unscaled = jax.tree.leaves(unscaled)
            offer = clipping.unscaled_offer(flat_unscaled, sumsq, leaves, inv)
            probe = jax.make_jaxpr(
                lambda: _run(inner, offer, unscaled, state.inner_state, params, extra)
            )()
            if not offer.taken:
                offer = None
                if _reduces_over(probe, flat_unscaled):
                    # A norm of inner's own (optax.tree.norm) is answered with
                    # the check's sums (known_sums); only if something else still
                    # reduces over the unscaled gradient is the check moved onto it.
                    known = KnownSums(flat_unscaled, sumsq)
                    if _reduces_over(known.replayed(probe), flat_unscaled):
                        finite, _ = _overflow_check(flat_unscaled, None)
        if axis_name is not None:
            finite = lax.pmin(finite.astype(jnp.int32), axis_name) > 0
        overflow = ~finite

        def inner_update():
            return _run(inner, offer, unscaled, state.inner_state, params, extra)

        # Chosen with jnp.where (a refused step's NaN arithmetic is discarded,
        # never multiplied by 0), each state leaf as soon as inner computes it,
        # as the guard does: the selects fuse into inner's own loops.
        new_updates, new_inner = update_reading_selected_state(
            inner_update,
            state.inner_state,
            lambda i, new: jnp.where(overflow, old_leaves[i], new),
            known=known,
        )
        new_updates = jax.tree.map(
            lambda u: jnp.where(overflow, jnp.zeros_like(u), u), new_updates
        )
        good = jnp.where(finite, state.good_steps + 1, 0)
        grow = good >= growth_interval
        grown = jnp.minimum(scale * growth_factor, max_scale)
        backed_off = jnp.maximum(scale * backoff_factor, min_scale)
        new_scale = jnp.where(finite, jnp.where(grow, grown, scale), backed_off)
        new_state = LossScaleState(
            scale=new_scale.astype(jnp.float32),
            good_steps=jnp.where(grow, 0, good).astype(jnp.int32),
            overflows=state.overflows + (~finite).astype(jnp.int32),
            steps=state.steps + 1,
            inner_state=new_inner,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_state(x: Any) -> bool:
    return isinstance(x, LossScaleState)


def find_loss_scale_state(opt_state: PyTree) -> LossScaleState | None:
    """The outermost :class:`LossScaleState` inside ``opt_state``, or None.

    Walks the state as a pytree, so it sees through ``optax.chain`` tuples,
    ``MultiSteps``, ``inject_hyperparams``, guards and user containers.
    """
    for node in jax.tree.leaves(opt_state, is_leaf=_is_state):
        if _is_state(node):
            return node
    return None


def scale_loss(loss: ArrayLike, opt_state: PyTree) -> Array:
    """Multiplies ``loss`` by the current loss scale of ``opt_state``, in float32.

    Call it inside the function you differentiate, so the gradients come out
    scaled; :func:`dynamic_loss_scale` unscales them. The scale is a constant to
    autodiff (``stop_gradient``).

    Args:
      loss: the loss (any float dtype; computed in float32 from here on).
      opt_state: the full optimizer state; the :class:`LossScaleState` may be
        nested anywhere in it.

    Returns:
      ``float32(loss) * scale``.

    Raises:
      ValueError: if ``opt_state`` holds no loss-scale state.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from stablejax.optim import dynamic_loss_scale, scale_loss
      >>> state = optax.chain(dynamic_loss_scale(optax.sgd(0.1), init_scale=4.0)).init(0.0)
      >>> float(scale_loss(jnp.float16(1.5), state))
      6.0
    """
    s = find_loss_scale_state(opt_state)
    if s is None:
        raise ValueError(
            "stablejax.optim.scale_loss: no LossScaleState found in this optimizer state; "
            "wrap the optimizer with stablejax.optim.dynamic_loss_scale(...) (or use "
            "stable_adamw(..., loss_scale=True)) before calling init."
        )
    scale = lax.stop_gradient(jnp.asarray(s.scale, jnp.float32))
    return jnp.asarray(loss).astype(jnp.float32) * scale


def loss_scale_metrics(opt_state: PyTree) -> dict[str, Array]:
    """``loss_scale``, ``overflows`` and ``loss_scale_good_steps``, or {} without a scaler."""
    s = find_loss_scale_state(opt_state)
    if s is None:
        return {}
    return {
        "loss_scale": jnp.asarray(s.scale),
        "overflows": jnp.asarray(s.overflows),
        "loss_scale_good_steps": jnp.asarray(s.good_steps),
    }
