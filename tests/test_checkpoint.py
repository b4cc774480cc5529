"""Import of public shortcut-models checkpoints (``python -m ldu_jax.cli.import_shortcut``)."""
import json
import os
import pickle
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import shortcut_tiny
from ldu_jax import checkpoint as ckpt
from ldu_jax import errors
from ldu_jax.models.dit import dit_from_config
from ldu_jax.jobs import import_shortcut as official

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16   # configs/shortcut_tiny.py: 16 px images, no VAE: the DiT sees 16x16x3 pixels


def public_save(filename: str, train_state: dict):
    """What the public utils/checkpoint.py does for ``cp.train_state = ts; cp.save()``: pickle
    ``{'train_state': ts.save(), '_timestamp': t}`` to ``<name>.tmp`` beside the file, then rename."""
    os.makedirs(os.path.dirname(filename), exist_ok=True)
    with open(filename + ".tmp", "wb") as f:
        f.write(pickle.dumps({"train_state": train_state, "_timestamp": time.time()}))
    os.replace(filename + ".tmp", filename)


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    """The public code's save dir after one save at step 123 (``--save_dir=<dir>/`` gives the file
    ``<dir>/124``), holding random DiT weights for 16x16x3 inputs, numpy arrays as its
    process_allgather returns them, and a real optax state."""
    config = shortcut_tiny.get_config()
    model = dit_from_config(config.model, 3)
    z = jnp.zeros((1,))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)), z, z, z.astype(jnp.int32))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), 2 * len(leaves))
    to_np = lambda ks: tree.unflatten([np.asarray(0.1 * jax.random.normal(k, leaf.shape))  # noqa: E731
                                       for k, leaf in zip(ks, leaves)])
    p = to_np(keys[:len(leaves)])
    opt_state = jax.tree_util.tree_map(np.asarray, optax.adamw(1e-4).init(p))
    ts = {"params": p, "params_ema": to_np(keys[len(leaves):]), "opt_state": opt_state, "step": np.asarray(123)}
    save_dir = tmp_path_factory.mktemp("public") / "ckpts"
    public_save(str(save_dir / "124"), ts)
    return config, model, ts, str(save_dir)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ldu_jax.cli.import_shortcut", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(r, *needles) -> str:
    """The command failed with one ``error: ...`` line (its last) holding ``needles``, no traceback."""
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), r.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, r.stderr
    for n in needles:
        assert n in lines[-1], lines[-1]
    return lines[-1]


def tree_snapshot(path) -> dict:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(d, f))
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), path)] = (st.st_size, st.st_mtime_ns, hash(fh.read()))
    return out


def test_refuses_to_unpickle_without_the_flag(official_ckpt, tmp_path):
    config, _, _, save_dir = official_ckpt
    with pytest.raises(PermissionError, match="allow_pickle"):
        official.convert(save_dir, config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    r = cli(f"--pickle={save_dir}/124", f"--workdir={tmp_path / 'run'}", "--config=configs/shortcut_tiny.py")
    assert_one_line_error(r, "allow_pickle")
    assert not os.path.exists(tmp_path / "run")


def test_converted_checkpoint_gives_identical_outputs(official_ckpt, tmp_path):
    config, model, ts, save_dir = official_ckpt
    step = official.convert(os.path.join(save_dir, "124"), config, str(tmp_path), allow_pickle=True)
    assert step == 123
    x = jax.random.normal(jax.random.PRNGKey(5), (2, SIZE, SIZE, 3))
    t, dt, y = jnp.array([0.0, 0.5]), jnp.array([0.0, 7.0]), jnp.zeros((2,), jnp.int32)
    for ema in (True, False):
        params, meta = ckpt.restore_params(str(tmp_path), ema=ema)
        want = model.apply({"params": ts["params_ema" if ema else "params"]}, x, t, dt, y)
        got = model.apply({"params": params}, x, t, dt, y)
        assert float(jnp.abs(want).max()) > 0.01
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert meta["data_shape"] == [SIZE, SIZE, 3]   # the config's: --input_size not given


def test_cli_takes_the_save_folder_and_refuses_to_rerun_into_a_used_workdir(official_ckpt, tmp_path):
    """--pickle may name the public code's save dir (an unfinished <name>.tmp beside the checkpoint
    is ignored); a second run into the same work dir is refused and changes nothing there."""
    config, _, ts, save_dir = official_ckpt
    folder = tmp_path / "save"
    os.makedirs(folder)
    os.link(os.path.join(save_dir, "124"), folder / "124")
    (folder / "248.tmp").write_bytes(b"\x80\x04 a save cut short")
    workdir = str(tmp_path / "run")
    r = cli(f"--pickle={folder}", f"--workdir={workdir}", "--config=configs/shortcut_tiny.py", "--allow_pickle")
    assert r.returncode == 0, r.stderr
    assert "wrote step 123" in r.stdout
    before = tree_snapshot(workdir)
    r = cli(f"--pickle={folder}", f"--workdir={workdir}", "--config=configs/shortcut_tiny.py", "--allow_pickle")
    assert_one_line_error(r, "already holds step 123", "use another --workdir")
    assert tree_snapshot(workdir) == before
    params, meta = ckpt.restore_params(workdir)
    np.testing.assert_array_equal(np.asarray(params["FinalLayer_0"]["Dense_1"]["kernel"]),
                                  ts["params_ema"]["FinalLayer_0"]["Dense_1"]["kernel"])
    assert meta["data_shape"] == [SIZE, SIZE, 3]
    # a work dir that holds another run's checkpoints is refused the same way
    with pytest.raises(official.WorkdirInUseError, match="already holds step 123"):
        official.convert(str(folder), config, workdir, allow_pickle=True)
    assert isinstance(official.WorkdirInUseError("x"), errors.UserError)


def test_cli_reports_a_config_mismatch_in_one_line(official_ckpt, tmp_path):
    _, _, _, save_dir = official_ckpt
    r = cli(f"--pickle={save_dir}", f"--workdir={tmp_path / 'run'}", "--config=configs/shortcut_tiny.py",
            "--config.model.hidden_size=32", "--allow_pickle")
    line = assert_one_line_error(r, "does not fit --config", "parameter ['DiTBlock_0']['Dense_0']['bias']",
                                 "hidden_size=64 (config: 32)")
    assert "[384]" in line and "[192]" in line
    assert not os.path.exists(tmp_path / "run")


def test_conversion_checks_the_model_shape(official_ckpt, tmp_path):
    config, _, _, save_dir = official_ckpt
    config = config.copy_and_resolve_references()
    config.model.depth = 3
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"\['DiTBlock_2'\].*is not in the checkpoint.*depth=2"):
        official.convert(save_dir, config, str(tmp_path), allow_pickle=True)
    assert isinstance(ckpt.CheckpointMismatchError("x"), errors.UserError)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_save_folder_without_exactly_one_checkpoint(official_ckpt, tmp_path):
    _, _, ts, save_dir = official_ckpt
    two = tmp_path / "two"
    public_save(str(two / "124"), ts)
    public_save(str(two / "248"), ts)
    (two / "notes.txt").write_text("run notes")
    r = cli(f"--pickle={two}", f"--workdir={tmp_path / 'run'}", "--config=configs/shortcut_tiny.py", "--allow_pickle")
    assert_one_line_error(r, "2 checkpoints", "124, 248, notes.txt (not a pickle)", "pass the one to convert")
    assert not os.path.exists(tmp_path / "run")
    cut = tmp_path / "cut"
    os.makedirs(cut)
    (cut / "124.tmp").write_bytes(b"\x80\x04")
    with pytest.raises(errors.FileFormatError, match=r"without a complete.*124.tmp \(an unfinished save"):
        official.find_checkpoint(str(cut))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(errors.FileFormatError, match="holds: nothing"):
        official.find_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(errors.MissingError):
        official.find_checkpoint(str(tmp_path / "absent"))
    (cut / "124").write_bytes(pickle.dumps({"train_state": ts})[:200])   # a copy cut short
    with pytest.raises(errors.FileFormatError, match="could not be unpickled"):
        official.load_pickle(str(cut), allow_pickle=True)


def test_cli_checks_the_input_size(official_ckpt, tmp_path):
    """Nothing in the public checkpoint depends on the input size (fixed sin-cos positions), so
    --input_size is checked against the patch size and against the config's image size and VAE."""
    config, _, _, save_dir = official_ckpt
    r = cli(f"--pickle={save_dir}", f"--workdir={tmp_path / 'run'}", "--config=configs/shortcut_tiny.py",
            "--input_size=8", "--allow_pickle")
    assert_one_line_error(r, "--input_size=8 does not fit --config: expected 16", "found 8")
    assert not os.path.exists(tmp_path / "run")
    with pytest.raises(errors.ConfigError, match="positive multiple of the checkpoint's patch size 2"):
        official.convert(save_dir, config, str(tmp_path / "run"), input_size=15, allow_pickle=True)
    # the config's VAE gives 4 latent channels; the checkpoint's DiT takes 3
    c = config.copy_and_resolve_references()
    c.vae, c.image_size = "tiny", 128
    with pytest.raises(errors.ConfigError, match="takes 3-channel inputs, but --config gives 4"):
        official.convert(save_dir, c, str(tmp_path / "run"), allow_pickle=True)
    # a VAE folder: its config.json gives the factor (here 4: 64 px -> 16x16 latents)
    vae_dir = tmp_path / "vae"
    os.makedirs(vae_dir)
    from ldu_jax.sd.vae import TINY_VAE
    (vae_dir / "config.json").write_text(json.dumps(dict(
        TINY_VAE, block_out_channels=[8, 8, 8], latent_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3)))
    c.vae, c.image_size = str(vae_dir), 64
    with pytest.raises(errors.ConfigError, match=r"expected 16 \(latents of config.image_size=64.*factor 4"):
        official.convert(save_dir, c, str(tmp_path / "run"), input_size=32, allow_pickle=True)
    assert official.convert(save_dir, c, str(tmp_path / "run"), allow_pickle=True) == 123
    assert ckpt.restore_params(str(tmp_path / "run"))[1]["data_shape"] == [SIZE, SIZE, 3]
    # a hub VAE that is not in the local cache: the size must be given
    c.vae = "nobody/no-such-vae"
    with pytest.raises(errors.ConfigError, match="pass --input_size"):
        official.convert(save_dir, c, str(tmp_path / "run2"), allow_pickle=True)
    assert official.convert(save_dir, c, str(tmp_path / "run2"), input_size=24, allow_pickle=True) == 123
    assert ckpt.restore_params(str(tmp_path / "run2"))[1]["data_shape"] == [24, 24, 3]


def test_small_replicated_arrays_are_saved_whole_and_restore_exactly(tmp_path, monkeypatch):
    """A small state replicated over the 8 devices is written by one replica, not sliced into 8
    on-device pieces (one dispatched op each: checkpoint.MIN_REPLICA_SLICE_BYTES), and reads back."""
    from orbax.checkpoint._src.serialization import replica_slices
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("d",))
    assert mesh.size == 8
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"w": jax.device_put(jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8), rep),
             "step": jax.device_put(jnp.asarray(3), rep)}
    sliced = []
    real = replica_slices.ReplicaSlice.data
    monkeypatch.setattr(replica_slices.ReplicaSlice, "data", lambda self: sliced.append(self.slice_args) or real(self))
    manager = ckpt.make_manager(str(tmp_path))
    ckpt.save(manager, 3, state, {"param_shapes": ckpt.param_shapes(state)})
    manager.wait_until_finished()
    assert sliced and all(a is None for a in sliced), sliced       # written whole, from one replica
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
    back = ckpt.restore_latest(ckpt.make_manager(str(tmp_path)), abstract, {"param_shapes": ckpt.param_shapes(state)},
                               str(tmp_path))
    np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(state["w"]))
    assert int(back["step"]) == 3
