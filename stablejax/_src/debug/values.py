"""Values seen by the jaxpr walker: operand summaries, origins, finiteness checks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util

from stablejax._src.debug.source import Frame
from stablejax._src.jaxpr_bind import bind_equation

LOW_PRECISION = ("float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class OperandStats:
    """Summary of one operand of the culprit equation."""

    shape: tuple[int, ...]
    dtype: str
    min: float | None
    max: float | None
    zeros: int
    negatives: int
    nonfinite: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields."""
        return dataclasses.asdict(self) | {"shape": list(self.shape)}


@dataclasses.dataclass
class Origin:
    """Where non-finite values were born; the raw material of a ``Report``."""

    index: int
    primitive: str | None
    kind: str
    phase: str
    frames: tuple[Frame, ...] = ()
    scopes: tuple[str, ...] = ()
    name_stack: str = ""
    iterations: tuple[int, ...] = ()
    inputs: tuple[OperandStats, ...] = ()
    outputs: tuple[OperandStats, ...] = ()
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    leaf: int | None = None  # flat argument index, for values that came in
    forward_op: str | None = None
    site: tuple[Any, ...] | None = None
    masked: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def is_float(aval: Any) -> bool:
    """Whether an abstract value (or array) has a floating or complex dtype."""
    dtype = getattr(aval, "dtype", None)
    try:
        return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)
    except TypeError:
        return False


def _host(x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind == "V" or (arr.dtype.kind == "f" and arr.dtype.itemsize < 4):
        arr = arr.astype(np.float32)  # bfloat16 / float16 / fp8: check in float32
    return arr


def nonfinite_kind(x: Any) -> str | None:
    """``'nan'``, ``'inf'`` or ``None`` for a concrete float array (NaN wins)."""
    if isinstance(x, (bool, int)):
        return None
    if isinstance(x, float):  # a literal of the program, most often
        return None if math.isfinite(x) else ("nan" if math.isnan(x) else "inf")
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return _global_kind(x)
    arr = _host(x)
    if arr.dtype.kind not in "fc":
        return None
    finite = np.isfinite(arr)
    if finite.all():
        return None
    return "nan" if np.isnan(arr).any() else "inf"


def _global_kind(x: jax.Array) -> str | None:
    """The same, for an array spanning several processes: reduced on device, all-gathered."""
    from jax.experimental import multihost_utils

    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return None
    # Every process calls this at the same point of the same walk (SPMD).
    local = [
        np.asarray(jnp.stack([jnp.isnan(s.data).any(), jnp.isinf(s.data).any()]))
        for s in x.addressable_shards
    ]
    flags = np.any(local, axis=0) if local else np.zeros(2, bool)
    flags = np.asarray(multihost_utils.process_allgather(flags.astype(np.int32))).reshape(-1, 2)
    nan, inf = flags.any(axis=0)
    return "nan" if nan else ("inf" if inf else None)


def operand_stats(x: Any) -> OperandStats:
    """Shape, dtype, range and counts of one concrete operand."""
    dtype = str(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    shape = tuple(int(d) for d in np.shape(x))
    try:
        arr = _host(x)
    except Exception:  # extended dtypes (PRNG keys), tokens
        return OperandStats(shape, dtype, None, None, 0, 0, 0)
    if arr.dtype.kind not in "biufc" or arr.size == 0:
        return OperandStats(shape, dtype, None, None, 0, 0, 0)
    if arr.dtype.kind == "c":
        arr = np.abs(arr)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int32)
    finite = np.isfinite(arr) if arr.dtype.kind == "f" else np.ones(arr.shape, bool)
    vals = arr[finite]
    return OperandStats(
        shape=shape,
        dtype=dtype,
        min=float(vals.min()) if vals.size else None,
        max=float(vals.max()) if vals.size else None,
        zeros=int(np.count_nonzero(arr == 0)),
        negatives=int(np.count_nonzero(vals < 0)),
        nonfinite=int(arr.size - np.count_nonzero(finite)),
    )


def finite_in_float32(eqn, invals, site) -> bool | None:
    """Whether the equation, run with float16/bfloat16 operands upcast to float32, is finite."""
    if eqn.primitive.name in ("convert_element_type", "reduce_precision"):
        return nonfinite_kind(invals[0]) is None
    f32 = np.dtype(np.float32)
    vals = [
        jnp.asarray(x).astype(f32) if str(getattr(x, "dtype", "")) in LOW_PRECISION else x
        for x in invals
    ]
    params = dict(eqn.params)
    for key in ("preferred_element_type", "new_dtype", "out_dtype"):
        if key in params and str(params[key]) in LOW_PRECISION:
            params[key] = f32
    try:
        with source_info_util.user_context(eqn.source_info.traceback, name_stack=site.name_stack):
            outs = bind_equation(eqn, vals, params)
    except Exception:  # a rule that insists on its dtypes: no verdict
        return None
    return all(nonfinite_kind(o) is None for o in outs)


def gather_bounds(eqn, invals) -> dict[str, Any]:
    """For a gather that filled NaN: the operand sizes its indices must stay under."""
    operand, indices = invals[0], np.asarray(invals[1])
    dnums = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    limits = [int(operand.shape[d]) - int(sizes[d]) for d in dnums.start_index_map]
    idx = indices.reshape(-1, indices.shape[-1]) if indices.ndim else indices.reshape(1, 1)
    bad = np.zeros(idx.shape[0], bool)
    for k, lim in enumerate(limits[: idx.shape[1]]):
        bad |= (idx[:, k] < 0) | (idx[:, k] > lim)
    sizes_out = [int(operand.shape[d]) for d in dnums.start_index_map]
    return {
        "mode": str(eqn.params.get("mode")),
        "sizes": sizes_out,
        "out_of_range": int(bad.sum()),
        "max_index": int(idx.max()) if idx.size else None,
    }
