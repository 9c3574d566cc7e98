"""Test configuration: 8 virtual CPU devices and strict numpy semantics.

``XLA_FLAGS`` must be set before jax initialises its backends, so it is set
here, at import time of the first conftest pytest loads.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
