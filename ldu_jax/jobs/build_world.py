"""Build the mini-world from nothing: data, then every model, each stage resumable.

    python -m ldu_jax.cli.build_world --workdir=runs/miniworld [--profile=full|test|v2|fragile] [--stages=...]

Stages (in order; a finished stage is skipped, an interrupted one resumes from its checkpoints):

    data      training images + captions (data/train), held-out subjects in the Anti-DreamBooth
              layout (data/heldout/subject_<i>/set_A|set_B|set_C)
    identity  the world's identity embedder + face detector (ISM / FDFR)      -> identity/
    vae       the VAE (factor 4: 64 px -> 16x16x4)                             -> vae/vae/
    t2i       CLIP text encoder + text-conditioned UNet, a diffusers bundle    -> t2i/sd/
    shortcut  the shortcut DiT on the VAE's latents (train.py's trainer)       -> shortcut/
    rho       LDU's ρ on these models and the training images (perturb.py's trainer) -> rho/
    export    the models to ship, without optimizer state                      -> export/

``manifest.json`` records each stage's output, wall-clock and CPU time. The ``test`` profile shrinks every
model and step count to check the whole chain in a minute or two. ``--install`` copies export/
into the package (``ldu_jax/miniworld/models``), whose models are the defaults of
``configs/*_miniworld.py`` and of ``python perturb.py``.

The ``fragile`` profile builds a world from the shipped one (issue 17's calibration): its vae stage
fine-tunes the shipped VAE's encoder to be as fragile as Stable Diffusion's (``configs/miniworld_vae.py:
fragile``), and its export is the shipped models with that VAE (``--stages=vae,export``).
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import time

import jax
import numpy as np

from ldu_jax import checkpoint as ckpt
from ldu_jax import config_file, files, parallel
from ldu_jax import data as data_lib
from ldu_jax.errors import ConfigError, MissingError
from ldu_jax.jobs import protect, train_shortcut
from ldu_jax.miniworld import MODELS, identity, world
from ldu_jax.miniworld.train_t2i import text_use, train_t2i
from ldu_jax.miniworld.train_vae import train_vae

PROFILES = ("full", "test", "v2", "fragile")
STAGES = ("data", "identity", "vae", "t2i", "shortcut", "rho", "export")
STAGE_CONFIGS = {"vae": "miniworld_vae", "t2i": "miniworld_t2i", "identity": "miniworld_identity",
                 "shortcut": "miniworld_shortcut", "rho": "ldu_miniworld"}
# what each shipped checkpoint keeps of its training state (the loaders read exactly these)
EXPORT_KEYS = {"shortcut": ("params_ema",), "identity": ("params",), "rho": ("rho",)}


def configs(profile: str = "full") -> dict:
    """The stage configs of a profile ('full': the shipped models; 'test': tiny, seconds; 'v2': the
    mini-world v2 being built (issue 17): 128 px textured portraits and SD's factor-8 VAE; its later
    stages have no recipe yet and are None)."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; one of {', '.join(PROFILES)}")
    if profile == "v2":
        return {"data": {"n_train": 512, "per_identity": 8, "n_heldout": 8, "style": "v2", "size": 128},
                "vae": config_file.load("configs/miniworld_vae.py:v2"), "identity": None, "t2i": None,
                "shortcut": None, "rho": None}
    if profile == "fragile":
        vae = config_file.load("configs/miniworld_vae.py:fragile")
        vae.init_from = os.path.join(MODELS, "sd", "vae")
        return {"data": {"n_train": 512}, "vae": vae, "identity": None, "t2i": None, "shortcut": None,
                "rho": None, "base": MODELS}
    arg = ":test" if profile == "test" else ""
    c = {stage: config_file.load(f"configs/{name}.py{arg}") for stage, name in STAGE_CONFIGS.items()}
    c["data"] = {"n_train": 512, "per_identity": 8, "n_heldout": 8} if profile != "test" else \
        {"n_train": 8, "per_identity": 2, "n_heldout": 2}
    return c


def world_batches(n_identities: int, batch_size: int, seed: int, size: int = 64, scene: bool = False,
                  style: str = "v1", sensor_noise: float = 1.0, grain: float = 1.0):
    """``start_step -> iterator`` of (images [B / n, size, size, 3] in [-1, 1], captions): this
    host's rows (``data.local_rows``; host i of n holds rows [i B / n, (i + 1) B / n)) of global
    batches of B random training identities and fresh variants, global batch k a function of
    (seed, k) only (so a resumed run continues, and any number of hosts trains on the same batches).
    ``scene``: scene captions (``world.caption``); ``style``: ``world.STYLES``; ``sensor_noise``,
    ``grain``: ``world.render``'s."""
    idents = world.train_identities(n_identities, 0)
    local = data_lib.local_rows(batch_size, jax.process_count())
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)

    def batches(start: int):
        step = start
        while True:
            rng = np.random.default_rng([seed, step])
            who = rng.integers(0, len(idents), batch_size)[rows]
            var = rng.integers(0, 10 ** 6, batch_size)[rows]
            yield (world.render_batch([idents[i] for i in who], var, size, style=style, sensor_noise=sensor_noise,
                                     grain=grain),
                   [world.caption(idents[i], v, scene) for i, v in zip(who, var)])
            step += 1
    return batches


def _manifest(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, "manifest.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _record(workdir: str, stage: str, **info):
    m = _manifest(workdir)
    m[stage] = info
    files.write_json(os.path.join(workdir, "manifest.json"), m)


def override(cfg: dict, settings) -> dict:
    """Set ``stage.key[.key...]=value`` settings (values read as Python literals, else strings) in
    the stage configs ``cfg``; returns it. An unknown stage or key is a ConfigError."""
    for setting in settings:
        name, sep, text = setting.partition("=")
        stage, *keys = name.split(".")
        if not sep or not keys or not hasattr(cfg.get(stage), "to_dict"):
            raise ConfigError(f"--set {setting}: expected <stage>.<key>=<value> for a stage config "
                              f"({', '.join(k for k, v in cfg.items() if hasattr(v, 'to_dict'))})")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node = cfg[stage]
        try:
            for k in keys[:-1]:
                node = node[k]
            if keys[-1] not in node:
                raise KeyError(keys[-1])
            node[keys[-1]] = value
        except KeyError as e:
            raise ConfigError(f"--set {setting}: {stage}'s config has no key {e}") from None
        except TypeError as e:
            raise ConfigError(f"--set {setting}: {e}") from None
    return cfg


def build(workdir: str, profile: str = "full", stages=STAGES, log=print, settings=()) -> dict:
    """Run the stages; returns the manifest {stage: {path, seconds, ...}}. ``settings``:
    ``override``'s, applied to the profile's stage configs."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    os.makedirs(workdir, exist_ok=True)
    cfg = override(configs(profile), settings)
    p = lambda *a: os.path.join(workdir, *a)  # noqa: E731
    for stage in STAGES:
        if stage not in stages:
            continue
        if _manifest(workdir).get(stage, {}).get("done"):
            log(f"[{stage}] done already ({_manifest(workdir)[stage]['path']})")
            continue
        log(f"[{stage}] building ...")
        t0, w0, c, info = time.process_time(), time.time(), cfg.get(stage), {}
        if c is None and stage != "export":
            raise ConfigError(f"profile {profile!r} has no {stage} recipe yet; build its other stages with "
                             f"--stages")
        d = cfg["data"]
        look = {"size": d.get("size", 64), "style": d.get("style", "v1")}
        if stage == "data":
            def write_data():   # process 0 writes the files; the others read them after a barrier
                if jax.process_index() == 0:
                    world.write_training_set(p("data", "train"), d["n_train"], d["per_identity"], progress=True,
                                             **look)
                    world.write_heldout_subjects(p("data", "heldout"), d["n_heldout"], **look)
            parallel.process0_first(write_data, "build_world: data")
            out = p("data")
        elif stage == "identity":
            identity.train(c, p("identity"), log=log)
            out = p("identity")
            model = identity.load(out)   # every host: orbax restores involve them all
            if jax.process_index() == 0:   # the measure is not split: process 0's own devices, no collective
                info["eval"] = identity.measure(model, n_identities=c.eval_heldout)
                log(f"[identity] held-out identities: {info['eval']}")
        elif stage == "vae":
            train_vae(c, p("vae"), world_batches(d["n_train"], c.batch_size, c.seed, look["size"],
                                                 style=look["style"]), log=log)
            out = p("vae", "vae")
        elif stage == "t2i":
            scene = bool(c.scene_captions)
            sd, params = train_t2i(c, p("t2i"), world_batches(cfg["data"]["n_train"], c.batch_size, c.seed + 1,
                                                              scene=scene),
                                   p("vae", "vae"), log=log, vocabulary=world.vocabulary(scene))
            out = p("t2i", "sd")
            if jax.process_index() == 0:   # not split: process 0 on host params (no collective)
                held = world.heldout_identities(32)
                info["text_use"] = text_use(sd, params, world.render_batch(held, np.arange(32), sd.resolution),
                                            [world.caption(h, v, scene) for v, h in enumerate(held)])
                log(f"[t2i] loss on held-out portraits with captions / shuffled / empty: {info['text_use']}")
        elif stage == "shortcut":
            c.dataset, c.vae = p("data", "train", "images"), p("vae", "vae")
            train_shortcut.train(c, p("shortcut"), log=log)
            out = p("shortcut")
        elif stage == "rho":
            c.sd, c.shortcut = p("t2i", "sd"), p("shortcut")
            c.dataset, c.rho_checkpoint = p("data", "train", "images"), ""
            protect.train_rho(c, p("rho"), log=log)
            out = p("rho")
        else:   # process 0 copies; its own devices restore and save the checkpoints
            out = parallel.process0_first(lambda: export(workdir, cfg.get("base"), local=True), "build_world: export",
                                          others=False) or p("export")
        if jax.process_index() == 0:
            _record(workdir, stage, done=True, path=out, cpu_seconds=round(time.process_time() - t0, 1),
                    wall_seconds=round(time.time() - w0, 1), profile=profile, **info)
        parallel.sync(f"build_world: {stage} recorded")   # every host sees the same manifest
        log(f"[{stage}] done in {time.time() - w0:.0f} s ({time.process_time() - t0:.0f} CPU s) -> {out}")
    return _manifest(workdir)


def export(workdir: str, base: str | None = None, local: bool = False) -> str:
    """``<workdir>/export``: the t2i bundle and the shortcut, identity and ρ checkpoints without
    their optimizer state, plus the manifest (written atomically). With ``base`` (an export): its
    models with ``<workdir>/vae/vae`` as the t2i bundle's VAE. ``local``: by this process alone
    (``checkpoint.make_manager``)."""
    out = os.path.join(workdir, "export")
    with files.atomic_dir(out) as tmp:
        if base:
            shutil.copytree(base, tmp, dirs_exist_ok=True)
            shutil.rmtree(os.path.join(tmp, "sd", "vae"))
            shutil.copytree(os.path.join(workdir, "vae", "vae"), os.path.join(tmp, "sd", "vae"))
        else:
            shutil.copytree(os.path.join(workdir, "t2i", "sd"), os.path.join(tmp, "sd"))
            for name, keys in EXPORT_KEYS.items():
                ckpt.export(os.path.join(workdir, name), os.path.join(tmp, name), keys, local=local)
        manifest = {}
        if base:
            manifest["base"] = {"path": base, **(files.read_json(os.path.join(base, "manifest.json")) or {})}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({**manifest, **_manifest(workdir)}, f, indent=1)
    return out


def install(workdir: str, dest: str = MODELS) -> str:
    """Replace the package's shipped models (``dest``) with ``<workdir>/export``."""
    src = os.path.join(workdir, "export")
    if not os.path.isfile(os.path.join(src, "manifest.json")):
        raise MissingError(f"{src} is not a finished export (run the build's export stage first)")
    with files.atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp)
    return dest
