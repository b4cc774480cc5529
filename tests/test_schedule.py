"""Noise schedule, targets and DDIM against diffusers' PyTorch schedulers."""
import jax.numpy as jnp
import numpy as np
import pytest

from ldu_jax.sd import schedule as sch

torch = pytest.importorskip("torch", reason="torch is a test-only dependency for parity checks")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_and_targets_match_diffusers(prediction_type):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type=prediction_type)
    ours = sch.make_schedule({"prediction_type": prediction_type})
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
    t = np.array([0, 500, 999])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(sch.add_noise(ours, x0, noise, t), want, rtol=1e-5, atol=1e-6)
    tgt = noise if prediction_type == "epsilon" else \
        ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(sch.target(ours, x0, noise, t), tgt, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers(prediction_type):
    from diffusers import DDIMScheduler
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
               steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(10)
    ours = sch.make_schedule(cfg)
    np.testing.assert_array_equal(sch.ddim_timesteps(ours, 10), ref.timesteps.numpy())

    def model(x, t):  # an arbitrary smooth 'network'
        return 0.3 * x + 0.01 * t

    x = np.random.default_rng(1).standard_normal((2, 4, 4, 4)).astype(np.float32)
    xt = torch.from_numpy(x)
    for t in ref.timesteps:
        xt = ref.step(model(xt, float(t)), t, xt).prev_sample
    pred = lambda p, z, t, e: model(z, t[:, None, None, None].astype(jnp.float32))  # noqa: E731
    got = sch.ddim_sample(pred, {}, ours, jnp.asarray(x), jnp.zeros((2, 1)), jnp.zeros((2, 1)), steps=10,
                          guidance=1.0)
    np.testing.assert_allclose(np.asarray(got), xt.numpy(), rtol=1e-4, atol=1e-4)


def test_noise_loss_and_guidance():
    s = sch.make_schedule()
    x0 = jnp.ones((2, 2, 2, 1))
    noise = jnp.zeros_like(x0)
    t = jnp.array([10, 20])
    np.testing.assert_allclose(sch.noise_loss(s, noise + 0.5, x0, noise, t), [0.25, 0.25])
    calls = []

    def pred(p, z, tt, e):
        calls.append(z.shape[0])
        return z * 0 + e[:, :1, None, None]

    cond, uncond = jnp.ones((2, 1)), jnp.zeros((2, 1))
    g = sch.ddim_sample(pred, {}, s, x0, cond, uncond, steps=2, guidance=3.0)
    assert calls[-1] == 4  # conditional and unconditional rows in one batched call
    c3 = sch.ddim_sample(pred, {}, s, x0, cond * 3.0, uncond, steps=2, guidance=1.0)
    np.testing.assert_allclose(g, c3, rtol=1e-5)  # uncond + 3 (cond - uncond) == prediction 3
    with pytest.raises(ValueError, match="prediction_type"):
        sch.make_schedule({"prediction_type": "flow"})
