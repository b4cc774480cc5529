"""Latent Diffusion Unlearning: the protection pipeline and its objective, as pure functions.

    x -E-> z0 -invert(k)-> zT -ρ-> zT' -denoise(k)-> z0' -D-> x'     (repeated ``rounds`` times)

ρ is trained to maximise the personalization surrogate L_pers(x') (Textual Inversion and/or
DreamBooth noise-prediction loss on x' re-encoded by the VAE, over several t / noise draws) subject
to d(x', x) <= eps: by default each image's change is projected onto the budget (``constrain``);
the paper's Lagrangian  -L_pers + λ (d / eps - 1)  with (bounded) dual ascent on λ >= 0, and the
public code's fixed hinge, are options. ``optimize_shift`` (ldu-opt) optimises one shift per image
with Gauss-Newton steps in the image metric (``shift_opt``).
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

from ldu_jax.errors import ConfigError
from ldu_jax.protect import shift_opt
from ldu_jax.sd import models as sdm
from ldu_jax.sd import schedule as sch
from ldu_jax.sd import vae as vae_lib
from ldu_jax.shortcut import sampling, trainer


@dataclasses.dataclass(frozen=True, eq=False)
class Modules:
    """The networks LDU runs (SD's VAE / UNet / text encoder, the shortcut DiT, ρ), without their
    parameters: every function here takes ``(models, params, ...)`` with the params a separate
    pytree, as flax modules are used. Hashable by identity, so a jitted function takes it as a
    static argument and compiles once per set of networks."""
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


def prepare_latents(models, params, x, cfg):
    """What does not depend on the shift, computed once per image: (z0, zT, reference), with
    reference = D(z0'(0)), the decoded unshifted round trip (``output='residual'``), else None."""
    z0 = encode_mean(models, params["vae"], x)
    zT = invert_latents(models, params, z0, cfg)
    ref = None
    if cfg.output == "residual":
        z_plain, _ = protect_latents(models, params, z0, cfg, shift=lambda z: z, zT=zT)
        ref = vae_lib.decode(_vae(models), params["vae"], z_plain)
    return z0, zT, ref


def protect_images(models, params, x, cfg, shift=None, train: bool = False, latents=None):
    """Images [-1, 1] NHWC -> protected images (and ρ's batch_stats when training with BatchNorm),
    before the budget's projection (``constrain``).

    ``cfg.output``: 'decode' (x' = D(z0'), the paper) or 'residual' (x' = x + D(z0'(δ)) - D(z0'(0)):
    only the change the shift makes, so a zero shift returns x exactly and the VAE's and the round
    trip's reconstruction errors use none of the budget). ``latents``: ``prepare_latents(x)`` when
    the caller already has it (ldu-opt reuses it across its steps)."""
    if cfg.output not in ("decode", "residual"):
        raise ConfigError(f"config.output={cfg.output!r}: expected 'decode' or 'residual'")
    dec = functools.partial(vae_lib.decode, _vae(models))
    if cfg.remat:
        dec = jax.checkpoint(dec)
    z0, zT, ref = latents if latents is not None else prepare_latents(models, params, x, cfg)
    z, stats = protect_latents(models, params, z0, cfg, shift, train, zT)
    if cfg.output == "residual":
        return x + (dec(params["vae"], z) - jax.lax.stop_gradient(ref)), stats
    return dec(params["vae"], z), stats


def quantize_ste(x):
    """Round to the uint8 grid in the forward pass, identity gradient (straight-through)."""
    q = jnp.round((jnp.clip(x, -1, 1) + 1) * 127.5) / 127.5 - 1
    return x + jax.lax.stop_gradient(q - x)


def pers_loss(models, params, x, ti_ids, db_ids, key, cfg, n_draws: int | None = None):
    """L_pers per image [B]: weighted TI / DreamBooth surrogate losses on x re-encoded by the VAE,
    averaged over ``n_draws`` (default ``cfg.n_draws``) draws of (latent sample, t, noise).

    The image is encoded once; the draws run as one batched UNet call per chunk of
    ``cfg.draw_batch`` draws (0: all at once), every surrogate's prompt in the same call. The same
    key gives the same draws for every x of the same shape (common random numbers)."""
    n = int(n_draws or cfg.n_draws)
    sched = sch.make_schedule(models.sd.scheduler)
    post = functools.partial(vae_lib.posterior, _vae(models))
    unet = functools.partial(sdm.unet_apply, models.sd)
    if cfg.remat:
        post, unet = jax.checkpoint(post), jax.checkpoint(unet)
    surrogates = [(w, ids) for w, ids in ((cfg.ti_weight, ti_ids), (cfg.db_weight, db_ids)) if w]
    b = x.shape[0]
    if not surrogates:
        return jnp.zeros((b,), jnp.float32)
    mean, std = post(params["vae"], x)
    emb = jnp.concatenate([jnp.repeat(sdm.text_embed(models.sd, params["text_encoder"], jnp.reshape(ids, (1, -1))),
                                      b, 0)
                           for _, ids in surrogates])

    def one_draw(k):
        k_lat, k_n, k_t = jax.random.split(k, 3)
        z = mean + std * jax.random.normal(k_lat, mean.shape, mean.dtype)
        noise = jax.random.normal(k_n, z.shape, z.dtype)
        t = jax.random.randint(k_t, (b,), 0, sched.num_train_timesteps)
        zt = sch.add_noise(sched, z, noise, t)
        m = len(surrogates)
        pred = unet(params["unet"], jnp.tile(zt, (m, 1, 1, 1)), jnp.tile(t, m), emb)
        per = sch.noise_loss(sched, pred, jnp.tile(z, (m, 1, 1, 1)), jnp.tile(noise, (m, 1, 1, 1)),
                             jnp.tile(t, m)).reshape(m, b)
        return sum(w * per[i] for i, (w, _) in enumerate(surrogates))

    per_draw = jax.lax.map(one_draw, jax.random.split(key, n), batch_size=int(cfg.get("draw_batch", 0)) or n)
    return jnp.mean(per_draw, axis=0)


def encoder_shift(models, params, x_prot, x):
    """Per image, the mean squared move of the VAE posterior mean, E(x') vs E(x) (scaled latents):
    the encoder term (``encoder_weight``), as PhotoGuard's encoder attack pushes E(x') away."""
    enc = functools.partial(encode_mean, models, params["vae"])
    return jnp.mean(jnp.square(enc(x_prot) - jax.lax.stop_gradient(enc(x))), axis=(1, 2, 3))


def protection_gain(models, params, x_prot, x, ti_ids, db_ids, key, cfg, n_draws: int | None = None):
    """What LDU maximises per image: L_pers(x') + ``encoder_weight`` x encoder_shift(x', x)."""
    lp = pers_loss(models, params, x_prot, ti_ids, db_ids, key, cfg, n_draws)
    if cfg.get("encoder_weight", 0.0):
        lp = lp + cfg.encoder_weight * encoder_shift(models, params, x_prot, x)
    return lp


def distance(x_prot, x, kind: str = "mse"):
    """Per-image imperceptibility distance on [-1, 1] images."""
    if kind == "mse":
        return jnp.mean(jnp.square(x_prot - x), axis=(1, 2, 3))
    if kind == "ssim":
        from ldu_jax.metrics.image import ssim
        return 1.0 - ssim((x_prot + 1) / 2, (x + 1) / 2)
    raise ConfigError(f"objective.distance must be 'mse' or 'ssim', got {kind!r}")


CONSTRAINTS = ("project", "dual", "hinge")


def constrain(x_prot, x, cfg):
    """``constraint='project'``: each image's change scaled onto the budget, x + s (x' - x) with
    s = min(1, sqrt(eps / d)) (exact for the MSE distance, before uint8 rounding); otherwise x'."""
    if cfg.constraint not in CONSTRAINTS:
        raise ConfigError(f"config.constraint must be one of {CONSTRAINTS}, got {cfg.constraint!r}")
    if cfg.constraint != "project":
        return x_prot
    if cfg.distance != "mse":
        raise ConfigError("constraint='project' needs distance='mse' (1 - SSIM does not scale with the "
                          "change); use constraint='dual' or 'hinge' with distance='ssim'")
    d = distance(x_prot, x)
    s = jnp.sqrt(cfg.eps / jnp.maximum(d, cfg.eps))   # = min(1, sqrt(eps / d)); no 0 x inf gradient at d -> 0
    return x + s.reshape(-1, 1, 1, 1) * (x_prot - x)


def objective(models, params, x, ti_ids, db_ids, key, lam, cfg, shift=None, train=False, latents=None):
    """(loss per image, aux): -L_pers (``protection_gain``) on the constrained image, plus for ``constraint`` 'dual' the
    Lagrangian term λ (d / eps - 1) (lam: scalar or per image, no gradient) or for 'hinge' a fixed
    hinge on the violation. 'project' has no penalty: the projection keeps every image within eps."""
    x_prot, stats = protect_images(models, params, x, cfg, shift, train, latents)
    x_prot = constrain(x_prot, x, cfg)
    x_eval = quantize_ste(x_prot) if cfg.quantize else x_prot
    lp = protection_gain(models, params, x_eval, x, ti_ids, db_ids, key, cfg)
    d = distance(x_eval, x, cfg.distance)
    viol = d / cfg.eps - 1.0
    if cfg.constraint == "dual":
        penalty = jax.lax.stop_gradient(lam) * viol
    elif cfg.constraint == "hinge":
        penalty = cfg.hinge_weight * jax.nn.relu(viol)
    else:
        penalty = jnp.zeros_like(viol)
    return -lp + penalty, {"l_pers": lp, "d": d, "viol": viol, "x_prot": x_prot, "stats": stats}


def update_multiplier(lam, viol, cfg):
    """Dual ascent λ <- clip(λ + η clip(d / eps - 1, -1, 1), 0, lam_max): the step is bounded, so
    one image far outside the budget cannot throw λ to a value that takes many steps to undo.
    Other constraints keep λ as it is."""
    if cfg.constraint != "dual":
        return lam
    return jnp.clip(lam + cfg.lam_lr * jnp.clip(viol, -1.0, 1.0), 0.0, cfg.lam_max)


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



def constrained_images(models, params, x, cfg, shift=None, latents=None):
    """The protected images as applied: ``protect_images`` then the budget's projection."""
    return constrain(protect_images(models, params, x, cfg, shift, latents=latents)[0], x, cfg)


def make_rho_step(models, tx, cfg, seed: int, data_sharding=None):
    """``step(state, frozen, images, ti_ids, db_ids) -> (state, info)``: one ρ update + dual step."""
    from ldu_jax.metrics.image import ssim

    def step(state: RhoState, frozen, images, ti_ids, db_ids):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        if data_sharding is not None:
            images = jax.lax.with_sharding_constraint(images, data_sharding)
        latents = prepare_latents(models, frozen, images, cfg)  # no gradient reaches it

        def loss_fn(rho_params):
            rho_vars = {**state.rho, "params": rho_params}
            params = {**frozen, "rho": rho_vars}
            lag, aux = objective(models, params, images, ti_ids, db_ids, key, state.lam, cfg, train=True,
                                 latents=latents)
            return jnp.mean(lag), aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.rho["params"])
        updates, opt_state = tx.update(grads, state.opt_state, state.rho["params"])
        rho = {**state.rho, "params": optax.apply_updates(state.rho["params"], updates)}
        if aux["stats"] is not None:
            rho["batch_stats"] = aux["stats"]
        lam = update_multiplier(state.lam, jnp.mean(aux["viol"]), cfg)
        d = aux["d"] if cfg.distance == "mse" else distance(aux["x_prot"], images, "mse")
        x_prot = jnp.clip(aux["x_prot"].astype(jnp.float32), -1, 1)
        info = {"loss": loss, "l_pers": jnp.mean(aux["l_pers"]), "d": jnp.mean(aux["d"]), "lambda": state.lam,
                "psnr": jnp.mean(psnr_from_mse(d)), "within": jnp.mean((aux["viol"] <= 1e-3).astype(jnp.float32)),
                "ssim": jnp.mean(ssim((x_prot + 1) / 2, (images + 1) / 2)), "grad_norm": optax.tree.norm(grads)}
        return RhoState(state.step + 1, rho, opt_state, lam), info

    return step


def heldout_gain(models, params, x, ti_ids, db_ids, cfg, n_draws: int = 32, seed: int = 1234):
    """(L_pers of ρ's protected x, L_pers of x), per image, on the same fixed draws: the measure of
    whether ρ raises its objective on images it was not trained on."""
    key = jax.random.PRNGKey(seed)
    x_prot = constrained_images(models, params, x, cfg)
    x_prot = quantize_ste(x_prot) if cfg.quantize else x_prot
    return (pers_loss(models, params, x_prot, ti_ids, db_ids, key, cfg, n_draws),
            pers_loss(models, params, x, ti_ids, db_ids, key, cfg, n_draws))


OPT_METHODS = ("gn", "adam")


def opt_score_key(key):
    """The fixed draws ldu-opt scores its iterates on (the gradients use fresh ones)."""
    return jax.random.fold_in(key, 1 << 30)


def optimize_shift(models, params, x, ti_ids, db_ids, key, cfg):
    """ldu-opt: a per-image shift δ of zT optimised inside one jit. Returns (protected images, info).

    ``opt_method='gn'`` (default): ``opt_steps`` Gauss-Newton ascent steps in the image metric
    (``shift_opt``): the L_pers image gradient over ``opt_draws`` (0: ``n_draws``) fresh draws
    (EMA ``grad_ema``),
    p = (JᵀJ + μ)⁻¹ Jᵀ h by ``cg_iters`` CG steps, a step of image length ``step_frac`` (cosine-decayed
    to ``step_frac_end``) x the budget radius, then δ scaled by bisection (``bisect_iters``, up to
    ``scale_max`` x) onto the budget measured on the uint8-rounded image. Each iterate is scored on
    as many fixed draws and the best feasible one is returned (the zero shift, x itself under
    ``output='residual'``, if none beats it).
    ``opt_method='adam'``: Adam on the objective (``constraint``, ``opt_lr``); the last iterate.
    """
    if cfg.opt_method not in OPT_METHODS:
        raise ConfigError(f"config.opt_method must be one of {OPT_METHODS}, got {cfg.opt_method!r}")
    latents = prepare_latents(models, params, x, cfg)  # independent of δ: computed once
    zT = latents[1]
    if cfg.opt_method == "adam":
        return _optimize_shift_adam(models, params, x, ti_ids, db_ids, key, cfg, latents)

    def image(delta):
        return protect_images(models, params, x, cfg, shift=lambda z: z + delta, latents=latents)[0]

    n = cfg.opt_draws or cfg.n_draws

    def loss_grad(xp, k):  # image gradient of L_pers at the rounded image (straight-through)
        return jax.grad(lambda xp: jnp.sum(protection_gain(models, params, quantize_ste(xp), x, ti_ids, db_ids,
                                                           k, cfg, n)))(xp)

    score_key = opt_score_key(key)

    def score(xp):
        return protection_gain(models, params, quantize_ste(xp), x, ti_ids, db_ids, score_key, cfg, n)

    def dist(xp):
        return distance(quantize_ste(xp), x)

    radius = jnp.sqrt(cfg.eps * (x[0].size))            # the budget as an image-space L2 norm
    b = x.shape[0]

    def feasible_at(delta):
        return lambda s: dist(image(delta * s.reshape(-1, 1, 1, 1))) <= cfg.eps

    def body(i, carry):
        delta, h_avg, best, best_score = carry
        y, jvp = jax.linearize(image, delta)
        vjp = jax.linear_transpose(jvp, delta)
        best, best_score = shift_opt.keep_best(best, delta, score(y), best_score, dist(y) <= cfg.eps)
        h = loss_grad(y, jax.random.fold_in(key, i))
        h_avg = cfg.grad_ema * h_avg + (1 - cfg.grad_ema) * h
        h_hat = h_avg / (1 - cfg.grad_ema ** (i + 1).astype(jnp.float32))   # bias-corrected
        p, jp = shift_opt.gauss_newton_solve(jvp, lambda v: vjp(v)[0], h_hat, cfg.cg_iters, cfg.cg_damping)
        frac = shift_opt.step_fraction(i, cfg.opt_steps, cfg.step_frac, cfg.step_frac_end)
        alpha = frac * radius / jnp.maximum(shift_opt.bnorm(jp), 1e-30)
        new = delta + alpha.reshape(-1, 1, 1, 1) * p
        s = shift_opt.bisect_scale(feasible_at(new), cfg.scale_max, cfg.bisect_iters, b)
        return new * s.reshape(-1, 1, 1, 1), h_avg, best, best_score

    zero = jnp.zeros_like(zT)
    x0 = image(zero)
    init_score = jnp.where(dist(x0) <= cfg.eps, score(x0), -jnp.inf)
    delta, _, best, best_score = jax.lax.fori_loop(0, cfg.opt_steps, body, (zero, jnp.zeros_like(x), zero, init_score))
    y = image(delta)
    best, best_score = shift_opt.keep_best(best, delta, score(y), best_score, dist(y) <= cfg.eps)
    x_prot = image(best)
    return x_prot, {"l_pers": best_score, "delta_norm": jnp.sqrt(jnp.mean(jnp.square(best), axis=(1, 2, 3))),
                    "psnr": psnr_from_mse(dist(x_prot))}


def _optimize_shift_adam(models, params, x, ti_ids, db_ids, key, cfg, latents):
    """Adam on δ against ``objective`` (per-image multipliers under constraint='dual')."""
    delta = jnp.zeros_like(latents[1])
    tx = optax.adam(cfg.opt_lr)
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
    x_prot = constrained_images(models, params, x, cfg, shift=shift_for(delta), latents=latents)
    return x_prot, {"lambda": lam, "delta_norm": jnp.sqrt(jnp.mean(jnp.square(delta), axis=(1, 2, 3))),
                    "psnr": psnr_from_mse(distance(x_prot, x))}


def placeholder_setup(sd, params, cfg):
    """Add the TI surrogate's placeholder token (from ``learned_embeds`` if given, else ``init_word``);
    returns (sd, params, ti_ids [L], db_ids [L])."""
    sd, params, token_id = sdm.add_placeholder_token(sd, params, cfg.placeholder_token, cfg.init_word)
    if cfg.learned_embeds:
        from ldu_jax.personalize import textual_inversion as ti
        embeds = ti.load_learned_embeds(cfg.learned_embeds)
        if cfg.placeholder_token not in embeds:
            raise ConfigError(f"{cfg.learned_embeds} has no embedding for {cfg.placeholder_token!r} "
                              f"(it has {sorted(embeds)})")
        params = ti.with_row(params, token_id, jnp.asarray(embeds[cfg.placeholder_token]).reshape(-1))
    ids = sdm.tokenize(sd, [cfg.ti_prompt.format(cfg.placeholder_token), cfg.db_prompt])
    return sd, params, jnp.asarray(ids[0]), jnp.asarray(ids[1])
