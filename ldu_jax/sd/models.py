"""Stable Diffusion parts (our Flax VAE, UNet and CLIP text encoder, the CLIP tokenizer, the
scheduler config): loading and saving diffusers-format folders, tiny random bundles, and pure apply
functions.

Parameters live outside the modules: ``params = {'vae': ..., 'unet': ..., 'text_encoder': ...}``
(plain nested dicts, float32 after loading). Images and latents are NHWC throughout. The modules
(``autoencoder``, ``unet``, ``clip``) compute what diffusers' and transformers' PyTorch models
compute and keep the parameter names of the libraries' former Flax classes; ``weights`` reads and
writes the part folders, ``convert`` maps PyTorch names and layouts.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldu_jax import files
from ldu_jax.errors import ConfigError, MissingError
from ldu_jax.sd import clip as clip_lib
from ldu_jax.sd import clip_tokenizer
from ldu_jax.sd import schedule as sch
from ldu_jax.sd import unet as unet_lib
from ldu_jax.sd import weights
from ldu_jax.sd.autoencoder import AutoencoderKL, VAEConfig
from ldu_jax.sd.vae import TINY_VAE, compiled_init, tiny_vae

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_tokenizer")

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, cross_attention_dim=32)

TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77)


@dataclasses.dataclass(frozen=True, eq=False)
class SD:
    """The modules of a Stable Diffusion model (parameters are kept apart)."""
    vae: AutoencoderKL
    unet: unet_lib.UNet
    text_encoder: clip_lib.CLIPTextModel
    tokenizer: Any      # transformers CLIPTokenizer
    scheduler: dict     # scheduler_config.json as written (schedule.make_schedule reads it as diffusers does)
    resolution: int     # image size in px

    __hash__ = object.__hash__  # identity: usable as a static jit argument


# ----------------------------------------------------------------------------- pure functions

def latent_shape(sd: SD, resolution: int) -> tuple[int, int, int]:
    """(h, w, c) of the VAE's latents of ``resolution`` px images."""
    return sd.vae.config.latent_shape(resolution)


def tokenize(sd: SD, prompts: list[str]) -> np.ndarray:
    """Prompts -> int32 ids [B, model_max_length], padded to max length and truncated."""
    tok = sd.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="np").input_ids
    return ids.astype(np.int32)


def text_embed(sd: SD, te_params, input_ids):
    """Token ids [B, L] -> the CLIP text encoder's last_hidden_state [B, L, D]."""
    return sd.text_encoder.apply({"params": te_params}, jnp.asarray(input_ids, jnp.int32))


def unet_apply(sd: SD, unet_params, latents_nhwc, timesteps, encoder_hidden_states):
    """NHWC latents, timesteps (scalar or [B]), text states [B, L, D] -> NHWC prediction."""
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (latents_nhwc.shape[0],))
    return sd.unet.apply({"params": unet_params}, latents_nhwc, t, encoder_hidden_states)


# ----------------------------------------------------------------------------- tiny bundle

def tiny_tokenizer():
    """The small CLIP BPE tokenizer shipped in ``tiny_tokenizer/`` (see make_tiny_tokenizer.py)."""
    return clip_tokenizer.from_files(os.path.join(TOKENIZER_DIR, "vocab.json"),
                                     os.path.join(TOKENIZER_DIR, "merges.txt"), model_max_length=77)


def tiny_text_config(tokenizer) -> dict:
    """The tiny text encoder's config.json (transformers' CLIPTextConfig keys)."""
    return dict(TINY_TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def tiny_sd(seed: int = 0, *, dtype=jnp.float32) -> tuple[SD, dict]:
    """A small random SD, deterministic from ``seed``: vae.py's tiny VAE (64 px -> 8x8x4), a
    cross-attention UNet and a 2-layer CLIP text encoder of width 32, the shipped tiny tokenizer.

    Built once per (seed, dtype) in a process: the same SD object (so jitted functions keyed on
    it compile once) with a fresh copy of the params tree (the arrays are immutable)."""
    key = (seed, jnp.dtype(dtype).name)
    if key not in _TINY:
        _TINY[key] = _build_tiny_sd(seed, dtype)
    sd, params = _TINY[key]
    return sd, jax.tree_util.tree_map(lambda x: x, params)


_TINY: dict = {}


def _build_tiny_sd(seed: int, dtype) -> tuple[SD, dict]:
    key = jax.random.PRNGKey(seed)
    tok = tiny_tokenizer()
    vae = AutoencoderKL(VAEConfig.from_dict(TINY_VAE), dtype)
    unet = unet_lib.UNet(unet_lib.UNetConfig.from_dict(TINY_UNET), dtype)
    te = clip_lib.CLIPTextModel(clip_lib.CLIPTextConfig.from_dict(tiny_text_config(tok)), dtype)
    params = {
        "vae": tiny_vae(seed).params,
        "unet": compiled_init(unet.init_params, jax.random.fold_in(key, 1)),
        "text_encoder": compiled_init(te.init_params, jax.random.fold_in(key, 2)),
    }
    sd = SD(vae, unet, te, tok, dict(sch.SD_SCHEDULER), TINY_UNET["sample_size"] * vae.config.factor)
    return sd, params


# ----------------------------------------------------------------------------- loading

def load_sd(source: str, dtype=jnp.float32, allow_pickle: bool = False) -> tuple[SD, dict]:
    """Load ``(SD, params)`` from a diffusers-format folder (vae/ unet/ text_encoder/
    tokenizer/ scheduler/) or a hub id (when online); ``sources.sd`` also takes 'tiny'. Each model
    part may hold PyTorch safetensors (read without torch), a Flax msgpack or, with ``allow_pickle``
    (or LDU_JAX_ALLOW_PICKLE=1), a PyTorch .bin (a pickle; needs torch). Modules compute in
    ``dtype``; params are float32."""
    source = os.path.expanduser(source)
    if not os.path.isdir(source):
        if not weights.is_hub_id(source):
            raise MissingError(f"SD folder {source} does not exist")
        source = weights.download(source, extra=("model_index.json", "scheduler/*.json", "tokenizer/*"))
    return _load_folder(source, dtype, allow_pickle)


def _load_folder(folder: str, dtype, allow_pickle: bool = False) -> tuple[SD, dict]:
    """Every config is read and checked (unsupported keys, values and block types named) before
    any weight is read."""
    for part in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        weights.require(os.path.join(folder, part), f"the '{part}' subfolder")
    cfg = {part: weights.read_config(os.path.join(folder, part), part) for part in ("vae", "unet", "text_encoder")}
    where = {part: os.path.join(folder, part, "config.json") for part in cfg}   # errors name the file
    ucfg = unet_lib.UNetConfig.from_dict(cfg["unet"], where["unet"])
    ucfg.check_dtype(dtype, where["unet"])
    vae = AutoencoderKL(VAEConfig.from_dict(cfg["vae"], where["vae"], dtype=dtype), dtype)
    unet = unet_lib.UNet(ucfg, dtype)
    te = clip_lib.CLIPTextModel(clip_lib.CLIPTextConfig.from_dict(cfg["text_encoder"], where["text_encoder"]), dtype)

    tok = clip_tokenizer.load(os.path.join(folder, "tokenizer"), "SD folder's tokenizer/")
    tok.model_max_length = min(tok.model_max_length, te.config.max_position_embeddings)

    sched_path = weights.require(os.path.join(folder, "scheduler", "scheduler_config.json"),
                                 "scheduler/scheduler_config.json")
    with open(sched_path) as f:
        sched = _strip(json.load(f))
    try:
        sch.make_schedule(sched)    # refuse what we cannot compute before loading any weights
    except ValueError as e:
        raise ConfigError(f"{sched_path}: {e}") from None
    if ucfg.sample_size is None:
        raise ConfigError(f"{where['unet']}: sample_size is needed (the model's resolution)")

    key = jax.random.PRNGKey(0)
    shapes = {"vae": jax.eval_shape(vae.init_params, key), "unet": jax.eval_shape(unet.init_params, key),
              "text_encoder": jax.eval_shape(te.init_params, key)}
    params = {part: weights.load(os.path.join(folder, part), part, shapes[part], allow_pickle)
              for part in ("vae", "unet", "text_encoder")}
    return SD(vae, unet, te, tok, sched, int(ucfg.sample_size) * vae.config.factor), params


def _strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- saving

def save_sd(sd: SD, params, path: str):
    """Write a diffusers-format folder (PyTorch-layout safetensors, configs, tokenizer, scheduler)
    atomically: loadable by ``load_sd`` and by diffusers' PyTorch StableDiffusionPipeline."""
    with files.atomic_dir(path) as tmp:
        for part in ("vae", "unet", "text_encoder"):
            weights.save(os.path.join(tmp, part), part, getattr(sd, part).config, params[part], sd.tokenizer)
        clip_tokenizer.save(sd.tokenizer, os.path.join(tmp, "tokenizer"))
        os.makedirs(os.path.join(tmp, "scheduler"))
        files.write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"),
                         {"_class_name": "DDIMScheduler", **sd.scheduler}, indent=2, sort_keys=True)
        files.write_json(os.path.join(tmp, "model_index.json"), {
            "_class_name": "StableDiffusionPipeline",
            "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
            "feature_extractor": [None, None]}, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- placeholder token

def add_placeholder_token(sd: SD, params, token: str, init_word: str) -> tuple[SD, dict, int]:
    """Add ``token`` to (a copy of) the tokenizer and give it a new text-embedding row equal to
    ``init_word``'s (which must be one token). Returns (new SD, new params, token id)."""
    tok = copy.deepcopy(sd.tokenizer)
    if token in tok.get_vocab() or len(tok.tokenize(token)) == 1:
        raise ConfigError(f"token {token!r} is already in the tokenizer")
    init_ids = tok.encode(init_word, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ConfigError(f"init word {init_word!r} is {len(init_ids)} tokens, needs to be exactly one")
    if clip_tokenizer.add_token(tok, token) != 1:
        raise ConfigError(f"token {token!r} could not be added to the tokenizer")
    new_id = tok.convert_tokens_to_ids(token)

    te_params = params["text_encoder"]
    emb = te_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    rows = max(emb.shape[0], new_id + 1)
    emb = jnp.concatenate([emb, jnp.zeros((rows - emb.shape[0], emb.shape[1]), emb.dtype)])
    emb = emb.at[new_id].set(emb[init_ids[0]])
    te_params = {**te_params, "text_model": {
        **te_params["text_model"], "embeddings": {
            **te_params["text_model"]["embeddings"], "token_embedding": {"embedding": emb}}}}

    te = clip_lib.CLIPTextModel(dataclasses.replace(sd.text_encoder.config, vocab_size=rows), sd.text_encoder.dtype)
    sd2 = dataclasses.replace(sd, text_encoder=te, tokenizer=tok)
    return sd2, {**params, "text_encoder": te_params}, int(new_id)
