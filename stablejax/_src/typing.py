"""Type aliases used across stablejax, in one place."""

from collections.abc import Sequence
from typing import Any

import jax

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
DTypeLike = jax.typing.DTypeLike
Axis = int | Sequence[int] | None
PyTree = Any
