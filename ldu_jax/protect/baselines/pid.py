"""PID: PGD moving the VAE posterior mean and log-variance away from the clean image's."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ldu_jax.protect.baselines.engine import pgd, pgd_start, pgd_value_and_grad, posterior


def pid_objective(sd, params, xa, cfg, clean_post):
    """PID per image (maximised): MSE of the posterior mean plus that of the log-variance ('add-log',
    PID's recommended loss), or of the mean / the standard deviation alone, to the clean image's.
    The gradient is zero at the clean image: PID starts from a random point (``random_start``)."""
    mean, logvar = posterior(sd, params["vae"], xa, cfg)
    m0, lv0 = clean_post
    dm = jnp.mean(jnp.square(mean - m0), axis=(1, 2, 3))
    if cfg.pid_loss == "mean":
        return dm
    if cfg.pid_loss == "var":   # as PID's 'var': the posterior standard deviations
        return jnp.mean(jnp.square(jnp.exp(0.5 * logvar) - jnp.exp(0.5 * lv0)), axis=(1, 2, 3))
    return dm + jnp.mean(jnp.square(logvar - lv0), axis=(1, 2, 3))


def pid(sd, params, x, key, cfg):
    """PID: push the VAE posterior (mean and log-variance) away from the clean image's."""
    clean = jax.tree_util.tree_map(jax.lax.stop_gradient, posterior(sd, params["vae"], x))
    k0, k = jax.random.split(key)
    vg = pgd_value_and_grad(lambda xa, kk: pid_objective(sd, params, xa, cfg, clean))
    x_adv, trace = pgd(vg, x, pgd_start(x, k0, cfg), k, cfg, +1)
    return x_adv, {"trace": trace}


def evaluate_pid(sd, sched, params, x_adv, x, key, cfg, surrogate=None):
    """``pid_objective`` at ``x_adv``, against the posterior of the clean images ``x``."""
    return pid_objective(sd, params, x_adv, cfg, posterior(sd, params["vae"], x))
