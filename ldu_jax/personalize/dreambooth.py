"""DreamBooth: fine-tune the UNet (optionally the text encoder, or LoRA adapters) on a few images,
with prior preservation on class images, as a jitted data-parallel step."""
from __future__ import annotations

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldu_jax import data as data_lib
from ldu_jax.personalize import common, lora


@flax.struct.dataclass
class DBState:
    step: jax.Array
    trainable: Any      # {'unet': params or LoRA tree, ['text_encoder': params]}
    opt_state: Any


def trained_parts(cfg) -> tuple[str, ...]:
    return ("unet", "text_encoder") if cfg.train_text_encoder else ("unet",)


def init_state(params, cfg, tx, key) -> DBState:
    trainable = {"unet": lora.init_lora(params["unet"], cfg.lora_rank, key) if cfg.lora_rank else params["unet"]}
    if cfg.train_text_encoder:
        trainable["text_encoder"] = params["text_encoder"]
    trainable = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), trainable)
    return DBState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable))


def frozen_params(params, cfg) -> dict:
    """The parameters the step reads but does not train (the UNet stays when training LoRA)."""
    trained = set(trained_parts(cfg)) - ({"unet"} if cfg.lora_rank else set())
    return {k: v for k, v in params.items() if k not in trained}


def full_params(frozen, trainable, cfg):
    p = dict(frozen)
    if cfg.lora_rank:
        p["unet"] = lora.merge(frozen["unet"], trainable["unet"], cfg.lora_alpha / cfg.lora_rank)
    else:
        p["unet"] = trainable["unet"]
    if "text_encoder" in trainable:
        p["text_encoder"] = trainable["text_encoder"]
    return p


def make_optimizer(cfg):
    tx = optax.adamw(cfg.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
    if cfg.max_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
    return optax.MultiSteps(tx, cfg.grad_accum) if cfg.grad_accum > 1 else tx


def make_step(sd, sched, tx, cfg, batch_size: int, seed: int, data_sharding=None):
    """``step(state, frozen, inst, cls, inst_ids, class_ids) -> (state, info)``.

    Loss = instance loss + ``prior_weight`` x class loss (when ``prior_weight > 0``), each the SD
    noise-prediction loss on a random flipped batch of that set under its prompt ([L] ids). ``inst``
    and ``cls``: the images, or their ``common.Moments`` (the VAE is frozen: encoded once).
    """
    prior = cfg.prior_weight > 0

    def step(state: DBState, frozen, inst, cls, inst_ids, class_ids):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        k_i, k_c, k_li, k_lc = jax.random.split(key, 4)
        ids_i = jnp.broadcast_to(inst_ids, (batch_size,) + inst_ids.shape)
        ids_c = jnp.broadcast_to(class_ids, (batch_size,) + class_ids.shape)

        def loss_fn(trainable):
            p = full_params(frozen, trainable, cfg)
            li = jnp.mean(common.batch_loss(sd, sched, p, inst, k_i, batch_size, ids_i, k_li, data_sharding))
            aux = {"loss_instance": li}
            if not prior:
                return li, aux
            lc = jnp.mean(common.batch_loss(sd, sched, p, cls, k_c, batch_size, ids_c, k_lc, data_sharding))
            aux["loss_prior"] = lc
            return li + cfg.prior_weight * lc, aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        info = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads)}
        return DBState(state.step + 1, trainable, opt_state), info

    return step


def ensure_class_images(sd, params, folder: str, cfg, log=print) -> np.ndarray:
    """The class (prior) images in ``folder``; generates the missing ones with the model itself."""
    os.makedirs(folder, exist_ok=True)
    have = data_lib.list_images(folder) if any(os.scandir(folder)) else []
    missing = cfg.num_class_images - len(have)
    if missing > 0:
        log(f"generating {missing} class images of {cfg.class_prompt!r} into {folder}")
        imgs = common.generate(sd, params, [cfg.class_prompt], n_per_prompt=missing, steps=cfg.class_steps,
                               guidance=cfg.class_guidance, seed=cfg.seed + 17)[cfg.class_prompt]
        for i, img in enumerate(imgs, len(have)):
            data_lib.save_image_atomic(os.path.join(folder, f"{i:04d}.png"), img)
    return common.load_instance_images(folder, sd.resolution, 1, log)
