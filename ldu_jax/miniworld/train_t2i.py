"""Train a small text-to-image latent diffusion model from scratch (the mini-world's "Stable Diffusion").

A CLIP text encoder (``ldu_jax.sd.clip``, a few layers) and a text-conditioned UNet
(``ldu_jax.sd.unet``, cross-attention) are trained jointly on the latents of a
trained, frozen VAE (``train_vae.py``) with Stable Diffusion's noise-prediction loss
(``ldu_jax.personalize.common.latent_loss``: epsilon target, SD's scaled-linear DDPM schedule,
VAE posterior samples). Captions are replaced by the empty prompt with probability
``cfg_dropout`` (classifier-free guidance). The tokenizer is a CLIP BPE tokenizer learned over the
caption vocabulary (plus the personalization prompts' words), as ``ldu_jax/sd/make_tiny_tokenizer.py``
builds the tiny one, so every caption word is a single token.

The result is a diffusers-layout folder ``<workdir>/sd/`` (vae, unet, text_encoder, tokenizer,
scheduler; EMA weights) written with ``ldu_jax.sd.models.save_sd``: ``load_sd('<workdir>/sd')``
reads it, ``ldu_jax.personalize.common.generate`` samples from it, and the attacks run on it
(``python -m ldu_jax.cli.attack ti --config.model=<workdir>/sd ...``).

    from ldu_jax.miniworld.train_t2i import train_t2i
    sd, params = train_t2i(config, workdir, batches, vae_dir)   # config: configs/miniworld_t2i.py

``batches``: an iterator of ``(images [B, R, R, 3] in [-1, 1], captions list[str])``, or a
callable ``start_step -> such an iterator`` (a resumed run then continues the stream). A rerun
resumes from the newest orbax checkpoint and reuses the tokenizer saved in ``<workdir>/tokenizer``.
Across n hosts each gives its B / n rows of the global batch (``data.local_rows``); the
parameters are replicated, every host takes part in the checkpoints, process 0 writes the
tokenizer (from ``vocabulary``, which a run across hosts must give), ``metrics.jsonl``, ``sd/``
and the samples.
"""
from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import regex

from ldu_jax import checkpoint as ckpt
from ldu_jax import data as data_lib
from ldu_jax import files
from ldu_jax import loop, parallel
from ldu_jax.errors import ConfigError, MissingError
from ldu_jax.miniworld.train_vae import data_stream
from ldu_jax.personalize import common
from ldu_jax.sd import clip_tokenizer
from ldu_jax.sd import make_tiny_tokenizer as mtt
from ldu_jax.sd import models as sdm
from ldu_jax.sd import schedule as sch
from ldu_jax.sd import vae as vae_lib
from ldu_jax.sd.clip import CLIPTextConfig, CLIPTextModel
from ldu_jax.sd.unet import UNet, UNetConfig
from ldu_jax.shortcut.trainer import TrainState, make_optimizer

# The prompts the attacks and evaluations use: their words must be tokens too.
ATTACK_PROMPTS = ("a photo of sks person", "a dslr portrait of sks person", "a photo of person")

_WORD = regex.compile(r"[\p{L}]+")


# ----------------------------------------------------------------------------- tokenizer

def caption_words(texts) -> list[str]:
    """The distinct words of ``texts`` (lower-cased letter runs, as CLIP's pre-tokenizer splits
    them; digits and punctuation are single byte-level tokens already), in first-seen order."""
    return list(dict.fromkeys(w for t in texts for w in _WORD.findall(t.lower())))


def build_tokenizer(texts, out_dir: str, max_length: int, base_words=True):
    """A CLIP BPE tokenizer (HF format, saved to ``out_dir``) in which every word of ``texts``,
    of ``ATTACK_PROMPTS`` and (with ``base_words``) of the tiny tokenizer's prompt list is one token.

    The vocabulary is built as ``make_tiny_tokenizer`` does: CLIP's 256 byte-level characters, each
    also with '</w>', then greedy BPE merges learned on the word list (deterministic)."""
    words = caption_words(list(texts) + list(ATTACK_PROMPTS) + (list(mtt.WORDS) if base_words else []))
    merges = mtt.learn_merges(words)
    alphabet = mtt._byte_alphabet()
    tokens = alphabet + [c + mtt.EOW for c in alphabet] + [a + b for a, b in merges] + list(mtt.SPECIAL)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with files.atomic_dir(out_dir) as tmp:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False, indent=0)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.writelines(f"{a} {b}\n" for a, b in merges)
        tok = clip_tokenizer.from_files(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                                        int(max_length))
        bad = [w for w in words if len(tok.tokenize(w)) != 1]
        if bad:
            raise RuntimeError(f"tokenizer: {len(bad)} words are not single tokens, e.g. {bad[:5]}")
        clip_tokenizer.save(tok, tmp)
    return load_tokenizer(out_dir, max_length)


def load_tokenizer(path: str, max_length: int):
    tok = clip_tokenizer.load(path)
    tok.model_max_length = int(max_length)
    return tok


# ----------------------------------------------------------------------------- models

def unet_config(unet_cfg, sample_size: int, cross_attention_dim: int) -> dict:
    return dict(sample_size=int(sample_size), in_channels=int(unet_cfg.latent_channels),
                out_channels=int(unet_cfg.latent_channels),
                block_out_channels=tuple(int(c) for c in unet_cfg.block_out_channels),
                layers_per_block=int(unet_cfg.layers_per_block),
                down_block_types=tuple(unet_cfg.down_block_types), up_block_types=tuple(unet_cfg.up_block_types),
                attention_head_dim=int(unet_cfg.num_heads),  # diffusers' naming: the number of heads
                cross_attention_dim=int(cross_attention_dim))


def text_config(text_cfg, tok) -> dict:
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, hidden_size=int(text_cfg.hidden_size),
                intermediate_size=int(text_cfg.intermediate_size), num_hidden_layers=int(text_cfg.num_layers),
                num_attention_heads=int(text_cfg.num_heads), max_position_embeddings=int(text_cfg.max_length))


def make_sd(config, vae: vae_lib.VAE, tok) -> sdm.SD:
    """The SD bundle (modules only) of ``config.model`` on a trained VAE."""
    resolution = int(config.resolution)
    latent_size = vae.latent_shape(resolution, "config.resolution")[0]
    if int(config.model.unet.latent_channels) != vae.latent_channels:
        raise ConfigError(f"config.model.unet.latent_channels={config.model.unet.latent_channels} but the VAE "
                          f"has {vae.latent_channels} latent channels")
    te = CLIPTextModel(CLIPTextConfig.from_dict(text_config(config.model.text, tok), "config.model.text"))
    unet = UNet(UNetConfig.from_dict(unet_config(config.model.unet, latent_size,
                                                 config.model.text.hidden_size), "config.model.unet"))
    scheduler = {**sch.SD_SCHEDULER, **dict(config.get("scheduler", {}))}
    return sdm.SD(vae.module, unet, te, tok, scheduler, resolution)


def init_params(sd: sdm.SD, key) -> dict:
    k_unet, k_te = jax.random.split(key)
    return {"unet": sd.unet.init_params(k_unet), "text_encoder": sd.text_encoder.init_params(k_te)}


def t2i_optimizer(config):
    """(optax transform, lr schedule): ``config.optim`` for the UNet; the text encoder's updates
    scaled by ``config.text_lr_scale`` (0: frozen at its random initialisation, as SD's CLIP is
    frozen; weight decay then does not touch it either)."""
    tx, schedule = make_optimizer(config.optim, config.max_steps)
    scale = float(config.get("text_lr_scale", 1.0))
    if scale == 1.0:
        return tx, schedule
    if scale == 0:   # the UNet's transform (and its gradient clipping) sees only the UNet
        labels = lambda params: {k: jax.tree_util.tree_map(lambda _: k, v) for k, v in params.items()}  # noqa: E731
        return optax.multi_transform({"unet": tx, "text_encoder": optax.set_to_zero()}, labels), schedule
    mask = lambda params: {k: jax.tree_util.tree_map(lambda _: k == "text_encoder", v)  # noqa: E731
                           for k, v in params.items()}
    return optax.chain(tx, optax.masked(optax.scale(scale), mask)), schedule


# ----------------------------------------------------------------------------- step

def make_t2i_step(sd: sdm.SD, tx, schedule, config):
    """``step(state, vae_params, images, input_ids) -> (state, info)``, pure and jit-able.

    ``state.params = {'unet', 'text_encoder'}``; the VAE is frozen. Keys are
    ``fold_in(PRNGKey(seed), step)``, so a resumed run draws what an unbroken one would."""
    sched = sch.make_schedule(sd.scheduler)
    uncond = jnp.asarray(sdm.tokenize(sd, [""])[0])
    p_drop, ema, seed = float(config.cfg_dropout), float(config.ema), int(config.seed)
    vae = vae_lib.VAE(sd.vae, None)

    def step(state: TrainState, vae_params, images, input_ids):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        k_drop, k_lat, k_noise, k_t = jax.random.split(key, 4)
        drop = jax.random.bernoulli(k_drop, p_drop, (input_ids.shape[0],))
        ids = jnp.where(drop[:, None], uncond[None], input_ids)
        z = jax.lax.stop_gradient(vae_lib.encode(vae, vae_params, images, k_lat))

        def loss_fn(params):
            return jnp.mean(common.latent_loss(sd, sched, params, z, ids, k_noise, k_t))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = jnp.minimum(ema, (1.0 + state.step) / (10.0 + state.step))  # EMA warm-up, as diffusers'
        params_ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.params_ema, params)
        info = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
                "latent_std": jnp.std(z), "dropped": jnp.mean(drop.astype(jnp.float32))}
        return TrainState(state.step + 1, params, params_ema, opt_state), info

    return step


# ----------------------------------------------------------------------------- run

def _vocabulary(config, batches, vocabulary, log):
    """(caption texts for the tokenizer, the batches to train on)."""
    if vocabulary is not None:
        return list(vocabulary), batches
    n = int(config.vocab_batches)
    if callable(batches):
        texts = [c for _, caps in itertools.islice(data_stream(batches, 0), n) for c in caps]
        return texts, batches
    it = iter(batches)
    head = list(itertools.islice(it, n))
    log(f"t2i: tokenizer vocabulary from the captions of the first {len(head)} batches")
    return [c for _, caps in head for c in caps], itertools.chain(head, it)


def train_t2i(config, workdir: str, batches, vae_dir: str, log=print, vocabulary=None):
    """Train (or resume) the text encoder + UNet of ``config`` in ``workdir`` on the VAE in
    ``vae_dir``; writes ``<workdir>/sd`` and returns its ``(SD, params)`` (EMA weights).

    ``vocabulary``: texts (captions or words) whose words the tokenizer must hold; None reads the
    captions of the first ``config.vocab_batches`` batches."""
    os.makedirs(workdir, exist_ok=True)
    vae = vae_lib.load_vae(vae_dir)
    tok_dir = os.path.join(workdir, "tokenizer")
    if jax.process_count() > 1 and vocabulary is None and not os.path.isfile(os.path.join(tok_dir, "vocab.json")):
        raise ConfigError("train_t2i across hosts needs vocabulary= (each host reads only its rows' captions, so "
                          "a tokenizer built from them would depend on the number of hosts)")

    def tokenizer():   # process 0 builds it; the others load it after a barrier
        nonlocal batches
        if os.path.isfile(os.path.join(tok_dir, "vocab.json")):
            return load_tokenizer(tok_dir, config.model.text.max_length)
        texts, batches = _vocabulary(config, batches, vocabulary, log)
        return build_tokenizer(texts, tok_dir, config.model.text.max_length, config.base_words)

    tok = parallel.process0_first(tokenizer, "t2i: tokenizer")
    sd = make_sd(config, vae, tok)
    r = sd.resolution

    mesh = parallel.batch_mesh(config.batch_size)
    rep, dsh = parallel.replicated(mesh), parallel.data_sharding(mesh)
    tx, schedule = t2i_optimizer(config)

    def init_fn(key):
        params = init_params(sd, key)
        return TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params))

    key = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init_fn, key)
    shardings = jax.tree_util.tree_map(lambda _: rep, abstract)
    meta = {"kind": "t2i", "model": config.model.to_dict(), "param_shapes": ckpt.param_shapes(abstract.params),
            "vocab_size": len(tok), "resolution": r}
    manager = ckpt.make_manager(workdir, config.keep)
    state = loop.init_or_restore(init_fn, key, shardings, manager, meta, workdir, log)
    start = int(state.step)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    log(f"t2i: unet {count(abstract.params['unet']) / 1e6:.2f}M, text encoder "
        f"{count(abstract.params['text_encoder']) / 1e6:.2f}M parameters, {len(tok)} tokens, {r} px -> "
        f"{r // vae.factor}x{r // vae.factor}x{vae.latent_channels} latents; steps {start} -> {config.max_steps}")

    step_fn = make_t2i_step(sd, tx, schedule, config)
    update = jax.jit(step_fn, in_shardings=(shardings, rep, dsh, dsh), out_shardings=(shardings, rep),
                     donate_argnums=(0,))
    vae_params = parallel.put(vae.params, rep)

    local = data_lib.local_rows(config.batch_size, jax.process_count())   # this host's rows of a global batch

    def device_batches():
        for images, captions in data_stream(batches, start):
            images = np.asarray(images, np.float32)
            if images.shape != (local, r, r, 3) or len(captions) != local:
                raise ValueError(f"batch of {images.shape} images and {len(captions)} captions, expected "
                                 f"{(local, r, r, 3)} and {local}")
            yield (vae_params, parallel.global_batch(mesh, images),
                   parallel.global_batch(mesh, sdm.tokenize(sd, list(captions))))

    if start < config.max_steps:
        update, steps = loop.compile_first(update, state, device_batches(), "t2i")
        state = loop.train_loop(state, update, steps, manager=manager, meta=meta, workdir=workdir,
                                max_steps=config.max_steps, log_every=config.log_every,
                                save_every=config.save_every, batch_size=config.batch_size, desc="t2i")

    final = jax.device_get(state.params_ema if config.ema > 0 else state.params)
    out, vae_host = os.path.join(workdir, "sd"), jax.device_get(vae.params)
    # process 0 writes the bundle; the others find it written after a barrier
    params = parallel.process0_first(lambda: write_bundle(sd, vae_host, final, out) if jax.process_index() == 0
                                     else {"vae": vae_host, **final}, "t2i: bundle written")
    log(f"t2i: wrote {out}")
    if config.num_samples and config.sample_prompts and jax.process_index() == 0:
        # sampling is not split across hosts: process 0 alone, on its own devices (the params are
        # host arrays, so no collective), while the others go on to the caller's next barrier
        write_samples(sd, params, config, os.path.join(workdir, "samples", f"step_{int(state.step)}.png"))
    return sd, params


def write_bundle(sd, vae_params, params, out: str) -> dict:
    """Write text encoder + UNet ``params`` with the VAE's as the diffusers bundle ``out``
    (atomically); returns the bundle's params."""
    params = {"vae": vae_params, **params}
    sdm.save_sd(sd, params, out)
    return params


def export_bundle(config, workdir: str, vae_dir: str, out: str, step: int | None = None) -> int:
    """Write the checkpoint of the t2i run ``workdir`` at ``step`` (default: the latest; EMA weights
    unless ``config.ema`` is 0) as a diffusers bundle ``out``, e.g. to evaluate a run that has not
    finished. Returns the step written."""
    tok_dir = os.path.join(workdir, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "vocab.json")):
        raise MissingError(f"{workdir} is not a t2i run: no {tok_dir}/vocab.json")
    vae = vae_lib.load_vae(vae_dir)
    sd = make_sd(config, vae, load_tokenizer(tok_dir, config.model.text.max_length))
    if step is None:
        step = ckpt.make_manager(workdir).latest_step()
        if step is None:
            raise MissingError(f"no checkpoint in {workdir}")
    params, _ = ckpt.restore_params(workdir, ema=config.ema > 0, step=int(step))
    write_bundle(sd, vae.params, {k: params[k] for k in ("text_encoder", "unet")}, out)
    return int(step)


def text_use(sd, params, images, captions, draws: int = 8, seed: int = 0) -> dict:
    """How much the model uses its text: mean noise-prediction loss on ``images`` with their own
    ``captions``, with the captions shuffled (rotated by one) and with the empty prompt, over the
    same ``draws`` (latent sample, t, noise) draws. A model that ignores its text scores all three
    alike; Textual Inversion then has nothing to steer."""
    sched = sch.make_schedule(sd.scheduler)
    vae = vae_lib.VAE(sd.vae, None)
    x = jnp.asarray(images, jnp.float32)

    @jax.jit
    def loss(ids, key):
        k_lat, k_noise, k_t = jax.random.split(key, 3)
        z = vae_lib.encode(vae, params["vae"], x, k_lat)
        return jnp.mean(common.latent_loss(sd, sched, params, z, ids, k_noise, k_t))

    captions = list(captions)
    prompts = {"caption": captions, "shuffled": captions[1:] + captions[:1], "empty": [""] * len(captions)}
    keys = [jax.random.fold_in(jax.random.PRNGKey(seed), i) for i in range(draws)]
    ids = {name: jnp.asarray(sdm.tokenize(sd, p)) for name, p in prompts.items()}
    return {name: float(np.mean([float(loss(t, k)) for k in keys])) for name, t in ids.items()}


def write_samples(sd, params, config, path: str):
    """A grid: one row of ``num_samples`` DDIM + CFG samples per prompt of ``config.sample_prompts``."""
    out = common.generate(sd, params, list(config.sample_prompts), n_per_prompt=int(config.num_samples),
                          steps=int(config.sample_steps), guidance=float(config.guidance), seed=int(config.seed))
    rows = np.concatenate([out[p] for p in config.sample_prompts])
    data_lib.save_image_atomic(path, data_lib.make_grid(rows, ncol=int(config.num_samples)))
    return path


__all__ = ["ATTACK_PROMPTS", "build_tokenizer", "caption_words", "export_bundle", "init_params", "load_tokenizer",
           "make_sd", "make_t2i_step", "t2i_optimizer", "text_use", "train_t2i", "write_bundle", "write_samples"]
