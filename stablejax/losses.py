"""Losses whose value and gradient stay finite at a perfect prediction."""

from stablejax._src.numerics.losses import mae as mae
from stablejax._src.numerics.losses import rmse as rmse

__all__ = ["mae", "rmse"]
