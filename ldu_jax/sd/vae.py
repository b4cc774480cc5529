"""The Stable Diffusion VAE (diffusers Flax) as pure functions on NHWC images in [-1, 1].

Latents are NHWC and scaled: ``encode`` multiplies by the VAE's ``scaling_factor``, ``decode``
divides first. diffusers' Flax VAE takes NCHW input and returns NCHW output; the transposes live
here only.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


def quiet_diffusers():
    """Silence diffusers' per-module Flax deprecation lines (call before importing its Flax
    classes: some log at import) and transformers' Flax deprecation line."""
    import logging

    from diffusers.utils import logging as dlogging
    dlogging.set_verbosity_error()
    logging.getLogger("transformers.modeling_flax_utils").setLevel(logging.ERROR)


class VAE(NamedTuple):
    module: Any  # diffusers FlaxAutoencoderKL
    params: Any

    @property
    def scaling_factor(self) -> float:
        return float(self.module.config.scaling_factor)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.module.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.module.config.latent_channels)


def compiled_init(init, *args):
    """Run a random ``init`` jitted at XLA optimisation level 0: its compile time is dominated by
    the inlined threefry (about 4x faster to compile on CPU); deterministic for given args."""
    return jax.jit(init).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16), sample_size=64)


def tiny_vae(seed: int = 0) -> VAE:
    """A small randomly initialised VAE with SD's downsampling factor 8 (64 px -> 8x8 latents)."""
    quiet_diffusers()
    from diffusers import FlaxAutoencoderKL
    module = FlaxAutoencoderKL(**TINY_VAE)
    return VAE(module, compiled_init(module.init_weights, jax.random.PRNGKey(seed)))


def load_vae(source: str, dtype=jnp.float32) -> VAE:
    """Load a VAE: ``tiny`` (random), a diffusers folder (a VAE folder or a full SD folder with
    ``vae/``), or a hub id when online (e.g. ``stabilityai/sd-vae-ft-mse``)."""
    quiet_diffusers()
    from diffusers import FlaxAutoencoderKL
    if source == "tiny":
        return tiny_vae()
    kwargs = {"dtype": dtype}
    if os.path.isdir(source):
        if os.path.isdir(os.path.join(source, "vae")):
            kwargs["subfolder"] = "vae"
    elif source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"VAE folder {source} does not exist")
    module, params = FlaxAutoencoderKL.from_pretrained(source, **kwargs)
    return VAE(module, params)


def save_vae(vae: VAE, path: str):
    vae.module.save_pretrained(path, params=vae.params)


def encode(vae: VAE, params, images, key=None):
    """NHWC images in [-1, 1] -> scaled NHWC latents (a posterior sample if key, else its mean)."""
    dist = vae.module.apply({"params": params}, jnp.transpose(images, (0, 3, 1, 2)),
                            method=vae.module.encode).latent_dist
    z = dist.mean if key is None else dist.sample(key)
    return z * vae.scaling_factor


def posterior(vae: VAE, params, images):
    """NHWC images in [-1, 1] -> (mean, std) of the scaled latent posterior: a sample is
    mean + std * N(0, I), the same draw ``encode`` makes from the same key."""
    dist = vae.module.apply({"params": params}, jnp.transpose(images, (0, 3, 1, 2)),
                            method=vae.module.encode).latent_dist
    return dist.mean * vae.scaling_factor, dist.std * vae.scaling_factor


def decode(vae: VAE, params, latents):
    """Scaled NHWC latents -> NHWC images (nominally in [-1, 1])."""
    out = vae.module.apply({"params": params}, latents / vae.scaling_factor, method=vae.module.decode)
    return jnp.transpose(out.sample, (0, 2, 3, 1))


_DECODERS: dict = {}


def decoder(module):
    """A jitted ``(params, latents) -> images`` for a VAE module, compiled once per module and shape.

    Keyed on the module's identity: a module built from a JSON config holds lists and is not
    hashable (the entry keeps the module alive, so its id is not reused)."""
    entry = _DECODERS.get(id(module))
    if entry is None or entry[0] is not module:
        entry = _DECODERS[id(module)] = (module, jax.jit(lambda params, z: decode(VAE(module, None), params, z)))
    return entry[1]
