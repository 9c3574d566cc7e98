"""Flax linen training with stablejax: safe layers, ``stable_adamw`` and the guard's metrics.

A small speaker classifier on synthetic frame sequences of different lengths,
some of them silent, and one batch carrying NaN (a corrupted recording):

* ``stablejax.nn.RMSNorm`` and ``stablejax.nn.LayerNorm`` instead of flax's,
  ``stablejax.nn.StdPool`` (masked mean+std pooling over time: a silent
  utterance gives std 0 with a finite gradient, where ``jnp.std`` gives NaN),
  ``stablejax.nn.L2Normalize`` for a cosine classifier head;
* ``stablejax.optim.stable_adamw``: warm-up, safe clipping and the guard that
  refuses the NaN batch without touching Adam's moments;
* ``stablejax.optim.metrics`` logged every few steps (skips, grad norm, lr scale).

Run: ``python examples/linen_training.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from stablejax import nn as snn
from stablejax import optim

SPEAKERS, FRAMES, FEATURES, BATCH = 4, 16, 8, 32


class SpeakerNet(nn.Module):
    """Frames -> projection -> RMSNorm -> masked StdPool -> LayerNorm -> cosine head."""

    @nn.compact
    def __call__(self, frames: jax.Array, mask: jax.Array) -> jax.Array:
        h = nn.Dense(32, use_bias=False)(frames)
        h = nn.gelu(snn.RMSNorm()(h))
        pooled = snn.StdPool()(h, mask)  # [mean, std] over the valid frames
        z = nn.Dense(32)(snn.LayerNorm()(pooled))
        z = snn.L2Normalize(use_scale=True, scale_init=nn.initializers.constant(8.0))(z)
        return nn.Dense(SPEAKERS, use_bias=False)(z)


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


def loss_fn(params: Any, batch: dict[str, jax.Array], model: SpeakerNet) -> jax.Array:
    """Mean softmax cross-entropy of the speaker logits."""
    logits = model.apply({"params": params}, batch["x"], batch["mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains the model; returns the numbers it logged.

    Args:
      argv: command-line arguments (``--quick``, ``--steps N``, ``--log-every N``).

    Returns:
      ``initial_loss``, ``final_loss`` (mean of the last 10 accepted steps),
      ``accuracy`` on a fresh batch, ``skipped_nonfinite``, ``skipped_total``,
      ``steps`` and ``log`` (the metrics rows printed).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=None)
    args = parser.parse_args(argv)
    steps = args.steps or (40 if args.quick else 400)
    log_every = args.log_every or max(1, steps // 10)

    batches = make_batches(steps + 1)
    model = SpeakerNet()
    first = jax.tree.map(jnp.asarray, batches[0])
    params = jax.jit(model.init)(jax.random.key(0), first["x"], first["mask"])["params"]
    tx = optim.stable_adamw(3e-3, warmup_steps=max(1, steps // 10), total_steps=steps)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, model)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss, optim.metrics(opt_state)

    losses, log = [], []
    for step in range(steps):
        params, opt_state, loss, stats = train_step(params, opt_state, batches[step])
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
    stats = jax.device_get(optim.metrics(opt_state))
    test = jax.tree.map(jnp.asarray, batches[steps])
    logits = model.apply({"params": params}, test["x"], test["mask"])
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test["y"]))
    kept = [v for v in losses if math.isfinite(v)]
    result = {
        "steps": steps,
        "initial_loss": losses[0],
        "final_loss": float(np.mean(kept[-10:])),
        "accuracy": accuracy,
        "skipped_total": int(stats["skipped_total"]),
        "skipped_nonfinite": int(stats["skipped_nonfinite"]),
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
