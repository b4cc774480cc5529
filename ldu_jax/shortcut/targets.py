"""Training targets for shortcut models and naive flow matching.

Flow convention (as shortcut-models): x_t = (1 - (1 - 1e-5) t) x_0 + t x_1 with x_0 ~ N(0, I) noise
and x_1 data, t in [0, 1]; the velocity target is v = x_1 - (1 - 1e-5) x_0.

A target function is pure: ``fn(cfg, key, model_fn, images, labels, force_t=-1, force_dt=-1)``
returns ``Targets(x_t, v_t, t, dt_base, labels, info)``. ``model_fn(x, t, dt_base, labels)`` is the
network used for bootstrap targets (the EMA or the live parameters, closed over by the caller).
``cfg`` is the run's ``config.model`` (``denoise_timesteps``, ``bootstrap_every``,
``bootstrap_dt_bias``, ``bootstrap_cfg``, ``cfg_scale``, ``num_classes``, ``class_dropout_prob``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ldu_jax.errors import ConfigError

SIGMA_MIN = 1e-5


class Targets(NamedTuple):
    x_t: jax.Array
    v_t: jax.Array
    t: jax.Array
    dt_base: jax.Array
    labels: jax.Array
    info: dict


def interpolate(x_0, x_1, t):
    """Point on the flow path at time t ([B]) between noise x_0 and data x_1."""
    t = t.reshape((-1,) + (1,) * (x_1.ndim - 1))
    return (1 - (1 - SIGMA_MIN) * t) * x_0 + t * x_1


def velocity(x_0, x_1):
    return x_1 - (1 - SIGMA_MIN) * x_0


def _forced(value, forced):
    return jnp.where(forced != -1, jnp.asarray(forced, jnp.float32), value)


def _log2(n: int) -> int:
    k = int(np.log2(n))
    if 2 ** k != n:
        raise ConfigError(f"denoise_timesteps must be a power of two, got {n}")
    return k


def bootstrap_dt_base(bootstrap_size: int, denoise_timesteps: int, dt_bias: bool):
    """dt exponents of the bootstrap share: spread over log2(T)-1 ... 0, the remainder at 0.

    With ``dt_bias`` half of the share is spread over the finer exponents and a quarter each goes
    to exponents 1 and 0 (large steps). Returns (dt_base [bootstrap_size], rows per exponent).
    """
    sections = _log2(denoise_timesteps)
    if not dt_bias:
        per = bootstrap_size // sections
        dt = np.repeat(sections - 1 - np.arange(sections), per)
    else:
        per = (bootstrap_size // 2) // sections
        dt = np.concatenate([np.repeat(sections - 1 - np.arange(sections - 2), per),
                             np.ones(bootstrap_size // 4), np.zeros(bootstrap_size // 4)])
    dt = np.concatenate([dt, np.zeros(bootstrap_size - dt.shape[0])])
    return jnp.asarray(dt, jnp.float32), per


def _guided(model_fn, x, t, dt_base, labels, num_cfg: int, null_label: int, cfg_scale: float):
    """Velocity where the first ``num_cfg`` rows use classifier-free guidance, in one model call."""
    if num_cfg == 0:
        return model_fn(x, t, dt_base, labels)
    n = x.shape[0]
    null = jnp.full((num_cfg,), null_label, labels.dtype)
    v = model_fn(jnp.concatenate([x, x[:num_cfg]]), jnp.concatenate([t, t[:num_cfg]]),
                 jnp.concatenate([dt_base, dt_base[:num_cfg]]), jnp.concatenate([labels, null]))
    cond, uncond = v[:n], v[n:]
    return jnp.concatenate([uncond + cfg_scale * (cond[:num_cfg] - uncond), cond[num_cfg:]])


def _flow_part(cfg, key, images, labels, force_t):
    """Flow-matching pairs at the finest step on t's grid of ``denoise_timesteps``; label dropout."""
    drop_key, t_key, noise_key = jax.random.split(key, 3)
    n = images.shape[0]
    drop = jax.random.bernoulli(drop_key, cfg.class_dropout_prob, (n,))
    labels = jnp.where(drop, cfg.num_classes, labels)
    t = jax.random.randint(t_key, (n,), 0, cfg.denoise_timesteps).astype(jnp.float32) / cfg.denoise_timesteps
    t = _forced(t, force_t)
    x_0 = jax.random.normal(noise_key, images.shape, images.dtype)
    return interpolate(x_0, images, t), velocity(x_0, images), t, labels, jnp.mean(drop)


def shortcut_targets(cfg, key, model_fn: Callable, images, labels, force_t=-1, force_dt=-1) -> Targets:
    """Batch of shortcut targets: the first B // bootstrap_every rows self-consistency, the rest flow.

    Bootstrap rows: d = 2^-dt_base, t on the grid of d, two half steps of size d/2 with the model at
    dt_base + 1 (the intermediate x clipped to [-4, 4]), target = mean velocity clipped to [-4, 4].
    """
    b = images.shape[0]
    bst = b // cfg.bootstrap_every
    boot_key, flow_key = jax.random.split(key)
    t_key, noise_key = jax.random.split(boot_key)
    info = {}

    dt_base, per_dt = bootstrap_dt_base(bst, cfg.denoise_timesteps, bool(cfg.bootstrap_dt_bias))
    dt_base = _forced(dt_base, force_dt)
    d = 1.0 / 2.0 ** dt_base
    sections = 2.0 ** dt_base
    t = jnp.floor(jax.random.uniform(t_key, (bst,)) * sections) / sections
    t = _forced(t, force_t)
    x_1 = images[:bst]
    x_0 = jax.random.normal(noise_key, x_1.shape, x_1.dtype)
    x_t = interpolate(x_0, x_1, t)
    bst_labels = labels[:bst]
    num_cfg = per_dt if cfg.bootstrap_cfg else 0
    guided = lambda x, tt: _guided(model_fn, x, tt, dt_base + 1, bst_labels, num_cfg,  # noqa: E731
                                   cfg.num_classes, cfg.cfg_scale)
    half = (d / 2).reshape((-1,) + (1,) * (x_1.ndim - 1))
    v_b1 = guided(x_t, t)
    x_t2 = jnp.clip(x_t + half * v_b1, -4, 4)
    v_b2 = guided(x_t2, t + d / 2)
    v_boot = jax.lax.stop_gradient(jnp.clip((v_b1 + v_b2) / 2, -4, 4))

    fx_t, fv_t, ft, flabels, dropped = _flow_part(cfg, flow_key, images, labels, force_t)
    finest = float(_log2(cfg.denoise_timesteps))
    nf = b - bst
    out = Targets(
        x_t=jnp.concatenate([x_t, fx_t[:nf]]),
        v_t=jnp.concatenate([v_boot, fv_t[:nf]]),
        t=jnp.concatenate([t, ft[:nf]]),
        dt_base=jnp.concatenate([dt_base, jnp.full((nf,), finest, jnp.float32)]),
        labels=jnp.concatenate([bst_labels, flabels[:nf]]),
        info=info)
    info["bootstrap_ratio"] = jnp.mean(out.dt_base != finest)
    info["dropped_ratio"] = dropped
    info["v_magnitude_bootstrap"] = jnp.sqrt(jnp.mean(jnp.square(v_boot)))
    return out


def naive_targets(cfg, key, model_fn: Callable, images, labels, force_t=-1, force_dt=-1) -> Targets:
    """Plain flow matching on t's grid of ``denoise_timesteps``; dt_base is 0 (the model ignores it)."""
    del model_fn, force_dt
    x_t, v_t, t, labels, dropped = _flow_part(cfg, key, images, labels, force_t)
    return Targets(x_t, v_t, t, jnp.zeros_like(t), labels,
                   {"bootstrap_ratio": jnp.zeros(()), "dropped_ratio": dropped})


TARGETS = {"shortcut": shortcut_targets, "naive": naive_targets}


def get_targets(train_type: str):
    if train_type not in TARGETS:
        raise ConfigError(f"config.model.train_type must be one of {sorted(TARGETS)}, got {train_type!r}")
    return TARGETS[train_type]
