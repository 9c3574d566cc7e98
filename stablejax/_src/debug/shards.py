"""``locate`` inside ``shard_map`` and ``pmap`` bodies: the shard where a NaN is born.

A ``shard_map`` equation (``pmap`` traces to one too) is not an opaque op for
the walker. Its operands are cut into the per-shard blocks its ``in_specs``
say, stacked along leading axes, one per manual mesh axis (in mesh order), and
the body is walked equation by equation on the stacked values. Each equation
is bound under nested ``jax.vmap(..., axis_name=axis)``: jax's own semantics
of a mapped axis, so ``psum``, ``pmean``, ``all_gather``, ``ppermute``,
``all_to_all``, ``psum_scatter`` and ``axis_index`` compute what the devices
compute, and a NaN born on shard 3 and spread by a ``psum`` is an origin in
the body's equation on shard 3, not at the ``psum``. The outputs are put back
together as the ``out_specs`` say. An origin inside a body records the mesh
axes, the axis indices of the first shard where it was born, that shard's
device and process, and how many shards hold it.

Inside a body the taints are per shard (a tuple, one entry per stacked
shard): an equation whose output is non-finite on a shard where its operands
are finite is an origin there, whatever other shards held; a collective reads
every shard. Several processes: :mod:`processes`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from stablejax._src.debug.values import nonfinite_kind

MAPPED = frozenset({"shard_map"})
# Primitives whose value depends on other shards: a multi-process walk runs them over
# the whole mesh.
COLLECTIVES = frozenset(
    {
        "psum",
        "pmean",
        "pmax",
        "pmin",
        "psum_invariant",
        "all_gather",
        "all_gather_invariant",
        "ppermute",
        "all_to_all",
        "psum_scatter",
        "reduce_scatter",
        "axis_index",
        "pbroadcast",
    }
)
# Casts of the varying-across-mesh type only (``check_vma``): the identity per shard.
_TYPE_CASTS = frozenset({"pvary", "reduced_vary_cast_p", "vary_unreduced_cast"})
INTENTIONAL = -1  # interpreter.INTENTIONAL: the taint of a -inf mask written in the program


@dataclasses.dataclass
class Mapped:
    """The mesh a body runs on, and which shards the stacked values hold.

    ``axes`` are the manual mesh axes (name, size), in mesh order; the stacked
    values have one leading axis per entry (a single unnamed one, the local
    shards, in a multi-process walk). ``coords[k]`` is the mesh position of the
    ``k``-th stacked shard (row-major).
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    axes: tuple[tuple[str | None, int], ...]
    coords: list[tuple[int, ...]]
    devices: np.ndarray | None  # device per mesh position (manual axes), or None
    local: bool = False  # a multi-process walk of this process's shards
    mesh: Any = None
    trail: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    born: np.ndarray | None = None  # the shards where the origin being made was born

    @property
    def depth(self) -> int:
        return len(self.axes)

    def bind(self, eqn: Any, invals: list[Any], site: Any, bind_fn: Any) -> list[Any]:
        """Binds ``eqn`` once per shard, collectives over the mapped axes (``jax.vmap``)."""
        self.trail.append((eqn, site))
        if self.local and eqn.primitive.name in COLLECTIVES:
            from stablejax._src.debug import processes

            return processes.across_processes(self, eqn, invals)
        if eqn.primitive.name in _TYPE_CASTS:
            return list(invals)
        k = self.depth
        in_axes = [
            0 if not isinstance(v, jcore.Literal) and np.ndim(x) == v.aval.ndim + k else None
            for v, x in zip(eqn.invars, invals)
        ]
        if not any(a == 0 for a in in_axes) and eqn.primitive.name not in COLLECTIVES:
            # Nothing per shard: one value for all.
            return [self.broadcast(o) for o in bind_fn(invals)]

        def f(*vals):
            return bind_fn(list(vals))

        for name, size in reversed(self.axes):
            f = jax.vmap(f, in_axes=tuple(in_axes), axis_name=name, axis_size=size)
        return list(f(*invals))

    def broadcast(self, x: Any) -> Any:
        x = jnp.asarray(x)
        return jnp.broadcast_to(x, tuple(s for _, s in self.axes) + x.shape)

    def shard(self, x: Any, aval: Any, k: int) -> Any:
        """The ``k``-th shard's value of a stacked ``x`` (``x`` itself when not stacked)."""
        if np.ndim(x) != len(aval.shape) + self.depth:
            return x
        return jnp.reshape(jnp.asarray(x), (-1, *aval.shape))[k]

    def bad_mask(self, x: Any, aval: Any) -> np.ndarray | None:
        """Per stacked shard, whether ``x`` holds a NaN/Inf there (``None``: not per shard)."""
        if np.ndim(x) != len(aval.shape) + self.depth:
            return None
        arr = np.asarray(jnp.reshape(jnp.asarray(x), (len(self.coords), -1)))
        if arr.dtype.kind == "V" or (arr.dtype.kind == "f" and arr.dtype.itemsize < 4):
            arr = arr.astype(np.float32)
        if arr.dtype.kind not in "fc":
            return np.zeros(len(self.coords), bool)
        return ~np.isfinite(arr).all(axis=1)

    def select(self, eqn: Any, invals: list[Any], outs: list[Any]) -> tuple[dict, list, list]:
        """The first shard where ``eqn`` made a non-finite value, and its operands there."""
        bad = self.born
        if bad is None:
            bad = np.zeros(len(self.coords), bool)
            for v, o in zip(eqn.outvars, outs):
                m = self.bad_mask(o, v.aval)
                if m is not None:
                    bad |= m
        k = int(np.argmax(bad)) if bad.any() else 0
        info = self.describe(k)
        info["affected"] = int(bad.sum())
        info["step"] = len(self.trail) - 1
        ins = [self.shard(x, v.aval, k) for v, x in zip(eqn.invars, invals)]
        outs_k = [self.shard(x, v.aval, k) for v, x in zip(eqn.outvars, outs)]
        return info, ins, outs_k

    def describe(self, k: int) -> dict[str, Any]:
        """Mesh axes, axis indices, device and process of the ``k``-th stacked shard."""
        coord = self.coords[k]
        device = process = None
        if self.devices is not None:
            d = self.devices[coord]
            device, process = int(d.id), int(getattr(d, "process_index", 0))
        return {
            "axes": list(self.names),
            "index": dict(zip(self.names, (int(c) for c in coord))),
            "device": device,
            "process": process,
            "shards": int(np.prod(self.sizes, dtype=int)),
            "local": True,
        }


def _per_shard(t: Any, n: int) -> tuple:
    return t if isinstance(t, tuple) else (t,) * n


def collapse(t: Any) -> int | None:
    """One taint for a whole value: the earliest real origin on any shard."""
    if not isinstance(t, tuple):
        return t
    seen = [x for x in t if x is not None]
    real = [x for x in seen if x != INTENTIONAL]
    return min(real) if real else (INTENTIONAL if seen else None)


def merge(a: Any, b: Any, n: int) -> Any:
    """Per shard, the earlier of two taints (a real origin before a mask)."""
    if a is None:
        return b
    if b is None:
        return a
    out = []
    for x, y in zip(_per_shard(a, n), _per_shard(b, n)):
        both = [t for t in (x, y) if t is not None]
        real = [t for t in both if t != INTENTIONAL]
        out.append(min(real) if real else (INTENTIONAL if both else None))
    return tuple(out)


def input_taints(mapped: Mapped, vals: list[Any], avals: list[Any], taints: list[Any]) -> list:
    """A body's operand taints, kept only on the shards where the operand is non-finite."""
    out = []
    for x, aval, t in zip(vals, avals, taints):
        m = mapped.bad_mask(x, aval) if t is not None else None
        out.append(t if m is None else (tuple(t if b else None for b in m) if m.any() else None))
    return out


def leaf_taints(walker, eqn, invals, in_taints, outs, kinds, site, phase) -> list:
    """The walker's taint rule, shard by shard (a collective reads every shard)."""
    mapped: Mapped = walker.mapped
    n = len(mapped.coords)
    out_bad = [
        (mapped.bad_mask(o, v.aval) if k else None) for v, o, k in zip(eqn.outvars, outs, kinds)
    ]
    out_bad = [
        np.zeros(n, bool) if k is None else (np.ones(n, bool) if m is None else m)
        for m, k in zip(out_bad, kinds)
    ]
    any_bad = np.any(out_bad, axis=0)
    ins = [_per_shard(t, n) for t in in_taints]
    made_nan = "nan" in kinds and not any(
        t == INTENTIONAL and nonfinite_kind(val) == "nan" for t, val in zip(in_taints, invals)
    )
    across = eqn.primitive.name in COLLECTIVES or any(
        hasattr(p, "eqns") or hasattr(p, "jaxpr") for p in eqn.params.values()
    )
    per = []
    for sh in range(n):
        cols = [t for ti in ins for t in (ti if across else (ti[sh],)) if t is not None]
        real = [t for t in cols if t != INTENTIONAL]
        if not any_bad[sh]:
            per.append(None)
        elif real:
            per.append(min(real))
        elif INTENTIONAL in cols and not made_nan:
            per.append(INTENTIONAL)
        else:
            per.append("new")
    born = np.array([t == "new" for t in per])
    if born.any():
        mapped.born = born
        try:
            new = walker._new_origin(eqn, invals, outs, kinds, site, phase)
        finally:
            mapped.born = None
        per = [new if t == "new" else t for t in per]
    taints = []
    for m in out_bad:
        t = tuple(per[sh] if m[sh] else None for sh in range(n))
        taints.append(None if all(x is None for x in t) else t)
    return taints


def dim_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def spec_axes(spec: Any, ndim: int) -> list[tuple[str, ...]]:
    entries = tuple(spec) if spec is not None else ()
    return [dim_axes(entries[d]) if d < len(entries) else () for d in range(ndim)]


def to_stacked(x: Any, spec: Any, names: tuple[str, ...], sizes: dict[str, int]) -> Any:
    """A global operand as its per-shard blocks, stacked on one leading axis per mesh axis."""
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
        # On one device, unsharded: the stacked axes stand for the mesh (and an
        # `Explicit` mesh's sharding must not follow the values into the walk).
        x = np.asarray(x)
    x = jnp.asarray(x)
    dims = spec_axes(spec, x.ndim)
    shape: list[int] = []
    pos: dict[str, int] = {}
    block: list[int] = []
    for d, axes in enumerate(dims):
        for a in axes:
            pos[a] = len(shape)
            shape.append(sizes[a])
        block.append(len(shape))
        shape.append(x.shape[d] // int(np.prod([sizes[a] for a in axes], dtype=int)))
    y = jnp.reshape(x, shape)
    present = [a for a in names if a in pos]
    y = jnp.transpose(y, [pos[a] for a in present] + block)
    for i, a in enumerate(names):
        if a not in pos:
            y = jnp.expand_dims(y, i)
    return jnp.broadcast_to(y, tuple(sizes[a] for a in names) + y.shape[len(names) :])


def from_stacked(y: Any, spec: Any, names: tuple[str, ...], aval: Any) -> Any:
    """The inverse of :func:`to_stacked`: the global value ``out_specs`` assembles."""
    y = jnp.asarray(y)
    dims = spec_axes(spec, len(aval.shape))
    used = {a for axes in dims for a in axes}
    kept = [a for a in names if a in used]
    y = y[tuple(slice(None) if a in used else 0 for a in names)]
    n = len(kept)
    perm: list[int] = []
    for d, axes in enumerate(dims):
        perm.extend(kept.index(a) for a in axes)
        perm.append(n + d)
    return jnp.reshape(jnp.transpose(y, perm), aval.shape)


def _placed(x: Any, mesh: Any, aval: Any) -> Any:
    """On an ``Explicit`` mesh, the output placed as its type says (later ops check it)."""
    spec = getattr(getattr(aval, "sharding", None), "spec", None)
    explicit = any("Explicit" in str(t) for t in getattr(mesh, "axis_types", ()))
    mesh = _concrete(mesh) if explicit and spec is not None else None
    if mesh is None:
        return x
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))


def _mesh_context(eqn: Any, walker: Any) -> tuple[Any, tuple[str, ...], dict[str, int]] | None:
    p = eqn.params
    mesh = p.get("mesh")
    if mesh is None or "jaxpr" not in p or getattr(walker, "mapped", None) is not None:
        return None  # a body inside a body: one opaque op
    manual = p.get("newly_manual_axes") or p.get("manual_axes") or frozenset(mesh.axis_names)
    names = tuple(a for a in mesh.axis_names if a in manual)
    if any(a not in manual and int(mesh.shape[a]) > 1 for a in mesh.axis_names):
        return None  # auto axes besides the manual ones (`axis_names=`): one opaque op
    return mesh, names, {a: int(mesh.shape[a]) for a in names}


def _concrete(mesh: Any) -> Any:
    """The ``jax.sharding.Mesh`` of ``mesh`` (for an abstract one, that of ``jax.set_mesh``)."""
    try:
        np.asarray(mesh.devices)
        return mesh
    except Exception:
        pass
    try:
        ctx = jax.sharding.get_mesh()
        np.asarray(ctx.devices)
    except Exception:
        return None
    same = tuple(ctx.axis_names) == tuple(mesh.axis_names) and all(
        ctx.shape[a] == mesh.shape[a] for a in mesh.axis_names
    )
    return ctx if same else None


def _devices(mesh: Any, names: tuple[str, ...]) -> np.ndarray | None:
    """The device at each position of the manual axes (the first along any auto axis)."""
    mesh = _concrete(mesh)
    if mesh is None:
        return None
    devs = np.asarray(mesh.devices)
    idx = tuple(slice(None) if a in names else 0 for a in mesh.axis_names)
    return devs[idx]


def _addressable(x: Any) -> bool:
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def walk_mapped(walker: Any, eqn: Any, invals, in_taints, site, out_flags, in_grad):
    """Walks a ``shard_map`` body per shard; ``None`` when it must stay one opaque op."""
    ctx = _mesh_context(eqn, walker)
    if ctx is None:
        return None
    mesh, names, sizes = ctx
    p = eqn.params
    body = p["jaxpr"]
    body, consts = (body.jaxpr, body.consts) if hasattr(body, "consts") else (body, ())
    if len(body.invars) != len(invals) or body.constvars and len(consts) != len(body.constvars):
        return None
    devices = _devices(mesh, names)
    if all(_addressable(x) for x in invals):
        mapped = Mapped(
            names,
            tuple(sizes[a] for a in names),
            tuple((a, sizes[a]) for a in names),
            [tuple(int(i) for i in c) for c in np.ndindex(*(sizes[a] for a in names))],
            devices,
        )
        with _no_mesh():  # a `jax.set_mesh` around locate would shard the stacked values
            stacked = [to_stacked(x, s, names, sizes) for x, s in zip(invals, p["in_specs"])]
            body_taints = input_taints(mapped, stacked, [v.aval for v in body.invars], in_taints)
            outs, taints = walk_body(
                walker, mapped, body, consts, stacked, body_taints, site, out_flags, in_grad
            )
            glob = [
                from_stacked(o, s, names, v.aval)
                for o, s, v in zip(outs, p["out_specs"], eqn.outvars)
            ]
        glob = [_placed(g, mesh, v.aval) for g, v in zip(glob, eqn.outvars)]
        return glob, [collapse(t) for t in taints]
    from stablejax._src.debug import processes

    return processes.walk_processes(
        walker,
        eqn,
        mesh,
        names,
        sizes,
        devices,
        body,
        consts,
        invals,
        in_taints,
        site,
        out_flags,
        in_grad,
    )


def _no_mesh() -> Any:
    return jax.set_mesh(None)


def walk_body(walker, mapped, body, consts, stacked, in_taints, site, out_flags, in_grad):
    walker.mapped = mapped
    try:
        # No mesh context in the walk: the stacked axes stand for the mesh, the
        # values live on one device (a `jax.set_mesh` around locate stays outside).
        with _no_mesh():
            outs, taints, _ = walker._eval(
                body, consts, stacked, list(in_taints), [in_grad] * len(stacked), site, out_flags
            )
    finally:
        walker.mapped = None
    return outs, taints


def report_fields(origin: Any) -> dict[str, Any]:
    """The ``Report`` fields of an origin born inside a mapped body (none outside)."""
    info = origin.extra.get("shard")
    if not info:
        return {}
    return {
        "mesh_axes": list(info["axes"]),
        "shard_index": dict(info["index"]),
        "shards_affected": int(info["affected"]),
        "num_shards": int(info["shards"]),
        "device": info["device"],
        "process": info["process"],
        "origin_local": bool(info["local"]),
    }
