"""Test setup: simulated CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first. The device count is
LDU_JAX_TEST_DEVICES, else one already in XLA_FLAGS, else 8 (the suite needs at least 2).
"""
import os
import re

_FLAG = "--xla_force_host_platform_device_count"
_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("LDU_JAX_TEST_DEVICES") or _FLAG not in _flags:
    _flags = re.sub(_FLAG + r"=\S*", "", _flags) + f" {_FLAG}={os.environ.get('LDU_JAX_TEST_DEVICES') or 8}"
os.environ["XLA_FLAGS"] = " ".join(_flags.split())
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Compiled executables persist between runs (compilation dominates this suite's time on a CPU).
_CACHE = os.environ.get("LDU_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ldu-jax", "jax"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
