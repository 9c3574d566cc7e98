"""Wall time of ``stablejax.debug.lint`` per model, against tracing the same function.

For every program of ``tests/lint_zoo.py`` (the buggy ones and the clean
reference models) and a larger transformer LM train step, measures, in one
process with interleaved repetitions (medians):

* ``lint(fn)(*args)``, the whole call (tracing included);
* ``jax.make_jaxpr(fn)(*args)``, the tracing ``lint`` starts with (the baseline);

and reports seconds, the ratio, how many risks and how many high. The issue's
target is at most 5 s a model. Prints a markdown table and writes
``bench/results/lint.json``.
Run: ``python bench/bench_lint.py [--repeats 5] [--layers 12 --d 512]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import lint_zoo  # noqa: E402

from stablejax.debug import lint  # noqa: E402


def big_lm(layers: int, d: int):
    """A ``layers``-block transformer LM train step (value_and_grad, AdamW update)."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            h = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=8)(h, h, mask=mask)
            return x + nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(nn.LayerNorm()(x))))

    class LM(nn.Module):
        @nn.compact
        def __call__(self, t):
            x = nn.Embed(1000, d)(t)
            mask = nn.make_causal_mask(t)
            for _ in range(layers):
                x = Block()(x, mask)
            return nn.Dense(1000)(nn.LayerNorm()(x))

    m, tx = LM(), optax.adamw(1e-3)
    t = jax.ShapeDtypeStruct((4, 128), jnp.int32)
    p = jax.eval_shape(lambda t: m.init(jax.random.key(0), t), t)
    s = jax.eval_shape(tx.init, p)

    def step(p, s, t):
        def loss(p):
            logits = m.apply(p, t[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()

        val, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, val

    return jax.jit(step), (p, s, t)


def _time(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--only", default="", help="programs whose name contains this")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "lint.json"))
    a = ap.parse_args()
    programs = {f"bug/{n}": b()[:2] for n, b in lint_zoo.BUGS.items()}
    programs |= {f"clean/{n}": b() for n, b in lint_zoo.CLEAN.items()}
    programs[f"clean/lm_{a.layers}x{a.d}_train_step"] = big_lm(a.layers, a.d)
    rows = []
    programs = {k: v for k, v in programs.items() if a.only in k}
    for name, (fn, args) in programs.items():
        risks = lint(fn)(*args)  # warm: imports, first-call caches
        lt, tt = [], []
        for _ in range(a.repeats):  # interleaved
            lt.append(_time(lambda fn=fn, args=args: lint(fn)(*args)))
            tt.append(_time(lambda fn=fn, args=args: jax.make_jaxpr(fn)(*args)))
        n_eqns = sum(1 for _ in jax.make_jaxpr(fn)(*args).eqns)
        lint_s, trace_s = statistics.median(lt), statistics.median(tt)
        rows.append(dict(program=name, lint_s=round(lint_s, 4), trace_s=round(trace_s, 4),
                         ratio=round(lint_s / trace_s, 2), risks=len(risks),
                         high=len(risks.high), top_level_eqns=n_eqns))
        print(f"| {name} | {lint_s:.3f} | {trace_s:.3f} | {lint_s / trace_s:.1f}x | "
              f"{len(risks)} | {len(risks.high)} |", flush=True)
    worst = max(rows, key=lambda r: r["lint_s"])
    print(f"\nslowest: {worst['program']} {worst['lint_s']:.2f} s (target <= 5 s a model)")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"repeats": a.repeats, "machine": platform.platform(),
                   "cpu_count": os.cpu_count(), "jax": jax.__version__, "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
