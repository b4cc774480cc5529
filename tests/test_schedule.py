"""Noise schedule, targets and DDIM against diffusers' PyTorch schedulers."""
import jax.numpy as jnp
import numpy as np
import pytest

from ldu_jax.sd import schedule as sch
from numerics import assert_f32_close

torch = pytest.importorskip("torch", reason="torch is a test-only dependency for parity checks")

# diffusers' alphas_cumprod: up to 1000 float32 products (and 1 - beta), one rounding each (ours: float64)
ACP = dict(depth=1000)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_and_targets_match_diffusers(prediction_type):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type=prediction_type)
    ours = sch.make_schedule({**sch.SD_SCHEDULER, "prediction_type": prediction_type})
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
    t = np.array([0, 500, 999])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    tol = assert_f32_close(sch.add_noise(ours, x0, noise, t), want, **ACP)
    assert np.abs(sch.add_noise(ours, x0, noise, t + [1, 1, 0]) - want).max() > 50 * tol   # t one off
    tgt = noise if prediction_type == "epsilon" else \
        ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert_f32_close(sch.target(ours, x0, noise, t), tgt, **ACP)


def _ddim_loop_matches(cfg, steps):
    """Our timesteps, alphas and whole DDIM loop (an arbitrary smooth 'network') against
    diffusers' DDIMScheduler.from_config(cfg) as StableDiffusionPipeline corrects it (its
    overrides are checked against the pipeline itself in test_sd_models)."""
    from diffusers import DDIMScheduler
    ref = DDIMScheduler.from_config({**cfg, **sch.SD_PIPELINE_OVERRIDES})
    ref.set_timesteps(steps)
    ours = sch.make_schedule(cfg)
    np.testing.assert_array_equal(sch.ddim_timesteps(ours, steps), ref.timesteps.numpy())
    assert_f32_close(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), scale=0, **ACP)   # relative
    assert_f32_close(ours.final_alpha_cumprod, float(ref.final_alpha_cumprod), depth=1)

    def model(x, t, tanh=torch.tanh):   # bounded
        return 0.8 * tanh(x) + 0.001 * t

    x = np.random.default_rng(1).standard_normal((2, 4, 4, 4)).astype(np.float32)
    xt, skip = torch.from_numpy(x), torch.from_numpy(x)
    for i, t in enumerate(ref.timesteps):
        xt = ref.step(model(xt, float(t)), t, xt).prev_sample
        skip = ref.step(model(skip, float(t)), t, skip).prev_sample if i else skip   # a step missing
    pred = lambda p, z, t, e: model(z, t[:, None, None, None].astype(jnp.float32), jnp.tanh)  # noqa: E731
    got = sch.ddim_sample(pred, {}, ours, jnp.asarray(x), jnp.zeros((2, 1)), jnp.zeros((2, 1)), steps=steps,
                          guidance=1.0)
    assert np.isfinite(xt.numpy()).all()
    # the alphas' roundings dominate the loop's ~10 x 6 operations; a step missing is far off
    tol = assert_f32_close(got, xt.numpy(), **ACP)
    assert np.abs(np.asarray(got) - skip.numpy()).max() > 50 * tol
    return ours


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_matches_diffusers_for_sd_schedules(prediction_type, spacing):
    """SD 1.x / 2.x (and their v-prediction and trailing fine-tunes): every prediction type and
    timestep spacing, with steps_offset 1 and set_alpha_to_one false as SD's config has them."""
    cfg = {**sch.SD_SCHEDULER, "prediction_type": prediction_type, "timestep_spacing": spacing}
    for steps in (10, 7):   # 7: the step ratio is not an integer
        _ddim_loop_matches(cfg, steps)


@pytest.mark.parametrize("cfg", [
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "leading", "prediction_type": "v_prediction",
     "set_alpha_to_one": True},
    {"beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": True},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"trained_betas": list(np.linspace(1e-4, 2e-2, 1000)), "prediction_type": "sample"},
], ids=["zero-snr-trailing", "zero-snr-leading", "cosine", "linear", "trained-betas"])
def test_ddim_matches_diffusers_for_other_keys(cfg):
    ours = _ddim_loop_matches({**sch.SD_SCHEDULER, **cfg}, 10)
    if cfg.get("rescale_betas_zero_snr"):
        assert float(ours.alphas_cumprod[-1]) == 0.0      # zero terminal SNR


def test_a_minimal_config_means_diffusers_defaults():
    """{} is diffusers' DDIMScheduler() (linear betas, set_alpha_to_one on), not Stable
    Diffusion's values; keys of other scheduler classes are ignored."""
    import inspect
    from diffusers import DDIMScheduler
    signature = inspect.signature(DDIMScheduler.__init__).parameters
    defaults = {k: p.default for k, p in signature.items() if k != "self"}
    assert sch.DDIM_DEFAULTS == defaults
    ours = _ddim_loop_matches({"_class_name": "PNDMScheduler", "skip_prk_steps": True}, 10)
    assert ours.final_alpha_cumprod == 1.0 and ours.steps_offset == 1   # the pipeline's offset
    assert abs(float(ours.alphas_cumprod[-1]) - float(sch.make_schedule(sch.SD_SCHEDULER).alphas_cumprod[-1])) > 1e-3


@pytest.mark.parametrize("key,value", [("beta_schedule", "sigmoid"), ("prediction_type", "flow"),
                                       ("timestep_spacing", "karras"), ("thresholding", True),
                                       ("trained_betas", [0.1, 0.2])])
def test_unsupported_values_are_named(key, value):
    with pytest.raises(ValueError, match=key):
        sch.make_schedule({**sch.SD_SCHEDULER, key: value})


def test_noise_loss_and_guidance():
    s = sch.make_schedule(sch.SD_SCHEDULER)
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
