"""The code the demo debugs: small Flax linen models and losses, as a user writes them.

Each model writes the fragile construct the way it is commonly written (the
line ``locate`` points at) when ``safe=False``, and uses the stablejax layer
or dtype when ``safe=True``; everything else is identical, so the two runs of
a scenario differ only by the fix.

This module stands for the user's code, so it lives outside ``stablejax/_src``:
:func:`stablejax.debug.locate` treats files under ``_src`` as library internals
and reports the innermost frame outside them as the user's line.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from stablejax import losses
from stablejax import nn as snn

Array = jnp.ndarray


class DeepMLP(nn.Module):
    """A deep ReLU MLP regressor (the gradient-explosion scenario).

    Attributes:
      depth: hidden layers.
      width: hidden units per layer.
    """

    depth: int = 8
    width: int = 64

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(1)(x)[..., 0]


class UnitNorm(nn.Module):
    """``x / ||x||`` written by hand, as in many cosine-similarity heads."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class DocClassifier(nn.Module):
    """Bag-of-words counts, normalised to unit length, then a linear classifier.

    An empty document has an all-zero count vector; ``x / ||x||`` is then 0/0.

    Attributes:
      classes: number of classes.
      safe: use ``stablejax.nn.L2Normalize`` instead of :class:`UnitNorm`.
    """

    classes: int = 4
    safe: bool = False

    @nn.compact
    def __call__(self, counts: Array) -> Array:
        x = snn.L2Normalize()(counts) if self.safe else UnitNorm()(counts)
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(self.classes)(x)


class MeanStdPool(nn.Module):
    """Statistics pooling written with ``jnp.std``, as in x-vector recipes."""

    @nn.compact
    def __call__(self, h: Array) -> Array:
        return jnp.concatenate([jnp.mean(h, axis=-2), jnp.std(h, axis=-2)], axis=-1)


class SpeakerNet(nn.Module):
    """Frame projection, mean+std pooling over time, speaker logits (x-vector style).

    A silent utterance (all-zero frames) gives identical frames, so the std over
    time is exactly 0: the loss is finite but ``d std`` is not.

    Attributes:
      speakers: number of speakers.
      safe: use ``stablejax.nn.StdPool`` instead of :class:`MeanStdPool`.
    """

    speakers: int = 4
    safe: bool = False

    @nn.compact
    def __call__(self, frames: Array) -> Array:
        h = jnp.tanh(nn.Dense(32, use_bias=False)(frames))
        pooled = snn.StdPool()(h) if self.safe else MeanStdPool()(h)
        return nn.Dense(self.speakers)(nn.relu(nn.Dense(32)(pooled)))


class RainNet(nn.Module):
    """A non-negative regressor (rainfall): its output is clamped at 0, which it reaches exactly."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.relu(nn.Dense(32)(x))
        out = nn.Dense(1, bias_init=nn.initializers.constant(4.0))(h)
        return jnp.maximum(out, 0.0)[..., 0]


class EnergyNet(nn.Module):
    """A projection and its log-energy, computed in ``dtype`` (mixed precision).

    ``h * h`` overflows float16 (max 65504) once ``|h| > 256``; float32 holds it.

    Attributes:
      dtype: computation dtype of the projection and its energy.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.Dense(32, dtype=self.dtype)(x.astype(self.dtype))
        energy = jnp.mean(h * h, axis=-1, keepdims=True)
        feats = jnp.concatenate([jnp.tanh(h), jnp.log1p(energy)], axis=-1)
        return nn.Dense(1, dtype=jnp.float32)(feats.astype(jnp.float32))[..., 0]


def sqrt_mae_loss(pred: Array, target: Array) -> Array:
    """Mean absolute error written through a square root: NaN gradient at a perfect prediction."""
    return jnp.mean(jnp.sqrt((pred - target) ** 2))


def mae_loss(pred: Array, target: Array) -> Array:
    """Mean absolute error with ``stablejax.losses.mae``: gradient 0 at a perfect prediction."""
    return losses.mae(pred, target)
