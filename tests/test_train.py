"""train.py end to end on 8 simulated devices: loss, sharding, resume, NaN, bad inputs, CLI errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import shortcut_tiny
from ldu_jax import checkpoint as ckpt
from ldu_jax import data as data_lib
from ldu_jax import parallel
from ldu_jax.models.dit import dit_from_config
from ldu_jax.jobs import train_shortcut as run
from ldu_jax.shortcut import trainer
from numerics import assert_adam_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**kw):
    c = shortcut_tiny.get_config()
    c.update(dict(sample_steps=(1, 4), num_samples=4, log_every=5, save_every=10))
    c.update(kw)
    return c


def write_faces(folder, n=8, size=(20, 24)):
    """Small smooth colour images with a bright blob at an image-specific place."""
    os.makedirs(folder, exist_ok=True)
    yy, xx = np.mgrid[0:size[1], 0:size[0]] / max(size)
    for i in range(n):
        cx, cy = 0.2 + 0.6 * (i % 4) / 3, 0.3 + 0.4 * (i // 4)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02)
        img = np.stack([blob, 0.5 * xx + 0.2, 1 - blob * (i / n)], -1)
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(os.path.join(folder, f"img{i}.png"))
    return folder


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    folder = write_faces(str(tmp_path_factory.mktemp("faces")))
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny(dataset=folder, max_steps=80, log_every=10, save_every=40)
    state = run.train(config, workdir, log=lambda s: None)
    return config, workdir, state


def test_loss_falls_on_a_fixed_dataset(folder_run):
    config, workdir, state = folder_run
    m = read_metrics(workdir)
    assert [r["step"] for r in m] == list(range(10, 81, 10))
    assert m[-1]["loss"] < 0.6 * m[0]["loss"], [r["loss"] for r in m]
    for key in ("loss_flow", "loss_bootstrap", "grad_norm", "lr", "img_per_s"):
        assert np.isfinite(m[-1][key]), key
    assert int(state.step) == 80
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["40", "80"]
    for k in (1, 4):
        img = Image.open(os.path.join(workdir, "samples", f"step_80_k{k}.png"))
        assert img.size[0] > 4 * 16  # a grid of 4 samples at 16 px


def test_workdir_of_another_model_is_refused(folder_run):
    config, workdir, _ = folder_run
    other = tiny(dataset=config.dataset, max_steps=81)
    other.model.hidden_size = 32
    with pytest.raises(ckpt.CheckpointMismatchError, match="different model"):
        run.train(other, workdir, log=lambda s: None)


def _crash_after(n_batches, monkeypatch, exc=KeyboardInterrupt):
    real = run.pixel_batches

    def crashing(*a, **kw):
        batches_from, close = real(*a, **kw)

        def gen(start_step):
            for i, b in enumerate(batches_from(start_step)):
                if i == n_batches:
                    raise exc("killed")
                yield b
        return gen, close
    monkeypatch.setattr(run, "pixel_batches", crashing)


def test_killed_run_resumes_to_the_same_parameters(tmp_path, monkeypatch):
    config = tiny(max_steps=30, save_every=10)
    whole = run.train(config, str(tmp_path / "whole"), log=lambda s: None)
    broken = str(tmp_path / "broken")
    with monkeypatch.context() as m:
        _crash_after(25, m)
        with pytest.raises(KeyboardInterrupt):
            run.train(config, broken, log=lambda s: None)
    assert ckpt.make_manager(broken).latest_step() == 20  # at most save_every steps lost
    resumed = run.train(config, broken, log=lambda s: None)
    assert int(resumed.step) == 30
    for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    steps = [r["step"] for r in read_metrics(broken)]
    assert steps[-1] == 30 and 20 in steps


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = run.pixel_batches

    def poisoned(*a, **kw):
        batches_from, close = real(*a, **kw)

        def gen(start):
            return ((x * np.nan if start + i >= 12 else x, y) for i, (x, y) in enumerate(batches_from(start)))
        return gen, close
    monkeypatch.setattr(run, "pixel_batches", poisoned)
    workdir = str(tmp_path)
    with pytest.raises(run.TrainingDiverged, match=r"NaN or inf.*step 10"):
        run.train(tiny(max_steps=30, save_every=10, log_every=5), workdir, log=lambda s: None)
    manager = ckpt.make_manager(workdir)
    assert manager.all_steps() == [10]
    params, _ = ckpt.restore_params(workdir)
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree_util.tree_leaves(params))


def _one_step_params(mesh, mode, min_bytes=1024):
    config = tiny()
    model = dit_from_config(config.model, 3)
    tx, schedule = trainer.make_optimizer(config.optim, 10)
    init = lambda k: trainer.init_state(model, tx, k, (1, 16, 16, 3))  # noqa: E731
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shard = parallel.state_shardings(abstract, mesh, mode, min_bytes)
    state = jax.jit(init, out_shardings=shard)(jax.random.PRNGKey(0))
    dsh = parallel.data_sharding(mesh)
    step = jax.jit(trainer.make_train_step(model, tx, schedule, config.model, 0.9, 0),
                   in_shardings=(shard, dsh, dsh), out_shardings=(shard, parallel.replicated(mesh)))
    x = next(data_lib.synthetic_batches(16, 16, 3, seed=1))
    y = np.zeros(16, np.int32)
    for _ in range(2):
        first = state
        state, info = step(state, parallel.global_batch(mesh, x), parallel.global_batch(mesh, y))
    return state, first   # after 2 steps, after 1


def test_dp_and_fsdp_on_8_devices_equal_one_device():
    assert jax.device_count() > 1
    one, one_first = _one_step_params(parallel.make_mesh(jax.devices()[:1]), "dp")
    dp, _ = _one_step_params(parallel.make_mesh(), "dp")
    fsdp, _ = _one_step_params(parallel.make_mesh(), "fsdp")
    sharded = [leaf for leaf in jax.tree_util.tree_leaves(fsdp.params) if not leaf.sharding.is_fully_replicated]
    assert len(sharded) > 5  # fsdp really shards the larger kernels
    # a step: the bootstrap targets (2 DiT evaluations, ~44 layers), the DiT forward and back (~44)
    kw = dict(lr=tiny().optim.lr, steps=2, depth=90)
    for other in (dp, fsdp):
        assert_adam_close(other.params, one.params, **kw)
    with pytest.raises(AssertionError):   # one step fewer is far off
        assert_adam_close(dp.params, one_first.params, **kw)


def test_latent_space_training_with_a_vae_and_fid(tmp_path):
    from ldu_jax.metrics import fid
    weights, stats = str(tmp_path / "inception.safetensors"), str(tmp_path / "ref.npz")
    fid.save_weights(weights, fid.init_random(0))
    inception = fid.load_weights(weights)
    ref_images = (np.random.default_rng(0).random((4, 32, 32, 3))).astype(np.float32)
    fid.save_stats(stats, *fid.gaussian_stats(fid.features(inception, ref_images, 4)))
    config = tiny(vae="tiny", image_size=32, max_steps=4, log_every=2, save_every=4, fid_every=4,
                  fid_stats=stats, fid_weights=weights, fid_samples=4, fid_batch=4)
    state = run.train(config, str(tmp_path / "w"), log=lambda s: None)
    params, meta = ckpt.restore_params(str(tmp_path / "w"))
    assert meta["data_shape"] == [4, 4, 4]  # 32 px through a factor-8 VAE with 4 latent channels
    assert params["PatchEmbed_0"]["Conv_0"]["kernel"].shape[2] == 4
    assert Image.open(tmp_path / "w" / "samples" / "step_4_k4.png").size[1] > 32
    assert int(state.step) == 4
    logged = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    fids = [r for r in logged if "fid_1" in r]
    assert [r["step"] for r in fids] == [4] and all(fids[0][f"fid_{k}"] > 0 for k in (1, 4))
    # against the statistics of its own 4-step samples (same seeds), the 4-step FID is ~0
    from ldu_jax import sources
    vae = sources.vae("tiny")
    model = dit_from_config(config.model, 4)
    own = run.generate(config, model, vae, state.params_ema, (4, 4, 4), 4, 4, config.seed + 3)
    f_own = fid.features(inception, (np.clip(own, -1, 1) + 1) / 2, 4)
    scores = run.fid_scores(config, model, vae, state.params_ema, (4, 4, 4),
                            (inception,) + fid.gaussian_stats(f_own))
    assert abs(scores[4]) < 1e-6 * fids[0]["fid_4"] and fids[0]["fid_4"] > 1


def _cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "XLA_FLAGS": ""})


def test_cli_bad_inputs(tmp_path):
    r = _cli(f"--workdir={tmp_path}/w", "--config.model.hiden_size=3")
    assert r.returncode != 0 and "hiden_size" in r.stderr and "Traceback" not in r.stderr
    r = _cli(f"--workdir={tmp_path}/w", f"--config.dataset={tmp_path}/missing")
    assert r.returncode != 0 and f"{tmp_path}/missing" in r.stderr and "Traceback" not in r.stderr
    os.makedirs(tmp_path / "empty")
    r = _cli(f"--workdir={tmp_path}/w", f"--config.dataset={tmp_path}/empty")
    assert r.returncode != 0 and f"{tmp_path}/empty" in r.stderr
    assert not (tmp_path / "w").exists()   # the dataset is checked before the work dir is made


def test_cli_skips_and_reports_bad_files(tmp_path):
    folder = write_faces(str(tmp_path / "data"), n=3)
    (tmp_path / "data" / "zero.png").write_bytes(b"")
    (tmp_path / "data" / "text.jpg").write_text("not an image")
    Image.new("L", (20, 20), 128).save(tmp_path / "data" / "gray.png")
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(tmp_path / "data" / "rgba.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(tmp_path / "data" / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(tmp_path / "data" / "deep.png")
    r = _cli(f"--workdir={tmp_path}/w", f"--config.dataset={folder}", "--config.max_steps=4",
             "--config.batch_size=8", "--config.log_every=2", "--config.sample_steps=(1,)")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "zero.png" in out and "text.jpg" in out
    assert "skipped 2 of 9 files" in out
    for name in ("gray.png", "rgba.png", "cmyk.jpg", "deep.png"):
        assert f"skipped {tmp_path}/data/{name}" not in out
