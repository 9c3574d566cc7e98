"""Cost of ``stablejax.harden`` on clean models: jitted gradient, hardened vs plain.

For each clean model of ``tests/harden_clean.py`` at its bench size (MLP, CNN
with BatchNorm, transformer block, GRU, VAE, contrastive heads with a
hand-written ``x / ||x||``, GroupNorm CNN, ResNet block, flax's layers, cosine,
RMSNorm, masked attention, log-prob, whitening, optax and Gaussian NLL losses),
``jax.jit(jax.grad(loss))`` and ``jax.jit(jax.grad(harden(loss)))`` are compiled
once, then timed in interleaved rounds (plain, hardened, plain, ...) in one
process; the figure is the median of the per-round ratios hardened/plain. Also
printed: whether the gradients are equal bit for bit (else the largest
elementwise relative difference), and whether XLA compiled the same program
(the optimized HLO, names and metadata aside): where it did, the time ratio
can only be noise.

Run:  python bench/bench_harden.py [--repeats 30] [--json bench/results/harden.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from harden_clean import CLEAN  # noqa: E402  (the clean models of the tests)

import stablejax  # noqa: E402

_META = re.compile(r", metadata=\{[^}]*\}")
_NAME = re.compile(r"%[\w.\-]+")
_TABLES = re.compile(r"^\s*(FileNames|FunctionNames|FileLocations|StackFrames|\d+ )")


def _program(compiled) -> list[str]:
    """The optimized HLO without names, metadata and source tables."""
    text = _NAME.sub("%v", _META.sub("", compiled.as_text()))
    return [ln.strip() for ln in text.splitlines() if not _TABLES.match(ln)]


def _time(f, args, inner):
    t = time.perf_counter()
    for _ in range(inner):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / inner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--models", default="", help="comma-separated name prefixes (default: all)")
    a = ap.parse_args()
    wanted = [m for m in a.models.split(",") if m]
    rows = []
    for name, build in sorted(CLEAN.items()):
        if wanted and not any(name.startswith(m) for m in wanted):
            continue
        loss, args = build(True)
        plain = jax.jit(jax.grad(loss))
        hard = jax.jit(jax.grad(stablejax.harden(loss)))
        gp, gh = plain(*args), hard(*args)
        same_bits = all(bool(jnp.array_equal(u, v))
                        for u, v in zip(jax.tree.leaves(gh), jax.tree.leaves(gp)))
        diff = max(float(jnp.max(jnp.abs(u - v) / (jnp.abs(v) + 1e-30)))
                   for u, v in zip(jax.tree.leaves(gh), jax.tree.leaves(gp)))
        same_hlo = (_program(plain.lower(*args).compile())
                    == _program(hard.lower(*args).compile()))
        ratios = []
        for _ in range(a.repeats):
            tp = _time(plain, args, a.inner)
            th = _time(hard, args, a.inner)
            ratios.append(th / tp)
        row = {"model": name, "ratio_median": statistics.median(ratios),
               "plain_ms": 1e3 * _time(plain, args, a.inner), "bit_equal": same_bits,
               "max_rel_diff": diff, "same_compiled_program": same_hlo}
        rows.append(row)
        print(f"{name:20s} hardened/plain {row['ratio_median']:.3f}x  "
              f"(plain {row['plain_ms']:.2f} ms)  gradients "
              f"{'bit-equal' if same_bits else f'max rel. diff {diff:.1e}'}, "
              f"compiled program {'identical' if same_hlo else 'differs'}", flush=True)
    if rows:
        print(f"median over models {statistics.median(r['ratio_median'] for r in rows):.3f}x, "
              f"max {max(r['ratio_median'] for r in rows):.3f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": platform.platform(), "jax": jax.__version__,
                       "repeats": a.repeats, "load_average": os.getloadavg(), "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
