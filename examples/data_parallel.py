"""Data-parallel training over 8 devices with the stablejax guard: every device skips together.

Two ways to split a batch over a ``Mesh`` of 8 devices (virtual CPU devices
here, set with ``--xla_force_host_platform_device_count=8``):

1. ``jax.jit`` with ``NamedSharding``: the batch is sharded over the ``data``
   axis, the parameters and optimizer state are replicated, and XLA inserts
   the gradient all-reduce. The guard (inside ``stable_adamw``) sees the one
   global gradient, so its decision is global by construction: a NaN in one
   device's examples skips the step for the whole array.
2. ``shard_map`` with explicit per-device code: each device computes the
   gradient of its own shard, and the all-reduce (``lax.pmean``) sits inside
   the guarded chain. ``guard(..., axis_name="data")`` sums the finiteness and
   norm statistics over the axis, so all 8 devices take the same decision. The
   same run without ``axis_name`` shows why it matters: the device that holds
   the NaN skips, the 7 others take the NaN it spread through ``pmean`` into
   Adam's moments (the guard zeroes their non-finite updates, so their
   parameters stay finite, but those moments are poisoned for good).

Run: ``python examples/data_parallel.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Must happen before jax is imported: it reads XLA_FLAGS once.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES_FLAG).strip()

import argparse  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from stablejax import optim  # noqa: E402

N_DEVICES, PER_DEVICE, FEATURES = 8, 8, 16
BATCH = N_DEVICES * PER_DEVICE
BAD_ROW = 5 * PER_DEVICE + 2  # an example in device 5's shard


class MLP(nn.Module):
    """A small regressor."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.gelu(nn.Dense(64)(x))
        x = nn.gelu(nn.Dense(64)(x))
        return nn.Dense(1)(x)[..., 0]


def make_batches(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Synthetic regression batches; the one at ``steps // 2`` has NaN in ``BAD_ROW``."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=FEATURES).astype(np.float32) / 4.0
    batches = []
    for i in range(steps):
        x = rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
        y = np.sin(x @ w).astype(np.float32)
        if i == steps // 2:
            x[BAD_ROW] = np.nan  # a corrupted example, on one device only
        batches.append({"x": x, "y": y})
    return batches


def mesh_devices() -> list[jax.Device]:
    """8 devices: the default backend's if it has them, else the virtual CPU ones."""
    devices = jax.devices()
    if len(devices) < N_DEVICES:
        devices = jax.devices("cpu")
    if len(devices) < N_DEVICES:
        raise RuntimeError(
            f"needs {N_DEVICES} devices, found {len(devices)}: set "
            f"XLA_FLAGS={_DEVICES_FLAG} before jax is imported"
        )
    return devices[:N_DEVICES]


def _same(tree_a: Any, tree_b: Any) -> bool:
    return all(
        np.asarray(a).tobytes() == np.asarray(b).tobytes()
        for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b))
    )


def _finite(tree: Any) -> bool:
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


def train_with_jit(mesh: Mesh, model: MLP, params: Any, batches: list) -> dict[str, Any]:
    """``jax.jit`` on sharded arrays: XLA does the all-reduce, the guard decides globally."""
    steps = len(batches)
    tx = optim.stable_adamw(3e-3, warmup_steps=max(1, steps // 10), total_steps=steps)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(tx.init(params), replicated)

    def loss_fn(params, batch):
        return jnp.mean((model.apply({"params": params}, batch["x"]) - batch["y"]) ** 2)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for batch in batches:
        batch = jax.device_put(batch, sharded)
        params, opt_state, loss = train_step(params, opt_state, batch)
        losses.append(float(loss))
    stats = jax.device_get(optim.metrics(opt_state))
    kernel = jax.tree.leaves(params)[0]
    copies = [shard.data for shard in kernel.addressable_shards]
    return {
        "final_loss": losses[-1],
        "skipped_total": int(stats["skipped_total"]),
        "last_skipped_step": int(stats["last_skipped_step"]),
        "params_replicated": kernel.sharding.is_fully_replicated,
        "replicas_identical": all(_same(c, copies[0]) for c in copies),
        "params_finite": _finite(params),
    }


def pmean_gradients(axis_name: str) -> optax.GradientTransformation:
    """The data-parallel all-reduce as an optax step: the mean of the devices' gradients."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: lax.pmean(g, axis_name), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def train_with_shard_map(
    mesh: Mesh, model: MLP, params: Any, batches: list, axis_name: str | None
) -> dict[str, Any]:
    """``shard_map``: each device's own gradient goes to ``guard(axis_name=...)``.

    Every device keeps its own replica of the parameters and optimizer state
    (stacked on a leading axis of size 8), so the result shows whether the
    replicas stayed identical.
    """
    tx = optim.guard(optax.chain(pmean_gradients("data"), optax.adam(3e-3)), axis_name=axis_name)
    stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * N_DEVICES), tree)
    replicas, opt_states = stack(params), stack(tx.init(params))

    def local_step(params, opt_state, batch):
        params, opt_state = jax.tree.map(lambda x: x[0], (params, opt_state))
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((model.apply({"params": p}, batch["x"]) - batch["y"]) ** 2)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        params = optax.apply_updates(params, updates)
        skipped = optim.metrics(opt_state)["skipped_total"]
        mean_loss = lax.pmean(loss, "data")
        return jax.tree.map(lambda x: x[None], (params, opt_state, mean_loss, skipped))

    train_step = jax.jit(
        jax.shard_map(
            local_step, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False
        )
    )
    losses, skips = [], None
    for batch in batches:
        replicas, opt_states, loss, skips = train_step(replicas, opt_states, batch)
        losses.append(float(loss[0]))
        if axis_name is None and int(np.asarray(skips).max()):
            break  # the contrast: stop at the step where the devices disagree
    per_device = [jax.tree.map(lambda x, i=i: x[i], replicas) for i in range(N_DEVICES)]
    return {
        "steps_run": len(losses),
        "final_loss": losses[-1],
        "skips_per_device": [int(s) for s in np.asarray(skips)],
        "replicas_identical": all(_same(r, per_device[0]) for r in per_device),
        "params_finite_per_device": [_finite(r) for r in per_device],
        "opt_state_finite_per_device": [
            _finite(jax.tree.map(lambda x, i=i: x[i], opt_states)) for i in range(N_DEVICES)
        ],
        "params_finite": _finite(replicas),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains with both methods (and the ``shard_map`` contrast); returns what happened.

    Args:
      argv: command-line arguments (``--quick``, ``--steps N``).

    Returns:
      ``devices``, ``bad_step``, ``bad_device``, and one dict per run: ``jit``,
      ``shard_map`` (with ``axis_name="data"``) and ``shard_map_without_axis_name``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    steps = args.steps or (12 if args.quick else 200)

    mesh = Mesh(np.array(mesh_devices()), ("data",))
    batches = make_batches(steps)
    model = MLP()
    params = jax.jit(model.init)(jax.random.key(0), batches[0]["x"][:2])["params"]
    result: dict[str, Any] = {
        "devices": mesh.size,
        "platform": mesh.devices.flat[0].platform,
        "bad_step": steps // 2,
        "bad_device": BAD_ROW // PER_DEVICE,
    }
    print(f"{mesh.size} {result['platform']} devices; batch {BATCH} = {N_DEVICES} x {PER_DEVICE}; "
          f"step {steps // 2} has NaN in row {BAD_ROW} (device {result['bad_device']})")

    result["jit"] = r = train_with_jit(mesh, model, params, batches)
    print(f"jit + NamedSharding: skipped {r['skipped_total']} step(s) (last: step "
          f"{r['last_skipped_step']}), params replicated {r['params_replicated']}, replicas "
          f"identical {r['replicas_identical']}, final loss {r['final_loss']:.4f}")

    result["shard_map"] = r = train_with_shard_map(mesh, model, params, batches, "data")
    print(f"shard_map + guard(axis_name='data'): skips per device {r['skips_per_device']}, "
          f"replicas identical {r['replicas_identical']}, final loss {r['final_loss']:.4f}")

    result["shard_map_without_axis_name"] = r = train_with_shard_map(
        mesh, model, params, batches, None
    )
    print(f"shard_map + guard() without axis_name, at step {r['steps_run'] - 1}: skips per "
          f"device {r['skips_per_device']}, finite replicas {r['params_finite_per_device']}, "
          f"finite Adam moments {r['opt_state_finite_per_device']}")
    return result


if __name__ == "__main__":
    main()
