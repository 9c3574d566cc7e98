"""Module paths for Flax NNX: a ``jax.named_scope`` per submodule call.

Flax linen runs every module method under ``jax.named_scope`` of its path, so
each jaxpr equation knows its module. NNX stamps nothing. While
:func:`nnx_module_names` is active, every NNX ``Module.__call__`` runs under a
``jax.named_scope`` named after the module's attribute path in the graph of the
outermost module being called (``encoder.blocks.2.norm``), and the outermost
module under its class name. :func:`stablejax.debug.locate` turns it on for
its own tracing, so it needs nothing from the user; for other tools (profiler
traces, ``jax.make_jaxpr``) wrap the tracing in ``with nnx_module_names():``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Iterator
from typing import Any

import jax

_PATHS: contextvars.ContextVar[dict[int, str] | None] = contextvars.ContextVar(
    "stablejax_nnx_paths", default=None
)
_LOCK = threading.RLock()
_DEPTH = 0
_SAVED: dict[type, Any] = {}
# The class names used as the root scope while tracing, dropped in module paths.
# Each ``locate`` collects its own (no process-wide set: a linen model named like
# an NNX class located before keeps its root).
_ROOTS: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar(
    "stablejax_nnx_roots", default=None
)


@contextlib.contextmanager
def collect_roots(roots: set[str]) -> Iterator[None]:
    """Adds to ``roots`` the NNX root class names used by tracing inside the block."""
    token = _ROOTS.set(roots)
    try:
        yield
    finally:
        _ROOTS.reset(token)


def _module_paths(root: Any) -> dict[int, str]:
    from flax import nnx

    out: dict[int, str] = {}
    for path, node in nnx.iter_graph(root):
        if isinstance(node, nnx.Module) and id(node) not in out:
            out[id(node)] = ".".join(str(p) for p in path)
    return out


def _wrap(call: Any) -> Any:
    @functools.wraps(call)
    def scoped_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        paths = _PATHS.get()
        if paths is None:
            name = type(self).__name__
            roots = _ROOTS.get()
            if roots is not None:
                roots.add(name)
            token = _PATHS.set(_module_paths(self))
            try:
                with jax.named_scope(name):
                    return call(self, *args, **kwargs)
            finally:
                _PATHS.reset(token)
        path = paths.get(id(self))
        if not path:
            return call(self, *args, **kwargs)
        with jax.named_scope(path):
            return call(self, *args, **kwargs)

    scoped_call.__stablejax_scoped__ = True  # type: ignore[attr-defined]
    return scoped_call


def _all_subclasses(cls: type) -> Iterator[type]:
    seen: set[type] = set()
    stack = [cls]
    while stack:
        c = stack.pop()
        for sub in c.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
                yield sub


@contextlib.contextmanager
def nnx_module_names() -> Iterator[None]:
    """Names NNX submodule calls with ``jax.named_scope`` of their attribute path.

    While active, equations traced inside an NNX module's ``__call__`` carry a
    name stack such as ``Model/encoder.blocks.2.norm``, which
    :func:`stablejax.debug.locate` reports as module ``encoder.blocks.2.norm``.
    Every class patched on entry is restored on exit, also on error; nested
    uses are fine. Only tracing that happens inside the block is affected: a
    function jitted and traced before keeps its cached, unnamed trace.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from stablejax.debug import nnx_module_names
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.head = nnx.Linear(2, 1, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.head(x)
      >>> net = Net(nnx.Rngs(0))
      >>> with nnx_module_names():
      ...     jaxpr = jax.make_jaxpr(lambda x: net(x))(jnp.ones(2))
      >>> str(jaxpr.jaxpr.eqns[0].source_info.name_stack)
      'Net/head'
    """
    global _DEPTH
    try:
        from flax import nnx
    except ImportError:  # no flax: nothing to name
        yield
        return
    with _LOCK:
        if _DEPTH == 0:
            for cls in [nnx.Module, *_all_subclasses(nnx.Module)]:
                call = cls.__dict__.get("__call__")
                if call is not None and not getattr(call, "__stablejax_scoped__", False):
                    _SAVED[cls] = call
                    cls.__call__ = _wrap(call)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                for cls, call in _SAVED.items():
                    cls.__call__ = call
                _SAVED.clear()
