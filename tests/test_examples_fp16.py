"""The float16 example runs in short mode: the recipe trains like float32."""

import importlib.util
import math
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lm_fp16.py"


def test_fp16_recipe_ends_within_1pct_of_float32(capsys):
    spec = importlib.util.spec_from_file_location("train_lm_fp16", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = module.main(["--quick", "--steps", "40", "--runs", "float32,fp16_stablejax"])
    table = capsys.readouterr().out
    res = out["results"]
    assert list(res) == ["float32", "fp16_stablejax"]
    f32, ours = res["float32"], res["fp16_stablejax"]
    # It learned (uniform guess: log 64 = 4.16), and float16 compute changed the numbers.
    assert f32["final_loss"] < 0.85 * math.log(64)
    assert ours["final_loss"] != f32["final_loss"]
    assert abs(ours["vs_float32"]) < 0.01
    assert ours["loss_scale"] == 2.0**15 and ours["overflows"] == 0
    assert "| fp16_stablejax |" in table
