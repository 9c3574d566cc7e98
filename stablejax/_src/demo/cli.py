"""The ``stablejax`` command line: ``stablejax demo [...]`` and ``stablejax lint MODULE:FUNCTION``.

``stablejax lint MODULE:FUNCTION`` imports ``MODULE`` (a dotted name, or a path
to a ``.py`` file), calls ``FUNCTION()`` with no arguments and lints what it
returns: ``(fn, args)`` or ``(fn, args, kwargs)``, where ``args`` is a tuple of
example arguments (arrays or ``jax.ShapeDtypeStruct``; only shapes and dtypes
are read). It prints the risks and exits 4 when any is high severity.

Bad input (an unknown scenario, an unwritable output folder, a malformed
option) gives one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

MIN_STEPS = 20
DEFAULT_STEPS = 200
DEFAULT_OUT = "stablejax-demo"

EXIT_USAGE = 2  # bad command line
EXIT_IO = 1  # cannot write the output
EXIT_FAILED = 3  # a scenario did not show what it should
EXIT_RISKS = 4  # lint found high-severity risks


class UsageError(Exception):
    """A malformed command line; the message is the one line shown to the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and exits; we want one line
        raise UsageError(message)


def _steps(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be an integer, got {value!r}") from None
    if n < MIN_STEPS:
        raise argparse.ArgumentTypeError(f"--steps must be at least {MIN_STEPS}, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``stablejax`` command."""
    from stablejax._src.demo.scenarios import SCENARIOS

    parser = _Parser(
        prog="stablejax", description="stablejax: numerical stability for JAX/Flax training."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train through six causes of NaN: find each with locate, fix it with stablejax",
        description="One small training run per cause of NaN: the naive run until it goes "
        "non-finite, stablejax.debug.locate's report, then the run with the stablejax fix. "
        f"Scenarios: {', '.join(SCENARIOS)}.",
    )
    demo.add_argument(
        "--scenario", action="append", metavar="NAME",
        help="run only this scenario (repeat or comma-separate for several; default: all)",
    )
    demo.add_argument(
        "--steps", type=_steps, default=DEFAULT_STEPS, metavar="N",
        help=f"training steps per run (default {DEFAULT_STEPS}, at least {MIN_STEPS})",
    )
    demo.add_argument(
        "--out", default=DEFAULT_OUT, metavar="DIR",
        help=f"folder for the figures and reports (default ./{DEFAULT_OUT}/)",
    )
    demo.add_argument("--no-plots", action="store_true", help="do not write the PNG figures")
    lint = sub.add_parser(
        "lint",
        help="list the lines of a function that can make NaN/Inf, without running it",
        description="MODULE:FUNCTION names a function taking no arguments that returns "
        "(fn, args) or (fn, args, kwargs); stablejax.debug.lint(fn)(*args, **kwargs) is "
        f"printed. Exit status {EXIT_RISKS} when a high-severity risk is found.",
    )
    lint.add_argument("target", metavar="MODULE:FUNCTION")
    lint.add_argument("--json", action="store_true", help="print the risks as JSON")
    return parser


def _load_target(target: str):
    """``(fn, args, kwargs)`` from ``MODULE:FUNCTION``.

    Raises:
      UsageError: for a malformed target, a module or function that cannot be
        found, or a return value of the wrong form.
    """
    import importlib
    import importlib.util

    module_name, sep, func_name = target.rpartition(":")
    if not sep or not module_name or not func_name:
        raise UsageError(f"lint: expected MODULE:FUNCTION (e.g. mypkg.models:lint_example), "
                         f"got {target!r}")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location("_stablejax_lint_target", module_name)
            if spec is None or spec.loader is None or not os.path.exists(module_name):
                raise ImportError(f"no file {module_name!r}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as e:
        raise UsageError(f"lint: cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    build = getattr(module, func_name, None)
    if not callable(build):
        raise UsageError(f"lint: {module_name!r} has no function {func_name!r}")
    try:
        got = build()
    except Exception as e:
        raise UsageError(f"lint: {target}() raised {type(e).__name__}: {e}") from None
    if not isinstance(got, tuple) or len(got) not in (2, 3) or not callable(got[0]):
        raise UsageError(f"lint: {target}() must return (fn, args) or (fn, args, kwargs), "
                         f"got {type(got).__name__}")
    fn, args = got[0], got[1]
    kwargs = got[2] if len(got) == 3 else {}
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise UsageError(f"lint: {target}() must return args as a tuple and kwargs as a dict")
    return fn, tuple(args), kwargs


def run_lint(target: str, as_json: bool) -> int:
    """Lints ``MODULE:FUNCTION``, prints the risks; the exit status."""
    from rich.console import Console

    from stablejax._src.debug.lint import lint

    fn, args, kwargs = _load_target(target)
    try:
        risks = lint(fn)(*args, **kwargs)
    except TypeError as e:
        return _fail(str(e).splitlines()[0], EXIT_USAGE)
    if as_json:
        print(risks.to_json(indent=1))
    else:
        console = Console(highlight=False)
        if not console.is_terminal:
            console = Console(highlight=False, width=160)
        console.print(risks.table(title=f"stablejax lint {target}") if risks else str(risks))
    return EXIT_RISKS if risks.high else 0


def _check_out(out: str) -> None:
    """Creates ``out`` and checks a file can be written there.

    Raises:
      OSError: if it cannot.
    """
    os.makedirs(out, exist_ok=True)
    probe = os.path.join(out, ".stablejax-write-test")
    with open(probe, "w") as f:
        f.write("ok")
    os.remove(probe)


def _fail(message: str, code: int) -> int:
    print(f"stablejax: error: {message}", file=sys.stderr)
    return code


def run_demo(names: Sequence[str], steps: int, out: str, plots: bool) -> int:
    """Runs the scenarios ``names``, prints the summary and writes ``out``; the exit status."""
    from rich.console import Console
    from rich.text import Text

    from stablejax._src.demo import report as demo_report
    from stablejax._src.demo import runner as demo_runner

    console = Console(highlight=False)
    if not console.is_terminal:  # logs and CI: wide enough for the summary table
        console = Console(highlight=False, width=132)
    start = time.perf_counter()
    results = [demo_runner.run_scenario(demo_runner.SCENARIOS[n], steps, console) for n in names]
    wall = time.perf_counter() - start
    console.print()
    console.print(demo_runner.summary_table(results, wall))
    try:
        written = demo_report.write_reports(out, results, wall, steps, plots)
        if plots:
            from stablejax._src.demo.plots import plot_scenario

            for r in results:
                path = os.path.join(out, f"{r.scenario.name}.png")
                plot_scenario(r, path)
                written.append(path)
    except OSError as e:
        return _fail(f"cannot write to {out!r}: {e.strerror or e}", EXIT_IO)
    console.print(Text(f"wrote {', '.join(written)}"))
    bad = [r.scenario.name for r in results if not r.ok]
    if bad:
        return _fail(f"scenario(s) did not behave as expected: {', '.join(bad)}", EXIT_FAILED)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stablejax`` console script and ``python -m stablejax``.

    Args:
      argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
      The exit status: 0 on success, 2 for a bad command line, 1 when the output
      folder cannot be written, 3 when a scenario did not show what it should,
      4 when ``lint`` found a high-severity risk.
    """
    from stablejax._src.demo.runner import scenario_names

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError("choose a command: demo, lint (see stablejax --help)")
        if args.command == "lint":
            return run_lint(args.target, args.json)
        names = scenario_names(args.scenario)
    except (UsageError, ValueError) as e:
        return _fail(str(e), EXIT_USAGE)
    try:
        _check_out(args.out)
    except OSError as e:
        return _fail(f"cannot write to output folder {args.out!r}: {e.strerror or e}", EXIT_IO)
    return run_demo(names, args.steps, args.out, not args.no_plots)
