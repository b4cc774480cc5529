"""LDU: ρ, the invert -> shift -> denoise pipeline, the Lagrangian, training, ldu-opt, apply."""
import csv
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import ldu_tiny
from ldu_jax import data as data_lib
from ldu_jax import parallel
from ldu_jax.protect import ldu
from ldu_jax.jobs import protect as prun
from ldu_jax.shortcut import sampling, trainer
from numerics import assert_adam_close, assert_f32_close, f32_tol


def cfg(**kw):
    c = ldu_tiny.get_config()
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def setup():
    c = cfg()
    models, params, ti_ids, db_ids, shape, res = prun.load_models(c, log=lambda s: None)
    # a DiT whose flow is not the identity (random final layer), so invert/denoise do real work
    leaves, tree = jax.tree_util.tree_flatten(params["dit"])
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    params["dit"] = tree.unflatten([leaf + 0.02 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])
    tx = ldu.make_rho_optimizer(c)
    state = ldu.init_rho_state(models, tx, jax.random.PRNGKey(0), shape, c)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, res, res, 3)).astype(np.float32))
    return c, models, params, ti_ids, db_ids, shape, state, x


def test_rho_at_init_gives_the_plain_reconstruction(setup):
    c, models, params, ti_ids, db_ids, shape, state, x = setup
    p = {**params, "rho": state.rho}
    x_prot, _ = jax.jit(lambda p, x: ldu.protect_images(models, p, x, c))(p, x)
    apply_fn = trainer.make_apply(models.dit)
    labels = jnp.full((4,), models.null_label, jnp.int32)
    z0 = ldu.encode_mean(models, params["vae"], x)
    zT = sampling.invert(apply_fn, params["dit"], z0, labels, steps=4)
    assert float(jnp.abs(zT - z0).max()) > 1e-3  # the flow moves the latent
    decode = lambda z: ldu.vae_lib.decode(ldu._vae(models), params["vae"], z)  # noqa: E731
    recon = decode(sampling.denoise(apply_fn, params["dit"], zT, labels, steps=4))
    # jit against op by op: VAE encoder ~35 layers + 8 DiT evaluations x ~20 + decoder ~50
    tol = assert_f32_close(x_prot, recon, depth=250)
    # a real error lies far outside (here 3000x and 400x): denoising in 2 steps, a latent off by 1e-3
    for wrong in (sampling.denoise(apply_fn, params["dit"], zT, labels, steps=2),
                  sampling.denoise(apply_fn, params["dit"], zT + 1e-3, labels, steps=4)):
        assert float(jnp.abs(decode(wrong) - recon).max()) > 100 * tol
    # output='residual': x + D(z0'(δ)) - D(z0'(0)); ρ at init shifts nothing, so x comes back exactly
    x_res, _ = jax.jit(lambda p, x: ldu.protect_images(models, p, x, cfg(output="residual")))(p, x)
    assert np.array_equal(np.asarray(x_res), np.asarray(x))
    # with a shift, the change is exactly the shifted round trip minus the unshifted one
    shift = 0.3 * jax.random.normal(jax.random.PRNGKey(7), zT.shape)
    x_sh, _ = jax.jit(lambda p, x: ldu.protect_images(models, p, x, cfg(output="residual"),
                                                      shift=lambda z: z + shift))(p, x)
    moved = decode(sampling.denoise(apply_fn, params["dit"], zT + shift, labels, steps=4))
    # the same depth, in each of the two decoded terms; without the shift it is far off
    tol = assert_f32_close(x_sh, x + moved - recon, depth=250, scale=jnp.abs(moved).max() + jnp.abs(recon).max())
    assert float(jnp.abs(moved - recon).max()) > 100 * tol
    with pytest.raises(ValueError, match="output"):
        ldu.protect_images(models, p, x, cfg(output="pixels"))


def test_projection_puts_each_image_within_the_budget(setup):
    c, models, params, ti_ids, db_ids, shape, state, x = setup
    rng = np.random.default_rng(3)
    change = (jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
              * jnp.asarray([1.0, 0.1, 0.01, 0.0]).reshape(-1, 1, 1, 1))
    out = ldu.constrain(x + change, x, c)
    d = np.asarray(ldu.distance(out, x))
    d_in = np.asarray(ldu.distance(x + change, x))
    for i in range(4):
        if d_in[i] > c.eps:   # scaled onto the budget, direction kept
            assert d[i] == pytest.approx(c.eps, rel=1e-4)
        else:                 # inside: untouched
            assert np.array_equal(np.asarray(out[i]), np.asarray((x + change)[i]))
    assert d_in[0] > c.eps and d_in[3] == 0
    # gradients through the projection are finite even where nothing changed (d = 0)
    g = jax.grad(lambda ch: jnp.sum(ldu.constrain(x + ch, x, c)))(change)
    assert np.isfinite(np.asarray(g)).all()
    with pytest.raises(ValueError, match="constraint"):
        ldu.constrain(x, x, cfg(constraint="lagrange"))
    with pytest.raises(ValueError, match="distance='mse'"):
        ldu.constrain(x, x, cfg(distance="ssim"))


def test_gradients_reach_every_rho_parameter(setup):
    c, models, params, ti_ids, db_ids, shape, state, x = setup
    # ρ's zero-initialised output layer blocks gradients to the layers before it; nudge it.
    rho = jax.tree_util.tree_map(lambda a: a, state.rho)
    rho["params"]["out"]["kernel"] = rho["params"]["out"]["kernel"] + 0.01

    def loss(rp):
        lag, _ = ldu.objective(models, {**params, "rho": {**rho, "params": rp}}, x, ti_ids, db_ids,
                               jax.random.PRNGKey(1), jnp.float32(1.0), c)
        return jnp.mean(lag)

    grads = jax.jit(jax.grad(loss))(rho["params"])
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    zero = [jax.tree_util.keystr(p) for p, g in flat if not float(jnp.abs(g).max()) > 0]
    assert not zero, zero


def test_multiplier_rises_when_violated_decays_to_zero_and_stays_bounded():
    c = cfg(constraint="dual")
    lam = jnp.float32(0.0)
    for _ in range(3):
        lam = ldu.update_multiplier(lam, jnp.float32(0.5), c)  # d > eps
    assert float(lam) == pytest.approx(0.75)
    for _ in range(10):
        lam = ldu.update_multiplier(lam, jnp.float32(-0.5), c)  # d < eps
    assert float(lam) == 0.0
    # a violation of 10^6 x the budget moves λ by at most lam_lr per step, and never past lam_max
    lam = ldu.update_multiplier(jnp.float32(0.0), jnp.float32(1e6), c)
    assert float(lam) == pytest.approx(c.lam_lr)
    for _ in range(1000):
        lam = ldu.update_multiplier(lam, jnp.float32(1e6), c)
    assert float(lam) == c.lam_max
    assert float(ldu.update_multiplier(lam, jnp.float32(-1.0), c)) == pytest.approx(c.lam_max - c.lam_lr)
    assert float(ldu.update_multiplier(jnp.float32(2.0), jnp.float32(1.0), cfg(constraint="hinge"))) == 2.0


def test_rho_steps_raise_l_pers(setup):
    """Gradient ascent on L_pers: steps on the same draws (step counter held at 0) raise it."""
    c, models, params, ti_ids, db_ids, shape, state, x = setup
    c = cfg(eps=1.0, lam_init=0.0, lr=1e-3)
    tx = ldu.make_rho_optimizer(c)
    st = ldu.init_rho_state(models, tx, jax.random.PRNGKey(0), shape, c)
    step = jax.jit(ldu.make_rho_step(models, tx, c, 0))
    seen = []
    for _ in range(4):
        new, info = step(st, params, x, ti_ids, db_ids)
        seen.append(float(info["l_pers"]))  # L_pers of the state going in, on the step-0 draws
        st = new.replace(step=jnp.zeros((), jnp.int32))
    assert seen[-1] > seen[0], seen


def test_training_lambda_decays_and_writes_outputs(trained_rho):
    c, workdir, state = trained_rho   # conftest.py
    m = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in m] == [2, 4, 6, 8]
    assert m[0]["lambda"] > 0 and float(state.lam) == 0.0  # d < eps: the multiplier decays to 0
    assert all(r["d"] < c.eps for r in m)
    assert os.path.exists(os.path.join(workdir, "grids", "step_8.png"))
    assert all(0 < r["ssim"] <= 1 and np.isfinite(r["psnr"]) for r in m)
    # held-out L_pers of ρ's images against the clean ones, on the same fixed draws at every log step
    h = [json.loads(line) for line in open(os.path.join(workdir, "heldout.jsonl"))]
    assert [r["step"] for r in h] == [2, 4, 6, 8]
    assert len({r["l_pers_clean"] for r in h}) == 1 and h[0]["l_pers_clean"] > 0
    assert all(r["gain"] == pytest.approx(r["l_pers"] / r["l_pers_clean"] - 1, abs=0.05) for r in h)
    assert len({r["l_pers"] for r in h}) > 1          # ρ changes, so its images' loss does


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_training_on_a_bad_dataset_folder_fails_before_writing(tmp_path, kind):
    folder = tmp_path / "photos"
    if kind == "empty":
        folder.mkdir()
    workdir = tmp_path / "rho"
    with pytest.raises(data_lib.DataError, match=str(folder)):
        prun.train_rho(cfg(dataset=str(folder)), str(workdir), log=lambda s: None)
    assert not workdir.exists()


def test_batchnorm_perturber_and_bf16(setup):
    c, models, params, ti_ids, db_ids, shape, state, x = setup
    from ldu_jax.models.perturber import Perturber
    bn = Perturber(widths=(16, 32), norm="batch", residual=False)
    v = bn.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(shape)))
    assert "batch_stats" in v
    z = jax.random.normal(jax.random.PRNGKey(1), (4,) + tuple(shape))
    out, upd = bn.apply(v, z, True, mutable=["batch_stats"])
    assert out.shape == z.shape
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree_util.tree_leaves(upd["batch_stats"]),
                                                                 jax.tree_util.tree_leaves(v["batch_stats"])))
    # group norm: one image's output does not depend on the rest of its batch
    rv = jax.tree_util.tree_map(lambda a: a + 0.01, state.rho)  # non-zero output layer
    full = models.rho.apply(rv, z)
    assert float(jnp.abs(full - z).max()) > 1e-4
    assert_f32_close(models.rho.apply(rv, z.at[1:].set(0.0))[0], full[0], depth=14)  # ρ: 14 conv / norm layers
    with pytest.raises(ValueError, match="divisible"):
        bn.clone(widths=(8, 8, 8, 8, 8)).init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 4)))
    m16, *_ = prun.load_models(cfg(dtype="bfloat16"), log=lambda s: None)
    assert m16.dit.dtype == jnp.bfloat16 and m16.sd.unet.dtype == jnp.bfloat16


def test_apply_meets_budget_and_keeps_inputs(trained_rho, tmp_path):
    c, workdir, _ = trained_rho   # conftest.py
    from ldu_jax.jobs.protect import protect_dir as apply
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (80, 50)), ("b.jpg", (64, 64)), ("c.webp", (37, 64))):
        Image.fromarray(rng.integers(0, 255, size[::-1] + (3,), dtype=np.uint8)).save(src / name)
    (src / "bad.png").write_bytes(b"")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    c = cfg(eps=(8 / 255) ** 2)
    rows = apply("ldu", c, workdir, str(src), str(tmp_path / "out"), log=lambda s: None)
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    assert before == after and len(rows) == 4
    with open(tmp_path / "out" / "report.csv") as f:
        report = {r["file"]: r for r in csv.DictReader(f)}
    assert report["bad.png"]["error"]
    for name, size in (("a.png", (80, 50)), ("b.jpg", (64, 64)), ("c.webp", (37, 64))):
        stem = os.path.splitext(name)[0]
        out = np.asarray(Image.open(tmp_path / "out" / f"{stem}.png").convert("RGB"), np.float64)
        orig = np.asarray(Image.open(src / name).convert("RGB"), np.float64)
        assert out.shape[:2] == size[::-1]
        assert np.mean(np.square((out - orig) / 127.5)) <= c.eps + 1e-12
        assert report[name]["budget_ok"] == "true"
    with pytest.raises(ValueError):
        apply("ldu", c, workdir, str(src), str(src), log=lambda s: None)


def test_ldu_opt_is_one_compiled_loop(setup):
    c, models, params, ti_ids, db_ids, shape, state, x = setup
    c = cfg(opt_steps=7)
    jaxpr = str(jax.make_jaxpr(lambda p, x: ldu.optimize_shift(models, p, x, ti_ids, db_ids,
                                                               jax.random.PRNGKey(0), c))(params, x))
    assert "length=7" in jaxpr  # the fori_loop over δ's Adam steps (a scan of 7 iterations)
    # the Adam loop over δ is one loop, not opt_steps unrolled copies: twice the steps, same program
    n_unet_calls = jaxpr.count("conv_general_dilated")
    c2 = cfg(opt_steps=14)
    jaxpr2 = str(jax.make_jaxpr(lambda p, x: ldu.optimize_shift(models, p, x, ti_ids, db_ids,
                                                                jax.random.PRNGKey(0), c2))(params, x))
    assert jaxpr2.count("conv_general_dilated") == n_unet_calls  # more steps, same program size


def test_ldu_opt_returns_a_feasible_image_no_worse_than_no_shift(setup):
    c, models, params, ti_ids, db_ids, shape, state, x = setup
    x = jnp.round((x + 1) * 127.5) / 127.5 - 1     # inputs come from uint8 files
    c = cfg(output="residual", opt_steps=2, cg_iters=3, bisect_iters=6, n_draws=1)
    key = jax.random.PRNGKey(0)
    x_prot, info = jax.jit(lambda p, x: ldu.optimize_shift(models, p, x, ti_ids, db_ids, key, c))(params, x)
    d = np.asarray(ldu.distance(ldu.quantize_ste(x_prot), x))
    assert np.all(d <= c.eps * (1 + 1e-6))           # within the budget after uint8 rounding
    zero_score = ldu.pers_loss(models, params, x, ti_ids, db_ids, ldu.opt_score_key(key), c)
    # never worse than no shift: equal when it keeps no shift, up to float32 rounding of the same loss
    # computed in two programs (VAE encoder ~35 layers + UNet ~90; a real loss drop is ~1e-2 relative)
    zero = np.asarray(zero_score)
    assert np.all(np.asarray(info["l_pers"]) >= zero - f32_tol(np.abs(zero).max(), depth=125))
    moved = np.asarray(info["delta_norm"]) > 0
    assert moved.any()
    assert np.all(d[moved] >= 0.5 * c.eps)            # a moved image is scaled onto the budget
    np.testing.assert_allclose(np.asarray(x_prot)[~moved], np.asarray(x)[~moved])
    with pytest.raises(ValueError, match="opt_method"):
        ldu.optimize_shift(models, params, x, ti_ids, db_ids, key, cfg(opt_method="lbfgs"))


def test_rho_step_on_8_devices_equals_1_device(setup):
    c, models, params, ti_ids, db_ids, shape, state, x = setup
    x = jnp.concatenate([x, x[:, ::-1]])  # 8 images, one per device
    # the data-parallel machinery, without the UNet's compile cost
    c = cfg(ti_weight=0.0, lam_init=1.0, constraint="dual")
    tx = ldu.make_rho_optimizer(c)
    outs = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        st = ldu.init_rho_state(models, tx, jax.random.PRNGKey(0), shape, c)
        step = jax.jit(ldu.make_rho_step(models, tx, c, 0, parallel.data_sharding(mesh)))
        for _ in range(2):
            first = st
            st, info = step(st, params, x, ti_ids, db_ids)
        outs.append((st, info, first))
    # the step: the pipeline (~250 layers) and ρ (14) forward, then backward
    assert_adam_close(outs[1][0].rho, outs[0][0].rho, lr=c.lr, steps=2, depth=530)
    with pytest.raises(AssertionError):   # one step fewer is far off
        assert_adam_close(outs[1][0].rho, outs[0][2].rho, lr=c.lr, steps=2, depth=530)
    for k in ("d", "loss", "grad_norm", "lambda"):
        assert_f32_close(outs[1][1][k], outs[0][1][k], depth=530, err_msg=k)
