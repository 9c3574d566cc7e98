"""``locate`` in a program spanning several processes (``jax.distributed``).

No process can read another's shards. Each process walks the shards of a
``shard_map`` body that it holds, their blocks read from ``addressable_shards``
and stacked in mesh order. At a collective, its shards go in as its blocks of a
global array and a ``shard_map`` holding only that collective runs on every
process: each reaches it at the same point of the same walk (``locate`` runs on
every process, as the step does), so the values past it are the devices' own.
Then each process's first origin (its position in the walk, the global shard,
kind, phase, shard count and operand statistics) is all-gathered and the
earliest wins, so every process reports the same equation, shard, device and
process; ``Report.origin_local`` is ``False`` on the processes that do not hold
that shard.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from stablejax._src.debug import shards
from stablejax._src.debug.values import OperandStats, nonfinite_kind
from stablejax._src.jaxpr_bind import bind_equation

_PHASES = ("forward", "backward", "update")
_KIND = {"inf": 1, "nan": 2}
# The all-gathered row: step, global shard, kind, phase, shards, float32 verdict; then
# min, max, zeros, negatives, nonfinite per operand.
_HEAD = 6
_NSTATS = 5


class _Stop(Exception):
    """A multi-process walk cannot go on here (a mesh with auto axes, an unusual layout)."""


def across_processes(mapped: shards.Mapped, eqn: Any, invals: list[Any]) -> list[Any]:
    """A collective of a multi-process walk, run for real over the whole mesh.

    This process's shards go in as its blocks of a global array; a
    ``shard_map`` holding only this collective runs on every process (each
    reaches it at the same point of the same walk); its local blocks come back.
    """
    mesh, n = mapped.mesh, len(mapped.names)
    if mesh is None or mapped.devices is None or tuple(mesh.axis_names) != mapped.names:
        raise _Stop  # auto axes besides the manual ones: not rebuilt here
    name = eqn.primitive.name
    if name == "axis_index":
        axes = shards.dim_axes(eqn.params["axis_name"])
        pos = [dict(zip(mapped.names, c)) for c in mapped.coords]
        lin = [
            int(np.ravel_multi_index([p[a] for a in axes], [mesh.shape[a] for a in axes]))
            for p in pos
        ]
        return [jnp.asarray(lin, eqn.outvars[0].aval.dtype)]
    at = {int(mapped.devices[c].id): k for k, c in enumerate(mapped.coords)}
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*mapped.names))
    stacked, glob = [], []
    for v, x in zip(eqn.invars, invals):
        if isinstance(v, jcore.Literal) or np.ndim(x) != v.aval.ndim + 1:
            stacked.append(None)
            continue
        shape = tuple(v.aval.shape)
        host = np.asarray(x)
        parts = [
            jax.device_put(host[at[d.id]].reshape((1,) * n + shape), d)
            for d in sharding.addressable_devices
        ]
        glob.append(jax.make_array_from_single_device_arrays(mapped.sizes + shape, sharding, parts))
        stacked.append(len(glob) - 1)
    consts = [
        None if k is not None else (v.val if isinstance(v, jcore.Literal) else np.asarray(x))
        for v, x, k in zip(eqn.invars, invals, stacked)
    ]

    def one(*blocks):
        vals = [c if k is None else blocks[k][(0,) * n] for c, k in zip(consts, stacked)]
        return [o[(None,) * n] for o in _collective(eqn, vals)]

    spec = jax.sharding.PartitionSpec(*mapped.names)
    f = jax.shard_map(
        one,
        mesh=mesh,
        in_specs=(spec,) * len(glob),
        out_specs=[spec] * len(eqn.outvars),
        check_vma=False,
    )
    # Outside the body's own (manual) mesh context: a fresh shard_map of the mesh.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        outs = jax.jit(f)(*glob)
    back = []
    for v, o in zip(eqn.outvars, outs):
        by_dev = {int(sh.device.id): sh.data for sh in o.addressable_shards}
        blocks = [np.asarray(by_dev[int(mapped.devices[c].id)]) for c in mapped.coords]
        back.append(jnp.asarray(np.stack(blocks).reshape((-1, *v.aval.shape))))
    return back


def _collective(eqn: Any, vals: list[Any]) -> list[Any]:
    """Binds a collective inside a ``check_vma=False`` ``shard_map``."""
    p = eqn.params
    if eqn.primitive.name == "psum_invariant":  # the check_vma spelling of psum
        return [jax.lax.psum(vals[0], p["axes"])]
    if eqn.primitive.name == "all_gather_invariant":
        return [
            jax.lax.all_gather(
                vals[0], p["axis_name"], axis=p["all_gather_dimension"], tiled=p["tiled"]
            )
        ]
    return bind_equation(eqn, vals)


def _local_blocks(x: Any, spec: Any, coords, devices, names, sizes, aval) -> Any:
    """The blocks of ``x`` that this process holds, stacked in ``coords`` order."""
    dims = shards.spec_axes(spec, len(aval.shape))
    by_device = {s.device.id: s for s in x.addressable_shards}
    blocks = []
    for c in coords:
        pos = dict(zip(names, c))
        want = []
        for d, axes in enumerate(dims):
            n = int(aval.shape[d])
            b = n // int(np.prod([sizes[a] for a in axes], dtype=int))
            lin = 0
            for a in axes:
                lin = lin * sizes[a] + pos[a]
            want.append((lin * b, lin * b + b))
        s = by_device.get(int(devices[c].id))
        if s is None:
            raise _Stop
        sub = []
        for (lo, hi), sl in zip(want, s.index):
            start = sl.start or 0
            if lo < start or (sl.stop is not None and hi > sl.stop):
                raise _Stop  # the array is laid out unlike the spec: not read here
            sub.append(slice(lo - start, hi - start))
        blocks.append(np.asarray(s.data)[tuple(sub)])
    return jnp.asarray(np.stack(blocks))


def walk_processes(
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
):
    """Several processes: walk the local shards (collectives over the mesh), then agree."""
    from jax.experimental import multihost_utils

    me = jax.process_index()
    coords = [
        tuple(int(i) for i in c)
        for c in np.ndindex(*(sizes[a] for a in names))
        if devices is not None and int(getattr(devices[c], "process_index", 0)) == me
    ]
    mapped = shards.Mapped(
        names,
        tuple(sizes[a] for a in names),
        ((None, len(coords)),),
        coords,
        devices,
        local=True,
        mesh=mesh,
    )
    base = len(walker.origins)
    mine = None
    try:
        if coords:
            stacked = [
                _local_blocks(x, s, coords, devices, names, sizes, v.aval)
                if isinstance(x, jax.Array) and not x.is_fully_addressable
                else x
                for x, s, v in zip(invals, p_specs(eqn), eqn.invars)
            ]
            body_taints = shards.input_taints(
                mapped, stacked, [v.aval for v in body.invars], in_taints
            )
            shards.walk_body(
                walker, mapped, body, consts, stacked, body_taints, site, out_flags, in_grad
            )
    except _Stop:
        walker.mapped = None
    born = [o for o in walker.origins[base:] if "shard" in o.extra]
    if born:
        mine = born[0]
    n_in = max((len(e.invars) for e, _ in mapped.trail), default=0)
    row = np.zeros(_HEAD + _NSTATS * n_in, np.float32)
    row[0] = np.inf
    if mine is not None:
        info = mine.extra["shard"]
        glob = int(np.ravel_multi_index(tuple(info["index"].values()), mapped.sizes))
        f32 = mine.extra.get("float32_finite")
        row[:_HEAD] = [
            info["step"],
            glob,
            _KIND[mine.kind],
            _PHASES.index(mine.phase),
            info["affected"],
            -1 if f32 is None else int(f32),
        ]
        for i, s in enumerate(mine.inputs[:n_in]):
            row[_HEAD + _NSTATS * i : _HEAD + _NSTATS * (i + 1)] = [
                np.nan if s.min is None else s.min,
                np.nan if s.max is None else s.max,
                s.zeros,
                s.negatives,
                s.nonfinite,
            ]
    rows = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, row.size)
    outs = walker._bind(eqn, invals, site)  # the real step, run by every process
    pick = min(range(rows.shape[0]), key=lambda r: (rows[r, 0], rows[r, 1]))
    chosen = rows[pick]
    if not np.isfinite(chosen[0]):
        return None  # no process saw an origin before a collective: one opaque op
    step, glob = int(chosen[0]), int(chosen[1])
    affected = int(rows[np.isfinite(rows[:, 0]) & (rows[:, 0] == step), 4].sum())
    if mine is not None and mine.extra["shard"]["step"] == step and pick == me:
        origin = mine
    else:
        origin = _remote_origin(walker, mapped, step, chosen, site)
        if origin is None:
            return None
    coord = np.unravel_index(glob, mapped.sizes)
    info = mapped.describe(0) if coords else {}
    info.update(
        index=dict(zip(names, (int(c) for c in coord))),
        device=int(devices[coord].id) if devices is not None else None,
        process=int(getattr(devices[coord], "process_index", pick))
        if devices is not None
        else pick,
        affected=affected,
        shards=int(np.prod(mapped.sizes, dtype=int)),
        local=origin is mine,
        axes=list(names),
        step=step,
    )
    origin.extra["shard"] = info
    kinds = [
        nonfinite_kind(o) if jnp.issubdtype(v.aval.dtype, jnp.inexact) else None
        for v, o in zip(eqn.outvars, outs)
    ]
    return outs, [origin.index if k else None for k in kinds]


def p_specs(eqn: Any) -> tuple[Any, ...]:
    return eqn.params["in_specs"]


def _remote_origin(walker, mapped: shards.Mapped, step: int, row: np.ndarray, site) -> Any:
    """The origin another process found, rebuilt from the equation this process also walked."""
    from stablejax._src.debug.interpreter import _scope_names, _site_key
    from stablejax._src.debug.values import Origin

    if step >= len(mapped.trail):
        return None
    eqn, sub = mapped.trail[step]
    stats = []
    for i, v in enumerate(eqn.invars):
        lo, hi, zeros, neg, bad = row[_HEAD + _NSTATS * i : _HEAD + _NSTATS * (i + 1)]
        stats.append(
            OperandStats(
                tuple(int(d) for d in v.aval.shape),
                str(v.aval.dtype),
                None if np.isnan(lo) else float(lo),
                None if np.isnan(hi) else float(hi),
                int(zeros),
                int(neg),
                int(bad),
            )
        )
    phase = _PHASES[int(row[3])]
    key = _site_key(sub.frames, eqn.source_info.traceback)
    origin = Origin(
        index=len(walker.origins),
        primitive=eqn.primitive.name,
        kind="nan" if int(row[2]) == 2 else "inf",
        phase=phase,
        frames=sub.frames,
        scopes=tuple(_scope_names(sub.name_stack)),
        name_stack=str(sub.name_stack),
        inputs=tuple(stats),
        forward_op=walker._forward_op(key) if phase == "backward" else None,
        site=key,
    )
    origin.extra["producers"] = [
        None if isinstance(v, jcore.Literal) else walker._producer.get(v) for v in eqn.invars
    ]
    if row[5] >= 0:
        origin.extra["float32_finite"] = bool(row[5])
    walker.origins.append(origin)
    return origin
