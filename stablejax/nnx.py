"""Safe Flax NNX layers: the same core as :mod:`stablejax.nn`, for NNX models."""

from stablejax._src.layers.attention import MultiHeadAttention as MultiHeadAttention
from stablejax._src.layers.attention import nnx_dot_product_attention as dot_product_attention
from stablejax._src.layers.nnx import L2Normalize as L2Normalize
from stablejax._src.layers.nnx import LayerNorm as LayerNorm
from stablejax._src.layers.nnx import RMSNorm as RMSNorm
from stablejax._src.layers.nnx import StdPool as StdPool
from stablejax._src.layers.precision import Policy as Policy
from stablejax._src.layers.precision import mixed_precision as mixed_precision

__all__ = [
    "L2Normalize",
    "LayerNorm",
    "MultiHeadAttention",
    "Policy",
    "RMSNorm",
    "StdPool",
    "dot_product_attention",
    "mixed_precision",
]
