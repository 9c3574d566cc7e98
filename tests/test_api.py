"""The public surface: __all__ equals what each public module exports, and all import."""

import importlib
import types

import pytest

PUBLIC = {
    "stablejax": {"safe_div", "safe_log", "safe_norm", "safe_normalize", "safe_rsqrt",
                  "safe_sqrt", "safe_std", "safe_var"},
    "stablejax.nn": {"L2Normalize", "LayerNorm", "RMSNorm", "StdPool"},
    "stablejax.nnx": {"L2Normalize", "LayerNorm", "RMSNorm", "StdPool"},
    "stablejax.losses": {"mae", "rmse"},
    "stablejax.debug": {"LintTraceError", "LocateTraceError", "NonFiniteError", "Report",
                        "Risk", "Risks", "finite_flags", "lint", "locate", "nan_trap",
                        "nnx_module_names", "watch", "watch_loop"},
}


@pytest.mark.parametrize("name", sorted(PUBLIC) + ["stablejax.optim"])
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
