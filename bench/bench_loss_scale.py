"""Update-step cost of ``stablejax.optim.dynamic_loss_scale`` over the chain it wraps.

Same set-up as ``bench/bench_optim.py`` and the same timing (both from
``bench/abba.py``): about 5M float32 parameters in 48 leaves, a jitted step of
optimizer update + ``optax.apply_updates``, without and with buffer donation;
every round times each wrapped chain against its own unwrapped inner chain in
an ABBA block (inner, wrapped, wrapped, inner; ``--steps`` synchronised steps
each); a round's ratio is the median B step over the median A step, and the
report gives the median over rounds with the interquartile range. An A/A
control (the inner chain compiled twice) shows the resolution. The pairs:

* ``optax.chain(clip_by_global_norm(1.0), adamw(1e-3))`` and
  ``dynamic_loss_scale`` of it (optax's clip reduces over the unscaled gradient
  itself, which XLA:CPU then writes to memory once);
* ``guard(chain(stablejax clip, adamw))`` and ``dynamic_loss_scale`` of it;
* ``stable_adamw`` with ``loss=`` and ``stable_adamw(loss_scale=True)`` with ``loss=``.

Usage::

    python bench/bench_loss_scale.py           # writes bench/results/loss_scale.json
    python bench/bench_loss_scale.py --quick   # a few rounds, for a smoke test
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


def pairs() -> dict[str, tuple[optax.GradientTransformation, optax.GradientTransformation, bool]]:
    """name -> (inner, wrapped, with_loss)."""

    def chain():
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))

    def guarded():
        return optim.guard(optax.chain(optim.clip_by_global_norm(1.0), optax.adamw(1e-3)))

    def sa(**kw):
        return optim.stable_adamw(1e-3, warmup_steps=10, total_steps=10_000, **kw)

    return {
        "A/A control: chain(clip, adamw) again": (chain(), chain(), False),
        "dynamic_loss_scale(chain(clip, adamw))": (
            chain(), optim.dynamic_loss_scale(chain()), False,
        ),
        "dynamic_loss_scale(guard(chain(stablejax clip, adamw)))": (
            guarded(), optim.dynamic_loss_scale(guarded()), False,
        ),
        "stable_adamw(loss_scale=True) (loss=)": (sa(), sa(loss_scale=True), True),
    }


def main(argv: list[str] | None = None) -> dict:
    args = arguments(__doc__.splitlines()[0], argv, rounds=16, steps=6, quick=(2, 2),
                     out=Path(__file__).parent / "results" / "loss_scale.json")
    base, grads = workload()
    n_params = sum(x.size for x in jax.tree.leaves(base))
    runs = {
        (donate, name, role): prepare(tx, base, grads, donate, with_loss)
        for donate in (False, True)
        for name, (inner, wrapped, with_loss) in pairs().items()
        for role, tx in (("A", inner), ("B", wrapped))
    }
    names = list(pairs())
    groups = [
        [(runs[(donate, name, "A")], runs[(donate, name, "B")]) for name in names]
        for donate in (False, True)
    ]
    elapsed = interleave(groups, grads, rounds=args.rounds, warmup=args.warmup, steps=args.steps)

    rows = []
    for donate in (False, True):
        for name in names:
            a_run, b_run = runs[(donate, name, "A")], runs[(donate, name, "B")]
            ratios = b_run["ratios"] or [1.0]
            rows.append({
                "pair": name,
                "donated": donate,
                "inner_ms": 1e3 * statistics.median(a_run["steps"] or [0.0]),
                "wrapped_ms": 1e3 * statistics.median(b_run["steps"] or [0.0]),
                "ratio": statistics.median(ratios),
                "ratio_q25": quantile(ratios, 0.25),
                "ratio_q75": quantile(ratios, 0.75),
                "inner_reads_writes": [a_run["hlo"]["big_reads"], a_run["hlo"]["big_writes"]],
                "wrapped_reads_writes": [b_run["hlo"]["big_reads"], b_run["hlo"]["big_writes"]],
                "minor_faults_per_step": [faults_per_step(a_run), faults_per_step(b_run)],
            })
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores visible, "
        f"backend {jax.default_backend()}",
        "jax": jax.__version__,
        "optax": optax.__version__,
        "n_params": int(n_params),
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "steps_per_run": args.steps,
        "timed_seconds": round(elapsed, 1),
        "rows": rows,
    }
    print(f"{n_params / 1e6:.2f}M params, {args.rounds} rounds of ABBA x {args.steps} steps, "
          f"{result['machine']}, {elapsed:.0f} s timed\n")
    print("| pair | donated | inner (ms) | wrapped (ms) | ratio: median [IQR] "
          "| full-size reads/writes inner -> wrapped | page faults / step inner, wrapped |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {'yes' if r['donated'] else 'no'} | {r['inner_ms']:.2f} | "
              f"{r['wrapped_ms']:.2f} | {r['ratio']:.3f} [{r['ratio_q25']:.3f}, "
              f"{r['ratio_q75']:.3f}] | {r['inner_reads_writes']} -> "
              f"{r['wrapped_reads_writes']} | {r['minor_faults_per_step'][0]:.0f}, "
              f"{r['minor_faults_per_step'][1]:.0f} |")
    save(result, args)
    return result


if __name__ == "__main__":
    main()
