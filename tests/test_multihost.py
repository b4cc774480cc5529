"""Many hosts on one machine: ``train.py`` started as 2 processes x 4 simulated CPU devices with a
plain coordinator on 127.0.0.1 (gloo collectives) gives the result of 1 process x 8 devices with
the same seed: the same global batches, loss curve and final parameters."""
import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from ldu_jax import checkpoint as ckpt
from numerics import assert_adam_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")
    env.pop("LDU_JAX_TEST_DEVICES", None)
    return env


def run_processes(argv, n: int, devices: int, timeout: int = 900):
    """Start ``n`` processes of ``argv`` (n > 1: with a coordinator on localhost); return their
    (returncode, stderr) once all have ended."""
    port = _free_port()
    procs = []
    for i in range(n):
        extra = [] if n == 1 else [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
                                   f"--process_id={i}"]
        procs.append(subprocess.Popen([sys.executable, *argv, *extra], cwd=ROOT, env=_env(devices),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, err))
    for rc, err in out:
        assert rc == 0, err[-4000:]
    return out


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def shortcut_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    args = ["train.py", "--config=configs/shortcut_tiny.py", "--config.max_steps=6", "--config.log_every=2",
            "--config.save_every=6", "--config.batch_size=16", "--config.sample_every=0", "--config.num_samples=0"]
    single, multi = str(tmp / "one"), str(tmp / "two")
    run_processes([*args, f"--workdir={single}"], 1, 8)
    run_processes([*args, f"--workdir={multi}"], 2, 4)
    return single, multi


def test_two_processes_train_the_shortcut_model_as_one(shortcut_runs):
    single, multi = shortcut_runs
    a, b = _losses(single), _losses(multi)
    assert sorted(a) == sorted(b) == [2, 4, 6]
    # the same global batches and steps: the loss curves agree to float rounding of the reductions
    # (other batches give losses 10% apart: the synthetic images' waves differ per draw)
    assert len({round(v, 4) for v in a.values()}) == 3
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    pa, _ = ckpt.restore_params(single, ema=False)
    pb, _ = ckpt.restore_params(multi, ema=False)
    assert jax.tree_util.tree_structure(pa) == jax.tree_util.tree_structure(pb)
    # 6 AdamW steps (configs/shortcut_tiny.py: lr 1e-3) from the same initial weights, gradients
    # reduced over 8 devices in another grouping: the DiT's forward and backward, ~60 layers deep
    assert_adam_close(pb, pa, lr=1e-3, steps=6, depth=60)


def test_a_single_process_command_refuses_to_run_as_one_of_many(tmp_path):
    """perturb.py does not split its work across hosts yet: started as 2 processes it stops with one
    line on each, instead of two hosts each protecting (or training on) everything."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "perturb.py", "apply", "--method=ldu-opt",
                               "--config=configs/ldu_tiny.py", f"--input={tmp_path}/in", f"--output={tmp_path}/out",
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                              cwd=ROOT, env=_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert p.returncode == 1 and "Traceback" not in err, err[-3000:]
        assert len(lines) == 1 and "runs in one process for now" in lines[0]
    assert not os.path.exists(tmp_path / "out")
