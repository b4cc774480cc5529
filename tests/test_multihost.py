"""Many hosts on one machine: ``build_world`` (whose stages train the shortcut model and ρ with the
trainers of ``train.py`` and ``perturb.py train``), ``perturb.py apply``, ``attack ti|dreambooth``
and ``evaluate`` started as 2 processes x 4 simulated CPU devices with a
plain coordinator on 127.0.0.1 (gloo collectives) give the result of 1 process x 8 devices with the
same seed: the same global batches, loss curves and final parameters, the same protected files and
one report.csv."""
import contextlib
import csv
import hashlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldu_jax import checkpoint as ckpt
from numerics import assert_adam_close, tiny_unet_offsets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")
    env.pop("LDU_JAX_TEST_DEVICES", None)
    return env


@contextlib.contextmanager
def _every_core():
    """Start the hosts on every core, not on the pytest-xdist worker's share (conftest.py): they
    inherit the starting thread's affinity, and the worker only waits for them."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    share = os.sched_getaffinity(0)
    os.sched_setaffinity(0, range(os.cpu_count()))
    try:
        yield
    finally:
        os.sched_setaffinity(0, share)


def run_processes(argv, n: int, devices: int, timeout: int = 900, rc: int = 0):
    """Start ``n`` processes of ``argv`` (n > 1: with a coordinator on localhost); check that each
    ended with status ``rc``; return their (returncode, stderr, stdout)."""
    port = _free_port()
    procs = []
    with _every_core():
        for i in range(n):
            extra = [] if n == 1 else [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
                                       f"--process_id={i}"]
            if argv[0] == "-m":   # every process writes its programs to the persistent cache
                argv = [os.path.join(ROOT, "tests", "multihost_main.py"), *argv[1:]]
            procs.append(subprocess.Popen([sys.executable, *argv, *extra], cwd=ROOT, env=_env(devices),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        try:
            stdout, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, err, stdout))
    for code, err, _ in out:
        assert code == rc, err[-4000:]
    return out


def one_and_two(args, tmp):
    """Run ``args`` as 1 process x 8 devices in ``tmp/one`` and as 2 x 4 in ``tmp/two`` (--workdir);
    return both work dirs."""
    single, multi = str(tmp / "one"), str(tmp / "two")
    run_processes([*args, f"--workdir={single}"], 1, 8)
    run_processes([*args, f"--workdir={multi}"], 2, 4)
    return single, multi


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_curve(a: dict, b: dict):
    """The same global batches and steps: loss curves equal up to the reductions' float rounding."""
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])


def _inputs(root):
    """7 photos of several sizes and one broken file: batches of 4 (configs/ldu_tiny.py's
    apply_batch) 0 and 1, so with 2 processes each protects one."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(64, 64), (80, 50), (37, 64), (64, 64), (50, 50), (70, 64), (64, 90)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"p{i}.png")
    (root / "p7.png").write_bytes(b"")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}


def _report(out):
    with open(os.path.join(out, "report.csv")) as f:
        return list(csv.DictReader(f))


def test_two_processes_protect_a_folder_as_one(trained_rho, tmp_path):
    """apply split over 2 processes: each protects its batches on its own devices; every file is
    written once, and byte for byte as by 1 process; one report.csv in the input order. The
    output folder holds what a killed run across 3 processes left (a part file, a stale output):
    the rerun replaces them."""
    src = tmp_path / "in"
    before = _inputs(src)
    single, multi = str(tmp_path / "one"), str(tmp_path / "two")
    os.makedirs(multi)
    with open(os.path.join(multi, ".report.part-2-of-3.json"), "w") as f:
        f.write("[]")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(multi, "p0.png"))
    args = ["perturb.py", "apply", "--method=ldu", "--config=configs/ldu_tiny.py", f"--checkpoint={trained_rho[1]}",
            f"--input={src}"]
    run_processes([*args, f"--output={single}"], 1, 8, rc=1)   # 1: p7.png could not be protected
    logs = run_processes([*args, f"--output={multi}"], 2, 4, rc=1)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()} == before
    files = sorted(os.listdir(single))
    assert files == sorted(os.listdir(multi)) == sorted([f"p{i}.png" for i in range(7)] + ["report.csv"])
    for name in files[:-1]:   # the same batches through the same programs: the same bytes
        assert open(os.path.join(single, name), "rb").read() == open(os.path.join(multi, name), "rb").read(), name
    ra, rb = _report(single), _report(multi)
    assert [r["file"] for r in ra] == [r["file"] for r in rb] == [f"p{i}.png" for i in range(8)]
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}
    assert rb[7]["error"] and all(r["budget_ok"] == "true" for r in rb[:7])
    # each process protected its own batch: its log names only its files
    for i, (_, _, log) in enumerate(logs):
        named = {f"p{j}.png" for j in range(7) if f"p{j}.png -> " in log}
        assert named == {f"p{j}.png" for j in range(4 * i, min(4 * i + 4, 7))}, log[-2000:]
        assert f"protected 7 of 8 files into {multi}" in log   # every process returns every row


@pytest.mark.parametrize("command, error", [
    (["perturb.py"], "runs in one process for now"),
    (["perturb.py", "train", "--config=configs/ldu_tiny.py", "--config.dataset=/nonexistent", "--workdir=w"],
     "/nonexistent does not exist"),
    (["train.py", "--config=configs/shortcut_tiny.py", "--config.dataset=/nonexistent", "--workdir=w"],
     "/nonexistent does not exist")], ids=["perturb.py demo", "perturb.py train", "train.py"])
def test_which_commands_start_as_one_of_many(command, error, tmp_path):
    """The demo does not split its work across hosts: started as 2 processes it stops with one line
    on each, instead of two hosts each doing everything. ``perturb.py train`` and ``train.py`` do
    (their training across hosts is compared in test_two_processes_build_the_world_as_one): they
    start, and stop at their input check before loading a model: process 0, which checks it, and
    the other, which waited for it, each in one line."""
    port = _free_port()
    script, *args = command
    args = [a.replace("=configs/", f"={ROOT}/configs/") for a in args]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args,
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                              cwd=tmp_path, env=_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert p.returncode == 1 and "Traceback" not in err, err[-3000:]
        assert len(lines) == 1 and error in lines[0], err[-3000:]
    assert not os.path.exists(tmp_path / "ldu_demo")


_PROCESS0_FAILS = """
import sys
from ldu_jax import parallel
parallel.initialize("on", sys.argv[1], 2, int(sys.argv[2]))
def export():
    raise OSError("disk full")
try:
    parallel.process0_first(export, "export", others=False)
except Exception as e:
    sys.exit(f"{type(e).__name__}: {e}")
"""


def test_when_process0_fails_for_all_the_others_stop_too(tmp_path):
    """Work process 0 does for every host (others=False: an export) fails there: process 0 raises
    its error, and the others, instead of going on to wait at the next barrier, raise one naming it."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS0_FAILS, f"127.0.0.1:{port}", str(i)], cwd=ROOT,
                              env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], errs
    assert errs[0].strip().splitlines()[-1] == "OSError: disk full"
    assert errs[1].strip().splitlines()[-1] == "ProcessFailed: export: process 0 failed (OSError: disk full)"


_PROCESS0_LAST = """
import sys, time
from ldu_jax import parallel
parallel.initialize("on", sys.argv[1], 2, int(sys.argv[2]), shutdown_timeout_s=int(sys.argv[3]))
if sys.argv[2] == "0":
    time.sleep(4)   # process 0's work alone at the end, the others already done
print("finished", flush=True)
"""


@pytest.mark.parametrize("timeout", [20, 1])
def test_process0_finishes_its_work_alone_while_the_others_wait(timeout, tmp_path):
    """Process 0 works alone for 4 s after the others finished (as with an attack's samples). The
    others wait for it at JAX's shutdown barrier: within the timeout (parallel.SHUTDOWN_TIMEOUT_S
    by default, a day; JAX's own default, 300 s, is less than such work can take) both end
    normally; past it JAX aborts both, process 0 before its work is done."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS0_LAST, f"127.0.0.1:{port}", str(i), str(timeout)],
                              cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    out = [p.communicate(timeout=120) for p in procs]
    if timeout > 4:
        assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for _, e in out]
        assert [o.strip() for o, _ in out] == ["finished", "finished"]
    else:
        assert all(p.returncode != 0 for p in procs)
        assert "finished" not in out[0][0] and "Shutdown barrier" in out[0][1], out[0][1][-3000:]


_HOST1_FAILS = """
import sys
import numpy as np
from ldu_jax import parallel
from ldu_jax.protect import io as pio
parallel.initialize("on", sys.argv[1], 2, int(sys.argv[2]))
def protect_batch(x, index):
    if index == 1:   # process 1's batch
        raise MemoryError("out of device memory")
    return x
try:
    pio.protect_folder(sys.argv[3], sys.argv[4], "test", 8, pio.Budget("linf", 1.0), protect_batch, 2,
                       log=lambda s: None, process_index=int(sys.argv[2]), process_count=2,
                       barrier=parallel.sync, every_process=parallel.every_process)
except Exception as e:
    sys.exit(f"{type(e).__name__}: {e}")
"""


def test_when_one_host_fails_its_share_the_others_stop_too(tmp_path):
    """A folder split over 2 processes whose process 1 fails in its own batch: it raises its error,
    and process 0, instead of waiting for process 1's part at the merge barrier (an hour), raises
    one naming it; no report is written."""
    src = _photos(tmp_path / "in")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _HOST1_FAILS, f"127.0.0.1:{port}", str(i), src,
                               str(tmp_path / "out")], cwd=ROOT, env=_env(1), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], errs
    assert errs[1].strip().splitlines()[-1] == "MemoryError: out of device memory"
    assert errs[0].strip().splitlines()[-1] == ("ProcessFailed: protect_folder: batches: process 1 failed "
                                                "(MemoryError: out of device memory)")
    assert sorted(os.listdir(tmp_path / "out")) == ["0.png", "1.png"]   # process 0's batch, no report


def _tree_digest(root):
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, names in os.walk(root) for f in names}


def test_two_processes_build_the_world_as_one(test_world, tmp_path, monkeypatch):
    """build_world's every stage (the 'test' profile: 8 training images; the identity model on
    global batches of 8 portraits + 8 non-faces, 4 steps; a VAE of global batch 8, here trained 6
    steps; the t2i model on global batches of 8, here 4 steps; the shortcut model, 4 steps of 8, and
    ρ, 2 steps of 8, on the training images; the export) as 2 processes x 4 devices and as 1 x 8:
    process 0 writes the same data files and tokenizer; each host renders or reads its rows of the
    same global batches, so the loss curves and the final parameters agree; one manifest, one VAE
    folder, one t2i bundle and one export, written by process 0. The shortcut and ρ stages are the
    trainers of ``train.py`` and ``perturb.py train``: this is their test across hosts too.

    ρ trains without the uint8 rounding of x' (``quantize``): its straight-through rounding is a
    step function, so where the two runs' x' differ by an ulp next to a rounding boundary a pixel
    moves by 1/255, and the next gradients by far more than rounding. Measured (AMD EPYC, the tiny
    models, 4 steps): with it, 1 x 8 and 2 x 4 differ at the 99th percentile by 180x the tolerance
    (1 x 8 and 1 x 4: 6x); without it, by 0.25x (0.21x). The rounding is elementwise, the same on
    any number of hosts; what this compares is the gradients' reduction across hosts.

    With XLA's convs: as taps (sd/conv.py, CPU's default) the two layouts' VAE and t2i conv kernels
    measured (AMD EPYC) 1.1e-6 and 1.7e-6 apart at the 99th percentile after their steps, 18-28x
    XLA's (6.7e-8, 6.2e-8), with the loss curves equal to 1e-4 and every entry within the Adam
    bound; each layout alone is bit-reproducible at any thread count, and one sharded taps conv's
    kernel gradient regroups no worse than XLA's across the two layouts. Not traced further; taps
    across processes are held to the Adam tolerance in test_two_processes_run_an_attack_as_one."""
    monkeypatch.setenv("LDU_JAX_SD_CONV", "xla")
    single, _, _, settings = test_world   # 1 x 8: built in the tests' process (conftest.py)
    multi = str(tmp_path / "two")
    run_processes(["-m", "ldu_jax.cli.build_world", "--profile=test", *(f"--set={s}" for s in settings),
                   f"--workdir={multi}"], 2, 4)
    for folder in ("data", os.path.join("t2i", "tokenizer")):
        assert _tree_digest(os.path.join(single, folder)) == _tree_digest(os.path.join(multi, folder)), folder
    manifests = [json.load(open(os.path.join(w, "manifest.json"))) for w in (single, multi)]
    for m in manifests:
        assert sorted(m) == ["data", "export", "identity", "rho", "shortcut", "t2i", "vae"]
        assert all(s["done"] for s in m.values())
    # process 0 measured both models (not split across hosts) on parameters equal up to rounding
    assert_same_curve(manifests[0]["t2i"]["text_use"], manifests[1]["t2i"]["text_use"])
    ism = [{k: m["identity"]["eval"][k] for k in ("ism_same", "ism_other")} for m in manifests]
    assert_same_curve(*ism)
    for stage in ("identity", "vae", "t2i"):
        a, b = _losses(os.path.join(single, stage)), _losses(os.path.join(multi, stage))
        assert sorted(a) == sorted(b) == ([2, 4, 6] if stage == "vae" else [2, 4]), stage
        assert len({round(v, 4) for v in a.values()}) == len(a), stage   # the batches and models change
        assert_same_curve(a, b)
    for stage, rows in (("identity", 2), ("t2i", 2), ("shortcut", 2), ("rho", 2)):   # process 0 alone wrote the logs
        assert len(open(os.path.join(multi, stage, "metrics.jsonl")).readlines()) == rows, stage
    assert sorted(os.listdir(os.path.join(single, "t2i", "sd"))) == sorted(os.listdir(os.path.join(multi, "t2i", "sd")))
    pa, pb = (ckpt.restore_state(os.path.join(w, "vae"))[0]["params"] for w in (single, multi))
    # 6 AdamW steps (configs/miniworld_vae.py:test, lr 3e-3) of the VAE's loss, forward and
    # backward through the encoder and decoder (~100 layers), gradients reduced in another grouping
    assert_adam_close(pb, pa, lr=3e-3, steps=6, depth=100)
    sa, sb = (json.load(open(os.path.join(w, "vae", "vae", "config.json")))["scaling_factor"] for w in (single, multi))
    assert abs(sa - sb) <= 1e-3 * sa, (sa, sb)
    ia, ib = (ckpt.restore_state(os.path.join(w, "identity"))[0]["params"] for w in (single, multi))
    # 4 AdamW steps (configs/miniworld_identity.py:test, lr 2e-3) forward and backward through the
    # identity net (2 x 14 layers) and its cosine-softmax head; each update is added to weights of
    # up to ~0.5, whose own rounding (an ulp, 3e-8) the tolerance must hold as well: depth 64. The
    # face / no-face head's gradients are the portraits' half of the batch minus the non-faces' half,
    # which here are the two hosts' shares: they cancel, and at the 99th percentile the head differs
    # by 2.8x the tolerance (AMD EPYC; the rest by under 0.1x); held to the bound alone
    assert_adam_close(ib, ia, lr=2e-3, steps=4, depth=64, cancelling=lambda k: "['face" in k, max_share=0.2)
    ta, tb = (ckpt.restore_state(os.path.join(w, "t2i"))[0] for w in (single, multi))
    for key in ("params", "params_ema"):
        # 4 AdamW steps (configs/miniworld_t2i.py:test, lr 1e-3) on latents of the VAE's encoder
        # (~15 layers), forward and backward through the UNet (~2 x 90 layers): depth 200. The
        # timestep embedding's path (time_embedding, each resnet's time_emb_proj) adds a per-channel
        # offset that the next GroupNorm removes exactly (32 channels, 32 groups), so its gradients
        # are rounding noise, which Adam makes steps of +-lr: 98% of its entries differ by more than
        # the rest's tolerance (1 process x 4 devices against 8 as well); held to the bound alone
        assert_adam_close(tb[key], ta[key], lr=1e-3, steps=4, depth=200, cancelling=lambda k: "time_emb" in k,
                          max_share=0.15)
    for stage, steps in (("shortcut", [2, 4]), ("rho", [1, 2])):
        a, b = _losses(os.path.join(single, stage)), _losses(os.path.join(multi, stage))
        assert sorted(a) == sorted(b) == steps, stage
        assert_same_curve(a, b)
    # the export: what process 0 wrote, from the checkpoints every host saved
    assert sorted(os.listdir(os.path.join(multi, "export"))) == ["identity", "manifest.json", "rho", "sd", "shortcut"]
    assert _tree_digest(os.path.join(single, "export", "sd", "tokenizer")) == \
        _tree_digest(os.path.join(multi, "export", "sd", "tokenizer"))
    sa, sb = (ckpt.restore_params(os.path.join(w, "export", "shortcut"))[0] for w in (single, multi))
    # 4 AdamW steps (configs/miniworld_shortcut.py:test, lr 6e-4) through the DiT (~20 layers) on
    # the VAE's latents (~15), after the VAE's own difference; EMA weights: depth 60
    assert_adam_close(sb, sa, lr=6e-4, steps=4, depth=60)
    ra, rb = (ckpt.restore_state(os.path.join(w, "export", "rho"))[0]["rho"] for w in (single, multi))
    # 2 AdamW steps of ρ through the pipeline (~250 layers) and ρ (14), forward and backward, as
    # tests/test_ldu.py compares ρ's step on 8 devices with 1: depth 530
    assert_adam_close(rb, ra, lr=1e-3, steps=2, depth=530)
    for w in (single, multi):   # and the last grid, once
        assert os.listdir(os.path.join(w, "rho", "grids")) == ["step_2.png"]


def _photos(root, n=4):
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return str(root)


def _pngs(root):
    return {os.path.relpath(os.path.join(d, f), root): np.asarray(Image.open(os.path.join(d, f)), np.float32)
            for d, _, names in os.walk(root) for f in names if f.endswith(".png")}


@pytest.mark.parametrize("kind", ["ti", "dreambooth"])
def test_two_processes_run_an_attack_as_one(kind, tmp_path):
    """``attack ti`` / ``attack dreambooth`` (tiny model, global batch 8, 4 steps; DreamBooth with
    prior preservation) as 2 processes x 4 devices and as 1 x 8: each step runs over every host's
    devices, so the loss curves and the learned embedding / UNet agree; process 0 generates the
    class images and the samples and writes them once."""
    photos = _photos(tmp_path / "photos")
    cfg = {"ti": "configs/attack_ti_tiny.py", "dreambooth": "configs/attack_db_tiny.py"}[kind]
    args = ["-m", "ldu_jax.cli.attack", kind, f"--config={cfg}", f"--images={photos}", "--config.max_steps=4",
            "--config.log_every=2", "--config.save_every=4"]
    single, multi = one_and_two(args, tmp_path)
    a, b = _losses(single), _losses(multi)
    assert sorted(a) == sorted(b) == [2, 4] and a[2] != a[4]
    assert_same_curve(a, b)
    for w in (single, multi):   # process 0 alone wrote the log
        assert len(open(os.path.join(w, "metrics.jsonl")).readlines()) == 2
    sa, sb = _pngs(os.path.join(single, "samples")), _pngs(os.path.join(multi, "samples"))
    assert sorted(sa) == sorted(sb) and len(sa) == 4   # 2 prompts x 2 samples
    if kind == "ti":
        from ldu_jax.personalize import textual_inversion as ti
        ea, eb = (ti.load_learned_embeds(os.path.join(w, "learned_embeds.safetensors"))["<person>"]
                  for w in (single, multi))
        # 4 AdamW steps (lr 5e-3) of one embedding row, its gradient through the text encoder
        # (~10 layers) and the UNet (~90), forward and backward
        assert_adam_close(eb, ea, lr=5e-3, steps=4, depth=200)
    else:
        ca, cb = (_pngs(os.path.join(w, "class_images")) for w in (single, multi))
        assert len(ca) == 8 and sorted(ca) == sorted(cb)
        assert all(np.array_equal(ca[k], cb[k]) for k in ca)   # one program on process 0's device in both
        ua, ub = (ckpt.restore_state(w)[0]["trainable"]["unet"] for w in (single, multi))
        # 4 AdamW steps (lr 1e-3), forward and backward through the UNet (~2 x 90 layers)
        assert_adam_close(ub, ua, lr=1e-3, steps=4, depth=200, cancelling=tiny_unet_offsets)
        assert os.path.isfile(os.path.join(multi, "model", "model_index.json"))
    # samples of (almost) the same models from the same noise: within a grey level or two
    assert max(float(np.abs(sa[k] - sb[k]).mean()) for k in sa) < 2.0


def test_two_processes_evaluate_as_one(tmp_path):
    """The evaluation (2 demo subjects x {none, PhotoGuard} x {none, JPEG 75} x TI, both subjects'
    attacks in one program) as 2 processes x 4 devices and as 1 x 8: process 0 writes the subjects,
    the hosts split each folder's protection, process 0 purifies, every step of the attacks runs
    over both hosts, process 0 measures and writes the cells and the table: the same protected and
    purified files, the same rows."""
    args = ["-m", "ldu_jax.cli.evaluate", "--config=configs/eval_tiny.py", "--config.data=demo:2",
            "--config.methods=('none', 'photoguard')", "--config.settings=('none', 'jpeg:quality=75')",
            "--config.attacks=('ti',)", "--config.attack_overrides.ti.max_steps=2",
            "--config.num_samples=2", "--config.subject_batch=2"]
    single, multi = one_and_two(args, tmp_path)
    for folder in ("subjects", os.path.join("cells", "subject_1", "photoguard", "protected"),
                   os.path.join("cells", "subject_0", "photoguard", "jpeg_quality=75", "images")):
        da, db = ({k: v for k, v in _tree_digest(os.path.join(w, folder)).items() if k.endswith(".png")}
                  for w in (single, multi))   # report.csv holds seconds
        assert da and da == db, folder
    ra, rb = (list(csv.DictReader(open(os.path.join(w, "results.csv")))) for w in (single, multi))
    assert len(ra) == len(rb) == 8 and all(r["status"] == "done" for r in ra + rb)
    for x, y in zip(ra, rb):
        for k in x:
            if k in ("seconds", "time", "protect_s_per_image"):   # clock times
                continue
            try:
                a, b = float(x[k]), float(y[k])
            except ValueError:
                assert x[k] == y[k], k
                continue
            # 2 TI steps trained over 8 devices in two groupings: samples within rounding
            assert a == b or abs(a - b) <= 1e-3 * max(abs(a), 1.0), (k, a, b)
