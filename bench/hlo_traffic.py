"""Counting passes over full-size buffers in a compiled XLA module (for tests and benchmarks)."""

from __future__ import annotations

import re

# "%name = f32[128,512]{1,0} fusion(%a, %b), kind=..." -> name, dims, opcode, operands...
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* ([\w-]+)\((.*)")
_NO_PASS = ("parameter", "constant", "bitcast", "get-tuple-element", "tuple")


def full_size_traffic(hlo_text: str, min_elements: int) -> dict[str, int]:
    """Reads, writes and copies of buffers of at least ``min_elements`` elements.

    Counted over the top-level instructions (fusions, copies, ...) of the entry
    computation of ``compiled.as_text()``: each read or write of such a buffer is
    one pass over a parameter-sized array. Parameters, constants and tuple
    plumbing move no data and are not counted.

    Returns:
      ``{"reads": ..., "writes": ..., "copies": ...}``.
    """
    lines = hlo_text.splitlines()
    entry = lines[next(i for i, ln in enumerate(lines) if ln.startswith("ENTRY")) + 1 :]
    sizes: dict[str, int] = {}
    out = {"reads": 0, "writes": 0, "copies": 0}
    for line in entry:
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, dims, op, rest = m.groups()
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        sizes[name] = size
        if op in _NO_PASS:
            continue
        operands = set(re.findall(r"%([\w.\-]+)", rest.split("), ")[0]))
        out["reads"] += sum(sizes.get(o, 0) >= min_elements for o in operands)
        out["writes"] += size >= min_elements
        out["copies"] += op == "copy" and size >= min_elements
    return out
