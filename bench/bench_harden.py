"""Cost of ``stablejax.harden`` on clean models: jitted gradient, hardened vs plain.

For each model (MLP, CNN with BatchNorm, transformer block, GRU, VAE, and a
contrastive head with a hand-written ``x / ||x||``), ``jax.jit(jax.grad(loss))``
and ``jax.jit(jax.grad(harden(loss)))`` are compiled once, then timed in
interleaved rounds (plain, hardened, plain, ...) in one process; the figure is
the median of the per-round ratios hardened/plain. Also printed: how far the
gradients differ (elementwise relative, and relative to the largest entry).

Run:  python bench/bench_harden.py [--repeats 30] [--json bench/results/harden.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_harden_zoo import CLEAN  # noqa: E402  (the clean models of the tests)

import stablejax  # noqa: E402

# Sizes at which one gradient step takes milliseconds, not microseconds: below
# that the ratio measures dispatch jitter on a shared machine.
BATCH = {"mlp": (8192, 6), "cnn": (128, 16, 16, 1), "transformer_block": (32, 64, 8),
         "gru": (128, 32, 3), "vae": (8192, 6)}


def _contrastive(p, x):
    z = x @ p
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    return jnp.mean(jax.nn.logsumexp(z @ z.T / 0.1, -1))


def _cases():
    for name, (model, _) in sorted(CLEAN.items()):
        x = jax.random.uniform(jax.random.key(1), BATCH[name])
        params = model.init(jax.random.key(0), x)

        def loss(p, x, model=model):
            out = model.apply(p, x)
            return jnp.mean(out ** 2) + jnp.mean(jax.nn.logsumexp(out, -1))

        yield name, loss, (params, x)
    x = jax.random.normal(jax.random.key(2), (1024, 64))
    yield "contrastive (x/||x||)", _contrastive, (jax.random.normal(jax.random.key(3), (64, 64)), x)


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
    for name, loss, args in _cases():
        if wanted and not any(name.startswith(m) for m in wanted):
            continue
        plain = jax.jit(jax.grad(loss))
        hard = jax.jit(jax.grad(stablejax.harden(loss)))
        gp, gh = plain(*args), hard(*args)
        diff = max(float(jnp.max(jnp.abs(u - v) / (jnp.abs(v) + 1e-30)))
                   for u, v in zip(jax.tree.leaves(gh), jax.tree.leaves(gp)))
        scaled = max(float(jnp.max(jnp.abs(u - v)) / jnp.maximum(jnp.max(jnp.abs(v)), 1e-30))
                     for u, v in zip(jax.tree.leaves(gh), jax.tree.leaves(gp)))
        ratios = []
        for _ in range(a.repeats):
            tp = _time(plain, args, a.inner)
            th = _time(hard, args, a.inner)
            ratios.append(th / tp)
        row = {"model": name, "ratio_median": statistics.median(ratios),
               "plain_ms": 1e3 * _time(plain, args, a.inner), "max_rel_diff": diff,
               "max_diff_over_max_grad": scaled}
        rows.append(row)
        print(f"{name:24s} hardened/plain {row['ratio_median']:.3f}x  "
              f"(plain {row['plain_ms']:.2f} ms)  gradients: max rel. diff {diff:.1e}, "
              f"max diff / max |grad| {scaled:.1e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": platform.platform(), "jax": jax.__version__,
                       "repeats": a.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
