"""The mini-world build reproduces every model from nothing (test profile) and resumes."""
import json
import os

from ldu_jax.jobs import build_world as build


def test_build_test_profile_makes_every_model_and_skips_finished_stages(test_world, tmp_path):
    from ldu_jax.miniworld import identity
    from ldu_jax.sd import models as sdm
    from ldu_jax.shortcut import sampling, trainer
    from ldu_jax.sources import shortcut as load_shortcut
    from ldu_jax.sd.models import latent_shape
    w, manifest, logs, settings = test_world
    assert all(manifest[s]["done"] for s in build.STAGES)
    assert sorted(os.listdir(os.path.join(w, "data", "heldout"))) == ["subject_0", "subject_1"]
    sd, params = sdm.load_sd(manifest["t2i"]["path"])  # the normal loading code reads the bundle
    assert sd.resolution == 64 and latent_shape(sd, 64) == (16, 16, 4)
    dit, dit_params, null = load_shortcut(manifest["shortcut"]["path"], latent_shape(sd, 64))
    import jax
    import jax.numpy as jnp
    z = sampling.denoise(trainer.make_apply(dit), dit_params, jnp.zeros((1, 16, 16, 4)),
                         jnp.full((1,), null, jnp.int32), steps=2)
    assert bool(jnp.isfinite(z).all())
    ident = identity.load(manifest["identity"]["path"], batch_size=4)
    assert ident.embed(json_free_images(w)).shape[0] == 2
    # export: every shipped model loads through the normal loaders, without optimizer state
    exp = manifest["export"]["path"]
    assert sorted(os.listdir(exp)) == ["identity", "manifest.json", "rho", "sd", "shortcut"]
    assert sdm.load_sd(os.path.join(exp, "sd"))[0].resolution == 64
    _, exp_params, _ = load_shortcut(os.path.join(exp, "shortcut"), latent_shape(sd, 64))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), exp_params, dit_params))
    from ldu_jax import checkpoint as ckpt
    from ldu_jax.jobs.protect import rho_checkpoint
    assert set(ckpt.restore_state(os.path.join(exp, "shortcut"))[0]) == {"params_ema"}
    rho, meta = rho_checkpoint(os.path.join(exp, "rho"))
    assert meta["kind"] == "ldu-rho" and "params" in rho
    exp_ident = identity.load(os.path.join(exp, "identity"), batch_size=4)
    assert (exp_ident.embed(json_free_images(w)) == ident.embed(json_free_images(w))).all()
    dest = build.install(w, str(tmp_path / "pkg_models"))
    assert sorted(os.listdir(dest)) == sorted(os.listdir(exp))
    # the evaluation's face metrics can use the world's identity model
    from configs import eval_tiny
    from ldu_jax.evaluate import measure
    cfg = eval_tiny.get_config()
    cfg.face_backend = f"miniworld:{manifest['identity']['path']}"
    images = json_free_images(w)
    try:  # a 4-step detector may see no face at all: then the metric is skipped, saying so
        m = measure.Metrics(cfg, log=logs.append).face(list(images), list(images))
        assert set(m) == {"fdfr", "ism", "fd_identity"} and 0 <= m["fdfr"] <= 1
    except measure.Skip as e:
        assert "no face detected" in str(e)
    again = []
    build.build(w, "test", log=again.append, settings=settings)
    assert all("done already" in line for line in again)  # every stage skipped on a rerun
    assert json.load(open(os.path.join(w, "manifest.json"))) == manifest


def json_free_images(w):
    import numpy as np
    from PIL import Image
    folder = os.path.join(w, "data", "heldout", "subject_0", "set_A")
    return np.stack([np.asarray(Image.open(os.path.join(folder, f)).convert("RGB"))
                     for f in sorted(os.listdir(folder))[:2]])


def test_fragile_profile_exports_the_base_world_with_its_new_vae(tmp_path):
    """The fragile profile fine-tunes the shipped VAE, and its export is the base world's models
    with that VAE in the t2i bundle; the base is left as it was."""
    import jax
    import numpy as np
    from ldu_jax import files
    from ldu_jax.miniworld import MODELS
    from ldu_jax.sd import vae as vae_lib
    cfg = build.configs("fragile")
    assert cfg["vae"].fragile.weight > 0 and cfg["vae"].init_from == os.path.join(MODELS, "sd", "vae")
    assert cfg["base"] == MODELS and cfg["t2i"] is None
    base, w = tmp_path / "base", tmp_path / "w"
    vae_lib.save_vae(vae_lib.tiny_vae(0), str(base / "sd" / "vae"))
    (base / "sd" / "unet").mkdir()
    (base / "sd" / "unet" / "weights").write_text("unet")
    (base / "identity").mkdir()
    (base / "identity" / "weights").write_text("identity")
    files.write_json(base / "manifest.json", {"t2i": {"done": True}})
    new = vae_lib.tiny_vae(1)
    vae_lib.save_vae(new, str(w / "vae" / "vae"))
    files.write_json(w / "manifest.json", {"vae": {"done": True, "path": str(w / "vae" / "vae")}})
    out = build.export(str(w), str(base))
    assert sorted(os.listdir(out)) == ["identity", "manifest.json", "sd"]
    assert (tmp_path / "w" / "export" / "sd" / "unet" / "weights").read_text() == "unet"
    got = vae_lib.load_vae(os.path.join(out, "sd", "vae"))
    for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(new.params)):
        np.testing.assert_array_equal(a, b)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["base"]["path"] == str(base) and manifest["base"]["t2i"] == {"done": True}
    assert manifest["vae"]["done"]
    base_vae = vae_lib.load_vae(str(base / "sd" / "vae"))          # the base keeps its own VAE
    ref = vae_lib.tiny_vae(0)
    for a, b in zip(jax.tree_util.tree_leaves(base_vae.params), jax.tree_util.tree_leaves(ref.params)):
        np.testing.assert_array_equal(a, b)
