"""Stable Diffusion parts (diffusers Flax VAE + UNet, transformers Flax CLIP text encoder, CLIP
tokenizer, scheduler config): loading, saving, tiny random bundles, and pure apply functions.

Parameters live outside the modules: ``params = {'vae': ..., 'unet': ..., 'text_encoder': ...}``
(plain nested dicts, float32 after loading; see ``cast_params``). Images and latents are NHWC;
the Flax diffusers modules are NCHW and the transposes live here and in ``vae.py`` only.

Stack workarounds, each in one place with a test that fails without it:
  * ``_torch_numerics``: diffusers' Flax UNet uses tanh-GELU in GEGLU and GroupNorm eps 1e-5 in
    the spatial transformers where PyTorch uses exact GELU and eps 1e-6 (``unet_apply``).
  * ``cast_params``: diffusers' Flax ``to_bf16``/``to_fp16`` call the removed ``jax.tree_map``.
  * ``quiet_diffusers`` (vae.py): diffusers' Flax modules log a deprecation line per ``setup``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldu_jax import files
from ldu_jax.sd import convert
from ldu_jax.sd import schedule as sch
from ldu_jax.sd.vae import TINY_VAE, compiled_init, quiet_diffusers, tiny_vae

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_tokenizer")

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, cross_attention_dim=32)

TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77)

# Settings of the PyTorch configs that the Flax classes silently ignore: loading refuses others.
_UNET_FIXED = dict(
    center_input_sample=False, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, downsample_padding=1,
    mid_block_scale_factor=1, dual_cross_attention=False, class_embed_type=None, num_class_embeds=None,
    encoder_hid_dim=None, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3,
    conv_out_kernel=3, attention_type="default", class_embeddings_concat=False, cross_attention_norm=None,
    encoder_hid_dim_type=None, mid_block_only_cross_attention=None, reverse_transformer_layers_per_block=None,
    addition_embed_type=None)
_VAE_FIXED = dict(act_fn="silu", use_quant_conv=True, use_post_quant_conv=True,
                  mid_block_add_attention=True, shift_factor=None, latents_mean=None, latents_std=None)
# The block types the Flax modules build. diffusers' Flax UNet builds a plain DownBlock2D for any
# other down type (AttnDownBlock2D, SimpleCrossAttnDownBlock2D, ...), so they are refused by name.
_UNET_BLOCKS = {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
                "mid_block_type": ("UNetMidBlock2DCrossAttn",)}
_VAE_BLOCKS = {"down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",)}
# PyTorch-only hints for half-precision inference: the same function in float32
_FLOAT32_ONLY = {"unet": ("upcast_attention",), "vae": ("force_upcast",)}

# (config file, weight file stems: Flax msgpack, PyTorch) per model part.
_WEIGHTS = {
    "vae": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model"),
    "unet": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model"),
    "text_encoder": ("flax_model.msgpack", "model", "pytorch_model"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class SD:
    """The modules of a Stable Diffusion model (parameters are kept apart)."""
    vae: Any            # diffusers FlaxAutoencoderKL
    unet: Any           # diffusers FlaxUNet2DConditionModel
    text_encoder: Any   # transformers FlaxCLIPTextModel (apply through .module)
    tokenizer: Any      # transformers CLIPTokenizer
    scheduler: dict     # scheduler_config.json as written (schedule.make_schedule reads it as diffusers does)
    resolution: int     # image size in px

    __hash__ = object.__hash__  # identity: usable as a static jit argument


# ----------------------------------------------------------------------------- pure functions

def cast_params(params, dtype):
    """Cast the floating leaves of ``params`` to ``dtype`` (diffusers' Flax ``to_bf16``/``to_fp16``
    call the removed ``jax.tree_map``)."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x
    return jax.tree_util.tree_map(cast, params)


def tokenize(sd: SD, prompts: list[str]) -> np.ndarray:
    """Prompts -> int32 ids [B, model_max_length], padded to max length and truncated."""
    tok = sd.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="np").input_ids
    return ids.astype(np.int32)


def text_embed(sd: SD, te_params, input_ids):
    """Token ids [B, L] -> the CLIP text encoder's last_hidden_state [B, L, D]."""
    ids = jnp.asarray(input_ids, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
    out = sd.text_encoder.module.apply({"params": te_params}, ids, jnp.ones_like(ids), pos,
                                       deterministic=True)
    return out.last_hidden_state


def _torch_numerics(next_fun, args, kwargs, context):
    """Flax method interceptor making diffusers' Flax UNet compute what the PyTorch UNet does:
    exact (erf) GELU in GEGLU, and GroupNorm eps 1e-6 in the spatial transformers."""
    import flax.linen as nn
    from diffusers.models.attention_flax import FlaxGEGLU, FlaxTransformer2DModel
    mod = context.module
    if context.method_name == "__call__":
        if isinstance(mod, FlaxGEGLU):
            deterministic = kwargs.get("deterministic", args[1] if len(args) > 1 else True)
            h, gate = jnp.split(mod.proj(args[0]), 2, axis=-1)
            return mod.dropout_layer(h * jax.nn.gelu(gate, approximate=False), deterministic=deterministic)
        if isinstance(mod, nn.GroupNorm) and isinstance(mod.parent, FlaxTransformer2DModel):
            norm = mod.clone(parent=None, epsilon=1e-6)
            return norm.apply({"params": mod.variables["params"]}, *args, **kwargs)
    return next_fun(*args, **kwargs)


def unet_apply(sd: SD, unet_params, latents_nhwc, timesteps, encoder_hidden_states):
    """NHWC latents, timesteps (scalar or [B]), text states [B, L, D] -> NHWC prediction, matching
    the PyTorch UNet (see ``_torch_numerics``)."""
    import flax.linen as nn
    x = jnp.transpose(latents_nhwc, (0, 3, 1, 2))
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (x.shape[0],))
    with nn.intercept_methods(_torch_numerics):
        out = sd.unet.apply({"params": unet_params}, x, t, encoder_hidden_states, train=False).sample
    return jnp.transpose(out, (0, 2, 3, 1))


# ----------------------------------------------------------------------------- tiny bundle

def tiny_tokenizer():
    """The small CLIP BPE tokenizer shipped in ``tiny_tokenizer/`` (see make_tiny_tokenizer.py)."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer(os.path.join(TOKENIZER_DIR, "vocab.json"),
                         os.path.join(TOKENIZER_DIR, "merges.txt"), model_max_length=77)


def tiny_text_config(tokenizer):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          **TINY_TEXT)


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
    quiet_diffusers()
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import FlaxCLIPTextModel
    key = jax.random.PRNGKey(seed)
    vae = FlaxAutoencoderKL(**TINY_VAE, dtype=dtype)
    unet = FlaxUNet2DConditionModel(**TINY_UNET, dtype=dtype)
    tok = tiny_tokenizer()
    te = FlaxCLIPTextModel(tiny_text_config(tok), _do_init=False, dtype=dtype)
    params = {
        "vae": tiny_vae(seed).params,
        "unet": compiled_init(unet.init_weights, jax.random.fold_in(key, 1)),
        "text_encoder": compiled_init(lambda k: te.init_weights(k, (1, tok.model_max_length)),
                                      jax.random.fold_in(key, 2)),
    }
    params = jax.tree_util.tree_map(jnp.asarray, _plain(params))
    sd = SD(vae, unet, te, tok, dict(sch.SD_SCHEDULER), TINY_UNET["sample_size"] * _vae_factor(vae))
    return sd, params


# ----------------------------------------------------------------------------- loading

def load_sd(source: str, dtype=jnp.float32, allow_pickle: bool = False) -> tuple[SD, dict]:
    """Load ``(SD, params)``: ``'tiny'``, a diffusers-format folder (vae/ unet/ text_encoder/
    tokenizer/ scheduler/), or a hub id (when online). Each model part may hold Flax msgpack,
    PyTorch safetensors (read without torch) or, with ``allow_pickle`` (or LDU_JAX_ALLOW_PICKLE=1),
    PyTorch .bin (a pickle; needs torch) weights. Modules compute in ``dtype``; params are float32
    (use ``cast_params`` for less)."""
    quiet_diffusers()
    if source == "tiny":
        return tiny_sd(dtype=dtype)
    source = os.path.expanduser(source)
    if not os.path.isdir(source):
        if source.startswith(("/", ".", "~")) or source.count("/") > 1:
            raise FileNotFoundError(f"SD folder {source} does not exist")
        source = _download(source)
    return _load_folder(source, dtype, allow_pickle)


def _download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    patterns = ["model_index.json", "scheduler/*.json", "tokenizer/*"]
    for part, names in _WEIGHTS.items():
        patterns += [f"{part}/config.json", f"{part}/{names[0]}", f"{part}/{names[1]}.safetensors"]
    return snapshot_download(repo_id, allow_patterns=patterns)


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"SD folder lacks {what}: {path} not found")
    return path


def _load_folder(folder: str, dtype, allow_pickle: bool = False) -> tuple[SD, dict]:
    quiet_diffusers()
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel
    for part in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        _require(os.path.join(folder, part), f"the '{part}' subfolder")
    cfgs = {}
    for part in ("vae", "unet", "text_encoder"):
        with open(_require(os.path.join(folder, part, "config.json"), f"{part}/config.json")) as f:
            cfgs[part] = json.load(f)
    _check_config("unet", cfgs["unet"], FlaxUNet2DConditionModel, _UNET_FIXED, _UNET_BLOCKS, dtype)
    _check_config("vae", cfgs["vae"], FlaxAutoencoderKL, _VAE_FIXED, _VAE_BLOCKS, dtype)
    vae = FlaxAutoencoderKL.from_config(_strip(cfgs["vae"]), dtype=dtype)
    unet = FlaxUNet2DConditionModel.from_config(_strip(cfgs["unet"]), dtype=dtype)
    te = FlaxCLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(folder, "text_encoder")),
                           _do_init=False, dtype=dtype)

    tok_dir = os.path.join(folder, "tokenizer")
    for name in ("vocab.json", "merges.txt"):
        _require(os.path.join(tok_dir, name), f"tokenizer/{name}")
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    tok.model_max_length = min(tok.model_max_length, te.config.max_position_embeddings)

    sched_path = _require(os.path.join(folder, "scheduler", "scheduler_config.json"), "scheduler/scheduler_config.json")
    with open(sched_path) as f:
        sched = _strip(json.load(f))
    try:
        sch.make_schedule(sched)    # refuse what we cannot compute before loading any weights
    except ValueError as e:
        raise ValueError(f"{sched_path}: {e}") from None

    n_pos = te.config.max_position_embeddings
    shapes = {
        "vae": jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0)),
        "unet": jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0)),
        "text_encoder": jax.eval_shape(lambda k: te.init_weights(k, (1, n_pos)), jax.random.PRNGKey(0)),
    }
    params = {part: _load_weights(os.path.join(folder, part), part, _plain(shapes[part]), allow_pickle)
              for part in ("vae", "unet", "text_encoder")}
    sd = SD(vae, unet, te, tok, sched, int(unet.config.sample_size) * _vae_factor(vae))
    return sd, params


def _check_config(part, cfg, flax_class, fixed, blocks, dtype):
    """Refuse, by name, every block type, config key or value the Flax model would not compute as
    the PyTorch model does (before any weight is read)."""
    fields = {f.name for f in dataclasses.fields(flax_class)} - {"parent", "name", "dtype"}
    for k, v in _strip(cfg).items():
        if k in fixed and v != fixed[k]:
            raise ValueError(f"{part}/config.json: {k}={v!r} is not supported (only {fixed[k]!r})")
        if k in _FLOAT32_ONLY[part]:
            if v and jnp.dtype(dtype) != jnp.float32:
                raise ValueError(f"{part}/config.json: {k}=true is honoured in float32 only, not {jnp.dtype(dtype)}")
        elif k not in fixed and k not in fields:
            raise ValueError(f"{part}/config.json: unknown config key {k!r} (= {v!r}); not supported")
    for k, allowed in blocks.items():
        names = cfg.get(k)
        for name in [names] if isinstance(names, str) else names or ():
            if name not in allowed:
                raise ValueError(f"{part}/config.json: block type {name!r} in {k} is not supported "
                                 f"(supported: {', '.join(allowed)})")


def _strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _plain(tree):
    from flax.core import unfreeze
    return unfreeze(tree)


def _vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _find_weights(part_dir: str, part: str) -> tuple[str, str]:
    """(kind, path) of the first weight file present: Flax msgpack, safetensors, .bin."""
    flax_name, *stems = _WEIGHTS[part]
    cands = [("flax", flax_name)]
    for ext, kind in (("safetensors", "safetensors"), ("bin", "bin")):
        for stem in stems:
            cands += [(kind, f"{stem}.{ext}"), (kind, f"{stem}.fp16.{ext}"),
                      (kind + "_index", f"{stem}.{ext}.index.json")]
    for kind, name in cands:
        path = os.path.join(part_dir, name)
        if os.path.isfile(path):
            return kind, path
    raise FileNotFoundError(f"SD folder lacks weights for '{part}': none of "
                            f"{', '.join(n for _, n in cands)} in {part_dir}")


def _read_torch_state(kind: str, path: str, allow_pickle: bool) -> dict:
    """A PyTorch state dict as NumPy arrays (bf16 stays ml_dtypes.bfloat16)."""
    if kind.endswith("_index"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for s in shards:
            state.update(_read_torch_state(kind[:-len("_index")], os.path.join(os.path.dirname(path), s),
                                           allow_pickle))
        return state
    if kind == "safetensors":
        from safetensors.numpy import load_file
        return load_file(path)
    if not (allow_pickle or os.environ.get("LDU_JAX_ALLOW_PICKLE") == "1"):
        raise ValueError(f"{path} is a PyTorch pickle (.bin): unpickling can run code from the file. Convert it "
                         "to .safetensors, or, for a file you trust, pass allow_pickle=True to load_sd (commands: "
                         "set LDU_JAX_ALLOW_PICKLE=1)")
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a PyTorch pickle: loading it needs torch (not installed); "
                          "convert it to .safetensors or install torch") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


class _HasNumpy:
    """A NumPy array seen through the ``.numpy()`` the PyTorch->Flax converters call."""
    def __init__(self, a):
        self.a = a

    def numpy(self):
        return self.a


def _torch_to_flax(part: str, state: dict, shapes) -> dict:
    """PyTorch key names/layouts -> the Flax tree, with the libraries' own converters; the
    converters only need the shapes of the target tree (not a random initialisation)."""
    if part == "text_encoder":
        from transformers import FlaxCLIPTextModel
        from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
        proxy = types.SimpleNamespace(params=shapes, base_model_prefix=FlaxCLIPTextModel.base_model_prefix)
        return convert_pytorch_state_dict_to_flax(dict(state), proxy)
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
    proxy = types.SimpleNamespace(init_weights=lambda rng: shapes)
    return convert_pytorch_state_dict_to_flax({k: _HasNumpy(v) for k, v in state.items()}, proxy)


def _load_weights(part_dir: str, part: str, shapes, allow_pickle: bool = False) -> dict:
    """Read a part's weights and check them against the expected tree; float32 jnp leaves."""
    from flax import serialization
    from flax.traverse_util import flatten_dict, unflatten_dict
    kind, path = _find_weights(part_dir, part)
    if kind == "flax":
        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
        got = flatten_dict(_plain(tree))
        extra = ["/".join(k) for k in got if k not in flatten_dict(shapes)]
    else:
        tree, extra = convert.torch_to_flax(_read_torch_state(kind, path, allow_pickle), shapes)
        got = flatten_dict(tree)
    want = flatten_dict(shapes)
    if extra:   # weights of something the model does not build: it would compute another function
        raise ValueError(f"{path}: {len(extra)} unexpected {part} parameters, e.g. " + ", ".join(extra[:5]))
    missing = [k for k in want if k not in got]
    if missing:
        raise ValueError(f"{path}: {len(missing)} {part} parameters missing, e.g. "
                         + ", ".join("/".join(k) for k in missing[:5]))
    out = {}
    for k, spec in want.items():
        a = np.asarray(got[k])
        if a.shape != spec.shape:
            raise ValueError(f"{path}: {part} parameter {'/'.join(k)} has shape {a.shape}, "
                             f"expected {spec.shape}")
        out[k] = jnp.asarray(a.astype(np.float32) if np.issubdtype(a.dtype, np.floating)
                             or a.dtype.name == "bfloat16" else a)
    return unflatten_dict(out)


# ----------------------------------------------------------------------------- saving

def save_sd(sd: SD, params, path: str):
    """Write a diffusers-layout folder with Flax weights, tokenizer files and the scheduler
    config (loadable by ``load_sd`` and by diffusers' Flax pipeline classes)."""
    import diffusers
    from flax import serialization

    def write_weights(part, name):
        tree = jax.device_get(_plain(params[part]))
        with open(os.path.join(path, part, name), "wb") as f:
            f.write(serialization.msgpack_serialize(tree))

    for part, module in (("vae", sd.vae), ("unet", sd.unet)):
        os.makedirs(os.path.join(path, part), exist_ok=True)
        module.save_config(os.path.join(path, part))
        write_weights(part, _WEIGHTS[part][0])
    os.makedirs(os.path.join(path, "text_encoder"), exist_ok=True)
    sd.text_encoder.config.save_pretrained(os.path.join(path, "text_encoder"))
    write_weights("text_encoder", _WEIGHTS["text_encoder"][0])
    sd.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    files.write_json(os.path.join(path, "scheduler", "scheduler_config.json"),
                     {"_class_name": "FlaxDDIMScheduler", "_diffusers_version": diffusers.__version__,
                      **sd.scheduler}, indent=2, sort_keys=True)
    files.write_json(os.path.join(path, "model_index.json"), {
        "_class_name": "FlaxStableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", "FlaxAutoencoderKL"], "unet": ["diffusers", "FlaxUNet2DConditionModel"],
        "text_encoder": ["transformers", "FlaxCLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "FlaxDDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None]}, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- placeholder token

def add_placeholder_token(sd: SD, params, token: str, init_word: str) -> tuple[SD, dict, int]:
    """Add ``token`` to (a copy of) the tokenizer and give it a new text-embedding row equal to
    ``init_word``'s (which must be one token). Returns (new SD, new params, token id)."""
    from transformers import FlaxCLIPTextModel
    tok = copy.deepcopy(sd.tokenizer)
    if token in tok.get_vocab() or len(tok.tokenize(token)) == 1:
        raise ValueError(f"token {token!r} is already in the tokenizer")
    init_ids = tok.encode(init_word, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(f"init word {init_word!r} is {len(init_ids)} tokens, needs to be exactly one")
    if tok.add_tokens(token) != 1:
        raise ValueError(f"token {token!r} could not be added to the tokenizer")
    new_id = tok.convert_tokens_to_ids(token)

    te_params = params["text_encoder"]
    emb = te_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    rows = max(emb.shape[0], new_id + 1)
    emb = jnp.concatenate([emb, jnp.zeros((rows - emb.shape[0], emb.shape[1]), emb.dtype)])
    emb = emb.at[new_id].set(emb[init_ids[0]])
    te_params = {**te_params, "text_model": {
        **te_params["text_model"], "embeddings": {
            **te_params["text_model"]["embeddings"], "token_embedding": {"embedding": emb}}}}

    config = copy.deepcopy(sd.text_encoder.config)
    config.vocab_size = rows
    te = FlaxCLIPTextModel(config, _do_init=False, dtype=sd.text_encoder.dtype)
    sd2 = dataclasses.replace(sd, text_encoder=te, tokenizer=tok)
    return sd2, {**params, "text_encoder": te_params}, int(new_id)
