"""Our dual CLIP model (ldu_jax/sd/clip.py ``CLIPModel``, CLIP-IQA's): parity of the image and text
features and of the CLIP-IQA scores with transformers' PyTorch CLIPModel on two tiny random configs
(weights perturbed so that no norm is an identity; one pooling at the first EOS, one legacy config
with eos_token_id 2 pooling at the highest id), the tolerance's power (the other pooling rule, no
pre_layrnorm), loading safetensors, Flax msgpack and (allowed) .bin folders, the PyTorch <-> Flax
mapping both ways (bare parameters included) and the strict config reader."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import former_flax
from ldu_jax.metrics import quality
from ldu_jax.sd import clip, convert
from ldu_jax.sd import models as M
from numerics import assert_f32_close, f32_tol

# float32 roundings over a tower (tests/numerics.py): embeddings, 2 layers of ~10 matmuls, norms and
# softmaxes, the final norm, pooling and projection
DEPTH = 25

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
# name -> (text config changes, vision config, projection_dim)
CONFIGS = {
    "first-eos": ({}, VISION, 16),
    "legacy-eos2": (dict(eos_token_id=2, hidden_act="gelu"),
                    dict(VISION, image_size=48, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6), 12),
}
PROMPTS = ("a photo of sks dog", "Good photo.", "Bad photo.")


def _rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _hf_config(name):
    from transformers import CLIPConfig
    tok = M.tiny_tokenizer()
    text, vision, proj = CONFIGS[name]
    # two ids past the tokenizer's: an added token (higher than EOS) tells the pooling rules apart
    text = dict(M.tiny_text_config(tok), vocab_size=len(tok) + 2, **text)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch parity tests need torch")


@pytest.fixture(scope="module")
def clips(torch, tmp_path_factory):
    """name -> (PyTorch CLIPModel, its safetensors folder, load_clip of that folder)."""
    from transformers import CLIPModel
    out = {}
    for i, name in enumerate(CONFIGS):
        torch.manual_seed(20 + i)
        tm = CLIPModel(_hf_config(name))
        with torch.no_grad():
            for p in tm.parameters():
                p.add_(0.05 * torch.randn_like(p))
        tm.eval()
        path = str(tmp_path_factory.mktemp(name))
        tm.save_pretrained(path)                      # model.safetensors, config.json
        M.tiny_tokenizer().save_pretrained(path)
        assert os.path.isfile(os.path.join(path, "model.safetensors"))
        out[name] = tm, path, quality.load_clip(path)
    return out


def _inputs(tok, image_size):
    ids = tok(list(PROMPTS), padding=True, return_tensors="np").input_ids.astype(np.int32)
    ids[0, 2] = len(tok)   # an added token: ids.argmax is no longer the EOS in this row
    pixels = np.random.RandomState(0).randn(len(PROMPTS), image_size, image_size, 3).astype(np.float32)
    return ids, pixels


def _ours(model, params, pixels, ids):
    def run(p, px, i):
        return (model.apply({"params": p}, px, method=model.get_image_features),
                model.apply({"params": p}, i, method=model.get_text_features))
    return jax.jit(run)(params, pixels, ids)


def _reference(torch, tm, pixels, ids):
    with torch.no_grad():
        img = tm.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
        txt = tm.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    return img.pooler_output.numpy(), txt.pooler_output.numpy()   # the projected features


@pytest.mark.parametrize("name", CONFIGS)
def test_features_parity_and_tolerance_power(torch, clips, name):
    tm, _, (model, params, tok) = clips[name]
    ids, pixels = _inputs(tok, model.config.vision_config.image_size)
    ref_img, ref_txt = _reference(torch, tm, pixels, ids)
    img, txt = _ours(model, params, pixels, ids)
    proj = model.config.projection_dim
    assert img.shape == (3, proj) and txt.shape == (3, proj)
    errs = _rel(img, ref_img), _rel(txt, ref_txt)
    assert float(params["logit_scale"]) == float(tm.logit_scale.detach())

    # power: pooling by the other rule (argmax of the ids <-> first eos_token_id) ...
    eos = tok.eos_token_id if model.config.eos_token_id == 2 else 2
    other = clip.CLIPModel(dataclasses.replace(model.config, eos_token_id=eos))
    wrong_txt = jax.jit(lambda p, i: other.apply({"params": p}, i, method=other.get_text_features))(params, ids)
    # ... and a vision tower without pre_layrnorm (the reference computed so)
    pre = tm.vision_model.pre_layrnorm
    tm.vision_model.pre_layrnorm = torch.nn.Identity()
    try:
        no_pre_img, _ = _reference(torch, tm, pixels, ids)
    finally:
        tm.vision_model.pre_layrnorm = pre
    power = _rel(wrong_txt, ref_txt), _rel(img, no_pre_img)
    print(f"clip {name}: max relative error image/text {errs}; wrong pooling {power[0]}, "
          f"no pre_layrnorm {power[1]}")
    assert_f32_close(img, ref_img, depth=DEPTH)
    assert_f32_close(txt, ref_txt, depth=DEPTH)
    assert min(power) > f32_tol(1, DEPTH), power


def _images():
    """Three uint8 pictures of different sizes and content (smooth, noisy, striped)."""
    rng = np.random.RandomState(1)
    y, x = np.mgrid[:60, :90]
    smooth = np.stack([x * 2.5, y * 4, (x + y) * 1.6], -1)
    noisy = rng.randint(0, 256, (70, 50, 3))
    stripes = np.stack([(np.sin(x / 3) + 1) * 120] * 3, -1)
    return [np.clip(a, 0, 255).astype(np.uint8) for a in (smooth, noisy, stripes)]


@pytest.mark.parametrize("name", CONFIGS)
def test_clip_iqa_scores_parity(torch, clips, name):
    """clip_iqa on the folder against transformers end to end: its image processor, the PyTorch
    model with the attention mask, softmax of logit_scale * cosine."""
    from transformers import CLIPImageProcessor
    tm, path, (model, _, tok) = clips[name]
    s = model.config.vision_config.image_size
    imgs = _images()
    scores = quality.clip_iqa(imgs, path, batch_size=2)
    proc = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    t = tok(["Good photo.", "Bad photo."], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = tm(input_ids=t.input_ids, attention_mask=t.attention_mask,
                 pixel_values=proc(imgs, return_tensors="pt").pixel_values)
    ref = out.logits_per_image.softmax(-1)[:, 0].double().numpy()
    err = _rel(scores, ref)
    print(f"clip_iqa {name}: scores {scores}, max relative error {err}")
    assert scores.shape == (3,) and np.ptp(ref) > 1e-3
    # two cosines after the towers, each moving a score by <= logit scale / 4
    tol = assert_f32_close(scores, ref, depth=DEPTH, scale=float(tm.logit_scale.exp()) / 2)
    # ...while the images resized bilinearly instead of bicubically are far off (30x and 460x here)
    bilinear = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                  resample=2)  # PIL bilinear
    with torch.no_grad():
        out = tm(input_ids=t.input_ids, attention_mask=t.attention_mask,
                 pixel_values=bilinear(imgs, return_tensors="pt").pixel_values)
    assert np.abs(out.logits_per_image.softmax(-1)[:, 0].double().numpy() - ref).max() > 10 * tol


def test_mapping_both_ways(clips):
    """Every PyTorch tensor lands on one parameter and comes back unchanged, the bare parameters
    (logit_scale, class_embedding) under their own names."""
    tm, _, (_, params, _) = clips["first-eos"]
    state = {k: v.numpy() for k, v in tm.state_dict().items()}
    assert not [k for k in state if k.endswith("position_ids")]   # buffers are not saved (4.57)
    tree, unmapped = convert.torch_to_flax(state, params)
    assert not unmapped
    flat, ours = flatten_dict(tree), flatten_dict(params)
    assert set(flat) == set(ours) and all(np.array_equal(flat[k], np.asarray(ours[k])) for k in ours)
    assert flat[("logit_scale",)].shape == () and flat[("vision_model", "embeddings", "class_embedding")].shape == (32,)
    assert flat[("vision_model", "embeddings", "patch_embedding", "kernel")].shape == (8, 8, 3, 32)   # HWIO
    back = convert.flax_to_torch(tree)
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
    # a bare name the tree does not hold is unexpected, not dropped
    assert convert.torch_to_flax({"logit_bias": state["logit_scale"]}, params)[1] == ["logit_bias"]


def test_flax_msgpack_and_pickle_folders(torch, clips, tmp_path):
    """A folder with the Flax msgpack transformers' FlaxCLIPModel wrote (its parameter tree, which
    ours is) loads the same parameters; a .bin only when pickles are allowed."""
    from flax import serialization
    tm, path, (_, params, _) = clips["first-eos"]
    flax_dir, bin_dir = str(tmp_path / "flax"), str(tmp_path / "bin")
    tm.config.save_pretrained(flax_dir)
    M.tiny_tokenizer().save_pretrained(flax_dir)
    with open(os.path.join(flax_dir, "flax_model.msgpack"), "wb") as f:
        f.write(serialization.to_bytes(jax.device_get(params)))
    tm.config.save_pretrained(bin_dir)     # a pickle, as transformers 4 wrote it (5 writes safetensors only)
    torch.save(tm.state_dict(), os.path.join(bin_dir, "pytorch_model.bin"))
    M.tiny_tokenizer().save_pretrained(bin_dir)
    with pytest.raises(ValueError, match="pytorch_model.bin is a PyTorch pickle"):
        quality.load_clip(bin_dir)
    for d, kw in ((flax_dir, {}), (bin_dir, dict(allow_pickle=True))):
        _, got, _ = quality.load_clip(d, **kw)
        a, b = flatten_dict(got), flatten_dict(params)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in b), d


def test_tree_and_init_are_transformers_flax_ones():
    """transformers' former FlaxCLIPModel's names, shapes and dtypes, and for a seed its random
    weights bit for bit (stored from transformers 4.57, see former_flax.py)."""
    from ldu_jax.sd.vae import compiled_init
    for name in CONFIGS:
        model = clip.CLIPModel(clip.CLIPConfig.from_dict(_hf_config(name).to_dict()))
        former_flax.assert_tree("clip", name, jax.eval_shape(model.init_params, jax.random.PRNGKey(0)))
    model = clip.CLIPModel(clip.CLIPConfig.from_dict(_hf_config("legacy-eos2").to_dict()))
    former_flax.assert_init("clip/legacy-eos2/3", compiled_init(model.init_params, jax.random.PRNGKey(3)))


# ----------------------------------------------------------------------------- strict config

def test_config_reads_transformers_configs():
    cfg = clip.CLIPConfig.from_dict(_hf_config("legacy-eos2").to_dict(), "where")
    assert cfg.projection_dim == 12 and cfg.eos_token_id == 2
    assert cfg.text_config == clip.CLIPTextConfig(vocab_size=len(M.tiny_tokenizer()) + 2, hidden_size=32,
                                                  intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                                  hidden_act="gelu")
    assert cfg.vision_config == clip.CLIPVisionConfig(**CONFIGS["legacy-eos2"][1])
    assert clip.CLIPConfig.from_dict({}) == clip.CLIPConfig()     # transformers' defaults
    # the legacy *_config_dict, when not null, is what transformers builds the tower from
    d = {"text_config": {"hidden_size": 64}, "text_config_dict": {"hidden_size": 32, "eos_token_id": 2},
         "vision_config": {"patch_size": 16}, "vision_config_dict": None}
    cfg = clip.CLIPConfig.from_dict(d)
    assert (cfg.text_config.hidden_size, cfg.eos_token_id, cfg.vision_config.patch_size) == (32, 2, 16)


def test_every_library_key_is_classified():
    """Each CLIPConfig and CLIPVisionConfig key is honoured, checked or irrelevant, so a new
    library key is refused rather than ignored."""
    from transformers import CLIPConfig, CLIPVisionConfig
    known = set(clip.CLIPConfig.__dataclass_fields__) | clip._IRRELEVANT | clip._CLIP_IRRELEVANT | set(clip._CLIP_FIXED)
    top = {k for k in CLIPConfig().to_dict() if not k.startswith("_")}
    assert top <= known, top - known
    known = set(clip.CLIPVisionConfig.__dataclass_fields__) | clip._IRRELEVANT | set(clip._VISION_FIXED)
    vision = {k for k in CLIPVisionConfig().to_dict() if not k.startswith("_")}
    assert vision <= known, vision - known


@pytest.mark.parametrize("change,named", [
    ({"logit_bias_init_value": -10.0}, "^where: unknown config key 'logit_bias_init_value'"),
    ({"model_type": "siglip"}, "^where: model_type='siglip'"),
    ({"vision_config": dict(VISION, use_head=True)}, "^where: vision_config: unknown config key 'use_head'"),
    ({"vision_config": dict(VISION, model_type="clip_text_model")}, "^where: vision_config: model_type="),
    ({"vision_config": dict(VISION, hidden_act="gelu_new")}, "^where: vision_config: hidden_act='gelu_new'"),
    ({"vision_config": dict(VISION, num_attention_heads=3)}, "^where: vision_config: .*num_attention_heads=3"),
    ({"text_config": {"hidden_act": "relu"}}, "^where: text_config: hidden_act='relu'"),
    ({"text_config": {"eos_token_id": None}}, "^where: text_config: eos_token_id=None"),
], ids=["unknown", "model-type", "vision-unknown", "vision-model-type", "vision-act", "vision-heads", "text-act",
        "eos-none"])
def test_config_is_strict(change, named):
    with pytest.raises(ValueError, match=named):
        clip.CLIPConfig.from_dict({**_hf_config("first-eos").to_dict(), **change}, "where")


def test_wrong_image_size_is_refused(clips):
    _, _, (model, params, _) = clips["first-eos"]
    with pytest.raises(ValueError, match=r"expected \[B, 32, 32, 3\]"):
        model.apply({"params": params}, np.zeros((1, 3, 32, 32), np.float32), method=model.get_image_features)


def test_config_json_is_read_with_its_path(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "clip", "projection_dim": 8, "text_config": {"bogus": 1}}, f)
    with pytest.raises(ValueError, match=f"^{tmp_path}/config.json: text_config: unknown config key 'bogus'"):
        quality.load_clip(str(tmp_path))
