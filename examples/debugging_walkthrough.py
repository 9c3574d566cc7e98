"""Debugging walkthrough: a hidden NaN found with ``watch``, ``locate`` and ``nan_trap``.

A small Flax linen classifier pools its token features with a hand-written
masked mean, ``sum(h * mask) / sum(mask)``. It trains fine until a batch holds
an empty sequence (every token padding): 0/0. The walkthrough:

1. ``watch``: the jitted train step also returns one finiteness flag per group
   of outputs (per module of the new parameters, the optimizer state, the
   loss), for the price of one extra read. The loop stops at the first False.
2. ``locate``: called on that step with the same arguments, it names the op
   (``div``), the module (``Classifier/MaskedMean_0``), the phase, the line,
   the category and the fix.
3. ``nan_trap``: the same answer from jax's own ``jax_debug_nans`` machinery,
   as a ``FloatingPointError`` that carries the report.
4. ``watch_loop``: steps 1 and 2 automated for a whole training loop; the
   report is also saved as JSON.
5. The fix (``stablejax.safe_div``: an empty sequence pools to 0, gradient 0)
   and the same training running to the end.

Run: ``python examples/debugging_walkthrough.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import stablejax
from stablejax.debug import locate, nan_trap, watch, watch_loop

CLASSES, TOKENS, FEATURES, BATCH = 3, 12, 8, 16


class MaskedMean(nn.Module):
    """Mean over the valid tokens; ``safe`` uses ``stablejax.safe_div`` for the division."""

    safe: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        m = mask[..., None].astype(h.dtype)
        total, count = jnp.sum(h * m, axis=1), jnp.sum(m, axis=1)
        if self.safe:
            return stablejax.safe_div(total, count)
        return total / count


class Classifier(nn.Module):
    """Token projection, masked mean pooling, a linear head."""

    safe: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        h = nn.gelu(nn.Dense(16)(tokens))
        return nn.Dense(CLASSES)(MaskedMean(self.safe)(h, mask))


def make_batches(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Synthetic token sequences of random length; from ``steps // 3`` on, every
    fourth batch holds one empty sequence (all padding)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(CLASSES, FEATURES)).astype(np.float32)
    batches = []
    for i in range(steps):
        y = rng.integers(0, CLASSES, size=BATCH)
        x = centers[y][:, None] + rng.normal(size=(BATCH, TOKENS, FEATURES))
        lengths = rng.integers(1, TOKENS + 1, size=BATCH)
        if i >= steps // 3 and i % 4 == 0:
            lengths[6] = 0  # an empty sequence
        mask = np.arange(TOKENS)[None, :] < lengths[:, None]
        batches.append({"x": x.astype(np.float32), "mask": mask, "y": y.astype(np.int32)})
    return batches


def make_train_step(model: Classifier, tx: optax.GradientTransformation):
    """The plain train step ``(params, opt_state, batch) -> (params, opt_state, loss)``."""

    def train_step(params, opt_state, batch):
        def loss_fn(params):
            logits = model.apply({"params": params}, batch["x"], batch["mask"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the walkthrough; returns what each tool found.

    Args:
      argv: command-line arguments (``--quick``, ``--steps N``, ``--out DIR`` for
        ``watch_loop``'s JSON report, default a temporary folder).

    Returns:
      ``bad_step`` and ``bad_groups`` (from ``watch``), ``locate`` (primitive,
      phase, module, source, category, suggestion), ``nan_trap`` (primitive,
      category), ``watch_loop`` (bad steps, category, report file) and ``fixed``
      (final loss, whether every parameter is finite, steps).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=None, help="folder for watch_loop's JSON report")
    args = parser.parse_args(argv)
    steps = args.steps or (24 if args.quick else 200)
    out = args.out or tempfile.mkdtemp(prefix="stablejax-walkthrough-")
    os.makedirs(out, exist_ok=True)

    batches = make_batches(steps)
    model = Classifier()
    first = batches[0]
    params0 = jax.jit(model.init)(jax.random.key(0), first["x"], first["mask"])["params"]
    tx = optax.adam(1e-2)
    train_step = make_train_step(model, tx)
    result: dict[str, Any] = {}

    print("1. watch: finiteness flags from inside the jitted step")
    watched = jax.jit(watch(train_step))
    params, opt_state = params0, tx.init(params0)
    for step, batch in enumerate(batches):
        (new_params, new_state, loss), flags = watched(params, opt_state, batch)
        bad = sorted(name for name, ok in jax.device_get(flags).items() if not ok)
        if bad:
            print(f"   step {step}: loss {float(loss):.4g}; non-finite groups: {bad}")
            result.update(bad_step=step, bad_groups=bad)
            break
        params, opt_state = new_params, new_state
    else:
        raise RuntimeError("the hidden NaN did not show up; use more --steps")

    print("2. locate: where the first NaN/Inf of that step is born, why, and the fix")
    report = locate(train_step)(params, opt_state, batch)
    print("   " + str(report).replace("\n", "\n   "))
    result["locate"] = {
        k: getattr(report, k) for k in ("primitive", "phase", "module", "source", "category")
    } | {"suggestion": report.suggestion}

    print("3. nan_trap: jax_debug_nans, answering with the same kind of report")
    try:
        with nan_trap():
            jax.jit(train_step)(params, opt_state, batch)  # a fresh jit: checked by jax
        trapped = None
    except FloatingPointError as err:
        trapped = getattr(err, "report", None)
        print(f"   {type(err).__name__}: {trapped.headline if trapped else err}")
    result["nan_trap"] = None if trapped is None else {
        "primitive": trapped.primitive, "category": trapped.category, "module": trapped.module
    }

    print("4. watch_loop: the same, automated over a training loop")
    report_path = os.path.join(out, "nan_report.json")
    runner = watch_loop(
        train_step, report_path=report_path, metrics=lambda o: {"loss": o[2]},
        printer=lambda text: print("   " + text.splitlines()[0]),
    )
    params, opt_state = params0, tx.init(params0)
    for batch in batches[: result["bad_step"] + 1]:
        params, opt_state, _ = runner(params, opt_state, batch)
    with open(report_path) as f:
        saved = json.load(f)
    result["watch_loop"] = {
        "bad_steps": runner.bad_steps,
        "category": runner.report.category if runner.report else None,
        "report_file": report_path,
        "saved_step": saved["step"],
    }

    print("5. the fix: stablejax.safe_div in MaskedMean; the same training to the end")
    fixed_model = Classifier(safe=True)
    fixed_step = jax.jit(make_train_step(fixed_model, tx))
    params, opt_state = params0, tx.init(params0)
    losses = []
    for batch in batches:
        params, opt_state, loss = fixed_step(params, opt_state, batch)
        losses.append(float(loss))
    finite = all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(params))
    result["fixed"] = {
        "steps": len(losses), "initial_loss": losses[0], "final_loss": losses[-1],
        "params_finite": finite,
    }
    print(f"   {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
          f"parameters finite: {finite}")
    return result


if __name__ == "__main__":
    main()
