"""Mist: minimise  ||E(x') - E(y)||^2 (sum)  -  rate * noise-prediction loss  (target y)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ldu_jax.protect.baselines.engine import (draw_latents, noise_pred, pgd, pgd_start, pgd_value_and_grad,
                                              posterior, target_posterior)
from ldu_jax.sd import models as sdm
from ldu_jax.sd import schedule as sch


def mist_objective(sd, sched, params, xa, key, cfg, emb, target_post):
    """Mist's fused objective per image (minimised): sum_sq(z_x - z_y) - rate * semantic loss, both
    latents posterior samples (scaled)."""
    k_x, k_y, k_s = jax.random.split(key, 3)
    mean, logvar = posterior(sd, params["vae"], xa, cfg)
    zx = draw_latents(sd, mean, logvar, k_x, 1)
    zy = draw_latents(sd, *target_post, k_y, 1)
    textural = jnp.sum(jnp.square(zx - zy), axis=(1, 2, 3))
    n, b = cfg.n_draws, xa.shape[0]
    z = draw_latents(sd, mean, logvar, k_s, n)
    pred, tgt = noise_pred(sd, sched, params["unet"], emb, z, jax.random.fold_in(k_s, 1), cfg)
    semantic = jnp.mean(jnp.square(pred - tgt).reshape(n, b, -1), axis=(0, 2))
    return textural - cfg.rate * semantic, textural, semantic


def mist(sd, params, x, key, cfg):
    """Mist (fused mode): minimise the textural loss toward the target while maximising the
    semantic loss, weighted by ``rate``."""
    sched = sch.make_schedule(sd.scheduler)
    emb = jax.lax.stop_gradient(sdm.text_embed(sd, params["text_encoder"], params["ids"][None]))
    tpost = target_posterior(sd, params, cfg)
    k0, k = jax.random.split(key)
    vg = pgd_value_and_grad(lambda xa, kk: mist_objective(sd, sched, params, xa, kk, cfg, emb, tpost)[0])
    x_adv, trace = pgd(vg, x, pgd_start(x, k0, cfg), k, cfg, -1)
    return x_adv, {"trace": trace}


def evaluate_mist(sd, sched, params, x_adv, x, key, cfg, surrogate=None):
    """Mist's fused objective per image at ``x_adv``."""
    emb = sdm.text_embed(sd, params["text_encoder"], params["ids"][None])
    return mist_objective(sd, sched, params, x_adv, key, cfg, emb, target_posterior(sd, params, cfg))[0]
