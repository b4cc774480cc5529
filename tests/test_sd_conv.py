"""The SD modules' convolution as taps (ldu_jax/sd/conv.py) against XLA's, and ``parallel.map_subjects``
against vmap: the same function and gradients to float rounding, in every shape the UNet and VAE use."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldu_jax import errors, parallel
from ldu_jax.sd import conv as C
from ldu_jax.sd import models as M
from ldu_jax.sd import vae as vae_lib
from numerics import assert_f32_close

RNG = np.random.RandomState(0)


@pytest.mark.parametrize("kernel,stride,pad", [(3, 1, 1), (1, 1, 0), (3, 2, 1), (3, 2, 0)])
def test_taps_equal_xla_conv_and_its_gradients(kernel, stride, pad):
    x = jnp.asarray(RNG.randn(2, 9, 8, 5), jnp.float32)   # odd height: stride 2 drops a row (VAE downsample)
    k = jnp.asarray(RNG.randn(kernel, kernel, 5, 6), jnp.float32)
    args = ((stride, stride), ((pad, pad), (pad, pad)))
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k, *args, dimension_numbers=dn)))
    want = jax.lax.conv_general_dilated(x, k, *args, dimension_numbers=dn)
    got = C.taps_conv(x, k, *args, dimension_numbers=dn)
    assert got.shape == want.shape
    assert_f32_close(got, want, depth=kernel * kernel * 5)
    gx, gk = jax.grad(loss(C.taps_conv), (0, 1))(x, k)
    wx, wk = jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, k)
    assert_f32_close(gx, wx, depth=2 * kernel * kernel * 6)
    assert_f32_close(gk, wk, depth=2 * 2 * 9 * 8)
    # a wrong tap order is far outside the tolerance
    flipped = C.taps_conv(x, k[::-1, ::-1], *args, dimension_numbers=dn)
    assert kernel == 1 or np.abs(np.asarray(flipped - want)).max() > 1.0


def test_taps_fall_back_to_xla_for_what_they_do_not_cover():
    x = jnp.asarray(RNG.randn(1, 6, 6, 4), jnp.float32)
    k = jnp.asarray(RNG.randn(3, 3, 2, 4), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    got = C.taps_conv(x, k, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
    want = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
    np.testing.assert_array_equal(got, want)


def test_unet_and_vae_are_the_same_function_with_either_conv():
    """The tiny bundle's UNet and VAE traced with taps and with XLA's conv: one parameter tree, the
    same outputs to rounding; 'auto' picks taps on this CPU."""
    assert C.implementation() == "taps" and jax.default_backend() == "cpu"
    sd, params = M.tiny_sd()
    x = jnp.asarray(RNG.randn(2, *M.latent_shape(sd, sd.resolution)), jnp.float32)
    t = jnp.asarray([10, 730], jnp.int32)
    ctx = M.text_embed(sd, params["text_encoder"], jnp.asarray(M.tokenize(sd, ["a photo", "a dog"])))
    img = jnp.asarray(RNG.uniform(-1, 1, (2, sd.resolution, sd.resolution, 3)), jnp.float32)
    vae = vae_lib.VAE(sd.vae, None)
    out = {}
    for impl in ("xla", "taps"):
        with C.using(impl):
            assert C.implementation() == impl
            unet = jax.jit(lambda p, x, t, c: M.unet_apply(sd, p, x, t, c))(params["unet"], x, t, ctx)
            mean = jax.jit(lambda p, x: vae_lib.posterior(vae, p, x)[0])(params["vae"], img)
            rec = jax.jit(lambda p, z: vae_lib.decode(vae, p, z))(params["vae"], mean)
            out[impl] = (unet, mean, rec)
    for a, b in zip(out["taps"], out["xla"]):
        assert_f32_close(a, b, depth=90)
    with pytest.raises(ValueError, match="one of"):
        with C.using("cudnn"):
            pass


def test_the_environment_picks_the_conv_and_using_overrides_it(monkeypatch):
    monkeypatch.setenv("LDU_JAX_SD_CONV", "xla")
    assert C.implementation() == "xla"
    with C.using("taps"):
        assert C.implementation() == "taps"
    monkeypatch.setenv("LDU_JAX_SD_CONV", "auto")
    assert C.implementation() == "taps"   # this CPU
    monkeypatch.setenv("LDU_JAX_SD_CONV", "cudnn")
    with pytest.raises(errors.ConfigError, match=r"\$LDU_JAX_SD_CONV='cudnn'"):
        C.implementation()


def test_map_subjects_equals_vmap():
    def f(state, shared, own):
        return {"y": jnp.tanh(state @ shared) + own.sum(), "n": jnp.sum(state)}
    state = jnp.asarray(RNG.randn(3, 4, 4), jnp.float32)
    shared = jnp.asarray(RNG.randn(4, 5), jnp.float32)
    own = jnp.asarray(RNG.randn(3, 2), jnp.float32)
    got = jax.jit(parallel.map_subjects(f, (0, None, 0)))(state, shared, own)
    want = jax.vmap(f, in_axes=(0, None, 0))(state, shared, own)
    jax.tree_util.tree_map(lambda a, b: assert_f32_close(a, b, depth=4), got, want)
    # on CPU a loop (one subject at a time), not a batched program
    jaxpr = str(jax.make_jaxpr(parallel.map_subjects(f, (0, None, 0)))(state, shared, own))
    assert "scan" in jaxpr
    with pytest.raises(ValueError, match="0 or None"):
        parallel.map_subjects(f, (1, None, 0))
