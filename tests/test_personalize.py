"""Textual Inversion, DreamBooth (+ prior, LoRA), DDIM and the attack CLI on the tiny SD bundle."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import attack_db_tiny, attack_ti_tiny
from ldu_jax import parallel, sources
from ldu_jax.jobs import attack
from ldu_jax.personalize import common, dreambooth, lora, textual_inversion as ti
from ldu_jax.sd import models as sdm
from ldu_jax.sd import schedule as sch
from numerics import assert_adam_close, tiny_unet_offsets


@pytest.fixture(scope="module")
def tiny():
    return sources.sd("tiny")


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Four 64 px images of one 'subject' (a red blob on a shifting background), one odd-sized."""
    folder = tmp_path_factory.mktemp("subject")
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    for i in range(4):
        blob = np.exp(-((xx - 0.5) ** 2 + (yy - 0.45) ** 2) / 0.03)
        img = np.stack([0.3 + 0.7 * blob, 0.2 + 0.1 * i + 0.2 * xx, 0.4 * yy], -1)
        im = Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8))
        if i == 3:
            im = im.resize((80, 64))
        im.save(folder / f"{i}.png")
    return str(folder)


def fixed_loss(sd, params, images, ids, n=4):
    """The TI/DB objective on fixed draws of latents, t and noise (so 'before' and 'after' compare)."""
    sched = sch.make_schedule(sd.scheduler)
    key = jax.random.PRNGKey(123)
    reps = jnp.concatenate([images] * n)
    ids = jnp.broadcast_to(jnp.asarray(ids), (reps.shape[0], ids.shape[-1]))  # one prompt [L] for all
    return float(jnp.mean(common.denoising_loss(sd, sched, params, reps, ids, key)))


# a TI step: the VAE encoder (~35 layers), the UNet (~90) forward and back, the text encoder (~20) back
TI_DEPTH = 240


def ti_config(**kw):
    c = attack_ti_tiny.get_config()
    c.update(dict(max_steps=30, log_every=10, save_every=15, num_samples=1, sample_steps=4))
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def ti_run(tiny, faces, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ti"))
    logs = []
    cfg = ti_config()
    sd_new, params_new, token = attack.run_ti(cfg, faces, workdir, log=logs.append)
    attack.write_samples(sd_new, params_new, cfg, token, workdir)
    return workdir, sd_new, params_new, token, logs


def test_ti_trains_only_the_placeholder_row(tiny, ti_run):
    sd, params = tiny
    workdir, sd_new, params_new, token, _ = ti_run
    token_id = sd_new.tokenizer.convert_tokens_to_ids(token)
    old, new = np.asarray(ti.get_table(params)), np.asarray(ti.get_table(params_new))
    assert new.shape[0] == old.shape[0] + 1 == token_id + 1
    np.testing.assert_array_equal(new[:-1], old)  # every other row exactly unchanged
    init_id = sd.tokenizer.convert_tokens_to_ids("person</w>")
    assert np.abs(new[token_id] - old[init_id]).max() > 1e-3  # the new row moved from the init word's
    # the saved file has diffusers' layout and loads back to the same row
    embeds = ti.load_learned_embeds(os.path.join(workdir, "learned_embeds.safetensors"))
    assert list(embeds) == [token] and embeds[token].shape == (1, new.shape[1])
    np.testing.assert_allclose(embeds[token][0], new[token_id], rtol=1e-6)


def test_ti_lowers_the_loss_and_writes_outputs(tiny, faces, ti_run):
    workdir, sd_new, params_new, token, logs = ti_run
    images = common.load_instance_images(faces, sd_new.resolution, 1, log=lambda s: None)
    ids = ti.template_ids(sd_new, token, "person")
    token_id = sd_new.tokenizer.convert_tokens_to_ids(token)
    init = ti.with_row(params_new, token_id, ti.get_table(tiny[1])[
        tiny[0].tokenizer.convert_tokens_to_ids("person</w>")])
    before = fixed_loss(sd_new, init, images, ids[0])
    after = fixed_loss(sd_new, params_new, images, ids[0])
    assert after < before, (before, after)
    assert any("resized to 64x64" in line for line in logs)  # the odd-sized image was announced
    for prompt in ("a photo of <person> person", "a dslr portrait of <person> person"):
        d = os.path.join(workdir, "samples", attack.slug(prompt))
        assert sorted(os.listdir(d)) == ["000.png"]
        assert Image.open(os.path.join(d, "000.png")).size == (64, 64)


def test_ti_bad_inputs(tiny, faces, tmp_path):
    sd, params = tiny
    with pytest.raises(ValueError, match="person</w>|already"):
        sdm.add_placeholder_token(sd, params, "person</w>", "person")
    with pytest.raises(ValueError, match="xylophonequartz"):
        sdm.add_placeholder_token(sd, params, "<new>", "xylophonequartz")
    with pytest.raises(Exception, match="at least 9"):
        attack.run_ti(ti_config(min_images=9), faces, str(tmp_path), log=lambda s: None)


def db_config(**kw):
    c = attack_db_tiny.get_config()
    c.update(dict(max_steps=10, log_every=5, save_every=10, num_samples=1, sample_steps=4, num_class_images=4,
                  class_steps=4))
    c.update(kw)
    return c


def test_dreambooth_with_prior_lowers_loss(tiny, faces, tmp_path):
    sd, params = tiny
    cfg = db_config()
    _, tuned, ident = attack.run_dreambooth(cfg, faces, str(tmp_path), log=lambda s: None)
    assert len(os.listdir(tmp_path / "class_images")) == 4  # generated by the model itself
    import json
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(m["loss_prior"] > 0 for m in metrics)  # the prior term is present
    images = common.load_instance_images(faces, sd.resolution, 1, log=lambda s: None)
    ids = sdm.tokenize(sd, [cfg.instance_prompt])[0]
    assert fixed_loss(sd, tuned, images, jnp.asarray(ids)) < fixed_loss(sd, params, images, jnp.asarray(ids))
    assert os.path.exists(tmp_path / "model" / "unet")


def test_attacker_loads_once_compiles_once_and_batches_subjects(faces, tmp_path, monkeypatch):
    from safetensors.numpy import load_file
    other = tmp_path / "other"                 # a second subject: the same images, flipped
    other.mkdir()
    for name in sorted(os.listdir(faces)):
        Image.open(os.path.join(faces, name)).transpose(Image.FLIP_TOP_BOTTOM).save(other / name)
    subjects = [faces, str(other)]
    loads = []
    real_load = sources.sd
    monkeypatch.setattr(sources, "sd", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    # batch 4: each subject's batch over 4 devices (as alone), the 2 subjects over 2 x 4 (on 8)
    cfgs = {"ti": ti_config(max_steps=6, save_every=6, log_every=3, batch_size=4),
            "dreambooth": db_config(max_steps=4, save_every=4, log_every=2, batch_size=4)}
    cfgs["dreambooth"].class_images_dir = str(tmp_path / "class")
    attacker = attack.Attacker(cfgs["ti"].model)
    quiet = lambda s: None  # noqa: E731
    one, many = {}, {}
    for kind, cfg in cfgs.items():
        for i, subject in enumerate(subjects):
            one[kind, i] = attacker.run(kind, cfg, subject, str(tmp_path / "one" / kind / str(i)), quiet,
                                        save_model=False)
            assert set(attacker.timing) == {"load", "train", "generate"}
        logs = []
        out = attacker.run_many(kind, cfg, subjects, [str(tmp_path / "many" / kind / str(i)) for i in range(2)],
                                str(tmp_path / "group" / kind), logs.append, save_model=False)
        many.update({(kind, i): o for i, o in enumerate(out)})
        # 8 devices: each subject's batch of 4 over 4 of them, the 2 subjects side by side
        s, b = parallel.subject_mesh(2, 4).devices.shape
        assert any(f"2 subjects in one program, on a {s} x {b} device mesh (subjects x data)" in m for m in logs), logs
    assert len(loads) == 1                      # one model for every run
    assert len(attacker._updates) == 4          # one step per attack, one per attack batched over 2 subjects,
    assert all(u._cache_size() == 1 for u in attacker._updates.values())   # each traced once
    assert not os.path.exists(tmp_path / "one" / "dreambooth" / "1" / "model")   # save_model=False
    assert os.listdir(tmp_path / "group" / "ti" / "4-images")   # the stacked states' checkpoints
    # batched = one at a time: the learned TI rows, and every sample of both attacks
    for i in range(2):
        a, b = (load_file(str(tmp_path / d / "ti" / str(i) / "learned_embeds.safetensors")) for d in ("one", "many"))
        assert_adam_close(b["<sks>"] if "<sks>" in b else next(iter(b.values())),
                          a["<sks>"] if "<sks>" in a else next(iter(a.values())),
                          lr=cfgs["ti"].lr, steps=cfgs["ti"].max_steps, depth=TI_DEPTH)
    for key, out in one.items():
        for prompt in out:
            np.testing.assert_allclose(out[prompt].astype(int), many[key][prompt].astype(int), atol=2)
    # ... and the same as a fresh attacker (the path before sharing)
    fresh = attack.run("dreambooth", cfgs["dreambooth"], faces, str(tmp_path / "fresh"), quiet)
    for prompt in fresh:
        np.testing.assert_allclose(fresh[prompt].astype(int), one["dreambooth", 0][prompt].astype(int), atol=1)
    # the subjects differ, so equal results are not a constant
    assert np.abs(next(iter(one["dreambooth", 0].values())).astype(int)
                  - next(iter(one["dreambooth", 1].values())).astype(int)).mean() > 0.5
    a = load_file(str(tmp_path / "one" / "ti" / "0" / "learned_embeds.safetensors"))
    b = load_file(str(tmp_path / "one" / "ti" / "1" / "learned_embeds.safetensors"))
    assert np.abs(next(iter(a.values())) - next(iter(b.values()))).max() > 1e-4
    three = tmp_path / "three"
    three.mkdir()
    for name in sorted(os.listdir(faces))[:3]:
        Image.open(os.path.join(faces, name)).save(three / name)
    with pytest.raises(ValueError, match="same number of images"):
        attacker.train_many("ti", cfgs["ti"], [faces, str(three)], [str(tmp_path / "x")] * 2, str(tmp_path / "g2"),
                            quiet)


def test_run_many_argument_errors(faces, tmp_path):
    a = attack.Attacker("tiny")
    with pytest.raises(ValueError, match="work dirs"):
        a.run_many("ti", ti_config(), [faces, faces], [str(tmp_path)], str(tmp_path / "g"))
    with pytest.raises(ValueError, match="group_dir"):
        a.run_many("ti", ti_config(), [faces, faces], [str(tmp_path / "a"), str(tmp_path / "b")], None)
    with pytest.raises(ValueError, match="unknown attack"):
        a.run_many("lora", ti_config(), [faces], [str(tmp_path)], None)


def test_lora_trains_only_adapters(tiny, faces):
    sd, params = tiny
    cfg = db_config(lora_rank=2, prior_weight=0.0)
    sched = sch.make_schedule(sd.scheduler)
    tx = dreambooth.make_optimizer(cfg)
    state = dreambooth.init_state(params, cfg, tx, jax.random.PRNGKey(0))
    assert set(state.trainable["unet"]) and all(k.split("/")[-1] in lora.TARGETS for k in state.trainable["unet"])
    frozen = dreambooth.frozen_params(params, cfg)
    assert frozen["unet"] is params["unet"]
    images = common.load_instance_images(faces, sd.resolution, 1, log=lambda s: None)
    ids = jnp.asarray(sdm.tokenize(sd, [cfg.instance_prompt, cfg.class_prompt]))
    step = jax.jit(dreambooth.make_step(sd, sched, tx, cfg, 4, 0))
    new, info = step(state, frozen, images, images, ids[0], ids[1])
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), state.trainable, new.trainable)
    assert any(jax.tree_util.tree_leaves(changed)) and "loss_prior" not in info
    # merged weights differ only on the adapted kernels
    merged = lora.merge(params["unet"], new.trainable["unet"], 1.0)
    from flax import traverse_util
    a, b = traverse_util.flatten_dict(params["unet"]), traverse_util.flatten_dict(merged)
    diff = {"/".join(k) for k in a if np.any(np.asarray(a[k]) != np.asarray(b[k]))}
    assert diff and all(k.split("/")[-2] in lora.TARGETS for k in diff)


def test_ddim_deterministic_and_guidance_one(tiny):
    sd, params = tiny
    sched = sch.make_schedule(sd.scheduler)
    predict = common._predictor(sd)
    ids = jnp.asarray(sdm.tokenize(sd, ["a photo of person", ""]))
    emb = sdm.text_embed(sd, params["text_encoder"], ids)
    cond, uncond = emb[:1].repeat(2, 0), emb[1:].repeat(2, 0)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    a = sch.ddim_sample(predict, params["unet"], sched, x, cond, uncond, steps=4, guidance=3.0)
    b = sch.ddim_sample(predict, params["unet"], sched, x, cond, uncond, steps=4, guidance=3.0)
    np.testing.assert_array_equal(a, b)
    one = sch.ddim_sample(predict, params["unet"], sched, x, cond, uncond, steps=4, guidance=1.0)
    cond_only = sch.ddim_sample(predict, params["unet"], sched, x, cond, cond * 0 + 7, steps=4, guidance=1.0)
    np.testing.assert_array_equal(one, cond_only)  # guidance 1: the unconditional branch is not used
    assert float(jnp.abs(one - a).max()) > 1e-4


def test_ti_step_on_8_devices_equals_1_device(tiny, faces):
    sd, params = tiny
    sd, params, token_id = sdm.add_placeholder_token(sd, params, "<p8>", "person")
    sched = sch.make_schedule(sd.scheduler)
    cfg = ti_config()
    tx, _ = ti.make_optimizer(cfg, 8)
    images = common.load_instance_images(faces, sd.resolution, 1, log=lambda s: None)
    ids = jnp.asarray(ti.template_ids(sd, "<p8>", "person"))
    rows = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        state = ti.init_state(params, token_id, tx)
        step = jax.jit(ti.make_step(sd, sched, tx, token_id, 8, 0, parallel.data_sharding(mesh)))
        for _ in range(2):
            first = state.row
            state, _ = step(state, params, images, ids)
        rows.append((state.row, first))
    assert_adam_close(rows[1][0], rows[0][0], lr=cfg.lr, steps=2, depth=TI_DEPTH)
    with pytest.raises(AssertionError):   # one step fewer is far off
        assert_adam_close(rows[1][0], rows[0][1], lr=cfg.lr, steps=2, depth=TI_DEPTH)


@pytest.mark.parametrize("subjects,batch,shape", [(2, 8, (1, 8)), (8, 1, (8, 1)), (3, 2, (1, 2)), (4, 2, (4, 2)),
                                                  (6, 4, (2, 4)), (1, 3, (1, 1)), (8, 4, (2, 4))])
def test_subject_mesh_keeps_the_batch_layout_then_spreads_subjects(subjects, batch, shape):
    n = jax.device_count()
    mesh = parallel.subject_mesh(subjects, batch)
    assert mesh.axis_names == (parallel.SUBJECTS, parallel.AXIS)
    if n == 8:   # the layouts above
        assert mesh.devices.shape == shape
    # any count: the most devices dividing the batch, then the most subject groups that fit
    shape = mesh.devices.shape
    assert shape[1] == max(d for d in range(1, n + 1) if batch % d == 0 and n % d == 0)
    assert shape[0] == max(s for s in range(1, n // shape[1] + 1) if subjects % s == 0 and (n // shape[1]) % s == 0)
    assert shape[1] == parallel.batch_mesh(batch).devices.size   # each subject's batch as in a run alone
    assert len(set(mesh.devices.flat)) == shape[0] * shape[1]


def test_steps_on_encoded_images_equal_steps_on_the_images(tiny, faces):
    """The attacks give their steps the images' VAE posteriors (encoded once): the same batches,
    latents, losses and updates as encoding the drawn images at every step."""
    sd, params = tiny
    sched = sch.make_schedule(sd.scheduler)
    images = common.load_instance_images(faces, sd.resolution, 1, log=lambda s: None)
    cls = jnp.asarray(images[::-1] * 0.5)
    moments = common.moments_fn(sd)
    for b in (3, 4, 6):   # permutation draws and draws with replacement
        key, lat = jax.random.PRNGKey(b), jax.random.PRNGKey(10 + b)
        want = common.batch_latents(sd, params["vae"], key, images, b, lat)
        got = common.batch_latents(sd, params["vae"], key, moments(params["vae"], images), b, lat)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    sd_t, p_t, tok = sdm.add_placeholder_token(sd, params, "<m>", "person")
    cfg = ti_config()
    tx, _ = ti.make_optimizer(cfg, 4)
    ids = jnp.asarray(ti.template_ids(sd_t, "<m>", "person"))
    step = jax.jit(ti.make_step(sd_t, sched, tx, tok, 4, 0))
    runs = {}
    for name, x in (("images", images), ("moments", moments(p_t["vae"], images)), ("other", moments(p_t["vae"], cls))):
        state, losses = ti.init_state(p_t, tok, tx), []
        for _ in range(2):
            state, info = step(state, p_t, x, ids)
            losses.append(float(info["loss"]))
        runs[name] = state.row, losses
    np.testing.assert_allclose(runs["moments"][1], runs["images"][1], rtol=1e-5)
    assert_adam_close(runs["moments"][0], runs["images"][0], lr=cfg.lr, steps=2, depth=TI_DEPTH)
    assert abs(runs["other"][1][0] - runs["images"][1][0]) > 1e-3   # other images' moments: another loss
    cfg = db_config()
    tx = dreambooth.make_optimizer(cfg)
    ids = jnp.asarray(sdm.tokenize(sd, [cfg.instance_prompt, cfg.class_prompt]))
    frozen = dreambooth.frozen_params(params, cfg)
    step = jax.jit(dreambooth.make_step(sd, sched, tx, cfg, 4, 0))
    runs = {}
    for name, (x, c) in (("images", (images, cls)), ("moments", (moments(params["vae"], images),
                                                                   moments(params["vae"], cls)))):
        state = dreambooth.init_state(params, cfg, tx, jax.random.PRNGKey(0))
        state, info = step(state, frozen, x, c, ids[0], ids[1])
        runs[name] = state.trainable, {k: float(v) for k, v in info.items()}
    for k in ("loss_instance", "loss_prior"):
        np.testing.assert_allclose(runs["moments"][1][k], runs["images"][1][k], rtol=1e-5)
    # one AdamW step, forward and backward through the VAE encoder and the UNet
    assert_adam_close(runs["moments"][0]["unet"], runs["images"][0]["unet"], lr=cfg.lr, steps=1, depth=TI_DEPTH,
                      cancelling=tiny_unet_offsets)
