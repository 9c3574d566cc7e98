"""Shared set-up and interleaved ABBA timing of optimizer update steps.

Used by ``bench/bench_optim.py`` and ``bench/bench_loss_scale.py``: about 5M
float32 parameters in 48 leaves, a jitted step of optimizer update +
``optax.apply_updates`` (optionally with params and state donated), and
timing made for a small shared machine. Every round times each pair (A, B) in
an ABBA block (A, B, B, A; ``steps`` steps each, every step synchronised and
timed alone), so drift within the block cancels; a round's ratio is the median
B step over the median A step. The rounds rotate the order of the pairs; the
first ``warmup`` rounds are not recorded.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.hlo_traffic import full_size_traffic  # noqa: E402

_BIG = 1 << 16  # elements: a buffer at least this large counts as a pass


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


def arguments(description: str, argv: list[str] | None, *, rounds: int, steps: int,
              quick: tuple[int, int], out: Path) -> argparse.Namespace:
    """The benches' command line: ``--rounds --steps --warmup --quick --out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps, help="steps per A or B run of a block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true",
                        help=f"{quick[0]} rounds of {quick[1]} steps, no warm-up")
    parser.add_argument("--out", default=str(out))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = quick[0], quick[1], 0
    return args


def save(result: dict, args: argparse.Namespace) -> None:
    """Writes ``result`` as JSON to ``--out``, except for a ``--quick`` run."""
    if args.quick:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


def workload() -> tuple[dict, dict]:
    """The parameters of :func:`make_params` and a small constant gradient like them."""
    base = make_params()
    return base, jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), base)


def build_step(tx, donate: bool, with_loss: bool = False):
    """The jitted ``(params, state, grads) -> (params, state)`` step of ``tx``."""

    def step(params, state, grads):
        extra = {"loss": jnp.float32(1.0)} if with_loss else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def hlo_stats(step, params, state, grads) -> dict:
    """Line count and full-size buffer traffic of the compiled module's entry computation."""
    text = step.lower(params, state, grads).compile().as_text()
    traffic = full_size_traffic(text, _BIG)
    return {
        "lines": len(text.splitlines()),
        "big_reads": traffic["reads"],
        "big_writes": traffic["writes"],
        "big_copies": traffic["copies"],
    }


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def prepare(tx, base, grads, donate: bool, with_loss: bool = False) -> dict:
    """A compiled, warmed-up run of ``tx``: its step, state, HLO counts, and empty records."""
    params = jax.tree.map(jnp.copy, base)
    state = tx.init(params)
    step = build_step(tx, donate, with_loss)
    hlo = hlo_stats(step, params, state, grads)
    params, state = step(params, state, grads)  # compile + warm up
    jax.block_until_ready(params)
    return {"step": step, "params": params, "state": state, "hlo": hlo, "steps": [], "ratios": []}


def minor_faults() -> int:
    """Minor page faults of this process so far (pages mapped in on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_block(run: dict, grads, steps: int) -> list[float]:
    """Times ``steps`` synchronised steps of ``run``; adds their minor page faults
    to ``run["faults"]`` (freshly mapped output buffers fault in page by page:
    a cost of the allocator and the machine's memory reclaim, not of the step's
    arithmetic, that differs from one compiled program to another)."""
    p, s, times = run["params"], run["state"], []
    f0 = minor_faults()
    for _ in range(steps):
        t0 = time.perf_counter()
        p, s = run["step"](p, s, grads)
        jax.block_until_ready((p, s))
        times.append(time.perf_counter() - t0)
    run["faults"] = run.get("faults", 0) + minor_faults() - f0
    run["params"], run["state"] = p, s
    return times


def faults_per_step(run: dict) -> float:
    """Mean minor page faults per recorded step of ``run``."""
    return run.get("faults", 0) / max(len(run["steps"]), 1)


def interleave(groups: list[list[tuple[dict, dict]]], grads, *, rounds: int, warmup: int,
               steps: int) -> float:
    """Times every (A, B) pair of every group in ABBA blocks; returns the seconds timed.

    Each recorded round appends its ratio to ``B["ratios"]`` and the step times
    to ``A["steps"]`` and ``B["steps"]``. Within a group (one donation mode,
    say) the order of the pairs rotates from round to round.
    """
    t_start = time.perf_counter()
    for r in range(warmup + rounds):
        if r == warmup:  # page faults are counted over the recorded rounds only
            for pairs in groups:
                for a_run, b_run in pairs:
                    a_run["faults"] = b_run["faults"] = 0
        for pairs in groups:
            k = r % len(pairs)
            for a_run, b_run in pairs[k:] + pairs[:k]:
                a = time_block(a_run, grads, steps)
                b = time_block(b_run, grads, steps)
                b += time_block(b_run, grads, steps)
                a += time_block(a_run, grads, steps)
                if r < warmup:
                    continue
                b_run["ratios"].append(statistics.median(b) / statistics.median(a))
                b_run["steps"] += b
                a_run["steps"] += a
    return time.perf_counter() - t_start
