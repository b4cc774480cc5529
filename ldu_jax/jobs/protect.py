"""The protection jobs behind ``perturb.py``: load LDU's models, train ρ, protect a folder (LDU or a
baseline)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ldu_jax import checkpoint as ckpt
from ldu_jax import data as data_lib
from ldu_jax import dtypes, loop, parallel, sources
from ldu_jax.errors import ConfigError, MissingError
from ldu_jax.models.perturber import Perturber
from ldu_jax.protect import baselines, ldu
from ldu_jax.protect import io as pio
from ldu_jax.sd import models as sdm


def load_models(config, log=print):
    """(ldu.Modules, params {'vae','unet','text_encoder','dit'}, ti_ids, db_ids, latent shape, resolution)."""
    dtype = dtypes.by_name(config.dtype)
    sd, params = sources.sd(config.sd, dtype=dtype)  # bf16 compute, f32 parameters
    sd, params, ti_ids, db_ids = ldu.placeholder_setup(sd, params, config)
    res = config.resolution or sd.resolution
    shape = sdm.latent_shape(sd, res)
    dit, dit_params, null = sources.shortcut(config.shortcut, shape, config.seed)
    dit = dit.clone(remat=bool(config.remat), dtype=dtype)
    rho = Perturber(widths=tuple(config.perturber.widths), norm=config.perturber.norm,
                    residual=config.perturber.residual)
    params = {**params, "dit": dit_params}
    return ldu.Modules(sd, dit, rho, null), params, ti_ids, db_ids, shape, res


def train_rho(config, workdir: str, log=print):
    """Train ρ over an image folder (or the built-in samples); resumes from the work dir.

    On one host or many (started as train.py is): each host reads its rows of every global batch,
    ρ is replicated over every device of every host, process 0 alone writes the logs, grids and the
    built-in image folders (the others read them after a barrier); every host takes part in the
    checkpoints. The result does not depend on the number of hosts."""
    folder, heldout = parallel.process0_first(   # checks a dataset folder before the work dir is made
        lambda: (sources.dataset_folder(config.dataset, workdir),
                 sources.heldout_folder(config.get("heldout", ""), workdir)), "ldu-rho: image folders written")
    os.makedirs(workdir, exist_ok=True)
    models, params, ti_ids, db_ids, shape, res = load_models(config, log)
    parallel.sync("ldu-rho: models loaded")   # each host compiled its own model inits (see parallel.sync)
    mesh = parallel.batch_mesh(config.batch_size)
    tx = ldu.make_rho_optimizer(config)
    init = lambda key: ldu.init_rho_state(models, tx, key, shape, config)  # noqa: E731
    key = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init, key)
    rep = parallel.replicated(mesh)
    shardings = jax.tree_util.tree_map(lambda _: rep, abstract)
    meta = {"kind": "ldu-rho", "perturber": config.perturber.to_dict(), "latent_shape": list(shape),
            "param_shapes": ckpt.param_shapes(abstract.rho)}
    manager = ckpt.make_manager(workdir, config.keep)
    state = loop.init_or_restore(init, key, shardings, manager, meta, workdir, log)
    dsh = parallel.data_sharding(mesh)
    step = jax.jit(ldu.make_rho_step(models, tx, config, config.seed, dsh), out_shardings=(shardings, rep),
                   donate_argnums=(0,))
    frozen = parallel.put(params, rep)
    ids = parallel.put((ti_ids, db_ids), rep)
    images = data_lib.ImageFolder(folder, res, process_index=jax.process_index(),
                                  process_count=jax.process_count(), log=log)
    local = images.batches(config.batch_size, config.seed, start_step=int(state.step))

    def batches():
        for x in local:
            yield frozen, parallel.global_batch(mesh, x), *ids

    # the grid's and the held-out images: the same on every host, replicated; results replicated
    # too, so every host can read them (process 0 writes them)
    protect = jax.jit(lambda p, x: ldu.constrained_images(models, p, x, config), out_shardings=rep)
    grid_x = next(data_lib.ImageFolder(folder, res, log=lambda s: None).batches(4, 0, flip=False))
    grid_dev = parallel.put(grid_x, rep)
    heldout_x = (parallel.put(sources.heldout_images(heldout, res, workdir), rep) if heldout else None)
    gain = jax.jit(lambda p, x: ldu.heldout_gain(models, p, x, ti_ids, db_ids, config, config.heldout_draws),
                   out_shardings=rep)
    # every program compiled before the first step, then a barrier: across hosts, the steps'
    # collectives start together however long each host took to compile (see parallel.sync)
    with_rho = {**frozen, "rho": state.rho}
    x_spec = jax.ShapeDtypeStruct((config.batch_size, res, res, 3), jnp.float32, sharding=dsh)
    step = step.lower(state, frozen, x_spec, *ids).compile()
    protect = protect.lower(with_rho, grid_dev).compile()
    gain = gain.lower(with_rho, heldout_x).compile() if heldout_x is not None else None
    parallel.sync("ldu-rho: compiled")

    def after_step(done, state):
        if (config.grid_every and done % config.grid_every == 0) or done == config.max_steps:
            write_grid(protect, {**frozen, "rho": state.rho}, grid_dev,
                       os.path.join(workdir, "grids", f"step_{done}.png"))
        if heldout_x is not None and (done % config.log_every == 0 or done == config.max_steps):
            prot, clean = (np.asarray(a) for a in gain({**frozen, "rho": state.rho}, heldout_x))
            rel = prot / clean - 1
            if jax.process_index() == 0:
                loop.append_jsonl(os.path.join(workdir, "heldout.jsonl"),
                                  {"step": done, "l_pers": float(prot.mean()), "l_pers_clean": float(clean.mean()),
                                   "gain": float(rel.mean()), "gain_std": float(rel.std())})

    return loop.train_loop(state, step, batches(), manager=manager, meta=meta, workdir=workdir,
                           max_steps=config.max_steps, log_every=config.log_every, save_every=config.save_every,
                           batch_size=config.batch_size, desc="ldu-rho", after_step=after_step)


def write_grid(protect, params, x, path):
    """PNG rows: original | protected | 10x difference (computed on every host, written by process 0)."""
    x_prot = np.asarray(protect(params, x))
    x = np.asarray(x)
    if jax.process_index() == 0:
        rows = np.concatenate([x, np.clip(x_prot, -1, 1), np.clip((x_prot - x) * 10, -1, 1)])
        data_lib.save_image_atomic(path, data_lib.make_grid(rows, ncol=len(x)))


def rho_checkpoint(path: str):
    """ρ variables (and meta) from a ``perturb.py train`` work dir."""
    try:
        state, meta = ckpt.restore_state(path)
    except FileNotFoundError as e:
        raise MissingError(f"{e} (train ρ with: python perturb.py train ...)") from e
    return state["rho"], meta


def load_baseline(method: str, cfg, log=print):
    """(sd, params with the method's inputs, resolution) for a baseline config."""
    baselines.check_config(method, cfg)
    sd, params = sources.sd(cfg.sd, dtype=dtypes.by_name(cfg.dtype))
    res = cfg.resolution or sd.resolution
    return sd, baselines.prepare(method, sd, params, cfg, res, log), res


def baseline_protector(method: str, cfg, log=print):
    """(protect_batch(x [apply_batch, R, R, 3] in [-1, 1], i) -> x', resolution): one jit, the batch
    sharded over this process's devices (across hosts each protects its own files), parameters
    replicated; a folder's batch i uses key
    fold_in(PRNGKey(seed), i) (the same for every folder, whatever was protected before)."""
    sd, params, res = load_baseline(method, cfg, log)
    mesh = parallel.batch_mesh(cfg.apply_batch, local=True)
    dsh, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
    params = jax.device_put(params, rep)
    fn = jax.jit(lambda p, x, k: baselines.protect(method, sd, p, x, k, cfg)[0], out_shardings=dsh)
    base = jax.random.PRNGKey(cfg.seed)

    def protect_batch(x, index: int):
        k = jax.random.fold_in(base, index)
        return np.asarray(fn(params, jax.device_put(jnp.asarray(x, jnp.float32), dsh), k))

    return protect_batch, res


def make_protector(method: str, config, checkpoint: str | None, log=print):
    """(protect_batch(x [B,R,R,3] in [-1,1], batch index) -> x', resolution) for ``ldu`` or ``ldu-opt``, or a
    pixel-space baseline (``baselines.METHODS``: advdm, aspl, fsmg, photoguard, mist, sds, sds-, pid)
    with its ``configs/protect_<method>_*.py`` config."""
    if method in baselines.METHODS:
        return baseline_protector(method, config, log)
    models, params, ti_ids, db_ids, shape, res = load_models(config, log)
    mesh = parallel.batch_mesh(config.apply_batch, local=True)
    dsh, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
    if method == "ldu":
        checkpoint = checkpoint or config.get("rho_checkpoint", "")
        if not checkpoint:
            raise ConfigError("--method=ldu needs --checkpoint=<perturb.py train work dir> "
                             "(or config.rho_checkpoint)")
        rho, meta = rho_checkpoint(checkpoint)
        ref = jax.eval_shape(lambda: models.rho.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(shape))))
        ckpt.check_compatible(meta, {"param_shapes": ckpt.param_shapes(ref)}, checkpoint)
        params = jax.device_put({**params, "rho": rho}, rep)
        fn = jax.jit(lambda p, x: ldu.constrained_images(models, p, x, config), out_shardings=dsh)
    elif method == "ldu-opt":
        params = jax.device_put(params, rep)
        ids = jax.device_put((ti_ids, db_ids), rep)
        key = jax.random.PRNGKey(config.seed)
        fn = jax.jit(lambda p, x: ldu.optimize_shift(models, p, x, *ids, key, config)[0], out_shardings=dsh)
    else:
        raise ConfigError(f"unknown LDU method {method!r}")
    return (lambda x, index: np.asarray(fn(params, jax.device_put(jnp.asarray(x), dsh)))), res   # no draws


def protect_dir(method: str, config, checkpoint: str | None, input_dir: str, output_dir: str, log=print,
                protector=None):
    """Protect every image of ``input_dir`` into ``output_dir`` (``<stem>.png`` + report.csv);
    returns the report rows. The library side of ``perturb.py apply``. ``protector``: what
    ``make_protector(method, config, checkpoint)`` returned, to reuse across folders.

    The budget every written file meets: LDU's pixel MSE (``config.eps`` on [-1, 1]); for the
    baselines the L-inf bound ``config.eps`` on the [0, 1] scale.

    Across hosts every host calls this with the same arguments: the folder's batches are split
    between them (``protect_folder``), each protects its own on its own devices, and every host
    returns all rows; the files and report.csv are those of one process."""
    if method in baselines.METHODS:
        baselines.check_config(method, config)
        budget = pio.Budget("linf", float(config.eps))
    else:
        budget = pio.Budget("mse", float(config.eps))
    pio.check_dirs(input_dir, output_dir)
    protect_batch, res = protector or make_protector(method, config, checkpoint, log)
    return pio.protect_folder(input_dir, output_dir, method, res, budget, protect_batch, config.apply_batch, log,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              barrier=parallel.sync, every_process=parallel.every_process)


def demo(config, out_dir: str = "ldu_demo", log=print) -> list[dict]:
    """Protect a few built-in portraits into ``<out_dir>/protected`` (+ ``<out_dir>/grid.png``:
    original | protected): with the config's trained ρ (the mini-world's shipped one by default), or,
    for a config without one (e.g. configs/ldu_tiny.py), after a short ρ training. Returns the rows."""
    shipped = bool(config.get("rho_checkpoint")) and os.path.isdir(config.rho_checkpoint)
    kind = sources.MINIWORLD if config.dataset == sources.MINIWORLD else sources.SAMPLES
    if shipped:
        log("LDU demo: the mini-world's trained models and ρ (ldu_jax/miniworld/models), held-out portraits.")
        rho = config.rho_checkpoint
    else:
        log("LDU demo: a short ρ training on the config's models, then protection of built-in portraits.")
        rho = os.path.join(out_dir, "rho")
        train_rho(config, rho)
    images = sources.sample_folder(out_dir, kind)
    out = os.path.join(out_dir, "protected")
    rows = protect_dir("ldu", config, rho, images, out, log)
    pairs = []
    for r in rows:
        if not r["error"]:
            stem = os.path.splitext(r["file"])[0]
            for folder in (images, out):
                with Image.open(os.path.join(folder, stem + ".png")) as im:
                    pairs.append(np.asarray(im.convert("RGB")))
    if pairs:
        data_lib.save_image_atomic(os.path.join(out_dir, "grid.png"), data_lib.make_grid(np.stack(pairs), ncol=2))
    return rows
