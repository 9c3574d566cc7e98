"""Speed of the safe layers against flax's and against the naive jnp formulas.

For each pair, the jitted forward+backward step (``jax.grad`` of a sum of the
output, with respect to input and parameters) is compiled once, then timed in
interleaved rounds (A, B, A, B, ...) in one process; the figure is the median of
the per-round ratios ours/baseline. Compile time is timed once per function.
As corroboration where timing is noisy, each row also records the compiled
programs' passes over input-sized buffers (reads/writes, ``hlo_traffic``) and
XLA's cost-model bytes accessed, ours/baseline.

Run:  python bench/bench_layers.py [--repeats 30] [--json bench/results/layers.json]
      python bench/bench_layers.py --only StdPool safe_normalize   # some rows, no JSON
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

try:
    from bench.hlo_traffic import full_size_traffic
except ImportError:  # run as a script: python bench/bench_layers.py
    from hlo_traffic import full_size_traffic

SHAPES = {"small": (32, 64, 256), "large": (16, 256, 512)}


def _naive_stdpool(x):
    return jnp.concatenate([x.mean(-2), jnp.std(x, axis=-2)], -1)


def _naive_normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _module_step(module, x):
    params = module.init(jax.random.key(0), x)

    def loss(p, v):
        return module.apply(p, v).astype(jnp.float32).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def _fn_step(fn, x):
    return jax.jit(jax.grad(lambda v: fn(v).astype(jnp.float32).sum())), (x,)


def cases(x):
    return [
        ("LayerNorm vs flax", _module_step(nn.LayerNorm(), x), _module_step(fnn.LayerNorm(), x)),
        ("RMSNorm vs flax", _module_step(nn.RMSNorm(), x), _module_step(fnn.RMSNorm(), x)),
        ("LayerNorm(eps=0) vs flax(eps=1e-6)", _module_step(nn.LayerNorm(epsilon=0.0), x),
         _module_step(fnn.LayerNorm(), x)),
        ("RMSNorm(eps=0) vs flax(eps=1e-6)", _module_step(nn.RMSNorm(epsilon=0.0), x),
         _module_step(fnn.RMSNorm(), x)),
        ("StdPool vs naive jnp", _fn_step(lambda v: nn.StdPool().apply({}, v), x),
         _fn_step(_naive_stdpool, x)),
        ("safe_normalize vs naive x/norm", _fn_step(sj.safe_normalize, x),
         _fn_step(_naive_normalize, x)),
    ]


def _compile(step, args):
    """Compile seconds, the passes over input-sized buffers, and XLA's bytes accessed."""
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    traffic = full_size_traffic(compiled.as_text(), args[-1].size)
    return seconds, traffic, float(cost.get("bytes accessed", 0.0))


def _run(step, args):
    t0 = time.perf_counter()
    jax.block_until_ready(step(*args))
    return time.perf_counter() - t0


def measure(repeats: int, inner: int = 5, only: tuple[str, ...] = ()):
    """The rows whose case name contains one of ``only`` (all rows when empty)."""
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        for shape_name, shape in SHAPES.items():
            x = jax.random.normal(jax.random.key(1), shape).astype(dtype)
            for name, (ours, a_ours), (base, a_base) in cases(x):
                if only and not any(word in name for word in only):
                    continue
                (c_ours, h_ours, b_ours), (c_base, h_base, b_base) = (
                    _compile(ours, a_ours), _compile(base, a_base))
                for _ in range(3):  # warm up
                    _run(ours, a_ours), _run(base, a_base)
                ratios, t_ours, t_base = [], [], []
                for _ in range(repeats):
                    to = min(_run(ours, a_ours) for _ in range(inner))
                    tb = min(_run(base, a_base) for _ in range(inner))
                    t_ours.append(to), t_base.append(tb), ratios.append(to / tb)
                rows.append({
                    "case": name, "dtype": jnp.dtype(dtype).name, "shape": shape_name,
                    "dims": list(shape), "ratio": statistics.median(ratios),
                    "ours_ms": 1e3 * statistics.median(t_ours),
                    "base_ms": 1e3 * statistics.median(t_base),
                    "compile_ratio": c_ours / c_base,
                    "hlo_ours": h_ours, "hlo_base": h_base,
                    "bytes_ratio": b_ours / b_base if b_base else None,
                })
                print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(r):
    return (f"| {r['case']} | {r['dtype']} | {r['shape']} {tuple(r['dims'])} | "
            f"{r['ours_ms']:.3f} | {r['base_ms']:.3f} | {r['ratio']:.3f}x | "
            f"{r['compile_ratio']:.2f}x | {r['hlo_ours']['reads']}/{r['hlo_ours']['writes']} vs "
            f"{r['hlo_base']['reads']}/{r['hlo_base']['writes']} | {r['bytes_ratio']:.2f}x |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "layers.json"))
    ap.add_argument("--only", nargs="+", default=(), metavar="WORD",
                    help="run only the cases whose name contains a WORD; writes no JSON")
    args = ap.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{os.cpu_count()} cpus, {platform.processor() or platform.machine()}")
    print(f"load average {os.getloadavg()[0]:.2f} at start")
    print("| case | dtype | shape | ours ms | baseline ms | time ratio (median) | compile ratio "
          "| passes reads/writes (ours vs baseline) | bytes ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    load = os.getloadavg()[0]
    rows = measure(args.repeats, only=tuple(args.only))
    load = (load + os.getloadavg()[0]) / 2
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    if args.only:
        return
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                   "load_average": load, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
