"""The shortcut-model training job behind ``train.py``: data, sharding, loop, logs, checkpoints."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ldu_jax import checkpoint as ckpt
from ldu_jax import data as data_lib
from ldu_jax import loop, parallel, sources
from ldu_jax.errors import ConfigError
from ldu_jax.metrics import fid
from ldu_jax.models.dit import dit_from_config
from ldu_jax.sd import vae as vae_lib
from ldu_jax.shortcut import sampling, trainer


TrainingDiverged = loop.TrainingDiverged


def pixel_batches(config, local_batch: int, log=print):
    """(batches_from, close_fn): ``batches_from(start_step)`` iterates this host's rows of the global
    batches (images [-1,1] NHWC, labels) from that step on; global batch k = f(seed, k) whatever the
    number of hosts (tfds: this host's shard). An image folder is listed here, so that a bad dataset
    is a DataError before the run writes anything."""
    pi, pc = jax.process_index(), jax.process_count()
    ds = config.dataset
    labels = np.zeros(local_batch, np.int32)
    if ds == "synthetic":
        def synthetic(start_step):
            it = data_lib.synthetic_batches(config.batch_size, config.image_size, 3, config.seed * 1000, start_step,
                                            process_index=pi, process_count=pc)
            return ((x, labels) for x in it)
        return synthetic, lambda: None
    if ds.startswith("tfds:"):
        return lambda start_step: _tfds_batches(ds[5:], config, local_batch, pi, pc), lambda: None
    folder = data_lib.ImageFolder(ds, config.image_size, process_index=pi, process_count=pc, log=log)

    def from_folder(start_step):
        it = folder.batches(config.batch_size, config.seed, flip=config.random_flip, start_step=start_step)
        return ((x, labels) for x in it)

    def close():
        if folder.bad:
            data_lib.report_bad(folder.bad, len(folder.paths), log)
    return from_folder, close


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


def train(config, workdir: str, log=print):
    """Train (or resume) the run in ``workdir``; returns the final train state."""
    parallel.maybe_initialize_distributed(config.distributed)
    mesh = parallel.make_mesh()
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if config.batch_size % n_dev:
        raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by the {n_dev} devices")
    local_batch = config.batch_size // n_proc
    pixels_from, close_data = pixel_batches(config, local_batch, log)
    os.makedirs(workdir, exist_ok=True)

    vae = sources.vae(config.vae)
    if vae is not None:
        data_shape = vae.latent_shape(config.image_size, "config.image_size")
    else:
        data_shape = (config.image_size, config.image_size, 3)

    model = dit_from_config(config.model, data_shape[-1])
    tx, schedule = trainer.make_optimizer(config.optim, config.max_steps)
    init_fn = lambda key: trainer.init_state(model, tx, key, (1,) + data_shape)  # noqa: E731
    key = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init_fn, key)
    shardings = parallel.state_shardings(abstract, mesh, config.sharding, config.fsdp_min_bytes)
    meta = ckpt.make_meta(config, abstract.params, data_shape)
    manager = ckpt.make_manager(workdir, config.keep)
    state = loop.init_or_restore(init_fn, key, shardings, manager, meta, workdir, log)
    start = int(state.step)

    dsh, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
    step_fn = trainer.make_train_step(model, tx, schedule, config.model, config.optim.ema, config.seed)
    update = jax.jit(step_fn, in_shardings=(shardings, dsh, dsh), out_shardings=(shardings, rep),
                     donate_argnums=(0,))
    encode = None
    if vae is not None:
        enc_key = jax.random.PRNGKey(config.seed + 1)
        encode = jax.jit(lambda p, x, k: vae_lib.encode(vae, p, x, jax.random.fold_in(enc_key, k)),
                         in_shardings=(rep, dsh, None), out_shardings=dsh)

    def batches():
        for step, (images, labels) in enumerate(pixels_from(start), start):
            x = parallel.global_batch(mesh, images)
            yield (encode(vae.params, x, step) if encode is not None else x), parallel.global_batch(mesh, labels)

    fid_ref = load_fid_reference(config)

    def after_step(done, state):
        if (config.sample_every and done % config.sample_every == 0) or done == config.max_steps:
            write_samples(config, model, vae, state.params_ema, data_shape, workdir, done)
        if fid_ref is not None and (done % config.fid_every == 0 or done == config.max_steps):
            scores = fid_scores(config, model, vae, state.params_ema, data_shape, fid_ref)
            log(f"step {done}: " + ", ".join(f"FID@{k} {v:.2f}" for k, v in scores.items()))
            if jax.process_index() == 0:
                loop.append_jsonl(os.path.join(workdir, "metrics.jsonl"),
                                  {"step": done, **{f"fid_{k}": v for k, v in scores.items()}})

    stream = batches()
    if start < config.max_steps:
        update, stream = loop.compile_first(update, state, stream, "shortcut")
    try:
        return loop.train_loop(state, update, stream, manager=manager, meta=meta, workdir=workdir,
                               max_steps=config.max_steps, log_every=config.log_every,
                               save_every=config.save_every, batch_size=config.batch_size,
                               desc="shortcut", after_step=after_step)
    finally:
        close_data()


def generate(config, model, vae, params, data_shape, n: int, k: int, seed: int) -> np.ndarray:
    """``n`` EMA-model samples in [-1, 1] (pixels: decoded through the VAE) with ``k`` steps."""
    noise = jax.random.normal(jax.random.PRNGKey(seed), (n,) + tuple(data_shape))
    mc = config.model
    if mc.cfg_scale == 0:
        labels, cfg = jnp.full((n,), mc.num_classes, jnp.int32), None
    else:
        labels, cfg = jnp.arange(n, dtype=jnp.int32) % mc.num_classes, float(mc.cfg_scale)
    x = sampling.denoise(trainer.make_apply(model), params, noise, labels, steps=int(k), cfg_scale=cfg,
                         null_label=mc.num_classes)
    x = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    if vae is not None:  # decoded where the VAE's params live (a loaded VAE's are committed to one device)
        x = np.asarray(vae_lib.decoder(vae.module)(vae.params, jnp.asarray(x)))
    return x


def load_fid_reference(config):
    """(Inception params, reference mu, sigma) when ``fid_every`` is set, else None."""
    if not config.get("fid_every"):
        return None
    if not config.fid_stats or not config.fid_weights:
        raise ConfigError("config.fid_every needs config.fid_stats (reference .npz, e.g. from "
                          "`python -m ldu_jax.cli.fid stats`) and config.fid_weights (Inception weights)")
    return (fid.load_weights(config.fid_weights),) + tuple(fid.load_stats(config.fid_stats))


def fid_scores(config, model, vae, params, data_shape, ref) -> dict:
    """{k: FID of ``fid_samples`` EMA samples at k steps against the reference statistics}, for
    each k of ``config.sample_steps`` (1, 4 and 128 as in shortcut-models)."""
    inception, mu, sigma = ref
    out = {}
    for k in config.sample_steps:
        feats = []
        for start in range(0, config.fid_samples, config.fid_batch):
            x = generate(config, model, vae, params, data_shape, config.fid_batch, k, config.seed + 3 + start)
            feats.append(fid.features(inception, (np.clip(x, -1, 1) + 1) / 2, config.fid_batch))
        f = np.concatenate(feats)[:config.fid_samples]
        out[int(k)] = fid.frechet_distance(*fid.gaussian_stats(f), mu, sigma)
    return out


def write_samples(config, model, vae, params, data_shape, workdir, step):
    """PNG grids of EMA-model samples from fixed noise at each of ``config.sample_steps`` (none
    with ``num_samples`` 0)."""
    for k in config.sample_steps if config.num_samples else ():
        x = generate(config, model, vae, params, data_shape, config.num_samples, k, config.seed + 2)
        n = config.num_samples
        if jax.process_index() == 0:
            grid = data_lib.make_grid(np.clip(x, -1, 1), ncol=min(n, 8))
            data_lib.save_image_atomic(os.path.join(workdir, "samples", f"step_{step}_k{int(k)}.png"), grid)
