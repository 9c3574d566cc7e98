"""A context that makes jax trace a function afresh, shared by ``lint`` and ``locate``."""

from __future__ import annotations

import jax

# Part of jax's tracing-cache key: tracing under a value of our own makes
# `jax.jit`/`nnx.jit` functions that already ran re-trace, so NNX module names
# are stamped even on steps compiled before the tool was called.
_CONTEXT = jax.make_user_context(None)


def fresh_trace(tool: str):
    """A context manager under which jit-compiled functions re-trace.

    Args:
      tool: the caller's name (``"stablejax.debug.lint"``), the context's value:
        each tool gets its own entries in jax's cache.

    Returns:
      The context manager.
    """
    return _CONTEXT(tool)
