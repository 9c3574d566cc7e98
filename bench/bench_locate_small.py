"""Time of ``locate`` per program on the small bug zoo of ``tests/test_debug_locate.py``.

Every test of that file is run in this process (``jit`` both ways where the test
is parametrized) with the file's ``locate`` replaced by a timing wrapper; each
call of ``locate(fn)(*args)`` is one program. The process is warm (jax, flax
and the test module imported, one program located first to load the
backends). Two figures per call:

* ``fresh``: ``jax.clear_caches()`` just before the call, so nothing of that
  program is compiled yet (what a user pays on their first ``locate``);
* ``again``: the same call repeated at once (jax's caches warm).

Writes ``bench/results/locate_small.json`` with the mean and median per
program and the slowest calls. Run: ``python bench/bench_locate_small.py``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FLAG = "--xla_force_host_platform_device_count=8"  # as tests/conftest.py
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "tests"))
jax.config.update("jax_numpy_rank_promotion", "raise")

import test_debug_locate as zoo  # noqa: E402

from stablejax.debug import locate as real_locate  # noqa: E402

CALLS: list[dict] = []


def timing_locate(fn, **kw):
    located = real_locate(fn, **kw)

    def run(*args, **kwargs):
        jax.clear_caches()
        t0 = time.perf_counter()
        report = located(*args, **kwargs)
        fresh = time.perf_counter() - t0
        t0 = time.perf_counter()
        located(*args, **kwargs)
        again = time.perf_counter() - t0
        CALLS.append({"test": CURRENT[0], "fresh_s": fresh, "again_s": again,
                      "found": report is not None})
        return report

    return run


CURRENT = [""]


def tests() -> list[tuple[str, object, dict]]:
    out = []
    for name, fn in sorted(vars(zoo).items()):
        if not (name.startswith("test_") and callable(fn)):
            continue
        params = inspect.signature(fn).parameters
        if list(params) == ["jit"]:
            out += [(f"{name}[jit={j}]", fn, {"jit": j}) for j in (False, True)]
        elif not params:
            out.append((name, fn, {}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(_ROOT, "bench", "results",
                                                  "locate_small.json"))
    a = ap.parse_args()
    zoo.locate = real_locate
    zoo.test_forward_singularities_plain(jit=False)  # load the backends once
    zoo.locate = timing_locate
    t_all = time.perf_counter()
    for name, fn, kw in tests():
        CURRENT[0] = name
        fn(**kw)  # the test's own assertions still run
    t_all = time.perf_counter() - t_all
    fresh = [c["fresh_s"] for c in CALLS]
    again = [c["again_s"] for c in CALLS]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(),
        "jax": jax.__version__,
        "programs": len(CALLS),
        "mean_fresh_s": statistics.mean(fresh),
        "median_fresh_s": statistics.median(fresh),
        "mean_again_s": statistics.mean(again),
        "median_again_s": statistics.median(again),
        "total_s": t_all,
        "slowest": sorted(CALLS, key=lambda c: -c["fresh_s"])[:8],
        "calls": CALLS,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{len(CALLS)} programs of tests/test_debug_locate.py, load average "
          f"{result['load_average'][0]:.1f}")
    print(f"locate per program: mean {result['mean_fresh_s']:.2f} s fresh "
          f"(median {result['median_fresh_s']:.2f}), mean {result['mean_again_s']:.2f} s again")
    for c in result["slowest"]:
        print(f"  {c['fresh_s']:.2f} s  {c['test']}")


if __name__ == "__main__":
    main()
