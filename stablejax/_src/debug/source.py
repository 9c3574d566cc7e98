"""Where an equation came from: the user's frame, the module path, the forward op.

A jaxpr equation carries ``source_info``: a ``traceback`` captured when it was
traced and a ``name_stack``. Both are relative to the equation that calls the
jaxpr holding it (a ``jit`` inside ``jnp.std`` is traced once and cached, so
its equations know only jax's own frames), so the walker composes them along
the call chain. This file turns the composed chain into what a user reads.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

# Files of these packages are never "the user's code": the innermost frame
# outside them is the line the user wrote.
_LIBRARY_PARTS = (
    f"{os.sep}jax{os.sep}",
    f"{os.sep}jaxlib{os.sep}",
    f"{os.sep}flax{os.sep}",
    f"{os.sep}optax{os.sep}",
    f"{os.sep}chex{os.sep}",
    f"{os.sep}stablejax{os.sep}_src{os.sep}",
    f"{os.sep}stablejax{os.sep}debug.py",
    f"{os.sep}contextlib.py",
    f"{os.sep}functools.py",
    f"{os.sep}threading.py",
    f"{os.sep}runpy.py",
    f"{os.sep}_pytest{os.sep}",
    f"{os.sep}pluggy{os.sep}",
)
_OPTIMIZER_PARTS = (
    f"{os.sep}optax{os.sep}",
    f"{os.sep}stablejax{os.sep}_src{os.sep}optim{os.sep}",
)
# The demo's model zoo lives inside the package but plays the user: its lines are
# what the demo's reports point at, as a user's own model file would be.
_USER_FILES = (f"{os.sep}stablejax{os.sep}_src{os.sep}demo{os.sep}zoo.py",)
# Scopes jax itself opens (``jax.checkpoint``); they are not modules.
_JAX_SCOPES = frozenset({"rematted_computation", "checkpoint", "remat"})
_WRAPPER_RE = re.compile(r"^(?:[A-Za-z_]+\()+(.*?)\)*$")


class Frame(NamedTuple):
    """One Python frame of a traced operation."""

    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.function})"


@functools.lru_cache(maxsize=8192)
def is_user_file(file_name: str) -> bool:
    """Whether ``file_name`` is user code: not jax, flax, optax, chex, stablejax or stdlib glue.

    The demo's model zoo (``stablejax/_src/demo/zoo.py``) counts as user code.
    """
    if file_name.startswith("<frozen") or file_name.startswith("<string>"):
        return False
    if file_name.endswith(_USER_FILES):
        return True
    return not any(part in file_name for part in _LIBRARY_PARTS)


@functools.lru_cache(maxsize=8192)
def is_optimizer_file(file_name: str) -> bool:
    """Whether ``file_name`` belongs to an optimizer library (optax, stablejax.optim)."""
    return any(part in file_name for part in _OPTIMIZER_PARTS)


def traceback_frames(traceback: Any) -> tuple[Frame, ...]:
    """Frames of a jax ``Traceback``, innermost first; empty for ``None``."""
    if traceback is None:
        return ()
    return tuple(Frame(f.file_name, f.line_num, f.function_name) for f in traceback.frames)


def innermost_user_frame(frames: Iterable[Frame]) -> Frame | None:
    """The first frame (innermost first order) that lies in the user's code."""
    for frame in frames:
        if is_user_file(frame.file):
            return frame
    return None


def scopes(name_stack: Any) -> list[str]:
    """Scope names of a jax ``NameStack`` with transforms (``jvp``, ``transpose``) dropped.

    Flax linen stamps each module's path as nested scopes, so the backward
    name stack ``transpose(jvp(Net))/Block_0`` yields ``['Net', 'Block_0']``.
    Stacks rendered as strings are unwrapped the same way.
    """
    stack = getattr(name_stack, "stack", None)
    if stack is None:
        out = []
        for part in str(name_stack).split("/"):
            match = _WRAPPER_RE.match(part)
            name = match.group(1) if match else part
            if name and name not in _JAX_SCOPES:
                out.append(name)
        return out
    return [
        elem.name
        for elem in stack
        if type(elem).__name__ == "Scope" and elem.name and elem.name not in _JAX_SCOPES
    ]


def has_transform(name_stack: Any, transform: str) -> bool:
    """Whether ``name_stack`` holds the transform ``transform`` (e.g. ``'transpose'``)."""
    stack = getattr(name_stack, "stack", None)
    if stack is None:
        return f"{transform}(" in str(name_stack)
    return any(type(e).__name__ == "Transform" and e.name == transform for e in stack)


def module_path(scope_names: Sequence[str], nnx_roots: frozenset[str] = frozenset()) -> str | None:
    """The module path a user recognises, from the scope names of an equation.

    Linen scopes join with ``/`` (``Net/Block_0``). NNX scopes written by
    :func:`stablejax.debug.nnx_module_names` are absolute attribute paths
    (``encoder``, ``encoder.blocks.2``): a scope extending the previous one with
    ``.`` replaces it, and the root class name is dropped below the root, so the
    result is ``encoder.blocks.2.norm``.
    """
    out: list[str] = []
    for name in scope_names:
        if out and name == out[-1]:
            continue
        if out and name.startswith(out[-1] + "."):
            out[-1] = name
        else:
            out.append(name)
    if len(out) > 1 and out[0] in nnx_roots:
        out = out[1:]
    return "/".join(out) if out else None
