"""``guard``: an Optax wrapper that skips non-finite and spiking steps.

The decision costs one float32 sum of squares per gradient leaf. A sum of
squares is non-finite iff the leaf holds a NaN or an Inf or its squares overflow
float32, so the same numbers give both the finiteness flag and the global norm
for the spike test; a :func:`stablejax.optim.clip_by_global_norm` placed first
in the wrapped chain reuses that norm instead of reading the gradient again.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from stablejax._src import validation
from stablejax._src.optim import clipping
from stablejax._src.optim.known_sums import KnownSums
from stablejax._src.optim.selected_state import update_reading_selected_state
from stablejax._src.typing import Array

_WHERE = "stablejax.optim.guard"
# The spike test's standard deviation is floored at this fraction of the running
# mean, so a nearly constant history (std ~ 0) does not flag every small rise.
_REL_STD_FLOOR = 0.1
# The same for the loss, whose spikes are small relative to its level.
_LOSS_REL_STD_FLOOR = 0.01


class GuardState(NamedTuple):
    """State of :func:`guard`. Counters are int32 scalars, statistics float32.

    Attributes:
      steps: updates seen, skipped or not.
      skipped_total: steps whose update was refused (any reason, halted included).
      skipped_nonfinite: steps refused for a non-finite gradient or loss.
      skipped_nonfinite_update: steps whose gradient and loss were finite but
        whose update or new inner state, as ``inner`` computed it, was not (a
        float16 Adam dividing 0 by 0, say); refused like a non-finite gradient.
        Only counted where the guard checks the inner output (``check_updates``).
      skipped_spike: steps refused because the gradient norm was a spike.
      consecutive: current run of refused steps.
      last_skipped_step: 0-based index of the latest refused step, -1 if none.
      first_nonfinite_leaf: flat index (``jax.tree.leaves`` order) of the first
        gradient leaf whose sum of squares was not finite at the latest
        non-finite step (a NaN or Inf entry, or finite entries whose squares
        overflow float32); -1 if none, or if only the loss or only the inner
        output was non-finite.
      grad_norm: global gradient norm of the latest step when it was finite;
        0 when it was not (then ``grad_norm_finite`` is False). No NaN or Inf
        is ever stored; :func:`~stablejax.optim.metrics` reports such a norm
        as ``+inf``.
      grad_norm_finite: whether the latest step's gradient norm was finite.
      norm_count: accepted steps in the running statistics (since the last reset).
      norm_mean: running mean of the norm over accepted steps.
      norm_var: running variance of the norm over accepted steps.
      loss_mean: running mean of the loss over accepted steps (0 without ``loss=``).
      loss_var: running variance of the loss over accepted steps.
      halted: True once ``on_give_up='halt'`` has fired; every later step is refused.
      give_ups: times ``max_consecutive_skips`` was reached.
      lr_scale: factor applied to the updates by ``lr_backoff`` (1 without it).
      good_streak: accepted steps since ``lr_scale`` last changed.
      spike_run: current run of steps refused as spikes only; at
        ``spike_warmup`` the statistics re-baseline.
      rebaselines: times a run of spike refusals restarted the statistics.
      inner_state: state of the wrapped transformation.
    """

    steps: Array
    skipped_total: Array
    skipped_nonfinite: Array
    skipped_spike: Array
    consecutive: Array
    last_skipped_step: Array
    first_nonfinite_leaf: Array
    grad_norm: Array
    norm_count: Array
    norm_mean: Array
    norm_var: Array
    loss_mean: Array
    loss_var: Array
    halted: Array
    give_ups: Array
    lr_scale: Array
    good_streak: Array
    skipped_nonfinite_update: Array
    grad_norm_finite: Array
    spike_run: Array
    rebaselines: Array
    inner_state: Any


def guard(
    inner: optax.GradientTransformation,
    *,
    max_consecutive_skips: int | None = 100,
    on_give_up: Literal["halt", "reset"] = "halt",
    spike_threshold: float | None = 6.0,
    spike_warmup: int = 20,
    loss_spike_threshold: float | None = None,
    stats_decay: float = 0.98,
    lr_backoff: float | None = None,
    lr_recovery_steps: int = 50,
    min_lr_scale: float = 1e-2,
    axis_name: str | None = None,
    check_updates: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that a poisoned step changes nothing.

    A step is refused when the loss passed as ``loss=`` is non-finite, when a
    gradient leaf is non-finite, or when the global norm :math:`n` is a spike
    against running statistics of accepted steps (after ``spike_warmup`` of them):

    .. math::

        \\frac{n - \\mu}{\\max(\\sigma,\\; 0.1\\,\\mu)} > \\text{spike\\_threshold}.

    A refused step returns exact zeros (chosen by ``jnp.where``, never by
    multiplying by 0, since :math:`0\\cdot\\mathrm{NaN} = \\mathrm{NaN}`), leaves
    the inner state bitwise unchanged and does not touch :math:`\\mu, \\sigma^2`.
    The statistics are an exponential moving average over accepted steps with
    weight :math:`\\alpha = \\max(1/t, 1-\\text{stats\\_decay})`: exact mean and
    variance for the first :math:`1/(1-\\text{stats\\_decay})` accepted steps,
    then a window of about that many. So one NaN causes exactly one skip.

    The global norm is :math:`\\sqrt{\\sum_\\ell \\sum g_\\ell^2}` in float32 for
    every gradient dtype (float16 and bfloat16 are squared in float32; float64
    leaves, under x64, in float64). If a finite gradient's squares overflow that
    dtype (float32: entries beyond ~1.8e19) the norm is Inf and the step counts
    as non-finite, deliberately: such a step would overflow Adam's second
    moment anyway.

    **Spread that cannot collapse.** A step with a zero norm (a frozen or fully
    masked phase) is applied but not entered into the statistics, so a frozen
    phase cannot leave :math:`\\mu = \\sigma = 0` behind and make every later
    step a spike. A run of ``spike_warmup`` steps in a row refused as spikes
    means the norm's level has changed, not that every step is bad: the
    statistics re-baseline (restart their warm-up, counted in ``rebaselines``)
    and a run of spikes never gives up, halts or resets the inner state.

    **What comes out is finite.** Where the guard checks the inner output
    (``check_updates``), an update or new inner state that ``inner`` made
    non-finite from a finite gradient (float16 Adam: ``eps=1e-8`` is 0 in
    float16, so an exactly-zero gradient entry gives 0/0) refuses the step like
    a non-finite gradient, counted in ``skipped_nonfinite_update``. That check
    reads the update once more (XLA must write it to memory before deciding),
    so by default it is on only when a gradient, parameter or inner-state leaf
    is float16, where finite inputs do overflow or underflow; in float32,
    bfloat16 and float64 the optax transformations cannot turn a gradient whose
    sum of squares is finite into a non-finite update (unless built with
    ``eps=0``). Everywhere any non-finite element of an accepted update is
    also replaced by 0 in the loop that writes it, at no cost, so no NaN or Inf
    ever leaves the guard. No NaN or Inf is stored in the guard's own fields
    either; where the inner output is not checked, the inner state can still take
    a NaN the inner chain made itself (an all-reduce inside the chain spreading
    another replica's NaN when ``axis_name`` is not set): pass
    ``check_updates=True`` to refuse such steps too.

    After ``max_consecutive_skips`` refused steps in a row, on a step refused as
    non-finite (a run of spikes re-baselines instead, see above): ``'halt'`` sets
    ``halted`` and refuses every later step (``optax.apply_if_finite`` instead
    applies the NaN update, writing NaN into Adam's moments); ``'reset'``
    re-initialises the inner state with ``inner.init(params)`` (the gradient as
    template if ``params`` is None), restarts the running statistics and the
    spike warm-up, and carries on: a stale norm history or a long bad stretch of
    data can then no longer block training forever.

    With ``lr_backoff`` = :math:`b`, each run of refused steps multiplies
    ``lr_scale`` by :math:`b` once, on its first step (not below
    ``min_lr_scale``), and each run of ``lr_recovery_steps`` accepted steps
    divides it by :math:`b` (not above 1), as dynamic loss scaling does; accepted
    updates are multiplied by ``lr_scale``. Skipping cannot change the gradient
    of the next step (the parameters did not move), so halving once per run is
    enough to make the steps after it smaller, and a long bad stretch of data
    does not drive the rate to its floor.

    Args:
      inner: the transformation to protect, typically a whole ``optax.chain``.
        Extra arguments (``loss=`` included) are passed on to it.
      max_consecutive_skips: refused steps in a row before giving up (>= 1), or
        None to never give up.
      on_give_up: ``'halt'`` or ``'reset'``.
      spike_threshold: z-score above which the norm is a spike (> 0), or None
        to skip only non-finite steps.
      spike_warmup: accepted steps before spikes are tested (>= 2).
      loss_spike_threshold: z-score above which the loss passed as ``loss=`` is a
        spike (> 0), tested as the norm is (std floored at 1% of the mean loss),
        or None (default) not to test the loss. The loss at step :math:`t` is
        measured at parameters the step :math:`t-1` update already moved, so a
        loss spike mostly matters with ``lr_backoff``: the step sizes after it
        shrink.
      stats_decay: decay of the running norm statistics, in (0, 1).
      lr_backoff: factor in (0, 1) applied to ``lr_scale`` at the start of each
        run of refused steps, or None for no backoff.
      lr_recovery_steps: accepted steps between two recoveries of ``lr_scale``.
      min_lr_scale: lower bound of ``lr_scale``, in (0, 1].
      axis_name: a ``shard_map``/``pmap`` axis whose replicas must agree: per-leaf
        sums of squares are ``psum``-ed (the leaves are read as shards of one
        gradient) and the loss flag ``pmax``-ed. Under plain ``jit`` with sharded
        arrays the decision is already global; leave it None.
      check_updates: refuse a step whose inner update or new inner state is
        non-finite (True), never check the inner output as a whole (False), or
        None (default) for True exactly when some gradient, parameter or inner
        state leaf is float16. True costs one more pass over the update.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`GuardState`; ``update`` accepts ``loss=``.

    Raises:
      TypeError: if ``inner`` is not a transformation (``optax.adam`` rather
        than ``optax.adam(1e-3)``) or ``axis_name`` is not a str.
      ValueError: for an unknown ``on_give_up`` or an out-of-range setting.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from stablejax.optim import guard, metrics
      >>> tx = guard(optax.adam(1e-3))
      >>> state = tx.init(jnp.zeros(3))
      >>> u, state = tx.update(jnp.array([1.0, jnp.nan, 1.0]), state, loss=jnp.nan)
      >>> u.tolist(), int(metrics(state)["skipped_nonfinite"])
      ([0.0, 0.0, 0.0], 1)
    """
    if on_give_up not in ("halt", "reset"):
        raise ValueError(
            f"{_WHERE}: on_give_up={on_give_up!r} is not known; use 'halt' (refuse every "
            "later step) or 'reset' (re-initialise the inner state and carry on)."
        )
    validation.check_transformation(inner, _WHERE)
    validation.check_axis_name(axis_name, _WHERE)
    if max_consecutive_skips is not None:
        max_consecutive_skips = validation.check_count(
            "max_consecutive_skips", max_consecutive_skips, _WHERE, minimum=1
        )
    if spike_threshold is not None:
        spike_threshold = validation.check_positive(
            "spike_threshold", spike_threshold, _WHERE, example=6.0
        )
    if loss_spike_threshold is not None:
        loss_spike_threshold = validation.check_positive(
            "loss_spike_threshold", loss_spike_threshold, _WHERE, example=6.0
        )
    spike_warmup = validation.check_count("spike_warmup", spike_warmup, _WHERE, minimum=2)
    stats_decay = validation.check_unit_interval("stats_decay", stats_decay, _WHERE, example=0.98)
    if lr_backoff is not None:
        lr_backoff = validation.check_unit_interval("lr_backoff", lr_backoff, _WHERE, example=0.5)
    lr_recovery_steps = validation.check_count(
        "lr_recovery_steps", lr_recovery_steps, _WHERE, minimum=1
    )
    min_lr_scale = validation.check_fraction("min_lr_scale", min_lr_scale, _WHERE, example=0.01)
    if check_updates is not None and not isinstance(check_updates, bool):
        raise TypeError(
            f"{_WHERE}: `check_updates` must be True, False or None (automatic), "
            f"got {check_updates!r}."
        )
    inner = optax.with_extra_args_support(inner)
    f32_max = float(jnp.finfo(jnp.float32).max)

    def init_fn(params):
        i32 = lambda v: jnp.asarray(v, jnp.int32)
        f32 = lambda v: jnp.asarray(v, jnp.float32)
        return GuardState(
            steps=i32(0),
            skipped_total=i32(0),
            skipped_nonfinite=i32(0),
            skipped_spike=i32(0),
            consecutive=i32(0),
            last_skipped_step=i32(-1),
            first_nonfinite_leaf=i32(-1),
            grad_norm=f32(0.0),
            norm_count=i32(0),
            norm_mean=f32(0.0),
            norm_var=f32(0.0),
            loss_mean=f32(0.0),
            loss_var=f32(0.0),
            halted=jnp.asarray(False),
            give_ups=i32(0),
            lr_scale=f32(1.0),
            good_streak=i32(0),
            skipped_nonfinite_update=i32(0),
            grad_norm_finite=jnp.asarray(True),
            spike_run=i32(0),
            rebaselines=i32(0),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        leaves = jax.tree.leaves(updates)
        # From an enclosing dynamic_loss_scale when there is one (its overflow
        # check already summed the squares of the scaled gradient).
        sumsq = clipping.hinted_sumsq(leaves, isolated=True)
        # Sums of squares a norm inside `inner` (optax's own clip) would take of
        # these very leaves again: answered with these (known_sums). Local sums:
        # inside shard_map that norm is this shard's, not the psum-ed one.
        known = KnownSums(leaves, sumsq) if leaves and sumsq.dtype == jnp.float32 else None
        if axis_name is not None:
            sumsq = lax.psum(sumsq, axis_name)
        norm = jnp.sqrt(jnp.sum(sumsq))
        # Derive every flag from the norm, not the raw sum: XLA treats sqrt as
        # expensive and materialises it once, where it would otherwise copy the
        # whole chain of per-leaf additions into every elementwise loop.
        grads_finite = jnp.isfinite(norm)
        loss = extra_args.get("loss")
        loss_finite = jnp.asarray(True)
        if loss is not None:
            loss_finite = jnp.all(jnp.isfinite(jnp.asarray(loss)))
            if axis_name is not None:
                loss_finite = lax.pmin(loss_finite.astype(jnp.int32), axis_name) > 0
        nonfinite = ~(grads_finite & loss_finite)

        warm = state.norm_count >= spike_warmup
        std = jnp.maximum(jnp.sqrt(state.norm_var), _REL_STD_FLOOR * state.norm_mean)
        if spike_threshold is None:
            spike = jnp.asarray(False)
        else:
            spike = warm & ~nonfinite & (norm - state.norm_mean > spike_threshold * std)
            spike = spike & (norm > 0)
        loss_value = jnp.zeros([], jnp.float32)
        if loss is not None:
            loss_value = jnp.mean(jnp.asarray(loss, jnp.float32))
            if axis_name is not None:
                loss_value = lax.pmean(loss_value, axis_name)
        if loss_spike_threshold is not None and loss is not None:
            loss_std = jnp.maximum(
                jnp.sqrt(state.loss_var), _LOSS_REL_STD_FLOOR * jnp.abs(state.loss_mean)
            )
            rise = loss_value - state.loss_mean
            spike = spike | (warm & ~nonfinite & (rise > loss_spike_threshold * loss_std))

        def inner_update():
            with clipping.shared_norm(leaves, norm):
                return inner.update(updates, state.inner_state, params, **extra_args)

        old_leaves = jax.tree.leaves(state.inner_state)
        fresh_leaves = None
        if on_give_up == "reset" and max_consecutive_skips is not None:
            fresh = inner.init(params if params is not None else updates)
            jax.tree.map(lambda f, o: None, fresh, state.inner_state)  # same structure
            fresh_leaves = jax.tree.leaves(fresh)

        def decide(skip):
            """Run length, give-up and reset for the step's final refusal flag."""
            consecutive = jnp.where(skip, state.consecutive + 1, 0)
            give_up = jnp.asarray(False)
            if max_consecutive_skips is not None:
                # A run of spikes re-baselines the statistics instead (below).
                give_up = skip & ~state.halted & ~spike & (consecutive >= max_consecutive_skips)
            reset = give_up if on_give_up == "reset" else jnp.asarray(False)
            return consecutive, give_up, reset

        def kept_leaf(i, reset):
            kept = old_leaves[i]
            if fresh_leaves is not None:  # a reset is always a refused step
                kept = jnp.where(reset, jnp.asarray(fresh_leaves[i], kept.dtype), kept)
            return kept

        check = check_updates
        if check is None:
            check = any(
                getattr(x, "dtype", None) == jnp.float16
                for x in leaves + jax.tree.leaves(params) + old_leaves
            )
        bad_update = jnp.asarray(False)
        skip_in = state.halted | nonfinite | spike
        if check:
            # Selected after the fact: the refusal now depends on the whole output.
            new_updates, new_inner = update_reading_selected_state(
                inner_update, state.inner_state, lambda i, new: new, known=known
            )
            out_ok = jnp.asarray(True)
            for x in jax.tree.leaves((new_updates, new_inner)):
                x = jnp.asarray(x)
                if jnp.issubdtype(x.dtype, jnp.inexact) and x.size:
                    out_ok = out_ok & jnp.all(jnp.isfinite(x))
            if axis_name is not None:
                out_ok = lax.pmin(out_ok.astype(jnp.int32), axis_name) > 0
            bad_update = ~skip_in & ~out_ok
            skip = skip_in | bad_update
            consecutive, give_up, reset = decide(skip)
            treedef = jax.tree.structure(state.inner_state)
            new_inner = jax.tree.unflatten(
                treedef,
                [
                    jnp.where(skip, kept_leaf(i, reset), new)
                    for i, new in enumerate(jax.tree.leaves(new_inner))
                ],
            )
        else:
            skip = skip_in
            consecutive, give_up, reset = decide(skip)

            # The inner update is computed every step and the result chosen with
            # jnp.where: the selects fuse into the optimizer's own elementwise
            # loops, where a lax.cond would materialise the update and break that
            # fusion. A refused step's NaN arithmetic is discarded, never
            # multiplied by 0.
            def choose(i, new):
                # The select reading `new` comes last: XLA then keeps the selected
                # leaf as one loop that its readers share (after a select of a
                # broadcast constant it would copy the whole chain into each).
                return jnp.where(skip, kept_leaf(i, reset), new)

            new_updates, new_inner = update_reading_selected_state(
                inner_update, state.inner_state, choose, known=known
            )
        if lr_backoff is not None:
            new_updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), new_updates)

        def out(u):
            u = jnp.asarray(u)
            if not jnp.issubdtype(u.dtype, jnp.inexact):
                return jnp.where(skip, jnp.zeros_like(u), u)
            # Per element, in the loop that writes the update, so that no NaN or
            # Inf can leave the guard even where the output is not checked:
            # |u| <= lim keeps u, with lim the dtype's largest number on an
            # accepted step and -1 on a refused one (nothing passes, NaN
            # included: every comparison with NaN is false). One comparison per
            # element instead of isfinite's, a not and an or.
            if jnp.issubdtype(u.dtype, jnp.complexfloating):
                return jnp.where(skip | ~jnp.isfinite(u), jnp.zeros_like(u), u)
            lim = jnp.where(skip, -1.0, float(jnp.finfo(u.dtype).max)).astype(u.dtype)
            return jnp.where(jnp.abs(u) <= lim, u, jnp.zeros_like(u))

        new_updates = jax.tree.map(out, new_updates)

        # Running statistics over accepted steps with a non-zero norm only; any
        # other step leaves them bitwise as is. float32, clamped to stay finite.
        enter = ~skip & (norm > 0)
        stat_norm = jnp.minimum(jnp.where(grads_finite, norm, 0.0), f32_max).astype(jnp.float32)
        count = state.norm_count + 1
        alpha = jnp.maximum(1.0 / count.astype(jnp.float32), 1.0 - stats_decay)
        delta = stat_norm - state.norm_mean
        mean = jnp.where(enter, state.norm_mean + alpha * delta, state.norm_mean)
        # Clamped before the product, or 0 * Inf would make a NaN at alpha = 1.
        sq = lambda d: jnp.minimum(d**2, f32_max)
        var = (1.0 - alpha) * jnp.minimum(state.norm_var + alpha * sq(delta), f32_max)
        var = jnp.where(enter, var, state.norm_var)
        count = jnp.where(enter, count, state.norm_count)
        ldelta = loss_value - state.loss_mean
        lvar = (1.0 - alpha) * jnp.minimum(state.loss_var + alpha * sq(ldelta), f32_max)
        lmean = jnp.where(skip, state.loss_mean, state.loss_mean + alpha * ldelta)
        lvar = jnp.where(skip, state.loss_var, lvar)
        lmean = jnp.clip(lmean, -f32_max, f32_max)
        # A run of spike refusals: the level moved, restart the statistics.
        spike_only = skip & spike & ~state.halted
        spike_run = jnp.where(spike_only, state.spike_run + 1, 0)
        rebaseline = spike_only & (spike_run >= spike_warmup)
        restart = reset | rebaseline
        f0 = jnp.zeros([], jnp.float32)
        mean, var = jnp.where(restart, f0, mean), jnp.where(restart, f0, var)
        lmean, lvar = jnp.where(restart, f0, lmean), jnp.where(restart, f0, lvar)
        count = jnp.where(restart, 0, count)
        spike_run = jnp.where(restart, 0, spike_run)

        bad_leaf = jnp.argmax(~jnp.isfinite(sumsq)).astype(jnp.int32) if leaves else 0
        bad_leaf = jnp.where(jnp.all(jnp.isfinite(sumsq)), -1, bad_leaf)
        lr_scale, good_streak = state.lr_scale, state.good_streak
        if lr_backoff is not None:
            # Once per run of refused steps: a corrupted shard of 500 NaN batches
            # is one event, not 500 halvings of the learning rate.
            first = skip & (state.consecutive == 0)
            streak = jnp.where(skip, 0, good_streak + 1)
            recover = streak >= lr_recovery_steps
            up = jnp.minimum(lr_scale / lr_backoff, 1.0)
            down = jnp.maximum(lr_scale * lr_backoff, min_lr_scale)
            lr_scale = jnp.where(first, down, jnp.where(recover, up, lr_scale))
            good_streak = jnp.where(recover, 0, streak)
        as_i32 = lambda b: jnp.asarray(b).astype(jnp.int32)
        new_state = GuardState(
            steps=state.steps + 1,
            skipped_total=state.skipped_total + as_i32(skip),
            skipped_nonfinite=state.skipped_nonfinite + as_i32(nonfinite),
            skipped_spike=state.skipped_spike + as_i32(spike),
            consecutive=as_i32(jnp.where(reset | rebaseline, 0, consecutive)),
            last_skipped_step=jnp.where(skip, state.steps, state.last_skipped_step),
            first_nonfinite_leaf=jnp.where(nonfinite, bad_leaf, state.first_nonfinite_leaf),
            grad_norm=stat_norm,
            norm_count=as_i32(count),
            norm_mean=mean,
            norm_var=var,
            loss_mean=lmean,
            loss_var=lvar,
            halted=state.halted | (give_up & (on_give_up == "halt")),
            give_ups=state.give_ups + as_i32(give_up),
            lr_scale=jnp.asarray(lr_scale, jnp.float32),
            good_streak=as_i32(good_streak),
            skipped_nonfinite_update=state.skipped_nonfinite_update + as_i32(bad_update),
            grad_norm_finite=grads_finite,
            spike_run=as_i32(spike_run),
            rebaselines=state.rebaselines + as_i32(rebaseline),
            inner_state=new_inner,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
