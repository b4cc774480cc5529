"""AdvDM: PGD maximising the LDM noise-prediction loss (EOT over latent / t / noise draws)."""
from __future__ import annotations

import jax

from ldu_jax.protect.baselines.engine import pgd, pgd_start, pgd_value_and_grad, semantic_loss
from ldu_jax.sd import models as sdm
from ldu_jax.sd import schedule as sch


def advdm(sd, params, x, key, cfg):
    """AdvDM: maximise the noise-prediction loss (EOT over ``n_draws``)."""
    sched = sch.make_schedule(sd.scheduler)
    emb = jax.lax.stop_gradient(sdm.text_embed(sd, params["text_encoder"], params["ids"][None]))
    k0, k = jax.random.split(key)
    vg = pgd_value_and_grad(lambda xa, kk: semantic_loss(sd, sched, params, xa, kk, cfg, emb))
    x_adv, trace = pgd(vg, x, pgd_start(x, k0, cfg), k, cfg, +1)
    return x_adv, {"trace": trace}


def evaluate_advdm(sd, sched, params, x_adv, x, key, cfg, surrogate=None):
    """The noise-prediction loss per image at ``x_adv``."""
    emb = sdm.text_embed(sd, params["text_encoder"], params["ids"][None])
    return semantic_loss(sd, sched, params, x_adv, key, cfg, emb)
