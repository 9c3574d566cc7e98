"""Optax transformations that keep training finite.

``guard`` skips non-finite and spiking steps without touching the optimizer
state, ``clip_by_global_norm`` and ``adaptive_clip`` clip without making NaNs,
``overshoot_control`` lowers the step when the loss stops following the gradient
(a learning rate too high), ``dynamic_loss_scale`` with ``scale_loss`` trains
in float16 without underflow or overflow, and ``stable_adamw`` puts them together.
"""

from stablejax._src.optim.clipping import AdaptiveClipState as AdaptiveClipState
from stablejax._src.optim.clipping import adaptive_clip as adaptive_clip
from stablejax._src.optim.clipping import clip_by_global_norm as clip_by_global_norm
from stablejax._src.optim.guard import GuardState as GuardState
from stablejax._src.optim.guard import guard as guard
from stablejax._src.optim.loss_scale import LossScaleState as LossScaleState
from stablejax._src.optim.loss_scale import dynamic_loss_scale as dynamic_loss_scale
from stablejax._src.optim.loss_scale import find_loss_scale_state as find_loss_scale_state
from stablejax._src.optim.loss_scale import scale_loss as scale_loss
from stablejax._src.optim.metrics import find_guard_state as find_guard_state
from stablejax._src.optim.metrics import leaf_path as leaf_path
from stablejax._src.optim.metrics import metrics as metrics
from stablejax._src.optim.metrics import nonfinite_leaf_path as nonfinite_leaf_path
from stablejax._src.optim.overshoot import OvershootState as OvershootState
from stablejax._src.optim.overshoot import overshoot_control as overshoot_control
from stablejax._src.optim.presets import stable_adamw as stable_adamw

__all__ = [
    "AdaptiveClipState",
    "GuardState",
    "LossScaleState",
    "OvershootState",
    "adaptive_clip",
    "clip_by_global_norm",
    "dynamic_loss_scale",
    "find_guard_state",
    "find_loss_scale_state",
    "guard",
    "leaf_path",
    "metrics",
    "nonfinite_leaf_path",
    "overshoot_control",
    "scale_loss",
    "stable_adamw",
]
