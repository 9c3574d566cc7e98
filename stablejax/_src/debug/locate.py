"""``locate``: find the first NaN/Inf of a function's run, explain it, suggest the fix."""

from __future__ import annotations

import inspect
import linecache
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from stablejax._src.debug import compiled, nnx_names, search, shards
from stablejax._src.debug.diagnose import diagnose
from stablejax._src.debug.fresh_trace import fresh_trace
from stablejax._src.debug.history import History, parse_history
from stablejax._src.debug.interpreter import CALL_PARAMS, INTENTIONAL, Walker
from stablejax._src.debug.report import Report
from stablejax._src.debug.source import Frame, is_user_file, module_path, scopes
from stablejax._src.debug.values import Origin, is_float, nonfinite_kind


class LocateTraceError(TypeError):
    """``locate`` could not trace the function on the given arguments."""


def locate(
    fn: Callable[..., Any],
    *,
    history: Sequence[Any] | None = None,
    run_callbacks: bool = False,
) -> Callable[..., Report | None]:
    """Finds where the first NaN or Inf of ``fn``'s run is born, says why, suggests a fix.

    ``locate(fn)(*args, **kwargs)`` traces ``fn`` to a jaxpr (``jax.make_jaxpr``)
    and evaluates it equation by equation on the given values, descending into
    ``jit``, ``custom_jvp``/``custom_vjp`` (their rules too), ``remat``,
    ``scan`` (reporting the iteration), ``while_loop`` and the taken branch of
    ``cond``/``switch``. It never re-runs ``fn`` itself, never changes its
    arguments and never touches global jax configuration.

    The origin is the first equation, in execution order, whose output holds a
    NaN or an Inf while its inputs are finite, among those whose values reach a
    non-finite output (or the first of all when a mask hid every one). Unlike
    ``jax_debug_nans``, this works for values masked before the output, inside
    ``scan`` bodies, for Inf born before it turns into NaN, and names the module
    and the user's line for backward-pass values, even inside ``jnp.std``.

    Args:
      fn: anything callable on arrays: a loss, ``jax.grad(loss)``, a jitted train
        step, an NNX function taking a module.
      history: optional recent steps, one entry per step: losses, or dicts with
        ``'loss'`` and/or ``'grad_norm'``. Used to recognise growth and to derive
        the clipping value of a ``grad_explosion`` suggestion.
      run_callbacks: whether to run ``fn``'s ``io_callback`` equations again
        (default ``False``: they may write files or count steps; zeros of the
        right shape stand in for their outputs and ``Report.callbacks_skipped``
        says how many were not re-evaluated).

    Returns:
      A function taking ``fn``'s arguments and returning a :class:`Report`, or
      ``None`` when every value stays finite.

    Raises:
      TypeError: if ``fn`` is not callable or ``history`` is malformed; the
        returned function raises ``LocateTraceError`` (a ``TypeError``) if ``fn``
        does not trace on the arguments.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from stablejax.debug import locate
      >>> def pool(x):
      ...     return jnp.sum(jnp.sqrt(x))
      >>> report = locate(jax.grad(pool))(jnp.array([0.0, 1.0]))
      >>> report.primitive, report.kind, report.phase, report.category
      ('div', 'inf', 'backward', 'derivative_singularity')
      >>> locate(pool)(jnp.array([1.0])) is None
      True
    """
    if not callable(fn):
        raise TypeError(
            "locate: `fn` must be callable (a loss, jax.grad(loss), a jitted train step, ...); "
            f"got {type(fn).__name__}: {_short(fn)}."
        )
    hist = parse_history(history)
    if not isinstance(run_callbacks, (bool, np.bool_)):
        raise TypeError(
            f"locate: `run_callbacks` must be True or False; got {_short(run_callbacks)}."
        )
    run_cb = bool(run_callbacks)

    def located(*args: Any, **kwargs: Any) -> Report | None:
        return _locate(fn, hist, args, kwargs, run_cb)

    located.__name__ = f"locate({getattr(fn, '__name__', type(fn).__name__)})"
    located.__doc__ = f"Runs locate on {_short(fn)}; returns a Report or None."
    return located


def _short(x: Any, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def _arg_names(fn: Callable[..., Any], nargs: int) -> list[str]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return [f"args[{i}]" for i in range(nargs)]
    names = []
    for i in range(nargs):
        if i < len(params) and params[i].kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            names.append(params[i].name)
        else:
            names.append(f"args[{i}]")
    return names


def _path_name(path: tuple[Any, ...], arg_names: list[str]) -> str:
    head, rest = path[0], path[1:]
    if getattr(head, "idx", None) == 0 and rest:  # positional args
        idx = rest[0].idx
        name = arg_names[idx] if idx < len(arg_names) else f"args[{idx}]"
        rest = rest[1:]
    elif rest:  # keyword args
        name = str(getattr(rest[0], "key", rest[0]))
        rest = rest[1:]
    else:
        name = "args"
    return name + jax.tree_util.keystr(tuple(rest))


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _bad_rows(x: Any, bad: np.ndarray | None = None) -> list[int]:
    arr = np.asarray(x)
    if bad is None:
        host = arr.astype(np.float32) if arr.dtype.kind == "V" or arr.dtype.itemsize < 4 else arr
        bad = ~np.isfinite(host)
    if bad.ndim == 0:
        return [0] if bool(bad) else []
    return [int(i) for i in np.nonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0]]


def _locate(
    fn: Callable[..., Any], hist: History | None, args: tuple, kwargs: dict, run_cb: bool
) -> Report | None:
    with_path, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs))
    names = _arg_names(fn, len(args))
    paths = [_path_name(p, names) for p, _ in with_path]
    leaves = [leaf for _, leaf in with_path]
    dyn = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, float) and not np.isfinite(leaf):
            return Report(
                primitive=None,
                kind="nan" if np.isnan(leaf) else "inf",
                phase="forward",
                category="bad_input",
                why=f"the Python float argument {paths[i]} is {leaf}",
                suggestion=f"pass a finite value for {paths[i]} (check the config or schedule)",
                input_path=paths[i],
            )

    def flat_fn(*dyn_vals: Any) -> Any:
        full = list(leaves)
        for i, v in zip(dyn, dyn_vals):
            full[i] = v
        a, k = jax.tree_util.tree_unflatten(treedef, full)
        out = fn(*a, **k)
        # In-place updates are outputs too: an NNX step's `optimizer.update(model,
        # grads)` writes new values into the (copied) model and optimizer.
        given = {id(v) for v in dyn_vals}
        updated = [
            x
            for x in jax.tree_util.tree_leaves((a, k))
            if isinstance(x, jax.Array) and id(x) not in given
        ]
        return out, updated

    roots: set[str] = set()
    try:
        with (
            nnx_names.nnx_module_names(),
            nnx_names.collect_roots(roots),
            fresh_trace("stablejax.debug.locate")  # NNX names stamped on compiled steps,
        ):
            closed = jax.make_jaxpr(flat_fn)(*[leaves[i] for i in dyn])
    except Exception as e:
        shapes = ", ".join(
            f"{paths[i]}: {getattr(leaves[i], 'dtype', type(leaves[i]).__name__)}"
            f"{list(np.shape(leaves[i]))}"
            for i in dyn[:6]
        )
        raise LocateTraceError(
            f"locate: could not trace {_short(fn)} on the given arguments ({shapes}"
            f"{', ...' if len(dyn) > 6 else ''}): {type(e).__name__}: {e}"
        ) from e

    walker = Walker(run_callbacks=run_cb)
    taints: list[int | None] = []
    origin_leaf: dict[int, int] = {}
    for j, i in enumerate(dyn):
        leaf = leaves[i]
        if is_float(leaf) and nonfinite_kind(leaf):
            if _only_neg_inf(leaf):  # an attention-style mask passed in: intentional
                taints.append(INTENTIONAL)
                continue
            t = walker.new_input_origin(j, leaf)
            origin_leaf[t] = i
            taints.append(t)
        else:
            taints.append(None)
    flat_args = [leaves[i] for i in dyn]
    found = search.search(closed, flat_args, taints, walker, Walker.root_site(), CALL_PARAMS)
    if found is None:
        return None
    if found == search.FALLBACK:  # the compiled flags cannot decide: walk it all
        walker = Walker(run_callbacks=run_cb)
        taints = [
            walker.new_input_origin(j, leaves[i]) if t is not None and t >= 0 else t
            for j, (i, t) in enumerate(zip(dyn, taints))
        ]
        walker.run(closed, flat_args, taints)
        if not walker.origins:
            return None
        reaches = bool(walker.reached)
        origin = walker.origins[walker.reached[0]] if reaches else walker.origins[0]
        scoped = walker.scoped or any(o.scopes for o in walker.origins)
        found = search.Found(origin, reaches, len(walker.origins), scoped, walker)
        if origin.primitive is None and origin.leaf is not None:
            found.consumer = search.first_consumer(
                compiled.flatten(Walker(), closed, CALL_PARAMS, Walker.root_site()), origin.leaf
            )
    return _report(found, leaves, dyn, paths, origin_leaf, hist, roots)


def _only_neg_inf(x: Any) -> bool:
    arr = np.asarray(x)
    arr = arr.astype(np.float32) if arr.dtype.kind == "V" or arr.dtype.itemsize < 4 else arr
    bad = arr[~np.isfinite(arr)]
    return bool(bad.size) and bool(np.all(np.isneginf(bad)))


def _int_input(
    origin: Origin, leaves: list[Any], dyn: list[int], paths: list[str]
) -> tuple[str, list[int], dict[str, Any]] | None:
    """For a gather that filled NaN, the integer argument holding out-of-range indices."""
    info = origin.extra.get("gather")
    if not info or not info["out_of_range"] or not info["sizes"]:
        return None
    best = None
    for i in dyn:
        leaf = np.asarray(leaves[i])
        if leaf.dtype.kind not in "iu" or leaf.size == 0:
            continue
        for size in info["sizes"]:
            bad = (leaf >= size) | (leaf < -size)
            if bad.any():
                score = (int(leaf.max()) == info["max_index"], int(bad.sum()))
                if best is None or score > best[0]:
                    best = (
                        score,
                        paths[i],
                        _bad_rows(leaf, bad),
                        {"size": size, "max": int(leaf.max())},
                    )
    return None if best is None else best[1:]


def _report(
    found: search.Found,
    leaves: list[Any],
    dyn: list[int],
    paths: list[str],
    origin_leaf: dict[int, int],
    hist: History | None,
    roots: set[str],
) -> Report:
    origin, reaches = found.origin, found.reaches
    input_path = rows = int_info = None
    if origin.primitive is None and origin.index in origin_leaf:
        leaf_index = origin_leaf[origin.index]
        input_path, rows = paths[leaf_index], _bad_rows(leaves[leaf_index])
    elif origin.primitive is None:
        s = origin.inputs[0]
        input_path = f"<array captured by the function, {s.dtype}{list(s.shape)}>"
    else:
        bad_int = _int_input(origin, leaves, dyn, paths)
        if bad_int is not None:
            input_path, rows, int_info = bad_int
    frames, scope_names = origin.frames, origin.scopes
    if origin.primitive is None and found.consumer is not None:
        # A bad argument: the user's line and the module that first read it.
        frames, scope_names = found.consumer[0], tuple(scopes(found.consumer[1]))
    user = [f for f in frames if is_user_file(f.file)]
    func = user[0].function if user else None
    line_text = linecache.getline(user[0].file, user[0].line) if user else ""
    module = module_path(scope_names, frozenset(roots))
    scoped = found.scoped or bool(scope_names)
    d = diagnose(
        origin,
        module=module,
        func=func,
        line_text=line_text,
        model_scopes_seen=scoped,
        history=hist,
        input_path=input_path,
        rows=rows,
        int_input=int_info,
    )
    return Report(
        primitive=origin.primitive,
        kind=origin.kind,
        phase=origin.phase,
        category=d.category,
        suggestion=d.suggestion,
        why=d.why,
        input_path=input_path,
        rows=rows,
        module=module,
        source=_source(user[0]) if user else None,
        frames=[str(_rel(f)) for f in user],
        inputs=list(origin.inputs),
        iteration=origin.iterations[0] if origin.iterations else None,
        iterations=list(origin.iterations),
        op=origin.forward_op or origin.primitive,
        name_stack=origin.name_stack,
        reaches_output=reaches,
        origins=found.origins,
        callbacks_skipped=found.walker.skipped_callbacks,
        **shards.report_fields(origin),
    )


def _rel(frame: Frame) -> Frame:
    try:
        rel = os.path.relpath(frame.file)
    except ValueError:
        return frame
    return frame._replace(file=frame.file if rel.startswith("..") else rel)


def _source(frame: Frame) -> str:
    f = _rel(frame)
    return f"{f.file}:{f.line}"
