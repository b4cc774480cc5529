"""The training loop every trainer shares: steps, metrics.jsonl, tqdm, checkpoints, NaN guard."""
from __future__ import annotations

import itertools
import json
import os
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from tqdm import tqdm

from ldu_jax import checkpoint as ckpt
from ldu_jax import parallel
from ldu_jax.errors import UserError


class TrainingDiverged(UserError, RuntimeError):
    """The loss went NaN / inf: the message names the step; a lower learning rate is the usual fix."""


def append_jsonl(path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@jax.jit
def _accumulate(good, sums, info):
    """(all losses finite so far, running sums of ``info``): one dispatch per step instead of an
    eager op per metric on the device-sharded outputs."""
    sums = info if sums is None else jax.tree_util.tree_map(jnp.add, sums, info)
    return jnp.logical_and(good, jnp.isfinite(info["loss"])), sums


def train_loop(state, update: Callable, batches: Iterator[tuple], *, manager, meta: dict, workdir: str,
               max_steps: int, log_every: int, save_every: int, batch_size: int, desc: str = "train",
               after_step: Callable[[int, object], None] | None = None):
    """Run ``state, info = update(state, *next(batches))`` from ``state.step`` to ``max_steps``.

    Every ``log_every`` steps the mean of ``info`` (plus step and images/s) is appended to
    ``workdir/metrics.jsonl``; every ``save_every`` steps and at the end the state is saved. A
    non-finite ``info['loss']`` stops the run before anything after it is saved, so the last
    checkpoint on disk is a good one. ``after_step(step, state)`` runs after each step (samples).
    """
    start = int(state.step)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    good = jnp.array(True)
    sums, count, t_last = None, 0, time.time()
    last_saved = start if manager.latest_step() is not None else None

    def check_finite(step):
        if not bool(good):
            kept = f"step {last_saved}" if last_saved is not None else "none was written"
            raise TrainingDiverged(f"loss became NaN or inf before step {step}; stopped. The last good "
                                   f"checkpoint ({kept}) is kept in {workdir}.")

    bar = tqdm(range(start, max_steps), initial=start, total=max_steps, desc=desc, dynamic_ncols=True,
               disable=jax.process_index() != 0)
    try:
        for step in bar:
            state, info = update(state, *next(batches))
            good, sums = _accumulate(good, sums, info)
            count += 1
            done = step + 1
            if done % log_every == 0 or done == max_steps:
                check_finite(done)
                avg = {k: float(v) / count for k, v in jax.device_get(sums).items()}
                now = time.time()
                avg.update(step=done, img_per_s=count * batch_size / max(now - t_last, 1e-9))
                if jax.process_index() == 0:
                    append_jsonl(metrics_path, avg)
                bar.set_postfix(loss=f"{avg['loss']:.4f}")
                sums, count, t_last = None, 0, now
            if done % save_every == 0 or done == max_steps:
                check_finite(done)
                ckpt.save(manager, done, state, meta)
                last_saved = done
            if after_step is not None:
                after_step(done, state)
    finally:
        manager.wait_until_finished()
    return state


def compile_first(update, state, batches: Iterator[tuple], name: str):
    """(update, batches) ready for ``train_loop`` across hosts: ``update`` compiled on the first
    batch, then a barrier, so the steps' collectives start together however long each host took to
    compile (``parallel.sync``); in one process, both as given."""
    if jax.process_count() == 1:
        return update, batches
    first = next(batches)
    update = update.lower(state, *first).compile()
    parallel.sync(f"{name}: compiled")
    return update, itertools.chain([first], batches)


def init_or_restore(init_fn, key, shardings, manager, meta: dict, workdir: str, log=print, jit_init=True):
    """The newest checkpoint of ``workdir`` if any (checked against ``meta``), else ``init_fn(key)``.

    ``jit_init`` creates the state directly in its shardings; without it ``init_fn`` runs eagerly
    (for states built from large arrays it closes over, which jit would bake in as constants) and
    its leaves are copied, so a step that donates the state never deletes the caller's arrays.
    """
    abstract = jax.eval_shape(init_fn, key)
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
    state = ckpt.restore_latest(manager, target, meta, workdir)
    if state is None:
        if jit_init:
            return jax.jit(init_fn, out_shardings=shardings)(key)
        state = parallel.put(init_fn(key), shardings)
        return jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    log(f"resuming {workdir} from step {int(state.step)}")
    return state
