"""Every name a config or flag may give for a model or a set of images, resolved in one place.

A source is a path (a folder, a work dir), a hub id where a model may come from the hub, or one of
these names:

    models     sd / vae     'tiny'            a small random Stable Diffusion (or its VAE): tests, smoke runs
               vae          'none'            no VAE: the shortcut model works in pixel space
               shortcut     'random'          an untrained shortcut DiT (its zero final layer makes
                                              inversion and denoising exact): tests
               face         'dlib', 'arcface' a face recognition library (metrics/face.py)
                            'miniworld:DIR'   the mini-world's identity model in a build's work dir
    images     dataset      'samples'         a few built-in procedural portraits
                            'miniworld'       the mini-world's training portraits (or held-out ones
                                              where a held-out set is asked for)
               subjects     'demo:N'          N procedural subjects (Anti-DreamBooth layout)
                            'miniworld:N'     N held-out identities of the mini-world

Image sources are written into the caller's work dir once and reused.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from ldu_jax import checkpoint as ckpt
from ldu_jax import data as data_lib
from ldu_jax.errors import ConfigError, MissingError
from ldu_jax.metrics import face as face_lib
from ldu_jax.miniworld import identity, world
from ldu_jax.models.dit import DiT, dit_from_config
from ldu_jax.purify import DiffusionModels
from ldu_jax.sd import models as sdm
from ldu_jax.sd import vae as vae_lib
from ldu_jax.sd import weights
from ldu_jax.sd.autoencoder import VAEConfig

TINY, NONE, RANDOM, SAMPLES, MINIWORLD, DEMO = "tiny", "none", "random", "samples", "miniworld", "demo"

# the 'random' shortcut DiT: configs/shortcut_tiny.py's architecture
RANDOM_DIT = dict(patch_size=2, hidden_size=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=1)


def _kind(spec) -> tuple[str, str]:
    """('demo', '4') for 'demo:4'; (spec, '') for a name or a path."""
    kind, sep, arg = str(spec).partition(":")
    return (kind, arg) if sep and kind in (DEMO, MINIWORLD) else (str(spec), "")


# ------------------------------------------------------------------------------------ models

def sd(spec: str, dtype=jnp.float32, allow_pickle: bool = False):
    """``(SD, params)``: 'tiny', a diffusers folder or a hub id (``sd.models.load_sd``)."""
    if spec == TINY:
        return sdm.tiny_sd(dtype=dtype)
    return sdm.load_sd(spec, dtype=dtype, allow_pickle=allow_pickle)


def vae(spec: str, dtype=jnp.float32):
    """A ``sd.vae.VAE``: 'tiny', a diffusers (VAE or SD) folder or a hub id; None for 'none'."""
    if spec == NONE:
        return None
    if spec == TINY:
        return vae_lib.tiny_vae()
    return vae_lib.load_vae(spec, dtype)


def vae_config(spec: str):
    """The ``VAEConfig`` of a VAE source without loading weights or downloading: 'tiny', a folder
    (a VAE folder or an SD folder with vae/), or a hub id already in the local hub cache; None when
    it is not available here (or for 'none')."""
    if spec == NONE:
        return None
    if spec == TINY:
        return VAEConfig.from_dict(vae_lib.TINY_VAE)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        for sub in ("vae", ""):
            if os.path.isfile(os.path.join(path, sub, "config.json")):
                where = os.path.join(path, sub, "config.json")
                return VAEConfig.from_dict(weights.read_config(os.path.join(path, sub), "vae"), where)
        return None
    if weights.is_hub_id(spec):
        from huggingface_hub import try_to_load_from_cache   # only with a hub id
        for name in ("vae/config.json", "config.json"):
            f = try_to_load_from_cache(spec, name)
            if isinstance(f, str):
                return VAEConfig.from_dict(weights.read_config(os.path.dirname(f), "vae"), f)
    return None


def shortcut(spec: str, data_shape, seed: int = 0):
    """(DiT module, EMA params, null label) of a ``train.py`` work dir, or 'random'."""
    if spec == RANDOM:
        model = DiT(out_channels=data_shape[-1], class_dropout_prob=1.0, **RANDOM_DIT)
        z = jnp.zeros((1,))
        params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + tuple(data_shape)), z, z,
                            z.astype(jnp.int32))["params"]
        return model, params, RANDOM_DIT["num_classes"]
    if not os.path.isdir(spec):
        raise MissingError(f"shortcut model work dir {spec} does not exist (train one with train.py)")
    params, meta = ckpt.restore_params(spec, ema=True)
    if list(meta["data_shape"][-1:]) != [data_shape[-1]]:
        raise ConfigError(f"the shortcut model in {spec} was trained on inputs {meta['data_shape']}, "
                          f"but this VAE gives latents {list(data_shape)}")
    mc = ml_collections.ConfigDict(meta["model"])
    return dit_from_config(mc, data_shape[-1]), params, mc.num_classes


def diffusion_models(sd_spec: str, shortcut_spec: str | None = None, seed: int = 0) -> DiffusionModels:
    """What DiffPure needs: SD, and the shortcut DiT on its latents when ``shortcut_spec`` is given."""
    sd_, params = sd(sd_spec)
    if not shortcut_spec:
        return DiffusionModels(sd_, params)
    dit, dit_params, null = shortcut(shortcut_spec, sdm.latent_shape(sd_, sd_.resolution), seed)
    return DiffusionModels(sd_, {**params, "dit": dit_params}, dit, null)


def face_model(spec: str) -> face_lib.FaceModel:
    """The face model behind ISM / FDFR: 'dlib', 'arcface' or 'miniworld:<identity work dir>'."""
    kind, arg = _kind(spec)
    if kind == MINIWORLD:
        return identity.load(arg).as_face_model()
    return face_lib.load_face_model(spec)


# ------------------------------------------------------------------------------------ images

SAMPLE_COUNT = 4
MINIWORLD_TRAIN = (128, 4)   # identities x images of the 'miniworld' training set


def sample_folder(workdir: str, kind: str = SAMPLES, count: int = SAMPLE_COUNT) -> str:
    """A few built-in portraits (deterministic) written under ``workdir``: procedural portraits
    ('samples') or held-out identities of the mini-world ('miniworld')."""
    if kind not in (SAMPLES, MINIWORLD):
        raise ConfigError(f"unknown sample kind {kind!r}; 'samples' or 'miniworld'")
    folder = os.path.join(workdir, "sample_images" if kind == SAMPLES else f"sample_images_{kind}")
    if count != SAMPLE_COUNT:
        folder += f"_{count}"
    if os.path.isdir(folder) and len(os.listdir(folder)) >= count:
        return folder
    if kind == MINIWORLD:
        images = [world.render(ident, 0) for ident in world.heldout_identities(count)]
    else:
        images = [data_lib.procedural_portrait(i) for i in range(count)]
    for i, img in enumerate(images):
        data_lib.save_image_atomic(os.path.join(folder, f"sample_{i}.png"), img)
    return folder


def dataset_folder(spec: str, workdir: str) -> str:
    """The image folder of a training ``dataset``: a folder, 'samples' or 'miniworld' (the world's
    training portraits, rendered into ``workdir`` once; a folder must hold images: a DataError
    otherwise, before any model loads). Writing skips the images that exist, so
    every host may call it after process 0 (``parallel.process0_first``), on a shared file system
    or its own disk."""
    if spec == SAMPLES:
        return sample_folder(workdir)
    if spec == MINIWORLD:
        root = os.path.join(workdir, "miniworld_train")
        world.write_training_set(root, *MINIWORLD_TRAIN)
        return os.path.join(root, "images")
    data_lib.list_images(spec)
    return spec


def heldout_folder(spec: str, workdir: str) -> str:
    """The folder of a held-out set: '' (none), 'miniworld' (8 held-out identities, written into
    ``workdir`` once) or a folder."""
    return sample_folder(workdir, MINIWORLD, count=8) if spec == MINIWORLD else spec


def heldout_images(spec: str, res: int, workdir: str):
    """[N, res, res, 3] in [-1, 1] of a held-out set: '' (None), 'miniworld' (8 held-out identities)
    or a folder."""
    if not spec:
        return None
    folder = heldout_folder(spec, workdir)
    return jnp.asarray(data_lib.load_images(data_lib.list_images(folder), res)[0])


def subjects(spec: str, workdir: str, demo_size: int = 64) -> str:
    """The root of an evaluation's subjects (``<root>/<subject>/set_{A,B,C}``): a folder, or
    'demo:N' / 'miniworld:N' written into ``<workdir>/subjects``."""
    kind, n = _kind(spec)
    if kind not in (DEMO, MINIWORLD):
        return spec
    if not n.isdigit() or int(n) < 1:
        raise ConfigError(f"subjects {spec!r}: expected '{kind}:N' with N >= 1")
    root = os.path.join(workdir, "subjects")
    if kind == DEMO:
        return make_demo_subjects(root, int(n), size=demo_size)
    world.write_heldout_subjects(root, int(n))
    return root


SETS = ("set_A", "set_B", "set_C")


def make_demo_subjects(root: str, n: int, per_set: int = 4, size: int = 64) -> str:
    """``n`` procedural subjects in the Anti-DreamBooth layout (for CPU smoke evaluations)."""
    for s in range(n):
        for k, name in enumerate(SETS):
            folder = os.path.join(root, f"subject_{s}", name)
            for i in range(per_set):
                path = os.path.join(folder, f"{i:02d}.png")
                if not os.path.exists(path):
                    img = data_lib.procedural_portrait(100 + s, 10 * k + i, size, size)
                    data_lib.save_image_atomic(path, img)
    return root
