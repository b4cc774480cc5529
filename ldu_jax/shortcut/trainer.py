"""The shortcut-model train step as pure functions: optimizer, state, one jit-able update."""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ldu_jax.errors import ConfigError
from ldu_jax.shortcut.targets import get_targets


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    params_ema: Any
    opt_state: Any


def make_optimizer(optim_cfg, max_steps: int):
    """AdamW with a constant or warmup-cosine schedule and optional global-norm clipping."""
    if optim_cfg.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, optim_cfg.lr, optim_cfg.warmup, max(max_steps, 1))
    elif optim_cfg.schedule == "constant":
        schedule = (optax.linear_schedule(0.0, optim_cfg.lr, optim_cfg.warmup) if optim_cfg.warmup > 0
                    else optax.constant_schedule(optim_cfg.lr))
    else:
        raise ConfigError(f"config.optim.schedule must be 'constant' or 'cosine', got {optim_cfg.schedule!r}")
    adamw = optax.adamw(schedule, b1=optim_cfg.beta1, b2=optim_cfg.beta2, weight_decay=optim_cfg.weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw) if optim_cfg.grad_clip > 0 else adamw
    return tx, schedule


def init_state(model, tx, key, example_shape) -> TrainState:
    b = example_shape[0]
    params = model.init(key, jnp.zeros(example_shape), jnp.zeros((b,)), jnp.zeros((b,)),
                        jnp.zeros((b,), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, params_ema=params, opt_state=tx.init(params))


@functools.lru_cache(maxsize=None)
def make_apply(model):
    """apply_fn(params, x, t, dt_base, labels) -> v, the signature the samplers take."""
    def apply_fn(params, x, t, dt_base, labels):
        return model.apply({"params": params}, x, t, dt_base, labels)
    return apply_fn


def make_train_step(model, tx, schedule, model_cfg, ema_rate: float, seed: int):
    """Returns ``step(state, images, labels) -> (state, info)``, pure and jit-able.

    The step's randomness is ``fold_in(PRNGKey(seed), state.step)``, so a resumed run draws the same
    keys as an unbroken one. The batch is permuted first (which rows get bootstrap targets is
    random), labels become the null class when ``cfg_scale == 0`` (unconditional), and the loss is
    the per-example mean squared velocity error averaged over the batch.
    """
    targets_fn = get_targets(model_cfg.train_type)

    def step(state: TrainState, images, labels):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        perm_key, targets_key, dropout_key = jax.random.split(key, 3)
        perm = jax.random.permutation(perm_key, images.shape[0])
        images, labels = images[perm], labels[perm]
        if model_cfg.cfg_scale == 0:
            labels = jnp.full_like(labels, model_cfg.num_classes)
        boot_params = state.params_ema if model_cfg.bootstrap_ema else state.params

        def boot_fn(x, t, dt, y):
            return model.apply({"params": boot_params}, x, t, dt, y)

        tg = targets_fn(model_cfg, targets_key, boot_fn, images, labels)
        nb = images.shape[0] // model_cfg.bootstrap_every if model_cfg.train_type == "shortcut" else 0

        def loss_fn(params):
            v = model.apply({"params": params}, tg.x_t, tg.t, tg.dt_base, tg.labels, train=True,
                            rngs={"dropout": dropout_key})
            per_ex = jnp.mean(jnp.square(v.astype(jnp.float32) - tg.v_t), axis=tuple(range(1, v.ndim)))
            aux = {"loss_flow": jnp.mean(per_ex[nb:])}
            if nb:
                aux["loss_bootstrap"] = jnp.mean(per_ex[:nb])
            return jnp.mean(per_ex), aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params_ema = jax.tree_util.tree_map(lambda e, p: ema_rate * e + (1 - ema_rate) * p, state.params_ema, params)
        info = {"loss": loss, **aux, **tg.info, "grad_norm": optax.tree.norm(grads),
                "param_norm": optax.tree.norm(params), "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, params_ema, opt_state), info

    return step
