"""The demo's files: ``report.json`` (every number) and ``report.md`` (for people).

``report.json`` is strict JSON: non-finite floats (the naive runs' last losses)
are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from typing import Any

import jax

from stablejax._src.demo.runner import ScenarioResult, op_label, source_line
from stablejax._src.demo.train import RunLog


def _clean(x: Any) -> Any:
    """Plain JSON types; non-finite floats as strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return _clean(x.item())
    return x


def _run_dict(log: RunLog) -> dict[str, Any]:
    return {
        "steps_run": log.steps_run,
        "nonfinite_step": log.nonfinite_step,
        "nonfinite_steps": log.nonfinite_steps,
        "skipped_steps": log.skipped,
        "final_loss": log.final_loss,
        "finished_finite": log.finished_finite,
        "seconds": round(log.seconds, 3),
        "losses": log.losses,
        "grad_norms": log.grad_norms,
    }


def _device_name(dev: jax.Device) -> str:
    kind = str(getattr(dev, "device_kind", "") or "")
    return dev.platform if kind.lower() in ("", dev.platform) else f"{dev.platform} ({kind})"


def environment() -> dict[str, str]:
    """Versions and the device the demo ran on."""
    import flax
    import optax

    from stablejax import __version__

    dev = jax.devices()[0]
    return {
        "stablejax": __version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "device": _device_name(dev),
        "cpu_count": str(os.cpu_count()),
    }


def to_json(results: Sequence[ScenarioResult], wall_seconds: float, steps: int) -> dict[str, Any]:
    """Everything the demo measured, as a JSON-ready dict."""
    scenarios = []
    for r in results:
        rep = r.report
        located = None
        if rep is not None:
            located = rep.to_dict() | {"headline": rep.headline, "line_text": source_line(rep)}
        scenarios.append(
            {
                "name": r.scenario.name,
                "title": r.scenario.title,
                "cause": r.scenario.cause,
                "fix": r.scenario.fix,
                "expected_category": r.scenario.expected_category,
                "category_ok": r.category_ok,
                "ok": r.ok,
                "seconds": round(r.seconds, 3),
                "locate_seconds": round(r.locate_seconds, 3),
                "lint": {
                    "in_code": r.scenario.in_code,
                    "ok": r.lint_ok,
                    "seconds": round(r.lint_seconds, 3),
                    "naive": r.lint_naive.to_dict(),
                    "fixed": r.lint_fixed.to_dict(),
                },
                "harden": {
                    "expected": r.harden_expected,
                    "finite_on_bad_step": r.hardened_finite,
                    "ok": r.harden_ok,
                },
                "naive": _run_dict(r.naive),
                "locate": located,
                "fixed": _run_dict(r.fixed),
                "figure": f"{r.scenario.name}.png",
            }
        )
    return _clean(
        {
            "steps": steps,
            "wall_seconds": round(wall_seconds, 3),
            "all_ok": all(r.ok for r in results),
            "environment": environment(),
            "scenarios": scenarios,
        }
    )


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(
    results: Sequence[ScenarioResult], wall_seconds: float, steps: int, plots: bool
) -> str:
    """The human report: the summary table, then one section per scenario."""
    env = environment()
    lines = [
        "# stablejax demo report",
        "",
        f"{len(results)} scenario(s), {steps} steps each, {wall_seconds:.1f} s wall time "
        f"on {env['device']} ({env['cpu_count']} CPU cores); stablejax {env['stablejax']}, "
        f"jax {env['jax']}, flax {env['flax']}, optax {env['optax']}.",
        "",
        "| scenario | naive: non-finite at | locate: op / phase / module | category | fix "
        "| fixed: final loss | skipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rep = r.report
        where = "-" if rep is None else (
            f"`{op_label(rep)}` / {rep.phase} / {rep.module or '-'}"
        )
        cat = "-" if rep is None else f"{'✓' if r.category_ok else '✗'} `{rep.category}`"
        step = r.naive.nonfinite_step
        lines.append(
            "| "
            + " | ".join(
                _md_cell(c)
                for c in (
                    r.scenario.name,
                    "-" if step is None else f"step {step}",
                    where,
                    cat,
                    r.scenario.fix,
                    f"{r.fixed.final_loss:.4g}",
                    str(len(r.fixed.skipped)),
                )
            )
            + " |"
        )
    for r in results:
        cause = r.scenario.cause[:1].upper() + r.scenario.cause[1:]
        lines += ["", f"## {r.scenario.title} (`{r.scenario.name}`)", "", cause + "."]
        step = r.naive.nonfinite_step
        if step is None:
            lines += ["", "The naive run stayed finite."]
        else:
            lines += [
                "",
                f"**Naive run**: non-finite at step {step} (loss "
                f"{r.naive.losses[step]:.4g}, gradient norm {r.naive.grad_norms[step]:.4g}).",
            ]
        lines += ["", "**`stablejax.debug.lint`** before training, naive loss:", "", "```",
                  str(r.lint_naive), "```", "", "fixed loss:", "", "```", str(r.lint_fixed),
                  "```"]
        if r.hardened_finite is not None:
            lines += ["", "**`stablejax.harden(loss_fn)`** on that step: " + (
                "finite value and gradient." if r.hardened_finite else "still non-finite.")]
        if r.report is not None:
            lines += ["", "**`stablejax.debug.locate`**:", "", "```", str(r.report), "```"]
            text = source_line(r.report)
            if text:
                lines += ["", f"The line: `{text}`"]
        skipped = r.fixed.skipped
        lines += [
            "",
            f"**Fix**: {r.scenario.fix}. **Fixed run**: {r.fixed.steps_run} steps, final loss "
            f"{r.fixed.final_loss:.4g}, "
            + (f"skipped steps {skipped}." if skipped else "no step skipped."),
        ]
        if plots:
            lines += ["", f"![{r.scenario.name}]({r.scenario.name}.png)"]
    return "\n".join(lines) + "\n"


def write_reports(
    out: str, results: Sequence[ScenarioResult], wall_seconds: float, steps: int, plots: bool
) -> list[str]:
    """Writes ``report.json`` and ``report.md`` into ``out``; returns their paths."""
    json_path = os.path.join(out, "report.json")
    with open(json_path, "w") as f:
        json.dump(to_json(results, wall_seconds, steps), f, indent=1, allow_nan=False)
    md_path = os.path.join(out, "report.md")
    with open(md_path, "w") as f:
        f.write(to_markdown(results, wall_seconds, steps, plots))
    return [json_path, md_path]
