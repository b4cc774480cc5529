"""Pixel-space baselines (AdvDM, ASPL, FSMG, PhotoGuard, Mist, SDS+/-, PID) on the tiny SD bundle.

Each method is traced and compiled once per module (same shapes everywhere); the methods whose
PGD step differentiates through the UNet compile at XLA optimisation level 0 (compilation is most
of this file's time on a CPU; the numbers are the same programs). The tiny configs draw a fresh
(latent, t, noise) sample each step in production; here ``resample_draws=False`` fixes the draws,
so each objective is one deterministic function and its trace must move in the method's direction.
"""
import csv
import hashlib
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ldu_jax import parallel, sources
from ldu_jax.protect import baselines as bl
from ldu_jax.protect import io as pio
from ldu_jax.jobs import protect as prun
from ldu_jax.sd import models as sdm
from numerics import assert_f32_close

HEAVY = {"advdm", "mist", "aspl", "fsmg"}   # UNet backward in the PGD step: compile at -O0


def tiny_cfg(method, **kw):
    c = importlib.import_module(f"configs.protect_{bl.config_name(method)}_tiny").get_config()
    c.update(kw)
    return c


def compiled(fn, *args, fast_compile=True):
    traced = jax.jit(fn).trace(*args)
    opts = {"xla_backend_optimization_level": 0} if fast_compile else None
    return traced.jaxpr, traced.lower().compile(opts)


@pytest.fixture(scope="module")
def tiny():
    sd, params = sources.sd("tiny")
    rng = np.random.default_rng(0)
    u8 = rng.integers(10, 245, (2, sd.resolution, sd.resolution, 3))
    x = jnp.asarray((u8 / 127.5 - 1).astype(np.float32))   # on the uint8 grid, like decoded files
    return sd, params, x


_RUNS = {}


def run_method(tiny, method):
    """(config, params, x_adv, info, jaxpr) of one compiled run, cached for the module."""
    if method not in _RUNS:
        sd, p, x = tiny
        c = tiny_cfg(method, resample_draws=False)
        params = bl.prepare(method, sd, p, c, sd.resolution)
        key = jax.random.PRNGKey(0)
        if method in ("sds", "sds-"):  # one program for both: the direction is an argument
            if "sds-program" not in _RUNS:
                _RUNS["sds-program"] = compiled(lambda p, x, k, d: bl.sds(sd, p, x, k, c, d), params, x, key,
                                                jnp.float32(1))
            jaxpr, fn = _RUNS["sds-program"]
            x_adv, info = fn(params, x, key, jnp.float32(bl.DIRECTION[method]))
        else:
            jaxpr, fn = compiled(lambda p, x, k: bl.protect(method, sd, p, x, k, c), params, x, key,
                                 fast_compile=method in HEAVY)
            x_adv, info = fn(params, x, key)
        _RUNS[method] = (c, params, x_adv, info, jaxpr)
    return _RUNS[method]


@pytest.mark.parametrize("method", bl.METHODS)
def test_linf_bound_and_objective_direction(tiny, method):
    x = tiny[2]
    c, _, x_adv, info, _ = run_method(tiny, method)
    d = np.abs(np.asarray(x_adv) - np.asarray(x))
    assert d.max() <= 2 * c.eps + 1e-6 and np.abs(np.asarray(x_adv)).max() <= 1.0
    assert d.max() > c.eps  # it used the budget
    # the uint8 result the folder path writes: within eps exactly, without scaling back
    budget = pio.Budget("linf", c.eps)
    for xi, yi in zip(np.asarray(x), np.asarray(x_adv)):
        orig = np.rint((xi + 1) * 127.5).astype(np.uint8)
        out, scaled = pio.apply_perturbation(orig, xi, yi, budget)
        assert not scaled["scaled"] and budget.ok(orig, out)
        assert np.abs(out.astype(int) - orig.astype(int)).max() <= round(c.eps * 255)
    trace = np.asarray(info["trace"]).reshape(-1, c.steps)  # aspl: one row per round
    moved = (trace[:, -1] - trace[:, 0]) * bl.DIRECTION[method]
    assert (moved > 0).all(), (method, trace)


@pytest.mark.parametrize("method", bl.METHODS)
def test_pgd_is_one_loop(tiny, method):
    """The PGD steps are one loop in the program (not unrolled): the top level holds one loop of
    ``steps`` iterations (fsmg: the surrogate's training loop, then that; aspl: one loop over
    rounds, which holds one surrogate training loop and the PGD loop)."""
    c, _, _, _, jaxpr = run_method(tiny, method)
    loops = [e for e in jaxpr.eqns if e.primitive.name in ("scan", "while")]
    lengths = [e.params.get("length") for e in loops]
    want = {"aspl": [c.rounds], "fsmg": [c.surrogate_steps, c.steps]}.get(method, [c.steps])
    assert lengths == want, lengths
    if method == "aspl":
        inner = [e.params.get("length") for e in loops[0].params["jaxpr"].eqns if e.primitive.name == "scan"]
        assert inner == [2 * c.surrogate_steps, c.steps], inner


def test_aspl_surrogate_is_a_separate_copy_that_moves_every_round(tiny):
    c, params, _, info, _ = run_method(tiny, "aspl")
    assert c.rounds >= 2
    # every round: the copy moved off the model (clean steps), and differs from the last round's copy;
    # from round 1 on the model itself moved (perturbed steps; round 0 has none before its PGD)
    for k in ("surrogate_moved", "surrogate_changed"):
        assert (np.asarray(info[k]) > 1e-3).all(), (k, info[k])
    assert np.asarray(info["model_moved"])[0] == 0 and (np.asarray(info["model_moved"])[1:] > 1e-3).all()
    # the last copy (clean steps) and the model (perturbed steps) differ, leaf by leaf somewhere
    def maxdiff(a, b):
        a, b = jax.device_get((a, b))
        return max(np.abs(u - v).max() for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

    assert maxdiff(info["surrogate"], info["model"]) > 0
    assert maxdiff(params["unet"], info["model"]["unet"]) > 0  # the model left the pretrained UNet


def test_sds_gradient_skips_the_unet_jacobian(tiny):
    """grad_x of the SDS surrogate = J_E(x)^T (eps_pred - eps): the encoder's VJP of the residual."""
    sd, p, x = tiny
    c = tiny_cfg("sds")
    params = bl.prepare("sds", sd, p, c, sd.resolution)
    sched = bl.sch.make_schedule(sd.scheduler)
    emb = sdm.text_embed(sd, params["text_encoder"], params["ids"][None])
    key = jax.random.PRNGKey(3)

    def both(x):
        g = jax.grad(lambda x: jnp.sum(bl.sds_surrogate(sd, sched, params, x, key, c, emb)[0]))(x)
        k_lat, k_np = jax.random.split(key)
        z, vjp = jax.vjp(lambda x: bl.draw_latents(sd, *bl.posterior(sd, params["vae"], x), k_lat, 1), x)
        pred, tgt = bl.noise_pred(sd, sched, params["unet"], emb, z, k_np, c)
        return g, vjp(pred - tgt)[0]

    g, want = compiled(both, x)[1](x)
    assert_f32_close(g, want, depth=160)   # the UNet (~90 layers), then the VAE encoder and back (~70)


@pytest.mark.parametrize("method", ["photoguard", "pid", "advdm"])  # encoder-only, posterior, through the UNet
def test_sharded_over_8_devices_equals_1_device(tiny, method):
    sd, p, x = tiny
    x8 = jnp.concatenate([x, x[:, ::-1], x[:, :, ::-1], -x])
    c = tiny_cfg(method, **({"target": "zero"} if method == "photoguard" else {}))
    params = bl.prepare(method, sd, p, c, sd.resolution)
    outs = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        dsh, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
        fn = jax.jit(lambda p, x, k: bl.protect(method, sd, p, x, k, c)[0], in_shardings=(rep, dsh, rep),
                     out_shardings=dsh)
        args = (jax.device_put(params, rep), jax.device_put(x8, dsh), jax.random.PRNGKey(1))
        y = fn.lower(*args).compile({"xla_backend_optimization_level": 0})(*args)
        assert len(y.sharding.device_set) == len(devices)
        outs.append(np.asarray(y))
    # sign steps: a gradient entry at the rounding noise level may flip between layouts
    assert np.mean(outs[0] != outs[1]) < 1e-3
    # ...and a flip can compound over later steps, but only in a handful of entries
    assert np.mean(np.abs(outs[0] - outs[1]) > 4 * c.step_size + 1e-6) < 1e-4


def test_protect_dir_writes_files_within_linf(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a.png": (80, 50), "b.jpg": (64, 64), "c.webp": (37, 64)}
    for name, size in sizes.items():
        Image.fromarray(rng.integers(0, 255, size[::-1] + (3,), dtype=np.uint8)).save(src / name)
    (src / "bad.png").write_bytes(b"not an image")
    before = {q: hashlib.sha256(q.read_bytes()).hexdigest() for q in src.iterdir()}
    c = tiny_cfg("photoguard")
    from ldu_jax.jobs.protect import protect_dir as apply
    rows = apply("photoguard", c, None, str(src), str(tmp_path / "out"), log=lambda s: None)
    assert before == {q: hashlib.sha256(q.read_bytes()).hexdigest() for q in src.iterdir()}
    assert len(rows) == 4
    with open(tmp_path / "out" / "report.csv") as f:
        report = {r["file"]: r for r in csv.DictReader(f)}
    assert report["bad.png"]["error"]
    for name, size in sizes.items():
        out = np.asarray(Image.open(tmp_path / "out" / f"{os.path.splitext(name)[0]}.png").convert("RGB"), int)
        orig = np.asarray(Image.open(src / name).convert("RGB"), int)
        assert out.shape[:2] == size[::-1]
        assert np.abs(out - orig).max() <= round(c.eps * 255)
        assert np.abs(out - orig).max() > 0
        assert report[name]["budget_ok"] == "true" and report[name]["method"] == "photoguard"
    with pytest.raises(ValueError, match="baseline config"):
        prun.protect_dir("advdm", c, None, str(src), str(tmp_path / "out2"), log=lambda s: None)


def test_a_folder_protection_does_not_depend_on_earlier_folders():
    # the evaluation reuses one protector for every subject: batch i of a folder draws from i only
    c = tiny_cfg("advdm")
    c.steps = 2
    protect_batch, res = prun.baseline_protector("advdm", c, log=lambda s: None)
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (c.apply_batch, res, res, 3), minval=-1, maxval=1))
    first = protect_batch(x, 0)
    protect_batch(x[::-1], 0)
    protect_batch(x, 1)
    np.testing.assert_array_equal(protect_batch(x, 0), first)
    assert np.abs(protect_batch(x, 1) - first).max() > 0     # the draws (t, noise) do depend on i


def test_targets_and_config_checks(tiny, tmp_path):
    t = bl.pattern_image(64)
    assert t.shape == (64, 64, 3) and t.min() >= -1 and t.max() <= 1 and t.std() > 0.3
    assert bl.target_image("zero", 64) is None
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(tmp_path / "t.png")
    np.testing.assert_allclose(bl.target_image(str(tmp_path / "t.png"), 16), 200 / 127.5 - 1, atol=1e-6)
    with pytest.raises(FileNotFoundError):
        bl.target_image(str(tmp_path / "missing.png"), 16)
    for method in bl.METHODS:
        for size in ("tiny", "sd21"):
            cfg = importlib.import_module(f"configs.protect_{bl.config_name(method)}_{size}").get_config()
            bl.check_config(method, cfg)
    with pytest.raises(ValueError, match="mist needs a target"):
        bl.check_config("mist", tiny_cfg("mist", target="zero"))
    c = tiny_cfg("aspl")
    c.surrogate.prior_weight = 1.0
    with pytest.raises(ValueError, match="class_dir"):
        bl.prepare("aspl", tiny[0], tiny[1], c, 64)
