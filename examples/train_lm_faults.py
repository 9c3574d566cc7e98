"""A small transformer LM trained four ways under the same injected faults.

The "text" is generated: a first-order Markov chain over a 64-token vocabulary
with sparse random transitions (about 3 likely successors per token), so the
best achievable loss is the chain's entropy rate, printed with the table. The
model is a 2-layer pre-LayerNorm causal transformer in Flax linen.

Optimizers, all with the same warm-up + cosine schedule and weight decay 0.1
on matrices:

* ``plain``: ``optax.adamw(schedule, weight_decay=0.1, mask=...)`` with optax's
  defaults otherwise (b2=0.999, no clipping): what most training loops write;
* ``clip_adamw``: ``optax.chain(optax.clip_by_global_norm(1.0),
  optax.adamw(schedule, b2=0.95, ...))``, i.e. :func:`stable_adamw`'s recipe
  without the guard, to show what clipping alone does;
* ``apply_if_finite``: ``optax.apply_if_finite(plain, 10)``;
* ``stable_adamw``: :func:`stablejax.optim.stable_adamw` with its defaults
  (guard, clip, b2=0.95, and :func:`stablejax.optim.overshoot_control`, which
  needs the ``loss=`` this loop passes; ``--no-overshoot`` turns the latter off
  and ``--max-update-ratio 0.01`` passes that option).

Faults (one per scenario; "none" is the fault-free baseline):

* ``nan_batch``: one batch whose per-token loss weights hold a NaN;
* ``nan_shard``: a corrupted shard, 25% of the run's batches in a row, all NaN;
* ``scaled_1000x``: one batch whose loss weights are 1000x (a bad normalisation);
* ``high_lr``: a peak learning rate too high for plain training, no data fault.
  It is found by measurement: every optimizer is trained fault-free at each
  multiplier of ``--lr-multipliers`` (the sweep, printed too) and ``high_lr``
  is the smallest multiplier at which ``plain`` fails.

A run *survived* if its final eval loss is finite and at most 25% above the
same optimizer's fault-free loss at the tuned rate (the uniform guess is
~80-180% above it: a diverged run lands there or at NaN); the percentage to
the fault-free loss is printed for every surviving run. Usage::

    python examples/train_lm_faults.py            # full run (about 17 minutes on 2 CPU cores)
    python examples/train_lm_faults.py --quick    # short run, under a minute
    python examples/train_lm_faults.py --max-update-ratio 0.01   # stable_adamw with the bound
    python examples/train_lm_faults.py --no-overshoot   # stable_adamw(overshoot=False)
    python examples/train_lm_faults.py --scenarios high_lr --lr-multipliers 100 --seed 1
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stablejax import optim  # noqa: E402

VOCAB = 64


@dataclass(frozen=True)
class Config:
    steps: int = 600
    batch: int = 32
    seq: int = 64
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    lr: float = 3e-3
    warmup: int = 30
    eval_batches: int = 8


class Block(nn.Module):
    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.LayerNorm()(x)
        attn = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.d_model)
        x = x + attn(h, mask=mask)
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * self.d_model)(h)
        return x + nn.Dense(self.d_model)(nn.gelu(h))


class TinyLM(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(VOCAB, self.cfg.d_model)
        pos = self.param("pos", nn.initializers.normal(0.02), (self.cfg.seq, self.cfg.d_model))
        x = embed(tokens) + pos[None, : tokens.shape[1]]
        for _ in range(self.cfg.layers):
            x = Block(self.cfg.d_model, self.cfg.heads)(x)
        return embed.attend(nn.LayerNorm()(x))


def markov_chain(seed: int = 0) -> tuple[np.ndarray, float]:
    """Sparse random transition matrix and its entropy rate (nats per token)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(VOCAB, VOCAB)) * 3.0
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    stationary = np.ones(VOCAB) / VOCAB
    for _ in range(200):
        stationary = stationary @ probs
    rows = -(probs * np.log(np.maximum(probs, 1e-30))).sum(axis=1)
    return probs, float(stationary @ rows)


def sample_batches(probs: np.ndarray, n: int, cfg: Config, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cum = np.cumsum(probs, axis=1)
    out = np.empty((n, cfg.batch, cfg.seq + 1), np.int32)
    out[:, :, 0] = rng.integers(0, VOCAB, size=(n, cfg.batch))
    u = rng.random(size=(n, cfg.batch, cfg.seq))
    for t in range(cfg.seq):
        prev = out[:, :, t]
        out[:, :, t + 1] = np.minimum((u[:, :, t, None] > cum[prev]).sum(-1), VOCAB - 1)
    return out


def make_optimizers(
    cfg: Config, lr: float, max_update_ratio: float | None = None, overshoot: bool = True
) -> dict[str, optax.GradientTransformation]:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, cfg.warmup, cfg.steps, lr * 0.1)
    mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)

    def plain():
        return optax.adamw(schedule, weight_decay=0.1, mask=mask)

    return {
        "plain": plain(),
        "clip_adamw": optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(schedule, b2=0.95, weight_decay=0.1, mask=mask),
        ),
        "apply_if_finite": optax.apply_if_finite(plain(), max_consecutive_errors=10),
        "stable_adamw": optim.stable_adamw(
            lr,
            warmup_steps=cfg.warmup,
            total_steps=cfg.steps,
            max_update_ratio=max_update_ratio,
            overshoot=overshoot,
        ),
    }


def scenario_faults(name: str, cfg: Config) -> dict[int, float]:
    """Step -> multiplier of the loss weights (NaN or 1000)."""
    n = cfg.steps
    if name == "nan_batch":
        return {n // 3: math.nan}
    if name == "nan_shard":
        start = n // 3
        return {s: math.nan for s in range(start, start + n // 4)}
    if name == "scaled_1000x":
        return {n // 3: 1000.0}
    return {}


SCENARIOS = ("none", "nan_batch", "nan_shard", "scaled_1000x", "high_lr")
LR_MULTIPLIERS = (3.0, 10.0, 30.0, 100.0)
SURVIVAL_RATIO = 1.25


def make_runner(model, tx, evals, cfg: Config):
    """Jits one training step for ``tx``; the returned function runs a whole scenario."""

    def loss_fn(p, batch, weight):
        logits = model.apply(p, batch[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
        return jnp.mean(weight * nll)

    @jax.jit
    def step(p, s, batch, weight):
        loss, g = jax.value_and_grad(loss_fn)(p, batch, weight)
        u, s = tx.update(g, s, p, loss=loss)
        return optax.apply_updates(p, u), s, loss

    @jax.jit
    def eval_loss(p):
        return jnp.mean(jax.vmap(lambda b: loss_fn(p, b, 1.0))(evals))

    def run(params, data, faults: dict[int, float]) -> dict:
        state = tx.init(params)
        for i in range(cfg.steps):
            weight = jnp.float32(faults.get(i, 1.0))
            params, state, _ = step(params, state, data[i % len(data)], weight)
        out = {"final_loss": float(eval_loss(params))}
        try:
            m = optim.metrics(state)
            out.update(skipped=int(m["skipped_total"]), give_ups=int(m["give_ups"]))
            if "overshoots" in m:
                out["overshoots"] = int(m["overshoots"])
        except ValueError:
            pass
        return out

    return run


def _cell(r: dict, show_pct: bool) -> str:
    loss = f"{r['final_loss']:.4f}" if math.isfinite(r["final_loss"]) else "nan"
    tag = "survived" if r["survived"] else "**failed**"
    extra = f" ({100 * r['vs_fault_free']:+.1f}%)" if show_pct and r["survived"] else ""
    if "skipped" in r:
        extra += f", {r['skipped']} skipped"
    if r.get("overshoots"):
        extra += f", {r['overshoots']} overshoots"
    return f"{loss} {tag}{extra}"


def _judge(r: dict, base: float) -> None:
    ok = math.isfinite(r["final_loss"]) and r["final_loss"] <= SURVIVAL_RATIO * base
    r["survived"] = bool(ok)
    r["vs_fault_free"] = r["final_loss"] / base - 1.0 if ok else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 60 s on 2 CPU cores)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated subset of " + str(SCENARIOS),
    )
    parser.add_argument(
        "--lr-multipliers",
        default=None,
        help="peak-lr multipliers swept fault-free for high_lr (default "
        + ",".join(f"{m:g}" for m in LR_MULTIPLIERS)
        + "; 100 with --quick)",
    )
    parser.add_argument(
        "--max-update-ratio",
        type=float,
        default=None,
        help="pass max_update_ratio to stable_adamw (default: its default, None)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="another draw of the run: init key SEED and training batches from data seed "
        "100+SEED (default: init key 0, data seed 1); evaluation batches are fixed",
    )
    parser.add_argument(
        "--no-overshoot",
        action="store_true",
        help="stable_adamw(overshoot=False): without the loss-feedback step control",
    )
    args = parser.parse_args(argv)
    scenarios = ["none"] + [s for s in args.scenarios.split(",") if s and s != "none"]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {SCENARIOS}")
    cfg = Config()
    multipliers = LR_MULTIPLIERS
    if args.quick:
        cfg = Config(steps=120, batch=16, seq=32, d_model=32, warmup=12, eval_batches=4)
        multipliers = (100.0,)
    if args.steps is not None:
        cfg = Config(**{**cfg.__dict__, "steps": args.steps, "warmup": max(1, args.steps // 20)})
    if args.lr_multipliers:
        multipliers = tuple(sorted(float(m) for m in args.lr_multipliers.split(",")))
    if "high_lr" not in scenarios:
        multipliers = ()

    t0 = time.perf_counter()
    probs, entropy = markov_chain()
    init_key, data_seed = (0, 1) if args.seed is None else (args.seed, 100 + args.seed)
    data = jnp.asarray(sample_batches(probs, min(cfg.steps, 400), cfg, seed=data_seed))
    evals = jnp.asarray(sample_batches(probs, cfg.eval_batches, cfg, seed=2))
    model = TinyLM(cfg)
    params = model.init(jax.random.key(init_key), data[0, :, :-1])

    tx_options = (args.max_update_ratio, not args.no_overshoot)
    results: dict[str, dict[str, dict]] = {}
    runners = {
        name: make_runner(model, tx, evals, cfg)
        for name, tx in make_optimizers(cfg, cfg.lr, *tx_options).items()
    }
    for scenario in scenarios:
        if scenario == "high_lr":
            continue
        faults = scenario_faults(scenario, cfg)
        results[scenario] = {name: run(params, data, faults) for name, run in runners.items()}
    names = list(results["none"])
    base = {name: r["final_loss"] for name, r in results["none"].items()}
    for row in results.values():
        for name, r in row.items():
            _judge(r, base[name])

    # The sweep: every optimizer fault-free at each multiplier of the tuned peak lr;
    # high_lr is the smallest multiplier at which plain optax fails.
    sweep: dict[float, dict[str, dict]] = {}
    for factor in multipliers:
        row = {}
        for name, tx in make_optimizers(cfg, cfg.lr * factor, *tx_options).items():
            row[name] = make_runner(model, tx, evals, cfg)(params, data, {})
            _judge(row[name], base[name])
        sweep[factor] = row
    high_lr_factor = None
    if sweep:
        failing = [f for f, row in sweep.items() if not row["plain"]["survived"]]
        high_lr_factor = min(failing) if failing else max(sweep)
        results["high_lr"] = sweep[high_lr_factor]
    elapsed = time.perf_counter() - t0

    print(
        f"\n{cfg.steps} steps, batch {cfg.batch}x{cfg.seq}, d_model {cfg.d_model}, "
        f"{cfg.layers} layers; entropy rate of the data {entropy:.3f} nats; "
        f"uniform guess {math.log(VOCAB):.3f}; stable_adamw max_update_ratio="
        f"{args.max_update_ratio}, overshoot={not args.no_overshoot}; {elapsed:.0f} s\n"
    )
    if sweep:
        print("Fault-free sweep of the peak learning rate (% to each optimizer's 1x loss):\n")
        print("| peak lr | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        print("| 1x | " + " | ".join(_cell(results["none"][n], False) for n in names) + " |")
        for factor, row in sweep.items():
            print(f"| {factor:g}x | " + " | ".join(_cell(row[n], True) for n in names) + " |")
        if sweep[high_lr_factor]["plain"]["survived"]:
            why = "plain survives every multiplier swept, so the largest is used"
        else:
            why = "the smallest multiplier at which plain fails"
        print(f"\nhigh_lr = {high_lr_factor:g}x: {why}\n")
    print("| fault | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for scenario, row in results.items():
        label = f"high_lr ({high_lr_factor:g}x)" if scenario == "high_lr" else scenario
        cells = [_cell(row[n], scenario != "none") for n in names]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return {
        "config": cfg.__dict__,
        "entropy": entropy,
        "results": results,
        "sweep": sweep,
        "high_lr_factor": high_lr_factor,
        "seconds": elapsed,
    }


if __name__ == "__main__":
    main()
