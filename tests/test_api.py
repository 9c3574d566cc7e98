"""The public surface: __all__ equals what each public module exports, and all import."""

import importlib
import types

import pytest

PUBLIC = {
    "stablejax": {"harden", "safe_arccos", "safe_arcsin", "safe_arctan2", "safe_div", "safe_log",
                  "safe_log_softmax", "safe_logsumexp", "safe_norm", "safe_normalize",
                  "safe_pow", "safe_rsqrt", "safe_softmax", "safe_sqrt", "safe_std", "safe_var",
                  "safe_xlogx"},
    "stablejax.nn": {"L2Normalize", "LayerNorm", "MultiHeadDotProductAttention", "Policy",
                     "RMSNorm", "StdPool", "dot_product_attention", "mixed_precision"},
    "stablejax.nnx": {"L2Normalize", "LayerNorm", "MultiHeadAttention", "Policy", "RMSNorm",
                      "StdPool", "dot_product_attention", "mixed_precision"},
    "stablejax.losses": {"mae", "rmse"},
    "stablejax.optim": {"AdaptiveClipState", "GuardState", "LossScaleState", "OvershootState",
                        "adaptive_clip", "clip_by_global_norm", "dynamic_loss_scale",
                        "find_guard_state", "find_loss_scale_state", "guard", "leaf_path",
                        "metrics", "nonfinite_leaf_path", "overshoot_control", "scale_loss",
                        "stable_adamw"},
    "stablejax.debug": {"LintTraceError", "LocateTraceError", "NonFiniteError", "Report",
                        "Risk", "Risks", "finite_flags", "lint", "locate", "nan_trap",
                        "nnx_module_names", "nonfinite_shards", "watch", "watch_loop"},
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_all_matches_exports(name):
    mod = importlib.import_module(name)
    exported = {
        k for k, v in vars(mod).items()
        if not k.startswith("_") and not isinstance(v, types.ModuleType)
        and getattr(v, "__module__", "").startswith("stablejax")
    }
    assert set(mod.__all__) == exported
    for attr in mod.__all__:
        assert getattr(mod, attr) is not None
    if name in PUBLIC:
        assert set(mod.__all__) >= PUBLIC[name]
