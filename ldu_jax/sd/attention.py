"""Softmax attention of the SD modules (UNet, VAE), normalised after the value product.

softmax(q k^T / sqrt(d)) v is computed as (e v) / sum(e) with e = exp(s - max s): the same function
(float rounding apart), but the division runs on the [B, T, heads, d] output instead of the
[B, heads, T, T] weights. On XLA:CPU the weights' division and its broadcast were materialised
separately; normalised late, the mini-world's four-subject TI program runs 1.33x faster and the
DreamBooth program in 18% less memory at the same speed (``python bench/sd_steps.py
--attention=softmax,late``; README, Benchmarks).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q, k, v, upcast: bool = False):
    """Multi-head attention over [B, T, heads, d] (queries [B, Tq, ...], keys and values [B, Tk, ...]);
    ``upcast``: the weights in float32 (as PyTorch's upcast attention), the result in v's dtype."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if upcast:
        s = s.astype(jnp.float32)
    # the max only keeps exp in range: softmax does not depend on it, so neither does the gradient
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bkhd->bqhd", e, v.astype(e.dtype))
    total = jnp.transpose(jnp.sum(e, axis=-1), (0, 2, 1))[..., None]   # [B, Tq, heads, 1]
    return (out / total).astype(v.dtype)
