"""What the libraries' former Flax classes (diffusers 0.39's FlaxAutoencoderKL and
FlaxUNet2DConditionModel, transformers 4.57's FlaxCLIPTextModel and FlaxCLIPModel) built, stored in
tests/data/former_flax.json, so the tests still check against them with libraries that no longer
have them: their parameter trees (names, shapes, dtypes: Flax msgpack files and checkpoints written
with them load), and the random weights a seed drew (tiny bundles are unchanged), as per-leaf sums:
a normal draw's last bits follow the CPU's code generation (FMA or not, vector width), so the draws
are compared up to float32 rounding, while another seed, split or layout moves the sums by orders more.

The file was produced once with diffusers==0.39.0, transformers==4.57.6, jax 0.10.2, flax 0.12.8:

    PYTHONPATH=. python tests/former_flax.py    # from the repository root, with those libraries

which builds every entry with the Flax classes, checks that ours give the same, and writes the file.
Its 'init' entries were first sha256 digests of the bytes; they became these sums (issue 20) from
our init on the machine where those digests matched, bit for bit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

import numpy as np
from flax.traverse_util import flatten_dict

from numerics import f32_tol

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "former_flax.json")


def _path(k) -> str:
    return "/".join(k)


def tree_digest(tree) -> dict:
    """Leaf count and sha256 of the sorted 'path shape dtype' lines of a tree (arrays or ShapeDtypeStructs)."""
    lines = sorted(f"{_path(k)} {tuple(v.shape)} {np.dtype(v.dtype).name}" for k, v in flatten_dict(tree).items())
    return {"leaves": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def leaf_digests(tree) -> dict:
    """{path: 'dtype shape|sum, sum of squares, cosine-weighted sum (order-sensitive)'} of a tree of arrays."""
    out = {}
    for k, v in flatten_dict(tree).items():
        a = np.asarray(v)
        x = a.astype(np.float64).ravel()
        sums = x.sum(), x @ x, x @ np.cos(np.arange(x.size))
        out[_path(k)] = f"{a.dtype.name} {tuple(a.shape)}|" + " ".join(repr(float(s)) for s in sums)
    return dict(sorted(out.items()))


DRAW_DEPTH = 35   # a normal draw: erfinv (log1p, sqrt, a degree-8 polynomial: ~30 operations), scaling


def reference() -> dict:
    with open(PATH) as f:
        return json.load(f)


def assert_tree(kind: str, name: str, tree):
    assert tree_digest(tree) == reference()["trees"][kind][name], (kind, name)


def assert_init(name: str, params):
    want, got = reference()["init"][name], leaf_digests(params)
    assert set(got) == set(want), (name, sorted(set(got) ^ set(want))[:5])
    flat = {_path(k): np.abs(np.asarray(v, np.float64)) for k, v in flatten_dict(params).items()}
    bad = []
    for k in want:   # each entry off by about an ulp of itself per operation, over DRAW_DEPTH operations
        (meta, sums), (meta_got, sums_got) = (d[k].split("|") for d in (want, got))
        tols = [f32_tol(s, DRAW_DEPTH) for s in (flat[k].sum(), 2 * np.sum(flat[k] ** 2), flat[k].sum())]
        off = [abs(float(g) - float(w)) > t for g, w, t in zip(sums_got.split(), sums.split(), tols)]
        if meta_got != meta or any(off):
            bad.append(k)
    assert not bad, (name, len(bad), [(k, got[k], want[k]) for k in bad[:3]])


def main():   # pragma: no cover - needs diffusers <= 0.39 and transformers <= 4.57
    import jax
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, FlaxCLIPModel, FlaxCLIPTextModel

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_clip_model as tcm
    import test_sd_autoencoder_clip as tac
    import test_sd_unet as tun

    from ldu_jax.sd import autoencoder as ae
    from ldu_jax.sd import clip
    from ldu_jax.sd import models as M
    from ldu_jax.sd import unet as U
    from ldu_jax.sd.vae import TINY_VAE, compiled_init

    key0 = jax.random.PRNGKey(0)
    trees = {"unet": {}, "vae": {}, "clip_text": {}, "clip": {}}

    def both(kind, name, theirs, ours):
        trees[kind][name] = tree_digest(theirs)
        assert tree_digest(ours) == trees[kind][name], (kind, name)

    fields = {f.name for f in dataclasses.fields(FlaxUNet2DConditionModel)}
    for name, cfg in tun.CONFIGS.items():
        theirs = FlaxUNet2DConditionModel(**{k: v for k, v in cfg.items() if k in fields})
        both("unet", name, jax.eval_shape(theirs.init_weights, key0),
             jax.eval_shape(U.UNet(U.UNetConfig(**cfg)).init_params, key0))
    for name, cfg in tac.VAES.items():
        both("vae", name, jax.eval_shape(FlaxAutoencoderKL(**cfg).init_weights, key0),
             jax.eval_shape(ae.AutoencoderKL(ae.VAEConfig.from_dict(cfg)).init_params, key0))
    for act in tac.ACTS:
        hf = CLIPTextConfig(**M.tiny_text_config(M.tiny_tokenizer()), hidden_act=act)
        te = FlaxCLIPTextModel(hf, _do_init=False)
        both("clip_text", act, jax.eval_shape(lambda k: te.init_weights(k, (1, 77)), key0),
             jax.eval_shape(clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(hf.to_dict())).init_params, key0))
    for name in tcm.CONFIGS:
        hf = tcm._hf_config(name)
        fm = FlaxCLIPModel(hf, _do_init=False)
        both("clip", name, jax.eval_shape(lambda k: fm.init_weights(k, fm.input_shape), key0),
             jax.eval_shape(clip.CLIPModel(clip.CLIPConfig.from_dict(hf.to_dict())).init_params, key0))

    # tiny_sd(0) as models._build_tiny_sd drew it with the Flax classes (before commit 4e93e1c)
    init = {}
    key = jax.random.PRNGKey(0)
    tok = M.tiny_tokenizer()
    te = FlaxCLIPTextModel(CLIPTextConfig(**M.tiny_text_config(tok)), _do_init=False)
    theirs = {
        "vae": compiled_init(FlaxAutoencoderKL(**TINY_VAE).init_weights, key),
        "unet": compiled_init(FlaxUNet2DConditionModel(**M.TINY_UNET).init_weights, jax.random.fold_in(key, 1)),
        "text_encoder": compiled_init(lambda k: te.init_weights(k, (1, tok.model_max_length)),
                                      jax.random.fold_in(key, 2)),
    }
    ours = M.tiny_sd(0)[1]
    for part in theirs:
        init[f"tiny_sd0/{part}"] = leaf_digests(jax.tree_util.tree_map(np.asarray, dict(theirs[part])))
        assert leaf_digests(ours[part]) == init[f"tiny_sd0/{part}"], part
    # the CLIP-IQA model of test_clip_model (config 'legacy-eos2', PRNGKey(3))
    hf = tcm._hf_config("legacy-eos2")
    fm = FlaxCLIPModel(hf, _do_init=False)
    k3 = jax.random.PRNGKey(3)
    init["clip/legacy-eos2/3"] = leaf_digests(compiled_init(lambda k: fm.init_weights(k, fm.input_shape), k3))
    assert leaf_digests(compiled_init(clip.CLIPModel(clip.CLIPConfig.from_dict(hf.to_dict())).init_params, k3)) \
        == init["clip/legacy-eos2/3"]

    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    with open(PATH, "w") as f:
        json.dump({"produced_with": {"diffusers": "0.39.0", "transformers": "4.57.6", "jax": jax.__version__},
                   "trees": trees, "init": init}, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", PATH, {k: len(v) for k, v in init.items()})


if __name__ == "__main__":
    main()
