"""Two processes, one 8-device mesh: watch and locate name the process and shard where a NaN
is born, and optim.guard(axis_name=...) makes every process skip together.

Each process runs tests/multiprocess_worker.py (4 CPU devices, gloo collectives,
jax.distributed with a coordinator on a free localhost port) and prints one
JSON line; this test compares them. Bounded: both processes are killed when
they run past the timeout.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

_WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
# Bounded, never a hang: both processes are killed past it. The run takes 77-121 s on the
# shared 2-core machine at load average 8-12 (locate walks the step's body per shard,
# op by op, on both processes), about 35 s of it without locate.
_TIMEOUT_S = 300


def _worker_line(marker: str) -> str:
    with open(_WORKER) as f:
        return f"tests/multiprocess_worker.py:{1 + next(i for i, t in enumerate(f) if marker in t)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_workers(*extra: str) -> list[dict]:
    """Starts both processes, returns their results ordered by process id."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")]
    )
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, _WORKER, str(i), port, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the 2-process run did not finish in {_TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, text in zip(procs, outputs):
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        assert p.returncode == 0 and lines, text[-3000:]
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    return sorted(results, key=lambda r: r["process"])


@pytest.fixture(scope="module")
def results():
    return run_workers("--locate")


def test_watch_names_the_process_and_shard(results):
    p0, p1 = results
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert r["healthy"]["flags"] == {"[0]": True, "[2]": True}
        assert r["healthy"]["bad_shards"] == []
        assert r["nan"]["flags"] == {"[0]": True, "[2]": False}  # per-example losses
    # Row 5 of the global batch is the 2nd device of process 1; process 0 holds none of it.
    assert p0["nan"]["bad_shards"] == []
    (shard,) = p1["nan"]["bad_shards"]
    assert (shard["process"], shard["path"], shard["index"]) == (1, "[2]", [[5, 6]])
    assert shard["device"] == p1["devices"][1]


def test_locate_names_the_process_and_shard(results):
    """The equation in the shard_map body, on global shard 5 (process 1's 2nd device).

    Process 1 holds the shard and walks it; process 0 has no local origin and
    reports the all-gathered answer (same equation, shard, device, operands).
    """
    p0, p1 = (r["locate"] for r in results)
    for r in (p0, p1):
        assert (r["primitive"], r["kind"], r["phase"]) == ("log", "inf", "forward")
        assert r["source"] == _worker_line("per_example = jnp.log(x @ w)")
        assert r["mesh_axes"] == ["data"] and r["shard_index"] == {"data": 5}
        assert (r["shards_affected"], r["num_shards"]) == (1, 8)
        assert r["process"] == 1 and r["device"] == results[1]["devices"][1]
        assert r["reaches_output"]
    assert p1["origin_local"] and not p0["origin_local"]
    same = ("primitive", "category", "source", "module", "inputs", "shard_index", "device")
    assert {k: p0[k] for k in same} == {k: p1[k] for k in same}
    assert p1["inputs"][0]["zeros"] == 1  # x @ w is 0 on that row


def test_locate_follows_a_collective_across_processes(results):
    """Row 5 is sent one shard on by a ppermute before the log: born on shard 6 (device 2050).

    The ppermute runs for real over the 8 devices of both processes.
    """
    p0, p1 = (r["locate_after_collective"] for r in results)
    for r in (p0, p1):
        assert (r["primitive"], r["kind"]) == ("log", "inf")
        assert r["source"] == _worker_line("# AFTER:")
        assert r["shard_index"] == {"data": 6} and r["shards_affected"] == 1
        assert r["process"] == 1 and r["device"] == results[1]["devices"][2]
    assert p1["origin_local"] and not p0["origin_local"]
    assert p0["inputs"] == p1["inputs"]


def test_guard_axis_name_makes_every_process_skip(results):
    digests = set()
    for r in results:
        assert set(r["nan"]["skipped"].values()) == {1}
        assert r["nan"]["params_unchanged"]
        assert set(r["healthy"]["skipped"].values()) == {0}
        assert not r["healthy"]["params_unchanged"]
        digests |= set(r["healthy"]["params"].values())
    assert len(digests) == 1  # the healthy update is identical on all 8 devices
    # Without axis_name only the shard that saw the NaN skips, and the update goes ahead.
    alone = {d: n for r in results for d, n in r["nan_without_axis_name"]["skipped"].items()}
    assert sorted(alone.values()) == [0] * 7 + [1]
    assert not results[0]["nan_without_axis_name"]["params_unchanged"]
