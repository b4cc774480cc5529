"""Personalization attacks: train Textual Inversion or DreamBooth on a folder, then generate.

    python -m ldu_jax.attack ti --config=configs/attack_ti_tiny.py --images=DIR --workdir=DIR
    python -m ldu_jax.attack dreambooth --config=configs/attack_db_sd21.py --images=DIR --workdir=DIR

Writes ``metrics.jsonl``, orbax checkpoints (a rerun resumes), the result (TI:
``learned_embeds.safetensors``; DreamBooth: ``model/`` or, with LoRA, ``lora.safetensors``), and
``samples/<prompt-slug>/NNN.png``: ``num_samples`` images per validation prompt.
"""
from __future__ import annotations

import itertools
import os
import re

import jax
import numpy as np

from ldu_jax import checkpoint as ckpt
from ldu_jax import data as data_lib
from ldu_jax import loop, parallel
from ldu_jax.personalize import common, dreambooth, textual_inversion as ti
from ldu_jax.sd import models as sdm
from ldu_jax.sd import schedule as sch

KINDS = ("ti", "dreambooth")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "prompt"


def _setup(config, images_dir, workdir, log):
    os.makedirs(workdir, exist_ok=True)
    sd, params = sdm.load_sd(config.model)
    images = common.load_instance_images(images_dir, sd.resolution, config.min_images, log)
    mesh = parallel.batch_mesh(config.batch_size)
    return sd, params, images, mesh


def _train(state_init, step_fn, args, *, config, workdir, mesh, kind, log):
    """Shared driver: replicated state and inputs, data-sharded batches inside the step."""
    rep = parallel.replicated(mesh)
    key = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(state_init, key)
    shardings = jax.tree_util.tree_map(lambda _: rep, abstract)
    meta = {"kind": kind, "model": config.model, "param_shapes": ckpt.param_shapes(abstract)}
    manager = ckpt.make_manager(workdir, config.keep)
    state = loop.init_or_restore(state_init, key, shardings, manager, meta, workdir, log, jit_init=False)
    args = jax.device_put(args, rep)
    update = jax.jit(step_fn, donate_argnums=(0,))
    total = config.max_steps * config.grad_accum
    return loop.train_loop(state, update, itertools.repeat(args), manager=manager, meta=meta, workdir=workdir,
                           max_steps=total, log_every=config.log_every, save_every=config.save_every,
                           batch_size=config.batch_size, desc=kind)


def run_ti(config, images_dir: str, workdir: str, log=print):
    """Textual Inversion; returns (sd, params with the learned row, token)."""
    sd, params, images, mesh = _setup(config, images_dir, workdir, log)
    sd, params, token_id = sdm.add_placeholder_token(sd, params, config.placeholder_token, config.init_word)
    sched = sch.make_schedule(sd.scheduler)
    tx, lr = ti.make_optimizer(config, config.batch_size)
    log(f"textual inversion: token {config.placeholder_token!r} (id {token_id}) from {config.init_word!r}, "
        f"{len(images)} images, lr {lr:g}")
    ids = ti.template_ids(sd, config.placeholder_token, config.templates)
    row0 = ti.get_table(params)[token_id]
    init = lambda key: ti.TIState(jax.numpy.zeros((), jax.numpy.int32), row0, tx.init(row0))  # noqa: E731
    step = ti.make_step(sd, sched, tx, token_id, config.batch_size, config.seed, parallel.data_sharding(mesh))
    state = _train(init, step, (params, images, ids), config=config, workdir=workdir, mesh=mesh, kind="ti", log=log)
    ti.save_learned_embeds(os.path.join(workdir, "learned_embeds.safetensors"), config.placeholder_token,
                           jax.device_get(state.row))
    return sd, ti.with_row(params, token_id, state.row), config.placeholder_token


def run_dreambooth(config, images_dir: str, workdir: str, log=print):
    """DreamBooth; returns (sd, fine-tuned params, identifier)."""
    sd, params, images, mesh = _setup(config, images_dir, workdir, log)
    sched = sch.make_schedule(sd.scheduler)
    class_images = images[:1]
    if config.prior_weight > 0:
        folder = config.get("class_images_dir") or os.path.join(workdir, "class_images")
        class_images = dreambooth.ensure_class_images(sd, params, folder, config, log)
    tx = dreambooth.make_optimizer(config)
    frozen = dreambooth.frozen_params(params, config)
    ids = sdm.tokenize(sd, [config.instance_prompt, config.class_prompt])
    init = lambda key: dreambooth.init_state(params, config, tx, key)  # noqa: E731
    step = dreambooth.make_step(sd, sched, tx, config, config.batch_size, config.seed, parallel.data_sharding(mesh))
    state = _train(init, step, (frozen, images, class_images, ids[0], ids[1]), config=config, workdir=workdir,
                   mesh=mesh, kind="dreambooth", log=log)
    trainable = jax.device_get(state.trainable)
    tuned = dreambooth.full_params(params, trainable, config)
    if config.lora_rank:
        from safetensors.numpy import save_file
        flat = {f"{k}.{ab}": np.asarray(v[ab], np.float32) for k, v in trainable["unet"].items() for ab in v}
        save_file(flat, os.path.join(workdir, "lora.safetensors"))
    else:
        sdm.save_sd(sd, tuned, os.path.join(workdir, "model"))
    return sd, tuned, config.identifier


def write_samples(sd, params, config, token: str, workdir: str) -> dict:
    prompts = [p.format(token) for p in config.validation_prompts]
    out = common.generate(sd, params, prompts, n_per_prompt=config.num_samples, steps=config.sample_steps,
                          guidance=config.guidance, seed=config.seed + 1)
    for prompt, imgs in out.items():
        for i, img in enumerate(imgs):
            data_lib.save_image_atomic(os.path.join(workdir, "samples", slug(prompt), f"{i:03d}.png"), img)
    return out


def run(kind: str, config, images_dir: str, workdir: str, log=print):
    if kind not in KINDS:
        raise ValueError(f"unknown attack {kind!r}; one of {KINDS}")
    sd, params, token = (run_ti if kind == "ti" else run_dreambooth)(config, images_dir, workdir, log)
    return write_samples(sd, params, config, token, workdir)


def _main(argv):
    from absl import flags
    f = flags.FLAGS
    if len(argv) != 2:
        raise SystemExit(f"usage: python -m ldu_jax.attack {{{','.join(KINDS)}}} --config=... --images=DIR --workdir=DIR")
    try:
        run(argv[1], f.config, f.images, f.workdir)
    except loop.TrainingDiverged as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    from absl import flags
    from ldu_jax import cli
    flags.DEFINE_string("images", None, "folder of the subject's images", required=True)
    flags.DEFINE_string("workdir", None, "work dir", required=True)
    cli.define_config("config", None, "configs/attack_*.py")
    cli.run(_main, user_errors=(ValueError,))
