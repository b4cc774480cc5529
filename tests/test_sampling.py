"""denoise / invert on analytic velocity fields with known flows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldu_jax.shortcut.sampling import denoise, invert
from numerics import assert_f32_close

LABELS = jnp.zeros((3,), jnp.int32)


def linear_field(params, x, t, dt, y):
    """dx/dt = a x + b t: the exact flow from t = 0 to 1 is known in closed form."""
    return params["a"] * x + params["b"] * t[:, None, None, None]


def exact_flow(x0, a, b):
    # x(t) = e^{at} x0 + b (e^{at} - 1 - a t) / a^2, at t = 1
    return np.exp(a) * x0 + b * (np.exp(a) - 1 - a) / a ** 2


P = {"a": jnp.float32(0.8), "b": jnp.float32(0.5)}
X = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))


def test_denoise_converges_to_exact_flow():
    exact = exact_flow(np.asarray(X), 0.8, 0.5)
    errs = [float(np.abs(np.asarray(denoise(linear_field, P, X, LABELS, steps=k)) - exact).max())
            for k in (1, 4, 16, 128)]
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.02 and errs[0] > 0.2


def test_invert_then_denoise_error_falls_with_k():
    errs = []
    for k in (1, 2, 4, 16, 256):
        z = invert(linear_field, P, X, LABELS, steps=k)
        errs.append(float(jnp.abs(denoise(linear_field, P, z, LABELS, steps=k) - X).max()))
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.01
    # inversion lands near the exact backward flow: denoising the exact x0 gives X
    z = np.asarray(invert(linear_field, P, X, LABELS, steps=128))
    np.testing.assert_allclose(exact_flow(z, 0.8, 0.5), np.asarray(X), atol=0.02)


def test_fixed_point_iterations_make_inversion_exact_for_the_discretisation():
    z0 = invert(linear_field, P, X, LABELS, steps=4)
    z5 = invert(linear_field, P, X, LABELS, steps=4, fixed_point_iters=8)
    e0 = float(jnp.abs(denoise(linear_field, P, z0, LABELS, steps=4) - X).max())
    e5 = float(jnp.abs(denoise(linear_field, P, z5, LABELS, steps=4) - X).max())
    assert e5 < 1e-4 < e0


def test_shortcut_conditioning_and_cfg():
    def field(params, x, t, dt, y):
        return jnp.where((y == 5)[:, None, None, None], 0.0, 1.0) + 0 * x

    out = denoise(field, {}, X, LABELS, steps=4, cfg_scale=3.0, null_label=5)
    # conditional v = 1, null v = 0 -> guided v = 0 + 3 (1 - 0) = 3 over unit time
    assert_f32_close(out, X + 3.0, depth=4)  # one rounding per step
    # the step-size exponent given to the model is log2(k): with v = dt_base, x moves by log2(k)
    by_dt = lambda p, x, t, dt, y: jnp.broadcast_to(dt[:, None, None, None], x.shape)  # noqa: E731
    assert_f32_close(denoise(by_dt, {}, X, LABELS, steps=8), X + 3.0, depth=8)
    with pytest.raises(ValueError, match="power of two"):
        denoise(field, {}, X, LABELS, steps=3)


def test_gradients_flow_through_both_and_loop_is_one_scan():
    def loss(params, x):
        return jnp.sum(denoise(linear_field, params, invert(linear_field, params, x, LABELS, steps=4),
                               LABELS, steps=4) ** 2)

    gp, gx = jax.grad(loss, argnums=(0, 1))(P, X)
    assert abs(float(gp["a"])) > 1e-3 and float(jnp.abs(gx).max()) > 1e-3
    # finite-difference check of d loss / d a
    eps = 1e-3
    fd = (loss({**P, "a": P["a"] + eps}, X) - loss({**P, "a": P["a"] - eps}, X)) / (2 * eps)
    assert float(gp["a"]) == pytest.approx(float(fd), rel=2e-2)
    jaxpr = str(jax.make_jaxpr(lambda x: denoise(linear_field, P, x, LABELS, steps=64))(X))
    assert jaxpr.count("scan[") == 1 and "length=64" in jaxpr
