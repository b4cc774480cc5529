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

# Under pytest-xdist each worker keeps to its own share of the cores: two processes whose XLA
# thread pools each spanned both cores spent 1.7x the CPU time of one process for the same wall
# time. (Subprocesses of the multi-host tests take every core again: tests/test_multihost.py.)
_WORKER, _WORKERS = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKER and _WORKERS > 1 and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= _WORKERS:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[int(_WORKER[2:])::_WORKERS])

import jax  # noqa: E402

# Compiled executables persist between runs (compilation dominates this suite's time on a CPU),
# every one of them: the small programs of eager ops (a few hundred in an attack test, each compiled
# in ~0.04 s) cost more to compile again than to load. An attack test with a warm cache: 97-103 s
# when only programs over 0.5 s were kept, 74-80 s with all (run alternately, 2.3 MB more cache).
# The environment variable reaches the commands the tests start as subprocesses too.
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
_CACHE = os.environ.get("LDU_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ldu-jax", "jax"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

import pytest  # noqa: E402

# build_world's 'test' profile, shortened as the multi-host test runs it, with XLA's convs there
# (see test_two_processes_build_the_world_as_one): built once in this process (1 x 8 devices) for
# test_miniworld_build's checks and as the single-process side of the multi-host comparison.
TEST_WORLD_SETTINGS = ("rho.quantize=False", "rho.grid_every=2", "vae.max_steps=6", "vae.log_every=2",
                       "vae.save_every=6", "t2i.max_steps=4", "t2i.log_every=2", "t2i.save_every=4")


@pytest.fixture(scope="session")
def test_world(tmp_path_factory):
    """(work dir, manifest, log lines, settings) of one test-profile build; read it, do not write
    into it."""
    from ldu_jax.jobs import build_world
    from ldu_jax.sd import conv
    workdir, log = str(tmp_path_factory.mktemp("test_world")), []
    with conv.using("xla"):
        manifest = build_world.build(workdir, "test", log=log.append, settings=TEST_WORLD_SETTINGS)
    return workdir, manifest, log, TEST_WORLD_SETTINGS


@pytest.fixture(scope="session")
def trained_rho(tmp_path_factory):
    """(config, work dir, state) of a short ρ training on the tiny models (configs/ldu_tiny.py)
    with a loose budget (d < eps), starting from λ = 1; also the checkpoint the multi-host
    protection test applies."""
    from configs import ldu_tiny
    from ldu_jax.jobs import protect
    workdir = str(tmp_path_factory.mktemp("rho"))
    c = ldu_tiny.get_config()
    c.update(dict(max_steps=8, log_every=2, save_every=8, eps=0.5, lam_init=1.0, lam_lr=0.5, lr=1e-2, grid_every=8,
                  constraint="dual", heldout="miniworld", heldout_draws=2))
    return c, workdir, protect.train_rho(c, workdir, log=lambda s: None)


# pytest-xdist (pytest.ini: 2 workers, --dist loadgroup): a file's tests run on one worker, so its
# module fixtures are built once; the tests that use a session fixture above share one group, so
# it is built once too, and that group starts first. (No module fixture is used by tests on both
# sides: test_ldu's `setup` is not used with trained_rho.)
_SHARED = {"test_world", "trained_rho"}


@pytest.hookimpl(tryfirst=True)   # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    shared = {item.nodeid for item in items if _SHARED & set(item.fixturenames)}
    for item in items:
        item.add_marker(pytest.mark.xdist_group("session-fixtures" if item.nodeid in shared else item.path.stem))
    items.sort(key=lambda item: item.nodeid not in shared)
