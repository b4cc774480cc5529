"""Import of official shortcut-models (pickle) checkpoints."""
import os
import pickle
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shortcut_tiny
from ldu_jax import checkpoint as ckpt
from ldu_jax.models.dit import dit_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A pickle laid out as shortcut-models writes it, holding random DiT weights (8x8x4 inputs)."""
    config = shortcut_tiny.get_config()
    model = dit_from_config(config.model, 4)
    z = jnp.zeros((1,))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)), z, z, z.astype(jnp.int32))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), 2 * len(leaves))
    to_np = lambda ks: tree.unflatten([np.asarray(0.1 * jax.random.normal(k, l.shape))  # noqa: E731
                                       for k, l in zip(ks, leaves)])
    ts = {"params": to_np(keys[:len(leaves)]), "params_ema": to_np(keys[len(leaves):]), "step": np.int32(123),
          "rng": np.zeros(2, np.uint32), "opt_state": ({"count": np.int32(123)},)}
    path = str(tmp_path_factory.mktemp("official") / "ckpt.pkl")
    with open(path, "wb") as f:
        pickle.dump({"train_state": ts, "_timestamp": time.time()}, f)
    return config, model, ts, path


def test_refuses_to_unpickle_without_the_flag(official, tmp_path):
    config, _, _, path = official
    with pytest.raises(PermissionError, match="allow_pickle"):
        ckpt.convert_official(path, config, str(tmp_path), input_size=8)
    assert not os.path.exists(tmp_path / "checkpoints")
    r = subprocess.run([sys.executable, "-m", "ldu_jax.checkpoint", f"--pickle={path}", f"--workdir={tmp_path}",
                        "--config=configs/shortcut_tiny.py", "--input_size=8"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "allow_pickle" in r.stderr and "Traceback" not in r.stderr


def test_converted_checkpoint_gives_identical_outputs(official, tmp_path):
    config, model, ts, path = official
    step = ckpt.convert_official(path, config, str(tmp_path), input_size=8, allow_pickle=True)
    assert step == 123
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 4))
    t, dt, y = jnp.array([0.0, 0.5]), jnp.array([0.0, 7.0]), jnp.zeros((2,), jnp.int32)
    for ema in (True, False):
        params, meta = ckpt.restore_params(str(tmp_path), ema=ema)
        want = model.apply({"params": ts["params_ema" if ema else "params"]}, x, t, dt, y)
        got = model.apply({"params": params}, x, t, dt, y)
        assert float(jnp.abs(want).max()) > 0.01
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert meta["data_shape"] == [8, 8, 4]


def test_conversion_checks_the_model_shape(official, tmp_path):
    config, _, _, path = official
    config = config.copy_and_resolve_references()
    config.model.hidden_size = 32
    with pytest.raises(ckpt.CheckpointMismatchError, match="hidden_size|different model"):
        ckpt.convert_official(path, config, str(tmp_path), input_size=8, allow_pickle=True)
