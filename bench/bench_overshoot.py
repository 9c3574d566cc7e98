"""What ``overshoot_control`` costs in a whole training step, not only in the optimizer update.

The step is the fault example's (examples/train_lm_faults.py): forward, backward,
``stable_adamw`` update with ``loss=``, ``apply_updates``, jitted, on the 2-layer
transformer LM (108k parameters, batch 32x64). ``overshoot=True`` (default) and
``overshoot=False`` are timed in ABBA rounds in one process; the ratio is the
median over rounds of (median on-step / median off-step of the round).

Usage::

    python bench/bench_overshoot.py            # writes bench/results/overshoot.json
    python bench/bench_overshoot.py --quick
"""

from __future__ import annotations

import argparse
import importlib.util
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stablejax import optim  # noqa: E402


def load_example():
    spec = importlib.util.spec_from_file_location(
        "train_lm_faults", ROOT / "examples" / "train_lm_faults.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "overshoot.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 3, 3

    ex = load_example()
    cfg = ex.Config()
    probs, _ = ex.markov_chain()
    data = jnp.asarray(ex.sample_batches(probs, 8, cfg, seed=1))
    model = ex.TinyLM(cfg)
    params0 = model.init(jax.random.key(0), data[0, :, :-1])

    def loss_fn(p, batch):
        logits = model.apply(p, batch[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))

    runs = {}
    for name, overshoot in (("overshoot=False", False), ("overshoot=True", True)):
        tx = optim.stable_adamw(
            cfg.lr, warmup_steps=cfg.warmup, total_steps=10_000, overshoot=overshoot
        )

        def step(p, s, batch, tx=tx):
            loss, g = jax.value_and_grad(loss_fn)(p, batch)
            u, s = tx.update(g, s, p, loss=loss)
            return optax.apply_updates(p, u), s

        step = jax.jit(step)
        p, s = step(params0, tx.init(params0), data[0])
        jax.block_until_ready(p)
        runs[name] = {"step": step, "p": p, "s": s}

    def block(run) -> list[float]:
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            run["p"], run["s"] = run["step"](run["p"], run["s"], data[i % len(data)])
            jax.block_until_ready(run["p"])
            times.append(time.perf_counter() - t0)
        return times

    off, on = runs["overshoot=False"], runs["overshoot=True"]
    ratios, off_ms, on_ms = [], [], []
    for _ in range(args.rounds):
        a1, b1, b2, a2 = block(off), block(on), block(on), block(off)
        a, b = statistics.median(a1 + a2), statistics.median(b1 + b2)
        ratios.append(b / a)
        off_ms.append(1e3 * a)
        on_ms.append(1e3 * b)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores visible, "
        f"backend {jax.default_backend()}",
        "jax": jax.__version__,
        "rounds": args.rounds,
        "steps_per_block": args.steps,
        "off_ms": statistics.median(off_ms),
        "on_ms": statistics.median(on_ms),
        "ratio": statistics.median(ratios),
        "ratio_q25": q[0],
        "ratio_q75": q[2],
    }
    print(
        f"train step of the fault example's LM, {args.rounds} ABBA rounds x {args.steps} steps, "
        f"{result['machine']}:\n  overshoot=False {result['off_ms']:.2f} ms, overshoot=True "
        f"{result['on_ms']:.2f} ms, ratio {result['ratio']:.3f} "
        f"[IQR {result['ratio_q25']:.3f}, {result['ratio_q75']:.3f}]"
    )
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
