"""Update-step cost of ``stablejax.optim.guard`` against the plain chain and optax.apply_if_finite.

Each variant runs the same jitted step (optimizer update + ``optax.apply_updates``)
on about 5M float32 parameters in 48 leaves, twice: without buffer donation and
with params and optimizer state donated (``donate_argnums``). The baseline is
optax's own ``chain(clip_by_global_norm(1.0), adamw(1e-3))``.

Timing (``bench/abba.py``, shared with ``bench/bench_loss_scale.py``), made for a
small shared machine: after warm-up rounds, every round times
each variant against the plain chain of the same mode in an ABBA block (plain,
variant, variant, plain; ``--steps`` steps each, every step synchronised and
timed alone), so drift within the block cancels. A round's ratio is the median
step of the two B runs over the median step of the two A runs; the report gives
the median over rounds and the interquartile range of those ratios. The rounds
rotate the order of the variants. A second, separately compiled plain chain is
timed like any variant (A/A control): its ratio should be 1, and its spread is
the resolution of the estimate on the machine at hand.

Noise-free proxies from the compiled module: its line count, and the number of
reads and writes of full-size (>= 64K element) buffers by the top-level
instructions (fusions, copies) of its entry computation: each is one pass over
a parameter-sized array.

Also recorded: the minor page faults per step. Without donation every step
writes fresh output buffers, and on this machine a few thousand pages per step
are mapped in on first touch (the allocator handing back freed buffers and
the host's memory reclaim taking idle ones), a cost that varies between
compiled programs and runs and is not the transformation's arithmetic; with
donated buffers it is near 0. The donated figures are the ones a training
loop (which donates params and optimizer state) sees.

Usage::

    python bench/bench_optim.py            # full run (~3-4 min), writes bench/results/optim.json
    python bench/bench_optim.py --quick    # a few rounds, for a smoke test
    # XLA:CPU copy insertion with region analysis (see docs/optim.md):
    XLA_FLAGS=--xla_cpu_copy_insertion_use_region_analysis=true \
        python bench/bench_optim.py --out bench/results/optim_region_analysis.json
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.abba import (  # noqa: E402
    arguments,
    faults_per_step,
    interleave,
    prepare,
    quantile,
    save,
    workload,
)
from stablejax import optim  # noqa: E402


def variants() -> dict[str, optax.GradientTransformation]:
    def plain():
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))

    return {
        "plain chain(clip, adamw)": plain(),
        # A/A control: a second, separately compiled plain chain. Its ratio
        # shows the bias and spread of the estimate itself.
        "plain again (A/A control)": plain(),
        "guard(chain(clip, adamw))": optim.guard(
            optax.chain(optim.clip_by_global_norm(1.0), optax.adamw(1e-3))
        ),
        "guard(optax chain)": optim.guard(plain()),
        "optax.apply_if_finite(chain)": optax.apply_if_finite(plain(), max_consecutive_errors=10),
        "stable_adamw": optim.stable_adamw(1e-3, warmup_steps=10, total_steps=10_000),
        # With loss= passed, as a training loop does: the guard's loss check and
        # overshoot_control's dot product of gradient and update are then traced.
        "stable_adamw(loss=)": optim.stable_adamw(1e-3, warmup_steps=10, total_steps=10_000),
    }


# Variants whose step passes ``loss=`` to ``update``.
_WITH_LOSS = ("stable_adamw(loss=)",)


def main(argv: list[str] | None = None) -> dict:
    args = arguments(__doc__.splitlines()[0], argv, rounds=24, steps=8, quick=(3, 3),
                     out=Path(__file__).parent / "results" / "optim.json")
    base, grads = workload()
    n_params = sum(x.size for x in jax.tree.leaves(base))
    n_leaves = len(jax.tree.leaves(base))
    plain_name = "plain chain(clip, adamw)"
    runs = {
        (donate, name): prepare(tx, base, grads, donate, name in _WITH_LOSS)
        for donate in (False, True)
        for name, tx in variants().items()
    }
    others = [name for name in variants() if name != plain_name]
    groups = [
        [(runs[(donate, plain_name)], runs[(donate, name)]) for name in others]
        for donate in (False, True)
    ]
    elapsed = interleave(groups, grads, rounds=args.rounds, warmup=args.warmup, steps=args.steps)

    rows = []
    for (donate, name), run in runs.items():
        plain = runs[(donate, plain_name)]
        ratios = run["ratios"] or [1.0]
        rows.append(
            {
                "variant": name,
                "donated": donate,
                "median_ms": 1e3 * statistics.median(run["steps"]),
                "ratio_vs_plain": statistics.median(ratios),
                "ratio_q25": quantile(ratios, 0.25),
                "ratio_q75": quantile(ratios, 0.75),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "hlo_lines": run["hlo"]["lines"],
                "hlo_ratio": run["hlo"]["lines"] / plain["hlo"]["lines"],
                "big_reads": run["hlo"]["big_reads"],
                "big_writes": run["hlo"]["big_writes"],
                "big_copies": run["hlo"]["big_copies"],
                "minor_faults_per_step": faults_per_step(run),
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
        "warmup_rounds": args.warmup,
        "steps_per_run": args.steps,
        "timing": "ABBA blocks per round (plain, variant, variant, plain), each step "
        "synchronised; round ratio = median B step / median A step",
        "timed_seconds": round(elapsed, 1),
        "rows": rows,
    }
    print(
        f"{n_params / 1e6:.2f}M params in {n_leaves} leaves, {args.rounds} rounds "
        f"(+{args.warmup} warm-up) of ABBA x {args.steps} steps, {result['machine']}, "
        f"{elapsed:.0f} s timed\n"
    )
    print(
        "| variant | donated | median step (ms) | ratio vs plain: median [IQR] (min, max) "
        "| HLO lines (ratio) | full-size reads / writes / copies | page faults / step |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {'yes' if r['donated'] else 'no'} | {r['median_ms']:.2f} "
            f"| {r['ratio_vs_plain']:.3f} [{r['ratio_q25']:.3f}, {r['ratio_q75']:.3f}] "
            f"({r['ratio_min']:.2f}, {r['ratio_max']:.2f}) | {r['hlo_lines']} "
            f"({r['hlo_ratio']:.2f}x) | {r['big_reads']} / {r['big_writes']} / "
            f"{r['big_copies']} | {r['minor_faults_per_step']:.0f} |"
        )
    save(result, args)
    return result


if __name__ == "__main__":
    main()
