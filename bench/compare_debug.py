"""What jax_debug_nans, checkify and stablejax.debug.locate say on the same NaN bugs.

Each case is a jitted function that goes non-finite. For every tool the table
gives the primitive it names, the innermost line of this file it points at
(``-`` when none), and for locate the module and phase. Writes
``bench/results/debug_compare.json``; the table is in ``docs/debug.md``.
Run: ``python bench/compare_debug.py``.
"""

from __future__ import annotations

import json
import os
import re
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import checkify

from stablejax.debug import locate

HERE = os.path.abspath(__file__)


class Normalize(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, kernel_init=nn.initializers.zeros)(x)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # forward 0/0


class NormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Normalize()(x).sum()


class StatsPooling(nn.Module):
    @nn.compact
    def __call__(self, h):
        return jnp.std(h, axis=1)  # backward: d sqrt at 0


class SpeakerNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(3, kernel_init=nn.initializers.zeros)(x)
        return StatsPooling()(h).sum()


class Pool(nnx.Module):
    def __call__(self, h):
        return jnp.std(h, axis=0)  # NNX backward


class Encoder(nnx.Module):
    def __init__(self):
        self.lin = nnx.Linear(3, 3, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
        self.pool = Pool()

    def __call__(self, x):
        return self.pool(self.lin(x)).sum()


def scan_log(x):
    return jax.lax.scan(lambda c, xi: (c, jnp.log(xi)), 0.0, x)[1].sum()  # NaN in scan


def overflow(x):
    e = jnp.exp(x)  # the Inf is born here
    return e - e  # ... and becomes NaN here


def masked(x):
    return jnp.where(x > 0, jnp.log(x), 0.0).sum()  # NaN masked before the output


def cases():
    x = jnp.ones((2, 3))
    normnet = NormNet()
    pn = normnet.init(jax.random.key(0), x)
    spk = SpeakerNet()
    ps = spk.init(jax.random.key(0), jnp.ones((2, 5, 4)))
    graphdef, state = nnx.split(Encoder())

    def nnx_grad(state, x):
        return jax.grad(lambda st: nnx.merge(graphdef, st)(x))(state)
    return [
        ("forward 0/0 in a linen module", normnet.apply, (pn, x)),
        ("backward jnp.std (linen)", jax.grad(lambda p, x: spk.apply(p, x)),
         (ps, jnp.ones((2, 5, 4)))),
        ("backward jnp.std (NNX)", nnx_grad,
         (state, jax.random.normal(jax.random.key(1), (4, 3)))),
        ("NaN inside lax.scan", scan_log, (jnp.array([1.0, -1.0, 2.0]),)),
        ("exp overflow, then inf - inf", overflow, (jnp.array([1000.0]),)),
        ("NaN masked by jnp.where", masked, (jnp.array([1.0, -1.0]),)),
    ]


def _line(tb_frames) -> str:
    ours = [f for f in tb_frames if os.path.abspath(f.filename) == HERE]
    return str(ours[-1].lineno) if ours else "-"


def debug_nans(fn, args):
    jax.clear_caches()
    prev_n, prev_i = jax.config.jax_debug_nans, jax.config.jax_debug_infs
    jax.config.update("jax_debug_nans", True)
    jax.config.update("jax_debug_infs", True)
    try:
        jax.block_until_ready(jax.jit(fn)(*args))
        return {"says": "no error", "primitive": "-", "line": "-"}
    except FloatingPointError as e:
        msg = str(e).splitlines()[0]
        m = re.search(r"encountered in (\w+)", msg)
        return {"says": msg, "primitive": m.group(1) if m else "-",
                "line": _line(traceback.extract_tb(e.__traceback__))}
    finally:
        jax.config.update("jax_debug_nans", prev_n)
        jax.config.update("jax_debug_infs", prev_i)


def run_checkify(fn, args):
    err, _ = jax.jit(checkify.checkify(fn, errors=checkify.float_checks))(*args)
    msg = err.get()
    if msg is None:
        return {"says": "no error", "primitive": "-", "line": "-"}
    m = re.search(r"primitive: (\w+)", msg)
    line = "-"
    try:
        err.throw()
    except Exception as e:  # the location is in the cause's traceback
        cause = e.__cause__
        if cause is not None:
            line = _line(traceback.extract_tb(cause.__traceback__))
    return {"says": msg.splitlines()[0], "primitive": m.group(1) if m else msg.split(":")[0],
            "line": line}


def run_locate(fn, args):
    r = locate(jax.jit(fn))(*args)
    if r is None:
        return {"says": "None", "primitive": "-", "line": "-"}
    line = r.source.rsplit(":", 1)[1] if r.source and "compare_debug" in r.source else "-"
    return {"says": r.headline, "primitive": r.primitive, "line": line, "module": r.module,
            "phase": r.phase, "category": r.category, "iteration": r.iteration}


def main() -> None:
    rows = []
    for name, fn, args in cases():
        rows.append({"case": name, "debug_nans": debug_nans(fn, args),
                     "checkify": run_checkify(fn, args), "locate": run_locate(fn, args)})
    out = os.path.join(os.path.dirname(HERE), "results", "debug_compare.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=2)
    print("| case | jax_debug_nans | checkify(float_checks) | stablejax locate |")
    print("|---|---|---|---|")
    for r in rows:
        d, c, lo = r["debug_nans"], r["checkify"], r["locate"]
        extra = f", {lo.get('module')}, {lo.get('phase')}" if lo["primitive"] != "-" else ""
        if lo.get("iteration") is not None:
            extra += f", iteration {lo['iteration']}"
        print(f"| {r['case']} | {d['primitive']} @ line {d['line']} | "
              f"{c['primitive']} @ line {c['line']} | {lo['primitive']} @ line {lo['line']}"
              f"{extra} |")


if __name__ == "__main__":
    main()
