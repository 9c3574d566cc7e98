"""``stable_adamw``: the recommended guarded AdamW chain in one call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from stablejax._src import validation
from stablejax._src.optim import clipping
from stablejax._src.optim.guard import guard
from stablejax._src.optim.loss_scale import dynamic_loss_scale
from stablejax._src.optim.overshoot import overshoot_control

_WHERE = "stablejax.optim.stable_adamw"


def _matrices_only(params: Any) -> Any:
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


class _MatricesOnly:
    """The default ``weight_decay_mask``: decay the leaves with ``ndim >= 2``.

    A marker rather than the mask function itself: ``optax.inject_hyperparams``
    takes every callable setting for a schedule of the step count.
    """

    def __repr__(self) -> str:
        return "<matrices only (ndim >= 2)>"


MATRICES_ONLY = _MatricesOnly()


def _check_max_update_ratio(value: float | None) -> float | None:
    if value is None:
        return None
    return validation.check_positive("max_update_ratio", value, _WHERE, example=0.01)


def _float16_in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``inner`` on float16 leaves upcast to float32; its updates come back in float16.

    Adam in float16 fails on finite input: ``eps=1e-8`` is 0 in float16 (an
    exactly-zero gradient entry gives 0/0) and a gradient entry above 256
    overflows the second moment. With the upcast the moments are float32 for
    float16 parameters; other dtypes pass through unchanged (no copy).
    """

    def up(tree):
        return jax.tree.map(
            lambda x: x.astype(jnp.float32) if jnp.asarray(x).dtype == jnp.float16 else x, tree
        )

    def init_fn(params):
        return inner.init(up(params))

    def update_fn(updates, state, params=None):
        new, state = inner.update(up(updates), state, None if params is None else up(params))
        new = jax.tree.map(lambda n, u: n.astype(jnp.asarray(u).dtype), new, updates)
        return new, state

    return optax.GradientTransformation(init_fn, update_fn)


def _clip_update_ratio(ratio: float, eps: float = 1e-3) -> optax.GradientTransformation:
    """Per leaf, scales the final update down to ``||u|| <= ratio * max(||w||, eps)``.

    A leaf within the bound is returned unchanged (selected, not multiplied), so a
    refused step's exact zeros stay exact zeros; the ``eps`` floor keeps a zero
    parameter from dividing by zero (its update is bounded by ``ratio * eps``).
    """

    def clip_leaf(u: jax.Array, w: jax.Array) -> jax.Array:
        u_norm = jnp.sqrt(jnp.sum(jnp.square(u.astype(jnp.float32))))
        bound = ratio * jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)))), eps)
        scale = bound / jnp.maximum(u_norm, bound)
        return jnp.where(u_norm <= bound, u, (u * scale).astype(u.dtype))

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple:
        if params is None:
            raise ValueError(f"{_WHERE}: max_update_ratio needs `params` passed to `update`.")
        return jax.tree.map(clip_leaf, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _warmup_cosine(peak: Any, warmup_steps: Any, total_steps: Any, end_ratio: Any):
    """``optax.warmup_cosine_decay_schedule(0, peak, warmup_steps, total_steps,
    peak * end_ratio)`` for settings that may be traced (``inject_hyperparams``).

    Linear from 0 to ``peak`` over ``warmup_steps``, then
    :math:`p\\,(\\alpha + (1-\\alpha)\\,\\tfrac12(1 + \\cos(\\pi t / T)))` with
    :math:`\\alpha` = ``end_ratio``, :math:`t` the steps since the warm-up and
    :math:`T` = ``total_steps - warmup_steps`` (at least 1), as optax computes it.
    """
    f32 = jnp.float32

    def schedule(count):
        count = jnp.asarray(count, f32)
        p = jnp.asarray(peak, f32)
        w = jnp.asarray(warmup_steps, f32)
        decay = jnp.maximum(jnp.asarray(total_steps, f32) - w, 1.0)
        alpha = jnp.asarray(end_ratio, f32)
        frac = 1 - jnp.clip(count, 0, w) / jnp.maximum(w, 1.0)
        warm = (0.0 - p) * frac + p
        t = jnp.minimum(count - w, decay)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * t / decay))
        return jnp.where(count < w, warm, p * ((1 - alpha) * cosine + alpha))

    return schedule


def stable_adamw(
    learning_rate: float,
    *,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float = 0.1,
    clip: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    end_lr_ratio: float = 0.1,
    weight_decay_mask: Any | Callable[[Any], Any] | None = MATRICES_ONLY,
    spike_threshold: float | None = 6.0,
    spike_warmup: int = 20,
    loss_spike_threshold: float | None = None,
    max_consecutive_skips: int | None = 50,
    on_give_up: Literal["halt", "reset"] = "reset",
    lr_backoff: float | None = None,
    lr_recovery_steps: int = 50,
    max_update_ratio: float | None = None,
    overshoot: bool = True,
    axis_name: str | None = None,
    loss_scale: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AdamW with warm-up + cosine decay, safe clipping, and a guard, in one call.

    The chain is::

        overshoot_control(                      # if overshoot=True (default)
          chain(guard(chain(clip_by_global_norm(clip), scale_by_adam(b1, b2, eps),
                            add_decayed_weights(weight_decay, mask)), ...),
                scale_by_learning_rate(warmup_cosine_decay_schedule(...)),
                [per-leaf update-ratio bound, if max_update_ratio is set]))

    Each piece answers a cause of NaN or divergence:

    * **guard** (inside): a NaN/Inf gradient or loss (bad batch, overflow) or a
      gradient-norm spike (z-score > ``spike_threshold``) is refused with Adam's
      moments bitwise untouched, so one bad batch cannot poison ``mu``/``nu``.
      ``on_give_up='reset'`` with ``max_consecutive_skips=50``: a corrupted
      shard of any length is ridden out (NaN steps are refused however many come;
      every 50 in a row Adam's moments and the norm statistics restart, which
      costs nothing when the data is bad anyway) and training carries on when
      the data is healthy again. ``'halt'`` would stop the run for good, which
      is the wrong default for a user who wants the run to finish. A stale norm
      history that refuses a legitimately larger gradient is cleared sooner,
      by the guard's re-baseline after ``spike_warmup`` spike refusals.
    * **lr_backoff=None**: backing off the rate after a skip answers instability
      caused by the rate, but in practice most skips are bad data, where a
      smaller rate only slows training; in the fault example a single NaN batch
      with ``lr_backoff=0.5`` cost 4% of final loss on a short run, and frequent
      isolated bad batches would pin the rate at its floor. Pass 0.5 when
      spikes, not bad batches, are what you expect.
    * **clip** (first in the guarded chain, reusing the guard's norm for free):
      bounds the step after a rare large gradient that is not a spike yet; it
      never turns Inf into NaN.
    * **float16 parameters**: Adam's moments are kept in float32 (the update
      comes back in float16), since in float16 ``eps=1e-8`` is 0 and a zero
      gradient entry would give 0/0; the guard also checks the inner output
      for float16 (see :func:`stablejax.optim.guard`'s ``check_updates``).
    * **b2=0.95** (not 0.999): the second moment forgets a large gradient in
      ~20 steps instead of ~1000, so a rare large gradient neither freezes
      learning nor leaves ``nu`` stale for rarely-updated rows (embeddings), a
      known source of late loss spikes; ``eps=1e-8`` as in OLMo 2.
    * **warm-up**: Adam's first steps use poorly estimated moments; ramping the
      rate from 0 avoids the early blow-ups of large models.
    * **weight decay only on matrices** (``ndim >= 2``): decaying norm scales and
      biases towards 0 is a classic cause of collapsing normalisation.
    * **the schedule sits outside the guard**: refused steps still advance it
      (it counts data steps, as the loop does) and a reset does not rewind it.
      Refused updates are exact zeros, and ``lr * 0 = 0`` for the finite rate.
    * **overshoot=True**: a learning rate too high for the model diverges
      smoothly, with no NaN and no gradient spike for the guard to see, but the
      loss stops following the gradient: a step predicted (by :math:`-g\\cdot u`)
      to lower the loss by far more than the batch-to-batch noise lowers it by
      less than a quarter of that, or raises it. :func:`overshoot_control` then
      halves the step (recovering 2x per 1000 steps). At a rate that suits the
      model no step's prediction stands out of the noise, so it never acts and
      the updates are bitwise those without it. In the fault example, 100x the
      tuned rate ends within 2% of fault-free with it (+74% without), and 1x-10x
      are unchanged. It needs ``loss=`` passed to ``update``; without it, it
      passes the updates through.
    * **max_update_ratio** (opt-in, off by default): another answer to a rate
      too high, a hard bound on each leaf's relative step. The
      bound scales each leaf's final update down to
      ``||u|| <= max_update_ratio * max(||w||, 1e-3)`` (a LARS/LAMB-style trust
      ratio used as a clip, per leaf, after the rate), so an over-large rate moves
      the weights no faster than a moderate one. In the fault example, 0.01 turns
      100x the tuned rate from +74% into +1.9% over fault-free, and leaves the
      tuned rate's loss unchanged. Not the default because it also bounds the
      weights' *relative* speed when the rate is right: a leaf can grow at most
      ``max_update_ratio`` per step, and a zero-initialised leaf (biases, LoRA's
      ``B``, zero-init projections) starts from ``max_update_ratio * 1e-3``, so a
      linear regression from zero weights barely trains in 300 steps (loss
      12.6 from ~14; below 0.01 without the bound). A refused step's zeros stay
      exact zeros (within the bound, an update is selected, not rescaled), and
      a zero parameter cannot make a NaN.

    Args:
      learning_rate: peak learning rate (> 0).
      warmup_steps: linear warm-up steps from 0 (>= 0).
      total_steps: length of the whole schedule, warm-up included (> warmup_steps).
      weight_decay: decoupled weight decay (>= 0).
      clip: global-norm clip (> 0), or None for none.
      b1: Adam's first-moment decay, in [0, 1) (0: no momentum, as optax allows).
      b2: Adam's second-moment decay, in [0, 1).
      eps: Adam's epsilon (> 0).
      end_lr_ratio: final rate as a fraction of the peak, in [0, 1].
      weight_decay_mask: optax mask (tree or callable) of the leaves to decay;
        by default the leaves with ``ndim >= 2`` (a marker, not a function, so
        that ``optax.inject_hyperparams`` does not take it for a schedule).
      spike_threshold: see :func:`stablejax.optim.guard`.
      spike_warmup: see :func:`stablejax.optim.guard`.
      loss_spike_threshold: see :func:`stablejax.optim.guard`.
      max_consecutive_skips: see :func:`stablejax.optim.guard`.
      on_give_up: see :func:`stablejax.optim.guard`.
      lr_backoff: see :func:`stablejax.optim.guard`.
      lr_recovery_steps: see :func:`stablejax.optim.guard`.
      max_update_ratio: per-leaf bound on ``||update|| / max(||param||, 1e-3)``
        (> 0), or None for none. Needs ``params`` passed to ``update``. The
        norms are local: under ``shard_map`` with sharded leaves the bound is
        per shard (``axis_name`` is not used for it).
      overshoot: wrap the chain in :func:`stablejax.optim.overshoot_control`
        with its defaults (needs ``loss=``; ``False`` for the bare chain).
      axis_name: see :func:`stablejax.optim.guard` (also used by the clip and
        by ``overshoot_control``).
      loss_scale: wrap the whole chain in
        :func:`stablejax.optim.dynamic_loss_scale` with its defaults, for
        float16 compute: differentiate :func:`stablejax.optim.scale_loss` of the
        loss and pass that scaled loss as ``loss=``. An overflow is one skipped
        step that the guard never sees.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; pass ``loss=`` to ``update``.

    Raises:
      ValueError: for an out-of-range setting, naming it.

    Examples:
      >>> import jax.numpy as jnp
      >>> from stablejax.optim import stable_adamw, metrics
      >>> tx = stable_adamw(1e-3, warmup_steps=10, total_steps=100)
      >>> params = {"w": jnp.ones((2, 2))}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.full((2, 2), jnp.nan)}, state, params)
      >>> bool((updates["w"] == 0).all()), int(metrics(state)["skipped_nonfinite"])
      (True, 1)
    """
    learning_rate = validation.check_positive("learning_rate", learning_rate, _WHERE, example=1e-3)
    warmup_steps = validation.check_count("warmup_steps", warmup_steps, _WHERE, minimum=0)
    total_steps = validation.check_count("total_steps", total_steps, _WHERE, minimum=1)
    traced = lambda v: isinstance(v, jax.core.Tracer)
    if not (traced(total_steps) or traced(warmup_steps)) and total_steps <= warmup_steps:
        raise ValueError(
            f"{_WHERE}: total_steps={total_steps!r} must exceed warmup_steps={warmup_steps!r}; "
            "total_steps counts the whole run, warm-up included, e.g. "
            f"total_steps={warmup_steps + 1000}."
        )
    weight_decay = validation.check_nonnegative("weight_decay", weight_decay, _WHERE, example=0.1)
    if clip is not None:
        clip = validation.check_positive("clip", clip, _WHERE, example=1.0)
    b1 = validation.check_unit_interval("b1", b1, _WHERE, example=0.9, allow_zero=True)
    b2 = validation.check_unit_interval("b2", b2, _WHERE, example=0.95, allow_zero=True)
    eps = validation.check_positive("eps", eps, _WHERE, example=1e-8)
    end_lr_ratio = validation.check_nonnegative("end_lr_ratio", end_lr_ratio, _WHERE, example=0.1)
    if not traced(end_lr_ratio) and end_lr_ratio > 1:
        raise ValueError(
            f"{_WHERE}: end_lr_ratio={end_lr_ratio!r} must be in [0, 1]. Use e.g. end_lr_ratio=0.1."
        )
    max_update_ratio = _check_max_update_ratio(max_update_ratio)
    if not isinstance(overshoot, bool):
        raise TypeError(f"{_WHERE}: `overshoot` must be True or False, got {overshoot!r}.")
    if not isinstance(loss_scale, bool):
        raise TypeError(f"{_WHERE}: `loss_scale` must be True or False, got {loss_scale!r}.")
    validation.check_axis_name(axis_name, _WHERE)

    settings = (learning_rate, warmup_steps, total_steps, end_lr_ratio)
    if any(traced(v) for v in settings):
        # optax.inject_hyperparams traces every numeric setting, and optax's
        # schedule branches in Python on them: the same formula in jnp.
        schedule = _warmup_cosine(*settings)
    else:
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=learning_rate,
            warmup_steps=warmup_steps,
            decay_steps=total_steps,
            end_value=learning_rate * end_lr_ratio,
        )
    parts = []
    if clip is not None:
        parts.append(clipping.clip_by_global_norm(clip, axis_name=axis_name))
    adam = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if traced(weight_decay) or weight_decay > 0:  # traced under inject_hyperparams
        mask = _matrices_only if weight_decay_mask is MATRICES_ONLY else weight_decay_mask
        adam.append(optax.add_decayed_weights(weight_decay, mask=mask))
    parts.append(_float16_in_float32(optax.chain(*adam)))
    guarded = guard(
        optax.chain(*parts),
        max_consecutive_skips=max_consecutive_skips,
        on_give_up=on_give_up,
        spike_threshold=spike_threshold,
        spike_warmup=spike_warmup,
        loss_spike_threshold=loss_spike_threshold,
        lr_backoff=lr_backoff,
        lr_recovery_steps=lr_recovery_steps,
        axis_name=axis_name,
    )
    tail = [optax.scale_by_learning_rate(schedule)]
    if max_update_ratio is not None:
        tail.append(_clip_update_ratio(max_update_ratio))
    chain = optax.chain(guarded, *tail)
    if overshoot:
        chain = overshoot_control(chain, axis_name=axis_name)
    if loss_scale:
        chain = dynamic_loss_scale(chain, axis_name=axis_name)
    return chain
