"""SD parts: parity with PyTorch diffusers/transformers on tiny random models, loading (Flax,
safetensors without torch, .bin), saving, tiny bundles, tokenizer and placeholder tokens."""
import filecmp
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import former_flax
from ldu_jax.sd import make_tiny_tokenizer
from ldu_jax.sd import models as M
from ldu_jax.sd import schedule as sch
from ldu_jax.sd.vae import TINY_VAE, VAE, decode, encode
from numerics import assert_f32_close, f32_tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Parity with PyTorch, as float32 roundings over each tiny model's depth in conv / dense / norm /
# attention layers (tests/numerics.py):
DEPTH = dict(encoder=35, decoder=50, text=20, unet=90)

# The SD 2.x flavour: linear projections, per-block heads, exact-GELU CLIP, v-prediction.
UNET_SD2 = dict(M.TINY_UNET, use_linear_projection=True, attention_head_dim=(2, 4), upcast_attention=True)


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    return len(la) == len(lb) and all(
        pa == pb and x.dtype == y.dtype and np.array_equal(x, y) for (pa, x), (pb, y) in zip(la, lb))


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
    """Random PyTorch twins of the tiny configs (all weights perturbed so that no norm is an
    identity), saved as safetensors (sd1, sd2) and as .bin (sd1_bin)."""
    torch = pytest.importorskip("torch", reason="PyTorch parity tests need torch")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = M.tiny_tokenizer()

    def perturbed(m):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return m.eval()

    text2 = CLIPTextConfig(**M.tiny_text_config(tok), hidden_act="gelu")
    nets = {"vae": perturbed(AutoencoderKL(**TINY_VAE)),
            "sd1": (perturbed(UNet2DConditionModel(**M.TINY_UNET)),
                    perturbed(CLIPTextModel(CLIPTextConfig(**M.tiny_text_config(tok)))), "epsilon"),
            "sd2": (perturbed(UNet2DConditionModel(**UNET_SD2)), perturbed(CLIPTextModel(text2)),
                    "v_prediction")}
    base = tmp_path_factory.mktemp("torch_sd")
    dirs = {}
    for name, safe in (("sd1", True), ("sd2", True), ("sd1_bin", False)):
        unet, text, pred = nets[name.split("_")[0]]
        d = dirs[name] = str(base / name)
        nets["vae"].save_pretrained(os.path.join(d, "vae"), safe_serialization=safe)
        unet.save_pretrained(os.path.join(d, "unet"), safe_serialization=safe)
        if safe:
            text.save_pretrained(os.path.join(d, "text_encoder"))
        else:   # a pickle, as transformers 4 wrote it (transformers 5 writes safetensors only)
            text.config.save_pretrained(os.path.join(d, "text_encoder"))
            torch.save(text.state_dict(), os.path.join(d, "text_encoder", "pytorch_model.bin"))
        if name == "sd2":   # what transformers writes (tokenizer.json)
            tok.save_pretrained(os.path.join(d, "tokenizer"))
        else:               # as SD repositories ship it
            os.makedirs(os.path.join(d, "tokenizer"))
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(os.path.join(M.TOKENIZER_DIR, f), os.path.join(d, "tokenizer", f))
        os.makedirs(os.path.join(d, "scheduler"))
        with open(os.path.join(d, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump({"_class_name": "DDIMScheduler", **sch.SD_SCHEDULER, "prediction_type": pred}, f)
    return torch, nets, dirs


@pytest.fixture(scope="module")
def loaded(torch_models):
    _, _, dirs = torch_models
    return {name: M.load_sd(dirs[name]) for name in ("sd1", "sd2")}


@pytest.fixture(scope="module")
def inputs(loaded):
    rng = np.random.RandomState(0)
    sd, _ = loaded["sd1"]
    return dict(images=rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32),
                latents=rng.randn(2, 8, 8, 4).astype(np.float32),
                t=np.array([10, 730], np.int32),
                ids=M.tokenize(sd, ["a photo of sks dog", "a painting in the style of monet"]))


# ----------------------------------------------------------------------------- loading

def test_loads_without_torch_quietly(torch_models):
    """safetensors load with torch unimportable and without diffusers' or transformers' models; an
    allowed .bin then fails clearly; nothing is logged."""
    _, _, dirs = torch_models
    code = ("import sys; sys.modules['torch'] = None\n"
            "from ldu_jax.sd import models\n"
            "sd, _ = models.load_sd(sys.argv[1]); print('LOADED', sd.scheduler['prediction_type'])\n"
            "print('MODELS', [m for m in sys.modules if m.startswith(('diffusers', "
            "'transformers.models.clip.modeling'))])\n"
            "try: models.load_sd(sys.argv[2], allow_pickle=True)\n"
            "except ImportError as e: print('BIN-ERROR', e)\n")
    env = dict(os.environ, USE_TORCH="0", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code, dirs["sd2"], dirs["sd1_bin"]], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "LOADED v_prediction" in r.stdout
    assert "BIN-ERROR" in r.stdout and "needs torch" in r.stdout
    assert "MODELS []" in r.stdout, r.stdout
    assert "deprecated" not in r.stderr, r.stderr


def test_bin_equals_safetensors(torch_models, loaded, monkeypatch):
    _, _, dirs = torch_models
    monkeypatch.delenv("LDU_JAX_ALLOW_PICKLE", raising=False)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.bin is a PyTorch pickle .*allow_pickle=True"):
        M.load_sd(dirs["sd1_bin"])
    sd_bin, p_bin = M.load_sd(dirs["sd1_bin"], allow_pickle=True)
    sd, p = loaded["sd1"]
    assert _tree_equal(p_bin, p)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p))
    assert sd.resolution == sd_bin.resolution == 64
    assert sd.scheduler["prediction_type"] == "epsilon"
    assert loaded["sd2"][0].scheduler["prediction_type"] == "v_prediction"
    assert sd.scheduler["beta_schedule"] == "scaled_linear"


def test_scheduler_config_is_read_as_diffusers_reads_it(torch_models, tmp_path):
    """A minimal scheduler config means diffusers' DDIM defaults, not Stable Diffusion's values;
    a value we cannot compute refuses the load, naming the file and the key."""
    _, _, dirs = torch_models
    d = str(tmp_path / "sd")
    shutil.copytree(dirs["sd1"], d)
    path = os.path.join(d, "scheduler", "scheduler_config.json")
    with open(path, "w") as f:
        json.dump({"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}, f)
    sd, _ = M.load_sd(d)
    s = sch.make_schedule(sd.scheduler)
    want = sch.make_schedule({**sch.DDIM_DEFAULTS, "prediction_type": "v_prediction"})
    np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), np.asarray(want.alphas_cumprod))
    assert (s.final_alpha_cumprod, s.steps_offset, s.timestep_spacing) == (1.0, 1, "leading")
    with open(path, "w") as f:
        json.dump({**sch.SD_SCHEDULER, "timestep_spacing": "karras"}, f)
    with pytest.raises(ValueError, match=r"scheduler_config.json: .*timestep_spacing 'karras'"):
        M.load_sd(d)


@pytest.mark.parametrize("missing", ["unet", "text_encoder/config.json", "tokenizer/merges.txt",
                                     "scheduler", "vae/diffusion_pytorch_model.safetensors"])
def test_missing_part_is_named(torch_models, tmp_path, missing):
    _, _, dirs = torch_models
    d = str(tmp_path / "sd")
    shutil.copytree(dirs["sd1"], d)
    target = os.path.join(d, missing)
    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    with pytest.raises(FileNotFoundError, match=missing.split("/")[0]) as e:
        M.load_sd(d)
    assert os.path.basename(missing) in str(e.value)


@pytest.mark.parametrize("part,key,value,message", [
    ("unet", "down_block_types", ["AttnDownBlock2D", "DownBlock2D"], "block type 'AttnDownBlock2D'"),
    ("unet", "down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"], "'SimpleCrossAttnDownBlock2D'"),
    ("unet", "up_block_types", ["AttnUpBlock2D", "CrossAttnUpBlock2D"], "'AttnUpBlock2D'"),
    ("unet", "mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "'UNetMidBlock2DSimpleCrossAttn'"),
    ("unet", "addition_embed_type", "text_time", "addition_embed_type='text_time'"),
    ("unet", "resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift"),
    ("unet", "some_future_key", 3, "unknown config key 'some_future_key'"),
    ("vae", "down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "'AttnDownEncoderBlock2D'"),
])
def test_unsupported_config_refuses_to_load(torch_models, tmp_path, part, key, value, message):
    _, _, dirs = torch_models
    d = str(tmp_path / "sd")
    shutil.copytree(dirs["sd1"], d)
    path = os.path.join(d, part, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    with open(path, "w") as f:
        json.dump({**cfg, key: value}, f)
    with pytest.raises(ValueError, match=f"{part}/config.json: .*{message}"):
        M.load_sd(d)


def test_unexpected_or_float16_only_weights_refuse_to_load(torch_models, tmp_path):
    from safetensors.numpy import load_file, save_file
    _, _, dirs = torch_models
    d = str(tmp_path / "sd")
    shutil.copytree(dirs["sd2"], d)   # upcast_attention: true loads in float32 ...
    assert M.load_sd(d)[0].unet is not None
    with pytest.raises(ValueError, match="upcast_attention=true is honoured in float32 only"):
        M.load_sd(d, dtype=jnp.bfloat16)
    path = os.path.join(d, "unet", "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    state["down_blocks.0.attentions.0.extra_norm.weight"] = np.ones(4, np.float32)
    save_file(state, path)
    with pytest.raises(ValueError,
                       match=r"unet: 1 unexpected parameters, e.g. down_blocks\.0\.attentions\.0\.extra_norm"):
        M.load_sd(d)


def test_pytorch_names_and_layouts_map_both_ways(torch_models, loaded):
    """convert: every PyTorch tensor lands on one parameter of our trees and comes back unchanged;
    the VAE's older attention names (query/key/value/proj_attn) map onto the same parameters."""
    from flax.traverse_util import flatten_dict

    from ldu_jax.sd import convert
    torch, nets, _ = torch_models
    _, params = loaded["sd2"]
    for part, net in (("vae", nets["vae"]), ("unet", nets["sd2"][0]), ("text_encoder", nets["sd2"][1])):
        state = {k: v.numpy() for k, v in net.state_dict().items() if not k.endswith("position_ids")}
        tree, unmapped = convert.torch_to_flax(state, params[part])
        assert not unmapped and set(flatten_dict(tree)) == set(flatten_dict(params[part])), part
        back = convert.flax_to_torch(tree)
        if part == "text_encoder":  # transformers 5's CLIPTextModel has no text_model. prefix
            state = convert.text_model_prefixed(state)
            assert all(k.startswith("text_model.") for k in back)
        assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state), part
    state = {k: v.numpy() for k, v in nets["vae"].state_dict().items()}
    old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
            .replace("to_out.0", "proj_attn"): v for k, v in state.items()}
    assert old != state and _tree_equal(convert.torch_to_flax(old, params["vae"])[0],
                                        convert.torch_to_flax(state, params["vae"])[0])
    assert convert.torch_to_flax({"decoder.conv_in.weight_v": state["decoder.conv_in.weight"]},
                                 params["vae"])[1] == ["decoder.conv_in.weight_v"]


def test_save_roundtrip_bit_identical_and_readable_by_diffusers(torch_models, loaded, tmp_path):
    """save_sd writes what diffusers' and transformers' PyTorch classes load to the same weights,
    and what load_sd reads back bit for bit (a placeholder token included)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    torch, nets, _ = torch_models
    sd, params = loaded["sd2"]
    M.save_sd(sd, params, str(tmp_path / "plain"))
    for part, cls, want in (("unet", UNet2DConditionModel, nets["sd2"][0]), ("vae", AutoencoderKL, nets["vae"]),
                            ("text_encoder", CLIPTextModel, nets["sd2"][1])):
        got = cls.from_pretrained(str(tmp_path / "plain" / part)).state_dict()
        ref = {k: v for k, v in want.state_dict().items() if not k.endswith("position_ids")}
        assert set(ref) <= set(got), part
        assert all(torch.equal(got[k], ref[k]) for k in ref), part
    sd, params, tid = M.add_placeholder_token(sd, params, "<p8>", "dog")
    M.save_sd(sd, params, str(tmp_path / "sd"))
    assert os.path.isfile(tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    assert os.path.isfile(tmp_path / "sd" / "model_index.json") and not os.path.exists(tmp_path / "sd.tmp")
    sd2, params2 = M.load_sd(str(tmp_path / "sd"))
    assert _tree_equal(params2, params)
    assert sd2.scheduler == sd.scheduler and sd2.resolution == sd.resolution
    assert M.tokenize(sd2, ["a <p8> dog"]).tolist() == M.tokenize(sd, ["a <p8> dog"]).tolist()
    assert tid in M.tokenize(sd2, ["a <p8> dog"])[0]
    assert sd2.unet.config.use_linear_projection and sd2.unet.config.attention_head_dim == (2, 4)
    z = jnp.zeros((1, sd2.resolution // 8, sd2.resolution // 8, 4))
    from ldu_jax.sd.vae import decoder
    assert decoder(sd2.vae) is decoder(sd2.vae) and decoder(sd2.vae)(params2["vae"], z).shape[-1] == 3


def test_folders_in_the_former_flax_format_still_load(loaded, tmp_path):
    """Folders written with diffusers' / transformers' Flax classes (msgpack weights, Flax-only
    config keys), as this project wrote them before it owned its modules, load to the same params."""
    from flax import serialization
    sd, params = loaded["sd1"]
    M.save_sd(sd, params, str(tmp_path / "sd"))
    for part, name in (("vae", "diffusion_flax_model.msgpack"), ("unet", "diffusion_flax_model.msgpack"),
                       ("text_encoder", "flax_model.msgpack")):
        d = tmp_path / "sd" / part
        os.remove(next(str(d / f) for f in os.listdir(d) if f.endswith(".safetensors")))
        with open(d / name, "wb") as f:
            f.write(serialization.msgpack_serialize(jax.device_get(params[part])))
    with open(tmp_path / "sd" / "unet" / "config.json") as f:
        cfg = json.load(f)
    with open(tmp_path / "sd" / "unet" / "config.json", "w") as f:
        json.dump({**cfg, "_class_name": "FlaxUNet2DConditionModel", "split_head_dim": False,
                   "use_memory_efficient_attention": False}, f)
    assert _tree_equal(M.load_sd(str(tmp_path / "sd"))[1], params)


# ----------------------------------------------------------------------------- parity with torch

def test_vae_parity(torch_models, loaded, inputs):
    torch, nets, _ = torch_models
    sd, params = loaded["sd1"]
    vae, tv = VAE(sd.vae, None), nets["vae"]
    x = inputs["images"]
    z = jax.jit(lambda p, x: encode(vae, p, x))(params["vae"], x)
    zl = inputs["latents"][:1]
    y = jax.jit(lambda p, z: decode(vae, p, z))(params["vae"], zl)
    with torch.no_grad():
        z_ref = tv.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mean
        z_ref = z_ref.permute(0, 2, 3, 1).numpy() * tv.config.scaling_factor
        y_ref = tv.decode(torch.from_numpy(zl / tv.config.scaling_factor).permute(0, 3, 1, 2)).sample
        y_ref = y_ref.permute(0, 2, 3, 1).numpy()
    assert_f32_close(z, z_ref, depth=DEPTH["encoder"])
    assert_f32_close(y, y_ref, depth=DEPTH["decoder"])


def _torch_text(torch, text, ids):
    with torch.no_grad():
        return text(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()


def _torch_unet(torch, unet, inputs, ctx):
    with torch.no_grad():
        out = unet(torch.from_numpy(inputs["latents"]).permute(0, 3, 1, 2),
                   torch.from_numpy(inputs["t"].astype(np.int64)), torch.from_numpy(ctx)).sample
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_text_and_unet_parity(torch_models, loaded, inputs, flavour):
    torch, nets, _ = torch_models
    unet, text, _ = nets[flavour]
    sd, params = loaded[flavour]
    ctx = jax.jit(M.text_embed, static_argnums=0)(sd, params["text_encoder"], inputs["ids"])
    ctx_ref = _torch_text(torch, text, inputs["ids"])
    assert ctx.shape == (2, 77, 32)
    assert_f32_close(ctx, ctx_ref, depth=DEPTH["text"])
    out = jax.jit(M.unet_apply, static_argnums=0)(sd, params["unet"], inputs["latents"], inputs["t"], ctx_ref)
    assert out.shape == inputs["latents"].shape
    assert_f32_close(out, _torch_unet(torch, unet, inputs, ctx_ref), depth=DEPTH["unet"])


@pytest.mark.parametrize("flavour,schedule", [
    ("sd1", {}),
    ("sd2", {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "steps_offset": 0}),
    ("sd2", {"timestep_spacing": "linspace", "set_alpha_to_one": True}),
    ("sd1", {"clip_sample": True, "steps_offset": 0}),   # the pipeline overrides both
], ids=["sd1", "sd2-zero-snr-trailing", "sd2-linspace-alpha-one", "sd1-pipeline-overrides"])
def test_generation_matches_the_diffusers_pipeline(torch_models, loaded, flavour, schedule):
    """DDIM + classifier-free guidance from the same starting latents: ``generate`` against
    diffusers' PyTorch StableDiffusionPipeline with DDIMScheduler.from_config of the same config."""
    import dataclasses
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from ldu_jax.personalize import common
    torch, nets, _ = torch_models
    unet, text, _ = nets[flavour]
    sd, params = loaded[flavour]
    sd = dataclasses.replace(sd, scheduler={**sd.scheduler, **schedule})
    pipe = StableDiffusionPipeline(vae=nets["vae"], text_encoder=text, tokenizer=sd.tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(sd.scheduler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of sks dog", "a painting"]
    latents = np.random.RandomState(3).randn(4, 8, 8, 4).astype(np.float32)
    ref = [pipe(p, num_inference_steps=5, guidance_scale=3.0, num_images_per_prompt=2,
                latents=torch.from_numpy(latents[2 * i:2 * i + 2]).permute(0, 3, 1, 2), output_type="np").images
           for i, p in enumerate(prompts)]
    out = common.generate(sd, params, prompts, n_per_prompt=2, steps=5, guidance=3.0, seed=0, batch=4,
                          latents=latents)
    for p, want in zip(prompts, ref):
        assert out[p].dtype == np.uint8 and out[p].shape == want.shape
        # ours rounds (x / 2 + 0.5) x 255 to uint8: within half a level of diffusers' float image,
        # plus float32 roundings through the text encoder, 5 UNet steps and the decoder (~520 layers)
        err = np.abs(out[p].astype(np.float64) - want.astype(np.float64) * 255).max()
        assert err <= 0.5 + 255 * f32_tol(1, DEPTH["text"] + 5 * DEPTH["unet"] + DEPTH["decoder"]), (p, err)
        assert want.std() > 0.02           # an image, not a constant
    other = common.generate(sd, params, prompts, n_per_prompt=2, steps=5, guidance=3.0, seed=0, batch=4)
    assert np.abs(other[prompts[0]].astype(int) - out[prompts[0]].astype(int)).max() > 4   # latents are used
    with pytest.raises(ValueError, match="latents of shape"):
        common.generate(sd, params, prompts, n_per_prompt=2, steps=5, guidance=3.0, seed=0, latents=latents[:3])


# ----------------------------------------------------------------------------- tiny bundle, tokens

@pytest.fixture(scope="module")
def tiny():
    return M.tiny_sd(0)


def test_tiny_sd_draws_the_former_flax_weights(tiny):
    """A seed gives, bit for bit, the weights the libraries' former Flax classes drew for tiny_sd
    (stored from diffusers 0.39 / transformers 4.57, see former_flax.py)."""
    _, params = tiny
    for part in ("vae", "unet", "text_encoder"):
        former_flax.assert_init(f"tiny_sd0/{part}", params[part])


def test_tiny_sd(tiny):
    sd, params = tiny
    assert sd.resolution == 64 and sd.scheduler["prediction_type"] == "epsilon"
    sd_again, params_again = M.tiny_sd(0)
    assert sd_again is sd and hash(sd) == hash(sd)  # built once per process: jits keyed on it compile once
    assert _tree_equal(params_again, params)
    params_again["unet"]["conv_in"] = None  # a caller's edits never reach the cached bundle
    assert M.tiny_sd(0)[1]["unet"]["conv_in"] is not None
    assert not np.array_equal(M.tiny_sd(1)[1]["unet"]["conv_in"]["kernel"], params["unet"]["conv_in"]["kernel"])
    ids = M.tokenize(sd, ["a photo of a person"])
    ctx = jax.eval_shape(lambda p: M.text_embed(sd, p, ids), params["text_encoder"])
    z = jax.eval_shape(lambda p: encode(VAE(sd.vae, None), p, jnp.zeros((1, 64, 64, 3))), params["vae"])
    out = jax.eval_shape(lambda p: M.unet_apply(sd, p, jnp.zeros(z.shape), 3, jnp.zeros(ctx.shape)),
                         params["unet"])
    assert ctx.shape == (1, 77, 32) and z.shape == (1, 8, 8, 4) and out.shape == z.shape


def test_tiny_tokenizer_shipped_and_covering(tmp_path):
    make_tiny_tokenizer.build(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        assert filecmp.cmp(tmp_path / name, os.path.join(M.TOKENIZER_DIR, name), shallow=False)
    tok = M.tiny_tokenizer()
    assert 500 < len(tok) <= 1000 and tok.model_max_length == 77
    for w in ("a photo of person man woman face portrait dslr sks painting in the style dog cat "
              "with hair glasses").split():
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w
    ids = tok.encode("Zebra-Ünïcode 漢字 42!", add_special_tokens=False)
    assert tok.unk_token_id not in ids  # byte-level alphabet: everything tokenizes


def test_tokenize_pads_and_truncates(tiny):
    sd, _ = tiny
    ids = M.tokenize(sd, ["a photo of a dog", "cat " * 200])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    tok = sd.tokenizer
    assert ids[0, 0] == tok.bos_token_id and ids[0, 6] == tok.eos_token_id
    assert (ids[0, 7:] == tok.pad_token_id).all() and ids[1, -1] == tok.eos_token_id


def test_add_placeholder_token(tiny):
    sd, params = tiny
    with pytest.raises(ValueError, match="'dog'"):
        M.add_placeholder_token(sd, params, "dog", "cat")
    with pytest.raises(ValueError, match="xylophonequartz"):
        M.add_placeholder_token(sd, params, "<new>", "xylophonequartz")
    n = len(sd.tokenizer)
    sd2, params2, tid = M.add_placeholder_token(sd, params, "<sks-concept>", "dog")
    with pytest.raises(ValueError, match="<sks-concept>"):
        M.add_placeholder_token(sd2, params2, "<sks-concept>", "dog")
    assert tid == n and len(sd.tokenizer) == n  # the original tokenizer is untouched
    assert sd2.tokenizer.encode("<sks-concept>", add_special_tokens=False) == [tid]
    assert sd2.text_encoder.config.vocab_size == n + 1
    def emb(p):
        return np.asarray(p["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    old, new = emb(params), emb(params2)
    dog = sd.tokenizer.encode("dog", add_special_tokens=False)[0]
    assert new.shape == (n + 1, old.shape[1])
    assert np.array_equal(new[tid], old[dog]) and np.array_equal(new[:n], old)
    f = jax.jit(M.text_embed, static_argnums=0)
    a = f(sd2, params2["text_encoder"], M.tokenize(sd2, ["a photo of <sks-concept>"]))
    b = f(sd2, params2["text_encoder"], M.tokenize(sd2, ["a photo of dog"]))
    np.testing.assert_array_equal(a, b)  # same row, same position -> same states
