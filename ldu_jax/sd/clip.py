"""CLIP in flax.linen: the text encoder of Stable Diffusion (transformers' ``CLIPTextModel``) and
the dual image/text model CLIP-IQA scores with (transformers' ``CLIPModel``).

``CLIPTextModel(config)(input_ids [B, L]) -> last_hidden_state [B, L, D]``, computing what
transformers' PyTorch model computes: token embeddings plus position embeddings of arange(L),
pre-LayerNorm encoder layers with causal self-attention (logits scaled by head_dim ** -0.5) and an
MLP with the config's activation ('quick_gelu' x * sigmoid(1.702 x), or 'gelu' with the exact erf),
then ``final_layer_norm``. The pooled output and the projection are not computed (SD uses the last
hidden state only). The parameter tree is transformers' ``FlaxCLIPTextModel``'s
(``text_model/encoder/layers/0/self_attn/q_proj/kernel``, ...), so its msgpack files load unchanged.

``CLIPModel(config)``, with the same encoder layers in both towers:
``get_image_features(pixels [B, H, W, C])`` (NHWC, normalised as CLIP's image processor does):
patch embedding (a conv without bias) after a class embedding, plus position embeddings,
``pre_layrnorm`` (transformers' spelling), the encoder (no mask), ``post_layernorm`` of the class
token, ``visual_projection``; ``get_text_features(input_ids [B, L])``: the text tower's output at
the EOS token (see ``_eos_positions``), ``text_projection``; and the ``logit_scale`` parameter. Its
tree is transformers' ``FlaxCLIPModel``'s.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldu_jax.errors import ConfigError

Dtype = Any

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),   # torch's default GELU is exact
}

# Config keys that cannot change last_hidden_state:
_IRRELEVANT = frozenset((
    # CLIP's own: the projection (CLIPTextModelWithProjection), initialisation, dropout (off at
    # inference), special-token ids (the pooled output only), weights' storage dtype
    "projection_dim", "initializer_range", "initializer_factor", "attention_dropout", "dropout",
    "bos_token_id", "eos_token_id", "pad_token_id", "architectures", "transformers_version",
    "torch_dtype", "dtype", "use_bfloat16",
    # PretrainedConfig's generic keys: outputs requested, heads and tasks CLIP has none of, generation
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "tf_legacy_loss",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "tie_word_embeddings", "id2label", "label2id",
    "problem_type", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
    "sep_token_id", "decoder_start_token_id", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
))
# Keys we build at one value only: pruned heads change the layers; another model type is another
# config layout (a full CLIPConfig nests the text config).
_FIXED = dict(pruned_heads={}, model_type="clip_text_model")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The keys of a transformers ``text_encoder/config.json`` that shape the function; defaults
    are transformers' CLIPTextConfig's."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "text_encoder/config.json") -> CLIPTextConfig:
        """Read a config dict strictly: keys starting with '_' are metadata; every other key is
        honoured, known to be irrelevant, checked against the one value we build, or refused,
        naming ``where``, the key and the value."""
        return _checked_tower(_read(cls, cfg, where, _FIXED), where)


def _read(cls, cfg: dict, where: str, fixed: dict):
    """``cls`` from the keys of ``cfg`` that are its fields; the rest are metadata ('_'), irrelevant,
    at the one value in ``fixed``, or refused."""
    names = {f.name for f in dataclasses.fields(cls)}
    kept = {}
    for k, v in cfg.items():
        if k in names:
            kept[k] = v
        elif k.startswith("_") or k in _IRRELEVANT:
            continue
        elif k in fixed:
            if v != fixed[k]:
                raise ConfigError(f"{where}: {k}={v!r} is not supported (only {fixed[k]!r})")
        else:
            raise ConfigError(f"{where}: unknown config key {k!r} (= {v!r}); not supported")
    return cls(**kept)


def _checked_tower(config, where: str):
    if config.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"{where}: hidden_act={config.hidden_act!r} is not supported "
                          f"(supported: {', '.join(ACTIVATIONS)})")
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"{where}: hidden_size={config.hidden_size} is not a multiple of "
                          f"num_attention_heads={config.num_attention_heads}")
    return config


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The keys of transformers' CLIPVisionConfig that shape the function (its defaults)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "config.json: vision_config") -> CLIPVisionConfig:
        """As ``CLIPTextConfig.from_dict``."""
        return _checked_tower(_read(cls, cfg, where, _VISION_FIXED), where)


_VISION_FIXED = dict(pruned_heads={}, model_type="clip_vision_model")
# CLIPConfig's own key besides the towers' that cannot change the features: PyTorch's init scale
_CLIP_IRRELEVANT = frozenset(("initializer_factor",))
_CLIP_FIXED = dict(pruned_heads={}, model_type="clip")
# transformers' CLIPTextConfig default, used when a text_config does not name one
_EOS_DEFAULT = 49407


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A transformers CLIP ``config.json`` (model_type 'clip'): the two towers, the projection
    width, and the text config's ``eos_token_id`` (where the text features are pooled; kept here
    so that ``CLIPTextConfig``, SD's text encoder config, is unchanged)."""
    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    eos_token_id: int = _EOS_DEFAULT
    logit_scale_init_value: float = 2.6592    # init only: logit_scale is a parameter

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "config.json") -> CLIPConfig:
        """Read strictly, as ``CLIPTextConfig.from_dict``; a tower's errors name
        '<where>: text_config' or '<where>: vision_config'. A legacy ``text_config_dict`` /
        ``vision_config_dict`` that is not null replaces the tower's config, as transformers
        rebuilds the tower from it alone (with defaults)."""
        towers = {}
        for name in ("text_config", "vision_config"):
            d = cfg.get(f"{name}_dict")
            towers[name] = dict((cfg.get(name) or {}) if d is None else d)
        eos = towers["text_config"].pop("eos_token_id", _EOS_DEFAULT)
        if not isinstance(eos, int) or isinstance(eos, bool):
            raise ConfigError(f"{where}: text_config: eos_token_id={eos!r} is not supported (an int: the "
                              "text features are pooled at that token)")
        # the top level's own eos_token_id is PretrainedConfig's generic one (null), not used
        top = {k: v for k, v in cfg.items() if k not in towers and k not in _CLIP_IRRELEVANT and k not in (
            "text_config_dict", "vision_config_dict", "eos_token_id")}
        config = _read(cls, top, where, _CLIP_FIXED)
        return dataclasses.replace(
            config, eos_token_id=eos,
            text_config=CLIPTextConfig.from_dict(towers["text_config"], f"{where}: text_config"),
            vision_config=CLIPVisionConfig.from_dict(towers["vision_config"], f"{where}: vision_config"))


# transformers' Flax initialisation, so a seed gives the weights it gave before we owned the module
_INIT = nn.initializers.normal(0.01)


def _layer_norm(config: CLIPTextConfig, dtype, name: str):
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, name=name)


class Attention(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        b, length, d = x.shape
        heads = self.config.num_attention_heads
        q, k, v = (nn.Dense(d, dtype=self.dtype, kernel_init=_INIT, name=n)(x).reshape(b, length, heads, d // heads)
                   for n in ("q_proj", "k_proj", "v_proj"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (d // heads) ** -0.5
        weights = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v).reshape(b, length, d)
        return nn.Dense(d, dtype=self.dtype, kernel_init=_INIT, name="out_proj")(y)


class MLP(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, kernel_init=_INIT, name="fc1")(x)
        h = ACTIVATIONS[self.config.hidden_act](h)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, kernel_init=_INIT, name="fc2")(h)


class EncoderLayer(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg, dt = self.config, self.dtype
        x = x + Attention(cfg, dt, name="self_attn")(_layer_norm(cfg, dt, "layer_norm1")(x), mask)
        return x + MLP(cfg, dt, name="mlp")(_layer_norm(cfg, dt, "layer_norm2")(x))


class _Layers(nn.Module):
    """The layers named '0', '1', ... (transformers' FlaxCLIPLayerCollection, for the tree)."""
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        for i in range(self.config.num_hidden_layers):
            x = EncoderLayer(self.config, self.dtype, name=str(i))(x, mask)
        return x


class _Encoder(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        return _Layers(self.config, self.dtype, name="layers")(x, mask)


class _Embeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg, init = self.config, nn.initializers.normal(0.01)   # transformers' Flax init
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, dtype=self.dtype,
                          name="token_embedding")(input_ids)
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, dtype=self.dtype,
                       name="position_embedding")(jnp.arange(input_ids.shape[-1]))
        return tokens + pos


class _TextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg, dt = self.config, self.dtype
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"{length} tokens, more than max_position_embeddings={cfg.max_position_embeddings}")
        x = _Embeddings(cfg, dt, name="embeddings")(input_ids)
        causal = jnp.tril(jnp.ones((length, length), bool))
        x = _Encoder(cfg, dt, name="encoder")(x, causal)
        return _layer_norm(cfg, dt, "final_layer_norm")(x)


class CLIPTextModel(nn.Module):
    """``input_ids [B, L] int -> last_hidden_state [B, L, hidden_size]``."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        return _TextTransformer(self.config, self.dtype, name="text_model")(jnp.asarray(input_ids, jnp.int32))

    def init_params(self, rng) -> dict:
        """Random float32 params; the key is split as transformers' ``init_weights`` split it, so a
        seed gives the weights it gave before we owned the module."""
        params_rng, dropout_rng = jax.random.split(rng)
        ids = jnp.zeros((1, self.config.max_position_embeddings), jnp.int32)
        return self.init({"params": params_rng, "dropout": dropout_rng}, ids)["params"]


# ----------------------------------------------------------------------------- the dual model

class _VisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        cfg, d, p = self.config, self.config.hidden_size, self.config.patch_size
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"pixels of shape {pixels.shape}: expected [B, {cfg.image_size}, {cfg.image_size}, "
                             f"{cfg.num_channels}] (NHWC at the config's image_size)")
        patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                          kernel_init=_INIT, name="patch_embedding")(pixels)
        b = pixels.shape[0]
        patches = patches.reshape(b, -1, d)     # row-major over the patch grid, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (d,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, d)), patches], axis=1)
        pos = nn.Embed(x.shape[1], d, embedding_init=_INIT, dtype=self.dtype,
                       name="position_embedding")(jnp.arange(x.shape[1]))
        return x + pos


class _VisionTransformer(nn.Module):
    """``pixels [B, H, W, C] -> pooled [B, hidden_size]`` (post_layernorm of the class token)."""
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        cfg, dt = self.config, self.dtype
        x = _VisionEmbeddings(cfg, dt, name="embeddings")(pixels)
        x = _layer_norm(cfg, dt, "pre_layrnorm")(x)
        x = _Encoder(cfg, dt, name="encoder")(x, True)     # every patch attends to every patch
        return _layer_norm(cfg, dt, "post_layernorm")(x[:, 0])


def _eos_positions(input_ids, eos_token_id: int):
    """Where transformers' PyTorch CLIPTextTransformer pools (4.57, 5.x): configs written before its PR
    #24773 have eos_token_id 2 (wrong) and pool at the highest id (CLIP's EOS is the last token of
    the vocabulary, but an added token is higher); the others at the first eos_token_id (padding
    may be EOS too)."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPModel(nn.Module):
    """transformers' CLIPModel: ``get_image_features`` / ``get_text_features`` -> [B, projection_dim]
    (not normalised), and the ``logit_scale`` parameter (in ``params``)."""
    config: CLIPConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg, dt = self.config, self.dtype
        self.text_model = _TextTransformer(cfg.text_config, dt)
        self.vision_model = _VisionTransformer(cfg.vision_config, dt)
        proj = functools.partial(nn.Dense, cfg.projection_dim, use_bias=False, dtype=dt,
                                 kernel_init=nn.initializers.normal(0.02))
        self.visual_projection = proj()
        self.text_projection = proj()
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.logit_scale_init_value), ())

    def get_image_features(self, pixels):
        """``pixels [B, H, W, C]`` float, CLIP-normalised, at the config's image_size."""
        return self.visual_projection(self.vision_model(pixels))

    def get_text_features(self, input_ids):
        """``input_ids [B, L]``; no attention mask: with right padding and causal attention the
        token pooled never sees the padding, so a mask would not change the features."""
        ids = jnp.asarray(input_ids, jnp.int32)
        h = self.text_model(ids)
        pooled = h[jnp.arange(h.shape[0]), _eos_positions(ids, self.config.eos_token_id)]
        return self.text_projection(pooled)

    def __call__(self, input_ids, pixels):
        """(image features, text features, logit_scale): every parameter, for ``init``."""
        return self.get_image_features(pixels), self.get_text_features(input_ids), self.logit_scale

    def init_params(self, rng) -> dict:
        """Random float32 params; transformers' Flax initialisers and key split throughout, so a seed
        gives the weights FlaxCLIPModel gave."""
        params_rng, dropout_rng = jax.random.split(rng)
        v = self.config.vision_config
        pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels))
        return self.init({"params": params_rng, "dropout": dropout_rng}, jnp.zeros((1, 1), jnp.int32),
                         pixels)["params"]
