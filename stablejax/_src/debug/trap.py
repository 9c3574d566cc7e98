"""``nan_trap``: jax's ``jax_debug_nans`` machinery, answering with a ``Report``."""

from __future__ import annotations

import contextlib
import re
import types
from collections.abc import Iterator, Sequence
from typing import Any

import jax

from stablejax._src.debug.history import parse_history
from stablejax._src.debug.locate import locate
from stablejax._src.debug.report import Report
from stablejax._src.debug.source import Frame, innermost_user_frame

_TRAP_CONTEXT = jax.make_user_context(None)
_DISPATCH = ("_run_python_pjit", "_python_pjit_helper", "maybe_recursive_nan_check")
_MESSAGE = re.compile(r"invalid value \((nan|inf)\) encountered in ([\w.<>]+)")


class NonFiniteError(FloatingPointError):
    """A ``FloatingPointError`` from ``jax_debug_nans``/``jax_debug_infs`` with a ``Report``.

    Attributes:
      report: the :class:`stablejax.debug.Report` for the failing call.
    """

    def __init__(self, report: Report, original: str) -> None:
        super().__init__(f"{report.headline}\n(jax: {original})")
        self.report = report


def _failing_call(err: BaseException) -> tuple[Any, tuple, dict] | None:
    """The outermost ``jax.jit`` call that failed: its function and arguments.

    jax's jit dispatch (``pjit._run_python_pjit``) holds the user's function and
    its arguments as locals when ``jax_debug_nans`` catches the NaN. Those frames
    sit on the tracebacks of the internal errors in the exception's context
    chain (jax filters them out of the user-facing traceback) and above them on
    the stack (``f_back``). The de-optimized re-run raises again from the jitted
    internals it calls (``jnp.std``'s ``_std``, an eager ``div``), so the first
    dispatch frame found is not the user's step: the step's is the outermost
    one of the first error raised, the last of the chain.
    """
    found: tuple[Any, tuple, dict] | None = None
    seen: set[int] = set()
    exc: BaseException | None = err
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb: types.TracebackType | None = exc.__traceback__
        frame = None
        while tb is not None:
            frame, tb = tb.tb_frame, tb.tb_next
        outermost = None
        while frame is not None:
            if frame.f_code.co_name in _DISPATCH and "fun" in frame.f_locals:
                outermost = frame
            frame = frame.f_back
        if outermost is not None:
            loc = outermost.f_locals
            found = loc["fun"], tuple(loc.get("args", ())), dict(loc.get("kwargs") or {})
        exc = exc.__cause__ or exc.__context__
    return found


def _fallback_report(err: FloatingPointError) -> Report:
    """A report from jax's message and the traceback, when no jit call is on the stack."""
    text = str(err)
    match = _MESSAGE.search(text)
    kind, prim = (match.group(1), match.group(2)) if match else ("nan", None)
    frames = []
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append(Frame(code.co_filename, tb.tb_lineno, code.co_name))
        tb = tb.tb_next
    user = innermost_user_frame(reversed(frames))
    return Report(
        primitive=prim,
        kind=kind,
        phase="backward" if "backward pass" in text else "forward",
        category="forward_singularity",
        suggestion="run stablejax.debug.locate(fn)(*args) for the full diagnosis",
        why=f"jax_debug_nans stopped at {prim}",
        source=f"{user.file}:{user.line}" if user else None,
    )


def nan_trap(*, history: Sequence[Any] | None = None) -> contextlib.AbstractContextManager[None]:
    """Turns on ``jax_debug_nans``/``jax_debug_infs``; their error carries a ``Report``.

    Inside the block jax checks every jitted call's outputs and raises
    ``FloatingPointError`` at the first NaN/Inf; ``nan_trap`` re-raises it as
    :class:`NonFiniteError` (a ``FloatingPointError``) whose ``report`` is what
    :func:`stablejax.debug.locate` says about the failing jitted call and its
    arguments. The flags are restored on exit, also on error.

    Where ``locate`` does better (measured, see ``docs/debug.md``): jax raises
    only when a NaN reaches a jitted function's output (``jnp.where``-masked NaNs
    pass); an Inf inside a jitted function that does not reach its output is
    missed; a jitted step compiled before the block, or a step on its fast call
    path, may not be re-checked at all; and the re-run is op by op. ``locate``
    needs none of this: call it on the step and its inputs when a loss or a
    ``watch`` flag goes bad.

    Args:
      history: passed to ``locate`` (recent losses / grad norms).

    Returns:
      A context manager.

    Raises:
      TypeError: at the call, if ``history`` is not a list of losses or dicts.
      NonFiniteError: on the first NaN/Inf jax detects inside the block.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from stablejax.debug import nan_trap
      >>> try:
      ...     with nan_trap():
      ...         jax.jit(lambda x: jnp.log(x) - 1.0)(jnp.array([-1.0]))
      ... except FloatingPointError as e:
      ...     report = e.report  # doctest: +ELLIPSIS
      Invalid nan value encountered in the output of a jax.jit function...
      >>> report.primitive, report.category
      ('log', 'forward_singularity')
    """
    parse_history(history)  # a malformed history fails here, not at the first NaN
    return _trap(history)


@contextlib.contextmanager
def _trap(history: Sequence[Any] | None) -> Iterator[None]:
    nans, infs = jax.config.jax_debug_nans, jax.config.jax_debug_infs
    jax.config.update("jax_debug_nans", True)
    jax.config.update("jax_debug_infs", True)
    try:
        # A value of our own in jax's tracing-cache key: jitted functions compiled
        # before the block miss their fast call path (which never checks the
        # flags) and are re-dispatched through the checked Python path.
        with _TRAP_CONTEXT("stablejax.debug.nan_trap"):
            yield
    except NonFiniteError:
        raise
    except FloatingPointError as err:
        call = _failing_call(err)
        jax.config.update("jax_debug_nans", nans)
        jax.config.update("jax_debug_infs", infs)
        report = None
        if call is not None:
            fn, args, kwargs = call
            try:
                report = locate(fn, history=history)(*args, **kwargs)
            except Exception:  # the trap must surface jax's error, not ours

                report = None
        fallback = _fallback_report(err)
        if report is not None and report.source is None:
            # An eager primitive failed: its jit wraps only the primitive, so the
            # user's line is on the exception's traceback instead.
            report.source, report.frames = fallback.source, report.frames or []
        raise NonFiniteError(report or fallback, str(err)) from err
    finally:
        jax.config.update("jax_debug_nans", nans)
        jax.config.update("jax_debug_infs", infs)
