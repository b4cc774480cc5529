"""PyTorch state dicts (diffusers / transformers names and layouts) <-> our Flax parameter trees.

One mapping, both directions, for the three parts. The Flax trees use the names diffusers' and
transformers' Flax classes used (``down_blocks_0/attentions_0/.../attn1/query/kernel``,
``text_model/encoder/layers/0/self_attn/q_proj/kernel``; the VAE's attention ``query``/``proj_attn``), so Flax
msgpack files and checkpoints written before ``ldu_jax.sd`` owned its modules still load.

    PyTorch                                   Flax
    down_blocks.0.resnets.1.conv1.weight      down_blocks_0/resnets_1/conv1/kernel   (OIHW -> HWIO)
    ...attn1.to_q.weight / to_out.0.weight    .../attn1/to_q/kernel / to_out_0/kernel   (W.T)
    vae ...attentions.0.to_q.weight           .../attentions_0/query/kernel (diffusers' older names)
    ...norm1.weight                           .../norm1/scale
    text_model.encoder.layers.0.mlp.fc1.weight  text_model/encoder/layers/0/mlp/fc1/kernel
    ...token_embedding.weight                 .../token_embedding/embedding
    vision_model.embeddings.class_embedding   vision_model/embeddings/class_embedding   (a bare
    logit_scale                               logit_scale         nn.Parameter: the same name)

A CLIP text encoder's keys are ``text_model.``-prefixed in hub checkpoints and in what
transformers 4 and we write; transformers 5's ``CLIPTextModel`` (no ``text_model`` submodule)
writes them without the prefix: onto a text encoder's tree (``text_model`` its only key) either
form maps, and ``flax_to_torch`` writes the prefixed one (which both transformers read).

What a PyTorch ``weight`` becomes (kernel, scale or embedding) is read off the target tree, which
the caller builds from the config (``jax.eval_shape`` of the module's init): nothing is guessed
from shapes.
"""
from __future__ import annotations

import numpy as np

# diffusers' module lists: "name.N" in PyTorch is "name_N" in Flax
_LISTS = frozenset(("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
                    "upsamplers", "net", "to_out"))
# the VAE's attention projections kept diffusers' older names in Flax (the UNet's did not)
_VAE_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
_VAE_ATTN_OUT = {v: k for k, v in _VAE_ATTN.items()}
# the Flax leaves a PyTorch module's "weight" becomes
_WEIGHTS = ("kernel", "scale", "embedding")
# PyTorch buffers that are not parameters
_BUFFERS = ("position_ids",)


def _flax_path(stem: str) -> tuple[str, ...]:
    """A PyTorch key without its leaf (``weight`` / ``bias``) -> the Flax module path."""
    parts: list[str] = []
    for p in stem.split(".") if stem else ():     # "" : a top-level parameter (CLIP's logit_scale)
        if p.isdigit() and parts and parts[-1] in _LISTS:
            parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(p)
    return tuple(parts)


def _node(tree, path):
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return None
        tree = tree[p]
    return tree


def torch_to_flax(state: dict, shapes: dict) -> tuple[dict, list[str]]:
    """``state``: {PyTorch key: array}; ``shapes``: the target tree (leaves with ``.shape``).
    Returns (the Flax tree of every key that maps onto ``shapes``, the keys that do not); shapes
    are checked by the caller."""
    tree: dict = {}
    unmapped = []
    if set(shapes) == {"text_model"}:
        state = text_model_prefixed(state)
    for key, value in state.items():
        stem, _, leaf = key.rpartition(".")
        if leaf in _BUFFERS:
            continue
        path = _flax_path(stem)
        node = _node(shapes, path)
        if node is None and path and path[-1] in _VAE_ATTN:
            path = path[:-1] + (_VAE_ATTN[path[-1]],)
            node = _node(shapes, path)
        name = None
        if isinstance(node, dict) and leaf == "bias":
            name = "bias" if "bias" in node else None
        elif isinstance(node, dict) and leaf == "weight":
            name = next((n for n in _WEIGHTS if n in node), None)
        elif isinstance(node, dict) and leaf in node and not isinstance(node[leaf], dict):
            name = leaf     # a bare parameter, not a module's weight: its name is the same in Flax
        if name is None:
            unmapped.append(key)
            continue
        a = np.asarray(value)
        if name == "kernel":
            a = np.transpose(a, (2, 3, 1, 0)) if a.ndim == 4 else a.T
        sub = tree
        for p in path:
            sub = sub.setdefault(p, {})
        sub[name] = a
    return tree, unmapped


def text_model_prefixed(state: dict) -> dict:
    """A CLIPTextModel state dict with every key under ``text_model.`` (see the module doc); one
    with some prefixed keys is returned as it is (so the others are unexpected)."""
    if any(k.startswith("text_model.") for k in state):
        return state
    return {"text_model." + k: v for k, v in state.items()}


def flax_to_torch(tree: dict) -> dict:
    """The inverse: a Flax tree -> {PyTorch key: NumPy array} in diffusers' current names."""
    out = {}

    def visit(node, path):
        if not isinstance(node, dict):
            *mods, leaf = path
            names = []
            for i, m in enumerate(mods):
                head, _, idx = m.rpartition("_")
                if head in _LISTS and idx.isdigit():
                    names += [head, idx]
                elif m in _VAE_ATTN_OUT and i == len(mods) - 1:    # the VAE's attention projections
                    names += _VAE_ATTN_OUT[m].replace("_0", ".0").split(".")
                else:
                    names.append(m)
            a = np.asarray(node)
            if leaf == "kernel":
                a = np.transpose(a, (3, 2, 0, 1)) if a.ndim == 4 else a.T
            torch_leaf = "weight" if leaf in _WEIGHTS else leaf     # bias, or a bare parameter's name
            out[".".join(names + [torch_leaf])] = np.asarray(a, order="C")   # (ascontiguousarray makes 0-d 1-d)
            return
        for k, v in node.items():
            visit(v, path + (k,))

    visit(tree, ())
    return out
