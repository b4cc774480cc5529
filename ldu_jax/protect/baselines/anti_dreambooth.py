"""Anti-DreamBooth (Van Le et al.): PGD against DreamBooth surrogates of the model.

    aspl  rounds of {surrogate DreamBooth steps on the clean images (a fresh copy of the model),
          sign-PGD against that copy, model steps on the perturbed images}
    fsmg  PGD against a fixed DreamBooth model trained on the clean images
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ldu_jax.personalize import dreambooth
from ldu_jax.protect.baselines.config import SD_PARTS
from ldu_jax.protect.baselines.engine import pgd, pgd_start, pgd_value_and_grad, semantic_loss
from ldu_jax.sd import schedule as sch


def _surrogate_parts(sd, params, x, cfg):
    sched = sch.make_schedule(sd.scheduler)
    tx = dreambooth.make_optimizer(cfg.surrogate)
    sd_params = {k: params[k] for k in SD_PARTS}
    frozen = dreambooth.frozen_params(sd_params, cfg.surrogate)
    # make_step draws its batches from fold_in(PRNGKey(seed), state.step); the caller starts the
    # step counter at a key-derived offset so that each protected batch gets its own draws.
    step = _surrogate_step(sd, params, x, cfg, sched, tx)

    def train(state, images, n):
        return jax.lax.fori_loop(0, n, lambda i, st: step(st, images), state)

    def fresh(step_count, trainable):   # a new optimizer state, as Anti-DreamBooth's train_one_epoch
        return dreambooth.DBState(step_count, trainable, tx.init(trainable))

    def full(trainable):
        return {**dreambooth.full_params(frozen, trainable, cfg.surrogate), "ids": params["ids"]}

    return sched, tx, sd_params, train, fresh, full


def _surrogate_step(sd, params, x, cfg, sched, tx):
    """``step(state, images) -> state``: one DreamBooth step of the surrogate on ``images``."""
    s = cfg.surrogate
    frozen = dreambooth.frozen_params({k: params[k] for k in SD_PARTS}, s)
    db_step = dreambooth.make_step(sd, sched, tx, s, s.batch_size, 0)
    cls = params.get("class_images", x)
    cls_ids = params.get("class_ids", params["ids"])
    return lambda st, images: db_step(st, frozen, images, cls, params["ids"], cls_ids)[0]


def _init_trainable(sd_params, cfg, tx, key):
    st = dreambooth.init_state(sd_params, cfg.surrogate, tx, key)
    return st.trainable


def _tree_dist(a, b):
    return jnp.sqrt(sum(jnp.sum(jnp.square(u - v)) for u, v in zip(jax.tree_util.tree_leaves(a),
                                                                    jax.tree_util.tree_leaves(b))))


def fsmg(sd, params, x, key, cfg):
    """FSMG: train a DreamBooth surrogate on the clean images (``surrogate_steps``), then PGD
    maximising its denoising loss. Pass a DreamBooth-trained model as ``sd`` with
    ``surrogate_steps=0`` to attack it directly."""
    sched, tx, sd_params, train, fresh, full = _surrogate_parts(sd, params, x, cfg)
    k_init, k_off, k0, k = jax.random.split(key, 4)
    offset = jax.random.randint(k_off, (), 0, 2 ** 30)
    trainable = _init_trainable(sd_params, cfg, tx, k_init)
    sur = train(fresh(offset, trainable), x, cfg.surrogate_steps)
    p = full(sur.trainable)
    vg = pgd_value_and_grad(lambda xa, kk: semantic_loss(sd, sched, p, xa, kk, cfg))
    x_adv, trace = pgd(vg, x, pgd_start(x, k0, cfg), k, cfg, +1)
    return x_adv, {"trace": trace, "surrogate": sur.trainable}


def aspl(sd, params, x, key, cfg):
    """ASPL (Anti-DreamBooth): ``rounds`` x {copy the model; train the copy ``surrogate_steps`` on
    the clean images; ``steps`` sign-PGD steps maximising the copy's denoising loss; train the model
    ``surrogate_steps`` on the perturbed images}, each training phase with a fresh optimizer state.

    One loop over rounds inside one jit. Round r runs one training loop of 2 x ``surrogate_steps``
    (the model on round r-1's perturbed images, skipped in round 0; then its copy on the clean
    images), so the DreamBooth step is traced and compiled once, then the PGD loop. The model's
    update after the last PGD phase is left out: it cannot change the protected images.

    info: 'trace' [rounds, steps]; per round 'model_moved' (|model - previous model|, 0 in round 0),
    'surrogate_moved' (|copy - model|), 'surrogate_changed' (|copy - previous copy|); 'surrogate' and
    'model': the last round's trainable parameters.
    """
    sched, tx, sd_params, _, fresh, full = _surrogate_parts(sd, params, x, cfg)
    step = _surrogate_step(sd, params, x, cfg, sched, tx)   # traced once, below
    k_init, k_off, k0, k = jax.random.split(key, 4)
    offset = jax.random.randint(k_off, (), 0, 2 ** 30)
    model0 = _init_trainable(sd_params, cfg, tx, k_init)
    n_f = cfg.surrogate_steps

    def train_round(r, model, x_prev, count):
        """(model trained on x_prev (not in round 0), its copy trained on x, step count)."""
        def body(i, carry):
            st, snap = carry
            st = jax.lax.cond(i == n_f, lambda s: fresh(s.step, s.trainable), lambda s: s, st)
            images = jnp.where(i < n_f, x_prev, x)
            st = jax.lax.cond((i < n_f) & (r == 0), lambda s: s, lambda s: step(s, images), st)
            snap = jax.lax.cond(i == n_f - 1, lambda: st.trainable, lambda: snap)
            return st, snap

        st, snap = jax.lax.fori_loop(0, 2 * n_f, body, (fresh(count, model), model))
        return snap, st.trainable, st.step

    def round_(r, carry):
        model, sur_prev, count, x_adv, stats = carry
        model_new, sur, count = train_round(r, model, jax.lax.stop_gradient(x_adv), count)
        p = full(sur)
        vg = pgd_value_and_grad(lambda xa, kk: semantic_loss(sd, sched, p, xa, kk, cfg))
        x_adv, trace = pgd(vg, x, x_adv, jax.random.fold_in(k, r), cfg, +1)
        new_stats = {"trace": stats["trace"].at[r].set(trace),
                     "model_moved": stats["model_moved"].at[r].set(_tree_dist(model_new, model)),
                     "surrogate_moved": stats["surrogate_moved"].at[r].set(_tree_dist(sur, model_new)),
                     "surrogate_changed": stats["surrogate_changed"].at[r].set(_tree_dist(sur, sur_prev))}
        return model_new, sur, count, x_adv, new_stats

    zeros = jnp.zeros((cfg.rounds,), jnp.float32)
    stats = {"trace": jnp.zeros((cfg.rounds, cfg.steps), jnp.float32), "surrogate_moved": zeros,
             "model_moved": zeros, "surrogate_changed": zeros}
    carry = (model0, model0, offset, pgd_start(x, k0, cfg), stats)
    model, sur, _, x_adv, stats = jax.lax.fori_loop(0, cfg.rounds, round_, carry)
    return x_adv, {**stats, "surrogate": sur, "model": model}


def evaluate_surrogate(sd, sched, params, x_adv, x, key, cfg, surrogate=None):
    """The denoising loss per image at ``x_adv`` under the surrogate's trainable parameters
    ``surrogate`` (info['surrogate'])."""
    p = {**params, **dreambooth.full_params({k: params[k] for k in SD_PARTS}, surrogate, cfg.surrogate)}
    return semantic_loss(sd, sched, p, x_adv, key, cfg)
