"""The Stable Diffusion VAE (``autoencoder.AutoencoderKL``) as pure functions on NHWC images in [-1, 1].

Latents are NHWC and scaled: ``encode`` multiplies by the VAE's ``scaling_factor``, ``decode``
divides first.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ldu_jax import files
from ldu_jax.errors import MissingError
from ldu_jax.sd import weights
from ldu_jax.sd.autoencoder import AutoencoderKL, VAEConfig


class VAE(NamedTuple):
    module: AutoencoderKL
    params: Any

    @property
    def scaling_factor(self) -> float:
        return float(self.module.config.scaling_factor)

    @property
    def factor(self) -> int:
        return self.module.config.factor

    @property
    def latent_channels(self) -> int:
        return int(self.module.config.latent_channels)

    def latent_shape(self, resolution: int, what: str = "the image size") -> tuple[int, int, int]:
        return self.module.config.latent_shape(resolution, what)


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
    module = AutoencoderKL(VAEConfig.from_dict(TINY_VAE))
    return VAE(module, compiled_init(module.init_params, jax.random.PRNGKey(seed)))


def load_vae(source: str, dtype=jnp.float32, allow_pickle: bool = False) -> VAE:
    """Load a VAE from a diffusers folder (a VAE folder, or an SD folder with
    ``vae/``) or a hub id when online (e.g. ``stabilityai/sd-vae-ft-mse``), its weights read as
    ``load_sd`` reads them."""
    source = os.path.expanduser(source)
    if not os.path.isdir(source):
        if not weights.is_hub_id(source):
            raise MissingError(f"VAE folder {source} does not exist")
        source = weights.download(source, parts=("", "vae"))
    if os.path.isdir(os.path.join(source, "vae")):
        source = os.path.join(source, "vae")
    config = VAEConfig.from_dict(weights.read_config(source, "vae"), os.path.join(source, "config.json"), dtype=dtype)
    module = AutoencoderKL(config, dtype)
    shapes = jax.eval_shape(module.init_params, jax.random.PRNGKey(0))
    return VAE(module, weights.load(source, "vae", shapes, allow_pickle))


def save_vae(vae: VAE, path: str):
    """A diffusers VAE folder (config.json, PyTorch-layout safetensors), written atomically."""
    with files.atomic_dir(path) as tmp:
        weights.save(tmp, "vae", vae.module.config, vae.params)


def encode(vae: VAE, params, images, key=None):
    """NHWC images in [-1, 1] -> scaled NHWC latents (a posterior sample if key, else its mean)."""
    mean, std = posterior(vae, params, images)
    return mean if key is None else mean + std * jax.random.normal(key, mean.shape, mean.dtype)


def posterior(vae: VAE, params, images):
    """NHWC images in [-1, 1] -> (mean, std) of the scaled latent posterior: a sample is
    mean + std * N(0, I), the same draw ``encode`` makes from the same key."""
    mean, logvar = vae.module.apply({"params": params}, images, method=vae.module.encode)
    return mean * vae.scaling_factor, jnp.exp(0.5 * logvar) * vae.scaling_factor


def decode(vae: VAE, params, latents):
    """Scaled NHWC latents -> NHWC images (nominally in [-1, 1])."""
    return vae.module.apply({"params": params}, latents / vae.scaling_factor, method=vae.module.decode)


_DECODERS: dict = {}


def decoder(module):
    """A jitted ``(params, latents) -> images`` for a VAE module, compiled once per module and shape.

    Keyed on the module's identity (the entry keeps the module alive, so its id is not reused)."""
    entry = _DECODERS.get(id(module))
    if entry is None or entry[0] is not module:
        entry = _DECODERS[id(module)] = (module, jax.jit(lambda params, z: decode(VAE(module, None), params, z)))
    return entry[1]
