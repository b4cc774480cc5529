"""Our KL VAE and CLIP text encoder (ldu_jax/sd/autoencoder.py, clip.py): the parameter trees of
diffusers' FlaxAutoencoderKL and transformers' FlaxCLIPTextModel, parity with the PyTorch models on
tiny random configs (weights perturbed so that no norm is an identity), a wrong variant caught by
the tolerance, and strict configs."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import former_flax
from ldu_jax.sd import autoencoder as ae
from ldu_jax.sd import clip
from ldu_jax.sd import models as M
from ldu_jax.sd import weights
from ldu_jax.sd.vae import TINY_VAE
from numerics import assert_f32_close, f32_tol

VAES = {"f8": TINY_VAE,   # SD's factor 8, one resnet per block
        "f4": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=4,
                   down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                   block_out_channels=(8, 16, 12), sample_size=32)}
# float32 roundings over the depth in conv / norm / attention layers (tests/numerics.py): encoder and
# decoder of each VAE (as in test_sd_models), the 2-layer CLIP text encoder
DEPTH = {"f8": (35, 50), "f4": (42, 54), "clip": 20}
ACTS = ("quick_gelu", "gelu")


def _rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _text_config(act):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(**M.tiny_text_config(M.tiny_tokenizer()), hidden_act=act)


def _vae_init(config):
    s = config.sample_size
    model = ae.AutoencoderKL(config)
    x = jnp.zeros((1, s, s, config.in_channels))
    return model, jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]


def _clip_init(config):
    model = clip.CLIPTextModel(config)
    return model, jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))["params"]


# ----------------------------------------------------------------------------- parameter trees

@pytest.mark.parametrize("name", VAES)
def test_vae_tree_is_diffusers_flax_tree(name):
    """diffusers' former FlaxAutoencoderKL's tree (stored from diffusers 0.39, see former_flax.py)."""
    _, ours = _vae_init(ae.VAEConfig.from_dict(VAES[name]))
    former_flax.assert_tree("vae", name, ours)


@pytest.mark.parametrize("act", ACTS)
def test_clip_tree_is_transformers_flax_tree(act):
    """transformers' former FlaxCLIPTextModel's tree (stored from transformers 4.57)."""
    _, ours = _clip_init(clip.CLIPTextConfig.from_dict(_text_config(act).to_dict()))
    former_flax.assert_tree("clip_text", act, ours)


# ----------------------------------------------------------------------------- parity with PyTorch

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch parity tests need torch")


def _perturbed(torch, m):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def vaes(torch):
    """name -> (PyTorch VAE, our module, our params loaded from its state dict)."""
    from diffusers import AutoencoderKL
    out = {}
    for i, (name, kw) in enumerate(VAES.items()):
        torch.manual_seed(i)
        tv = _perturbed(torch, AutoencoderKL(**kw))
        model, shapes = _vae_init(ae.VAEConfig.from_dict(dict(tv.config)))   # the full PyTorch config
        state = {k: v.numpy() for k, v in tv.state_dict().items()}
        out[name] = tv, model, weights.onto(state, shapes)
    return out


@pytest.fixture(scope="module")
def texts(torch):
    from transformers import CLIPTextModel
    out = {}
    for i, act in enumerate(ACTS):
        torch.manual_seed(10 + i)
        tt = _perturbed(torch, CLIPTextModel(_text_config(act)))
        model, shapes = _clip_init(clip.CLIPTextConfig.from_dict(tt.config.to_dict()))
        state = {k: v.numpy() for k, v in tt.state_dict().items()}
        out[act] = tt, model, weights.onto(state, shapes)
    return out


def _vae_inputs(tv):
    rng = np.random.RandomState(0)
    s, f = tv.config.sample_size, 2 ** (len(tv.config.block_out_channels) - 1)
    return (rng.uniform(-1, 1, (2, s, s, 3)).astype(np.float32),
            rng.randn(2, s // f, s // f, tv.config.latent_channels).astype(np.float32))


def _vae_ours(model, params, x, z):
    def run(p, x, z):
        mean, logvar = model.apply({"params": p}, x, method=model.encode)
        return mean, logvar, model.apply({"params": p}, z, method=model.decode)
    return jax.jit(run)(params, x, z)


def _vae_refs(torch, tv, x, z, name):
    """PyTorch's mean, logvar and decode, each with its tolerance: the moments come out of one conv,
    so both are at the larger one's scale."""
    with torch.no_grad():
        dist = tv.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        refs = dist.mean, dist.logvar, tv.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample
    refs = [r.permute(0, 2, 3, 1).numpy() for r in refs]
    enc, dec = DEPTH[name]
    moments = max(np.abs(refs[0]).max(), np.abs(refs[1]).max())
    return refs, [dict(depth=enc, scale=moments)] * 2 + [dict(depth=dec)]


@pytest.mark.parametrize("name", VAES)
def test_vae_parity(torch, vaes, name):
    tv, model, params = vaes[name]
    x, z = _vae_inputs(tv)
    ours = _vae_ours(model, params, x, z)
    assert ours[0].shape == z.shape and ours[2].shape == x.shape
    refs, tols = _vae_refs(torch, tv, x, z, name)
    print(f"vae {name}: max relative error mean/logvar/decode {[_rel(o, r) for o, r in zip(ours, refs)]}")
    for o, r, tol in zip(ours, refs, tols):
        assert_f32_close(o, r, **tol)


def test_vae_tolerance_catches_norm_eps(torch, vaes, monkeypatch):
    """GroupNorm eps 1e-5 (torch's default) instead of diffusers' 1e-6 exceeds the tolerance."""
    monkeypatch.setattr(ae, "NORM_EPS", 1e-5)
    tv, model, params = vaes["f8"]
    x, z = _vae_inputs(tv)
    wrong = _vae_ours(model, params, x, z)
    refs, tols = _vae_refs(torch, tv, x, z, "f8")
    errs = [np.abs(np.asarray(w) - r).max() / f32_tol(t.get("scale", np.abs(r).max()), t["depth"])
            for w, r, t in zip(wrong, refs, tols)]
    print(f"vae f8 with GroupNorm eps 1e-5: max error over tolerance {errs}")
    assert min(errs) > 1, errs


def _ids():
    tok = M.tiny_tokenizer()
    return tok(["a photo of sks dog", "a painting in the style of monet"], padding="max_length",
               max_length=77, truncation=True, return_tensors="np").input_ids.astype(np.int32)


def _clip_outputs(torch, tt, model, params, ids):
    ours = jax.jit(lambda p, ids: model.apply({"params": p}, ids))(params, ids)
    with torch.no_grad():
        ref = tt(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (2, 77, 32)
    return ours, ref


@pytest.mark.parametrize("act", ACTS)
def test_clip_parity(torch, texts, act):
    ours, ref = _clip_outputs(torch, *texts[act], _ids())
    print(f"clip {act}: max relative error {_rel(ours, ref)}")
    assert_f32_close(ours, ref, depth=DEPTH["clip"])


def test_clip_tolerance_catches_tanh_gelu(torch, texts, monkeypatch):
    monkeypatch.setitem(clip.ACTIVATIONS, "gelu", lambda x: jax.nn.gelu(x, approximate=True))
    err = _rel(*_clip_outputs(torch, *texts["gelu"], _ids()))
    print(f"clip gelu computed with tanh-GELU: {err}")
    assert err > f32_tol(1, DEPTH["clip"])


# ----------------------------------------------------------------------------- strict configs

def test_every_library_key_is_classified():
    """Each AutoencoderKL.__init__ key and CLIPTextConfig key is honoured, checked or irrelevant,
    so a new library key is refused rather than ignored."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig
    vae_keys = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    honoured = {f for f in ae.VAEConfig.__dataclass_fields__}
    assert vae_keys == honoured | set(ae._FIXED) | set(ae._FLOAT32_ONLY)
    text_keys = {k for k in CLIPTextConfig().to_dict() if not k.startswith("_")}
    known = set(clip.CLIPTextConfig.__dataclass_fields__) | clip._IRRELEVANT | set(clip._FIXED)
    assert text_keys <= known, text_keys - known
    assert ae.VAEConfig.from_dict(TINY_VAE).factor == 8 and ae.VAEConfig.from_dict(VAES["f4"]).factor == 4


@pytest.mark.parametrize("change,dtype,named", [
    ({"attention_type": "x"}, jnp.float32, "'attention_type'"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D",
                           "DownEncoderBlock2D"]}, jnp.float32, "'AttnDownEncoderBlock2D' in down_block_types"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3 + ["AttnUpDecoderBlock2D"]}, jnp.float32, "up_block_types"),
    ({"act_fn": "gelu"}, jnp.float32, "act_fn='gelu'"),
    ({"mid_block_add_attention": False}, jnp.float32, "mid_block_add_attention=False"),
    ({"use_quant_conv": False}, jnp.float32, "use_quant_conv=False"),
    ({"latents_mean": [0.0] * 4}, jnp.float32, "latents_mean="),
    ({"force_upcast": True}, jnp.bfloat16, "force_upcast=True"),
    ({"block_out_channels": [8, 16, 16]}, jnp.float32, "block_out_channels"),
], ids=["unknown", "down-block", "up-block", "act", "mid-attention", "quant-conv", "latents-mean",
        "force-upcast-bf16", "lengths"])
def test_vae_config_is_strict(change, dtype, named):
    with pytest.raises(ValueError, match="^where/vae: .*" + named.replace("[", r"\[")):
        ae.VAEConfig.from_dict({**TINY_VAE, **change}, "where/vae", dtype=dtype)


def test_vae_config_accepts_what_it_computes():
    cfg = ae.VAEConfig.from_dict({**TINY_VAE, "_class_name": "AutoencoderKL", "force_upcast": True,
                                  "act_fn": "silu", "shift_factor": None, "block_out_channels": [8, 16, 16, 16]})
    assert cfg == ae.VAEConfig.from_dict(TINY_VAE) and hash(cfg)
    assert ae.VAEConfig.from_dict({}) == ae.VAEConfig()   # diffusers' defaults


@pytest.mark.parametrize("change,named", [
    ({"quantization_config": {}}, "'quantization_config'"),
    ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    ({"pruned_heads": {"0": [1]}}, "pruned_heads="),
    ({"model_type": "clip"}, "model_type='clip'"),
    ({"num_attention_heads": 3}, "num_attention_heads=3"),
], ids=["unknown", "act", "pruned", "model-type", "heads"])
def test_clip_config_is_strict(change, named):
    with pytest.raises(ValueError, match="^where/te: .*" + named):
        clip.CLIPTextConfig.from_dict({**_text_config("gelu").to_dict(), **change}, "where/te")
