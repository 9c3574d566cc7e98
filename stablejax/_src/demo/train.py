"""The demo's training loop: one jitted step per run, per-step host metrics, a progress bar.

A run is a loss, an optimizer and initial parameters (a :class:`Recipe`); its
train step is a plain function ``train_step(params, opt_state, batch)`` so that
:func:`stablejax.debug.locate` can be called on exactly the step that went bad,
with the arguments it had. The jitted version adds one finiteness flag over the
new parameters, the loss and the gradient norm, and the guard's skip counter,
so each step costs a single small device-to-host read.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stablejax._src.optim.metrics import find_guard_state
from stablejax._src.typing import Array, PyTree

Batch = dict[str, np.ndarray]
TrainStep = Callable[[PyTree, PyTree, Batch], tuple[PyTree, PyTree, Array, Array]]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One training configuration.

    Attributes:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      tx: the optimizer; extra arguments (``loss=``) are passed to it when it takes them.
      params: the initial parameters.
    """

    loss_fn: Callable[[PyTree, Batch], Array]
    tx: optax.GradientTransformation
    params: PyTree


def make_train_step(loss_fn: Callable[[PyTree, Batch], Array], tx: Any) -> TrainStep:
    """The plain (unjitted) train step of ``loss_fn`` under ``tx``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      tx: an ``optax.GradientTransformation``; it receives ``loss=`` as an extra
        argument (ignored by optimizers that do not take it).

    Returns:
      ``train_step(params, opt_state, batch) -> (params, opt_state, loss, grad_norm)``.
    """
    tx = optax.with_extra_args_support(tx)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, optax.tree.norm(grads)

    return train_step


def _has_guard(opt_state: PyTree) -> bool:
    try:
        find_guard_state(opt_state)
    except ValueError:
        return False
    return True


def _jit_with_flags(train_step: TrainStep, guarded: bool) -> Callable[..., Any]:
    """Jits ``train_step`` and packs ``[loss, grad_norm, all_finite, skipped_total]``."""

    def stepped(params, opt_state, batch):
        params, opt_state, loss, gnorm = train_step(params, opt_state, batch)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        for leaf in jax.tree.leaves(params):
            finite = finite & jnp.all(jnp.isfinite(leaf))
        skipped = find_guard_state(opt_state).skipped_total if guarded else jnp.int32(0)
        scalars = jnp.stack(
            [
                loss.astype(jnp.float32),
                gnorm.astype(jnp.float32),
                finite.astype(jnp.float32),
                skipped.astype(jnp.float32),
            ]
        )
        return params, opt_state, scalars

    return jax.jit(stepped)


@dataclasses.dataclass
class RunLog:
    """What one training run did, step by step.

    Attributes:
      losses: loss per step (NaN/Inf kept as is).
      grad_norms: global gradient norm per step.
      skipped: steps the guard refused.
      nonfinite_steps: steps whose loss, gradient norm or new parameters were
        not finite (a guarded run lists the bad batches it skipped here too).
      params: the parameters after the last step run.
      seconds: wall time of the run, compilation included.
    """

    losses: list[float] = dataclasses.field(default_factory=list)
    grad_norms: list[float] = dataclasses.field(default_factory=list)
    skipped: list[int] = dataclasses.field(default_factory=list)
    nonfinite_steps: list[int] = dataclasses.field(default_factory=list)
    params: PyTree = None
    seconds: float = 0.0

    @property
    def nonfinite_step(self) -> int | None:
        """The first non-finite step, ``None`` if every step stayed finite."""
        return self.nonfinite_steps[0] if self.nonfinite_steps else None

    @property
    def finished_finite(self) -> bool:
        """Finite parameters and final loss, every non-finite step refused by the guard."""
        unskipped = [i for i in self.nonfinite_steps if i not in self.skipped]
        return self.params_finite and math.isfinite(self.final_loss) and not unskipped

    @property
    def steps_run(self) -> int:
        """How many steps ran."""
        return len(self.losses)

    @property
    def final_loss(self) -> float:
        """The loss of the last step that was not skipped (NaN if none)."""
        for i in range(len(self.losses) - 1, -1, -1):
            if i not in self.skipped:
                return self.losses[i]
        return math.nan

    @property
    def params_finite(self) -> bool:
        """Whether every parameter is finite after the run."""
        leaves = jax.tree.leaves(self.params)
        return all(bool(np.isfinite(np.asarray(x)).all()) for x in leaves)

    def history(self) -> list[dict[str, float]]:
        """The steps as ``{'loss', 'grad_norm'}`` dicts, for ``locate(history=...)``."""
        return [{"loss": a, "grad_norm": b} for a, b in zip(self.losses, self.grad_norms)]


@dataclasses.dataclass
class Run:
    """A recipe compiled once: its loss, plain step, jitted step and initial state."""

    loss_fn: Callable[[PyTree, Batch], Array]
    train_step: TrainStep
    jitted: Callable[..., Any]
    params: PyTree
    opt_state: PyTree

    @classmethod
    def build(cls, recipe: Recipe) -> Run:
        """Builds the train step of ``recipe`` and initialises the optimizer."""
        train_step = make_train_step(recipe.loss_fn, recipe.tx)
        opt_state = recipe.tx.init(recipe.params)
        jitted = _jit_with_flags(train_step, _has_guard(opt_state))
        return cls(recipe.loss_fn, train_step, jitted, recipe.params, opt_state)

    def train(
        self,
        batches: Sequence[Batch],
        *,
        stop_on_nonfinite: bool,
        on_step: Callable[[int, float], None] | None = None,
    ) -> tuple[RunLog, tuple[PyTree, PyTree, Batch] | None]:
        """Trains over ``batches``.

        Args:
          batches: one batch per step.
          stop_on_nonfinite: stop at the first non-finite step (the naive run).
          on_step: called after each step with its index and loss (progress bars).

        Returns:
          The log, and the ``(params, opt_state, batch)`` the first non-finite
          step started from (``None`` if there was none), for ``locate``.
        """
        start = time.perf_counter()
        log = RunLog()
        params, opt_state = self.params, self.opt_state
        culprit = None
        last_skipped = 0
        for i, batch in enumerate(batches):
            new_params, new_state, scalars = self.jitted(params, opt_state, batch)
            loss, gnorm, finite, skipped = (float(v) for v in np.asarray(scalars))
            log.losses.append(loss)
            log.grad_norms.append(gnorm)
            if int(skipped) > last_skipped:
                log.skipped.append(i)
                last_skipped = int(skipped)
            if not finite:
                if culprit is None:
                    culprit = (params, opt_state, batch)
                log.nonfinite_steps.append(i)
            params, opt_state = new_params, new_state
            if on_step is not None:
                on_step(i, loss)
            if log.nonfinite_step is not None and stop_on_nonfinite:
                break
        log.params = params
        log.seconds = time.perf_counter() - start
        return log, culprit
