"""What the baselines share: the sign-gradient PGD loop, its start and its value-and-grad over images,
the VAE posterior, latent draws, the noise prediction and the semantic (denoising) loss.

Budgets are L-inf on the [0, 1] scale (``eps``, ``step_size``); the iterate is projected onto the
eps-ball around the input and clipped to the valid range [-1, 1] after every step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ldu_jax.sd import models as sdm
from ldu_jax.sd import schedule as sch
from ldu_jax.sd import vae as vae_lib


def _maybe_remat(fn, cfg, static_argnums=()):
    return jax.checkpoint(fn, static_argnums=static_argnums) if cfg.remat else fn


def posterior(sd, vae_params, x, cfg=None):
    """The VAE posterior of images: (mean, logvar), unscaled NHWC latents."""
    def enc(p, x):
        return sd.vae.apply({"params": p}, x, method=sd.vae.encode)
    if cfg is not None and cfg.remat:
        enc = jax.checkpoint(enc)
    return enc(vae_params, x)


def target_posterior(sd, params, cfg):
    """The posterior (mean, logvar) of ``params['target']``, held constant."""
    mean, logvar = posterior(sd, params["vae"], params["target"])
    return jax.lax.stop_gradient(mean), jax.lax.stop_gradient(logvar)


def _scale(sd) -> float:
    return vae_lib.VAE(sd.vae, None).scaling_factor


def _t_range(sched, cfg):
    hi = cfg.t_max or sched.num_train_timesteps
    return int(cfg.t_min), int(hi)


def draw_latents(sd, mean, logvar, key, n: int):
    """n posterior samples per image, scaled, stacked draw-major: [n * B, h, w, c]."""
    m = jnp.concatenate([mean] * n) if n > 1 else mean
    s = jnp.exp(0.5 * jnp.concatenate([logvar] * n)) if n > 1 else jnp.exp(0.5 * logvar)
    return (m + s * jax.random.normal(key, m.shape, m.dtype)) * _scale(sd)


def noise_pred(sd, sched, unet_params, emb, z, key, cfg):
    """(prediction, its target) for latents z [N, ...] at random t ~ U[t_min, t_max) and noise."""
    k_n, k_t = jax.random.split(key)
    noise = jax.random.normal(k_n, z.shape, z.dtype)
    lo, hi = _t_range(sched, cfg)
    t = jax.random.randint(k_t, (z.shape[0],), lo, hi)
    e = jnp.broadcast_to(emb, (z.shape[0],) + emb.shape[1:])
    unet = _maybe_remat(lambda p, x, t, e: sdm.unet_apply(sd, p, x, t, e), cfg)
    pred = unet(unet_params, sch.add_noise(sched, z, noise, t), t, e)
    return pred, sch.target(sched, z, noise, t)


def semantic_loss(sd, sched, params, x, key, cfg, emb=None):
    """The LDM noise-prediction loss per image [B], averaged over ``cfg.n_draws`` (latent sample, t,
    noise) draws, under the prompt ``params['ids']`` (the UNet and text encoder in ``params``)."""
    n, b = cfg.n_draws, x.shape[0]
    k_lat, k_np = jax.random.split(key)
    mean, logvar = posterior(sd, params["vae"], x, cfg)
    z = draw_latents(sd, mean, logvar, k_lat, n)
    if emb is None:
        emb = sdm.text_embed(sd, params["text_encoder"], params["ids"][None])
    pred, tgt = noise_pred(sd, sched, params["unet"], emb, z, k_np, cfg)
    err = jnp.square(pred.astype(jnp.float32) - tgt.astype(jnp.float32))
    return jnp.mean(err.reshape(n, b, -1), axis=(0, 2))


def pgd(value_and_grad, x, x_start, key, cfg, direction: int, steps: int | None = None):
    """Sign-gradient PGD in one ``lax.fori_loop``: ``direction`` +1 ascends, -1 descends.

    ``value_and_grad(x_adv, key) -> (objective [B], gradient)``. Iterates stay within ``cfg.eps``
    ([0, 1] units) of ``x`` and within [-1, 1]. Step i draws with ``fold_in(key, i)`` (or ``key``
    itself when ``cfg.resample_draws`` is False). Returns (x_adv, trace [steps] of the batch-mean
    objective at each step's iterate).
    """
    steps = cfg.steps if steps is None else steps
    eps, alpha = 2.0 * cfg.eps, 2.0 * cfg.step_size   # [0, 1] units -> [-1, 1] units
    lo, hi = jnp.clip(x - eps, -1.0, 1.0), jnp.clip(x + eps, -1.0, 1.0)

    def body(i, carry):
        xa, trace = carry
        a = alpha
        if cfg.step_decay == "linear":
            a = alpha - (alpha - alpha / 100) * i / steps
        val, g = value_and_grad(xa, jax.random.fold_in(key, i) if cfg.resample_draws else key)
        xa = jnp.clip(xa + direction * a * jnp.sign(g), lo, hi)
        return xa, trace.at[i].set(jnp.mean(val))

    x_adv, trace = jax.lax.fori_loop(0, steps, body, (jnp.clip(x_start, lo, hi), jnp.zeros((steps,), jnp.float32)))
    return x_adv, trace


def pgd_start(x, key, cfg):
    """PGD's first iterate: ``x``, or a uniform draw in its eps-ball when ``cfg.random_start``."""
    if not cfg.random_start:
        return x
    eps = 2.0 * cfg.eps
    return x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps)


def pgd_value_and_grad(per_image):
    """The ``value_and_grad`` that ``pgd`` takes, from ``per_image(x_adv, key) -> objective [B]``:
    the objective per image and the gradient of its sum over the batch."""
    def vg(xa, key):
        def f(xa):
            v = per_image(xa, key)
            return jnp.sum(v), v
        (_, val), g = jax.value_and_grad(f, has_aux=True)(xa)
        return val, g
    return vg
