"""Runs the demo's scenarios: ``lint`` on both losses, the naive run, ``locate``, the fixed run.

Everything the demo shows on the console is printed here with ``rich``; the
files it writes are produced by :mod:`stablejax._src.demo.report` and
:mod:`stablejax._src.demo.plots`.
"""

from __future__ import annotations

import dataclasses
import linecache
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from stablejax._src.debug.lint import lint
from stablejax._src.debug.locate import locate
from stablejax._src.debug.report import Report
from stablejax._src.debug.risk import Risks
from stablejax._src.demo.scenarios import SCENARIOS, Scenario
from stablejax._src.demo.train import Batch, Recipe, Run, RunLog
from stablejax._src.numerics.harden import harden


@dataclasses.dataclass
class ScenarioResult:
    """What one scenario showed.

    Attributes:
      scenario: the scenario.
      steps: steps asked for.
      naive: the naive run (stopped at its first non-finite step).
      fixed: the fixed run (all ``steps``).
      report: ``locate``'s report on the naive run's bad step, if it had one.
      locate_seconds: wall time of ``locate``.
      seconds: wall time of the whole scenario, compilation included.
      lint_naive: ``lint`` of ``value_and_grad`` of the naive loss, before training.
      lint_fixed: the same for the fixed loss.
      lint_seconds: wall time of both ``lint`` calls.
      hardened_finite: whether ``value_and_grad(stablejax.harden(loss_fn))`` is finite
        (value and every gradient entry) on the naive run's bad step; ``None`` when
        the naive run had no bad step.
    """

    scenario: Scenario
    steps: int
    naive: RunLog
    fixed: RunLog
    report: Report | None
    locate_seconds: float
    seconds: float
    lint_naive: Risks = dataclasses.field(default_factory=Risks)
    lint_fixed: Risks = dataclasses.field(default_factory=Risks)
    lint_seconds: float = 0.0
    hardened_finite: bool | None = None

    @property
    def harden_expected(self) -> bool:
        """``harden`` repairs a singularity written in the code: not bad data, not an
        explosion, not a float16 overflow (a range problem, not a singular point)."""
        return self.scenario.in_code and (
            self.scenario.expected_category != "overflow_low_precision"
        )

    @property
    def harden_ok(self) -> bool:
        """The hardened loss is finite on the bad step exactly when ``harden`` should help."""
        return self.hardened_finite is not None and self.hardened_finite == self.harden_expected

    @property
    def category_ok(self) -> bool:
        """Whether ``locate`` gave the category the scenario is about."""
        return self.report is not None and self.report.category == self.scenario.expected_category

    @property
    def lint_ok(self) -> bool:
        """``lint`` flags the naive loss (high) exactly when the cause is in the code, and
        finds nothing high in the fixed one."""
        return bool(self.lint_naive.high) == self.scenario.in_code and not self.lint_fixed.high

    @property
    def ok(self) -> bool:
        """Naive run went non-finite, locate, lint and harden behaved, the fixed run finished."""
        return self.naive.nonfinite_step is not None and self.category_ok and self.lint_ok and (
            self.harden_ok
        ) and (
            self.fixed.finished_finite and self.fixed.steps_run == self.steps
        )


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else ("NaN" if math.isnan(x) else str(x))


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}", justify="left"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _train(
    run: Run, batches: Sequence[Batch], label: str, naive: bool, console: Console
) -> tuple[RunLog, tuple | None]:
    with _progress(console) as progress:
        task = progress.add_task(label, total=len(batches), loss="-")

        def on_step(i: int, loss: float) -> None:
            progress.update(task, completed=i + 1, loss=_fmt(loss))

        log, culprit = run.train(batches, stop_on_nonfinite=naive, on_step=on_step)
        if naive and log.nonfinite_step is not None:
            progress.update(
                task, description=f"[red]{label}: non-finite at step {log.nonfinite_step}"
            )
        elif log.skipped:
            progress.update(
                task, description=f"[green]{label}: finished, {len(log.skipped)} step(s) skipped"
            )
        else:
            progress.update(task, description=f"[green]{label}: finished")
    return log, culprit


def source_line(report: Report) -> str:
    """The text of the user's line the report points at ('' when unknown)."""
    if not report.source or ":" not in report.source:
        return ""
    file, _, line = report.source.rpartition(":")
    try:
        return linecache.getline(file, int(line)).strip()
    except ValueError:
        return ""


def op_label(report: Report) -> str:
    """``div (grad of sqrt)``, ``mul``, or the input path for values that came in."""
    if report.primitive is None:
        return report.input_path or "(input)"
    if report.op and report.op != report.primitive:
        return f"{report.primitive} (grad of {report.op})"
    return report.primitive


def report_panel(report: Report) -> Panel:
    """The ``locate`` report as a rich panel: op, module, phase, line, category, fix."""
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    what = "NaN" if report.kind == "nan" else "Inf"
    op = report.primitive or "(input)"
    if report.op and report.op != report.primitive:
        op += f" (derivative of {report.op})"
    table.add_row("first", Text(f"{what} born in {op}"))
    if report.input_path:
        rows = f" rows {report.rows}" if report.rows else ""
        table.add_row("input", Text(f"{report.input_path}{rows}"))
    table.add_row("module", Text(report.module or "-"))
    table.add_row("phase", report.phase)
    line = source_line(report)
    table.add_row("line", Text(f"{report.source or '-'}" + (f"  {line}" if line else "")))
    table.add_row("category", Text(report.category, style="bold magenta"))
    table.add_row("why", Text(report.why))
    table.add_row("fix", Text(report.suggestion, style="green"))
    return Panel(table, title="stablejax.debug.locate", border_style="magenta", expand=False)


def _spec(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def lint_recipe(recipe: Recipe, batch: Batch) -> Risks:
    """``lint`` of ``value_and_grad(recipe.loss_fn)`` on the shapes of the params and a batch."""
    fn = jax.value_and_grad(recipe.loss_fn)
    return lint(fn)(_spec(recipe.params), _spec(batch))


def hardened_is_finite(loss_fn, params, batch) -> bool:
    """Whether ``value_and_grad(harden(loss_fn))`` is finite at ``(params, batch)``."""
    value, grads = jax.jit(jax.value_and_grad(harden(loss_fn)))(params, batch)
    leaves = [value, *jax.tree.leaves(grads)]
    return all(bool(jnp.isfinite(x).all()) for x in leaves)


def lint_line(risks: Risks) -> Text:
    """One line per high risk: ``high sqrt backward zoo.py:71 MeanStdPool_0 -> fix``."""
    if not risks.high:
        low = f" ({len(risks)} low)" if risks else ""
        return Text(f"no high-severity risk{low}", style="green")
    text = Text()
    for i, r in enumerate(risks.high):
        text.append("\n" if i else "")
        text.append(f"high {r.primitive} {r.phase} ", style="bold red")
        text.append(f"{r.source or '-'} {r.module or ''} ")
        text.append(f"-> {r.suggestion}", style="green")
    return text


def run_scenario(scenario: Scenario, steps: int, console: Console) -> ScenarioResult:
    """Runs one scenario and prints ``lint``'s findings, its progress and ``locate``'s report."""
    start = time.perf_counter()
    console.rule(f"[bold]{escape(scenario.title)}[/bold]  ({scenario.name})")
    console.print(Text("cause: ", style="dim") + Text(scenario.cause))
    batches, naive_recipe, fixed_recipe = scenario.build(steps)
    t = time.perf_counter()
    lint_naive = lint_recipe(naive_recipe, batches[0])
    lint_fixed = lint_recipe(fixed_recipe, batches[0])
    lint_seconds = time.perf_counter() - t
    console.print(Text("lint, before training, naive loss: ", style="dim") + lint_line(lint_naive))
    console.print(Text("lint, fixed loss: ", style="dim") + lint_line(lint_fixed))
    naive_run = Run.build(naive_recipe)
    naive, culprit = _train(naive_run, batches, "naive", True, console)
    report, locate_seconds, hardened_finite = None, 0.0, None
    if culprit is None:
        console.print("[yellow]the naive run stayed finite: nothing to locate[/yellow]")
    else:
        step = naive.nonfinite_step
        console.print(
            Text(
                f"naive run went non-finite at step {step} (loss {_fmt(naive.losses[step])}, "
                f"grad norm {_fmt(naive.grad_norms[step])}); "
                "locate(jax.value_and_grad(loss_fn))(params, batch) on that step:"
            )
        )
        t = time.perf_counter()
        # locate on the loss and its gradient at the step's parameters and batch:
        # every cause here is born there (the optimizer update would add only
        # op-by-op evaluation time).
        params, _, batch = culprit
        grads_fn = jax.value_and_grad(naive_run.loss_fn)
        try:
            report = locate(grads_fn, history=naive.history()[:step])(params, batch)
        except Exception as e:  # the demo reports a failing locate and goes on
            console.print(Text(f"locate failed: {type(e).__name__}: {e}", style="red"))
            report = None
        locate_seconds = time.perf_counter() - t
        if report is None:
            console.print("[yellow]locate gave no report for this step[/yellow]")
        else:
            console.print(report_panel(report))
        hardened_finite = hardened_is_finite(naive_run.loss_fn, params, batch)
        console.print(Text("stablejax.harden(loss_fn) on that step: ", style="dim") + Text(
            "finite value and gradient" if hardened_finite else "still non-finite "
            "(harden repairs singular ops in the code, not data, explosions or overflow)",
            style="green" if hardened_finite else "yellow"))
    console.print(Text("fix: ", style="dim") + Text(scenario.fix))
    fixed, _ = _train(Run.build(fixed_recipe), batches, "fixed", False, console)
    return ScenarioResult(
        scenario, steps, naive, fixed, report, locate_seconds, time.perf_counter() - start,
        lint_naive, lint_fixed, lint_seconds, hardened_finite,
    )


def summary_table(results: Sequence[ScenarioResult], wall_seconds: float) -> Table:
    """The rich summary table printed at the end of the demo.

    The ``lint`` column counts high-severity risks in the naive/fixed loss, marked
    ✓ when the naive one is flagged exactly when the cause is in the code.
    """
    table = Table(title=f"stablejax demo: {len(results)} scenario(s) in {wall_seconds:.1f} s")
    for col, justify, wrap in (
        ("scenario", "left", False), ("lint", "left", False),
        ("naive", "right", False),
        ("locate: op, phase, module", "left", True), ("category", "left", False),
        ("fix", "left", False), ("fixed loss", "right", False), ("skips", "right", False),
    ):
        table.add_column(col, justify=justify, overflow="fold", no_wrap=not wrap)
    for r in results:
        rep = r.report
        where = "-" if rep is None else ", ".join(
            x for x in (op_label(rep), rep.phase, rep.module) if x
        )
        cat = "-" if rep is None else rep.category
        mark = "[green]✓[/green] " if r.category_ok else "[red]✗[/red] "
        fixed_style = "green" if r.fixed.finished_finite else "red"
        lint_mark = "[green]✓[/green] " if r.lint_ok else "[red]✗[/red] "
        table.add_row(
            r.scenario.name,
            Text.from_markup(lint_mark)
            + Text(f"{len(r.lint_naive.high)}/{len(r.lint_fixed.high)}"),
            "-" if r.naive.nonfinite_step is None else f"step {r.naive.nonfinite_step}",
            Text(where),
            Text.from_markup(mark) + Text(cat),
            Text(r.scenario.short_fix),
            Text(_fmt(r.fixed.final_loss), style=fixed_style),
            str(len(r.fixed.skipped)),
        )
    return table


def scenario_names(requested: Sequence[str] | None) -> list[str]:
    """Validates ``--scenario`` values (comma-separated or repeated; ``all``).

    Raises:
      ValueError: for an unknown name, listing the known ones.

    Examples:
      >>> scenario_names(["sqrt_loss,nan_batch", "sqrt_loss"])
      ['sqrt_loss', 'nan_batch']
      >>> len(scenario_names(None))
      6
      >>> scenario_names(["nope"])  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ValueError: unknown scenario 'nope'; choose from: all, explosion, zero_norm, ...
    """
    if not requested:
        return list(SCENARIOS)
    names: list[str] = []
    for item in requested:
        for name in (n.strip() for n in item.split(",")):
            if name == "all":
                names.extend(n for n in SCENARIOS if n not in names)
            elif name in SCENARIOS:
                if name not in names:
                    names.append(name)
            elif name:
                raise ValueError(
                    f"unknown scenario {name!r}; choose from: all, {', '.join(SCENARIOS)}"
                )
    if not names:
        raise ValueError(f"no scenario given; choose from: all, {', '.join(SCENARIOS)}")
    return names
