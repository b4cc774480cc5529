"""The LDU jobs behind ``perturb.py``: load the models, train ρ, protect a folder."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldu_jax import checkpoint as ckpt
from ldu_jax import data as data_lib
from ldu_jax import loop, parallel
from ldu_jax.models.dit import dit_from_config
from ldu_jax.models.perturber import Perturber
from ldu_jax.protect import ldu
from ldu_jax.sd import models as sdm


def latent_shape(sd, resolution: int):
    f = sd.vae.config.factor
    return (resolution // f, resolution // f, int(sd.vae.config.latent_channels))


def load_shortcut(source: str, data_shape, seed: int = 0):
    """(DiT module, EMA params, null label) from a ``train.py`` work dir, or a fresh random DiT
    (``random``: an untrained flow, so invert/denoise reconstruct exactly; for tests)."""
    if source == "random":
        from configs import shortcut_tiny
        mc = shortcut_tiny.get_config().model
        model = dit_from_config(mc, data_shape[-1])
        z = jnp.zeros((1,))
        params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + tuple(data_shape)), z, z,
                            z.astype(jnp.int32))["params"]
        return model, params, mc.num_classes
    if not os.path.isdir(source):
        raise FileNotFoundError(f"shortcut model work dir {source} does not exist (train one with train.py)")
    params, meta = ckpt.restore_params(source, ema=True)
    if list(meta["data_shape"][-1:]) != [data_shape[-1]]:
        raise ValueError(f"the shortcut model in {source} was trained on inputs {meta['data_shape']}, "
                         f"but this VAE gives latents {list(data_shape)}")
    mc = ml_collections.ConfigDict(meta["model"])
    return dit_from_config(mc, data_shape[-1]), params, mc.num_classes


def load_models(config, log=print):
    """(LDU modules, params {'vae','unet','text_encoder','dit'}, ti_ids, db_ids, latent shape)."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    sd, params = sdm.load_sd(config.sd, dtype=dtype)  # bf16 compute, f32 parameters
    sd, params, ti_ids, db_ids = ldu.placeholder_setup(sd, params, config)
    res = config.resolution or sd.resolution
    shape = latent_shape(sd, res)
    dit, dit_params, null = load_shortcut(config.shortcut, shape, config.seed)
    dit = dit.clone(remat=bool(config.remat), dtype=dtype)
    rho = Perturber(widths=tuple(config.perturber.widths), norm=config.perturber.norm,
                    residual=config.perturber.residual)
    params = {**params, "dit": dit_params}
    return ldu.LDU(sd, dit, rho, null), params, ti_ids, db_ids, shape, res


def train_rho(config, workdir: str, log=print):
    """Train ρ over an image folder (or the built-in samples); resumes from the work dir."""
    os.makedirs(workdir, exist_ok=True)
    models, params, ti_ids, db_ids, shape, res = load_models(config, log)
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
    step = jax.jit(ldu.make_rho_step(models, tx, config, config.seed, dsh), donate_argnums=(0,))
    frozen = jax.device_put(params, rep)
    ids = jax.device_put((ti_ids, db_ids), rep)
    folder = dataset_folder(config.dataset, workdir)
    images = data_lib.ImageFolder(folder, res, log=log).batches(config.batch_size, config.seed,
                                                                start_step=int(state.step))

    def batches():
        for x in images:
            yield frozen, jax.device_put(x, dsh), *ids

    protect = jax.jit(lambda p, x: ldu.constrained_images(models, p, x, config))
    grid_x = next(data_lib.ImageFolder(folder, res, log=lambda s: None).batches(4, 0, flip=False))
    heldout_x = heldout_images(config.get("heldout", ""), res, workdir, log)
    gain = jax.jit(lambda p, x: ldu.heldout_gain(models, p, x, ti_ids, db_ids, config, config.heldout_draws))

    def after_step(done, state):
        if (config.grid_every and done % config.grid_every == 0) or done == config.max_steps:
            write_grid(protect, {**params, "rho": state.rho}, grid_x,
                       os.path.join(workdir, "grids", f"step_{done}.png"))
        if heldout_x is not None and (done % config.log_every == 0 or done == config.max_steps):
            prot, clean = (np.asarray(a) for a in gain({**params, "rho": state.rho}, heldout_x))
            rel = prot / clean - 1
            if jax.process_index() == 0:
                loop.append_jsonl(os.path.join(workdir, "heldout.jsonl"),
                                  {"step": done, "l_pers": float(prot.mean()), "l_pers_clean": float(clean.mean()),
                                   "gain": float(rel.mean()), "gain_std": float(rel.std())})

    return loop.train_loop(state, step, batches(), manager=manager, meta=meta, workdir=workdir,
                           max_steps=config.max_steps, log_every=config.log_every, save_every=config.save_every,
                           batch_size=config.batch_size, desc="ldu-rho", after_step=after_step)


def heldout_images(spec: str, res: int, workdir: str, log=print):
    """The images ρ's held-out L_pers gain is logged on: '' (none), 'miniworld' (portraits of the
    world's held-out identities) or a folder."""
    if not spec:
        return None
    folder = sample_folder(workdir, "miniworld", count=8) if spec == "miniworld" else spec
    return jnp.asarray(data_lib.load_images(data_lib.list_images(folder), res)[0])


def write_grid(protect, params, x, path):
    """PNG rows: original | protected | 10x difference."""
    x_prot = np.asarray(protect(params, jnp.asarray(x)))
    rows = np.concatenate([x, np.clip(x_prot, -1, 1), np.clip((x_prot - x) * 10, -1, 1)])
    data_lib.save_image_atomic(path, data_lib.make_grid(rows, ncol=len(x)))


def rho_checkpoint(path: str):
    """ρ variables (and meta) from a ``perturb.py train`` work dir."""
    try:
        state, meta = ckpt.restore_state(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (train ρ with: python perturb.py train ...)") from e
    return state["rho"], meta


def make_protector(method: str, config, checkpoint: str | None, log=print):
    """(protect_batch(x [B,R,R,3] in [-1,1], batch index) -> x', resolution) for ``ldu`` or ``ldu-opt``, or a
    pixel-space baseline (``baselines.METHODS``: advdm, aspl, fsmg, photoguard, mist, sds, sds-, pid)
    with its ``configs/protect_<method>_*.py`` config."""
    from ldu_jax.protect import baselines
    if method in baselines.METHODS:
        return baselines.make_protector(method, config, log)
    models, params, ti_ids, db_ids, shape, res = load_models(config, log)
    mesh = parallel.batch_mesh(config.apply_batch)
    dsh, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
    if method == "ldu":
        checkpoint = checkpoint or config.get("rho_checkpoint", "")
        if not checkpoint:
            raise ValueError("--method=ldu needs --checkpoint=<perturb.py train work dir> "
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
        raise ValueError(f"unknown LDU method {method!r}")
    return (lambda x, index: np.asarray(fn(params, jax.device_put(jnp.asarray(x), dsh)))), res   # no draws


def protect_dir(method: str, config, checkpoint: str | None, input_dir: str, output_dir: str, log=print,
                protector=None):
    """Protect every image of ``input_dir`` into ``output_dir`` (``<stem>.png`` + report.csv);
    returns the report rows. The library side of ``perturb.py apply``. ``protector``: what
    ``make_protector(method, config, checkpoint)`` returned, to reuse across folders.

    The budget every written file meets: LDU's pixel MSE (``config.eps`` on [-1, 1]); for the
    baselines the L-inf bound ``config.eps`` on the [0, 1] scale."""
    from ldu_jax.protect import baselines
    from ldu_jax.protect import io as pio
    if method in baselines.METHODS:
        baselines.check_config(method, config)
        budget = pio.Budget("linf", float(config.eps))
    else:
        budget = pio.Budget("mse", float(config.eps))
    pio.check_dirs(input_dir, output_dir)
    protect_batch, res = protector or make_protector(method, config, checkpoint, log)
    return pio.protect_folder(input_dir, output_dir, method, res, budget, protect_batch, config.apply_batch, log)


SAMPLE_COUNT = 4
MINIWORLD_TRAIN = (128, 4)   # identities x images of the 'miniworld' ρ training set


def sample_folder(workdir: str, kind: str = "samples", count: int = SAMPLE_COUNT) -> str:
    """A few built-in sample portraits (deterministic) written under ``workdir``: procedural
    portraits (``samples``) or held-out identities of the mini-world (``miniworld``)."""
    folder = os.path.join(workdir, "sample_images" if kind == "samples" else f"sample_images_{kind}")
    if count != SAMPLE_COUNT:
        folder += f"_{count}"
    if os.path.isdir(folder) and len(os.listdir(folder)) >= count:
        return folder
    if kind == "miniworld":
        from ldu_jax.miniworld import world
        images = [world.render(ident, 0) for ident in world.heldout_identities(count)]
    elif kind == "samples":
        images = [data_lib.procedural_portrait(i) for i in range(count)]
    else:
        raise ValueError(f"unknown sample kind {kind!r}; 'samples' or 'miniworld'")
    for i, img in enumerate(images):
        data_lib.save_image_atomic(os.path.join(folder, f"sample_{i}.png"), img)
    return folder


def dataset_folder(dataset: str, workdir: str) -> str:
    """The image folder of a config's ``dataset``: a path, ``samples`` (the built-in portraits) or
    ``miniworld`` (the mini-world's training portraits, rendered into ``workdir`` once)."""
    if dataset == "samples":
        return sample_folder(workdir)
    if dataset == "miniworld":
        from ldu_jax.miniworld import world
        root = os.path.join(workdir, "miniworld_train")
        world.write_training_set(root, *MINIWORLD_TRAIN)
        return os.path.join(root, "images")
    return dataset
