"""The fault-injection example runs in short mode and stable_adamw survives its faults."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lm_faults.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_lm_faults", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_short_run_table(example, capsys):
    out = example.main(
        ["--quick", "--steps", "48", "--scenarios", "nan_batch,nan_shard,scaled_1000x"]
    )
    table = capsys.readouterr().out
    results = out["results"]
    assert set(results) == {"none", "nan_batch", "nan_shard", "scaled_1000x"}
    assert out["sweep"] == {} and out["high_lr_factor"] is None
    for row in results.values():
        assert list(row) == ["plain", "clip_adamw", "apply_if_finite", "stable_adamw"]
    for scenario in ("nan_batch", "nan_shard", "scaled_1000x"):
        stable = results[scenario]["stable_adamw"]
        assert stable["survived"] and math.isfinite(stable["final_loss"])
    for scenario in ("nan_batch", "nan_shard"):
        # optax.adamw, with or without optax's clip, writes the NaN into the parameters.
        assert not results[scenario]["plain"]["survived"]
        assert not results[scenario]["clip_adamw"]["survived"]
    assert results["nan_batch"]["apply_if_finite"]["survived"]
    # 12 NaN batches in a row: more than apply_if_finite's 10, so it gives up.
    assert not results["nan_shard"]["apply_if_finite"]["survived"]
    assert results["nan_shard"]["stable_adamw"]["skipped"] == 12
    assert "| nan_shard |" in table and "survived" in table.split("| nan_shard |")[1]
    # stable_adamw learned: well below the uniform guess.
    assert results["none"]["stable_adamw"]["final_loss"] < 0.9 * math.log(example.VOCAB)


def test_high_lr_is_the_smallest_multiplier_where_plain_fails(example, capsys):
    out = example.main(["--quick", "--scenarios", "high_lr", "--lr-multipliers", "1,100"])
    table = capsys.readouterr().out
    sweep = out["sweep"]
    assert list(sweep) == [1.0, 100.0]
    # The tuned rate reproduces the fault-free run; 100x breaks plain optax.
    base = out["results"]["none"]["plain"]["final_loss"]
    assert sweep[1.0]["plain"]["final_loss"] == pytest.approx(base, rel=1e-6)
    assert sweep[1.0]["plain"]["survived"] and not sweep[100.0]["plain"]["survived"]
    assert out["high_lr_factor"] == 100.0
    assert out["results"]["high_lr"] is sweep[100.0]
    assert "| high_lr (100x) |" in table and "| 100x |" in table
    # stable_adamw's overshoot control brings the rate down; nothing acts at 1x.
    stable = sweep[100.0]["stable_adamw"]
    assert stable["survived"] and stable["overshoots"] >= 1
    assert sweep[1.0]["stable_adamw"].get("overshoots", 0) == 0
    for name in ("plain", "clip_adamw", "apply_if_finite"):
        assert not sweep[100.0][name]["survived"]


def test_no_overshoot_flag_turns_the_control_off(example, capsys):
    out = example.main(
        [
            "--quick",
            "--steps",
            "24",
            "--scenarios",
            "high_lr",
            "--lr-multipliers",
            "100",
            "--no-overshoot",
            "--seed",
            "1",
        ]
    )
    capsys.readouterr()
    assert "overshoots" not in out["sweep"][100.0]["stable_adamw"]
    # Another draw (init key 1, data seed 101): a different fault-free run.
    default = example.main(["--quick", "--steps", "24", "--scenarios", "none"])
    capsys.readouterr()
    assert out["results"]["none"]["plain"]["final_loss"] != pytest.approx(
        default["results"]["none"]["plain"]["final_loss"], rel=1e-6
    )
