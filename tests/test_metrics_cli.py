"""PSNR/SSIM against scikit-image on natural and random images; the metrics command line."""
import csv
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ldu_jax import errors
from ldu_jax.metrics import folders
from ldu_jax.metrics import image as metrics
from numerics import assert_f32_close

skd = pytest.importorskip("skimage.data")
skm = pytest.importorskip("skimage.metrics")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_command(*args, cwd=None):
    """``python -m ldu_jax.cli.metrics ARGS`` in a fresh process (absl flags are process-global),
    sharing the suite's compilation cache."""
    env = {**os.environ, "PYTHONPATH": ROOT, "LDU_JAX_COMPILE_CACHE": jax.config.jax_compilation_cache_dir or ""}
    return subprocess.run([sys.executable, "-m", "ldu_jax.cli.metrics", *map(str, args)], cwd=cwd or ROOT,
                          env=env, capture_output=True, text=True)


@pytest.mark.parametrize("kind", ["natural", "random"])
def test_psnr_ssim_agree_with_skimage(kind):
    rng = np.random.default_rng(1)
    a = skd.astronaut()[100:228, 150:278] if kind == "natural" else rng.integers(0, 256, (64, 72, 3), np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
    x, y = a / 255.0, b / 255.0
    want = skm.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=1, channel_axis=-1)
    # float32 against float64: SSIM's blurs and map (~30 operations) on values <= 1; PSNR as the
    # mean square it encodes (a pairwise sum of ~2^16 terms: ~16 roundings deep, and the square)
    assert_f32_close(metrics.ssim(x, y), want, depth=30, scale=1)
    mse = lambda p: 10 ** (-p / 10)  # noqa: E731
    assert_f32_close(mse(metrics.psnr(x, y)), mse(skm.peak_signal_noise_ratio(x, y, data_range=1)), depth=18)


def test_metrics_command_pairs_by_stem_and_writes_csv(tmp_path):
    ref, imgs = tmp_path / "ref", tmp_path / "imgs"
    ref.mkdir()
    imgs.mkdir()
    face = np.asarray(Image.fromarray(skd.astronaut()).resize((256, 256)))
    noisy = np.clip(face.astype(int) + np.random.default_rng(0).integers(-4, 5, face.shape), 0, 255).astype(np.uint8)
    Image.fromarray(face).save(ref / "a.png")
    Image.fromarray(face[:, ::-1]).save(ref / "b.png")
    Image.fromarray(noisy).save(imgs / "a.png")
    Image.fromarray(skd.coffee()).save(imgs / "c.jpg")  # no reference of that stem; no face either
    out = tmp_path / "m.csv"
    r = run_command(f"--reference={ref}", f"--images={imgs}", "--face", "--brisque", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.reader(open(out)))
    assert rows[0] == list(folders.PAIR_COLUMNS)
    by = {r[0]: r for r in rows[1:]}
    want = metrics.psnr(face / 255.0, noisy / 255.0)
    assert float(by["a"][1]) == pytest.approx(want, abs=1e-3) and "c" not in by
    assert float(by["fdfr"][1]) == pytest.approx(0.5)  # the coffee photo has no face
    assert float(by["ism"][1]) > 0.9 and float(by["brisque"][1]) > 0
    assert "without a reference" in r.stderr and f"wrote {out}" in r.stdout
    assert "mean" in r.stdout and "fdfr: 0.5000" in r.stdout   # the table


def test_metrics_command_reports_a_missing_folder_in_one_line(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(imgs / "a.png")
    r = run_command(f"--reference={tmp_path / 'none'}", f"--images={imgs}", f"--out={tmp_path / 'm.csv'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: folder {tmp_path / 'none'} does not exist"
    assert not (tmp_path / "m.csv").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.MissingError, match="no image files"):   # an empty folder
        folders.read_folder(str(tmp_path / "empty"))


def test_default_config_of_a_command_loads_from_any_directory(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("from absl import flags; from ldu_jax import cli; "
            "cli.define_config('config', 'configs/ldu_miniworld.py', 'h'); flags.FLAGS(['x']); "
            "print(flags.FLAGS.config.resolution)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0 and out.stdout.split()[-1] == "64", out.stderr[-2000:]
