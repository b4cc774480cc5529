"""The conditional UNet of Stable Diffusion 1.x / 2.x in flax.linen, NHWC: our replacement for
diffusers' FlaxUNet2DConditionModel (diffusers 0.39 was the last release with Flax models).

- Parameters: exactly the tree (names and shapes) of diffusers' Flax UNet for the same config, so
  its msgpack files and orbax checkpoints of UNet params load unchanged. Params are float32;
  convs, denses, LayerNorms and attention compute in ``dtype``, GroupNorms in float32 (as there).
- Function: diffusers' PyTorch UNet2DConditionModel, natively: exact (erf) GELU in GEGLU,
  GroupNorm eps 1e-6 in the spatial transformers, the config's norm_num_groups / norm_eps in the
  resnets and the output norm, LayerNorm eps 1e-5 in the transformer blocks, attention scale
  1/sqrt(head_dim), diffusers' sinusoidal timestep embedding (flip_sin_to_cos, freq_shift),
  nearest x2 upsampling, stride-2 padding-1 downsampling. (diffusers' Flax UNet uses tanh GELU
  and eps 1e-5 in the spatial transformers, and ignores norm_num_groups / norm_eps.)
- Config: ``UNetConfig.from_dict`` reads a diffusers unet/config.json strictly. Supported: the
  blocks CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn (or none), CrossAttnUpBlock2D,
  UpBlock2D; per-block heads (``attention_head_dim``: the number of heads, diffusers' naming
  quirk), only_cross_attention and transformer_layers_per_block; linear or 1x1-conv projections;
  upcast_attention in float32 (there it is the same function). Anything else (SDXL's added
  conditioning, class embeddings, per-block layers_per_block or cross_attention_dim, dropout, ...)
  is a ValueError naming the file, key and value.
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

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# Keys of UNet2DConditionModel's config whose only supported value is its default. dropout: the
# module is for inference (deterministic); num_attention_heads: diffusers itself refuses any value
# but None (attention_head_dim holds the number of heads); mid_block_only_cross_attention and
# resnet_skip_time_act only act on block types we refuse, but are held to the default all the same.
FIXED = dict(
    center_input_sample=False, act_fn="silu", downsample_padding=1, mid_block_scale_factor=1, dropout=0.0,
    num_attention_heads=None, dual_cross_attention=False, class_embed_type=None, num_class_embeds=None,
    encoder_hid_dim=None, encoder_hid_dim_type=None, resnet_time_scale_shift="default",
    resnet_skip_time_act=False, resnet_out_scale_factor=1.0, time_embedding_type="positional",
    time_embedding_dim=None, time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None,
    conv_in_kernel=3, conv_out_kernel=3, attention_type="default", class_embeddings_concat=False,
    cross_attention_norm=None, mid_block_only_cross_attention=None, reverse_transformer_layers_per_block=None,
    addition_embed_type=None, addition_time_embed_dim=None, addition_embed_type_num_heads=64,
    projection_class_embeddings_input_dim=None)
# Keys of diffusers' Flax UNet configs (folders written before we owned the module) that choose how
# attention is computed, not what
FLAX_ONLY = ("split_head_dim", "use_memory_efficient_attention")


def _is_int(v, low=1):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The keys of a diffusers UNet config that we compute, with diffusers' names and defaults (a
    key missing from a config.json means diffusers' default). Lists are held as tuples."""
    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8     # the number of heads per block (sic)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "unet/config.json") -> UNetConfig:
        """Read a diffusers config.json dict; refuse (ValueError naming ``where``, the key and the
        value) any key, value or block type we would not compute as diffusers' PyTorch UNet does."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in cfg.items():
            if k.startswith("_") or k in FLAX_ONLY:   # metadata (_class_name, ...), Flax-only choices
                continue
            if k in FIXED:
                if v != FIXED[k]:
                    raise ConfigError(f"{where}: {k}={v!r} is not supported (only {FIXED[k]!r})")
            elif k in fields:
                kw[k] = v
            else:
                raise ConfigError(f"{where}: unknown config key {k!r} (= {v!r}); not supported")
        try:
            return cls(**kw)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None

    def __post_init__(self):
        for f in dataclasses.fields(self):    # JSON lists -> tuples (hashable: a static jit argument)
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(tuple(x) if isinstance(x, list) else x for x in v))

        def refuse(key, why):
            raise ConfigError(f"{key}={getattr(self, key)!r} is not supported ({why})")

        if not (isinstance(self.block_out_channels, tuple) and self.block_out_channels
                and all(map(_is_int, self.block_out_channels))):
            refuse("block_out_channels", "a list of positive ints")
        n = len(self.block_out_channels)
        for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS),
                             ("mid_block_type", MID_BLOCKS)):
            names = getattr(self, key)
            for name in names if isinstance(names, tuple) else (names,):
                if name not in allowed:
                    raise ConfigError(f"block type {name!r} in {key} is not supported "
                                      f"(supported: {', '.join(map(str, allowed))})")
            if isinstance(names, tuple) and len(names) != n:
                refuse(key, f"one per entry of block_out_channels, {n}")
        for key in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "norm_num_groups"):
            if not _is_int(getattr(self, key)):
                refuse(key, "a positive int")
        if self.sample_size is not None and not _is_int(self.sample_size):
            refuse("sample_size", "a positive int or null")
        for key in ("use_linear_projection", "upcast_attention", "flip_sin_to_cos"):
            if not isinstance(getattr(self, key), bool):
                refuse(key, "true or false")
        for key in ("norm_eps", "freq_shift"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), (int, float)):
                refuse(key, "a number")
        for key, ok in (("attention_head_dim", _is_int), ("transformer_layers_per_block", _is_int),
                        ("only_cross_attention", lambda v: isinstance(v, bool))):
            vals = self.per_block(key)
            if len(vals) != n or not all(map(ok, vals)):
                refuse(key, f"one value, or one per block ({n})")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            refuse("norm_num_groups", f"must divide every entry of block_out_channels {self.block_out_channels}")
        # a spatial transformer keeps channels = heads * head_dim (PyTorch would shrink its width)
        heads = self.per_block("attention_head_dim")
        used = [i for i, t in enumerate(self.down_block_types) if t == "CrossAttnDownBlock2D"]
        used += [n - 1 - i for i, t in enumerate(self.up_block_types) if t == "CrossAttnUpBlock2D"]
        for i in used + ([n - 1] if self.mid_block_type else []):
            if self.block_out_channels[i] % heads[i]:
                refuse("attention_head_dim", f"{heads[i]} heads do not divide {self.block_out_channels[i]} channels")

    def per_block(self, key: str) -> tuple:
        """A per-block setting (int/bool or one per block) as one value per down block."""
        v = getattr(self, key)
        return v if isinstance(v, tuple) else (v,) * len(self.block_out_channels)

    def check_dtype(self, dtype, where: str = "UNetConfig"):
        """upcast_attention only changes PyTorch's half-precision attention: in float32 it is the
        same function; in lower precision we refuse it rather than compute something else."""
        if self.upcast_attention and jnp.dtype(dtype) != jnp.float32:
            raise ConfigError(f"{where}: upcast_attention=true is honoured in float32 only, not {jnp.dtype(dtype)}")


# ----------------------------------------------------------------------------- layers

def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
    """diffusers' get_timestep_embedding, in the same float32 operations: [B] -> [B, dim]."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)], -1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _group_norm(groups, eps, name):
    # no compute dtype: float32 with float32 params, as diffusers' Flax UNet; two-pass variance as
    # PyTorch (E[x^2] - E[x]^2 loses digits when the mean is large against the spread)
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, name=name)


class TimestepEmbedding(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)


class ResnetBlock(nn.Module):
    features: int
    groups: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        h = conv(self.features, 3, self.dtype, "conv1")(nn.silu(_group_norm(self.groups, self.eps, "norm1")(x)))
        h = h + nn.Dense(self.features, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = conv(self.features, 3, self.dtype, "conv2")(nn.silu(_group_norm(self.groups, self.eps, "norm2")(h)))
        if x.shape[-1] != self.features:
            x = conv(self.features, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """Multi-head attention: queries from ``x``, keys and values from ``ctx``."""
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, ctx):
        b, n, c = x.shape
        d = c // self.heads

        def proj(name, y):
            y = nn.Dense(c, use_bias=False, dtype=self.dtype, name=name)(y)
            return y.reshape(b, y.shape[1], self.heads, d)

        q, k, v = proj("to_q", x), proj("to_k", ctx), proj("to_v", ctx)
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * d ** -0.5, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, c)
        return nn.Dense(c, dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(8 * x.shape[-1], dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)    # exact GELU, as PyTorch's GEGLU


class FeedForward(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):   # net_1 is PyTorch's dropout
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(GEGLU(self.dtype, name="net_0")(x))


class TransformerBlock(nn.Module):
    heads: int
    only_cross_attention: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, ctx):
        def norm(name):
            return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name=name)

        h = norm("norm1")(x)
        x = x + Attention(self.heads, self.dtype, name="attn1")(h, ctx if self.only_cross_attention else h)
        x = x + Attention(self.heads, self.dtype, name="attn2")(norm("norm2")(x), ctx)
        return x + FeedForward(self.dtype, name="ff")(norm("norm3")(x))


class Transformer2D(nn.Module):
    """The spatial transformer: GroupNorm (eps 1e-6, whatever norm_eps says, as PyTorch's
    Transformer2DModel), projection in, transformer blocks, projection out, residual."""
    heads: int
    depth: int
    only_cross_attention: bool
    linear: bool      # use_linear_projection: Dense projections, else 1x1 convs (another kernel shape)
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, ctx):
        b, hh, ww, c = x.shape

        def proj(name):
            return nn.Dense(c, dtype=self.dtype, name=name) if self.linear else conv(c, 1, self.dtype, name)

        h = proj("proj_in")(_group_norm(self.groups, 1e-6, "norm")(x)).reshape(b, hh * ww, c)
        for k in range(self.depth):
            h = TransformerBlock(self.heads, self.only_cross_attention, self.dtype,
                                 name=f"transformer_blocks_{k}")(h, ctx)
        return x + proj("proj_out")(h.reshape(b, hh, ww, c))


class Resample(nn.Module):
    """Down: 3x3 conv, stride 2, padding 1. Up: nearest x2, then a 3x3 conv."""
    up: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], 3, self.dtype, "conv", stride=1 if self.up else 2)(x)


# ----------------------------------------------------------------------------- blocks

def _resnet(c: UNetConfig, level, dtype, name):
    return ResnetBlock(c.block_out_channels[level], c.norm_num_groups, c.norm_eps, dtype, name=name)


def _transformer(c: UNetConfig, level, dtype, name, only_cross_attention=None):
    only = c.per_block("only_cross_attention")[level] if only_cross_attention is None else only_cross_attention
    return Transformer2D(c.per_block("attention_head_dim")[level], c.per_block("transformer_layers_per_block")[level],
                         only, c.use_linear_projection, c.norm_num_groups, dtype, name=name)


class DownBlock(nn.Module):
    """Down block ``level``: resnets (each followed by a spatial transformer in a
    CrossAttnDownBlock2D), then a downsampler except at the last level. Returns its skips too."""
    config: UNetConfig
    level: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, ctx):
        c, i = self.config, self.level
        skips = []
        for j in range(c.layers_per_block):
            x = _resnet(c, i, self.dtype, f"resnets_{j}")(x, temb)
            if c.down_block_types[i] == "CrossAttnDownBlock2D":
                x = _transformer(c, i, self.dtype, f"attentions_{j}")(x, ctx)
            skips.append(x)
        if i < len(c.block_out_channels) - 1:
            x = Resample(False, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet, spatial transformer (never cross-attention only), resnet, at the last level."""
    config: UNetConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, ctx):
        c, i = self.config, len(self.config.block_out_channels) - 1
        x = _resnet(c, i, self.dtype, "resnets_0")(x, temb)
        x = _transformer(c, i, self.dtype, "attentions_0", only_cross_attention=False)(x, ctx)
        return _resnet(c, i, self.dtype, "resnets_1")(x, temb)


class UpBlock(nn.Module):
    """Up block ``index`` (the level of down block n-1-index, whose per-block settings it takes):
    layers_per_block + 1 resnets on [x, skip] (each followed by a spatial transformer in a
    CrossAttnUpBlock2D), then an upsampler except in the last up block."""
    config: UNetConfig
    index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, ctx, skips):
        c = self.config
        i = len(c.block_out_channels) - 1 - self.index
        for j, skip in enumerate(reversed(skips)):
            x = _resnet(c, i, self.dtype, f"resnets_{j}")(jnp.concatenate([x, skip], axis=-1), temb)
            if c.up_block_types[self.index] == "CrossAttnUpBlock2D":
                x = _transformer(c, i, self.dtype, f"attentions_{j}")(x, ctx)
        if i > 0:
            x = Resample(True, self.dtype, name="upsamplers_0")(x)
        return x


class UNet(nn.Module):
    """``apply({'params': p}, sample [B,H,W,C], timesteps (scalar or [B], int or float),
    encoder_hidden_states [B,L,D]) -> [B,H,W,out_channels]``; H and W multiples of
    2 ** (levels - 1)."""
    config: UNetConfig
    dtype: Any = jnp.float32

    def __post_init__(self):
        self.config.check_dtype(self.dtype, "UNet")
        super().__post_init__()

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states):
        c, ctx = self.config, encoder_hidden_states
        n = len(c.block_out_channels)
        b, h, w, _ = sample.shape
        if h % 2 ** (n - 1) or w % 2 ** (n - 1):
            raise ConfigError(f"sample of {h}x{w} is not a multiple of {2 ** (n - 1)} (one halving per down block)")
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        temb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = TimestepEmbedding(4 * c.block_out_channels[0], self.dtype, name="time_embedding")(temb)

        x = conv(c.block_out_channels[0], 3, self.dtype, "conv_in")(sample)
        skips = [x]
        for i in range(n):
            x, s = DownBlock(c, i, self.dtype, name=f"down_blocks_{i}")(x, temb, ctx)
            skips += s
        if c.mid_block_type is not None:
            x = MidBlock(c, self.dtype, name="mid_block")(x, temb, ctx)
        k = c.layers_per_block + 1
        for u in range(n):
            x = UpBlock(c, u, self.dtype, name=f"up_blocks_{u}")(x, temb, ctx, tuple(skips[-k:]))
            skips = skips[:-k]
        x = nn.silu(_group_norm(c.norm_num_groups, c.norm_eps, "conv_norm_out")(x))
        return conv(c.out_channels, 3, self.dtype, "conv_out")(x)

    def init_params(self, rng) -> dict:
        """Random float32 params (Flax's default initialisers), traced on the smallest sample; the key
        is split as diffusers' ``init_weights`` split it, so a seed gives the weights it gave before."""
        s = 2 ** (len(self.config.block_out_channels) - 1)
        sample = jnp.zeros((1, s, s, self.config.in_channels), jnp.float32)
        ctx = jnp.zeros((1, 1, self.config.cross_attention_dim), jnp.float32)
        params_rng, dropout_rng = jax.random.split(rng)
        return self.init({"params": params_rng, "dropout": dropout_rng}, sample, jnp.ones((1,), jnp.int32),
                         ctx)["params"]
