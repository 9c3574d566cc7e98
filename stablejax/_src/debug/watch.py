"""``watch``: cheap always-on finiteness flags; ``watch_loop``: locate when one trips."""

from __future__ import annotations

import functools
import json
import math
import operator
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stablejax._src.debug.finite import all_finite
from stablejax._src.debug.locate import locate
from stablejax._src.debug.module_flags import Flags, ModuleFlagged
from stablejax._src.debug.report import Report

_GROUP_DEPTH = 3


def _group_name(path: tuple[Any, ...]) -> str:
    keep = path[:_GROUP_DEPTH]
    return jax.tree_util.keystr(tuple(keep)) or "out"


def finite_flags(tree: Any) -> dict[str, jax.Array]:
    """One boolean scalar per group of float leaves: ``True`` when all are finite.

    Leaves are grouped by their path cut to at most three keys, so a train
    step's ``(params, opt_state, loss)`` gives one flag per top-level module
    (``[0]['params']['Dense_0']``), per optimizer-state part and one for the
    loss. Runs inside ``jit``: no host callback.
    """
    names, leaves = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            continue
        names.append(_group_name(path))
        leaves.append(leaf)
    groups: dict[str, list[jax.Array]] = {}
    for name, ok in zip(names, all_finite(leaves)):
        groups.setdefault(name, []).append(ok)
    return {name: functools.reduce(jnp.logical_and, flags) for name, flags in groups.items()}


def nonfinite_shards(tree: Any) -> list[dict[str, Any]]:
    """Where a tree's non-finite values are: one entry per bad shard this process holds.

    For each float leaf that is not all finite, each of its shards addressable
    from this process (every shard of an unsharded array; the local ones of an
    array sharded over a multi-process mesh) that holds a NaN/Inf gives
    ``{'path', 'process', 'device', 'index', 'nonfinite'}``: the leaf's path,
    ``jax.process_index()``, the device id, the shard's index into the global
    array (one ``[start, stop)`` per dimension) and its non-finite count. Reads
    the leaves to the host: call it on a step whose ``watch`` flag is ``False``,
    not on every step.

    Args:
      tree: a pytree of arrays, e.g. a train step's outputs.

    Returns:
      A list of dicts, empty when every value this process holds is finite.

    Examples:
      >>> import jax.numpy as jnp
      >>> from stablejax.debug import nonfinite_shards
      >>> [(s['path'], s['nonfinite']) for s in nonfinite_shards({'w': jnp.array([1.0, jnp.nan])})]
      [("['w']", 1)]
    """
    out: list[dict[str, Any]] = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            continue
        shards = getattr(leaf, "addressable_shards", None)
        if shards is None:
            shards = [None]
        for shard in shards:
            data = np.asarray(leaf if shard is None else shard.data)
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            if not bad:
                continue
            index = []
            shape = np.shape(leaf)
            for dim, sl in enumerate(shard.index if shard is not None else ()):
                start, stop, _ = sl.indices(shape[dim])
                index.append([start, stop])
            out.append(
                {
                    "path": jax.tree_util.keystr(path) or "out",
                    "process": jax.process_index(),
                    "device": None if shard is None else int(shard.device.id),
                    "index": index,
                    "nonfinite": bad,
                }
            )
    return out


def watch(fn: Callable[..., Any]) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """Returns ``fn`` with one more output: finiteness flags of its outputs.

    ``watch(step)(*args)`` returns ``(step(*args), flags)``, where ``flags`` maps
    a group of output leaves (``[2]`` for a returned loss,
    ``[0]['params']['Block_0']`` per top-level module of returned params or
    gradients, ``[1][0].mu`` per optimizer-state part) to a boolean scalar.
    The flags are computed in the same jitted computation (jit the result, or
    pass an already jitted ``fn``: both work), without host callbacks, so they
    cost one extra read of the outputs. Return the gradients (or their global
    norm) from the step to watch them too.

    ``flags`` is a :class:`dict` with two more attributes. ``flags.modules``
    maps each top-level module and phase (``'Net/Block_2 (forward)'``, a linen
    scope below the root; ``'encoder (backward)'``, an NNX attribute) to a
    flag over every value that module handed on: its outputs, the cotangents
    it passed back, the gradients it made. ``flags.first_bad_module`` names
    the module and phase of the first of those values, in program order, that
    is not finite: where the NaN/Inf was born, to a module, with no re-run.
    Reading it brings one integer to the host; the flags themselves stay on
    device until read. To compute them ``watch`` traces ``fn`` once per
    argument signature and re-binds its equations (the same program plus the
    flags; nested ``jit`` bodies are inlined); NNX objects in the arguments are
    updated in place as ``fn`` would update them.

    Args:
      fn: the function to watch, typically a train step.

    Returns:
      The watched function.

    Raises:
      TypeError: if ``fn`` is not callable.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from stablejax.debug import watch
      >>> step = jax.jit(watch(lambda w, x: (w - 0.1 * x, jnp.log(x).sum())))
      >>> out, flags = step(jnp.ones(2), jnp.array([1.0, 0.0]))
      >>> {k: bool(v) for k, v in flags.items()}
      {'[0]': True, '[1]': False}
      >>> print(flags.first_bad_module)  # no modules in this step
      None
    """
    if not callable(fn):
        raise TypeError(f"watch: `fn` must be callable, got {type(fn).__name__}: {fn!r:.80}.")

    flagged = ModuleFlagged(fn, finite_flags)

    @functools.wraps(fn)
    def watched(*args: Any, **kwargs: Any) -> tuple[Any, Flags]:
        result = flagged(*args, **kwargs)
        if result is not None:
            return result
        out = fn(*args, **kwargs)
        return out, Flags(finite_flags(out))

    return watched


def _check_history_size(history_size: Any) -> int:
    if isinstance(history_size, bool) or not hasattr(history_size, "__index__"):
        raise TypeError(
            "watch_loop: `history_size` must be an integer >= 0 (e.g. history_size=100), got "
            f"{type(history_size).__name__}: {history_size!r:.80}."
        )
    size = operator.index(history_size)
    if size < 0:
        raise ValueError(
            f"watch_loop: `history_size` must be >= 0, got {size}; pass e.g. history_size=100 "
            "(0 keeps no history)."
        )
    return size


def _check_report_path(path: Any) -> str | os.PathLike[str] | None:
    """Fails now, not at the first bad step, when the report could not be written there."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            "watch_loop: `report_path` must be a file path or None, got "
            f"{type(path).__name__}: {path!r:.80}."
        )
    full = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(full)
    fix = "pass a file in an existing writable folder (e.g. report_path='nan_report.json') or None"
    if os.path.isdir(full):
        raise ValueError(f"watch_loop: report_path={os.fspath(path)!r} is a directory; {fix}.")
    if not os.path.isdir(folder):
        raise ValueError(
            f"watch_loop: report_path={os.fspath(path)!r}: the folder {folder!r} does not exist; "
            f"{fix}."
        )
    if not os.access(folder, os.W_OK) or (os.path.exists(full) and not os.access(full, os.W_OK)):
        raise ValueError(f"watch_loop: report_path={os.fspath(path)!r} is not writable; {fix}.")
    return path


def _skipped_total(opt_state: Any) -> int | None:
    """The optim guard's skip counter, or ``None`` when there is no guard."""
    try:
        from stablejax import optim
    except ImportError:
        return None
    metrics = getattr(optim, "metrics", None)
    if metrics is None:
        return None
    try:
        return int(np.asarray(metrics(opt_state)["skipped_total"]))
    except Exception:  # no guard in this state
        return None


class watch_loop:  # noqa: N801  (used like a function)
    """Runs a train step with ``watch`` flags; on the first bad step, locates and reports.

    Each call ``runner(*args)`` runs ``watch(step)`` jitted, reads its flags
    (a few booleans), and returns ``step``'s outputs. When a flag is ``False``
    or the ``stablejax.optim.guard`` in the optimizer state reports a new skip,
    it calls :func:`locate` on ``step`` with the same arguments, prints the
    report once, saves it as JSON to ``report_path``, and keeps going (or
    raises, with ``stop=True``). ``runner.report`` holds the report.

    The step must not donate its arguments (``donate_argnums``): ``locate``
    re-reads them after the step ran.

    Args:
      step: the train step (jitted or not).
      report_path: where the JSON report goes; ``None`` to skip saving.
      metrics: optional ``out -> {'loss': ..., 'grad_norm': ...}``; the values
        build the history given to ``locate``.
      opt_state: optional ``out -> opt_state``, to watch the guard's skip count.
      stop: raise ``FloatingPointError`` after reporting instead of continuing.
      printer: called with the report text (default ``print``).
      history_size: how many recent steps of ``metrics`` to keep for ``locate``
        (an integer >= 0).

    Raises:
      TypeError: if ``step``, ``metrics``, ``opt_state`` or ``printer`` is not
        callable, or ``history_size`` is not an integer.
      ValueError: if ``history_size`` is negative or ``report_path`` cannot be
        written (a directory, or in a folder that does not exist or is not
        writable).

    Examples:
      >>> import jax.numpy as jnp
      >>> from stablejax.debug import watch_loop
      >>> run = watch_loop(lambda w, x: (w * x, jnp.log(x).sum()), report_path=None,
      ...                  printer=lambda s: print(s.splitlines()[1][:27]))
      >>> _ = run(jnp.ones(2), jnp.array([1.0, 2.0]))
      >>> _ = run(jnp.ones(2), jnp.array([1.0, 0.0]))
      Inf born in log, forward pa
      >>> run.report.primitive, run.bad_steps
      ('log', [1])
    """

    def __init__(
        self,
        step: Callable[..., Any],
        *,
        report_path: str | os.PathLike[str] | None = "nan_report.json",
        metrics: Callable[[Any], Mapping[str, Any]] | None = None,
        opt_state: Callable[[Any], Any] | None = None,
        stop: bool = False,
        printer: Callable[[str], None] = print,
        history_size: int = 100,
    ) -> None:
        if not callable(step):
            raise TypeError(f"watch_loop: `step` must be callable, got {type(step).__name__}.")
        for name, value in (("metrics", metrics), ("opt_state", opt_state), ("printer", printer)):
            if value is not None and not callable(value):
                raise TypeError(
                    f"watch_loop: `{name}` must be callable or None, got "
                    f"{type(value).__name__}: {value!r:.80}."
                )
        history_size = _check_history_size(history_size)
        report_path = _check_report_path(report_path)
        self.step = step
        # watch jits the step itself (and keeps NNX updates); an outer jax.jit would not.
        self._watched = watch(step)
        self.report_path = report_path
        self._metrics = metrics
        self._opt_state = opt_state
        self.stop = stop
        self._print = printer
        self.history: list[dict[str, float]] = []
        self._history_size = history_size
        self.report: Report | None = None
        self.bad_steps: list[int] = []
        self.steps = 0
        self._skipped: int | None = None
        self.first_bad_module: str | None = None
        self.bad_shards: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out, flags = self._watched(*args, **kwargs)
        host = jax.device_get(flags)
        bad = [k for k, ok in host.items() if not bool(ok)]
        if not bad and not all(bool(ok) for ok in getattr(host, "modules", {}).values()):
            bad.append("module flags")
        if self._metrics is not None:
            entry = {k: float(np.asarray(v)) for k, v in self._metrics(out).items()}
            if entry.get("loss") is not None and not math.isfinite(entry["loss"]):
                bad.append("loss")
            keep = max(0, len(self.history) + 1 - self._history_size)
            self.history = (self.history + [entry])[keep:]
        if self._opt_state is not None:
            skipped = _skipped_total(self._opt_state(out))
            if skipped is not None and self._skipped is not None and skipped > self._skipped:
                bad.append("guard skip")
            self._skipped = skipped if skipped is not None else self._skipped
        if bad:
            self.bad_steps.append(self.steps)
            self.first_bad_module = getattr(host, "first_bad_module", None)
            self.bad_shards = nonfinite_shards(out)
            if self.report is None:
                self._locate(args, kwargs, bad)
        self.steps += 1
        return out

    def _locate(self, args: Sequence[Any], kwargs: Mapping[str, Any], bad: list[str]) -> None:
        history = self.history[:-1] or None
        report = locate(self.step, history=history)(*args, **kwargs)
        self.report = report
        if report is None:
            self._print(
                f"stablejax.debug.watch_loop: step {self.steps} flagged {bad} (first bad module: "
                f"{self.first_bad_module}), but locate found no NaN/Inf when re-evaluating it "
                "on the same inputs."
            )
            return
        first = self.first_bad_module
        where = f", first bad module {first}" if first else ""
        self._print(
            f"stablejax.debug.watch_loop: step {self.steps} flagged {bad}{where}.\n{report}"
        )
        if self.report_path is not None:
            with open(self.report_path, "w") as f:
                record = {
                    "step": self.steps,
                    "flags": bad,
                    "first_bad_module": first,
                    "bad_shards": self.bad_shards,
                }
                json.dump({**record, **report.to_dict()}, f, indent=2)
        if self.stop:
            raise FloatingPointError(report.headline)
