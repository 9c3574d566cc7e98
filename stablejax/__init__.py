"""stablejax: numerical stability for JAX/Flax training.

The top level holds the safe numerics core: ops whose forward equals the plain
``jnp`` formula wherever that is finite and whose derivatives stay finite at the
singular points (zero vectors, constant rows, ``sqrt``/``log``/``1/x`` at 0).
Layers live in :mod:`stablejax.nn` (Flax linen) and :mod:`stablejax.nnx`
(Flax NNX), losses in :mod:`stablejax.losses`, the Optax guard in
:mod:`stablejax.optim` and NaN diagnosis in :mod:`stablejax.debug`.
"""

from stablejax._src.numerics.angles import safe_arccos as safe_arccos
from stablejax._src.numerics.angles import safe_arcsin as safe_arcsin
from stablejax._src.numerics.angles import safe_arctan2 as safe_arctan2
from stablejax._src.numerics.harden import harden as harden
from stablejax._src.numerics.ops import safe_div as safe_div
from stablejax._src.numerics.ops import safe_log as safe_log
from stablejax._src.numerics.ops import safe_rsqrt as safe_rsqrt
from stablejax._src.numerics.ops import safe_sqrt as safe_sqrt
from stablejax._src.numerics.powers import safe_pow as safe_pow
from stablejax._src.numerics.powers import safe_xlogx as safe_xlogx
from stablejax._src.numerics.reductions import safe_norm as safe_norm
from stablejax._src.numerics.reductions import safe_normalize as safe_normalize
from stablejax._src.numerics.reductions import safe_std as safe_std
from stablejax._src.numerics.reductions import safe_var as safe_var
from stablejax._src.numerics.softmax import safe_log_softmax as safe_log_softmax
from stablejax._src.numerics.softmax import safe_logsumexp as safe_logsumexp
from stablejax._src.numerics.softmax import safe_softmax as safe_softmax

__version__ = "0.1.0"

__all__ = [
    "safe_arccos",
    "safe_arcsin",
    "safe_arctan2",
    "harden",
    "safe_div",
    "safe_log",
    "safe_log_softmax",
    "safe_logsumexp",
    "safe_norm",
    "safe_normalize",
    "safe_pow",
    "safe_rsqrt",
    "safe_softmax",
    "safe_sqrt",
    "safe_std",
    "safe_var",
    "safe_xlogx",
]
