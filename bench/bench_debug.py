"""Cost of stablejax.debug on a small transformer train step.

Measures, in one process with interleaved repetitions (medians):

* step time of ``watch(step)`` and of ``checkify(step, float_checks)`` against
  the plain jitted step;
* wall time of ``locate`` on a step that went NaN against the time
  ``jax_debug_nans`` takes to raise on the same step (a fresh ``jax.jit``
  each time, since debug_nans does not re-check an already-compiled step
  reliably), and what each of them says.

Prints a markdown table and writes ``bench/results/debug.json``.
Run: ``python bench/bench_debug.py [--layers 4 --d 256 --seq 128 --batch 4]``.

``--cold [--cold-reps N]`` measures instead, each in a fresh process (cold
caches), interleaved, medians: the wall time and the extra peak resident memory
(and the process's CPU time, steadier on a loaded machine) of (compile + one
step) of the plain jitted step, of ``locate`` on it, and of
``jax_debug_nans`` until it raises, on the NaN step
(``--out bench/results/debug_cold_<layers>x<d>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from stablejax.debug import locate, watch


class Block(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        q = nn.Dense(self.d, name="q")(h)
        k = nn.Dense(self.d, name="k")(h)
        v = nn.Dense(self.d, name="v")(h)
        # QK-norm written the way that NaNs the gradient at a zero query.
        q = q / (jnp.linalg.norm(q, axis=-1, keepdims=True) + 1e-6)
        k = k / (jnp.linalg.norm(k, axis=-1, keepdims=True) + 1e-6)
        b, t, _ = x.shape
        split = lambda a: a.reshape(b, t, self.heads, self.d // self.heads)
        logits = jnp.einsum("bthd,bshd->bhts", split(q), split(k)) * 8.0
        att = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhts,bshd->bthd", att, split(v)).reshape(b, t, self.d)
        x = x + nn.Dense(self.d, name="o")(out)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(self.d)(nn.gelu(nn.Dense(4 * self.d)(h)))


class Transformer(nn.Module):
    layers: int
    d: int
    heads: int
    vocab: int

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.d)(ids)
        for _ in range(self.layers):
            x = Block(self.d, self.heads)(x)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def make_step(model, tx):
    def loss_fn(params, ids, labels):
        logits = model.apply(params, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(params, opt_state, ids, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for row in f:
            if row.startswith(field + ":"):
                return int(row.split()[1])
    return 0


def child(a) -> dict:
    """One cold measurement in a fresh process: wall time and extra peak RSS of one action.

    ``plain``: compile + one step of ``jax.jit(step)`` on the NaN step's inputs;
    ``locate``: ``locate(jax.jit(step))`` on them; ``debug_nans``: the jitted
    step under ``jax_debug_nans`` until it raises. The peak is the process's
    resident-set high-water mark (reset just before the action) minus the
    resident set before it: what the action added on top of the model, the
    optimizer state and the batch.
    """
    model = Transformer(a.layers, a.d, 4, 512)
    tx = optax.adamw(1e-3)
    key = jax.random.key(0)
    ids = jax.random.randint(key, (a.batch, a.seq), 0, 512)
    labels = jnp.roll(ids, -1, axis=1)
    params = jax.jit(model.init)(key, ids)
    opt_state = jax.jit(tx.init)(params)
    bad = _nan_params(params, a.layers)
    jax.block_until_ready((bad, opt_state))
    step = make_step(model, tx)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _rss_kb("VmRSS")
    c0 = _cpu_s()
    t0 = time.perf_counter()
    says = None
    if a.child == "plain":
        jax.block_until_ready(jax.jit(step)(bad, opt_state, ids, labels))
    elif a.child == "locate":
        report = locate(jax.jit(step))(bad, opt_state, ids, labels)
        says = report.headline if report else None
    else:
        jax.config.update("jax_debug_nans", True)
        try:
            jax.block_until_ready(jax.jit(step)(bad, opt_state, ids, labels))
            says = "no error raised"
        except FloatingPointError as e:
            says = str(e).splitlines()[0]
    wall = time.perf_counter() - t0
    cpu = _cpu_s() - c0
    peak = _rss_kb("VmHWM")
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return {"mode": a.child, "wall_s": wall, "cpu_s": cpu, "extra_peak_mb": (peak - base) / 1024,
            "params": int(n_params), "says": says}


def _cpu_s() -> float:
    # user + system CPU time of this process: steadier than wall time on a loaded machine
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _nan_params(params, layers):
    # Layer 2's query projection collapsed to zero: q / (norm(q) + eps) has a
    # NaN gradient (the forward pass is finite).
    bad = jax.tree.map(lambda x: x, params)
    target = f"Block_{min(2, layers - 1)}"
    q = bad["params"][target]["q"]
    bad["params"][target]["q"] = {"kernel": jnp.zeros_like(q["kernel"]),
                                  "bias": jnp.zeros_like(q["bias"])}
    return bad


def cold(a) -> None:
    """Fresh-process measurements, interleaved: plain, locate, debug_nans; medians."""
    modes = ["plain", "locate"] + ([] if a.no_debug_nans else ["debug_nans"])
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(a.cold_reps):
        for m in modes:
            cmd = [sys.executable, __file__, "--child", m, "--layers", str(a.layers),
                   "--d", str(a.d), "--seq", str(a.seq), "--batch", str(a.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
            runs[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: {k: statistics.median(r[k] for r in rs)
               for k in ("wall_s", "cpu_s", "extra_peak_mb")}
           for m, rs in runs.items()}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "jax": jax.__version__, "config": vars(a), "params": runs["plain"][0]["params"],
        "median": med, "runs": runs,
        "load_average": os.getloadavg(),
        "locate_time_ratio": med["locate"]["wall_s"] / med["plain"]["wall_s"],
        "locate_cpu_ratio": med["locate"]["cpu_s"] / med["plain"]["cpu_s"],
        "locate_memory_ratio": med["locate"]["extra_peak_mb"] / med["plain"]["extra_peak_mb"],
        "locate_says": runs["locate"][-1]["says"],
    }
    if "debug_nans" in med:
        result["locate_vs_debug_nans"] = med["locate"]["wall_s"] / med["debug_nans"]["wall_s"]
        result["locate_vs_debug_nans_cpu"] = med["locate"]["cpu_s"] / med["debug_nans"]["cpu_s"]
        result["debug_nans_says"] = runs["debug_nans"][-1]["says"]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{a.layers} layers, d={a.d}, {result['params'] / 1e6:.1f}M params, "
          f"seq={a.seq}, batch={a.batch}, {a.cold_reps} fresh processes per mode")
    print(f"load average {result['load_average'][0]:.1f} at the end")
    print("| cold, fresh process | wall s | CPU s | extra peak RSS MB |")
    print("|---|---|---|---|")
    for m in modes:
        print(f"| {m} | {med[m]['wall_s']:.2f} | {med[m]['cpu_s']:.2f} | "
              f"{med[m]['extra_peak_mb']:.0f} |")
    print(f"locate / plain: time {result['locate_time_ratio']:.2f}x (CPU "
          f"{result['locate_cpu_ratio']:.2f}x), memory {result['locate_memory_ratio']:.2f}x"
          + (f"; locate / debug_nans time {result['locate_vs_debug_nans']:.2f}x (CPU "
             f"{result['locate_vs_debug_nans_cpu']:.2f}x)" if "debug_nans" in med else ""))
    print("locate says:", result["locate_says"])


def timed(fn, *args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--nan-reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "debug.json"))
    ap.add_argument("--cold", action="store_true",
                    help="fresh-process time and peak memory of plain / locate / debug_nans")
    ap.add_argument("--cold-reps", type=int, default=1)
    ap.add_argument("--no-debug-nans", action="store_true")
    ap.add_argument("--child", choices=["plain", "locate", "debug_nans"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    if a.cold:
        cold(a)
        return

    model = Transformer(a.layers, a.d, 4, 512)
    tx = optax.adamw(1e-3)
    key = jax.random.key(0)
    ids = jax.random.randint(key, (a.batch, a.seq), 0, 512)
    labels = jnp.roll(ids, -1, axis=1)
    params = model.init(key, ids)
    opt_state = tx.init(params)
    step = make_step(model, tx)

    plain = jax.jit(step)
    watched = jax.jit(watch(step))
    checked = jax.jit(checkify.checkify(step, errors=checkify.float_checks))
    variants = {"plain": plain, "watch": watched, "checkify(float_checks)": checked}
    compile_s = {}
    for name, fn in variants.items():
        compile_s[name] = timed(fn, params, opt_state, ids, labels)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(a.reps):
        for name, fn in variants.items():
            times[name].append(timed(fn, params, opt_state, ids, labels))
    med = {name: statistics.median(ts) for name, ts in times.items()}

    # A step that went NaN: layer 2's query projection collapsed to zero, so
    # q / (norm(q) + eps) has a NaN gradient (the forward pass is finite).
    bad = _nan_params(params, a.layers)
    loc_t, nan_t = [], []
    report = nan_msg = None
    for _ in range(a.nan_reps):
        # Both start cold: jax's per-primitive (op-by-op) executables are
        # cached process-wide and both tools use them.
        jax.clear_caches()
        t0 = time.perf_counter()
        report = locate(plain)(bad, opt_state, ids, labels)
        loc_t.append(time.perf_counter() - t0)
        jax.clear_caches()
        fresh = jax.jit(step)
        prev = jax.config.jax_debug_nans
        jax.config.update("jax_debug_nans", True)
        t0 = time.perf_counter()
        try:
            jax.block_until_ready(fresh(bad, opt_state, ids, labels))
            nan_msg = "no error raised"
        except FloatingPointError as e:
            frames = [f for f in traceback.extract_tb(e.__traceback__)
                      if f.filename == __file__]
            nan_msg = f"{str(e).splitlines()[0]} | innermost bench line: " + (
                f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} "
                f"`{frames[-1].line}`" if frames else "none")
        finally:
            jax.config.update("jax_debug_nans", prev)
        nan_t.append(time.perf_counter() - t0)

    result = {
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} CPUs, {jax.devices()[0].platform}",
        "jax": jax.__version__,
        "config": vars(a),
        "step_ms": {k: 1e3 * v for k, v in med.items()},
        "step_ratio": {k: v / med["plain"] for k, v in med.items()},
        "compile_s": compile_s,
        "locate_s": statistics.median(loc_t),
        "debug_nans_s": statistics.median(nan_t),
        "locate_says": report.headline if report else None,
        "locate_fields": {k: v for k, v in (report.to_dict() if report else {}).items()
                          if k in ("primitive", "phase", "module", "source", "category", "op")},
        "debug_nans_says": nan_msg,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)

    print(f"machine: {result['machine']}; jax {jax.__version__}; "
          f"{a.layers} layers, d={a.d}, seq={a.seq}, batch={a.batch}\n")
    print("| step | median ms | ratio vs plain | compile s |")
    print("|---|---|---|---|")
    for k in variants:
        print(f"| {k} | {1e3 * med[k]:.1f} | {med[k] / med['plain']:.3f}x | "
              f"{compile_s[k]:.1f} |")
    print("\n| NaN step | wall s (median) | says |")
    print("|---|---|---|")
    print(f"| stablejax.debug.locate | {result['locate_s']:.2f} | {result['locate_says']} |")
    print(f"| jax_debug_nans (fresh jit) | {result['debug_nans_s']:.2f} | {nan_msg} |")


if __name__ == "__main__":
    main()
