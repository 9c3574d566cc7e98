"""The transformer LM of ``train_lm_faults.py`` trained in float16 compute, five ways.

Same model (a 2-layer pre-LayerNorm causal transformer in Flax linen), data (a
sparse 64-token Markov chain) and optimizer for every run:
:func:`stablejax.optim.stable_adamw` with its defaults. What changes is the
precision of the forward and backward passes and how the gradients are scaled:

* ``float32``: everything in float32, the reference;
* ``fp16_plain``: every layer in float16 (norms, attention softmax and the loss
  included; float32 master weights), no loss scaling;
* ``fp16_stablejax``: the recipe, ``stablejax.nn.mixed_precision()`` (matmuls in
  float16; norms, softmax and the loss in float32) and
  ``stable_adamw(..., loss_scale=True)`` with :func:`stablejax.optim.scale_loss`;
* ``fp16_jmp``: the same policy with ``jmp.DynamicLossScale`` (2**15, jmp's
  defaults) and jmp's README loop (``all_finite``, ``adjust``, ``select_tree``),
  if jmp is installed (``pip install jmp``, the ``bench`` extra);
* ``fp16_flax``: the same policy with ``flax.training.dynamic_scale.DynamicScale``
  (flax's defaults) and its ``value_and_grad``, skipping with ``jnp.where``.

The last column says how far each run's final eval loss is from float32's
(evaluated with its own compute policy, the loss in float32). Usage::

    python examples/train_lm_fp16.py            # full run (600 steps)
    python examples/train_lm_fp16.py --quick    # short run, for the tests
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax.training.dynamic_scale import DynamicScale

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_lm_faults import Config, TinyLM, markov_chain, sample_batches  # noqa: E402

from stablejax import nn as sjnn  # noqa: E402
from stablejax import optim  # noqa: E402

try:
    import jmp
except ImportError:  # optional: the `bench` extra
    jmp = None

RUNS = ("float32", "fp16_plain", "fp16_stablejax", "fp16_jmp", "fp16_flax")


def _tx(cfg: Config, loss_scale: bool = False) -> optax.GradientTransformation:
    return optim.stable_adamw(
        cfg.lr, warmup_steps=cfg.warmup, total_steps=cfg.steps, loss_scale=loss_scale
    )


def _xent(logits, batch, weight=1.0):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
    return jnp.mean(weight * nll)


def make_run(name: str, model: TinyLM, cfg: Config):
    """Returns (apply, init_state, step) for one way of training."""
    if name == "float32":
        apply = model.apply
    elif name == "fp16_plain":
        apply = sjnn.mixed_precision(jnp.float16, norm_dtype=jnp.float16).apply(model.apply)
    else:
        apply = sjnn.mixed_precision().apply(model.apply)

    def loss_fn(p, batch):
        return _xent(apply(p, batch[:, :-1]), batch)

    if name in ("float32", "fp16_plain", "fp16_stablejax"):
        tx = _tx(cfg, loss_scale=name == "fp16_stablejax")

        def step(p, s, batch):
            if name == "fp16_stablejax":
                lf = lambda q: optim.scale_loss(loss_fn(q, batch), s)
            else:
                lf = lambda q: loss_fn(q, batch)
            loss, g = jax.value_and_grad(lf)(p)
            u, s = tx.update(g, s, p, loss=loss)
            return optax.apply_updates(p, u), s

        return apply, tx.init, step

    tx = _tx(cfg)

    def select(finite, new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    if name == "fp16_jmp":

        def init(p):
            return tx.init(p), jmp.DynamicLossScale(jnp.float32(2.0**15))

        def step(p, s, batch):
            opt_state, ls = s
            loss, g = jax.value_and_grad(lambda q: ls.scale(loss_fn(q, batch)))(p)
            g = ls.unscale(g)
            finite = jmp.all_finite(g)
            ls = ls.adjust(finite)
            u, new_state = tx.update(g, opt_state, p, loss=ls.unscale(loss))
            new_p = optax.apply_updates(p, u)
            return select(finite, new_p, p), (select(finite, new_state, opt_state), ls)

        return apply, init, step

    def init(p):
        return tx.init(p), DynamicScale()

    def step(p, s, batch):
        opt_state, ds = s
        ds, finite, loss, g = ds.value_and_grad(lambda q: loss_fn(q, batch))(p)
        u, new_state = tx.update(g, opt_state, p, loss=loss)
        new_p = optax.apply_updates(p, u)
        return select(finite, new_p, p), (select(finite, new_state, opt_state), ds)

    return apply, init, step


def _scale_info(name: str, state) -> tuple[float | None, int | None]:
    if name == "fp16_stablejax":
        m = optim.metrics(state)
        return float(m["loss_scale"]), int(m["overflows"])
    if name == "fp16_jmp":
        return float(state[1].loss_scale), None
    if name == "fp16_flax":
        return float(state[1].scale), None
    return None, None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run, for the tests")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument("--seed", type=int, default=0, help="init key (data seed 1 + seed)")
    parser.add_argument("--runs", default=",".join(RUNS), help="subset of " + str(RUNS))
    args = parser.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {RUNS}")
    if jmp is None and "fp16_jmp" in runs:
        print("jmp is not installed (pip install jmp): fp16_jmp skipped")
        runs.remove("fp16_jmp")
    cfg = Config()
    if args.quick:
        cfg = Config(
            steps=120, batch=16, seq=32, d_model=32, layers=1, warmup=12, eval_batches=4
        )
    if args.steps is not None:
        cfg = Config(**{**cfg.__dict__, "steps": args.steps, "warmup": max(1, args.steps // 20)})

    t0 = time.perf_counter()
    probs, entropy = markov_chain()
    data = jnp.asarray(sample_batches(probs, min(cfg.steps, 400), cfg, seed=1 + args.seed))
    evals = jnp.asarray(sample_batches(probs, cfg.eval_batches, cfg, seed=2))
    model = TinyLM(cfg)
    params = model.init(jax.random.key(args.seed), data[0, :, :-1])

    results: dict[str, dict] = {}
    for name in runs:
        apply, init, step = make_run(name, model, cfg)
        step = jax.jit(step)
        eval_loss = jax.jit(
            lambda p, apply=apply: jnp.mean(
                jax.vmap(lambda b: _xent(apply(p, b[:, :-1]).astype(jnp.float32), b))(evals)
            )
        )
        p, s = params, init(params)
        t_run = time.perf_counter()
        for i in range(cfg.steps):
            p, s = step(p, s, data[i % len(data)])
        final = float(eval_loss(p))
        scale, overflows = _scale_info(name, s)
        results[name] = {"final_loss": final, "loss_scale": scale, "overflows": overflows,
                         "seconds": time.perf_counter() - t_run}
    base = results["float32"]["final_loss"] if "float32" in results else None
    for r in results.values():
        ok = base is not None and math.isfinite(r["final_loss"])
        r["vs_float32"] = r["final_loss"] / base - 1.0 if ok else None
    elapsed = time.perf_counter() - t0

    print(
        f"\n{cfg.steps} steps, batch {cfg.batch}x{cfg.seq}, d_model {cfg.d_model}, "
        f"{cfg.layers} layer(s); entropy "
        f"rate {entropy:.3f} nats, uniform guess {math.log(64):.3f}; {elapsed:.0f} s\n"
    )
    print("| run | final eval loss | vs float32 | final loss scale | overflows skipped |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        loss = f"{r['final_loss']:.4f}" if math.isfinite(r["final_loss"]) else "nan"
        pct = f"{100 * r['vs_float32']:+.2f}%" if r["vs_float32"] is not None else "-"
        scale = f"{r['loss_scale']:g}" if r["loss_scale"] is not None else "-"
        over = str(r["overflows"]) if r["overflows"] is not None else "-"
        print(f"| {name} | {loss} | {pct} | {scale} | {over} |")
    return {"config": cfg.__dict__, "entropy": entropy, "results": results, "seconds": elapsed}


if __name__ == "__main__":
    main()
