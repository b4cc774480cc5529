"""Test setup: 8 simulated CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Compiled executables persist between runs (compilation dominates this suite's time on a CPU).
_CACHE = os.environ.get("LDU_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ldu-jax", "jax"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
