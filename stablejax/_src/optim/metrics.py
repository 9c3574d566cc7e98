"""Reading a :class:`GuardState` out of any optimizer state, for logging."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stablejax._src.optim.guard import GuardState
from stablejax._src.optim.loss_scale import loss_scale_metrics
from stablejax._src.optim.overshoot import OvershootState
from stablejax._src.typing import Array, PyTree


def find_guard_state(opt_state: PyTree) -> GuardState:
    """Returns the outermost :class:`GuardState` inside ``opt_state``.

    The search walks the state as a pytree, so it sees through ``optax.chain``
    tuples, ``optax.MultiSteps``, ``optax.inject_hyperparams``, masks and user
    containers alike.

    Raises:
      ValueError: if ``opt_state`` holds no guard state; the message says so
        when it holds one as a plain dict, as a checkpoint restored without a
        target does.
    """
    is_guard = lambda x: isinstance(x, GuardState)
    for node in jax.tree.leaves(opt_state, is_leaf=is_guard):
        if is_guard(node):
            return node
    fields = set(GuardState._fields)
    is_restored = lambda x: isinstance(x, dict) and fields <= set(x)
    if any(is_restored(n) for n in jax.tree.leaves(opt_state, is_leaf=is_restored)):
        raise ValueError(
            "stablejax.optim.metrics: this optimizer state holds a GuardState as a plain dict "
            "(GuardState's fields as keys): a checkpoint restored without a target, which "
            "turns NamedTuples into dicts and lists. Restore with the state's structure as the "
            "target, e.g. `ckpt.restore(path, jax.tree.map(lambda x: "
            "jax.ShapeDtypeStruct(x.shape, x.dtype), tx.init(params)))`."
        )
    raise ValueError(
        "stablejax.optim.metrics: no GuardState found in this optimizer state; wrap the "
        "optimizer with stablejax.optim.guard(...) (or use stable_adamw) before calling init."
    )


def metrics(opt_state: PyTree) -> dict[str, Array]:
    """Flat dict of scalars describing the guard's decisions, ready for a logger.

    Keys: ``steps``, ``skipped_total``, ``skipped_nonfinite``, ``skipped_spike``,
    ``consecutive_skips``, ``last_skipped_step``, ``first_nonfinite_leaf``,
    ``grad_norm`` (``+inf`` when the latest norm was not finite: the state holds
    that as a flag, never as a NaN or Inf), ``grad_norm_mean``, ``grad_norm_std``,
    ``loss_mean``, ``halted``, ``give_ups``, ``lr_scale``,
    ``skipped_nonfinite_update``, ``rebaselines``; and, when the state holds an
    :func:`~stablejax.optim.overshoot_control` (as ``stable_adamw``'s does),
    ``overshoot_scale`` and ``overshoots``; and, when it holds a
    :func:`~stablejax.optim.dynamic_loss_scale`, ``loss_scale``, ``overflows``
    and ``loss_scale_good_steps`` (these alone if there is no guard). Values
    are jax scalars (works under ``jit``).

    Args:
      opt_state: the full optimizer state; the guard may be nested anywhere in it.

    Returns:
      A dict from name to scalar array.

    Raises:
      ValueError: if ``opt_state`` holds neither a guard nor a loss-scale state.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from stablejax.optim import guard, metrics
      >>> tx = optax.MultiSteps(guard(optax.adam(1e-3)), every_k_schedule=1)
      >>> state = tx.init(jnp.zeros(2))
      >>> _, state = tx.update(jnp.array([jnp.inf, 1.0]), state)
      >>> int(metrics(state)["skipped_nonfinite"]), int(metrics(state)["first_nonfinite_leaf"])
      (1, 0)
    """
    scaler = loss_scale_metrics(opt_state)
    try:
        s = find_guard_state(opt_state)
    except ValueError:
        if scaler:  # a dynamic_loss_scale without a guard
            return scaler
        raise
    out = {
        "steps": s.steps,
        "skipped_total": s.skipped_total,
        "skipped_nonfinite": s.skipped_nonfinite,
        "skipped_spike": s.skipped_spike,
        "consecutive_skips": s.consecutive,
        "last_skipped_step": s.last_skipped_step,
        "first_nonfinite_leaf": s.first_nonfinite_leaf,
        # The state keeps a non-finite norm as a flag (it stores no NaN or Inf).
        "grad_norm": jnp.where(s.grad_norm_finite, s.grad_norm, jnp.inf),
        "grad_norm_mean": s.norm_mean,
        "grad_norm_std": jnp.sqrt(s.norm_var),
        "loss_mean": s.loss_mean,
        "halted": s.halted,
        "give_ups": s.give_ups,
        "lr_scale": s.lr_scale,
        "skipped_nonfinite_update": s.skipped_nonfinite_update,
        "rebaselines": s.rebaselines,
    }
    is_control = lambda x: isinstance(x, OvershootState)
    for node in jax.tree.leaves(opt_state, is_leaf=is_control):
        if is_control(node):
            out["overshoot_scale"] = node.scale
            out["overshoots"] = node.overshoots
            break
    out.update(scaler)
    # Plain arrays even when the state's leaves are wrapped (flax NNX's
    # Optimizer keeps them in OptArray variables, which jit cannot return).
    return {k: jnp.asarray(v) for k, v in out.items()}


def leaf_path(params: PyTree, index: int | Array) -> str | None:
    """Turns a flat leaf index (as in ``first_nonfinite_leaf``) into the parameter's path.

    Args:
      params: a pytree with the gradient's structure (the parameters).
      index: flat index in ``jax.tree.leaves`` order; -1 means "none".

    Returns:
      The path as ``jax.tree_util.keystr`` writes it, e.g. ``"['dense']['kernel']"``,
      or None for a negative index.

    Raises:
      IndexError: if ``index`` is past the last leaf.

    Examples:
      >>> import jax.numpy as jnp
      >>> from stablejax.optim import leaf_path
      >>> leaf_path({"dense": {"bias": jnp.zeros(2), "kernel": jnp.ones((2, 2))}}, 1)
      "['dense']['kernel']"
    """
    index = int(index)
    if index < 0:
        return None
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    if index >= len(flat):
        raise IndexError(
            f"stablejax.optim.leaf_path: leaf index {index} is out of range for a tree with "
            f"{len(flat)} leaves; pass the params the guarded optimizer was built for."
        )
    return jax.tree_util.keystr(flat[index][0])


def nonfinite_leaf_path(opt_state: PyTree, params: PyTree) -> str | None:
    """Path of the first non-finite gradient leaf at the latest non-finite step, or None."""
    return leaf_path(params, find_guard_state(opt_state).first_nonfinite_leaf)
