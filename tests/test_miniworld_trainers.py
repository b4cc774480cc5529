"""The mini-world trainers (VAE, text-to-image LDM): the loss falls on a short run, the results load
through the normal loading code and give finite outputs, a rerun resumes from its checkpoint."""
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import miniworld_t2i, miniworld_vae
from ldu_jax.data import procedural_portrait
from ldu_jax.miniworld.train_t2i import ATTACK_PROMPTS, caption_words, train_t2i
from ldu_jax.miniworld.train_vae import train_vae
from ldu_jax.personalize import common
from ldu_jax.sd import models as sdm
from ldu_jax.sd import vae as vae_lib
from numerics import assert_f32_close

COLOURS = ("red", "blue", "green", "brown")
STEPS = 12


def _dataset(n=16):
    images = np.stack([procedural_portrait(i % 4, i, 64, 64) for i in range(n)])
    captions = [f"a photo of a person with {COLOURS[i % 4]} hair" for i in range(n)]
    return images, captions


DATA = _dataset()


def batches(batch_size):
    """A callable start_step -> iterator of (images, captions) cycling over the fixed dataset."""
    images, captions = DATA
    n = len(images) // batch_size

    def stream(start):
        for k in itertools.count(start):
            i = (k % n) * batch_size
            yield images[i:i + batch_size], captions[i:i + batch_size]
    return stream


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _falls(records):
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 3, losses
    assert np.isfinite(losses).all(), losses
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mw_vae"))
    c = miniworld_vae.get_config("test")
    c.max_steps, c.log_every, c.save_every = STEPS, 4, STEPS
    logs = []
    vae = train_vae(c, workdir, batches(c.batch_size), log=logs.append)
    return c, workdir, vae, logs


@pytest.fixture(scope="module")
def t2i_run(vae_run, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mw_t2i"))
    c = miniworld_t2i.get_config("test")
    c.max_steps, c.log_every, c.save_every = STEPS, 4, STEPS
    sd, params = train_t2i(c, workdir, batches(c.batch_size), os.path.join(vae_run[1], "vae"), log=lambda s: None)
    return c, workdir, sd, params


def test_vae_loss_falls(vae_run):
    _falls([r for r in _metrics(vae_run[1]) if r["step"] <= STEPS])


def test_vae_loads_with_unit_scaled_latents(vae_run):
    workdir = vae_run[1]
    vae = vae_lib.load_vae(os.path.join(workdir, "vae"))
    final = _metrics(workdir)[-1]
    assert vae.factor == 4 and vae.latent_channels == 4
    assert vae.scaling_factor == pytest.approx(final["scaling_factor"], rel=1e-5)
    x = jnp.asarray(DATA[0][:8])

    @jax.jit
    def round_trip(p, x):
        z = vae_lib.encode(vae, p, x, jax.random.PRNGKey(0))
        return z, vae_lib.decode(vae, p, z)

    z, y = round_trip(vae.params, x)
    assert z.shape == (8, 16, 16, 4)
    assert 0.6 < float(jnp.std(z)) < 1.6          # scaled latents have about unit std
    assert y.shape == x.shape and bool(jnp.isfinite(y).all())
    assert np.isfinite(final["eval_psnr"])


def test_vae_rerun_resumes(vae_run):
    c, workdir, _, _ = vae_run
    c = c.copy_and_resolve_references()
    c.max_steps = STEPS + 2
    logs = []
    train_vae(c, workdir, batches(c.batch_size), log=logs.append)
    assert any(f"from step {STEPS}" in s for s in logs), logs
    steps = [r["step"] for r in _metrics(workdir) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS + 2


def test_vae_adversarial_phase_starts_from_a_run_and_trains_the_discriminator_from_disc_start(vae_run, tmp_path):
    from ldu_jax import checkpoint as ckpt
    from ldu_jax.miniworld.train_vae import PatchDiscriminator
    c = miniworld_vae.get_config("test")
    c.max_steps, c.log_every, c.save_every = 4, 1, 2
    c.loss.adv_weight, c.loss.feat_weight, c.loss.disc_start = 0.1, 1.0, 2
    c.disc.channels, c.disc.groups = (8, 16), 4
    c.init_from, c.seed = vae_run[1], 1     # another seed: a random start would be far from the run's
    workdir = str(tmp_path / "gan")
    train_vae(c, workdir, batches(c.batch_size), log=lambda s: None)
    s2, _ = ckpt.restore_state(workdir, 2)
    s4, _ = ckpt.restore_state(workdir, 4)
    start, _ = ckpt.restore_state(vae_run[1])
    init = PatchDiscriminator((8, 16), 4).init(jax.random.fold_in(jax.random.PRNGKey(c.seed), 1),
                                                 jnp.zeros((1, 64, 64, 3)))["params"]
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),  # noqa: E731
                                                                     jax.tree_util.tree_leaves(b)))
    assert same(s2["disc_params"], init)              # off before disc_start
    assert not same(s4["disc_params"], init)          # trained after it
    recs = [r for r in _metrics(workdir) if "loss" in r]
    assert all(np.isfinite(r["d_loss"]) and np.isfinite(r["g_adv"]) for r in recs)
    # the generator started from the earlier run's weights, not from a random initialisation
    from ldu_jax.miniworld.train_vae import make_vae_module
    rand = make_vae_module(c.model).init_params(jax.random.PRNGKey(c.seed))
    dist = lambda a, b: np.sqrt(sum(float(np.sum(np.square(np.asarray(x) - np.asarray(y))))  # noqa: E731
                                    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))
    assert dist(s2["params"], start["params"]) < 0.2 * dist(rand, start["params"])
    c.init_from = workdir + "_missing"
    with pytest.raises(FileNotFoundError):
        train_vae(c, str(tmp_path / "gan2"), batches(c.batch_size), log=lambda s: None)
    c.init_from, c.model.block_out_channels = vae_run[1], (8, 16, 32)
    with pytest.raises(ckpt.CheckpointMismatchError, match="different VAE"):
        train_vae(c, str(tmp_path / "gan3"), batches(c.batch_size), log=lambda s: None)


def test_t2i_loss_falls(t2i_run):
    _falls(_metrics(t2i_run[1]))


def test_t2i_bundle_loads_and_samples(t2i_run):
    c, workdir, _, trained = t2i_run
    sd, params = sdm.load_sd(os.path.join(workdir, "sd"))
    assert sd.resolution == 64 and sd.tokenizer.model_max_length == c.model.text.max_length
    for part in ("unet", "text_encoder"):
        for a, b in zip(jax.tree_util.tree_leaves(params[part]), jax.tree_util.tree_leaves(trained[part])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # every caption and attack-prompt word is one token
    for w in caption_words(DATA[1] + list(ATTACK_PROMPTS)):
        assert len(sd.tokenizer.tokenize(w)) == 1, w
    ids = sdm.tokenize(sd, ["a photo of sks person", ""])

    @jax.jit
    def forward(p, ids):
        emb = sdm.text_embed(sd, p["text_encoder"], ids)
        return emb, sdm.unet_apply(sd, p["unet"], jnp.ones((2, 16, 16, 4)), jnp.array([10, 500]), emb)

    emb, eps = forward(params, ids)
    assert emb.shape == (2, c.model.text.max_length, c.model.text.hidden_size)
    assert eps.shape == (2, 16, 16, 4) and bool(jnp.isfinite(eps).all())


def test_t2i_text_use_compares_captions_on_the_same_draws(t2i_run):
    from ldu_jax.miniworld.train_t2i import text_use
    _, _, sd, params = t2i_run
    images = np.asarray(DATA[0][:4])
    m = text_use(sd, params, images, ["a photo of a person with red hair"] * 4, draws=2)
    assert set(m) == {"caption", "shuffled", "empty"} and all(np.isfinite(v) and v > 0 for v in m.values())
    assert m["shuffled"] == m["caption"]  # shuffling identical captions changes nothing: same draws
    assert m["empty"] != m["caption"]     # the text reaches the UNet
    assert text_use(sd, params, images, ["a", "b", "c", "d"], draws=2)["caption"] != m["caption"]


def test_t2i_bundle_generates(t2i_run):
    sd, params = sdm.load_sd(os.path.join(t2i_run[1], "sd"))
    out = common.generate(sd, params, ["a photo of a person with red hair"], n_per_prompt=1, steps=2,
                          guidance=3.0, seed=0, batch=1)
    img = out["a photo of a person with red hair"]
    assert img.shape == (1, 64, 64, 3) and img.dtype == np.uint8 and img.std() > 0


@pytest.mark.parametrize("scale", [0.0, 0.1])
def test_t2i_optimizer_scales_or_freezes_the_text_encoder(scale):
    from ldu_jax.miniworld.train_t2i import t2i_optimizer
    c = miniworld_t2i.get_config("test")
    c.text_lr_scale = scale
    c.optim.weight_decay = 0.5            # a frozen encoder must not decay either
    tx, _ = t2i_optimizer(c)
    params = {"unet": {"w": jnp.ones((3,))}, "text_encoder": {"emb": jnp.ones((2, 2)), "b": jnp.ones((2,))}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    state = tx.init(params)
    new = params
    for _ in range(3):
        updates, state = tx.update(grads, state, new)
        new = jax.tree_util.tree_map(lambda p, u: p + u, new, updates)
    unet_moved = float(jnp.abs(new["unet"]["w"] - 1).max())
    text_moved = float(jnp.abs(new["text_encoder"]["emb"] - 1).max())
    assert unet_moved > 0
    if scale == 0:
        assert text_moved == 0 and float(jnp.abs(new["text_encoder"]["b"] - 1).max()) == 0
    else:
        # 3 updates, each rounded and added at the parameters' scale (1), whatever its own size
        assert_f32_close(text_moved, scale * unet_moved, depth=6, scale=1)


def test_t2i_default_recipe_uses_scene_captions_v_prediction_and_a_frozen_text_encoder():
    c = miniworld_t2i.get_config()
    assert c.scene_captions and c.text_lr_scale == 0 and c.scheduler.prediction_type == "v_prediction"
    old = miniworld_t2i.get_config("attributes")      # the first recipe, kept for the README's diagnosis
    assert not old.scene_captions and old.text_lr_scale == 1 and old.scheduler.prediction_type == "epsilon"
    from ldu_jax.miniworld import world
    from ldu_jax.jobs.build_world import configs
    assert configs("full")["t2i"].scene_captions and configs("test")["t2i"].scene_captions
    longest = max(len(world.words(world.caption(i, v, scene=True)))
                  for i in world.train_identities(200) for v in range(3))
    assert longest + 2 <= c.model.text.max_length     # + BOS / EOS: scene captions are never truncated
    with pytest.raises(ValueError, match="profile"):
        configs("scene")
    with pytest.raises(ValueError, match="variant"):
        miniworld_t2i.get_config("scene")


def test_t2i_export_bundle_writes_a_checkpoint_as_the_bundle(vae_run, t2i_run, tmp_path):
    from ldu_jax.miniworld.train_t2i import export_bundle
    c, workdir, _, _ = t2i_run
    vae_dir, out = os.path.join(vae_run[1], "vae"), str(tmp_path / "bundle")
    sd_ref, ref = sdm.load_sd(os.path.join(workdir, "sd"))
    assert export_bundle(c, workdir, vae_dir, out) == STEPS     # the latest: the run's final EMA weights
    sd, params = sdm.load_sd(out)
    assert sd.tokenizer.get_vocab() == sd_ref.tokenizer.get_vocab()
    for part in ("unet", "text_encoder", "vae"):
        for a, b in zip(jax.tree_util.tree_leaves(params[part]), jax.tree_util.tree_leaves(ref[part])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="not a t2i run"):
        export_bundle(c, str(tmp_path), vae_dir, str(tmp_path / "b2"))
    assert not os.path.exists(tmp_path / "b2")


def test_vae_fragile_finetune_trains_the_encoder_only_and_keeps_the_scale(vae_run, tmp_path):
    """A fragile fine-tune from a diffusers VAE folder: the decoder is bit-for-bit the initial one,
    the encoder moved, the anchor is the initial VAE, the written VAE keeps its scaling factor, and
    the attack's progress toward its targets rises."""
    from ldu_jax import checkpoint as ckpt
    from ldu_jax.errors import ConfigError
    c = miniworld_vae.get_config("test")
    c.max_steps, c.log_every, c.save_every = 16, 1, 16
    c.fragile.weight, c.optim.lr = 1.0, 3e-3
    c.init_from = os.path.join(vae_run[1], "vae")
    workdir = str(tmp_path / "fragile")
    vae = train_vae(c, workdir, batches(c.batch_size), log=lambda s: None)
    start = vae_lib.load_vae(c.init_from)
    state, _ = ckpt.restore_state(workdir)
    leaves = lambda t: jax.tree_util.tree_leaves(t)  # noqa: E731
    for k in ("decoder", "post_quant_conv"):
        assert all(np.array_equal(a, b) for a, b in zip(leaves(state["params"][k]), leaves(start.params[k])))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(state["params"]["encoder"]),
                                                        leaves(start.params["encoder"])))
    assert all(np.array_equal(a, b) for a, b in zip(leaves(state["anchor_params"]), leaves(start.params)))
    assert vae.scaling_factor == pytest.approx(start.scaling_factor, rel=1e-6)
    recs = [r for r in _metrics(workdir) if "progress" in r]
    assert len(recs) == 16 and all(np.isfinite([r["progress"], r["anchor"], r["random"]]).all() for r in recs)
    assert np.mean([r["progress"] for r in recs[-4:]]) > np.mean([r["progress"] for r in recs[:4]]) + 0.05
    c.init_from = ""
    with pytest.raises(ConfigError, match="init_from"):
        train_vae(c, str(tmp_path / "fragile2"), batches(c.batch_size), log=lambda s: None)
