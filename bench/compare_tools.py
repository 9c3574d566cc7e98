"""stablejax against jax's, flax's and optax's own tools, on the same cases.

Each row runs one case through the baseline and through stablejax and records
what came out (a value, a gradient, or whether a NaN got in). Prints a markdown
table and writes ``bench/results/compare_tools.json``; the README quotes it.

Run: ``python bench/compare_tools.py``
"""

from __future__ import annotations

import json
import os

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import stablejax as sj
from stablejax import losses, nn, optim

ROWS = []


def fmt(x) -> str:
    a = np.asarray(x, np.float64).ravel()
    return "[" + ", ".join(f"{v:.3g}" for v in a) + "]" if a.size > 1 else f"{a[0]:.3g}"


def row(case, baseline_name, baseline, ours):
    ROWS.append({"case": case, "baseline": baseline_name, "baseline_result": baseline,
                 "stablejax_result": ours})


def numerics():
    z, c = jnp.zeros(3), jnp.ones(3)
    row("grad of norm at the zero vector", "jnp.linalg.norm",
        fmt(jax.grad(jnp.linalg.norm)(z)), fmt(jax.grad(sj.safe_norm)(z)))
    row("norm of 1e-8-scaled vector [3, 4]", "optax.safe_norm(x, 1e-6)",
        fmt(optax.safe_norm(jnp.array([3e-8, 4e-8]), 1e-6)),
        fmt(sj.safe_norm(jnp.array([3e-8, 4e-8]))))
    row("x / ||x|| at the zero vector", "x / jnp.linalg.norm(x)",
        fmt(z / jnp.linalg.norm(z)), fmt(sj.safe_normalize(z)))
    row("grad of std at a constant row", "jnp.std",
        fmt(jax.grad(jnp.std)(c)), fmt(jax.grad(sj.safe_std)(c)))
    v = jnp.array([1.0, -1.0, 1.0, -1.0]) * 1e-3
    row("std of data with std 1e-3", "sqrt(var + 1e-5)",
        fmt(jnp.sqrt(jnp.var(v) + 1e-5)), fmt(sj.safe_std(v)))
    p = jnp.array([1.0, 2.0])
    row("grad of MAE at a perfect prediction", "mean(sqrt((p - y)**2))",
        fmt(jax.grad(lambda q: jnp.mean(jnp.sqrt((q - p) ** 2)))(p)),
        fmt(jax.grad(losses.mae)(p, p)))
    big = jnp.array([3e30, 4e30])
    row("norm of a float32 row [3e30, 4e30]", "jnp.linalg.norm",
        fmt(jnp.linalg.norm(big)), fmt(sj.safe_norm(big)))


def singular_ops():
    row("grad of arccos at 1 (ArcFace, aligned feature)", "jnp.arccos",
        fmt(jax.grad(jnp.arccos)(1.0)), fmt(jax.grad(sj.safe_arccos)(1.0)))
    row("arccos of a cosine rounded to 1.0000001", "jnp.arccos",
        fmt(jnp.arccos(jnp.float32(1.0000001))), fmt(sj.safe_arccos(jnp.float32(1.0000001))))
    row("grad of arctan2 at the origin", "jnp.arctan2",
        fmt(jax.grad(jnp.arctan2, (0, 1))(0.0, 0.0)),
        fmt(jax.grad(sj.safe_arctan2, (0, 1))(0.0, 0.0)))
    row("grad of abs(x)**0.5 at 0 (in x, in p)", "jnp.abs(x) ** p",
        fmt(jax.grad(lambda x, p: jnp.abs(x) ** p, (0, 1))(0.0, 0.5)),
        fmt(jax.grad(sj.safe_pow, (0, 1))(0.0, 0.5)))
    probs = jnp.array([0.0, 0.25, 0.75])
    row("grad of entropy at p = [0, .25, .75]", "-xlogy(p, p).sum()",
        fmt(jax.grad(lambda q: -jax.scipy.special.xlogy(q, q).sum())(probs)),
        fmt(jax.grad(lambda q: -sj.safe_xlogx(q).sum())(probs)))
    neg = jnp.full(3, -jnp.inf)
    row("softmax of a row of -inf logits (user's mask)", "jax.nn.softmax",
        fmt(jax.nn.softmax(neg)), fmt(sj.safe_softmax(neg)))
    dead = jnp.zeros(3, bool)
    row("logsumexp of a fully masked row", "jax.nn.logsumexp",
        fmt(jax.nn.logsumexp(jnp.zeros(3), where=dead)),
        fmt(sj.safe_logsumexp(jnp.zeros(3), where=dead)))
    row("grad of log_softmax.sum() on a row of -inf", "jax.nn.log_softmax",
        fmt(jax.grad(lambda v: jnp.sum(jnp.where(jnp.isfinite(jax.nn.log_softmax(v)),
                                                 jax.nn.log_softmax(v), 0.0)))(neg)),
        fmt(jax.grad(lambda v: jnp.sum(sj.safe_log_softmax(v)))(neg)))
    q = jnp.ones((1, 2, 1, 2))
    v = jnp.arange(4.0).reshape(1, 2, 1, 2)
    mask = jnp.array([[True, True], [False, False]])[None, None]  # query 1 sees no key
    row("attention output of a query with every key masked", "flax.linen.dot_product_attention",
        fmt(fnn.dot_product_attention(q, q, v, mask=mask)[0, 1, 0]),
        fmt(nn.dot_product_attention(q, q, v, mask=mask)[0, 1, 0]))


def layers():
    x = jnp.full((1, 4), 0.1)
    params = {"params": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}
    ln = lambda m: jax.grad(lambda v: jnp.sum(m.apply(params, v) * jnp.arange(4.0)[None]))(x)
    row("LayerNorm(epsilon=0) on a constant row: output", "flax.linen.LayerNorm",
        fmt(fnn.LayerNorm(epsilon=0.0).apply(params, x)),
        fmt(nn.LayerNorm(epsilon=0.0).apply(params, x)))
    row("LayerNorm(epsilon=0) on a constant row: grad", "flax.linen.LayerNorm",
        fmt(ln(fnn.LayerNorm(epsilon=0.0))), fmt(ln(nn.LayerNorm(epsilon=0.0))))
    small = jnp.array([[1.0, -1.0, 1.0, -1.0]]) * 1e-3
    row("LayerNorm output std, input std 1e-3", "flax.linen.LayerNorm() (eps 1e-6)",
        fmt(jnp.std(fnn.LayerNorm().apply(params, small))),
        fmt(jnp.std(nn.LayerNorm(epsilon=0.0).apply(params, small))))
    silent = jnp.zeros((1, 5, 2))
    naive = lambda v: jnp.concatenate([v.mean(1), jnp.std(v, axis=1)], -1).sum()
    row("std-pooling grad on a silent utterance (max)", "mean+jnp.std pooling",
        fmt(jnp.max(jax.grad(naive)(silent))),
        fmt(jnp.max(jax.grad(lambda v: nn.StdPool().apply({}, v).sum())(silent))))


def optimizers():
    def clipped(clip, g):
        return fmt(clip.update(g, clip.init(g))[0])

    g = jnp.array([1.0, jnp.inf, 1.0])
    row("clip_by_global_norm(1) of [1, inf, 1]", "optax.clip_by_global_norm",
        clipped(optax.clip_by_global_norm(1.0), g), clipped(optim.clip_by_global_norm(1.0), g))
    zero = jnp.zeros(3)
    row("clip_by_global_norm(0) of zeros", "optax.clip_by_global_norm",
        clipped(optax.clip_by_global_norm(0.0), zero),
        clipped(optim.clip_by_global_norm(0.0), zero))

    params = jnp.ones(3)
    nan_grad = jnp.array([1.0, jnp.nan, 1.0])

    def adam_mu_after(tx, steps):
        state = tx.init(params)
        for _ in range(steps):
            _, state = jax.jit(tx.update)(nan_grad, state, params)
        mus = [s.mu for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu"))
               if hasattr(s, "mu")]
        return bool(np.isfinite(np.asarray(mus[0])).all())

    row("Adam moments finite after 3 NaN steps, limit 2", "optax.apply_if_finite(adam, 2)",
        "finite" if adam_mu_after(optax.apply_if_finite(optax.adam(0.1), 2), 3) else "NaN in mu",
        "finite" if adam_mu_after(optim.guard(optax.adam(0.1), max_consecutive_skips=2), 3)
        else "NaN in mu")

    # One NaN loss among clean ones. The rolling-window rule is MaxText's
    # skip_step_on_spikes as ANCHORS 4.16 describes it (window 8, k=6, the history
    # takes every value, skipped or not; NaN comparisons skip), re-implemented here.
    history = [1.0] * 6 + [float("nan")] + [1.0] * 12
    window, rolling_skips = [], 0
    for loss in history:
        if len(window) >= 4:
            mean, std = np.mean(window), np.std(window, ddof=1)
            rolling_skips += not (loss - mean <= 6.0 * std)
        window = (window + [loss])[-8:]
    tx = optim.guard(optax.sgd(0.1), spike_warmup=3, spike_threshold=6.0)
    state = tx.init(params)
    for loss in history:
        _, state = jax.jit(tx.update)(jnp.full(3, loss), state, params)
    row("steps skipped for one NaN among 19 steps", "rolling window 8, k=6 (MaxText rule)",
        str(rolling_skips), str(int(optim.metrics(state)["skipped_total"])))


def main():
    numerics(), singular_ops(), layers(), optimizers()
    print("| case | baseline | baseline gives | stablejax gives |")
    print("|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['case']} | `{r['baseline']}` | {r['baseline_result']} | "
              f"{r['stablejax_result']} |")
    out = os.path.join(os.path.dirname(__file__), "results", "compare_tools.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"jax": jax.__version__, "optax": optax.__version__, "rows": ROWS}, f, indent=1)


if __name__ == "__main__":
    main()
