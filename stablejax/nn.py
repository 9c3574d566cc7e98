"""Safe Flax linen layers: drop-in normalization and pooling that stay finite, and the
float16 mixed-precision policy (:func:`mixed_precision`, for linen and NNX models)."""

from stablejax._src.layers.attention import (
    MultiHeadDotProductAttention as MultiHeadDotProductAttention,
)
from stablejax._src.layers.attention import linen_dot_product_attention as dot_product_attention
from stablejax._src.layers.linen import L2Normalize as L2Normalize
from stablejax._src.layers.linen import LayerNorm as LayerNorm
from stablejax._src.layers.linen import RMSNorm as RMSNorm
from stablejax._src.layers.linen import StdPool as StdPool
from stablejax._src.layers.precision import Policy as Policy
from stablejax._src.layers.precision import mixed_precision as mixed_precision

__all__ = [
    "L2Normalize",
    "LayerNorm",
    "MultiHeadDotProductAttention",
    "Policy",
    "RMSNorm",
    "StdPool",
    "dot_product_attention",
    "mixed_precision",
]
