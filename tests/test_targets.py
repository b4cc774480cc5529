"""Shortcut and naive flow-matching targets, checked with analytic model functions."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldu_jax.shortcut import targets as T
from numerics import assert_f32_close

B, SHAPE = 64, (64, 4, 4, 2)


def cfg(**kw):
    c = dict(denoise_timesteps=128, bootstrap_every=4, bootstrap_dt_bias=0, bootstrap_cfg=0,
             cfg_scale=1.5, num_classes=10, class_dropout_prob=0.0)
    c.update(kw)
    return ml_collections.ConfigDict(c)


def const_velocity(value):
    """A model whose velocity is ``value`` everywhere (so bootstrap targets are known exactly)."""
    return lambda x, t, dt, y: jnp.full_like(x, value)


def data():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return jax.random.normal(k1, SHAPE), jax.random.randint(k2, (B,), 0, 10)


def test_bootstrap_share_and_dt_grid():
    images, labels = data()
    out = T.shortcut_targets(cfg(), jax.random.PRNGKey(1), const_velocity(0.5), images, labels)
    nb = B // 4
    assert float(out.info["bootstrap_ratio"]) == pytest.approx(nb / B)
    dt = np.asarray(out.dt_base)
    # 16 bootstrap rows over 7 exponents: 2 each for 6..0, then the remainder at 0.
    np.testing.assert_array_equal(dt[:nb], [6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0, 0, 0])
    assert (dt[nb:] == 7).all()
    # t of a bootstrap row lies on the grid of its step size d = 2^-dt, in [0, 1).
    t = np.asarray(out.t)
    sections = 2.0 ** dt[:nb]
    np.testing.assert_allclose(t[:nb] * sections, np.round(t[:nb] * sections), atol=1e-5)
    assert (t >= 0).all() and (t < 1).all()
    np.testing.assert_allclose(t[nb:] * 128, np.round(t[nb:] * 128), atol=1e-4)


def test_dt_bias_layout():
    dt, per = T.bootstrap_dt_base(32, 128, dt_bias=True)
    dt = np.asarray(dt)
    assert per == 2
    np.testing.assert_array_equal(dt[:10], [6, 6, 5, 5, 4, 4, 3, 3, 2, 2])
    assert (dt[10:18] == 1).sum() == 8 and (dt[18:] == 0).all()


def test_flow_target_formula_and_forced_t():
    images, labels = data()
    out = T.shortcut_targets(cfg(), jax.random.PRNGKey(1), const_velocity(0.0), images, labels, force_t=0.25)
    nb = B // 4
    assert np.allclose(np.asarray(out.t), 0.25)
    # Flow rows: x_t = (1 - (1-1e-5) t) x0 + t x1 and v = x1 - (1-1e-5) x0
    #   -> x_t = x1 * t + (1-(1-1e-5)t) (x1 - v)/(1-1e-5)
    x1 = np.asarray(images[:B - nb])
    x0 = (x1 - np.asarray(out.v_t[nb:])) / (1 - 1e-5)
    assert_f32_close(out.x_t[nb:], (1 - (1 - 1e-5) * 0.25) * x0 + 0.25 * x1, depth=4)  # x_t, v, x0 back, x_t
    assert abs(float(x0.std()) - 1.0) < 0.1  # the noise is standard normal


def test_bootstrap_target_is_mean_of_two_half_steps():
    images, labels = data()
    seen = []

    def model(x, t, dt, y):  # velocity depends on t, so the two half steps differ
        seen.append(dt)
        return jnp.broadcast_to(t[:, None, None, None], x.shape) * 2.0

    out = T.shortcut_targets(cfg(), jax.random.PRNGKey(1), model, images, labels)
    nb = B // 4
    t, dt = np.asarray(out.t[:nb]), np.asarray(out.dt_base[:nb])
    d = 2.0 ** -dt
    want = np.clip((2 * t + 2 * (t + d / 2)) / 2, -4, 4)
    np.testing.assert_allclose(np.asarray(out.v_t[:nb]).reshape(nb, -1).mean(1), want, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(seen[0]), dt + 1)  # the model is asked at dt_base + 1
    # force_dt overrides the exponent
    out = T.shortcut_targets(cfg(), jax.random.PRNGKey(1), const_velocity(9.0), images, labels, force_dt=3)
    assert (np.asarray(out.dt_base[:nb]) == 3).all()
    assert np.allclose(np.asarray(out.v_t[:nb]), 4.0)  # clipped to [-4, 4]


def test_bootstrap_cfg_and_label_dropout():
    images, labels = data()

    def model(x, t, dt, y):  # conditional rows give 1, null rows give 0
        return jnp.broadcast_to((y != 10).astype(x.dtype)[:, None, None, None], x.shape)

    out = T.shortcut_targets(cfg(bootstrap_cfg=1), jax.random.PRNGKey(1), model, images, labels)
    v = np.asarray(out.v_t[:16]).reshape(16, -1).mean(1)
    # The first bootstrap_size // log2(T) = 2 rows are guided: 0 + 1.5 * (1 - 0) = 1.5.
    np.testing.assert_allclose(v, [1.5, 1.5] + [1.0] * 14)
    out = T.shortcut_targets(cfg(class_dropout_prob=1.0), jax.random.PRNGKey(1), model, images, labels)
    assert (np.asarray(out.labels[16:]) == 10).all()  # flow rows dropped to the null class
    np.testing.assert_array_equal(out.labels[:16], labels[:16])  # bootstrap rows keep their labels


def test_naive_targets():
    images, labels = data()
    out = T.naive_targets(cfg(), jax.random.PRNGKey(2), None, images, labels)
    assert (np.asarray(out.dt_base) == 0).all()
    t = np.asarray(out.t)
    np.testing.assert_allclose(t * 128, np.round(t * 128), atol=1e-4)
    assert len(np.unique(t)) > 10
    with pytest.raises(ValueError, match="train_type"):
        T.get_targets("consistency")
    with pytest.raises(ValueError, match="power of two"):
        T.shortcut_targets(cfg(denoise_timesteps=100), jax.random.PRNGKey(1), const_velocity(0), images, labels)
