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
    out = example.main(["--quick", "--steps", "48", "--scenarios", "nan_batch,nan_shard"])
    table = capsys.readouterr().out
    results = out["results"]
    assert set(results) == {"none", "nan_batch", "nan_shard"}
    for scenario in ("nan_batch", "nan_shard"):
        stable = results[scenario]["stable_adamw"]
        assert stable["survived"] and math.isfinite(stable["final_loss"])
        assert not results[scenario]["plain"]["survived"]  # optax's clip turns NaN into NaN
    # 12 NaN batches in a row: more than apply_if_finite's 10, so it gives up.
    assert not results["nan_shard"]["apply_if_finite"]["survived"]
    assert results["nan_shard"]["stable_adamw"]["skipped"] == 12
    assert "| nan_shard |" in table and "survived" in table.split("| nan_shard |")[1]
    # stable_adamw learned: well below the uniform guess.
    assert results["none"]["stable_adamw"]["final_loss"] < 0.9 * math.log(example.VOCAB)
