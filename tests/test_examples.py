"""Each example's quick mode, run in-process, and what its ``main`` returns.

``data_parallel.py`` is also run as a script in a fresh interpreter, without
``XLA_FLAGS``, to check that it sets up its 8 virtual devices itself.
"""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    module_name = f"stablejax_example_{name}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # flax dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["linen_training", "nnx_training"])
def test_training_example_learns_and_skips_the_nan_batch(name, capsys):
    result = load(name).main(["--quick"])
    assert result["steps"] == 40
    assert math.isfinite(result["final_loss"])
    assert result["final_loss"] < 0.5 * result["initial_loss"]
    assert result["accuracy"] > 0.6
    # The one batch with NaN was refused, and nothing else.
    assert result["skipped_nonfinite"] == 1 and result["skipped_total"] == 1
    assert result["params_finite"]
    # The guard's metrics were logged, the skip included.
    assert any(math.isnan(row["loss"]) and row["skipped_nonfinite"] == 1 for row in result["log"])
    assert {"grad_norm", "skipped_total", "lr_scale"} <= set(result["log"][0])
    out = capsys.readouterr().out
    assert "skipped 1 (non-finite 1)" in out and "done:" in out


def test_debugging_walkthrough_finds_the_hidden_nan(tmp_path, capsys):
    result = load("debugging_walkthrough").main(["--quick", "--out", str(tmp_path)])
    step = result["bad_step"]
    assert 0 < step < 24
    assert "[2]" in result["bad_groups"]  # the loss flag tripped
    located = result["locate"]
    assert located["primitive"] == "div"
    assert located["phase"] == "forward"
    assert located["module"] == "Classifier/MaskedMean_0"
    assert located["category"] == "forward_singularity"
    assert located["source"].startswith("examples/debugging_walkthrough.py:")
    assert "safe_div" in located["suggestion"]
    trapped = result["nan_trap"]
    assert trapped["primitive"] == "div" and trapped["category"] == "forward_singularity"
    loop = result["watch_loop"]
    assert loop["bad_steps"] == [step] and loop["category"] == "forward_singularity"
    saved = json.loads(pathlib.Path(loop["report_file"]).read_text())
    assert saved["step"] == step and saved["primitive"] == "div"
    fixed = result["fixed"]
    assert fixed["steps"] == 24 and fixed["params_finite"]
    assert math.isfinite(fixed["final_loss"]) and fixed["final_loss"] < fixed["initial_loss"]
    assert jax.config.jax_debug_nans is False  # nan_trap restored the flag
    assert "NonFiniteError" in capsys.readouterr().out


def test_data_parallel_devices_skip_together():
    if jax.device_count() < 8 and len(jax.devices("cpu")) < 8:
        pytest.skip("needs 8 (virtual) devices")
    result = load("data_parallel").main(["--quick"])
    assert result["devices"] == 8 and result["bad_device"] == 5 and result["bad_step"] == 6

    jit = result["jit"]
    assert jit["skipped_total"] == 1 and jit["last_skipped_step"] == 6
    assert jit["params_replicated"] and jit["replicas_identical"] and jit["params_finite"]
    assert math.isfinite(jit["final_loss"])

    sm = result["shard_map"]
    assert sm["skips_per_device"] == [1] * 8
    assert sm["replicas_identical"] and sm["params_finite"]
    assert sm["steps_run"] == 12 and math.isfinite(sm["final_loss"])

    # Without axis_name only device 5 skips; the 7 others take the NaN that pmean
    # spread into Adam's moments. The guard lets no NaN update out, so every
    # replica's parameters stay finite, but the 7 moments are poisoned.
    contrast = result["shard_map_without_axis_name"]
    assert contrast["steps_run"] == 7
    assert contrast["skips_per_device"] == [0, 0, 0, 0, 0, 1, 0, 0]
    assert contrast["params_finite_per_device"] == [True] * 8
    assert contrast["opt_state_finite_per_device"] == [i == 5 for i in range(8)]


def test_data_parallel_script_sets_up_its_devices():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "data_parallel.py"), "--quick"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("8 cpu devices")
    assert "skips per device [1, 1, 1, 1, 1, 1, 1, 1]" in proc.stdout
