"""Latent Diffusion Unlearning: the protection pipeline and its objective, as pure functions.

    x -E-> z0 -invert(k)-> zT -ρ-> zT' -denoise(k)-> z0' -D-> x'     (repeated ``rounds`` times)

ρ is trained to maximise the personalization surrogate L_pers(x') (Textual Inversion and/or
DreamBooth noise-prediction loss on x' re-encoded by the VAE, over several t / noise draws) subject
to d(x', x) <= eps, as the Lagrangian  -L_pers + λ (d / eps - 1)  with dual ascent on λ >= 0
(the violation is measured relative to eps so λ is dimensionless), or a fixed hinge.
Everything on the gradient path is differentiable; ``remat`` recomputes the VAE, UNet and DiT
in the backward pass instead of storing their activations.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ldu_jax.personalize import common
from ldu_jax.sd import models as sdm
from ldu_jax.sd import schedule as sch
from ldu_jax.sd import vae as vae_lib
from ldu_jax.shortcut import sampling, trainer


@dataclasses.dataclass(frozen=True, eq=False)
class LDU:
    """The modules (hashable by identity, so jit can take them as static): SD parts, DiT, ρ."""
    sd: Any
    dit: Any
    rho: Any
    null_label: int

    __hash__ = object.__hash__


def _vae(models):
    return vae_lib.VAE(models.sd.vae, None)


def encode_mean(models, vae_params, x):
    return vae_lib.encode(_vae(models), vae_params, x)


def rho_apply(models, rho_vars, z, train: bool = False):
    """ρ(z); returns (z', new batch_stats or None)."""
    if "batch_stats" in rho_vars:
        out, upd = models.rho.apply(rho_vars, z, train, mutable=["batch_stats"] if train else [])
        return out, (upd.get("batch_stats") if train else None)
    return models.rho.apply(rho_vars, z, train), None


def invert_latents(models, params, z, cfg):
    """One k-step inversion of scaled latents through the shortcut model."""
    labels = jnp.full((z.shape[0],), models.null_label, jnp.int32)
    return sampling.invert(trainer.make_apply(models.dit), params["dit"], z, labels, steps=cfg.steps,
                           fixed_point_iters=cfg.fixed_point_iters)


def protect_latents(models, params, z0, cfg, shift=None, train: bool = False, zT=None):
    """z0 -> z0' through ``cfg.rounds`` rounds of invert -> shift -> denoise (k = cfg.steps).

    ``shift``: ``zT -> zT'``; defaults to ρ with ``params['rho']``. ``zT``: the first round's
    inversion of z0 when the caller already has it. Returns (z0', batch_stats).
    """
    apply_fn = trainer.make_apply(models.dit)
    labels = jnp.full((z0.shape[0],), models.null_label, jnp.int32)
    stats = None
    z = z0
    for r in range(cfg.rounds):
        zT = invert_latents(models, params, z, cfg) if (r or zT is None) else zT
        if shift is None:
            zT, stats = rho_apply(models, params["rho"], zT, train)
        else:
            zT = shift(zT)
        z = sampling.denoise(apply_fn, params["dit"], zT, labels, steps=cfg.steps)
    return z, stats


def protect_images(models, params, x, cfg, shift=None, train: bool = False, latents=None):
    """Images [-1, 1] NHWC -> protected images (and ρ's batch_stats when training with BatchNorm).

    ``cfg.output``: 'decode' (x' = D(z0'), the paper) or 'residual' (x' = x + D(z0') - D(z0)).
    ``latents``: (z0, zT) of x when precomputed (ldu-opt reuses them across its steps)."""
    dec = functools.partial(vae_lib.decode, _vae(models))
    if cfg.remat:
        dec = jax.checkpoint(dec)
    if cfg.output not in ("decode", "residual"):
        raise ValueError(f"config.output={cfg.output!r}: expected 'decode' or 'residual'")
    z0, zT = latents if latents is not None else (encode_mean(models, params["vae"], x), None)
    z, stats = protect_latents(models, params, z0, cfg, shift, train, zT)
    if cfg.output == "residual":  # x + D(z0') - D(z0): the VAE's reconstruction error is not added
        return x + dec(params["vae"], z) - dec(params["vae"], z0), stats
    return dec(params["vae"], z), stats


def quantize_ste(x):
    """Round to the uint8 grid in the forward pass, identity gradient (straight-through)."""
    q = jnp.round((jnp.clip(x, -1, 1) + 1) * 127.5) / 127.5 - 1
    return x + jax.lax.stop_gradient(q - x)


def pers_loss(models, params, x, ti_ids, db_ids, key, cfg):
    """L_pers per image: weighted TI / DreamBooth surrogate losses on x re-encoded by the VAE,
    averaged over ``cfg.n_draws`` draws of (latent sample, t, noise)."""
    sched = sch.make_schedule(models.sd.scheduler)
    enc = functools.partial(vae_lib.encode, _vae(models))
    if cfg.remat:
        enc = jax.checkpoint(enc)
    loss_fn = jax.checkpoint(common.latent_loss, static_argnums=(0,)) if cfg.remat else common.latent_loss
    total = 0.0
    for k in jax.random.split(key, cfg.n_draws):
        k_lat, k_n, k_t = jax.random.split(k, 3)
        z = enc(params["vae"], x, k_lat)
        for weight, ids in ((cfg.ti_weight, ti_ids), (cfg.db_weight, db_ids)):
            if weight:
                ids_b = jnp.broadcast_to(ids, (x.shape[0], ids.shape[-1]))
                total = total + weight * loss_fn(models.sd, sched, params, z, ids_b, k_n, k_t)
    return total / cfg.n_draws


def distance(x_prot, x, kind: str = "mse"):
    """Per-image imperceptibility distance on [-1, 1] images."""
    if kind == "mse":
        return jnp.mean(jnp.square(x_prot - x), axis=(1, 2, 3))
    if kind == "ssim":
        from ldu_jax.metrics.image import ssim
        return 1.0 - ssim((x_prot + 1) / 2, (x + 1) / 2)
    raise ValueError(f"objective.distance must be 'mse' or 'ssim', got {kind!r}")


def objective(models, params, x, ti_ids, db_ids, key, lam, cfg, shift=None, train=False, latents=None):
    """(lagrangian per image, aux). lam: scalar or per-image multiplier (no gradient)."""
    x_prot, stats = protect_images(models, params, x, cfg, shift, train, latents)
    x_eval = quantize_ste(x_prot) if cfg.quantize else x_prot
    lp = pers_loss(models, params, x_eval, ti_ids, db_ids, key, cfg)
    d = distance(x_eval, x, cfg.distance)
    viol = d / cfg.eps - 1.0
    if cfg.multiplier == "dual":
        penalty = jax.lax.stop_gradient(lam) * viol
    elif cfg.multiplier == "hinge":
        penalty = cfg.hinge_weight * jax.nn.relu(viol)
    else:
        raise ValueError(f"objective.multiplier must be 'dual' or 'hinge', got {cfg.multiplier!r}")
    return -lp + penalty, {"l_pers": lp, "d": d, "viol": viol, "x_prot": x_prot, "stats": stats}


def update_multiplier(lam, viol, cfg):
    """Dual ascent λ <- max(0, λ + η (d / eps - 1)); the hinge keeps λ at 0."""
    if cfg.multiplier != "dual":
        return lam
    return jnp.maximum(0.0, lam + cfg.lam_lr * viol)


def psnr_from_mse(mse_m11):
    """PSNR in dB on the [0, 1] scale from an MSE measured on [-1, 1] images."""
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse_m11, 1e-12))


@flax.struct.dataclass
class RhoState:
    step: jax.Array
    rho: Any            # ρ variables: {'params', ['batch_stats']}
    opt_state: Any
    lam: jax.Array


def make_rho_optimizer(cfg):
    return optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)


def init_rho_state(models, tx, key, latent_shape, cfg) -> RhoState:
    variables = models.rho.init(key, jnp.zeros((1,) + tuple(latent_shape)))
    variables = flax.core.unfreeze(variables)
    return RhoState(step=jnp.zeros((), jnp.int32), rho=variables, opt_state=tx.init(variables["params"]),
                    lam=jnp.asarray(cfg.lam_init, jnp.float32))


def make_rho_step(models, tx, cfg, seed: int, data_sharding=None):
    """``step(state, frozen, images, ti_ids, db_ids) -> (state, info)``: one ρ update + dual step."""
    def step(state: RhoState, frozen, images, ti_ids, db_ids):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        if data_sharding is not None:
            images = jax.lax.with_sharding_constraint(images, data_sharding)

        def loss_fn(rho_params):
            rho_vars = {**state.rho, "params": rho_params}
            params = {**frozen, "rho": rho_vars}
            lag, aux = objective(models, params, images, ti_ids, db_ids, key, state.lam, cfg, train=True)
            return jnp.mean(lag), aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.rho["params"])
        updates, opt_state = tx.update(grads, state.opt_state, state.rho["params"])
        rho = {**state.rho, "params": optax.apply_updates(state.rho["params"], updates)}
        if aux["stats"] is not None:
            rho["batch_stats"] = aux["stats"]
        viol = jnp.mean(aux["viol"])
        lam = update_multiplier(state.lam, viol, cfg)
        d = jnp.mean(aux["d"]) if cfg.distance == "mse" else jnp.mean(distance(aux["x_prot"], images, "mse"))
        from ldu_jax.metrics.image import ssim
        x_prot = jnp.clip(aux["x_prot"].astype(jnp.float32), -1, 1)
        info = {"loss": loss, "l_pers": jnp.mean(aux["l_pers"]), "d": jnp.mean(aux["d"]), "lambda": state.lam,
                "psnr": psnr_from_mse(d), "ssim": jnp.mean(ssim((x_prot + 1) / 2, (images + 1) / 2)),
                "grad_norm": optax.tree.norm(grads)}
        return RhoState(state.step + 1, rho, opt_state, lam), info

    return step


def optimize_shift(models, params, x, ti_ids, db_ids, key, cfg):
    """ldu-opt: optimise a per-image shift δ of zT with Adam for ``cfg.opt_steps`` steps inside one
    ``lax.fori_loop`` (per-image dual multipliers). Returns (protected images, info)."""
    z0 = encode_mean(models, params["vae"], x)
    latents = (z0, invert_latents(models, params, z0, cfg))  # independent of δ: computed once
    zT = latents[1]
    tx = optax.adam(cfg.opt_lr)
    delta = jnp.zeros_like(zT)
    lam = jnp.full((x.shape[0],), cfg.lam_init, jnp.float32)

    def shift_for(d):
        return lambda z: z + d

    def body(i, carry):
        delta, opt_state, lam = carry
        k = jax.random.fold_in(key, i)

        def loss_fn(d):
            lag, aux = objective(models, params, x, ti_ids, db_ids, k, lam, cfg, shift=shift_for(d), latents=latents)
            return jnp.sum(lag), aux   # sum: each image's δ gets its own gradient

        grads, aux = jax.grad(loss_fn, has_aux=True)(delta)
        updates, opt_state = tx.update(grads, opt_state, delta)
        return optax.apply_updates(delta, updates), opt_state, update_multiplier(lam, aux["viol"], cfg)

    delta, _, lam = jax.lax.fori_loop(0, cfg.opt_steps, body, (delta, tx.init(delta), lam))
    x_prot, _ = protect_images(models, params, x, cfg, shift=shift_for(delta), latents=latents)
    return x_prot, {"lambda": lam, "delta_norm": jnp.sqrt(jnp.mean(jnp.square(delta), axis=(1, 2, 3)))}


def placeholder_setup(sd, params, cfg):
    """Add the TI surrogate's placeholder token (from ``learned_embeds`` if given, else ``init_word``);
    returns (sd, params, ti_ids [L], db_ids [L])."""
    sd, params, token_id = sdm.add_placeholder_token(sd, params, cfg.placeholder_token, cfg.init_word)
    if cfg.learned_embeds:
        from ldu_jax.personalize import textual_inversion as ti
        embeds = ti.load_learned_embeds(cfg.learned_embeds)
        if cfg.placeholder_token not in embeds:
            raise ValueError(f"{cfg.learned_embeds} has no embedding for {cfg.placeholder_token!r} "
                             f"(it has {sorted(embeds)})")
        params = ti.with_row(params, token_id, jnp.asarray(embeds[cfg.placeholder_token]).reshape(-1))
    ids = sdm.tokenize(sd, [cfg.ti_prompt.format(cfg.placeholder_token), cfg.db_prompt])
    return sd, params, jnp.asarray(ids[0]), jnp.asarray(ids[1])
