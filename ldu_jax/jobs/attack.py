"""Personalization attacks: train Textual Inversion or DreamBooth on a folder (or several folders
as one program), then generate. The command is ``ldu_jax/cli/attack.py``.

Writes ``metrics.jsonl``, orbax checkpoints (a rerun resumes), the result (TI:
``learned_embeds.safetensors``; DreamBooth: ``model/`` or, with LoRA, ``lora.safetensors``), and
``samples/<prompt-slug>/NNN.png``: ``num_samples`` images per validation prompt.
"""
from __future__ import annotations

import itertools
import os
import re
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ldu_jax import checkpoint as ckpt
from ldu_jax import data as data_lib
from ldu_jax import loop, parallel, sources
from ldu_jax.errors import ConfigError
from ldu_jax.personalize import common, dreambooth, textual_inversion as ti
from ldu_jax.sd import models as sdm
from ldu_jax.sd import schedule as sch

KINDS = ("ti", "dreambooth")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "prompt"


@flax.struct.dataclass
class SubjectBatch:
    """Several subjects' attack states trained as one program: their states stacked on a leading
    axis, all at the same ``step``."""
    step: jax.Array
    states: Any


class _Plan(NamedTuple):
    key: tuple              # everything the step function closes over (its compile-cache key)
    init: Callable          # key -> one subject's state
    make_step: Callable     # () -> step(state, shared..., images, ...) with images at args[1]
    args: tuple             # the step's arguments after the state (images: the first subject's)
    finish: Callable        # (state, workdir, save_model) -> (sd, params, token)
    mesh: Any


class Attacker:
    """The attacks against one Stable Diffusion model, as an evaluation runs them cell after cell:
    the model is loaded once, each training step is traced and compiled once per (attack, config,
    token) and reused for every folder of the same shapes, and ``run_many`` trains several
    subjects in one program. ``config.model`` of every call must be this attacker's ``model``."""

    def __init__(self, model: str):
        self.model = model
        self._loaded = None
        self._placeholders = {}   # (token, init word) -> (sd, params, token id)
        self._updates = {}        # (kind, config, token id[, subjects]) -> jitted step
        self.timing = {}          # seconds of the last run: load, train, generate

    def loaded(self):
        if self._loaded is None:
            t = time.time()
            self._loaded = sources.sd(self.model)
            self.timing["load"] = self.timing.get("load", 0.0) + time.time() - t
        return self._loaded

    def with_placeholder(self, token: str, init_word: str):
        """(sd, params, token id) of the model with ``token`` added (once per token)."""
        if (token, init_word) not in self._placeholders:
            sd, params = self.loaded()
            self._placeholders[token, init_word] = sdm.add_placeholder_token(sd, params, token, init_word)
        return self._placeholders[token, init_word]

    def _update(self, key, make_step, out_shardings=None):
        """The jitted step of ``key``, traced once; its closure must not change between calls with
        the same key (so the key holds every config value the step reads). ``out_shardings``: the
        state's (and the metrics'), so the state a step returns is placed as the one it took."""
        if key not in self._updates:
            kw = {} if out_shardings is None else {"out_shardings": out_shardings}
            self._updates[key] = jax.jit(make_step(), donate_argnums=(0,), **kw)
        return self._updates[key]

    def _images(self, config, images_dir, log):
        if config.model != self.model:
            raise ValueError(f"this attacker holds the model {self.model!r}, the config asks for {config.model!r}")
        sd, _ = self.loaded()
        return common.load_instance_images(images_dir, sd.resolution, config.min_images, log)

    def _moments(self, params, images) -> common.Moments:
        """The images' VAE posteriors, which the steps draw their latents from (the attacks do not
        train the VAE, so each image is encoded once, not at every step)."""
        sd, _ = self.loaded()
        return jax.tree_util.tree_map(np.asarray, common.moments_fn(sd)(params["vae"], images))

    def _plan(self, kind, config, images, workdir, log, mesh=None, dsh=None) -> _Plan:
        """``dsh``: how the step shards its batch (default: over ``mesh``'s data axis). The step's
        images (args[1]) are the images' ``common.Moments``."""
        mesh = parallel.batch_mesh(config.batch_size) if mesh is None else mesh
        dsh = parallel.data_sharding(mesh) if dsh is None else dsh
        if kind == "ti":
            sd, params, token_id = self.with_placeholder(config.placeholder_token, config.init_word)
            tx, lr = ti.make_optimizer(config, config.batch_size)
            log(f"textual inversion: token {config.placeholder_token!r} (id {token_id}) from {config.init_word!r}, "
                f"{len(images)} images, lr {lr:g}")
            ids = ti.template_ids(sd, config.placeholder_token, config.templates)
            row0 = ti.get_table(params)[token_id]

            def finish(state, out_dir, save_model):
                row = parallel.fetch(state.row)
                if jax.process_index() == 0:
                    ti.save_learned_embeds(os.path.join(out_dir, "learned_embeds.safetensors"),
                                           config.placeholder_token, row)
                return sd, ti.with_row(params, token_id, row), config.placeholder_token
            return _Plan(
                ("ti", config.to_json(), token_id),
                lambda key: ti.TIState(jnp.zeros((), jnp.int32), row0, tx.init(row0)),
                lambda: ti.make_step(sd, sch.make_schedule(sd.scheduler), tx, token_id, config.batch_size,
                                     config.seed, dsh),
                (params, self._moments(params, images), ids), finish, mesh)
        if kind != "dreambooth":
            raise ConfigError(f"unknown attack {kind!r}; one of {KINDS}")
        sd, params = self.loaded()
        class_images = images[:1]
        if config.prior_weight > 0:
            folder = config.get("class_images_dir") or os.path.join(workdir, "class_images")
            class_images = parallel.process0_first(   # process 0 generates the missing ones
                lambda: dreambooth.ensure_class_images(sd, params, folder, config, log), "attack: class images")
        tx = dreambooth.make_optimizer(config)
        ids = sdm.tokenize(sd, [config.instance_prompt, config.class_prompt])

        def finish(state, out_dir, save_model):
            trainable = parallel.fetch(state.trainable)
            tuned = dreambooth.full_params(params, trainable, config)
            if save_model and jax.process_index() == 0 and config.lora_rank:
                from safetensors.numpy import save_file
                flat = {f"{k}.{ab}": np.asarray(v[ab], np.float32) for k, v in trainable["unet"].items() for ab in v}
                save_file(flat, os.path.join(out_dir, "lora.safetensors"))
            elif save_model and jax.process_index() == 0:
                sdm.save_sd(sd, tuned, os.path.join(out_dir, "model"))
            return sd, tuned, config.identifier
        return _Plan(
            ("dreambooth", config.to_json()),
            lambda key: dreambooth.init_state(params, config, tx, key),
            lambda: dreambooth.make_step(sd, sch.make_schedule(sd.scheduler), tx, config, config.batch_size,
                                         config.seed, dsh),
            (dreambooth.frozen_params(params, config), self._moments(params, images),
             self._moments(params, class_images), ids[0], ids[1]), finish, mesh)

    def _train(self, plan: _Plan, init, update, args, *, config, workdir, kind, log, shardings=None,
               arg_shardings=None):
        """Shared driver: the state and inputs in ``shardings(abstract state)`` and
        ``arg_shardings`` (default: replicated), data-sharded batches inside the step."""
        rep = parallel.replicated(plan.mesh)
        key = jax.random.PRNGKey(config.seed)
        abstract = jax.eval_shape(init, key)
        shardings = (shardings or (lambda a: jax.tree_util.tree_map(lambda _: rep, a)))(abstract)
        meta = {"kind": kind, "model": config.model, "param_shapes": ckpt.param_shapes(abstract)}
        manager = ckpt.make_manager(workdir, config.keep)
        state = loop.init_or_restore(init, key, shardings, manager, meta, workdir, log, jit_init=False)
        args = parallel.put(args, arg_shardings or rep)
        total = config.max_steps * config.grad_accum
        update, batches = loop.compile_first(update, state, itertools.repeat(args), kind)
        return loop.train_loop(state, update, batches, manager=manager, meta=meta, workdir=workdir,
                               max_steps=total, log_every=config.log_every, save_every=config.save_every,
                               batch_size=config.batch_size, desc=kind)

    def train(self, kind, config, images_dir: str, workdir: str, log=print, save_model: bool = True):
        """Train attack ``kind`` on one folder; (sd, params, token). ``save_model``: write the
        DreamBooth model (``model/``, or ``lora.safetensors``) into ``workdir``."""
        os.makedirs(workdir, exist_ok=True)
        plan = self._plan(kind, config, self._images(config, images_dir, log), workdir, log)
        update = self._update(plan.key, plan.make_step)
        state = self._train(plan, plan.init, update, plan.args, config=config, workdir=workdir, kind=kind, log=log)
        return plan.finish(state, workdir, save_model)

    def train_many(self, kind, config, images_dirs, workdirs, group_dir: str, log=print, save_model: bool = True,
                   images=None):
        """Train attack ``kind`` on several folders of equally many images as one program (the
        step mapped over a subject axis, ``parallel.map_subjects``, and the subjects sharded over
        the devices, ``parallel.subject_mesh``);
        [(sd, params, token)] in order. Every subject's result
        equals ``train`` on its folder alone (up to float rounding): the same draws, its own
        state. Checkpoints of the stacked states go to ``group_dir``, each result to its workdir.
        ``images``: the folders' images if the caller has loaded them."""
        if images is None:
            images = [self._images(config, d, log) for d in images_dirs]
        if len({x.shape for x in images}) != 1:
            raise ValueError(f"train_many needs folders of the same number of images, got "
                             f"{', '.join(f'{d}: {len(x)}' for d, x in zip(images_dirs, images))}")
        for d in [group_dir, *workdirs]:
            os.makedirs(d, exist_ok=True)
        n = len(images)
        mesh = parallel.subject_mesh(n, config.batch_size)
        # the step runs inside shard_map (below), where a bare spec names the data axis of its mesh
        plan = self._plan(kind, config, images[0], group_dir, log, mesh, dsh=P(parallel.AXIS))
        log(f"{kind}: {n} subjects in one program, on a {' x '.join(map(str, mesh.devices.shape))} device mesh "
            f"({' x '.join(mesh.axis_names)})")
        moments = [plan.args[1]] + [self._moments(plan.args[0], x) for x in images[1:]]   # plan: images[0]'s
        args = (plan.args[0], jax.tree_util.tree_map(lambda *m: np.stack(m), *moments)) + plan.args[2:]
        rep, sub = parallel.replicated(mesh), NamedSharding(mesh, P(parallel.SUBJECTS))

        def make_step():
            # Each device group runs its own subjects (shard_map, manual over the subject axis; the
            # data axis stays automatic). Not vmap with spmd_axis_name: XLA's partitioner miscomputes
            # a vmapped 1x1 conv whose kernel is batched and sharded over the vmapped axis (DreamBooth's
            # UNet: the loss off by 1%), while inside shard_map each group's subjects are local.
            step = jax.shard_map(parallel.map_subjects(plan.make_step(), (0, None, 0) + (None,) * (len(args) - 2)),
                                 mesh=mesh, in_specs=(P(parallel.SUBJECTS), P(), P(parallel.SUBJECTS))
                                 + (P(),) * (len(args) - 2), out_specs=P(parallel.SUBJECTS),
                                 axis_names={parallel.SUBJECTS})

            def batched(b: SubjectBatch, *a):
                states, info = step(b.states, *a)
                return SubjectBatch(b.step + 1, states), {**jax.tree_util.tree_map(jnp.mean, info),
                                                          "loss_max": jnp.max(info["loss"])}
            return batched

        def init(key):
            one = plan.init(key)
            return SubjectBatch(jnp.zeros((), jnp.int32),
                                jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), one))
        abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
        state_shardings = SubjectBatch(rep, jax.tree_util.tree_map(lambda _: sub, abstract.states))
        # out_shardings: on a mesh whose subject axis has size 1, the step's result would come back
        # as P() instead of P('subjects') (the same placement, another sharding) and retrace the step
        update = self._update(plan.key + (("subjects", n),), make_step, out_shardings=(state_shardings, rep))
        batch = self._train(plan, init, update, args, config=config, workdir=group_dir, kind=kind, log=log,
                            shardings=lambda a: state_shardings, arg_shardings=(rep, sub) + (rep,) * (len(args) - 2))
        return [plan.finish(jax.tree_util.tree_map(lambda x, i=i: x[i], batch.states), w, save_model)
                for i, w in enumerate(workdirs)]

    def run(self, kind: str, config, images_dir: str, workdir: str, log=print, save_model: bool = True):
        """Train attack ``kind`` on ``images_dir`` and write its samples; {prompt: uint8 images}."""
        return self.run_many(kind, config, [images_dir], [workdir], None, log, save_model)[0]

    def run_many(self, kind: str, config, images_dirs, workdirs, group_dir: str | None, log=print,
                 save_model: bool = True):
        """``run`` on several folders: folders with the same number of images train together
        (``train_many``, its checkpoints in ``group_dir/<n>-images``); [{prompt: images}] in order.
        Across hosts every process trains (each step over all their devices) and process 0 writes the
        results and generates the samples."""
        if kind not in KINDS:
            raise ConfigError(f"unknown attack {kind!r}; one of {KINDS}")
        self.timing = {"load": 0.0}
        t = time.time()
        if len(images_dirs) != len(workdirs):
            raise ValueError(f"{len(images_dirs)} image folders but {len(workdirs)} work dirs")
        if len(images_dirs) == 1:
            results = [self.train(kind, config, images_dirs[0], workdirs[0], log, save_model)]
        elif not group_dir:
            raise ValueError("run_many on several folders needs a group_dir for their stacked checkpoints")
        else:
            images = [self._images(config, d, log) for d in images_dirs]   # the usable images, counted
            counts = [len(x) for x in images]
            results = [None] * len(images_dirs)
            for c in sorted(set(counts)):
                idx = [i for i, k in enumerate(counts) if k == c]
                if len(idx) == 1:
                    out = [self.train(kind, config, images_dirs[idx[0]], workdirs[idx[0]], log, save_model)]
                else:
                    out = self.train_many(kind, config, [images_dirs[i] for i in idx], [workdirs[i] for i in idx],
                                          os.path.join(group_dir, f"{c}-images"), log, save_model,
                                          images=[images[i] for i in idx])
                for i, r in zip(idx, out):
                    results[i] = r
        t2 = time.time()
        # across hosts the samples are not split: process 0 generates and writes them, the others return {}
        samples = [write_samples(sd, params, config, token, w) if jax.process_index() == 0 else {}
                   for (sd, params, token), w in zip(results, workdirs)]
        self.timing.update(train=t2 - t - self.timing["load"], generate=time.time() - t2)
        return samples


def run_ti(config, images_dir: str, workdir: str, log=print):
    """Textual Inversion; returns (sd, params with the learned row, token)."""
    return Attacker(config.model).train("ti", config, images_dir, workdir, log)


def run_dreambooth(config, images_dir: str, workdir: str, log=print):
    """DreamBooth; returns (sd, fine-tuned params, identifier)."""
    return Attacker(config.model).train("dreambooth", config, images_dir, workdir, log)


def write_samples(sd, params, config, token: str, workdir: str) -> dict:
    prompts = [p.format(token) for p in config.validation_prompts]
    out = common.generate(sd, params, prompts, n_per_prompt=config.num_samples, steps=config.sample_steps,
                          guidance=config.guidance, seed=config.seed + 1)
    for prompt, imgs in out.items():
        for i, img in enumerate(imgs):
            data_lib.save_image_atomic(os.path.join(workdir, "samples", slug(prompt), f"{i:03d}.png"), img)
    return out


def run(kind: str, config, images_dir: str, workdir: str, log=print):
    return Attacker(config.model).run(kind, config, images_dir, workdir, log)
