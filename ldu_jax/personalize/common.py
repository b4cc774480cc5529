"""What Textual Inversion and DreamBooth share: instance images, the denoising loss, batches."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ldu_jax import data as data_lib
from ldu_jax.sd import models as sdm
from ldu_jax.sd import schedule as sch
from ldu_jax.sd import vae as vae_lib


def load_instance_images(folder: str, resolution: int, min_images: int = 1, log=print) -> np.ndarray:
    """The folder's images, centre-cropped and resized to the model resolution, [N, R, R, 3] in [-1, 1]."""
    paths = data_lib.list_images(folder)
    images, good, bad = data_lib.load_images(paths, resolution)
    if bad:
        data_lib.report_bad(bad, len(paths), log)
    if len(good) < min_images:
        raise data_lib.DataError(f"{folder}: {len(good)} usable images, at least {min_images} needed")
    sizes = sorted({Image.open(p).size for p in good})
    if sizes != [(resolution, resolution)]:
        log(f"{folder}: {len(good)} images of sizes {', '.join(f'{w}x{h}' for w, h in sizes[:5])}"
            f"{' ...' if len(sizes) > 5 else ''} centre-cropped and resized to {resolution}x{resolution}")
    return images


def _draw(key, n: int, batch_size: int, flip: bool):
    """Which of n images a batch takes (without replacement when possible) and which it mirrors."""
    k_idx, k_flip = jax.random.split(key)
    if batch_size <= n:
        idx = jax.random.permutation(k_idx, n)[:batch_size]
    else:
        idx = jax.random.randint(k_idx, (batch_size,), 0, n)
    f = jax.random.bernoulli(k_flip, 0.5, (batch_size,)) if flip else jnp.zeros((batch_size,), bool)
    return idx, f


def sample_batch(key, images, batch_size: int, flip: bool = True):
    """A random batch of the instance images (without replacement when possible), randomly flipped."""
    idx, f = _draw(key, images.shape[0], batch_size, flip)
    x = images[idx]
    return jnp.where(f[:, None, None, None], x[:, :, ::-1], x) if flip else x


class Moments(NamedTuple):
    """The VAE posterior (scaled mean and std) of a set of images and of their mirror images,
    [2, N, h, w, c] each (index 1: mirrored). A trainer that only reads the images through the
    frozen VAE encodes them once (``image_moments``) instead of at every step."""
    mean: Any
    std: Any


def image_moments(sd, vae_params, images) -> Moments:
    """``Moments`` of images [N, R, R, 3] in [-1, 1]."""
    both = jnp.concatenate([images, images[:, :, ::-1]])
    mean, std = vae_lib.posterior(vae_lib.VAE(sd.vae, None), vae_params, both)
    return Moments(*(a.reshape((2, images.shape[0]) + a.shape[1:]) for a in (mean, std)))


def batch_latents(sd, vae_params, key, source, batch_size: int, latents_key, sharding=None):
    """A random flipped batch of scaled latents, posterior samples drawn with ``latents_key``.

    ``source``: the images [N, R, R, 3] (encoded here) or their ``Moments``; the same keys give
    the same batch either way (up to float rounding). ``sharding``: a constraint for the batch."""
    def constrain(a):
        return a if sharding is None else jax.lax.with_sharding_constraint(a, sharding)

    if not isinstance(source, Moments):
        x = constrain(sample_batch(key, source, batch_size))
        return vae_lib.encode(vae_lib.VAE(sd.vae, None), vae_params, x, latents_key)
    idx, f = _draw(key, source.mean.shape[1], batch_size, True)
    mean, std = (constrain(a[f.astype(jnp.int32), idx]) for a in source)
    return mean + std * jax.random.normal(latents_key, mean.shape, mean.dtype)


def denoising_loss(sd, sched, params, images, input_ids, key, latents_key=None):
    """Per-example SD noise-prediction loss of images [B,R,R,3] under prompts input_ids [B, L].

    ``params``: {'vae', 'unet', 'text_encoder'}. The VAE latent is a posterior sample (as the
    diffusers trainers do); t ~ U{0..T-1}; the target follows the model's prediction type.
    """
    k_lat, k_noise, k_t = jax.random.split(key, 3)
    z = vae_lib.encode(vae_lib.VAE(sd.vae, None), params["vae"], images, k_lat if latents_key is None else latents_key)
    return latent_loss(sd, sched, params, z, input_ids, k_noise, k_t)


def batch_loss(sd, sched, params, source, batch_key, batch_size: int, input_ids, key, sharding=None):
    """``denoising_loss`` of a random flipped batch of ``source`` (images or their ``Moments``,
    see ``batch_latents``), the batch drawn from ``batch_key``, latent, noise and t from ``key``."""
    k_lat, k_noise, k_t = jax.random.split(key, 3)
    z = batch_latents(sd, params["vae"], batch_key, source, batch_size, k_lat, sharding)
    return latent_loss(sd, sched, params, z, input_ids, k_noise, k_t)


def latent_loss(sd, sched, params, latents, input_ids, k_noise, k_t):
    """The noise-prediction loss on scaled latents (see ``denoising_loss``)."""
    noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
    t = jax.random.randint(k_t, (latents.shape[0],), 0, sched.num_train_timesteps)
    emb = sdm.text_embed(sd, params["text_encoder"], input_ids)
    pred = sdm.unet_apply(sd, params["unet"], sch.add_noise(sched, latents, noise, t), t, emb)
    return sch.noise_loss(sched, pred, latents, noise, t)


def generate(sd, params, prompts, *, n_per_prompt: int, steps: int, guidance: float, seed: int, batch: int = 4,
             latents=None):
    """{prompt: uint8 images [n, R, R, 3]} sampled with DDIM and classifier-free guidance.

    ``latents``: the starting noise, [len(prompts) x n_per_prompt, h, w, c] prompt by prompt (as
    diffusers' pipeline orders ``num_images_per_prompt``; its NCHW latents are
    ``.transpose(0, 2, 3, 1)`` of these); None draws it from ``seed``."""
    sched = sch.make_schedule(sd.scheduler)
    shape = sdm.latent_shape(sd, sd.resolution)
    if latents is not None:
        latents = np.asarray(latents, np.float32)
        if latents.shape != (len(prompts) * n_per_prompt,) + shape:
            raise ValueError(f"latents of shape {latents.shape}; this model and {len(prompts)} prompt(s) x "
                             f"{n_per_prompt} need {(len(prompts) * n_per_prompt,) + shape}")
    embed = _embedder(sd)
    uncond = embed(params["text_encoder"], sdm.tokenize(sd, [""]))
    predict = _predictor(sd)
    decode = vae_lib.decoder(sd.vae)
    out = {}
    for pi, prompt in enumerate(prompts):
        cond = embed(params["text_encoder"], sdm.tokenize(sd, [prompt]))
        imgs = []
        for start in range(0, n_per_prompt, batch):
            b = min(batch, n_per_prompt - start)
            if latents is None:
                key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), pi), start)
                x = jax.random.normal(key, (batch,) + shape)  # fixed shape: one compilation
            else:
                x = np.zeros((batch,) + shape, np.float32)
                x[:b] = latents[pi * n_per_prompt + start:][:b]
            z = sch.ddim_sample(predict, params["unet"], sched, x, jnp.repeat(cond, batch, 0),
                                jnp.repeat(uncond, batch, 0), steps=steps, guidance=float(guidance))
            imgs.append(data_lib.to_uint8(np.asarray(decode(params["vae"], z))[:b]))
        out[prompt] = np.concatenate(imgs)
    return out


@functools.lru_cache(maxsize=None)
def moments_fn(sd):
    """A jitted ``image_moments(sd, vae_params, images)`` per model."""
    return jax.jit(lambda p, x: image_moments(sd, p, x))


@functools.lru_cache(maxsize=None)
def _embedder(sd):
    """A jitted ``embed(text_encoder_params, ids)`` per model (compiled once per model and shape)."""
    return jax.jit(lambda p, ids: sdm.text_embed(sd, p, ids))


@functools.lru_cache(maxsize=None)
def _predictor(sd):
    """A stable (hashable) ``predict(unet_params, x, t, emb)`` per model, so DDIM compiles once."""
    return lambda p, x, t, e: sdm.unet_apply(sd, p, x, t, e)
