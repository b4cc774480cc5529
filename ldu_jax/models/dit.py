"""The shortcut DiT: a diffusion transformer conditioned on time t, step size dt and a class label.

Same mathematics and the same parameter tree as the public JAX shortcut-models DiT, so its
checkpoints load here and give the same outputs:

- patch embedding (conv, PyTorch-like xavier init) plus fixed 2-D sin-cos positions;
- c = TimestepEmbedder_0(t) + TimestepEmbedder_1(dt_base) + LabelEmbedder_0(y), where the label
  table has ``num_classes + 1`` rows (the last one is the null class of classifier-free guidance);
- adaLN-Zero blocks whose attention logits are ``q / d_head @ k`` (not ``/ sqrt(d_head)``);
  the block's denses are created in the order adaLN, k, q, v, out (Dense_0 .. Dense_4);
- a zero-initialised final layer, and an unused ``Embed_0`` (256 x 1) kept for the tree.

Options that leave the maths unchanged at their defaults: ``dtype`` (compute dtype, params stay
f32; the public class defaults to bf16, we default to f32), ``remat`` (recompute blocks in the
backward pass), ``attention='xla'`` (``jax.nn.dot_product_attention`` instead of einsums).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldu_jax import dtypes
from ldu_jax.errors import ConfigError

Dtype = Any


def xavier_uniform_torchlike(key, shape, dtype=jnp.float32):
    """Xavier-uniform with PyTorch fans: Dense [in, out]; Conv [k, k, in, out] -> fan_in = k*k*in."""
    if len(shape) == 2:
        fan_in, fan_out = shape
    elif len(shape) == 4:
        fan_in, fan_out = shape[0] * shape[1] * shape[2], shape[3]
    else:
        raise ValueError(f"unsupported kernel shape {shape}")
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


def _dense(features, dtype, name=None, zero=False):
    init = nn.initializers.zeros if zero else xavier_uniform_torchlike
    return nn.Dense(features, kernel_init=init, bias_init=nn.initializers.zeros, dtype=dtype, name=name)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, num_patches: int) -> np.ndarray:
    """Fixed 2-D positions [1, N, dim]: first half encodes the column index, second half the row."""
    side = int(round(num_patches ** 0.5))
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    cols, rows = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64))
    emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return emb[None].astype(np.float32)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(dtype, name):
    return nn.LayerNorm(use_bias=False, use_scale=False, dtype=dtype, name=name)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar (t in [0, 1] fed raw; 256 frequencies), then Dense-SiLU-Dense."""

    hidden_size: int
    dtype: Dtype = jnp.float32
    frequency_embedding_size: int = 256
    max_period: float = 10000.0

    @nn.compact
    def __call__(self, t):
        half = self.frequency_embedding_size // 2
        freqs = jnp.exp(-math.log(self.max_period) * jnp.arange(half, dtype=jnp.float32) / half)
        args = t.astype(jnp.float32)[:, None] * freqs[None]
        x = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1).astype(self.dtype)
        init = nn.initializers.normal(0.02)
        x = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name="Dense_0")(x)
        x = nn.silu(x)
        # As in the public model, the second dense has no compute dtype of its own.
        return nn.Dense(self.hidden_size, kernel_init=init, name="Dense_1")(x)


class LabelEmbedder(nn.Module):
    num_classes: int
    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels):
        table = nn.Embed(self.num_classes + 1, self.hidden_size,
                         embedding_init=nn.initializers.normal(0.02), dtype=self.dtype, name="Embed_0")
        return table(labels)


class PatchEmbed(nn.Module):
    patch_size: int
    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.hidden_size, (p, p), (p, p), padding="VALID", kernel_init=xavier_uniform_torchlike,
                    bias_init=nn.initializers.zeros, dtype=self.dtype, name="Conv_0")(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        out_dim = x.shape[-1]
        x = nn.gelu(_dense(self.mlp_dim, self.dtype, "Dense_0")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = _dense(out_dim, self.dtype, "Dense_1")(x)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class HeadDense(nn.Module):
    """A ``Dense(heads * head_dim)`` (same ``kernel`` [in, out] and ``bias`` params) whose output,
    or with ``to_heads=False`` whose input, is laid out heads-major [B, heads, T, head_dim]: the
    attention's batched matmuls then need no transposes (about 5% of a DiT-S block on CPU)."""

    features: int
    num_heads: int
    to_heads: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_dim = x.shape[-1] * (1 if self.to_heads else x.shape[1])
        kernel = self.param("kernel", xavier_uniform_torchlike, (in_dim, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        d = (self.features if self.to_heads else in_dim) // self.num_heads
        if self.to_heads:   # [B, T, C] -> [B, heads, T, d]
            y = jnp.einsum("btc,chd->bhtd", x, kernel.reshape(in_dim, self.num_heads, d))
            return y + bias.reshape(self.num_heads, 1, d)
        return jnp.einsum("bhtd,hdc->btc", x, kernel.reshape(self.num_heads, d, self.features)) + bias


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, c, train: bool = False):
        h, dt = self.hidden_size, self.dtype
        mod = _dense(6 * h, dt, "Dense_0")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

        xm = modulate(_layer_norm(dt, "LayerNorm_0")(x), shift_msa, scale_msa)
        heads, d = self.num_heads, h // self.num_heads
        if self.attention == "xla":
            split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, d)  # noqa: E731
            k = split(_dense(h, dt, "Dense_1")(xm))
            q = split(_dense(h, dt, "Dense_2")(xm))
            v = split(_dense(h, dt, "Dense_3")(xm))
            y = jax.nn.dot_product_attention(q, k, v, scale=1.0 / d)
            y = _dense(h, dt, "Dense_4")(y.reshape(x.shape))
        elif self.attention == "einsum":   # heads-major [B, heads, T, d] throughout
            k = HeadDense(h, heads, dtype=dt, name="Dense_1")(xm)
            q = HeadDense(h, heads, dtype=dt, name="Dense_2")(xm)
            v = HeadDense(h, heads, dtype=dt, name="Dense_3")(xm)
            w = jnp.einsum("bhqc,bhkc->bhqk", q / d, k).astype(jnp.float32)
            w = nn.softmax(w, axis=-1)
            y = jnp.einsum("bhqk,bhkc->bhqc", w, v)
            y = HeadDense(h, heads, to_heads=False, dtype=dt, name="Dense_4")(y)
        else:
            raise ConfigError(f"model.attention must be 'einsum' or 'xla', got {self.attention!r}")
        x = x + gate_msa[:, None] * y

        xm = modulate(_layer_norm(dt, "LayerNorm_1")(x), shift_mlp, scale_mlp)
        y = MlpBlock(int(h * self.mlp_ratio), dt, self.dropout, name="MlpBlock_0")(xm, train)
        return x + gate_mlp[:, None] * y


class FinalLayer(nn.Module):
    patch_size: int
    out_channels: int
    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        shift, scale = jnp.split(_dense(2 * self.hidden_size, self.dtype, "Dense_0", zero=True)(nn.silu(c)), 2, -1)
        x = modulate(_layer_norm(self.dtype, "LayerNorm_0")(x), shift, scale)
        p = self.patch_size
        return _dense(p * p * self.out_channels, self.dtype, "Dense_1", zero=True)(x)


class DiT(nn.Module):
    """Shortcut DiT. Call as ``model.apply({'params': p}, x, t, dt_base, y)`` with x NHWC.

    t: [B] in [0, 1]; dt_base: [B] step-size exponent log2(1/d); y: [B] int labels, ``num_classes``
    being the null class. Returns the velocity, shaped like x.
    """

    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float
    out_channels: int
    num_classes: int
    class_dropout_prob: float = 0.0  # kept for config parity; dropout is applied by the targets
    ignore_dt: bool = False
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, t, dt, y, train: bool = False):
        b, size, _, _ = x.shape
        p = self.patch_size
        if size % p:
            raise ConfigError(f"image size {size} is not divisible by patch_size {p}")
        side = size // p
        if self.ignore_dt:
            dt = jnp.zeros_like(t)
        x = PatchEmbed(p, self.hidden_size, self.dtype, name="PatchEmbed_0")(x)
        x = (x + sincos_2d(self.hidden_size, side * side)).astype(self.dtype)
        c = (TimestepEmbedder(self.hidden_size, self.dtype, name="TimestepEmbedder_0")(t)
             + LabelEmbedder(self.num_classes, self.hidden_size, self.dtype, name="LabelEmbedder_0")(y)
             + TimestepEmbedder(self.hidden_size, self.dtype, name="TimestepEmbedder_1")(dt))
        block = nn.remat(DiTBlock, static_argnums=(3,)) if self.remat else DiTBlock
        for i in range(self.depth):
            x = block(self.hidden_size, self.num_heads, self.mlp_ratio, self.dropout, self.dtype,
                      self.attention, name=f"DiTBlock_{i}")(x, c, train)
        x = FinalLayer(p, self.out_channels, self.hidden_size, self.dtype, name="FinalLayer_0")(x, c)
        x = x.reshape(b, side, side, p, p, self.out_channels)
        x = jnp.einsum("bhwpqc->bhpwqc", x).reshape(b, size, size, self.out_channels)
        # The public model learns an (unused) per-t log-variance table; keep it so trees match.
        nn.Embed(256, 1, embedding_init=nn.initializers.zeros, name="Embed_0")(
            jnp.clip(jnp.floor(t * 256), 0, 255).astype(jnp.int32))
        return x


def dit_from_config(model_cfg, out_channels: int) -> DiT:
    """Build a DiT from a ``config.model`` ConfigDict."""
    return DiT(
        patch_size=model_cfg.patch_size, hidden_size=model_cfg.hidden_size, depth=model_cfg.depth,
        num_heads=model_cfg.num_heads, mlp_ratio=model_cfg.mlp_ratio, out_channels=out_channels,
        num_classes=model_cfg.num_classes, class_dropout_prob=model_cfg.class_dropout_prob,
        ignore_dt=model_cfg.train_type == "naive", dropout=model_cfg.dropout,
        dtype=dtypes.by_name(model_cfg.dtype, "config.model.dtype"), remat=model_cfg.remat,
        attention=model_cfg.attention)
