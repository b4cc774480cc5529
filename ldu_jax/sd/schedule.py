"""DDPM noise schedule, the noise-prediction loss, and DDIM sampling with guidance, as pure JAX.

Our own small implementation (diffusers' Flax schedulers are avoided: ``FlaxDDPMScheduler.step``
calls ``jnp.clip(a_min=...)``, removed in jax 0.10, and ``FlaxLMSDiscreteScheduler`` returns NaN).
Conventions follow diffusers' PyTorch schedulers for Stable Diffusion: ``scaled_linear`` betas
(linear in sqrt space), DDIM ``leading`` timestep spacing with ``steps_offset``, eta = 0.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import flax
import jax
import jax.numpy as jnp
import numpy as np

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                    "prediction_type": "epsilon", "steps_offset": 1, "set_alpha_to_one": False}


@flax.struct.dataclass
class Schedule:
    """A pytree: the cumulative alphas are an array leaf, the rest static."""
    alphas_cumprod: jax.Array   # [T]
    prediction_type: str = flax.struct.field(pytree_node=False)
    steps_offset: int = flax.struct.field(pytree_node=False)
    final_alpha_cumprod: float = flax.struct.field(pytree_node=False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def make_schedule(cfg: dict | None = None) -> Schedule:
    """A schedule from a diffusers ``scheduler_config`` dict (missing keys: Stable Diffusion's)."""
    c = {**SD_SCHEDULER, **(cfg or {})}
    t = int(c["num_train_timesteps"])
    if c["beta_schedule"] == "scaled_linear":
        betas = np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, t, dtype=np.float64) ** 2
    elif c["beta_schedule"] == "linear":
        betas = np.linspace(c["beta_start"], c["beta_end"], t, dtype=np.float64)
    else:
        raise ValueError(f"unsupported beta_schedule {c['beta_schedule']!r} (scaled_linear or linear)")
    if c["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {c['prediction_type']!r}")
    acp = np.cumprod(1.0 - betas)
    final = 1.0 if c.get("set_alpha_to_one", False) else float(acp[0])
    return Schedule(jnp.asarray(acp, jnp.float32), c["prediction_type"], int(c.get("steps_offset", 0)), final)


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
    """Descending DDIM timesteps with diffusers' 'leading' spacing."""
    ratio = sched.num_train_timesteps // steps
    if ratio < 1:
        raise ValueError(f"{steps} DDIM steps exceed the {sched.num_train_timesteps} training timesteps")
    return (np.arange(steps) * ratio)[::-1].astype(np.int32) + sched.steps_offset


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
