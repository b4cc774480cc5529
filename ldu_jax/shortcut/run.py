"""The shortcut-model training run behind ``train.py``: data, sharding, loop, logs, checkpoints."""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from ldu_jax import checkpoint as ckpt
from ldu_jax import data as data_lib
from ldu_jax import parallel
from ldu_jax.models.dit import dit_from_config
from ldu_jax.shortcut import sampling, trainer


class TrainingDiverged(RuntimeError):
    pass


def pixel_batches(config, start_step: int, local_batch: int, log=print):
    """(iterator of (images [-1,1] NHWC, labels), close_fn) for this host, batch k = f(seed, k)."""
    pi, pc = jax.process_index(), jax.process_count()
    ds = config.dataset
    if ds == "synthetic":
        it = data_lib.synthetic_batches(local_batch, config.image_size, 3, config.seed * 1000 + pi, start_step)
        return ((x, np.zeros(local_batch, np.int32)) for x in it), lambda: None
    if ds.startswith("tfds:"):
        return _tfds_batches(ds[5:], config, local_batch, pi, pc), lambda: None
    folder = data_lib.ImageFolder(ds, config.image_size, process_index=pi, process_count=pc, log=log)
    it = folder.batches(local_batch, config.seed, flip=config.random_flip, start_step=start_step)

    def close():
        if folder.bad:
            data_lib.report_bad(folder.bad, len(folder.paths), log)
    return ((x, np.zeros(local_batch, np.int32)) for x in it), close


def _tfds_batches(name, config, local_batch, pi, pc):
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise data_lib.DataError(f"dataset tfds:{name} needs tensorflow and tensorflow-datasets installed") from e
    size = config.image_size

    def prep(ex):
        img = tf.cast(ex["image"], tf.float32)
        h, w = tf.shape(img)[0], tf.shape(img)[1]
        s = tf.minimum(h, w)
        img = tf.image.crop_to_bounding_box(img, (h - s) // 2, (w - s) // 2, s, s)
        img = tf.image.resize(img, (size, size), antialias=True) / 127.5 - 1.0
        if config.random_flip:
            img = tf.image.random_flip_left_right(img)
        return img, tf.cast(ex.get("label", 0), tf.int32)

    ds = tfds.load(name, split="train", shuffle_files=True).shard(pc, pi).repeat().shuffle(10_000, seed=config.seed)
    return iter(tfds.as_numpy(ds.map(prep).batch(local_batch, drop_remainder=True)))


def _append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config, workdir: str, log=print):
    """Train (or resume) the run in ``workdir``; returns the final train state."""
    parallel.maybe_initialize_distributed(config.distributed)
    mesh = parallel.make_mesh()
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if config.batch_size % n_dev:
        raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the {n_dev} devices")
    local_batch = config.batch_size // n_proc
    os.makedirs(workdir, exist_ok=True)

    vae = None
    if config.vae != "none":
        from ldu_jax.sd import vae as vae_lib
        vae = vae_lib.load_vae(config.vae)
        if config.image_size % vae.factor:
            raise ValueError(f"config.image_size={config.image_size} must be divisible by the VAE factor {vae.factor}")
        data_shape = (config.image_size // vae.factor,) * 2 + (vae.latent_channels,)
    else:
        data_shape = (config.image_size, config.image_size, 3)

    model = dit_from_config(config.model, data_shape[-1])
    tx, schedule = trainer.make_optimizer(config.optim, config.max_steps)
    init_fn = lambda key: trainer.init_state(model, tx, key, (1,) + data_shape)  # noqa: E731
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
    shardings = parallel.state_shardings(abstract, mesh, config.sharding, config.fsdp_min_bytes)
    meta = ckpt.make_meta(config, abstract.params, data_shape)

    manager = ckpt.make_manager(workdir, config.keep)
    abstract_sharded = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    state = ckpt.restore_latest(manager, abstract_sharded, meta, workdir)
    if state is None:
        state = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
    start = int(state.step)
    if start:
        log(f"resuming {workdir} from step {start}")

    dsh = parallel.data_sharding(mesh)
    step_fn = trainer.make_train_step(model, tx, schedule, config.model, config.optim.ema, config.seed)
    rep = parallel.replicated(mesh)
    update = jax.jit(step_fn, in_shardings=(shardings, dsh, dsh), out_shardings=(shardings, rep),
                     donate_argnums=(0,))
    encode = None
    if vae is not None:
        from ldu_jax.sd import vae as vae_lib
        enc_key = jax.random.PRNGKey(config.seed + 1)
        encode = jax.jit(lambda p, x, k: vae_lib.encode(vae, p, x, jax.random.fold_in(enc_key, k)),
                         in_shardings=(rep, dsh, None), out_shardings=dsh)

    batches, close_data = pixel_batches(config, start, local_batch, log)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    good = jnp.array(True)
    sums, count, t_last = None, 0, time.time()
    last_saved = start if manager.latest_step() is not None else None

    def check_finite(step):
        if not bool(good):
            where = f"step {last_saved}" if last_saved is not None else "none was written"
            raise TrainingDiverged(f"loss became NaN or inf before step {step}; stopped. The last good "
                                   f"checkpoint ({where}) is kept in {workdir}.")

    bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, dynamic_ncols=True,
               disable=jax.process_index() != 0)
    try:
        for step in bar:
            images, labels = next(batches)
            x = parallel.global_batch(mesh, images)
            y = parallel.global_batch(mesh, labels)
            if encode is not None:
                x = encode(vae.params, x, step)
            state, info = update(state, x, y)
            good = jnp.logical_and(good, jnp.isfinite(info["loss"]))
            sums = info if sums is None else jax.tree_util.tree_map(jnp.add, sums, info)
            count += 1
            done = step + 1
            if done % config.log_every == 0 or done == config.max_steps:
                check_finite(done)
                avg = {k: float(v) / count for k, v in jax.device_get(sums).items()}
                now = time.time()
                avg.update(step=done, img_per_s=count * config.batch_size / max(now - t_last, 1e-9))
                if jax.process_index() == 0:
                    _append_jsonl(metrics_path, avg)
                bar.set_postfix(loss=f"{avg['loss']:.4f}")
                sums, count, t_last = None, 0, now
            if done % config.save_every == 0 or done == config.max_steps:
                check_finite(done)
                ckpt.save(manager, done, state, meta)
                last_saved = done
            if (config.sample_every and done % config.sample_every == 0) or done == config.max_steps:
                write_samples(config, model, vae, state.params_ema, data_shape, workdir, done)
    finally:
        manager.wait_until_finished()
        close_data()
    return state


def write_samples(config, model, vae, params, data_shape, workdir, step):
    """PNG grids of EMA-model samples from fixed noise at each of ``config.sample_steps``."""
    n = config.num_samples
    key = jax.random.PRNGKey(config.seed + 2)
    noise = jax.random.normal(key, (n,) + tuple(data_shape))
    mc = config.model
    if mc.cfg_scale == 0:
        labels, cfg = jnp.full((n,), mc.num_classes, jnp.int32), None
    else:
        labels, cfg = jnp.arange(n, dtype=jnp.int32) % mc.num_classes, float(mc.cfg_scale)
    apply_fn = trainer.make_apply(model)
    for k in config.sample_steps:
        x = sampling.denoise(apply_fn, params, noise, labels, steps=int(k), cfg_scale=cfg, null_label=mc.num_classes)
        if vae is not None:
            from ldu_jax.sd import vae as vae_lib
            x = jax.jit(lambda p, z: vae_lib.decode(vae, p, z))(vae.params, x)
        x = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        if jax.process_index() == 0:
            grid = data_lib.make_grid(np.clip(x, -1, 1), ncol=min(n, 8))
            data_lib.save_image_atomic(os.path.join(workdir, "samples", f"step_{step}_k{int(k)}.png"), grid)
