"""Cost of ``stablejax.debug.watch`` with its per-module flags on the bench transformer.

The transformer and train step of ``bench/bench_debug.py``; in one process,
interleaved repetitions, medians of the step time of:

* ``plain``: ``jax.jit(step)``;
* ``watch``: ``jax.jit(watch(step))``, output flags plus the per-module flags
  that name the first bad module;
* ``output flags only``: ``jax.jit`` of the step followed by
  ``finite_flags`` of its outputs (what ``watch`` computed before it knew
  modules), to separate the two costs.

It also checks on a NaN step (Block_2's query projection zeroed, a backward
0/0) that ``flags.first_bad_module`` names that block.

Ratios: of the medians, and the median of per-repetition ratios (each
repetition's time against the plain step's in the same repetition); and,
independent of the machine's load, the flops and bytes accessed of XLA's cost
model of each compiled step against the plain step's. The flags read each
value with one float sum and check it element by element only when a sum is
not finite, under ``lax.cond`` (``_src/debug/finite.py``); the cost model
counts that branch's bytes too, though a healthy step never runs it, so its
bytes ratio overstates the flags' traffic.
Writes ``bench/results/watch.json``.
Run: ``python bench/bench_watch.py [--layers 4 --d 256 --seq 128 --batch 4 --reps 21]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))
from bench_debug import Transformer, make_step, timed  # noqa: E402

from stablejax.debug import finite_flags, watch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "watch.json"))
    a = ap.parse_args()

    model = Transformer(a.layers, a.d, 4, 512)
    tx = optax.adamw(1e-3)
    key = jax.random.key(0)
    ids = jax.random.randint(key, (a.batch, a.seq), 0, 512)
    labels = jnp.roll(ids, -1, axis=1)
    params = model.init(key, ids)
    opt_state = tx.init(params)
    step = make_step(model, tx)

    def outputs_only(*args):
        out = step(*args)
        return out, finite_flags(out)

    variants = {
        "plain": jax.jit(step),
        "watch": jax.jit(watch(step)),
        "output flags only": jax.jit(outputs_only),
    }
    compile_s = {k: timed(fn, params, opt_state, ids, labels) for k, fn in variants.items()}
    # Load-independent: XLA's own cost model of each compiled step.
    cost = {}
    for k, fn in variants.items():
        c = fn.lower(params, opt_state, ids, labels).compile().cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        cost[k] = {"flops": float(c.get("flops", 0.0)),
                   "bytes accessed": float(c.get("bytes accessed", 0.0))}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.reps):
        for k, fn in variants.items():
            times[k].append(timed(fn, params, opt_state, ids, labels))
    med = {k: statistics.median(v) for k, v in times.items()}

    bad = jax.tree.map(lambda x: x, params)
    target = f"Block_{min(2, a.layers - 1)}"
    q = bad["params"][target]["q"]
    bad["params"][target]["q"] = jax.tree.map(jnp.zeros_like, q)
    _, flags = variants["watch"](bad, opt_state, ids, labels)
    _, healthy = variants["watch"](params, opt_state, ids, labels)

    result = {
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} CPUs, {jax.devices()[0].platform}",
        "jax": jax.__version__,
        "config": vars(a),
        "step_ms": {k: 1e3 * v for k, v in med.items()},
        "step_ratio": {k: v / med["plain"] for k, v in med.items()},
        # per repetition against the plain step of the same repetition: robust to load drift
        "paired_ratio": {
            k: statistics.median(t / p for t, p in zip(v, times["plain"])) for k, v in times.items()
        },
        "compile_s": compile_s,
        "xla_cost": cost,
        "xla_cost_ratio": {
            k: {m: v[m] / cost["plain"][m] for m in v if cost["plain"][m]} for k, v in cost.items()
        },
        "module_flags": len(flags.modules),
        "boundary_values": len(flags.boundary_names),
        "first_bad_module_nan_step": flags.first_bad_module,
        "first_bad_module_healthy_step": healthy.first_bad_module,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"machine: {result['machine']}; jax {jax.__version__}; "
          f"{a.layers} layers, d={a.d}, seq={a.seq}, batch={a.batch}, {a.reps} reps\n")
    print("| step | median ms | ratio vs plain | paired ratio | compile s |")
    print("|---|---|---|---|---|")
    for k in variants:
        print(f"| {k} | {1e3 * med[k]:.1f} | {med[k] / med['plain']:.3f}x | "
              f"{result['paired_ratio'][k]:.3f}x | {compile_s[k]:.1f} |")
    for k in variants:
        r = result["xla_cost_ratio"][k]
        print(f"XLA cost model, {k}: flops {r.get('flops', 0):.4f}x, "
              f"bytes accessed {r.get('bytes accessed', 0):.4f}x of plain")
    print(f"\n{result['boundary_values']} boundary values in {result['module_flags']} module "
          f"flags; NaN step: first bad module {flags.first_bad_module}; healthy step: "
          f"{healthy.first_bad_module}")


if __name__ == "__main__":
    main()
