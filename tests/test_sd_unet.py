"""Our Flax UNet (ldu_jax/sd/unet.py): parity with diffusers' PyTorch UNet2DConditionModel on tiny
random configs, exactly diffusers' Flax parameter tree, and strict config reading."""
import copy
import dataclasses
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import former_flax
from ldu_jax.sd import models as M
from ldu_jax.sd import weights
from ldu_jax.sd import unet as U
from numerics import assert_f32_close, f32_tol

CROSS2 = dict(down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
CONFIGS = {
    "sd1": M.TINY_UNET,
    # SD 2.x: linear projections, per-block heads, upcast_attention (the same function in float32)
    "sd2": dict(M.TINY_UNET, use_linear_projection=True, attention_head_dim=(2, 4), upcast_attention=True),
    # two transformer layers per spatial transformer, cross-attention only in level 0, no mid block
    "deep": dict(M.TINY_UNET, **CROSS2, transformer_layers_per_block=2, only_cross_attention=(True, False),
                 mid_block_type=None),
    # two resnets per down block (three per up block), per-level transformer depth (the mid block takes
    # the last), the other timestep embedding, 16 groups and eps 1e-6 in the resnets and output norm
    "wide": dict(M.TINY_UNET, layers_per_block=2, transformer_layers_per_block=(1, 2), flip_sin_to_cos=False,
                 freq_shift=1, norm_num_groups=16, norm_eps=1e-6),
}
RNG = np.random.RandomState(0)
X = RNG.randn(2, 8, 8, 4).astype(np.float32)
CTX = RNG.randn(2, 7, 32).astype(np.float32)
T = {"wide": 321.5}     # a float scalar for all; [B] ints for the others
T_DEFAULT = np.array([10, 730], np.int32)
# float32 roundings over each config's depth in conv / dense / norm / attention layers (tests/numerics.py):
# ~90 for the tiny UNet (as in test_sd_models), two transformer layers a block double its attention
# part ("deep"), two resnets a block and a 2-layer mid transformer ("wide"); one spatial transformer ~16
DEPTH = {"sd1": 90, "sd2": 90, "deep": 180, "wide": 150, "transformer": 16}


def _rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _shapes(tree):
    return {"/".join(k): (v.shape, v.dtype) for k, v in flatten_dict(dict(tree)).items()}


@pytest.fixture(scope="module")
def torch_unets():
    """PyTorch twins of CONFIGS, every weight perturbed so that no norm is an identity."""
    torch = pytest.importorskip("torch", reason="PyTorch parity tests need torch")
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    nets = {}
    for name, cfg in CONFIGS.items():
        net = UNet2DConditionModel(**cfg)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        nets[name] = net.eval()
    return torch, nets


def _torch_out(torch, net, name):
    t = T.get(name, T_DEFAULT)
    t = torch.from_numpy(t.astype(np.int64)) if isinstance(t, np.ndarray) else t
    with torch.no_grad():
        out = net(torch.from_numpy(X).permute(0, 3, 1, 2), t, torch.from_numpy(CTX)).sample
    return out.permute(0, 2, 3, 1).numpy()


_CACHE: dict = {}


def _converted(torch_unets, name):
    """Our UNet and the PyTorch twin's weights through the converter, the config read from the
    twin's full config."""
    if ("params", name) not in _CACHE:
        _, nets = torch_unets
        cfg = U.UNetConfig.from_dict(dict(nets[name].config))
        assert cfg == U.UNetConfig(**CONFIGS[name])
        unet = U.UNet(cfg)
        shapes = jax.eval_shape(unet.init_params, jax.random.PRNGKey(0))
        state = {k: v.numpy() for k, v in nets[name].state_dict().items()}
        params = weights.onto(state, shapes)
        assert _shapes(params) == _shapes(shapes)
        _CACHE["params", name] = unet, params
    return _CACHE["params", name]


def _ours(torch_unets, name):
    """Our output on the twin's weights (one jit per config)."""
    if ("out", name) not in _CACHE:
        unet, params = _converted(torch_unets, name)
        _CACHE["out", name] = np.asarray(jax.jit(unet.apply)({"params": params}, X, T.get(name, T_DEFAULT), CTX))
    return _CACHE["out", name]


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_with_pytorch(torch_unets, name):
    torch, nets = torch_unets
    out, ref = _ours(torch_unets, name), _torch_out(torch, nets[name], name)
    assert out.shape == X.shape and out.dtype == np.float32
    print(f"{name}: max rel error {_rel(out, ref):.2e}")
    assert_f32_close(out, ref, depth=DEPTH[name])


def test_tolerance_detects_tanh_gelu(torch_unets, monkeypatch):
    """The tolerance has power: the PyTorch UNet with the tanh GELU of diffusers' Flax GEGLU is
    out of it."""
    import torch.nn.functional as F
    from diffusers.models.activations import GEGLU
    torch, nets = torch_unets
    monkeypatch.setattr(GEGLU, "gelu", lambda self, gate: F.gelu(gate, approximate="tanh"))
    err = _rel(_ours(torch_unets, "sd1"), _torch_out(torch, nets["sd1"], "sd1"))
    print(f"tanh GELU: max rel error {err:.2e}")
    assert err > f32_tol(1, DEPTH["sd1"])


def test_spatial_transformer_groupnorm_eps(torch_unets):
    """One spatial transformer on small activations (std 0.1, where GroupNorm's eps shows; in the
    whole tiny UNet eps 1e-5 moves the output by 6e-6 only): parity with PyTorch's
    Transformer2DModel, and the eps 1e-5 of diffusers' Flax one is out of the tolerance."""
    torch, nets = torch_unets
    _, params = _converted(torch_unets, "sd1")
    ref_block = copy.deepcopy(nets["sd1"].down_blocks[0].attentions[0])
    x = (0.1 * np.random.RandomState(1).randn(2, 8, 8, 32)).astype(np.float32)
    block = U.Transformer2D(heads=8, depth=1, only_cross_attention=False, linear=False, groups=32)
    out = np.asarray(jax.jit(block.apply)({"params": params["down_blocks_0"]["attentions_0"]}, x, CTX))

    def ref(eps):
        ref_block.norm.eps = eps
        with torch.no_grad():
            y = ref_block(torch.from_numpy(x).permute(0, 3, 1, 2), encoder_hidden_states=torch.from_numpy(CTX),
                          return_dict=False)[0]
        return y.permute(0, 2, 3, 1).numpy()

    print(f"spatial transformer: max rel error {_rel(out, ref(1e-6)):.2e}, eps 1e-5: {_rel(out, ref(1e-5)):.2e}")
    assert_f32_close(out, ref(1e-6), depth=DEPTH["transformer"])
    assert _rel(out, ref(1e-5)) > f32_tol(1, DEPTH["transformer"])


@pytest.mark.parametrize("name", CONFIGS)
def test_param_tree_is_diffusers_flax_tree(name):
    """Same names, shapes and dtypes as diffusers' former FlaxUNet2DConditionModel (stored from
    diffusers 0.39, see former_flax.py), so its msgpack and orbax checkpoints load unchanged."""
    former_flax.assert_tree("unet", name, jax.eval_shape(U.UNet(U.UNetConfig(**CONFIGS[name])).init_params,
                                                         jax.random.PRNGKey(0)))


def test_bfloat16_computes_in_bfloat16():
    cfg = U.UNetConfig(**M.TINY_UNET)
    params = U.UNet(cfg).init_params(jax.random.PRNGKey(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    out = jax.jit(U.UNet(cfg, dtype=jnp.bfloat16).apply)({"params": params}, X, T_DEFAULT, CTX)
    ref = jax.jit(U.UNet(cfg).apply)({"params": params}, X, T_DEFAULT, CTX)
    assert out.dtype == jnp.bfloat16 and _rel(out, ref) < 0.05


# ----------------------------------------------------------------------------- config

def test_config_covers_every_pytorch_key():
    """Every argument of diffusers' PyTorch UNet2DConditionModel is either computed (a UNetConfig
    field, with diffusers' default) or held to diffusers' default (FIXED): none passes unchecked."""
    from diffusers import UNet2DConditionModel
    defaults = {k: p.default for k, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
                if k != "self"}
    fields = {f.name: f.default for f in dataclasses.fields(U.UNetConfig)}
    assert set(defaults) == set(fields) | set(U.FIXED) and not set(fields) & set(U.FIXED)
    assert {k: defaults[k] for k in U.FIXED} == U.FIXED
    assert {k: defaults[k] for k in fields} == fields
    assert U.UNetConfig.from_dict({}) == U.UNetConfig()


def test_config_reads_diffusers_json():
    """Metadata keys are ignored, lists become tuples, fixed keys at their value pass."""
    cfg = U.UNetConfig.from_dict({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.39.0",
                                  **{k: list(v) if isinstance(v, tuple) else v for k, v in CONFIGS["deep"].items()},
                                  "act_fn": "silu", "dropout": 0, "num_attention_heads": None})
    assert cfg == U.UNetConfig(**CONFIGS["deep"]) and hash(cfg) == hash(U.UNetConfig(**CONFIGS["deep"]))
    assert cfg.per_block("only_cross_attention") == (True, False)
    assert cfg.per_block("transformer_layers_per_block") == (2, 2)


@pytest.mark.parametrize("key,value,message", [
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"], "block type 'AttnDownBlock2D' in down_block_types"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"], "block type 'SimpleCrossAttnDownBlock2D'"),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"], "block type 'AttnUpBlock2D' in up_block_types"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "block type 'UNetMidBlock2DSimpleCrossAttn'"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift='scale_shift' is not supported"),
    ("addition_embed_type", "text_time", "addition_embed_type='text_time'"),
    ("num_attention_heads", 8, "num_attention_heads=8"),
    ("dropout", 0.1, "dropout=0.1"),
    ("cross_attention_dim", [32, 32], "cross_attention_dim=(32, 32)"),
    ("layers_per_block", [1, 2], "layers_per_block=(1, 2)"),
    ("attention_head_dim", [8, 8, 8], "attention_head_dim=(8, 8, 8)"),
    ("attention_head_dim", 5, "attention_head_dim=5"),
    ("transformer_layers_per_block", [[1], [1]], "transformer_layers_per_block=((1,), (1,))"),
    ("only_cross_attention", 1, "only_cross_attention=1"),
    ("norm_num_groups", None, "norm_num_groups=None"),
    ("norm_num_groups", 24, "norm_num_groups=24"),
    ("sample_size", [8, 8], "sample_size=(8, 8)"),
    ("up_block_types", ["UpBlock2D"], "up_block_types=('UpBlock2D',)"),
    ("some_future_key", 3, "unknown config key 'some_future_key' (= 3)"),
])
def test_unsupported_config_is_refused(key, value, message):
    with pytest.raises(ValueError, match="^x/unet/config.json: .*" + re.escape(message)):
        U.UNetConfig.from_dict({"_class_name": "UNet2DConditionModel", **M.TINY_UNET, key: value},
                               where="x/unet/config.json")


def test_upcast_attention_is_float32_only():
    cfg = U.UNetConfig.from_dict(CONFIGS["sd2"])
    assert U.UNet(cfg).dtype == jnp.float32
    cfg.check_dtype(jnp.float32, "unet/config.json")
    with pytest.raises(ValueError, match="^unet/config.json: upcast_attention=true is honoured in float32 only"):
        cfg.check_dtype(jnp.bfloat16, "unet/config.json")
    with pytest.raises(ValueError, match="upcast_attention=true .* not bfloat16"):
        U.UNet(cfg, dtype=jnp.bfloat16)
    U.UNet(U.UNetConfig(**M.TINY_UNET), dtype=jnp.bfloat16)   # without it, any dtype


def test_sample_size_must_halve_at_every_level():
    unet = U.UNet(U.UNetConfig(**M.TINY_UNET))
    with pytest.raises(ValueError, match="sample of 8x7 is not a multiple of 2"):
        jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 7, 4)), 1, jnp.zeros((1, 1, 32)))
