"""The CLIP text encoder of Stable Diffusion (transformers' ``CLIPTextModel``) in flax.linen.

``CLIPTextModel(config)(input_ids [B, L]) -> last_hidden_state [B, L, D]``, computing what
transformers' PyTorch model computes: token embeddings plus position embeddings of arange(L),
pre-LayerNorm encoder layers with causal self-attention (logits scaled by head_dim ** -0.5) and an
MLP with the config's activation ('quick_gelu' x * sigmoid(1.702 x), or 'gelu' with the exact erf),
then ``final_layer_norm``. The pooled output and the projection are not computed (SD uses the last
hidden state only). The parameter tree is transformers' ``FlaxCLIPTextModel``'s
(``text_model/encoder/layers/0/self_attn/q_proj/kernel``, ...), so its msgpack files load unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {}
        for k, v in cfg.items():
            if k.startswith("_") or k in _IRRELEVANT:
                continue
            if k in names:
                kept[k] = v
            elif k in _FIXED:
                if v != _FIXED[k]:
                    raise ValueError(f"{where}: {k}={v!r} is not supported (only {_FIXED[k]!r})")
            else:
                raise ValueError(f"{where}: unknown config key {k!r} (= {v!r}); not supported")
        config = cls(**kept)
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act={config.hidden_act!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"{where}: hidden_size={config.hidden_size} is not a multiple of "
                             f"num_attention_heads={config.num_attention_heads}")
        return config


def _layer_norm(config: CLIPTextConfig, dtype, name: str):
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, name=name)


class Attention(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        b, length, d = x.shape
        heads = self.config.num_attention_heads
        q, k, v = (nn.Dense(d, dtype=self.dtype, name=n)(x).reshape(b, length, heads, d // heads)
                   for n in ("q_proj", "k_proj", "v_proj"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (d // heads) ** -0.5
        weights = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v).reshape(b, length, d)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(y)


class MLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = ACTIVATIONS[self.config.hidden_act](h)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(h)


class EncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg, dt = self.config, self.dtype
        x = x + Attention(cfg, dt, name="self_attn")(_layer_norm(cfg, dt, "layer_norm1")(x), mask)
        return x + MLP(cfg, dt, name="mlp")(_layer_norm(cfg, dt, "layer_norm2")(x))


class _Layers(nn.Module):
    """The layers named '0', '1', ... (transformers' FlaxCLIPLayerCollection, for the tree)."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        for i in range(self.config.num_hidden_layers):
            x = EncoderLayer(self.config, self.dtype, name=str(i))(x, mask)
        return x


class _Encoder(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        return _Layers(self.config, self.dtype, name="layers")(x, mask)


class _Embeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg, init = self.config, nn.initializers.normal(0.02)
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
