"""Purifications: each changes an image the way it should, DiffPure at strength 0 is identity."""
import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ldu_jax import errors, purify, sources
from ldu_jax.sd import schedule as sch
from numerics import assert_f32_close


@pytest.fixture(scope="module")
def photo():
    """A natural photo (scikit-image's astronaut), 96x80."""
    from skimage import data
    return np.asarray(Image.fromarray(data.astronaut()).resize((80, 96), Image.BICUBIC))


def _psnr(a, b):
    return 10 * np.log10(255.0 ** 2 / np.mean((a.astype(float) - b.astype(float)) ** 2))


def _high_freq_energy(img):
    f = np.abs(np.fft.fftshift(np.fft.fft2(img.astype(float).mean(-1) - img.mean())))
    h, w = f.shape
    yy, xx = np.mgrid[0:h, 0:w]
    return f[np.hypot(yy - h / 2, xx - w / 2) > min(h, w) / 4].sum()


def test_parse_names_settings_and_rejects_unknown_keys():
    s = purify.parse("jpeg:quality=50")
    assert s.name == "jpeg" and s.kw() == {"quality": 50} and str(s) == "jpeg:quality=50"
    assert purify.parse("diffpure").kw()["strength"] == 0.1
    with pytest.raises(errors.ConfigError, match="qualty"):
        purify.parse("jpeg:qualty=50")
    with pytest.raises(ValueError, match="unknown purification 'jpg'"):
        purify.parse("jpg")
    with pytest.raises(ValueError, match="needs diffusion models"):
        purify.make("diffpure")


def test_jpeg_is_a_real_round_trip(photo):
    (q75,) = purify.jpeg([photo], 75)
    (q10,) = purify.jpeg([photo], 10)
    assert q75.shape == photo.shape and q75.dtype == np.uint8
    assert 24 < _psnr(photo, q75) < 60 and _psnr(photo, q10) < _psnr(photo, q75)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=75)
    buf.seek(0)
    np.testing.assert_array_equal(q75, np.asarray(Image.open(buf).convert("RGB")))  # libjpeg's own decode
    png = io.BytesIO()
    Image.fromarray(photo).save(png, format="PNG")
    assert buf.getbuffer().nbytes < png.getbuffer().nbytes


def test_blur_noise_resize(photo):
    (b,) = purify.blur([photo], 1.5)
    assert b.shape == photo.shape and _high_freq_energy(b) < 0.5 * _high_freq_energy(photo)
    flat = np.full((20, 20, 3), 77, np.uint8)
    np.testing.assert_array_equal(purify.blur([flat], 2.0)[0], flat)
    (n,) = purify.noise([flat], 0.05, seed=1)
    assert abs((n.astype(float) - 77).std() - 0.05 * 255) < 0.6
    np.testing.assert_array_equal(n, purify.noise([flat], 0.05, seed=1)[0])
    (r,) = purify.resize([photo], 0.5)
    assert r.shape == photo.shape and _high_freq_energy(r) < _high_freq_energy(photo)
    checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    assert np.abs(purify.resize([checker], 0.5)[0].astype(float) - checker).mean() > 60  # detail lost
    assert purify.make("none")([photo])[0] is not photo


@pytest.fixture(scope="module")
def models():
    return sources.diffusion_models("tiny", "random")


def test_ddim_from_strength_zero_is_identity_in_latent_space():
    s = sch.make_schedule(sch.SD_SCHEDULER)
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 4))
    ts = sch.diffpure_timesteps(s.num_train_timesteps, 0.0, 5)
    assert (np.asarray(ts) == 0).all()
    wild = lambda p, x, t, e: jnp.sin(x) * 3 + t[:, None, None, None]  # noqa: E731 - any predictor
    out = sch.ddim_from(wild, None, s, z, ts, jnp.zeros((2, 1, 1)), jnp.zeros((2, 1, 1)))
    assert_f32_close(out, z, depth=len(ts) * 4)   # to x0 and back: ~4 operations a step
    ts = np.asarray(sch.diffpure_timesteps(s.num_train_timesteps, 0.5, 5))
    assert ts[0] == 500 and ts[-1] == 0 and (np.diff(ts) < 0).all()


def test_diffpure_and_gridpure_on_tiny_models(models, photo):
    assert purify.diffpure([photo], models, strength=0.0)[0].tolist() == photo.tolist()
    out = purify.make("diffpure:strength=0.3,steps=3", models)([photo, photo[:64]])
    assert [o.shape for o in out] == [photo.shape, photo[:64].shape]
    assert not np.array_equal(out[0], photo)
    again = purify.make("diffpure:strength=0.3,steps=3", models)([photo])
    np.testing.assert_array_equal(again[0], out[0])  # seeded
    strong = purify.make("diffpure:strength=0.9,steps=3", models)([photo])[0]
    assert not np.array_equal(strong, out[0])
    sc = purify.make("diffpure:strength=0.25,model=shortcut", models)([photo])[0]
    assert sc.shape == photo.shape and np.isfinite(sc).all()
    (g,) = purify.make("gridpure:strength=0.3,steps=3", models)([photo])
    assert g.shape == photo.shape and not np.array_equal(g, photo)


def test_purify_folder_writes_pngs_and_keeps_inputs(tmp_path, photo):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo).save(src / "a.jpg", quality=95)
    (src / "broken.png").write_bytes(b"not an image")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    logs = []
    names = purify.purify_folder("jpeg:quality=30", str(src), str(tmp_path / "out"), log=logs.append)
    assert names == ["a.png"] and "broken.png" in " ".join(logs)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    with Image.open(tmp_path / "out" / "a.png") as im:
        assert im.size == (80, 96)
    with pytest.raises(ValueError, match="must differ"):
        purify.purify_folder("none", str(src), str(src))
    with pytest.raises(errors.MissingError, match="does not exist"):
        purify.purify_folder("none", str(tmp_path / "nope"), str(tmp_path / "out"))


def _run_purify(*args):
    """``python -m ldu_jax.cli.purify ARGS`` in a fresh process, sharing the suite's compilation cache."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "LDU_JAX_COMPILE_CACHE": jax.config.jax_compilation_cache_dir or ""}
    return subprocess.run([sys.executable, "-m", "ldu_jax.cli.purify", *map(str, args)], cwd=root, env=env,
                          capture_output=True, text=True)


def test_purify_command_writes_a_folder_and_reports_user_errors_in_one_line(tmp_path, photo):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(photo).save(src / "a.png")
    r = _run_purify("--setting=jpeg:quality=30", f"--input={src}", f"--output={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == f"jpeg:quality=30: wrote 1 images to {out}" and os.listdir(out) == ["a.png"]
    for args, message in [((f"--input={tmp_path / 'nope'}", "--setting=blur"),
                           f"input folder {tmp_path / 'nope'} does not exist"),
                          ((f"--input={src}", "--setting=jpg:quality=30"),
                           "unknown purification 'jpg'; one of none, jpeg, blur, noise, resize, diffpure, gridpure")]:
        r = _run_purify(*args, f"--output={out}")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert r.stderr.strip().splitlines()[-1] == f"error: {message}"
