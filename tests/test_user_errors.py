"""User errors end a command in one line, bugs keep their traceback (ldu_jax/errors.py, ``cli.run``):
each command runs as a user runs it, in a subprocess from the repository root, and its stderr must
hold exactly one ``error:`` line naming the path or key to fix, no traceback, and exit status 1."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldu_jax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one CPU device, no compilation cache: these commands stop before any real computation
ENV = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "", "LDU_JAX_COMPILE_CACHE": ""}


def _run(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def _one_error_line(r, *names) -> str:
    """The run's one ``error:`` line, after checking status 1, no traceback, and that it names ``names``."""
    lines = [s for s in r.stderr.splitlines() if s.startswith("error:")]
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1, r.stderr[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _images(folder, n=2):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return str(folder)


def test_perturb_apply_with_a_missing_input_folder(tmp_path):
    missing = tmp_path / "no_photos"
    r = _run("perturb.py", "apply", "--method=ldu-opt", "--config=configs/ldu_tiny.py", f"--input={missing}",
             f"--output={tmp_path}/out")
    _one_error_line(r, str(missing), "does not exist")


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_perturb_apply_with_a_bad_sd_folder(tmp_path, kind):
    sd = tmp_path / "sd"
    if kind == "empty":   # a folder without the SD parts
        sd.mkdir()
    r = _run("perturb.py", "apply", "--method=ldu-opt", "--config=configs/ldu_tiny.py", f"--config.sd={sd}",
             f"--input={_images(tmp_path / 'photos')}", f"--output={tmp_path}/out")
    line = _one_error_line(r, str(sd))
    assert ("does not exist" if kind == "missing" else "SD folder lacks") in line


def test_train_with_an_unknown_config_key(tmp_path):
    r = _run("train.py", f"--workdir={tmp_path}/w", "--config.model.hiden_size=3")
    _one_error_line(r, "hiden_size")


def test_attack_on_an_sd_folder_with_an_unsupported_config_value(tmp_path):
    from ldu_jax.sd import models as sdm
    folder = str(tmp_path / "sd")
    sdm.save_sd(*sdm.tiny_sd(), folder)
    path = os.path.join(folder, "unet", "config.json")
    with open(path) as f:
        cfg = json.load(f)
    with open(path, "w") as f:
        json.dump({**cfg, "resnet_time_scale_shift": "scale_shift"}, f)
    r = _run("-m", "ldu_jax.cli.attack", "ti", "--config=configs/attack_ti_tiny.py", f"--config.model={folder}",
             f"--images={_images(tmp_path / 'photos')}", f"--workdir={tmp_path}/w")
    _one_error_line(r, path, "resnet_time_scale_shift='scale_shift' is not supported")


def _main_raising(exc: str):
    return ("from ldu_jax import cli, errors\n"
            "def main(argv):\n"
            f"    raise {exc}\n"
            "cli.run(main)\n")


def test_a_bug_keeps_its_traceback():
    r = _run("-c", _main_raising("ValueError('an internal invariant broke')"))
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "ValueError: an internal invariant broke" in r.stderr, r.stderr[-3000:]
    assert not [s for s in r.stderr.splitlines() if s.startswith("error:")]


@pytest.mark.parametrize("exc, line", [
    ("errors.ConfigError('config.x: bad')", "error: config.x: bad"),
    ("errors.MissingKeyError('checkpoint in w has no rho')", "error: checkpoint in w has no rho"),   # not quoted
])
def test_a_user_error_raised_by_main_is_one_line(exc, line):
    r = _run("-c", _main_raising(exc))
    assert _one_error_line(r) == line


def test_every_user_error_is_also_the_builtin_callers_expect():
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.FileFormatError, ValueError)
    assert issubclass(errors.MissingError, FileNotFoundError)
    assert issubclass(errors.RefusedError, PermissionError) and issubclass(errors.RefusedError, ValueError)
    assert issubclass(errors.MissingKeyError, KeyError)
    for cls in (errors.ConfigError, errors.MissingError, errors.FileFormatError, errors.RefusedError,
                errors.MissingKeyError):
        assert issubclass(cls, errors.UserError)
    from ldu_jax.jobs import import_shortcut
    assert import_shortcut.PickleRefusedError is errors.RefusedError
