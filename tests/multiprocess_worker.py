"""One process of tests/test_debug_multiprocess.py: a shard_map train step over 8 devices
held by 2 processes (4 CPU devices each, gloo collectives), with a NaN born on one shard.

Run as ``python tests/multiprocess_worker.py PROCESS_ID PORT [--locate]``. Prints one
line ``RESULT {json}`` with what this process saw: the ``watch`` flags, the shards
``nonfinite_shards`` names here, the guard's skip counters and a digest of the
parameters on each local device, for a healthy step, for the NaN step, and for
the NaN step with a guard that has no ``axis_name``. With
``--locate`` it also runs ``stablejax.debug.locate`` on the NaN step (both processes,
as every SPMD step runs) and adds its report: the body's equation and the shard,
device and process where the NaN was born.
"""

import hashlib
import json
import os
import sys


def main() -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

    import jax  # noqa: E402

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    PROCESS, PORT = int(sys.argv[1]), int(sys.argv[2])
    jax.distributed.initialize(f"localhost:{PORT}", num_processes=2, process_id=PROCESS,
                               initialization_timeout=60)

    import jax.numpy as jnp  # noqa: E402
    import numpy as np  # noqa: E402
    import optax  # noqa: E402
    from jax.sharding import NamedSharding  # noqa: E402
    from jax.sharding import PartitionSpec as P  # noqa: E402

    from stablejax import optim  # noqa: E402
    from stablejax.debug import locate, nonfinite_shards, watch  # noqa: E402

    N, D, BAD_ROW = 8, 4, 5  # global batch row 5 lives on device 5, held by process 1
    mesh = jax.make_mesh((N,), ("data",), devices=jax.devices())


    def make_step(axis_name):
        tx = optim.guard(optax.sgd(0.1), axis_name=axis_name)
        return jax.jit(
            jax.shard_map(
                lambda w, skipped, x: local_step(tx, w, skipped, x),
                mesh=mesh,
                in_specs=(P(), P(), P("data")),
                out_specs=(P("data"), P("data"), P("data")),
                check_vma=False,
            )
        )


    def local_step(tx, w, skipped, x):
        """Data parallel on one shard: local loss and gradient; guard decides for all shards."""

        def loss_fn(w):
            per_example = jnp.log(x @ w)  # log(0) on the bad row: NaN/Inf born on that shard
            return per_example.mean(), per_example

        (_, per_example), g = jax.value_and_grad(loss_fn, has_aux=True)(w)
        state = tx.init(w)
        u, state = tx.update(g, state, w)
        u = jax.lax.pmean(u, "data")
        new_w = optax.apply_updates(w, u)
        return new_w[None], (skipped + state.skipped_total)[None], per_example


    step = make_step("data")


    def global_array(host: np.ndarray, spec: P) -> jax.Array:
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


    w = global_array(np.full(D, 0.5, np.float32), P())
    skipped = global_array(np.zeros((), np.int32), P())
    x_host = np.ones((N, D), np.float32)
    watched = watch(step)


    def run(x_host: np.ndarray, watched=watched) -> dict:
        x = global_array(x_host, P("data"))
        out, flags = watched(w, skipped, x)
        new_w, counts, _ = out
        return {
            "flags": {k: bool(v) for k, v in jax.device_get(dict(flags)).items()},
            "bad_shards": nonfinite_shards(out),
            "skipped": {
                int(s.device.id): int(np.asarray(s.data)[0]) for s in counts.addressable_shards
            },
            "params": {
                int(s.device.id): hashlib.sha1(np.asarray(s.data).tobytes()).hexdigest()[:16]
                for s in new_w.addressable_shards
            },
            "params_unchanged": all(
                np.array_equal(np.asarray(s.data)[0], np.full(D, 0.5, np.float32))
                for s in new_w.addressable_shards
            ),
        }


    import time as _t

    started = _t.perf_counter()
    result = {"process": jax.process_index(), "devices": [d.id for d in jax.local_devices()]}
    result["healthy"] = run(x_host)
    bad = x_host.copy()
    bad[BAD_ROW] = 0.0
    result["nan"] = run(bad)
    # The contrast axis_name exists for: each shard's guard decides alone.
    result["nan_without_axis_name"] = run(bad, watch(make_step(None)))
    if "--locate" in sys.argv:
        import time

        t0 = time.perf_counter()
        report = locate(step)(w, skipped, global_array(bad, P("data")))
        result["locate"] = None if report is None else report.to_dict()
        result["locate1_s"] = round(time.perf_counter() - t0, 2)

        def after_collective(x):
            moved = jax.lax.ppermute(x, "data", [(i, (i + 1) % N) for i in range(N)])
            return jnp.log(moved @ jnp.ones(D))  # AFTER: log(0) on shard 6, past a collective

        shifted = jax.jit(
            jax.shard_map(after_collective, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
        )
        report = locate(shifted)(global_array(bad, P("data")))
        result["locate_after_collective"] = None if report is None else report.to_dict()
        result["locate_s"] = round(time.perf_counter() - t0, 2)
    result["total_s"] = round(_t.perf_counter() - started, 2)
    print("RESULT " + json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
