"""Finding where a NaN or Inf is born under jit, why, and the fix.

``locate`` walks the jaxpr of a function on concrete values and reports the
first equation that made a NaN or an Inf (primitive, phase, Flax module, the
user's line, operand ranges, category and a concrete fix). ``nan_trap`` does
the same from jax's own ``jax_debug_nans`` machinery; ``watch`` adds cheap
finiteness flags to a train step and ``watch_loop`` calls ``locate`` when one
trips.
"""

from stablejax._src.debug.lint import LintTraceError as LintTraceError
from stablejax._src.debug.lint import lint as lint
from stablejax._src.debug.locate import LocateTraceError as LocateTraceError
from stablejax._src.debug.locate import locate as locate
from stablejax._src.debug.nnx_names import nnx_module_names as nnx_module_names
from stablejax._src.debug.report import Report as Report
from stablejax._src.debug.risk import Risk as Risk
from stablejax._src.debug.risk import Risks as Risks
from stablejax._src.debug.trap import NonFiniteError as NonFiniteError
from stablejax._src.debug.trap import nan_trap as nan_trap
from stablejax._src.debug.watch import finite_flags as finite_flags
from stablejax._src.debug.watch import nonfinite_shards as nonfinite_shards
from stablejax._src.debug.watch import watch as watch
from stablejax._src.debug.watch import watch_loop as watch_loop

__all__ = [
    "LintTraceError",
    "LocateTraceError",
    "NonFiniteError",
    "Report",
    "Risk",
    "Risks",
    "finite_flags",
    "lint",
    "locate",
    "nan_trap",
    "nnx_module_names",
    "nonfinite_shards",
    "watch",
    "watch_loop",
]
