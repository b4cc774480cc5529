"""DDPM noise schedule, the noise-prediction loss, and DDIM sampling with guidance, as pure JAX.

Our own small implementation (diffusers' Flax schedulers are avoided: ``FlaxDDPMScheduler.step``
calls ``jnp.clip(a_min=...)``, removed in jax 0.10, and ``FlaxLMSDiscreteScheduler`` returns NaN).
A ``scheduler_config`` means what diffusers' ``StableDiffusionPipeline`` makes of it with a DDIM
scheduler: ``DDIMScheduler.from_config`` (``DDIM_DEFAULTS`` for missing keys; keys of other
scheduler classes ignored, as diffusers ignores them), then the pipeline's own corrections
(``SD_PIPELINE_OVERRIDES``: it never clips latents and always offsets steps by 1), eta = 0. A value
we do not implement is an error naming the key.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ldu_jax.errors import ConfigError

# diffusers' DDIMScheduler.__init__ defaults (a test holds them to diffusers' signature)
DDIM_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                 "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
                 "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
                 "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
                 "rescale_betas_zero_snr": False}
# Stable Diffusion 1.x / 2.x's scheduler_config (2.x 768 px: prediction_type v_prediction): the
# schedule of the models this project makes (tiny bundles, the mini-world)
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "prediction_type": "epsilon", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
                "timestep_spacing": "leading"}
# StableDiffusionPipeline.__init__ rewrites these in any scheduler config (with a deprecation
# notice): clipping x0 to [-1, 1] is meant for pixels, not latents
SD_PIPELINE_OVERRIDES = {"steps_offset": 1, "clip_sample": False}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@flax.struct.dataclass
class Schedule:
    """A pytree: the cumulative alphas are an array leaf, the rest static."""
    alphas_cumprod: jax.Array   # [T]
    prediction_type: str = flax.struct.field(pytree_node=False)
    steps_offset: int = flax.struct.field(pytree_node=False)
    final_alpha_cumprod: float = flax.struct.field(pytree_node=False)
    timestep_spacing: str = flax.struct.field(pytree_node=False, default="leading")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def _one_of(c, key, allowed):
    if c[key] not in allowed:
        raise ConfigError(f"scheduler config: unsupported {key} {c[key]!r} (supported: {', '.join(map(str, allowed))})")


def _cosine_betas(t: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's squaredcos_cap_v2: betas from alpha_bar(s) = cos((s + 0.008) / 1.008 pi / 2)^2."""
    bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - bar((i + 1) / t) / bar(i / t), max_beta) for i in range(t)], np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024: shift and scale sqrt(alpha_bar) so the last step has zero SNR, the first unchanged."""
    s = np.sqrt(np.cumprod(1.0 - betas))
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    bar = s ** 2
    return 1.0 - np.concatenate([bar[:1], bar[1:] / bar[:-1]])


def make_schedule(cfg: dict) -> Schedule:
    """A schedule from a diffusers ``scheduler_config`` dict, as Stable Diffusion's pipeline reads
    it (see the module doc): missing keys take ``DDIM_DEFAULTS`` (so ``{}`` is diffusers' default
    DDIM, not Stable Diffusion's schedule: that is ``SD_SCHEDULER``)."""
    c = {**DDIM_DEFAULTS, **{k: v for k, v in cfg.items() if k in DDIM_DEFAULTS}, **SD_PIPELINE_OVERRIDES}
    for key, allowed in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                         ("timestep_spacing", TIMESTEP_SPACINGS)):
        _one_of(c, key, allowed)
    if c["thresholding"]:
        raise ConfigError("scheduler config: thresholding=true (dynamic thresholding, for pixel-space models) "
                          "is not supported")
    t = int(c["num_train_timesteps"])
    if c["trained_betas"] is not None:
        betas = np.asarray(c["trained_betas"], np.float64)
        if betas.shape != (t,):
            raise ConfigError(f"scheduler config: trained_betas has {betas.size} values, num_train_timesteps is {t}")
    elif c["beta_schedule"] == "scaled_linear":
        betas = np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, t, dtype=np.float64) ** 2
    elif c["beta_schedule"] == "linear":
        betas = np.linspace(c["beta_start"], c["beta_end"], t, dtype=np.float64)
    else:
        betas = _cosine_betas(t)
    if c["rescale_betas_zero_snr"]:
        betas = rescale_zero_terminal_snr(betas)
    acp = np.cumprod(1.0 - betas)
    final = 1.0 if c["set_alpha_to_one"] else float(acp[0])
    return Schedule(jnp.asarray(acp, jnp.float32), c["prediction_type"], int(c["steps_offset"]), final,
                    c["timestep_spacing"])


def _coef(acp, t, ndim):
    a = acp[t].reshape((-1,) + (1,) * (ndim - 1))
    return jnp.sqrt(a), jnp.sqrt(1.0 - a)


def add_noise(sched: Schedule, x0, noise, t):
    """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise, t integer [B]."""
    sa, s1a = _coef(sched.alphas_cumprod, t, x0.ndim)
    return sa * x0 + s1a * noise


def target(sched: Schedule, x0, noise, t):
    """What the network should predict: the noise, the velocity v = sqrt(a) eps - sqrt(1-a) x0, or x0."""
    if sched.prediction_type == "epsilon":
        return noise
    if sched.prediction_type == "v_prediction":
        sa, s1a = _coef(sched.alphas_cumprod, t, x0.ndim)
        return sa * noise - s1a * x0
    return x0


def noise_loss(sched: Schedule, pred, x0, noise, t):
    """Per-example mean squared error of the prediction against its target (f32)."""
    err = jnp.square(pred.astype(jnp.float32) - target(sched, x0, noise, t).astype(jnp.float32))
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def to_x0_eps(sched: Schedule, pred, x_t, t):
    """(x0, eps) implied by a prediction at x_t."""
    sa, s1a = _coef(sched.alphas_cumprod, t, x_t.ndim)
    if sched.prediction_type == "epsilon":
        return (x_t - s1a * pred) / sa, pred
    if sched.prediction_type == "v_prediction":
        return sa * x_t - s1a * pred, sa * pred + s1a * x_t
    return pred, (x_t - sa * pred) / s1a


def ddim_timesteps(sched: Schedule, steps: int) -> np.ndarray:
    """Descending DDIM timesteps, spaced as diffusers' ``timestep_spacing`` (Lin et al. 2024, table 2)."""
    t = sched.num_train_timesteps
    if not 1 <= steps <= t:
        raise ConfigError(f"{steps} DDIM steps: between 1 and the {t} training timesteps")
    if sched.timestep_spacing == "linspace":
        ts = np.linspace(0, t - 1, steps).round()[::-1]
    elif sched.timestep_spacing == "leading":
        ts = (np.arange(steps) * (t // steps)).round()[::-1] + sched.steps_offset
    else:   # trailing
        ts = np.round(np.arange(t, 0, -t / steps)) - 1
    return ts.astype(np.int32)


@partial(jax.jit, static_argnames=("predict", "steps", "guidance"))
def ddim_sample(predict: Callable, params, sched: Schedule, x_T, cond, uncond, *, steps: int, guidance: float):
    """Deterministic DDIM (eta 0) from noise x_T, one jitted ``lax.scan`` over the steps.

    ``predict(params, latents, t [B], text_emb) -> prediction``. With ``guidance != 1`` the
    conditional and unconditional (``uncond``) branches run in one batched call and combine as
    uncond + g (cond - uncond); with ``guidance == 1`` only the conditional branch runs.
    """
    ts = ddim_timesteps(sched, steps)
    return _ddim_scan(predict, params, sched, x_T, ts, ts - sched.num_train_timesteps // steps, cond, uncond, guidance)


def diffpure_timesteps(num_train_timesteps: int, strength, steps: int):
    """``steps`` descending timesteps from t* = strength (T - 1) to 0, for DiffPure (``strength``
    may be traced, so one compilation serves every strength)."""
    t_star = jnp.round(strength * (num_train_timesteps - 1))
    return jnp.round(jnp.linspace(t_star, 0.0, steps)).astype(jnp.int32)


@partial(jax.jit, static_argnames=("predict", "guidance"))
def ddim_from(predict: Callable, params, sched: Schedule, x_t, timesteps, cond, uncond, *, guidance: float = 1.0):
    """DDIM (eta 0) from a noisy x at ``timesteps[0]`` down to clean, through the given descending
    timesteps (e.g. ``diffpure_timesteps``); the last step lands on x0."""
    ts = jnp.asarray(timesteps, jnp.int32)
    prevs = jnp.concatenate([ts[1:], jnp.full((1,), -1, jnp.int32)])
    return _ddim_scan(predict, params, sched, x_t, ts, prevs, cond, uncond, guidance)


def _ddim_scan(predict, params, sched, x, ts, prevs, cond, uncond, guidance):
    b = x.shape[0]
    acp = sched.alphas_cumprod

    def step(x, tp):
        t, t_prev = tp[0], tp[1]
        tb = jnp.full((b,), t, jnp.int32)
        if guidance == 1.0:
            pred = predict(params, x, tb, cond)
        else:
            both = predict(params, jnp.concatenate([x, x]), jnp.concatenate([tb, tb]),
                           jnp.concatenate([cond, uncond]))
            pc, pu = both[:b], both[b:]
            pred = pu + guidance * (pc - pu)
        x0, eps = to_x0_eps(sched, pred, x, tb)
        a_prev = jnp.where(t_prev >= 0, acp[jnp.maximum(t_prev, 0)], sched.final_alpha_cumprod)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps, None

    x, _ = jax.lax.scan(step, x, jnp.stack([jnp.asarray(ts, jnp.int32), jnp.asarray(prevs, jnp.int32)], 1))
    return x
