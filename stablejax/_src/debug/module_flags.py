"""``watch``'s per-module flags: which top-level module first made a non-finite value.

The step is traced once to a jaxpr and re-bound equation by equation inside
the same ``jit`` (nested ``jit`` bodies inlined), which compiles to the same
program plus one finiteness reduction per *boundary value*: a value made by
one top-level module (a linen scope below the root, ``Net/Block_2``; an NNX
attribute, ``encoder``) or by code outside every module, and read by another
or returned. Forward activations passed between modules, the cotangents
passed back between them, and the gradients handed to the optimizer are
boundaries; residuals a module keeps for its own backward pass are not, so
the extra work is a read of those values and no host callback.

The boundary flags, in the order the program makes them, give the first bad
module: the module (and phase) of the first boundary value that is not
finite. A NaN born inside a module reaches that module's output before any
later module's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.extend import source_info_util

from stablejax._src.debug import nnx_names
from stablejax._src.debug.finite import all_finite
from stablejax._src.debug.source import has_transform, scopes
from stablejax._src.jaxpr_bind import bind_equation

NO_MODULE = "(outside modules)"
_INLINE = ("jit", "pjit")


class Flags(dict):
    """``watch``'s flags: a ``dict`` of output-group flags, plus per-module flags.

    The ``dict`` items are as before: output group -> ``True`` when all its
    leaves are finite. ``modules`` maps ``'<module> (<phase>)'`` (e.g.
    ``'Net/Block_2 (backward)'``) to ``True`` when every value that module
    passed on was finite; :attr:`first_bad_module` names the first one that was
    not. A pytree: it comes out of ``jit`` and through ``jax.device_get``.
    """

    def __init__(
        self,
        outputs: dict[str, Any],
        modules: dict[str, Any] | None = None,
        first: Any = None,
        boundary_names: Sequence[str] = (),
    ) -> None:
        super().__init__(outputs)
        self.modules = dict(modules or {})
        self.first = first
        self.boundary_names = tuple(boundary_names)

    @property
    def first_bad_module(self) -> str | None:
        """``'<module> (<phase>)'`` of the first non-finite boundary value, else ``None``.

        Reading it waits for the step (one integer comes to the host): ask only
        once a flag is ``False``.
        """
        if self.first is None or not self.boundary_names:
            return None
        i = int(jax.device_get(self.first))
        return self.boundary_names[i] if i >= 0 else None

    def __repr__(self) -> str:
        return f"Flags({dict.__repr__(self)}, modules={self.modules!r})"


def _flatten(f: Flags):
    keys, mods = tuple(f.keys()), tuple(f.modules.keys())
    children = (tuple(f.values()), tuple(f.modules.values()), f.first)
    return children, (keys, mods, f.boundary_names)


def _unflatten(aux, children) -> Flags:
    keys, mods, names = aux
    values, mod_values, first = children
    return Flags(dict(zip(keys, values)), dict(zip(mods, mod_values)), first, names)


jax.tree_util.register_pytree_node(Flags, _flatten, _unflatten)


def module_of(name_stack: Any, roots: frozenset[str] | set[str] = frozenset()) -> str:
    """The top-level module of an equation: the linen scope below the root, the NNX
    attribute below the root object (``roots``: the NNX root class names of this
    trace), or the root alone for its own code."""
    names = scopes(name_stack)
    if not names:
        return NO_MODULE
    if len(names) == 1:
        return names[0]
    if names[0] in roots:
        return names[1].split(".")[0]
    return f"{names[0]}/{names[1]}"


def _phase(name_stack: Any) -> str:
    return "backward" if has_transform(name_stack, "transpose") else "forward"


def _inlinable(eqn: Any) -> bool:
    if eqn.primitive.name not in _INLINE:
        return False
    shardings = tuple(eqn.params.get("in_shardings", ())) + tuple(
        eqn.params.get("out_shardings", ())
    )
    return all(type(s).__name__ == "UnspecifiedValue" for s in shardings) and not any(
        eqn.params.get("donated_invars", ())
    )


class _Recorder:
    """Evaluates a jaxpr by re-binding its equations, noting who made each value."""

    def __init__(self, roots: set[str]) -> None:
        self.roots = roots  # the NNX root class names of this trace
        # id(value) -> (order, module, "module (phase)", value)
        self.made: dict[int, tuple[int, str, str, Any]] = {}
        self.boundary: dict[int, tuple[int, str, str, Any]] = {}
        self.to_module: set[int] = set()  # boundary values read by another module
        self.order = 0

    def _read(self, value: Any, module: str | None) -> None:
        rec = self.made.get(id(value))
        if rec is None or rec[1] == module:
            return
        if module != NO_MODULE:
            self.to_module.add(id(value))
        if id(value) not in self.boundary:
            self.boundary[id(value)] = rec

    def eval(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], prefix: Any) -> list:
        env: dict[Any, Any] = {}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, x in zip(jaxpr.constvars, consts):
            env[v] = x
        for v, x in zip(jaxpr.invars, args):
            env[v] = x
        for eqn in jaxpr.eqns:
            stack = prefix + eqn.source_info.name_stack
            invals = [read(v) for v in eqn.invars]
            if _inlinable(eqn):
                closed = eqn.params["jaxpr"]
                outs = self.eval(closed.jaxpr, closed.consts, invals, stack)
            else:
                module = module_of(stack, self.roots)
                group = f"{module} ({_phase(stack)})"
                for x in invals:
                    self._read(x, module)
                with (
                    source_info_util.user_context(eqn.source_info.traceback, name_stack=stack),
                    eqn.ctx.manager,
                ):
                    outs = bind_equation(eqn, invals)
                for x in outs:
                    self.made[id(x)] = (self.order, module, group, x)
                    self.order += 1
            for v, x in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def flags(self, outs: Sequence[Any]) -> tuple[dict[str, jax.Array], jax.Array, tuple[str, ...]]:
        for x in outs:  # a returned value made by a module (its gradients, say)
            self._read(x, NO_MODULE)
        recs = [(k, r) for k, r in self.boundary.items() if _is_float(r[3])]
        # A backward group's gradients (read only by the optimizer or returned) are
        # checked only when the group passes no cotangent on: the cotangents
        # already say where the NaN is, and the gradients are the big values.
        # (The outputs' own flags cover the updated parameters.)
        passes_on = {r[2] for k, r in recs if k in self.to_module}
        recs = sorted(
            (
                r
                for k, r in recs
                if k in self.to_module or not r[2].endswith("(backward)") or r[2] not in passes_on
            ),
            key=lambda r: r[0],
        )
        if not recs:
            return {}, jnp.int32(-1), ()
        per_value = all_finite([r[3] for r in recs])
        names = tuple(r[2] for r in recs)
        modules: dict[str, jax.Array] = {}
        for name, ok in zip(names, per_value):
            modules[name] = jnp.logical_and(modules[name], ok) if name in modules else ok
        stacked = jnp.stack(per_value)
        first = jnp.where(stacked.all(), -1, jnp.argmin(stacked)).astype(jnp.int32)
        return modules, first, names


def _is_float(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex, bool)) or (
        isinstance(x, jax.core.Tracer)
    )


def _has_graph_node(tree: Any) -> bool:
    try:
        from flax.nnx import graph
    except ImportError:  # flax is optional
        return False
    found = []
    jax.tree_util.tree_map(
        lambda x: found.append(graph.is_graph_node(x)), tree, is_leaf=graph.is_graph_node
    )
    return any(found)


class ModuleFlagged:
    """``fn`` jitted with module flags, one compiled program per argument signature."""

    def __init__(self, fn: Callable[..., Any], output_flags: Callable[[Any], dict]) -> None:
        self.fn = fn
        self.output_flags = output_flags
        self._cache: dict[Any, tuple[Callable[..., Any], dict[str, Any]]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, Flags] | None:
        """``(out, flags)``, or ``None`` when the arguments need the plain path
        (NNX objects, whose in-place updates the flat re-binding would lose, or
        unhashable non-array arguments)."""
        nnx_args = _has_graph_node((args, kwargs))
        if nnx_args:
            from flax import nnx

            # Lists, not tuples: nnx.update sets the arrays that are not Variables too.
            graphdef, state = nnx.split([list(args), dict(kwargs)])
            leaves, treedef = jax.tree_util.tree_flatten(state)
        else:
            graphdef = None
            leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        dyn_index = tuple(i for i, x in enumerate(leaves) if _is_dynamic(x))
        dyn = [leaves[i] for i in dyn_index]
        static = tuple(x for i, x in enumerate(leaves) if i not in set(dyn_index))
        sig = tuple((jnp.shape(x), jnp.result_type(x), isinstance(x, (int, float))) for x in dyn)
        key = (graphdef, treedef, static, dyn_index, sig)
        try:
            entry = self._cache.get(key)
        except TypeError:  # an unhashable static argument
            return None
        if entry is None:
            entry = self._build(graphdef, treedef, static, dyn_index)
            try:
                entry[0].trace(*dyn)  # re-binding needs a jaxpr with array outputs
            except Exception:  # noqa: BLE001  (the plain path raises the user's own error)
                entry = (None, {})
            self._cache[key] = entry
        jitted, box = entry
        if jitted is None:
            return None
        out, outputs, modules, first = jitted(*dyn)
        if nnx_args:
            # The step's in-place updates of the NNX objects, made on copies under jit.
            out, new_state = out
            nnx.update([list(args), dict(kwargs)], new_state)
        return out, Flags(outputs, modules, first, box["names"])

    def _build(
        self, graphdef: Any, treedef: Any, static: tuple[Any, ...], dyn_index: tuple[int, ...]
    ):
        n = treedef.num_leaves
        fn, output_flags = self.fn, self.output_flags
        box: dict[str, Any] = {"names": ()}

        def call(*dyn: Any) -> Any:
            by_index = dict(zip(dyn_index, dyn))
            it = iter(static)
            leaves = [by_index[i] if i in by_index else next(it) for i in range(n)]
            tree = jax.tree_util.tree_unflatten(treedef, leaves)
            if graphdef is None:
                args, kwargs = tree
                return fn(*args, **kwargs)
            from flax import nnx

            merged = nnx.merge(graphdef, tree)
            out = fn(*merged[0], **merged[1])
            return out, nnx.state(merged)

        def flat(*dyn: Any) -> Any:
            roots: set[str] = set()
            with nnx_names.nnx_module_names(), nnx_names.collect_roots(roots):
                closed, shape = jax.make_jaxpr(call, return_shape=True)(*dyn)
            rec = _Recorder(roots)
            stack = source_info_util.new_name_stack()
            out_leaves = rec.eval(closed.jaxpr, closed.consts, dyn, stack)
            modules, first, names = rec.flags(out_leaves)
            box["names"] = names
            out = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), out_leaves)
            if graphdef is None:
                return out, output_flags(out), modules, first
            # NNX: the objects' in-place updates are outputs too.
            flags = output_flags(out[0])
            for k, v in output_flags(out[1]).items():
                flags[f"updated {k}"] = v
            return out, flags, modules, first

        return jax.jit(flat), box
