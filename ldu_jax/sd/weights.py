"""Reading and writing one model part's files in the diffusers / transformers folder format.

A part folder (``vae/``, ``unet/``, ``text_encoder/``) holds ``config.json`` and its weights:
PyTorch safetensors (read without torch), sharded safetensors, a Flax msgpack written by the
libraries' Flax classes (or by this project before it owned its modules), or, only when allowed,
a PyTorch pickle (``.bin``). We write safetensors in PyTorch's names and layouts, so the folders
load in diffusers' and transformers' PyTorch classes too.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from ldu_jax import files
from ldu_jax.errors import FileFormatError, MissingError, RefusedError
from ldu_jax.sd import convert

# (Flax msgpack name, weight file stems) per part; the first stem is the one we write
FILES = {
    "vae": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model"),
    "unet": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model"),
    "text_encoder": ("flax_model.msgpack", "model", "pytorch_model"),
    "clip": ("flax_model.msgpack", "model", "pytorch_model"),    # a whole CLIPModel folder (CLIP-IQA)
}


def require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise MissingError(f"SD folder lacks {what}: {path} not found")
    return path


def download(repo_id: str, parts=("vae", "unet", "text_encoder"), extra=()) -> str:
    """A hub repository's configs and safetensors (online), for ``parts`` (a part at the top
    level: ``""``); returns the local folder."""
    from huggingface_hub import snapshot_download
    patterns = list(extra)
    for part in parts:
        prefix = f"{part}/" if part else ""
        for stem in FILES[part or "vae"][1:]:
            patterns += [f"{prefix}config.json", f"{prefix}{stem}.safetensors",
                         f"{prefix}{stem}.safetensors.index.json", f"{prefix}{stem}-*.safetensors"]
    return snapshot_download(repo_id, allow_patterns=patterns)


def is_hub_id(source: str) -> bool:
    return not source.startswith(("/", ".", "~")) and source.count("/") == 1


def read_config(part_dir: str, part: str) -> dict:
    with open(require(os.path.join(part_dir, "config.json"), f"{part}/config.json")) as f:
        return json.load(f)


def find(part_dir: str, part: str) -> tuple[str, str]:
    """(kind, path) of the first weight file present: Flax msgpack, safetensors, .bin."""
    flax_name, *stems = FILES[part]
    cands = [("flax", flax_name)]
    for ext, kind in (("safetensors", "safetensors"), ("bin", "bin")):
        for stem in stems:
            cands += [(kind, f"{stem}.{ext}"), (kind, f"{stem}.fp16.{ext}"),
                      (kind + "_index", f"{stem}.{ext}.index.json")]
    for kind, name in cands:
        path = os.path.join(part_dir, name)
        if os.path.isfile(path):
            return kind, path
    raise MissingError(f"SD folder lacks weights for '{part}': none of "
                       f"{', '.join(n for _, n in cands)} in {part_dir}")


def read_torch_state(kind: str, path: str, allow_pickle: bool) -> dict:
    """A PyTorch state dict as NumPy arrays (bf16 stays ml_dtypes.bfloat16)."""
    if kind.endswith("_index"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for s in shards:
            state.update(read_torch_state(kind[:-len("_index")], os.path.join(os.path.dirname(path), s),
                                          allow_pickle))
        return state
    if kind == "safetensors":
        from safetensors.numpy import load_file
        return load_file(path)
    if not (allow_pickle or os.environ.get("LDU_JAX_ALLOW_PICKLE") == "1"):
        raise RefusedError(f"{path} is a PyTorch pickle (.bin): unpickling can run code from the file. Convert it "
                           "to .safetensors, or, for a file you trust, pass allow_pickle=True to load_sd (commands: "
                           "set LDU_JAX_ALLOW_PICKLE=1)")
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a PyTorch pickle: loading it needs torch (not installed); "
                          "convert it to .safetensors or install torch") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def load(part_dir: str, part: str, shapes: dict, allow_pickle: bool = False) -> dict:
    """Read a part's weights onto ``shapes`` (the module's parameter tree, e.g. from
    ``jax.eval_shape``); see ``onto``."""
    kind, path = find(part_dir, part)
    if kind != "flax":
        return onto(read_torch_state(kind, path, allow_pickle), shapes, f"{path}: {part}")
    with open(path, "rb") as f:
        got = flatten_dict(serialization.msgpack_restore(f.read()))
    extra = ["/".join(k) for k in got if k not in flatten_dict(shapes)]
    return _checked(got, extra, shapes, f"{path}: {part}")


def onto(state: dict, shapes: dict, where: str = "weights") -> dict:
    """A PyTorch state dict on ``shapes``: every parameter present with its shape and nothing else,
    or a ``FileFormatError`` (a ValueError starting with ``where``) naming what is unexpected, missing or misshapen.
    float32 jnp leaves."""
    tree, extra = convert.torch_to_flax(state, shapes)
    return _checked(flatten_dict(tree), extra, shapes, where)


def _checked(got: dict, extra: list, shapes: dict, where: str) -> dict:
    if extra:   # weights of something the model does not build: it would compute another function
        raise FileFormatError(f"{where}: {len(extra)} unexpected parameters, e.g. " + ", ".join(extra[:5]))
    want = flatten_dict(shapes)
    missing = [k for k in want if k not in got]
    if missing:
        raise FileFormatError(f"{where}: {len(missing)} parameters missing, e.g. "
                              + ", ".join("/".join(k) for k in missing[:5]))
    out = {}
    for k, spec in want.items():
        a = np.asarray(got[k])
        if a.shape != spec.shape:
            raise FileFormatError(f"{where}: parameter {'/'.join(k)} has shape {a.shape}, expected {spec.shape}")
        out[k] = jnp.asarray(a.astype(np.float32) if np.issubdtype(a.dtype, np.floating)
                             or a.dtype.name == "bfloat16" else a)
    return unflatten_dict(out)


def config_dict(part: str, config, tokenizer=None) -> dict:
    """A module config as the config.json diffusers' and transformers' PyTorch classes write."""
    c = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    if part == "text_encoder":
        ids = {} if tokenizer is None else dict(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **c, **ids}
    return {"_class_name": {"vae": "AutoencoderKL", "unet": "UNet2DConditionModel"}[part], **c}


def save(part_dir: str, part: str, config, params, tokenizer=None):
    """Write ``config.json`` (from the module's config dataclass; ``tokenizer``: the text encoder's
    special token ids) and the weights as PyTorch-layout safetensors into ``part_dir``."""
    from safetensors.numpy import save_file
    os.makedirs(part_dir, exist_ok=True)
    files.write_json(os.path.join(part_dir, "config.json"), config_dict(part, config, tokenizer), indent=2,
                     sort_keys=True)
    state = convert.flax_to_torch(jax.device_get(params))
    save_file({k: np.array(v, np.float32, order="C") for k, v in state.items()},   # keeps 0-d shapes
              os.path.join(part_dir, FILES[part][1] + ".safetensors"))
