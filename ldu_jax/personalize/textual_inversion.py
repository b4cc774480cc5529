"""Textual Inversion: learn one new token's embedding from a few images (a jitted, data-parallel step).

Only the placeholder's row is a trainable parameter; the loss writes it into the otherwise frozen
embedding table, so every other row is exactly unchanged. The result is saved as
``learned_embeds.safetensors`` ({token: [1, D]}), the format diffusers' ``load_textual_inversion`` reads.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldu_jax import files
from ldu_jax.errors import ConfigError
from ldu_jax.personalize import common
from ldu_jax.sd import models as sdm

TEMPLATES = {
    "person": ["a photo of {} person", "a close-up photo of {} person", "a portrait of {} person",
               "a cropped photo of {} person", "a good photo of {} person"],
    "object": ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "a photo of the {}",
               "a close-up photo of a {}", "a good photo of a {}"],
    "style": ["a painting in the style of {}", "a rendering in the style of {}", "a picture in the style of {}",
              "a cropped painting in the style of {}", "a good painting in the style of {}"],
}

_EMB = ("text_encoder", "text_model", "embeddings", "token_embedding", "embedding")


@flax.struct.dataclass
class TIState:
    step: jax.Array
    row: jax.Array          # [D] the placeholder's embedding
    opt_state: Any


def get_table(params):
    node = params
    for k in _EMB:
        node = node[k]
    return node


def set_path(tree, path, value):
    """A copy of nested dict ``tree`` with the leaf at ``path`` replaced (the rest shared)."""
    if not path:
        return value
    return {**tree, path[0]: set_path(tree[path[0]], path[1:], value)}


def with_row(params, token_id: int, row):
    """params with the placeholder's row of the token table replaced by ``row``."""
    table = get_table(params)
    return set_path(params, _EMB, table.at[token_id].set(row.astype(table.dtype)))


def template_ids(sd, token: str, templates) -> np.ndarray:
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            raise ConfigError(f"unknown template set {templates!r}; one of {sorted(TEMPLATES)} or a list")
        templates = TEMPLATES[templates]
    return sdm.tokenize(sd, [t.format(token) for t in templates])


def make_optimizer(cfg, batch_size: int):
    """AdamW as diffusers' TI script (wd 1e-2); lr scaled by batch x accumulation when ``scale_lr``."""
    lr = cfg.lr * (batch_size * cfg.grad_accum if cfg.scale_lr else 1)
    tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
    return (optax.MultiSteps(tx, cfg.grad_accum) if cfg.grad_accum > 1 else tx), lr


def init_state(params, token_id: int, tx) -> TIState:
    row = get_table(params)[token_id].astype(jnp.float32)
    return TIState(step=jnp.zeros((), jnp.int32), row=row, opt_state=tx.init(row))


def make_step(sd, sched, tx, token_id: int, batch_size: int, seed: int, data_sharding=None):
    """``step(state, params, images, prompt_ids) -> (state, info)``: one (micro) step of TI.

    images: all instance images [N, R, R, 3] (replicated), or their ``common.Moments`` (the VAE is
    frozen: encoded once); each step draws a random flipped batch and a random template per example
    from ``prompt_ids`` [K, L], from ``fold_in(seed, step)``.
    """
    def step(state: TIState, params, images, prompt_ids):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        k_batch, k_tpl, k_loss = jax.random.split(key, 3)
        ids = prompt_ids[jax.random.randint(k_tpl, (batch_size,), 0, prompt_ids.shape[0])]
        if data_sharding is not None:
            ids = jax.lax.with_sharding_constraint(ids, data_sharding)

        def loss_fn(row):
            return jnp.mean(common.batch_loss(sd, sched, with_row(params, token_id, row), images, k_batch, batch_size,
                                              ids, k_loss, data_sharding))

        loss, grad = jax.value_and_grad(loss_fn)(state.row)
        updates, opt_state = tx.update(grad, state.opt_state, state.row)
        row = optax.apply_updates(state.row, updates)
        info = {"loss": loss, "grad_norm": jnp.linalg.norm(grad), "row_norm": jnp.linalg.norm(row)}
        return TIState(state.step + 1, row, opt_state), info

    return step


def save_learned_embeds(path: str, token: str, row):
    """Write {token: [1, D]} float32 safetensors, as diffusers' TI script does."""
    from safetensors.numpy import save
    with files.atomic_write(path) as f:
        f.write(save({token: np.asarray(row, np.float32)[None]}))


def load_learned_embeds(path: str) -> dict:
    from safetensors.numpy import load_file
    return load_file(path)
