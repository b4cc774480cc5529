"""Stable Diffusion's KL autoencoder (diffusers' ``AutoencoderKL``) in flax.linen, NHWC throughout.

Computes what diffusers' PyTorch ``AutoencoderKL`` computes, natively:

- resnets ``x + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with a 1x1 ``conv_shortcut`` when the
  width changes; every GroupNorm (resnets, mid-block attention, ``conv_norm_out``) has eps 1e-6;
- encoder: ``conv_in``, one DownEncoderBlock2D per width (``layers_per_block`` resnets, then, but
  for the last, a stride-2 3x3 conv after zero padding of one row and column at the bottom and
  right), the mid block (resnet, single-head attention over all positions with residual, resnet),
  norm, SiLU, ``conv_out`` to mean and log-variance;
- decoder: ``conv_in``, mid block, one UpDecoderBlock2D per width in reverse
  (``layers_per_block + 1`` resnets, then, but for the last, nearest x2 upsampling and a 3x3 conv),
  norm, SiLU, ``conv_out``.

``encode`` returns the unscaled latent moments after ``quant_conv`` (log-variance clipped to
[-30, 20] as diffusers does); ``decode`` takes unscaled latents: the caller applies
``scaling_factor``. The parameter tree is diffusers' ``FlaxAutoencoderKL``'s, name for name and
shape for shape, so its msgpack files and checkpoints load unchanged.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldu_jax.errors import ConfigError
from ldu_jax.sd.conv import conv

Dtype = Any
NORM_EPS = 1e-6  # diffusers' VAE passes eps 1e-6 to every GroupNorm (not torch's default 1e-5)

# AutoencoderKL.__init__ keys besides VAEConfig's fields. These we build only at one value: any
# other changes the function (a different activation, no quant conv, no mid attention) or means
# latent statistics the SD pipeline does not use.
_FIXED = dict(act_fn="silu", use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
              shift_factor=None, latents_mean=None, latents_std=None)
# PyTorch's hint to run a half-precision VAE in float32: the same function when we run in float32.
_FLOAT32_ONLY = ("force_upcast",)
_BLOCKS = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The keys of a diffusers ``vae/config.json`` that shape the function; defaults are
    AutoencoderKL's."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_shape(self, resolution: int, what: str = "the image size") -> tuple[int, int, int]:
        """(h, w, c) of the latents of ``resolution`` px square images."""
        if resolution % self.factor:
            raise ConfigError(f"{what} {resolution} is not divisible by the VAE's factor {self.factor}")
        return (resolution // self.factor, resolution // self.factor, int(self.latent_channels))

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "vae/config.json", *, dtype=jnp.float32) -> VAEConfig:
        """Read a config dict strictly: keys starting with '_' are metadata; every other key is
        honoured, or checked against the one value we build, or refused, naming ``where``, the key
        and the value. ``dtype`` is the compute dtype the module will run in (see _FLOAT32_ONLY)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {}
        for k, v in cfg.items():
            if k.startswith("_"):
                continue
            if k in names:
                kept[k] = tuple(v) if isinstance(v, list) else v
            elif k in _FIXED:
                if v != _FIXED[k]:
                    raise ConfigError(f"{where}: {k}={v!r} is not supported (only {_FIXED[k]!r})")
            elif k in _FLOAT32_ONLY:
                if v and jnp.dtype(dtype) != jnp.float32:
                    raise ConfigError(f"{where}: {k}={v!r} is honoured in float32 only, not {jnp.dtype(dtype)}")
            else:
                raise ConfigError(f"{where}: unknown config key {k!r} (= {v!r}); not supported")
        config = cls(**kept)
        for k, supported in _BLOCKS.items():
            for name in getattr(config, k):
                if name != supported:
                    raise ConfigError(f"{where}: block type {name!r} in {k} is not supported "
                                      f"(supported: {supported})")
        n = len(config.block_out_channels)
        if not len(config.down_block_types) == len(config.up_block_types) == n:
            # diffusers would pair widths and blocks by index and resample at odd places
            raise ConfigError(f"{where}: down_block_types={config.down_block_types!r} and up_block_types="
                              f"{config.up_block_types!r} need one block per entry of block_out_channels "
                              f"({n}); not supported")
        return config


def _norm(groups: int, dtype, name=None):
    return nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = conv(self.out_channels, 3, self.dtype, "conv1")(nn.silu(_norm(self.groups, self.dtype, "norm1")(x)))
        h = conv(self.out_channels, 3, self.dtype, "conv2")(nn.silu(_norm(self.groups, self.dtype, "norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with residual."""
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = _norm(self.groups, self.dtype, "group_norm")(x).reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y) for n in ("query", "key", "value"))
        logits = jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)  # torch upcasts it too
        y = nn.Dense(c, dtype=self.dtype, name="proj_attn")(jnp.einsum("bqk,bkc->bqc", weights, v))
        return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
        x = Attention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Resample(nn.Module):
    """'down': pad bottom/right by one, stride-2 3x3 conv (diffusers' Downsample2D with padding 0);
    'up': nearest x2 (each pixel repeated), 3x3 conv."""
    mode: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if self.mode == "down":
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return conv(c, 3, self.dtype, "conv", stride=2, pad=0)(x)
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(c, 3, self.dtype, "conv")(x)


class Block(nn.Module):
    """DownEncoderBlock2D (mode 'down') or UpDecoderBlock2D (mode 'up'): resnets, then resampling
    unless ``mode`` is None (the last block)."""
    out_channels: int
    num_layers: int
    groups: int
    mode: str | None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.mode is not None:
            x = Resample(self.mode, self.dtype, name=f"{self.mode}samplers_0")(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        widths = cfg.block_out_channels
        x = conv(widths[0], 3, dt, "conv_in")(x)
        for i, ch in enumerate(widths):
            mode = "down" if i < len(widths) - 1 else None
            x = Block(ch, cfg.layers_per_block, cfg.norm_num_groups, mode, dt, name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg.norm_num_groups, dt, name="mid_block")(x)
        x = nn.silu(_norm(cfg.norm_num_groups, dt, "conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, 3, dt, "conv_out")(x)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, dt = self.config, self.dtype
        widths = cfg.block_out_channels[::-1]
        x = conv(widths[0], 3, dt, "conv_in")(z)
        x = MidBlock(cfg.norm_num_groups, dt, name="mid_block")(x)
        for i, ch in enumerate(widths):
            mode = "up" if i < len(widths) - 1 else None
            x = Block(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, mode, dt, name=f"up_blocks_{i}")(x)
        x = nn.silu(_norm(cfg.norm_num_groups, dt, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, dt, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """``encode(x [B,H,W,in]) -> (mean, logvar)`` [B,H/f,W/f,latent] and ``decode(z) -> [B,H,W,out]``,
    unscaled latents; ``__call__`` (decode of the mean) builds every parameter for ``init``."""
    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        latent = self.config.latent_channels
        self.encoder = Encoder(self.config, self.dtype)
        self.decoder = Decoder(self.config, self.dtype)
        self.quant_conv = conv(2 * latent, 1, self.dtype)
        self.post_quant_conv = conv(latent, 1, self.dtype)

    def encode(self, x):
        mean, logvar = jnp.split(self.quant_conv(self.encoder(x)), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def __call__(self, x):
        return self.decode(self.encode(x)[0])

    def init_params(self, rng) -> dict:
        """Random float32 params; the key is split as diffusers' ``init_weights`` split it, so a seed
        gives the weights it gave before we owned the module."""
        params_rng, dropout_rng = jax.random.split(rng)
        s = self.config.factor
        x = jnp.zeros((1, s, s, self.config.in_channels), jnp.float32)
        return self.init({"params": params_rng, "dropout": dropout_rng}, x)["params"]
