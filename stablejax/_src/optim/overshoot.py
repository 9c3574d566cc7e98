"""``overshoot_control``: scales the step down when the loss stops following the gradient.

A learning rate too high for the model produces no NaN and no gradient spike:
the loss just stops falling and drifts up. What does stand out is the gap between
the decrease the gradient predicts for a step and the decrease the next loss
shows. This module measures that gap for free (one dot product per step and the
loss the training loop already computes) and shrinks the step when it is large.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from stablejax._src import validation
from stablejax._src.optim import clipping
from stablejax._src.typing import Array

_WHERE = "stablejax.optim.overshoot_control"


class OvershootState(NamedTuple):
    """State of :func:`overshoot_control`. Counters int32, the rest float32 scalars.

    Attributes:
      scale: factor applied to the inner updates (1 until an overshoot).
      overshoots: judged steps that realised less than ``min_ratio`` of their
        predicted decrease (each one shrank ``scale``).
      judged: steps whose predicted decrease stood out of the loss noise.
      last_ratio: realised / predicted decrease of the latest judged step (0
        before the first; see ``judged``). No NaN or Inf is stored.
      noise_var: running mean of the squared loss change between consecutive
        accepted steps: the scale against which a prediction is judged.
      noise_count: transitions in ``noise_var``.
      prev_loss: loss passed at the latest accepted step.
      prev_pred: predicted decrease of the latest accepted step's update,
        :math:`-g\\cdot u`; 0 after a refused step.
      inner_state: state of the wrapped transformation.
    """

    scale: Array
    overshoots: Array
    judged: Array
    last_ratio: Array
    noise_var: Array
    noise_count: Array
    prev_loss: Array
    prev_pred: Array
    inner_state: Any


def _neg_dot(grads: Any, updates: Any) -> Array:
    """:math:`-\\sum_\\ell g_\\ell \\cdot u_\\ell` in float32 over the floating leaves."""
    total = jnp.zeros([], jnp.float32)
    for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(updates)):
        g, u = jnp.asarray(g), jnp.asarray(u)
        if jnp.issubdtype(g.dtype, jnp.floating) and jnp.issubdtype(u.dtype, jnp.floating):
            total = total - jnp.sum(g.astype(jnp.float32) * u.astype(jnp.float32))
    return total


def overshoot_control(
    inner: optax.GradientTransformation,
    *,
    min_ratio: float = 0.25,
    noise_sigmas: float = 2.0,
    shrink: float = 0.5,
    recovery_steps: int = 1000,
    min_scale: float = 1e-3,
    noise_decay: float = 0.98,
    noise_warmup: int = 5,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` (the whole chain, learning rate included) in a trust-region step control.

    For the update :math:`u_{t-1}` applied at step :math:`t-1`, the gradient
    predicts a loss decrease :math:`P_{t-1} = -g_{t-1}\\cdot u_{t-1}`; the loss
    passed at step :math:`t` (measured at the moved parameters, on the next
    batch) realises :math:`A_t = L_{t-1} - L_t`. Batches differ, so :math:`A_t`
    carries noise of size :math:`\\sigma`, the root mean square of recent loss
    changes. A step is *judged* only when its prediction stands out of that
    noise, and is an *overshoot* when it realised too little of it:

    .. math::

        P_{t-1} > \\text{noise\\_sigmas}\\cdot\\sigma
        \\quad\\text{and}\\quad A_t < \\text{min\\_ratio}\\cdot P_{t-1}.

    Each overshoot multiplies ``scale`` by ``shrink`` (not below ``min_scale``);
    every other step multiplies it by :math:`2^{1/\\text{recovery\\_steps}}` (not
    above 1). The applied update is ``scale * u``. The recovery is slow on
    purpose: a rate too high usually stays too high (the schedule's shape is
    right, its scale is not), and a scale that climbs back soon overshoots again.
    At a learning rate that suits the model the predicted decrease per step is
    small against the batch noise, nothing is judged, ``scale`` stays exactly 1
    and the updates are bitwise those of ``inner``; at a rate far too high the
    prediction is large, the loss does not follow it, and the step shrinks until
    it does: the rate is lowered by the loss itself, which the gradient-norm
    tests of :func:`guard` cannot see.

    Steps whose update is zero or non-finite (refused by a :func:`guard` inside
    ``inner``) and steps with a non-finite loss are neither judged nor used for
    :math:`\\sigma`, nor is the step after them. The first ``noise_warmup``
    transitions only estimate :math:`\\sigma`. Without ``loss=`` the wrapper
    passes ``inner``'s updates through unchanged.

    Cost: one float32 dot product of the gradient with the update per step, and
    scalars.

    Args:
      inner: the transformation to control, including the learning rate (the
        prediction needs the final update). Extra arguments, ``loss=`` included,
        are passed on.
      min_ratio: realised / predicted decrease below which a judged step is an
        overshoot, in (0, 1).
      noise_sigmas: how many :math:`\\sigma` the prediction must exceed to be
        judged (> 0).
      shrink: factor applied to ``scale`` at an overshoot, in (0, 1).
      recovery_steps: steps over which ``scale`` doubles back towards 1 (>= 1).
        In the fault example (100x the tuned rate, three seeds) 1000 ended
        -0.2% to +0.4% from the fault-free loss, 100 ended +2.1% to +3.6%.
      min_scale: lower bound of ``scale``, in (0, 1].
      noise_decay: decay of the running :math:`\\sigma^2`, in (0, 1).
      noise_warmup: transitions used only to estimate :math:`\\sigma` (>= 1).
      axis_name: a ``shard_map``/``pmap`` axis whose replicas must agree: the
        dot product is ``psum``-ed (the leaves are read as shards of one
        gradient, as :func:`guard` reads them) and the loss ``pmean``-ed.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an :class:`OvershootState`.

    Raises:
      TypeError: if ``inner`` is not a transformation or ``axis_name`` not a str.
      ValueError: for an out-of-range setting, naming it.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from stablejax.optim import overshoot_control
      >>> loss_fn = lambda w: jnp.sum(w**2)
      >>> tx = overshoot_control(optax.sgd(1.5))  # 1.5 overshoots x**2 (stable below 1)
      >>> w = jnp.array([1.0, -2.0]); state = tx.init(w)
      >>> for _ in range(40):
      ...     loss, g = jax.value_and_grad(loss_fn)(w)
      ...     u, state = tx.update(g, state, w, loss=loss)
      ...     w = w + u
      >>> bool(loss_fn(w) < 1e-3), int(state.overshoots) > 0
      (True, True)
    """
    validation.check_transformation(inner, _WHERE)
    min_ratio = validation.check_unit_interval("min_ratio", min_ratio, _WHERE, example=0.25)
    noise_sigmas = validation.check_positive("noise_sigmas", noise_sigmas, _WHERE, example=2.0)
    shrink = validation.check_unit_interval("shrink", shrink, _WHERE, example=0.5)
    recovery_steps = validation.check_count("recovery_steps", recovery_steps, _WHERE, minimum=1)
    min_scale = validation.check_fraction("min_scale", min_scale, _WHERE, example=1e-3)
    noise_decay = validation.check_unit_interval("noise_decay", noise_decay, _WHERE, example=0.98)
    noise_warmup = validation.check_count("noise_warmup", noise_warmup, _WHERE, minimum=1)
    validation.check_axis_name(axis_name, _WHERE)
    inner = optax.with_extra_args_support(inner)
    f32_max = float(jnp.finfo(jnp.float32).max)
    growth = 2.0 ** (1.0 / recovery_steps)

    def init_fn(params):
        f32 = lambda v: jnp.asarray(v, jnp.float32)
        i32 = lambda v: jnp.asarray(v, jnp.int32)
        return OvershootState(
            scale=f32(1.0),
            overshoots=i32(0),
            judged=i32(0),
            last_ratio=f32(0.0),
            noise_var=f32(0.0),
            noise_count=i32(0),
            prev_loss=f32(0.0),
            prev_pred=f32(0.0),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        loss = extra_args.get("loss")
        if loss is None:
            return new_updates, state._replace(inner_state=new_inner)
        loss = jnp.mean(jnp.asarray(loss, jnp.float32))
        view = clipping.unscaled_view(jax.tree.leaves(updates))
        if view is None:
            pred = _neg_dot(updates, new_updates)
        else:  # inside dynamic_loss_scale: the dot of the scaled gradient, unscaled
            raw, factor = view
            pred = _neg_dot(list(raw), jax.tree.leaves(new_updates)) * factor
        if axis_name is not None:
            loss = lax.pmean(loss, axis_name)
            pred = lax.psum(pred, axis_name)
        accepted = jnp.isfinite(pred) & (pred != 0) & jnp.isfinite(loss)
        # A transition counts when both its steps were accepted (prev_pred != 0).
        valid = accepted & (state.prev_pred != 0)
        realised = state.prev_loss - loss
        sigma = jnp.sqrt(state.noise_var)
        warm = state.noise_count >= noise_warmup
        judged = valid & warm & (state.prev_pred > noise_sigmas * sigma)
        ratio = jnp.clip(realised / jnp.where(judged, state.prev_pred, 1.0), -f32_max, f32_max)
        overshoot = judged & (ratio < min_ratio)
        scale = jnp.where(
            overshoot,
            jnp.maximum(state.scale * shrink, min_scale),
            jnp.minimum(state.scale * growth, 1.0),
        ).astype(jnp.float32)

        count = state.noise_count + 1
        alpha = jnp.maximum(1.0 / count.astype(jnp.float32), 1.0 - noise_decay)
        # Only transitions whose prediction is within the noise measure it: a
        # judged step's loss change is signal (an overshoot's rise would
        # otherwise inflate sigma and hide the next overshoot).
        noisy = valid & ~judged
        noise_var = jnp.where(
            noisy,
            jnp.minimum(state.noise_var + alpha * (realised**2 - state.noise_var), f32_max),
            state.noise_var,
        )
        # x * 1.0 == x bit for bit, so at scale 1 the inner updates pass unchanged.
        new_updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), new_updates)
        new_state = OvershootState(
            scale=scale,
            overshoots=state.overshoots + overshoot.astype(jnp.int32),
            judged=state.judged + judged.astype(jnp.int32),
            last_ratio=jnp.where(judged, ratio, state.last_ratio),
            noise_var=noise_var,
            noise_count=jnp.where(noisy, count, state.noise_count).astype(jnp.int32),
            prev_loss=jnp.where(accepted, loss, state.prev_loss),
            prev_pred=jnp.where(accepted, pred * scale, 0.0).astype(jnp.float32),
            inner_state=new_inner,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
