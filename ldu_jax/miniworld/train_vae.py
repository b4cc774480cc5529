"""Train a small SD-style ``AutoencoderKL`` (ldu_jax.sd.autoencoder) from scratch (the mini-world's VAE).

Loss per image: L1 (or L2) reconstruction of a posterior sample's decode, plus ``kl_weight`` x the
KL divergence to N(0, I) (both means over elements), plus ``edge_weight`` x the L1 error of the
horizontal and vertical finite differences (a cheap sharpness proxy; no downloaded networks).
From step ``disc_start`` on, ``adv_weight`` > 0 adds SD's patch-adversarial term: a convolutional
discriminator (``PatchDiscriminator``) scores overlapping patches, trained with the hinge loss, and
the VAE is rewarded for patches it scores real, plus ``feat_weight`` x the L1 distance between the
discriminator's features of the photo and of its reconstruction (a perceptual-style loss that
needs no downloaded network). ``init_from`` starts a new run from another VAE run's weights (SD
trains its KL-f8 VAE the same way: reconstruction first, the discriminator switched on later).

``fragile.weight`` > 0 instead fine-tunes the encoder of ``init_from`` (decoder frozen) to be as
fragile as Stable Diffusion's: its latent can be pushed toward a chosen target by a small L-inf change
(PhotoGuard's encoder attack collapses SD's D(E(x')); "Pixel is a barrier", Xue et al. 2024, places
the vulnerability of latent diffusion models there), while the latents of clean photos stay where
they were (the anchor: every model trained on them stays valid) and random changes of the same size
barely move them. A VAE trained here from scratch is not fragile at any size or step count a CPU
allows (README: the calibration); this is the calibration of that property, made explicit.

After training, ``scaling_factor`` = 1 / std of posterior-sampled latents over ``scale_batches``
batches is written into the VAE config (as Stable Diffusion's 0.18215), so scaled latents have
about unit standard deviation, and the VAE goes to ``<workdir>/vae/`` in diffusers format
(``ldu_jax.sd.vae.load_vae`` reads it).

    from ldu_jax.miniworld.train_vae import train_vae
    vae = train_vae(config, workdir, batches)   # config: configs/miniworld_vae.py

``batches``: an iterator of ``(images [B, H, W, 3] in [-1, 1], captions)`` with B the config's
``batch_size`` (captions are ignored here), or a callable ``start_step -> such an iterator`` (so a
resumed run continues the data stream where it stopped). The run resumes from the newest orbax
checkpoint in ``workdir`` and logs ``metrics.jsonl`` (loss, rec, kl, edge, psnr, grad_norm, lr).
Across n hosts each gives its B / n rows of the global batch (``data.local_rows``); the
parameters are replicated, every host takes part in the checkpoints, process 0 writes
``metrics.jsonl`` and ``vae/``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldu_jax import checkpoint as ckpt
from ldu_jax import data as data_lib
from ldu_jax import files, loop, parallel
from ldu_jax.errors import ConfigError
from ldu_jax.sd import vae as vae_lib
from ldu_jax.sd.autoencoder import AutoencoderKL, VAEConfig
from ldu_jax.shortcut.trainer import make_optimizer


@flax.struct.dataclass
class VAEState:
    step: jax.Array
    params: Any
    opt_state: Any
    disc_params: Any = None          # the patch discriminator (None without an adversarial loss)
    disc_opt_state: Any = None
    anchor_params: Any = None        # fragile: the initial VAE, whose clean latents the run keeps


ENCODER_KEYS = ("encoder", "quant_conv")     # what a fragile run trains; the decoder stays as it is


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator as SD's KL VAEs use: stride-2 4x4 convolutions with GroupNorm and
    leaky ReLU, then a 1-channel map of real/fake logits, one per overlapping patch. Returns
    (logits [B, h, w], the features of every stage)."""
    channels: tuple = (32, 64, 128)
    groups: int = 8

    @nn.compact
    def __call__(self, x):
        feats = []
        for i, c in enumerate(self.channels):
            x = nn.Conv(c, (4, 4), strides=(2, 2), padding=1)(x)
            if i:
                x = nn.GroupNorm(num_groups=min(self.groups, c))(x)
            x = nn.leaky_relu(x, 0.2)
            feats.append(x)
        return nn.Conv(1, (3, 3), padding=1)(x)[..., 0], feats


def adversarial(loss_cfg) -> bool:
    return float(loss_cfg.get("adv_weight", 0.0)) > 0


def fragile(config) -> bool:
    return float(config.get("fragile", {}).get("weight", 0.0)) > 0


def encoder_only(tx):
    """``tx`` on the encoder's params; zero updates for the rest."""
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                 lambda params: {k: "train" if k in ENCODER_KEYS else "frozen" for k in params})


def vae_config(model_cfg) -> dict:
    """The diffusers ``AutoencoderKL`` config of ``config.model`` (factor 2^(blocks - 1))."""
    n = len(model_cfg.block_out_channels)
    return dict(in_channels=3, out_channels=3, latent_channels=int(model_cfg.latent_channels),
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(int(c) for c in model_cfg.block_out_channels),
                layers_per_block=int(model_cfg.layers_per_block), norm_num_groups=int(model_cfg.norm_num_groups),
                sample_size=int(model_cfg.sample_size), scaling_factor=1.0)


def make_vae_module(model_cfg, **overrides) -> AutoencoderKL:
    return AutoencoderKL(VAEConfig.from_dict({**vae_config(model_cfg), **overrides}))


def _sample(module, params, images, key):
    """(posterior sample, mean, log-variance) of images: unscaled NHWC latents."""
    mean, logvar = module.apply({"params": params}, images, method=module.encode)
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype), mean, logvar


def psnr(x, y):
    """PSNR (dB) of images in [-1, 1], per example."""
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def _edges(x):
    return x[:, 1:, :, :] - x[:, :-1, :, :], x[:, :, 1:, :] - x[:, :, :-1, :]


def vae_losses(module, params, images, key, loss_cfg, disc=None, disc_params=None, adv_on=0.0):
    """(loss, (info, reconstruction)) of one batch: reconstruction of a posterior sample, KL, edge
    loss; with ``disc``, ``adv_on`` (0 or 1) x the adversarial and feature-matching terms."""
    z, mean, logvar = _sample(module, params, images, key)
    rec = module.apply({"params": params}, z, method=module.decode)
    err = rec - images
    rec_loss = jnp.mean(jnp.abs(err)) if loss_cfg.rec == "l1" else jnp.mean(jnp.square(err))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    loss = rec_loss + loss_cfg.kl_weight * kl
    info = {"rec": rec_loss, "kl": kl, "psnr": jnp.mean(psnr(rec, images)), "latent_std": jnp.std(z)}
    if loss_cfg.edge_weight:
        (ry, rx), (iy, ix) = _edges(rec), _edges(images)
        edge = 0.5 * (jnp.mean(jnp.abs(ry - iy)) + jnp.mean(jnp.abs(rx - ix)))
        loss = loss + loss_cfg.edge_weight * edge
        info["edge"] = edge
    if disc is not None:
        logits, f_rec = disc.apply({"params": disc_params}, rec)
        _, f_img = disc.apply({"params": disc_params}, images)
        g_adv = -jnp.mean(logits)
        feat = sum(jnp.mean(jnp.abs(a - jax.lax.stop_gradient(b))) for a, b in zip(f_rec, f_img)) / len(f_rec)
        loss = loss + adv_on * (loss_cfg.adv_weight * g_adv + loss_cfg.feat_weight * feat)
        info.update(g_adv=g_adv, feat=feat)
    return loss, (info, rec)


def _sq(a):
    return jnp.sum(jnp.square(a), axis=tuple(range(1, a.ndim)))


def attack_targets(images, key):
    """Latent targets of the fragility term's attack, none of them the calibration's: even rows the
    batch's other photos (rolled by one), odd rows smooth random images (8x8 noise upsampled)."""
    b, h, w, c = images.shape
    noise = jax.image.resize(jax.random.uniform(key, (b, 8, 8, c), minval=-1, maxval=1), images.shape, "linear")
    return jnp.where((jnp.arange(b) % 2 == 0)[:, None, None, None], jnp.roll(images, 1, axis=0), noise)


def targeted_pgd(encode, x, z_target, key, eps: float, steps: int):
    """PhotoGuard's encoder attack: L-inf PGD (random start, sign steps of 2.5 eps / steps, pixels
    kept in [-1, 1]) minimising ||E(x + d) - z_target||^2; returns d, without gradient."""
    d = jax.random.uniform(key, x.shape, minval=-eps, maxval=eps)

    def body(d, _):
        g = jax.grad(lambda d: jnp.sum(jnp.square(encode(jnp.clip(x + d, -1, 1)) - z_target)))(d)
        return jnp.clip(d - 2.5 * eps / steps * jnp.sign(g), -eps, eps), None

    d, _ = jax.lax.scan(body, d, None, length=steps)
    return jax.lax.stop_gradient(jnp.clip(x + d, -1, 1) - x)


def fragility_losses(module, params, anchor_params, images, key, cfg):
    """(loss, info) of a fragile fine-tune (module doc; ``cfg`` = config.fragile):
    ``anchor_weight`` x the relative squared move of clean latents from the anchor VAE's (plus 1% of
    the log-variance's squared change), plus ``random_weight`` x the relative squared move under a
    random +-eps sign change, minus ``weight`` x the attack's progress toward its target,
    1 - |E(x + d) - z_t|^2 / |E(x) - z_t|^2 (1: reached)."""
    k_target, k_pgd, k_rand = jax.random.split(key, 3)
    encode = lambda p, x: module.apply({"params": p}, x, method=module.encode)  # noqa: E731
    mean0, logvar0 = encode(anchor_params, images)
    mean, logvar = encode(params, images)
    anchor = jnp.mean(_sq(mean - mean0) / _sq(mean0)) + 0.01 * jnp.mean(jnp.square(logvar - logvar0))
    z_t = jax.lax.stop_gradient(encode(params, attack_targets(images, k_target))[0])
    d = targeted_pgd(lambda x: encode(params, x)[0], images, z_t, k_pgd, cfg.eps, cfg.pgd_steps)
    progress = 1.0 - _sq(encode(params, images + d)[0] - z_t) / _sq(jax.lax.stop_gradient(mean) - z_t)
    sign = cfg.eps * jnp.sign(jax.random.normal(k_rand, images.shape))
    random = _sq(encode(params, jnp.clip(images + sign, -1, 1))[0] - mean) / _sq(jax.lax.stop_gradient(mean))
    loss = cfg.anchor_weight * anchor + cfg.random_weight * jnp.mean(random) - cfg.weight * jnp.mean(progress)
    return loss, {"anchor": anchor, "progress": jnp.mean(progress), "random": jnp.mean(random)}


def disc_loss(disc, disc_params, images, rec):
    """The hinge loss of the patch discriminator (real photos vs reconstructions)."""
    real, _ = disc.apply({"params": disc_params}, images)
    fake, _ = disc.apply({"params": disc_params}, rec)
    return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)), (jnp.mean(real), jnp.mean(fake))


def make_vae_step(module, tx, schedule, loss_cfg, seed: int, disc=None, disc_tx=None, fragile_cfg=None):
    """``step(state, images) -> (state, info)``, pure; keys are ``fold_in(PRNGKey(seed), step)``.
    With ``disc`` (and its optimizer ``disc_tx``) the adversarial terms switch on at
    ``loss_cfg.disc_start``, when the discriminator starts training too. With ``fragile_cfg`` the
    loss is ``fragility_losses`` against ``state.anchor_params`` (``tx`` should freeze the decoder)."""
    if loss_cfg.rec not in ("l1", "l2"):
        raise ConfigError(f"config.loss.rec must be 'l1' or 'l2', got {loss_cfg.rec!r}")

    def losses(params, state, images, key, adv_on):
        if fragile_cfg is not None:
            loss, info = fragility_losses(module, params, state.anchor_params, images, key, fragile_cfg)
            return loss, (info, None)
        return vae_losses(module, params, images, key, loss_cfg, disc, state.disc_params, adv_on)

    def step(state: VAEState, images):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        adv_on = (state.step >= loss_cfg.get("disc_start", 0)).astype(jnp.float32) if disc is not None else 0.0
        (loss, (info, rec)), grads = jax.value_and_grad(lambda p: losses(p, state, images, key, adv_on),
                                                        has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        info = {"loss": loss, **info, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        disc_params, disc_opt = state.disc_params, state.disc_opt_state
        if disc is not None:
            (d_loss, (real, fake)), d_grads = jax.value_and_grad(
                lambda d: disc_loss(disc, d, images, jax.lax.stop_gradient(rec)), has_aux=True)(disc_params)
            d_updates, new_opt = disc_tx.update(d_grads, disc_opt, disc_params)
            # before disc_start the discriminator stays at its initialisation
            disc_params = jax.tree_util.tree_map(lambda a, b: a + adv_on * b, disc_params, d_updates)
            disc_opt = jax.tree_util.tree_map(lambda n, o: jnp.where(adv_on > 0, n, o), new_opt, disc_opt)
            info.update(d_loss=d_loss, d_real=real, d_fake=fake)
        return VAEState(state.step + 1, params, opt_state, disc_params, disc_opt, state.anchor_params), info

    return step


def data_stream(batches, start_step: int):
    """An iterator from ``batches`` (an iterator, or a callable taking the start step)."""
    return iter(batches(start_step)) if callable(batches) else iter(batches)


def latent_stats(module, params, image_batches, seed: int, mesh=None) -> tuple[float, float]:
    """(std of posterior-sampled unscaled latents, mean reconstruction PSNR through the posterior
    mean) over the given image batches, one jitted pass per batch. With ``mesh``: each batch is
    this host's rows of a global batch (``parallel.global_batch``)."""
    def one(p, x, key):
        z, mean, _ = _sample(module, p, x, key)
        rec = module.apply({"params": p}, mean, method=module.decode)
        return jnp.mean(z), jnp.mean(jnp.square(z)), jnp.mean(psnr(rec, x))

    f = jax.jit(one)
    stats = []
    for i, x in enumerate(image_batches):
        x = parallel.global_batch(mesh, x) if mesh is not None else jnp.asarray(x)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        if i == 0 and jax.process_count() > 1:   # across hosts: compiled, then a barrier (loop.compile_first)
            f = f.lower(params, x, key).compile()
            parallel.sync("vae: latent stats compiled")
        stats.append(jax.device_get(f(params, x, key)))
    m, m2, p = np.mean(np.asarray(stats, np.float64), axis=0)   # equal-sized batches
    return float(np.sqrt(max(m2 - m * m, 1e-12))), float(p)


def write_vae(module, params, scaling_factor: float, path: str, save: bool = True):
    """Save the VAE in diffusers format with ``scaling_factor`` in its config (atomically; not
    with ``save`` False: another host writes it); returns it."""
    out = AutoencoderKL(dataclasses.replace(module.config, scaling_factor=float(scaling_factor)), module.dtype)
    if save:
        vae_lib.save_vae(vae_lib.VAE(out, jax.device_get(params)), path)
    return vae_lib.VAE(out, params)


def initial_vae(init_from: str, module, size: int):
    """(params, scaling_factor) a new run starts from: (None, None) for a random start; else the
    latest params of another ``train_vae`` work dir, or of a diffusers VAE folder, with the same
    architecture, and that VAE's scaling factor (None for a run that has not written its VAE)."""
    if not init_from:
        return None, None
    want = ckpt.param_shapes(jax.eval_shape(module.init_params, jax.random.PRNGKey(0)))
    if os.path.isfile(os.path.join(init_from, "config.json")):
        vae = vae_lib.load_vae(init_from)
        if ckpt.param_shapes(vae.params) != want:
            raise ckpt.CheckpointMismatchError(f"init_from={init_from} holds a different VAE architecture")
        return jax.tree_util.tree_map(jnp.asarray, vae.params), float(vae.scaling_factor)
    state, meta = ckpt.restore_state(init_from)
    if meta.get("kind") != "vae":
        raise ckpt.CheckpointMismatchError(f"init_from={init_from} is not a VAE run (kind={meta.get('kind')!r})")
    if meta.get("param_shapes") != want or list(meta.get("data_shape", [])) != [size, size, 3]:
        raise ckpt.CheckpointMismatchError(f"init_from={init_from} holds a different VAE architecture or size")
    written = files.read_json(os.path.join(init_from, "vae", "config.json")) or {}
    return jax.tree_util.tree_map(jnp.asarray, state["params"]), written.get("scaling_factor")


def train_vae(config, workdir: str, batches, log=print) -> vae_lib.VAE:
    """Train (or resume) the VAE of ``config`` in ``workdir``; writes and returns ``<workdir>/vae``."""
    os.makedirs(workdir, exist_ok=True)
    module = make_vae_module(config.model)
    size = int(config.model.sample_size)
    mesh = parallel.batch_mesh(config.batch_size)
    rep, dsh = parallel.replicated(mesh), parallel.data_sharding(mesh)
    tx, schedule = make_optimizer(config.optim, config.max_steps)
    init_params, init_scaling = initial_vae(config.get("init_from", ""), module, size)
    fragile_cfg = config.fragile if fragile(config) else None
    if fragile_cfg is not None:
        if init_params is None:
            raise ConfigError("config.fragile.weight > 0 fine-tunes an existing VAE: set config.init_from")
        tx = encoder_only(tx)
    disc = disc_tx = None
    if adversarial(config.loss):
        disc = PatchDiscriminator(tuple(config.disc.channels), int(config.disc.groups))
        disc_tx = optax.adam(config.disc.lr, b1=0.5, b2=0.9)   # the usual GAN betas

    def init_fn(key):
        params = module.init_params(key) if init_params is None else init_params
        if fragile_cfg is not None:
            return VAEState(jnp.zeros((), jnp.int32), params, tx.init(params), anchor_params=params)
        if disc is None:
            return VAEState(jnp.zeros((), jnp.int32), params, tx.init(params))
        d = disc.init(jax.random.fold_in(key, 1), jnp.zeros((1, size, size, 3)))["params"]
        return VAEState(jnp.zeros((), jnp.int32), params, tx.init(params), d, disc_tx.init(d))

    key = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init_fn, key)
    shardings = jax.tree_util.tree_map(lambda _: rep, abstract)
    meta = {"kind": "vae", "model": config.model.to_dict(), "param_shapes": ckpt.param_shapes(abstract.params),
            "data_shape": [size, size, 3]}
    manager = ckpt.make_manager(workdir, config.keep)
    state = loop.init_or_restore(init_fn, key, shardings, manager, meta, workdir, log)
    start = int(state.step)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract.params))
    h, _, c = module.config.latent_shape(size, "config.model.sample_size")
    log(f"vae: {n_params / 1e6:.2f}M parameters, {size} px -> {h} px x {c} latents, "
        f"steps {start} -> {config.max_steps}")

    step_fn = make_vae_step(module, tx, schedule, config.loss, config.seed, disc, disc_tx, fragile_cfg)
    update = jax.jit(step_fn, in_shardings=(shardings, dsh), out_shardings=(shardings, rep), donate_argnums=(0,))
    stream = data_stream(batches, start)

    local = data_lib.local_rows(config.batch_size, jax.process_count())

    def images_only(it):
        for images, _ in it:
            images = np.asarray(images, np.float32)
            if images.shape != (local, size, size, 3):
                raise ValueError(f"batch of shape {images.shape}, expected {(local, size, size, 3)}")
            yield images

    def device_batches():
        for images in images_only(stream):
            yield (parallel.global_batch(mesh, images),)

    if start < config.max_steps:
        update, steps = loop.compile_first(update, state, device_batches(), "vae")
        state = loop.train_loop(state, update, steps, manager=manager, meta=meta, workdir=workdir,
                                max_steps=config.max_steps, log_every=config.log_every,
                                save_every=config.save_every, batch_size=config.batch_size, desc="vae")

    # scaling factor on fresh batches of the same stream (a resumed-and-finished run draws from step max_steps)
    held = data_stream(batches, config.max_steps) if callable(batches) else stream
    imgs = [x for _, x in zip(range(config.scale_batches), images_only(held))]
    std, p = latent_stats(module, state.params, imgs, config.seed + 1, mesh)
    # a fragile fine-tune keeps its latents where the anchor's were, so keeps its scale too
    scaling = init_scaling if fragile_cfg is not None and init_scaling else 1.0 / std
    out = os.path.join(workdir, "vae")   # process 0 writes it; the others find it after a barrier
    vae = parallel.process0_first(lambda: write_vae(module, state.params, scaling, out,
                                                    save=jax.process_index() == 0), "vae: written")
    log(f"vae: latent std {std:.4f}, scaling_factor {scaling:.4f}; reconstruction PSNR {p:.2f} dB "
        f"(posterior mean, {len(imgs)} batches); wrote {os.path.join(workdir, 'vae')}")
    if jax.process_index() == 0:
        loop.append_jsonl(os.path.join(workdir, "metrics.jsonl"),
                          {"step": int(state.step), "scaling_factor": scaling, "eval_psnr": p})
    return vae
