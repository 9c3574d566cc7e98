"""Flax NNX training with stablejax: safe layers, ``stable_adamw`` and the guard's metrics.

The NNX twin of ``examples/linen_training.py``: the same speaker classifier
on the same synthetic data (variable lengths, silent utterances, one batch with
NaN), built from ``stablejax.nnx`` layers and trained with ``nnx.Optimizer``
around ``stablejax.optim.stable_adamw``. The loss goes to the optimizer as
``optimizer.update(model, grads, loss=loss)`` so the guard sees it too.

Run: ``python examples/nnx_training.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stablejax import nnx as snnx
from stablejax import optim

SPEAKERS, FRAMES, FEATURES, BATCH = 4, 16, 8, 32


class SpeakerNet(nnx.Module):
    """Frames -> projection -> RMSNorm -> masked StdPool -> LayerNorm -> cosine head."""

    def __init__(self, rngs: nnx.Rngs, hidden: int = 32):
        self.proj = nnx.Linear(FEATURES, hidden, use_bias=False, rngs=rngs)
        self.norm = snnx.RMSNorm(hidden, rngs=rngs)
        self.pool = snnx.StdPool()
        self.pooled_norm = snnx.LayerNorm(2 * hidden, rngs=rngs)
        self.embed = nnx.Linear(2 * hidden, hidden, rngs=rngs)
        self.unit = snnx.L2Normalize(
            use_scale=True, scale_init=nnx.initializers.constant(8.0), rngs=rngs
        )
        self.head = nnx.Linear(hidden, SPEAKERS, use_bias=False, rngs=rngs)

    def __call__(self, frames: jax.Array, mask: jax.Array) -> jax.Array:
        h = nnx.gelu(self.norm(self.proj(frames)))
        z = self.embed(self.pooled_norm(self.pool(h, mask)))
        return self.head(self.unit(z))


def make_batches(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Synthetic utterances: per-speaker means and scales, random lengths, some silent.

    The batch at ``steps // 2`` carries NaN in two utterances.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(SPEAKERS, FEATURES)).astype(np.float32)
    scales = rng.uniform(0.3, 2.0, size=(SPEAKERS, FEATURES)).astype(np.float32)
    batches = []
    for i in range(steps):
        y = rng.integers(0, SPEAKERS, size=BATCH)
        noise = rng.normal(size=(BATCH, FRAMES, FEATURES))
        x = (centers[y][:, None] + scales[y][:, None] * noise).astype(np.float32)
        lengths = rng.integers(FRAMES // 4, FRAMES + 1, size=BATCH)
        mask = np.arange(FRAMES)[None, :] < lengths[:, None]
        x[~mask] = 0.0
        x[rng.random(BATCH) < 0.05] = 0.0  # silent utterances
        if i == steps // 2:
            x[[4, 9], :3] = np.nan  # a corrupted recording
        batches.append({"x": x, "mask": mask, "y": y.astype(np.int32)})
    return batches


def loss_fn(model: SpeakerNet, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean softmax cross-entropy of the speaker logits."""
    logits = model(batch["x"], batch["mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


@nnx.jit
def train_step(model: SpeakerNet, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]):
    """One guarded AdamW step; returns the loss and the guard's metrics."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads, loss=loss)
    return loss, optim.metrics(optimizer.opt_state)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains the model; returns the numbers it logged.

    Args:
      argv: command-line arguments (``--quick``, ``--steps N``, ``--log-every N``).

    Returns:
      ``initial_loss``, ``final_loss`` (mean of the last 10 accepted steps),
      ``accuracy`` on a fresh batch, ``skipped_nonfinite``, ``skipped_total``,
      ``params_finite``, ``steps`` and ``log`` (the metrics rows printed).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=None)
    args = parser.parse_args(argv)
    steps = args.steps or (40 if args.quick else 400)
    log_every = args.log_every or max(1, steps // 10)

    batches = make_batches(steps + 1)
    model = SpeakerNet(nnx.Rngs(0))
    tx = optim.stable_adamw(3e-3, warmup_steps=max(1, steps // 10), total_steps=steps)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    losses, log = [], []
    for step in range(steps):
        loss, stats = train_step(model, optimizer, batches[step])
        losses.append(float(loss))
        if step % log_every == 0 or step == steps - 1 or int(stats["consecutive_skips"]):
            row = {"step": step, "loss": float(loss)} | {
                k: float(stats[k])
                for k in ("grad_norm", "skipped_total", "skipped_nonfinite", "lr_scale")
            }
            log.append(row)
            print(
                f"step {step:4d}  loss {row['loss']:8.4f}  grad_norm {row['grad_norm']:8.4f}  "
                f"skipped {int(row['skipped_total'])} (non-finite "
                f"{int(row['skipped_nonfinite'])})  lr_scale {row['lr_scale']:.3g}"
            )
    test = jax.tree.map(jnp.asarray, batches[steps])
    accuracy = float(jnp.mean(jnp.argmax(model(test["x"], test["mask"]), -1) == test["y"]))
    kept = [v for v in losses if math.isfinite(v)]
    params = nnx.state(model, nnx.Param)
    result = {
        "steps": steps,
        "initial_loss": losses[0],
        "final_loss": float(np.mean(kept[-10:])),
        "accuracy": accuracy,
        "skipped_total": int(log[-1]["skipped_total"]),
        "skipped_nonfinite": int(log[-1]["skipped_nonfinite"]),
        "params_finite": all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(params)),
        "log": log,
    }
    print(
        f"done: loss {result['initial_loss']:.4f} -> {result['final_loss']:.4f}, accuracy "
        f"{accuracy:.2f}, {result['skipped_nonfinite']} non-finite step(s) skipped"
    )
    return result


if __name__ == "__main__":
    main()
