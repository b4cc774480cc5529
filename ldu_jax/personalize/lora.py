"""LoRA adapters on the UNet's attention projections, as a separate parameter tree.

``merge(params, lora, scale)`` returns the UNet params with W + scale * down @ up on each adapted
kernel, so training the adapters alone is ``jax.grad`` with respect to ``lora``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

TARGETS = ("to_q", "to_k", "to_v", "to_out_0")


def init_lora(params, rank: int, key, targets=TARGETS) -> dict:
    """{'a/b/to_q': {'down': [in, r] ~ N(0, 1/r), 'up': [r, out] = 0}} for every targeted kernel."""
    flat = traverse_util.flatten_dict(params)
    paths = [p for p in flat if p[-1] == "kernel" and p[-2] in targets]
    if not paths:
        raise ValueError(f"no kernels named {targets} in the UNet params")
    keys = jax.random.split(key, len(paths))
    out = {}
    for k, p in zip(keys, paths):
        n_in, n_out = flat[p].shape
        out["/".join(p[:-1])] = {"down": jax.random.normal(k, (n_in, rank)) / rank,
                                 "up": jnp.zeros((rank, n_out))}
    return out


def merge(params, lora: dict, scale: float = 1.0):
    flat = dict(traverse_util.flatten_dict(params))
    for name, ab in lora.items():
        path = tuple(name.split("/")) + ("kernel",)
        w = flat[path]
        flat[path] = w + (scale * ab["down"] @ ab["up"]).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)
