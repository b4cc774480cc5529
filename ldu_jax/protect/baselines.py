"""Pixel-space baseline protections, as pure functions of (sd, params, images, key, config).

    advdm       PGD maximising the LDM noise-prediction loss (EOT over latent / t / noise draws)
    aspl        Anti-DreamBooth ASPL: rounds of {surrogate DreamBooth steps on the clean images (a
                fresh copy of the model), sign-PGD against that copy, model steps on the perturbed images}
    fsmg        Anti-DreamBooth FSMG: PGD against a fixed DreamBooth model trained on the clean images
    photoguard  PhotoGuard encoder attack: PGD pulling the VAE posterior mean to zero or to a target's
    mist        Mist: minimise  ||E(x') - E(y)||^2 (sum)  -  rate * noise-prediction loss  (target y)
    sds / sds-  Xue et al.: the score-distillation gradient (eps_pred - eps) pushed through the encoder
                only (the UNet Jacobian skipped); ``sds`` ascends, ``sds-`` descends
    pid         PID: PGD moving the VAE posterior mean and log-variance away from the clean image's

Each function maps images [B, R, R, 3] in [-1, 1] to ``(protected, info)``; ``info['trace']`` is the
method's objective (mean over the batch) at every PGD step, in the direction it optimises (see
``DIRECTION``). Every PGD loop is one ``lax.fori_loop`` (ASPL: a loop over rounds holding the
surrogate loops and the PGD loop), so one jit compiles it once whatever the number of steps.

Budgets are L-inf on the [0, 1] scale (``eps``, ``step_size``); the iterate is projected onto the
eps-ball around the input and clipped to the valid range [-1, 1] after every step.

``params``: the SD parameters {'vae', 'unet', 'text_encoder'} plus the method's fixed inputs, made
by ``prepare``: 'ids' [L] (the prompt), 'target' [1, R, R, 3] (photoguard, mist), and for the
DreamBooth surrogates with prior preservation 'class_images' [N, R, R, 3] and 'class_ids' [L].
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldu_jax import parallel
from ldu_jax.personalize import dreambooth
from ldu_jax.sd import models as sdm
from ldu_jax.sd import schedule as sch
from ldu_jax.sd import vae as vae_lib

METHODS = ("advdm", "aspl", "fsmg", "photoguard", "mist", "sds", "sds-", "pid")

# +1: the objective in info['trace'] goes up over the run; -1: down.
DIRECTION = {"advdm": 1, "aspl": 1, "fsmg": 1, "photoguard": -1, "mist": -1, "sds": 1, "sds-": -1, "pid": 1}

SD_PARTS = ("vae", "unet", "text_encoder")


# ----------------------------------------------------------------------------- configuration

def base_config(method: str) -> ml_collections.ConfigDict:
    """Defaults shared by every baseline config (``configs/protect_<method>_*.py`` override them)."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; one of {', '.join(METHODS)}")
    c = ml_collections.ConfigDict()
    c.method = method
    c.seed = 0
    c.sd = "tiny"                  # Stable Diffusion: 'tiny', a diffusers folder or a hub id
    c.resolution = 0               # 0: the SD model's resolution
    c.dtype = "float32"            # compute dtype of the SD parts (params stay float32)
    c.remat = False                # recompute the VAE encoder / UNet in the backward pass (memory)
    # PGD; budgets in [0, 1] units (L-inf)
    c.eps = 16 / 255
    c.step_size = 1 / 255
    c.steps = 100                  # PGD steps (aspl: per round)
    c.random_start = False         # start from a uniform draw in the eps-ball
    c.step_decay = "none"          # 'none' or 'linear' (step_size -> step_size / 100 over the run)
    c.n_draws = 1                  # EOT: (latent sample, t, noise) draws per PGD step
    c.resample_draws = True        # fresh draws every step (EOT); False: the same draws throughout
    c.t_min = 0                    # timesteps drawn from [t_min, t_max); t_max 0: all of them
    c.t_max = 0
    c.prompt = "a photo of sks person"
    # photoguard / mist target: 'pattern' (built-in texture), 'zero' (photoguard only), or an image path
    c.target = "pattern"
    c.rate = 1e4                   # mist: weight of the semantic (noise-prediction) loss
    c.pid_loss = "add-log"         # pid: 'add-log' (mean + log-variance), 'mean', 'var'
    # aspl / fsmg: the DreamBooth surrogate (ldu_jax.personalize.dreambooth settings)
    c.rounds = 50                  # aspl rounds
    c.surrogate_steps = 3          # aspl: DreamBooth steps per phase; fsmg: training steps before PGD
    c.surrogate = ml_collections.ConfigDict({
        "lr": 5e-6, "weight_decay": 1e-2, "max_grad_norm": 1.0, "grad_accum": 1, "batch_size": 2,
        "train_text_encoder": True, "lora_rank": 0, "lora_alpha": 4.0,
        "prior_weight": 0.0, "class_prompt": "a photo of person", "class_dir": "", "num_class_images": 200,
        "class_steps": 50, "class_guidance": 7.5})
    # apply
    c.apply_batch = 4              # images per protected batch (aspl / fsmg: one identity's set)
    return c


def config_name(method: str) -> str:
    """The <name> of configs/protect_<name>_{tiny,sd21}.py for a method."""
    return "sds_minus" if method == "sds-" else method


def check_config(method: str, cfg) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; one of {', '.join(METHODS)}")
    got = cfg.get("method")
    if got != method:
        raise ValueError(f"--method={method} needs a baseline config for it (e.g. "
                         f"configs/protect_{config_name(method)}_tiny.py), got one for {got or 'LDU'!r}")
    if not (0 < cfg.eps <= 1 and cfg.step_size > 0):
        raise ValueError(f"eps must be in (0, 1] and step_size > 0 ([0, 1] units), got {cfg.eps}, {cfg.step_size}")
    if cfg.step_decay not in ("none", "linear"):
        raise ValueError(f"step_decay must be 'none' or 'linear', got {cfg.step_decay!r}")
    if cfg.pid_loss not in ("add-log", "mean", "var"):
        raise ValueError(f"pid_loss must be 'add-log', 'mean' or 'var', got {cfg.pid_loss!r}")
    if cfg.n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {cfg.n_draws}")
    if method == "mist" and cfg.target == "zero":
        raise ValueError("mist needs a target image ('pattern' or a path), not 'zero'")


# ----------------------------------------------------------------------------- inputs

def pattern_image(resolution: int) -> np.ndarray:
    """The built-in target: a high-contrast colour texture (checkers, rings, stripes), [R, R, 3] in
    [-1, 1]; deterministic, so it works offline."""
    yy, xx = np.mgrid[0:resolution, 0:resolution] / float(resolution)
    checks = ((np.floor(xx * 8) + np.floor(yy * 8)) % 2) * 2 - 1
    rings = np.sin(2 * np.pi * 10 * np.hypot(xx - 0.5, yy - 0.5))
    stripes = np.sin(2 * np.pi * (12 * xx + 5 * yy))
    img = np.stack([0.8 * checks + 0.2 * rings, 0.7 * rings - 0.3 * stripes, 0.6 * stripes - 0.4 * checks], -1)
    return np.clip(img, -1, 1).astype(np.float32)


def target_image(spec: str, resolution: int) -> np.ndarray | None:
    """[1, R, R, 3] in [-1, 1] for 'pattern' or an image path; None for 'zero'."""
    if spec == "zero":
        return None
    if spec == "pattern":
        return pattern_image(resolution)[None]
    from ldu_jax import data as data_lib
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"target image {spec} does not exist (or use 'pattern' / 'zero')")
    return data_lib.load_image(path, resolution)[None]


def prepare(method: str, sd, params, cfg, resolution: int, log=print) -> dict:
    """The SD params plus the method's fixed inputs (see the module docstring)."""
    out = {k: params[k] for k in SD_PARTS}
    out["ids"] = jnp.asarray(sdm.tokenize(sd, [cfg.prompt])[0])
    if method in ("photoguard", "mist"):
        t = target_image(cfg.target, resolution)
        if t is not None:
            out["target"] = jnp.asarray(t)
    if method in ("aspl", "fsmg") and cfg.surrogate.prior_weight > 0:
        s = cfg.surrogate
        if not s.class_dir:
            raise ValueError(f"{method} with surrogate.prior_weight > 0 needs --config.surrogate.class_dir=DIR "
                             f"(images of {s.class_prompt!r}; missing ones are generated with the model)")
        gen_cfg = ml_collections.ConfigDict({
            "num_class_images": s.num_class_images, "class_prompt": s.class_prompt, "class_steps": s.class_steps,
            "class_guidance": s.class_guidance, "seed": cfg.seed})
        out["class_images"] = jnp.asarray(dreambooth.ensure_class_images(sd, params, s.class_dir, gen_cfg, log))
        out["class_ids"] = jnp.asarray(sdm.tokenize(sd, [s.class_prompt])[0])
    return out


# ----------------------------------------------------------------------------- building blocks

def _maybe_remat(fn, cfg, static_argnums=()):
    return jax.checkpoint(fn, static_argnums=static_argnums) if cfg.remat else fn


def posterior(sd, vae_params, x, cfg=None):
    """The VAE posterior of images: (mean, logvar), unscaled NHWC latents."""
    def enc(p, x):
        return sd.vae.apply({"params": p}, x, method=sd.vae.encode)
    if cfg is not None and cfg.remat:
        enc = jax.checkpoint(enc)
    return enc(vae_params, x)


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


def _start(x, key, cfg):
    if not cfg.random_start:
        return x
    eps = 2.0 * cfg.eps
    return x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps)


def _vg(per_image):
    def vg(xa, key):
        def f(xa):
            v = per_image(xa, key)
            return jnp.sum(v), v
        (_, val), g = jax.value_and_grad(f, has_aux=True)(xa)
        return val, g
    return vg


# ----------------------------------------------------------------------------- the methods

def advdm(sd, params, x, key, cfg):
    """AdvDM: maximise the noise-prediction loss (EOT over ``n_draws``)."""
    sched = sch.make_schedule(sd.scheduler)
    emb = jax.lax.stop_gradient(sdm.text_embed(sd, params["text_encoder"], params["ids"][None]))
    k0, k = jax.random.split(key)
    vg = _vg(lambda xa, kk: semantic_loss(sd, sched, params, xa, kk, cfg, emb))
    x_adv, trace = pgd(vg, x, _start(x, k0, cfg), k, cfg, +1)
    return x_adv, {"trace": trace}


def _target_posterior(sd, params, cfg):
    mean, logvar = posterior(sd, params["vae"], params["target"])
    return jax.lax.stop_gradient(mean), jax.lax.stop_gradient(logvar)


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
    tpost = _target_posterior(sd, params, cfg)
    k0, k = jax.random.split(key)
    vg = _vg(lambda xa, kk: mist_objective(sd, sched, params, xa, kk, cfg, emb, tpost)[0])
    x_adv, trace = pgd(vg, x, _start(x, k0, cfg), k, cfg, -1)
    return x_adv, {"trace": trace}


def photoguard_objective(sd, params, xa, cfg, target_mean):
    """||E_mean(x') - target|| per image (unscaled posterior mean; target 0 or a target's mean)."""
    mean, _ = posterior(sd, params["vae"], xa, cfg)
    d = mean if target_mean is None else mean - target_mean
    return jnp.sqrt(jnp.sum(jnp.square(d.astype(jnp.float32)), axis=(1, 2, 3)))


def photoguard(sd, params, x, key, cfg):
    """PhotoGuard encoder attack: minimise the distance of the posterior mean to 0 or the target's."""
    tmean = _target_posterior(sd, params, cfg)[0] if "target" in params else None
    k0, k = jax.random.split(key)
    vg = _vg(lambda xa, kk: photoguard_objective(sd, params, xa, cfg, tmean))
    x_adv, trace = pgd(vg, x, _start(x, k0, cfg), k, cfg, -1)
    return x_adv, {"trace": trace}


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
    x_adv, trace = pgd(vg, x, _start(x, k0, cfg), k, cfg, direction)
    return x_adv, {"trace": trace}


def sds_plus(sd, params, x, key, cfg):
    """SDS(+): ascend the score-distillation gradient."""
    return sds(sd, params, x, key, cfg, +1)


def sds_minus(sd, params, x, key, cfg):
    """SDS(-): descend it (Xue et al. find this the stronger protection)."""
    return sds(sd, params, x, key, cfg, -1)


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
    vg = _vg(lambda xa, kk: pid_objective(sd, params, xa, cfg, clean))
    x_adv, trace = pgd(vg, x, _start(x, k0, cfg), k, cfg, +1)
    return x_adv, {"trace": trace}


# ----------------------------------------------------------------------------- DreamBooth surrogates

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
    vg = _vg(lambda xa, kk: semantic_loss(sd, sched, p, xa, kk, cfg))
    x_adv, trace = pgd(vg, x, _start(x, k0, cfg), k, cfg, +1)
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
        vg = _vg(lambda xa, kk: semantic_loss(sd, sched, p, xa, kk, cfg))
        x_adv, trace = pgd(vg, x, x_adv, jax.random.fold_in(k, r), cfg, +1)
        new_stats = {"trace": stats["trace"].at[r].set(trace),
                     "model_moved": stats["model_moved"].at[r].set(_tree_dist(model_new, model)),
                     "surrogate_moved": stats["surrogate_moved"].at[r].set(_tree_dist(sur, model_new)),
                     "surrogate_changed": stats["surrogate_changed"].at[r].set(_tree_dist(sur, sur_prev))}
        return model_new, sur, count, x_adv, new_stats

    zeros = jnp.zeros((cfg.rounds,), jnp.float32)
    stats = {"trace": jnp.zeros((cfg.rounds, cfg.steps), jnp.float32), "surrogate_moved": zeros,
             "model_moved": zeros, "surrogate_changed": zeros}
    carry = (model0, model0, offset, _start(x, k0, cfg), stats)
    model, sur, _, x_adv, stats = jax.lax.fori_loop(0, cfg.rounds, round_, carry)
    return x_adv, {**stats, "surrogate": sur, "model": model}


PROTECT = {"advdm": advdm, "aspl": aspl, "fsmg": fsmg, "photoguard": photoguard, "mist": mist,
           "sds": sds_plus, "sds-": sds_minus, "pid": pid}


def protect(method: str, sd, params, x, key, cfg):
    """Dispatch: ``(protected images, info)``."""
    return PROTECT[method](sd, params, x, key, cfg)


def objective(method: str, sd, params, x_adv, x, key, cfg, surrogate=None):
    """The quantity ``method`` optimises, per image, at ``x_adv`` (for reports and tests; noisy
    objectives use ``key`` and ``cfg.n_draws``). ASPL / FSMG: the denoising loss under the
    surrogate parameters ``surrogate`` (info['surrogate']); SDS: the noise-prediction loss."""
    sched = sch.make_schedule(sd.scheduler)
    emb = sdm.text_embed(sd, params["text_encoder"], params["ids"][None])
    if method in ("advdm", "sds", "sds-"):
        return semantic_loss(sd, sched, params, x_adv, key, cfg, emb)
    if method in ("aspl", "fsmg"):
        p = {**params, **dreambooth.full_params({k: params[k] for k in SD_PARTS}, surrogate, cfg.surrogate)}
        return semantic_loss(sd, sched, p, x_adv, key, cfg)
    if method == "mist":
        return mist_objective(sd, sched, params, x_adv, key, cfg, emb, _target_posterior(sd, params, cfg))[0]
    if method == "photoguard":
        tmean = _target_posterior(sd, params, cfg)[0] if "target" in params else None
        return photoguard_objective(sd, params, x_adv, cfg, tmean)
    if method == "pid":
        return pid_objective(sd, params, x_adv, cfg, posterior(sd, params["vae"], x))
    raise ValueError(f"unknown baseline {method!r}")


# ----------------------------------------------------------------------------- apply

def load(method: str, cfg, log=print):
    """(sd, params with the method's inputs, resolution) for a baseline config."""
    check_config(method, cfg)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]
    sd, params = sdm.load_sd(cfg.sd, dtype=dtype)
    res = cfg.resolution or sd.resolution
    return sd, prepare(method, sd, params, cfg, res, log), res


def make_protector(method: str, cfg, log=print):
    """(protect_batch(x [apply_batch, R, R, 3] in [-1, 1], i) -> x', resolution): one jit, the batch
    sharded over the devices, parameters replicated; a folder's batch i uses key
    fold_in(PRNGKey(seed), i) (the same for every folder, whatever was protected before)."""
    sd, params, res = load(method, cfg, log)
    mesh = parallel.batch_mesh(cfg.apply_batch)
    dsh, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
    params = jax.device_put(params, rep)
    fn = jax.jit(lambda p, x, k: protect(method, sd, p, x, k, cfg)[0], out_shardings=dsh)
    base = jax.random.PRNGKey(cfg.seed)

    def protect_batch(x, index: int):
        k = jax.random.fold_in(base, index)
        return np.asarray(fn(params, jax.device_put(jnp.asarray(x, jnp.float32), dsh), k))

    return protect_batch, res
