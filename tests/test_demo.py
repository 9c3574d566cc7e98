"""The ``stablejax demo`` command: every scenario, its reports and figures, and bad input.

The whole demo runs once (module fixture) in a short mode; the assertions read
what it printed and wrote.
"""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest

from stablejax.__main__ import main

STEPS = 24
EXPECTED = {
    "explosion": "grad_explosion",
    "zero_norm": "forward_singularity",
    "silent_std": "derivative_singularity",
    "sqrt_loss": "loss_nan",
    "nan_batch": "bad_input",
    "fp16_overflow": "overflow_low_precision",
}


def _num(x):
    return float(x)  # report.json writes non-finite floats as "nan" / "inf"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "nested" / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--steps", str(STEPS), "--out", str(out)])
    with open(out / "report.json") as f:
        report = json.load(f)
    return {"code": code, "out": out, "stdout": buf.getvalue(), "json": report}


def _scenario(demo, name):
    (found,) = [s for s in demo["json"]["scenarios"] if s["name"] == name]
    return found


def test_demo_exits_zero_and_runs_every_scenario(demo):
    assert demo["code"] == 0
    assert [s["name"] for s in demo["json"]["scenarios"]] == list(EXPECTED)
    assert demo["json"]["steps"] == STEPS
    assert demo["json"]["all_ok"] is True


@pytest.mark.parametrize("name", list(EXPECTED))
def test_naive_run_goes_nonfinite_at_a_reported_step(demo, name):
    naive = _scenario(demo, name)["naive"]
    step = naive["nonfinite_step"]
    assert isinstance(step, int) and 0 <= step < STEPS
    assert naive["steps_run"] == step + 1  # stopped there
    bad = [_num(naive["losses"][step]), _num(naive["grad_norms"][step])]
    assert not all(math.isfinite(v) for v in bad)
    assert all(math.isfinite(_num(v)) for v in naive["losses"][:step])
    assert f"non-finite at step {step}" in demo["stdout"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_locate_category_is_the_cause(demo, name):
    located = _scenario(demo, name)["locate"]
    assert located is not None
    assert located["category"] == EXPECTED[name]
    assert located["suggestion"]
    assert located["phase"] in ("forward", "backward", "update")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fixed_run_trains_to_the_end_finite(demo, name):
    fixed = _scenario(demo, name)["fixed"]
    assert fixed["steps_run"] == STEPS
    assert fixed["finished_finite"] is True
    assert math.isfinite(_num(fixed["final_loss"]))
    kept = [_num(v) for i, v in enumerate(fixed["losses"]) if i not in fixed["skipped_steps"]]
    assert all(math.isfinite(v) for v in kept)


def test_locate_details_name_the_culprit(demo):
    nan_batch = _scenario(demo, "nan_batch")
    assert nan_batch["locate"]["input_path"] == "batch['x']"
    assert nan_batch["locate"]["rows"] == [3, 17]
    # The guard skipped exactly the bad batch, and nothing else.
    assert nan_batch["fixed"]["skipped_steps"] == [nan_batch["naive"]["nonfinite_step"]]

    silent = _scenario(demo, "silent_std")
    step = silent["naive"]["nonfinite_step"]
    assert math.isfinite(_num(silent["naive"]["losses"][step]))  # finite loss ...
    assert math.isnan(_num(silent["naive"]["grad_norms"][step]))  # ... NaN gradient
    assert silent["locate"]["phase"] == "backward"
    assert "MeanStdPool" in silent["locate"]["module"]

    zero = _scenario(demo, "zero_norm")["locate"]
    assert zero["phase"] == "forward" and zero["primitive"] == "div"
    assert "UnitNorm" in zero["module"]
    assert "jnp.linalg.norm" in zero["line_text"]

    # The fix locate suggests is the one the fixed run applies.
    assert "stablejax.losses.mae" in _scenario(demo, "sqrt_loss")["locate"]["suggestion"]
    assert "StdPool" in silent["locate"]["suggestion"]
    assert "L2Normalize" in zero["suggestion"]
    assert "float32" in _scenario(demo, "fp16_overflow")["locate"]["suggestion"]

    fp16 = _scenario(demo, "fp16_overflow")["locate"]
    assert any(op["dtype"] == "float16" for op in fp16["inputs"])
    assert _scenario(demo, "explosion")["locate"]["module"].startswith("DeepMLP")


def test_console_shows_progress_locate_and_summary(demo):
    text = demo["stdout"]
    assert text.count("stablejax.debug.locate") == len(EXPECTED)
    assert f"stablejax demo: {len(EXPECTED)} scenario(s)" in text
    for name, category in EXPECTED.items():
        assert name in text and category in text
    assert f"{STEPS}/{STEPS}" in text  # a fixed run's progress bar ran to the end


def test_reports_and_figures_are_written(demo):
    out = demo["out"]
    md = (out / "report.md").read_text()
    assert md.startswith("# stablejax demo report")
    for name, category in EXPECTED.items():
        assert f"`{name}`" in md and f"`{category}`" in md
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000
    assert not (out / ".stablejax-write-test").exists()


def test_no_plots_writes_reports_only(tmp_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--scenario", "sqrt_loss", "--steps", "20", "--out",
                     str(tmp_path), "--no-plots"])
    assert code == 0
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["name"] for s in report["scenarios"]] == ["sqrt_loss"]


def _one_line_error(capsys, code, expected_code, *needles):
    err = capsys.readouterr().err
    assert code == expected_code
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err


def test_unknown_scenario_is_one_line_error(capsys, tmp_path):
    code = main(["demo", "--scenario", "explosion,nope", "--out", str(tmp_path)])
    _one_line_error(capsys, code, 2, "unknown scenario 'nope'", "fp16_overflow")
    assert os.listdir(tmp_path) == []  # nothing ran


def test_unwritable_output_is_one_line_error(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = main(["demo", "--scenario", "sqrt_loss", "--out", str(blocker / "out")])
    _one_line_error(capsys, code, 1, "cannot write to output folder", str(blocker / "out"))


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["demo", "--steps", "3"], "--steps must be at least"),
        (["demo", "--steps", "many"], "--steps must be an integer"),
        (["demo", "--bogus"], "unrecognized arguments"),
        ([], "choose a command"),
        (["train"], "invalid choice"),
    ],
)
def test_bad_command_lines_are_one_line_errors(capsys, argv, needle):
    _one_line_error(capsys, main(argv), 2, needle)


def test_python_dash_m_gives_one_line_error_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "stablejax", "demo", "--scenario", "nope", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "unknown scenario 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_failure_marker_label_sits_at_a_finite_value():
    # silent_std: the naive loss at the bad step is finite (0.0466 in the README run),
    # only its gradient is NaN; the label must sit at that value, not at the axis top.
    from stablejax._src.demo.plots import scenario_figure
    from stablejax._src.demo.runner import ScenarioResult
    from stablejax._src.demo.scenarios import SCENARIOS
    from stablejax._src.demo.train import RunLog

    naive = RunLog(losses=[1.0, 0.5, 0.0466], grad_norms=[2.0, 1.0, float("nan")],
                   nonfinite_steps=[2])
    fixed = RunLog(losses=[1.0, 0.5, 0.04, 0.03], grad_norms=[2.0, 1.0, 0.5, 0.4])
    result = ScenarioResult(SCENARIOS["silent_std"], 4, naive, fixed, None, 0.0, 0.0)
    fig = scenario_figure(result)
    loss_ax, grad_ax = fig.axes[:2]
    (label,) = [t for t in loss_ax.texts if t.get_text() == "0.0466"]
    assert label.xy == (2, 0.0466) and label.xycoords is loss_ax.transData
    lo, hi = loss_ax.get_ylim()
    assert lo <= 0.0466 <= hi
    (nan_label,) = [t for t in grad_ax.texts if t.get_text() == "NaN"]
    assert nan_label.xy == (2, 0.96)  # axes fraction: the top edge


def test_lint_flags_naive_code_and_not_the_fix(demo):
    lines = {"zero_norm": "jnp.linalg.norm", "silent_std": "jnp.std",
             "sqrt_loss": "jnp.sqrt", "fp16_overflow": "h * h"}
    for name in EXPECTED:
        found = _scenario(demo, name)["lint"]
        high = [r for r in found["naive"] if r["severity"] == "high"]
        assert found["ok"] is True
        assert not [r for r in found["fixed"] if r["severity"] == "high"]
        if name in lines:  # the cause is in the code: lint names its line
            assert found["in_code"] is True
            assert any(lines[name] in r["line"] and "zoo.py:" in r["source"] for r in high)
        else:  # a learning-rate explosion, bad data: nothing in the code to flag
            assert found["in_code"] is False and high == []
    assert "lint, before training, naive loss" in demo["stdout"]


def test_harden_repairs_the_singularities_in_the_code_and_only_those(demo):
    repaired = {"zero_norm", "silent_std", "sqrt_loss"}  # singular ops written in the code
    for name in EXPECTED:
        found = _scenario(demo, name)["harden"]
        assert found["finite_on_bad_step"] is (name in repaired), name
        assert found["expected"] is (name in repaired) and found["ok"] is True, name
    assert "stablejax.harden(loss_fn) on that step: finite value and gradient" in demo["stdout"]
