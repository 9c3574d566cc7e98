"""Update-step cost of ``stablejax.optim.guard`` against the plain chain and optax.apply_if_finite.

Each variant runs the same jitted step (optimizer update + ``optax.apply_updates``)
on about 5M float32 parameters in 48 leaves, twice: without buffer donation and
with params and optimizer state donated (``donate_argnums``). Variants are timed
in interleaved rounds in one process; the reported ratio is the median over
rounds of (variant time / plain time of the same mode, same round). HLO size is
the line count of the compiled module's text.

Usage::

    python bench/bench_optim.py            # full run, writes bench/results/optim.json
    python bench/bench_optim.py --quick    # a few rounds, for a smoke test
    # XLA:CPU without the donation copies (see docs/optim.md):
    XLA_FLAGS=--xla_cpu_copy_insertion_use_region_analysis=true \
        python bench/bench_optim.py --out bench/results/optim_region_analysis.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stablejax import optim  # noqa: E402


def make_params(n_layers: int = 24, width: int = 640, fan_in: int = 320) -> dict:
    key = jax.random.key(0)
    params = {}
    for i in range(n_layers):
        key, sub = jax.random.split(key)
        params[f"layer_{i:02d}"] = {
            "kernel": 0.02 * jax.random.normal(sub, (fan_in, width)),
            "bias": jnp.zeros((width,)),
        }
    return params


def variants() -> dict[str, optax.GradientTransformation]:
    def plain():
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))

    return {
        "plain chain(clip, adamw)": plain(),
        "guard(chain(clip, adamw))": optim.guard(
            optax.chain(optim.clip_by_global_norm(1.0), optax.adamw(1e-3))
        ),
        "guard(optax chain)": optim.guard(plain()),
        "optax.apply_if_finite(chain)": optax.apply_if_finite(plain(), max_consecutive_errors=10),
        "stable_adamw": optim.stable_adamw(1e-3, warmup_steps=10, total_steps=10_000),
    }


def build_step(tx, donate: bool):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def hlo_lines(step, params, state, grads) -> int:
    return len(step.lower(params, state, grads).compile().as_text().splitlines())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps timed per round")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 steps")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "optim.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 3, 3

    base = make_params()
    n_params = sum(x.size for x in jax.tree.leaves(base))
    n_leaves = len(jax.tree.leaves(base))
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), base)
    runs = {}
    for donate in (False, True):
        for name, tx in variants().items():
            params = jax.tree.map(jnp.copy, base)
            state = tx.init(params)
            step = build_step(tx, donate)
            hlo = hlo_lines(step, params, state, grads)
            params, state = step(params, state, grads)  # compile + warm up
            jax.block_until_ready(params)
            runs[(donate, name)] = {
                "step": step,
                "params": params,
                "state": state,
                "hlo": hlo,
                "times": [],
            }

    for _ in range(args.rounds):
        for run in runs.values():
            p, s = run["params"], run["state"]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                p, s = run["step"](p, s, grads)
            jax.block_until_ready((p, s))
            run["times"].append((time.perf_counter() - t0) / args.steps)
            run["params"], run["state"] = p, s

    rows = []
    for (donate, name), run in runs.items():
        plain = runs[(donate, "plain chain(clip, adamw)")]
        ratios = [t / b for t, b in zip(run["times"], plain["times"])]
        rows.append(
            {
                "variant": name,
                "donated": donate,
                "median_ms": 1e3 * statistics.median(run["times"]),
                "ratio_vs_plain": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "hlo_lines": run["hlo"],
                "hlo_ratio": run["hlo"] / plain["hlo"],
            }
        )
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores visible, "
        f"backend {jax.default_backend()}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "n_params": int(n_params),
        "n_leaves": n_leaves,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "rows": rows,
    }
    print(
        f"{n_params / 1e6:.2f}M params in {n_leaves} leaves, {args.rounds} rounds x "
        f"{args.steps} steps, {result['machine']}\n"
    )
    print(
        "| variant | donated | median step (ms) | ratio vs plain (median [min, max]) "
        "| HLO lines (ratio) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {'yes' if r['donated'] else 'no'} | {r['median_ms']:.2f} "
            f"| {r['ratio_vs_plain']:.3f} "
            f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] | {r['hlo_lines']} "
            f"({r['hlo_ratio']:.2f}x) |"
        )
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
