"""k-step denoising (noise -> data) and inversion (data -> noise) with a shortcut model.

``apply_fn(params, x, t, dt_base, labels) -> v`` is the velocity network. Denoising is Euler on the
grid t_i = i / k with step d = 1 / k and step-size exponent dt_base = log2(k):

    x_{i+1} = x_i + d * v(x_i, t_i, log2 k)

``invert`` integrates the same discretisation backwards: x_i = x_{i+1} - d * v(x_i, t_i, log2 k),
where the unknown x_i inside v starts from x_{i+1} and is refined by ``fixed_point_iters``
fixed-point iterations (0: one explicit backward step; more: closer to the exact inverse of the
Euler step). So denoise(invert(x)) -> x as k grows, and as the iterations grow for a fixed k.

Both are jitted; the step loop is a ``lax.scan`` (one loop in the jaxpr, not k copies) and both are
differentiable with respect to x and params. Classifier-free guidance evaluates the conditional
and null-label rows in one batched call.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ldu_jax.errors import ConfigError


def _check_steps(steps: int):
    if steps < 1 or 2 ** int(np.log2(steps)) != steps:
        raise ConfigError(f"the number of steps must be a power of two (1, 2, 4, ...), got {steps}")


def guided_velocity(apply_fn, params, x, t, dt_base, labels, cfg_scale, null_label):
    """v, with classifier-free guidance v_u + s (v_c - v_u) when ``cfg_scale`` is not None."""
    b = x.shape[0]
    t = jnp.broadcast_to(t, (b,))
    dt_base = jnp.broadcast_to(dt_base, (b,))
    if cfg_scale is None:
        return apply_fn(params, x, t, dt_base, labels)
    null = jnp.full_like(labels, null_label)
    v = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                 jnp.concatenate([dt_base, dt_base]), jnp.concatenate([labels, null]))
    cond, uncond = v[:b], v[b:]
    return uncond + cfg_scale * (cond - uncond)


@partial(jax.jit, static_argnames=("apply_fn", "steps", "cfg_scale", "null_label", "start"))
def denoise(apply_fn, params, x, labels, *, steps: int, cfg_scale=None, null_label: int = 0, start: int = 0):
    """Integrate noise x (t = 0) to data (t = 1) in ``steps`` Euler steps of the shortcut model.

    ``start`` > 0 begins at t = start / steps with a partly noised x (DiffPure), running the
    remaining steps of the same grid."""
    _check_steps(steps)
    if not 0 <= start <= steps:
        raise ValueError(f"start must be in [0, {steps}], got {start}")
    d = 1.0 / steps
    dt_base = jnp.float32(np.log2(steps))

    def step(x, i):
        v = guided_velocity(apply_fn, params, x, i * d, dt_base, labels, cfg_scale, null_label)
        return x + d * v.astype(x.dtype), None

    x, _ = jax.lax.scan(step, x, jnp.arange(start, steps, dtype=jnp.float32))
    return x


@partial(jax.jit, static_argnames=("apply_fn", "steps", "cfg_scale", "null_label", "fixed_point_iters"))
def invert(apply_fn, params, x, labels, *, steps: int, cfg_scale=None, null_label: int = 0,
           fixed_point_iters: int = 0):
    """Integrate data x (t = 1) back to noise (t = 0) through the same k-step Euler grid."""
    _check_steps(steps)
    d = 1.0 / steps
    dt_base = jnp.float32(np.log2(steps))

    def step(x_next, i):
        t = i * d
        def vel(z):
            return guided_velocity(apply_fn, params, z, t, dt_base, labels, cfg_scale, null_label).astype(x_next.dtype)
        x_prev = x_next - d * vel(x_next)
        for _ in range(fixed_point_iters):
            x_prev = x_next - d * vel(x_prev)
        return x_prev, None

    x, _ = jax.lax.scan(step, x, jnp.arange(steps - 1, -1, -1, dtype=jnp.float32))
    return x
