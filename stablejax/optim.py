"""Optax transformations that keep training finite.

``guard`` skips non-finite and spiking steps without touching the optimizer
state, ``clip_by_global_norm`` and ``adaptive_clip`` clip without making NaNs,
``overshoot_control`` lowers the step when the loss stops following the gradient
(a learning rate too high), and ``stable_adamw`` puts them together.
"""

from stablejax._src.optim.clipping import AdaptiveClipState as AdaptiveClipState
from stablejax._src.optim.clipping import adaptive_clip as adaptive_clip
from stablejax._src.optim.clipping import clip_by_global_norm as clip_by_global_norm
from stablejax._src.optim.guard import GuardState as GuardState
from stablejax._src.optim.guard import guard as guard
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
    "OvershootState",
    "adaptive_clip",
    "clip_by_global_norm",
    "find_guard_state",
    "guard",
    "leaf_path",
    "metrics",
    "nonfinite_leaf_path",
    "overshoot_control",
    "stable_adamw",
]
