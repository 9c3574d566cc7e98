"""Speed of the safe softmax family and attention against jax.nn's and flax's.

For each pair the jitted forward+backward step (``jax.grad`` of a weighted sum of
the output) is compiled once, then timed in interleaved rounds (A, B, A, B, ...)
in one process; the figure is the median of the per-round ratios ours/baseline.

Run:  python bench/bench_softmax.py [--repeats 30] [--json bench/results/softmax.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import flax.linen as fnn
import jax
import jax.numpy as jnp

import stablejax as sj
from stablejax import nn


def _step(fn, *args):
    f = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.where(jnp.isfinite(y := fn(*a)), y, 0.0))))
    return f, args


def cases():
    x = jax.random.normal(jax.random.key(0), (512, 1024))
    where = jax.random.bernoulli(jax.random.key(1), 0.8, x.shape)
    q = jax.random.normal(jax.random.key(2), (8, 128, 8, 64))
    mask = jax.random.bernoulli(jax.random.key(3), 0.8, (8, 1, 128, 128))
    return [
        ("safe_softmax vs jax.nn.softmax (where=)",
         _step(lambda v: sj.safe_softmax(v, where=where), x),
         _step(lambda v: jax.nn.softmax(v, where=where), x)),
        ("safe_log_softmax vs jax.nn.log_softmax (where=)",
         _step(lambda v: sj.safe_log_softmax(v, where=where), x),
         _step(lambda v: jax.nn.log_softmax(v, where=where), x)),
        ("safe_logsumexp vs jax.nn.logsumexp (where=)",
         _step(lambda v: sj.safe_logsumexp(v, -1, where=where), x),
         _step(lambda v: jax.nn.logsumexp(v, -1, where=where), x)),
        ("nn.dot_product_attention vs flax (mask=)",
         _step(lambda a: nn.dot_product_attention(a, a, a, mask=mask), q),
         _step(lambda a: fnn.dot_product_attention(a, a, a, mask=mask), q)),
    ]


def _time(f, args):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                       "softmax.json"))
    args = parser.parse_args()
    rows = []
    for name, (fa, aa), (fb, ab) in cases():
        _time(fa, aa), _time(fb, ab)  # compile
        ratios = [_time(fa, aa) / _time(fb, ab) for _ in range(args.repeats)]
        rows.append({"case": name, "ratio_median": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios)})
        print(f"{name:52s} {statistics.median(ratios):.2f}x")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"jax": jax.__version__, "backend": jax.default_backend(),
                   "machine": platform.machine(), "repeats": args.repeats, "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
