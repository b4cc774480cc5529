"""PhotoGuard encoder attack: PGD pulling the VAE posterior mean to zero or to a target's."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ldu_jax.protect.baselines.engine import pgd, pgd_start, pgd_value_and_grad, posterior, target_posterior


def photoguard_objective(sd, params, xa, cfg, target_mean):
    """||E_mean(x') - target|| per image (unscaled posterior mean; target 0 or a target's mean)."""
    mean, _ = posterior(sd, params["vae"], xa, cfg)
    d = mean if target_mean is None else mean - target_mean
    return jnp.sqrt(jnp.sum(jnp.square(d.astype(jnp.float32)), axis=(1, 2, 3)))


def photoguard(sd, params, x, key, cfg):
    """PhotoGuard encoder attack: minimise the distance of the posterior mean to 0 or the target's."""
    tmean = target_posterior(sd, params, cfg)[0] if "target" in params else None
    k0, k = jax.random.split(key)
    vg = pgd_value_and_grad(lambda xa, kk: photoguard_objective(sd, params, xa, cfg, tmean))
    x_adv, trace = pgd(vg, x, pgd_start(x, k0, cfg), k, cfg, -1)
    return x_adv, {"trace": trace}


def evaluate_photoguard(sd, sched, params, x_adv, x, key, cfg, surrogate=None):
    """``photoguard_objective`` at ``x_adv``."""
    tmean = target_posterior(sd, params, cfg)[0] if "target" in params else None
    return photoguard_objective(sd, params, x_adv, cfg, tmean)
