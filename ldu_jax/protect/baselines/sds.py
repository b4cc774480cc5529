"""SDS+ / SDS- (Xue et al.): the score-distillation gradient (eps_pred - eps) pushed through the
encoder only (the UNet Jacobian skipped); ``sds_plus`` ascends, ``sds_minus`` descends."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ldu_jax.protect.baselines.engine import draw_latents, noise_pred, pgd, pgd_start, posterior, semantic_loss
from ldu_jax.sd import models as sdm
from ldu_jax.sd import schedule as sch


def sds_surrogate(sd, sched, params, xa, key, cfg, emb):
    """(surrogate per image, noise-prediction loss per image): the surrogate's gradient in x is
    J_E(x)^T (eps_pred - eps), the UNet Jacobian skipped (stop_gradient on the residual)."""
    n, b = cfg.n_draws, xa.shape[0]
    k_lat, k_np = jax.random.split(key)
    mean, logvar = posterior(sd, params["vae"], xa, cfg)
    z = draw_latents(sd, mean, logvar, k_lat, n)
    pred, tgt = noise_pred(sd, sched, params["unet"], emb, jax.lax.stop_gradient(z), k_np, cfg)
    resid = jax.lax.stop_gradient((pred - tgt).astype(jnp.float32))
    sur = jnp.sum((resid * z).reshape(n, b, -1), axis=(0, 2)) / n
    loss = jnp.mean(jnp.square(resid).reshape(n, b, -1), axis=(0, 2))
    return sur, loss


def sds(sd, params, x, key, cfg, direction):
    """Score distillation PGD; ``direction`` +1 (SDS+) or -1 (SDS-), a number or a traced scalar."""
    sched = sch.make_schedule(sd.scheduler)
    emb = jax.lax.stop_gradient(sdm.text_embed(sd, params["text_encoder"], params["ids"][None]))

    def vg(xa, kk):
        def f(xa):
            sur, loss = sds_surrogate(sd, sched, params, xa, kk, cfg, emb)
            return jnp.sum(sur), loss
        (_, loss), g = jax.value_and_grad(f, has_aux=True)(xa)
        return loss, g   # trace: the noise-prediction loss (what SDS+ raises and SDS- lowers)

    k0, k = jax.random.split(key)
    x_adv, trace = pgd(vg, x, pgd_start(x, k0, cfg), k, cfg, direction)
    return x_adv, {"trace": trace}


def sds_plus(sd, params, x, key, cfg):
    """SDS(+): ascend the score-distillation gradient."""
    return sds(sd, params, x, key, cfg, +1)


def sds_minus(sd, params, x, key, cfg):
    """SDS(-): descend it (Xue et al. find this the stronger protection)."""
    return sds(sd, params, x, key, cfg, -1)


def evaluate_sds(sd, sched, params, x_adv, x, key, cfg, surrogate=None):
    """The noise-prediction loss per image at ``x_adv`` (what SDS+ raises and SDS- lowers)."""
    emb = sdm.text_embed(sd, params["text_encoder"], params["ids"][None])
    return semantic_loss(sd, sched, params, x_adv, key, cfg, emb)
