"""The SD modules' attention (normalised after the value product) is softmax attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldu_jax.sd.attention import attention
from numerics import assert_f32_close

RNG = np.random.RandomState(0)


def softmax_attention(q, k, v):
    """The textbook form, in NumPy float64: softmax(q k^T / sqrt(d)) v."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("tq,tk,heads,d", [(16, 16, 2, 4), (9, 5, 3, 8)])
def test_attention_is_softmax_attention_and_so_is_its_gradient(tq, tk, heads, d):
    # large logits: without the max subtracted exp would overflow to inf
    q = jnp.asarray(RNG.randn(2, tq, heads, d) * 30, jnp.float32)
    k, v = (jnp.asarray(RNG.randn(2, tk, heads, d), jnp.float32) for _ in range(2))
    got = attention(q, k, v)
    assert got.shape == (2, tq, heads, d) and np.isfinite(np.asarray(got)).all()
    assert_f32_close(got, softmax_attention(q, k, v), depth=2 * tk)
    # the gradient against jax.nn.softmax's (differentiated through the weights' normalisation)
    g = jnp.asarray(RNG.randn(2, tq, heads, d), jnp.float32)

    def plain(q, k, v):
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", w, v)
    for got_g, want_g in zip(jax.vjp(attention, q, k, v)[1](g), jax.vjp(plain, q, k, v)[1](g)):
        assert_f32_close(got_g, want_g, depth=4 * tk, scale=np.abs(np.asarray(want_g)).max() * 30)
    # keys mixed up between heads are far outside the tolerance
    wrong = attention(q, k[:, :, ::-1], v)
    assert np.abs(np.asarray(wrong) - softmax_attention(q, k, v)).max() > 0.1


def test_upcast_weighs_in_float32_and_returns_the_values_dtype():
    q, k, v = (jnp.asarray(RNG.randn(1, 8, 1, 4), jnp.bfloat16) for _ in range(3))
    out = attention(q, k, v, upcast=True)
    assert out.dtype == jnp.bfloat16
    want = softmax_attention(q, k, v)
    # bf16 inputs, float32 weights: within bf16 rounding of the float64 result
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=2 ** -7 * np.abs(want).max() * 2)
    assert attention(q, k, v).dtype == jnp.bfloat16
