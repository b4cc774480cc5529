"""The baselines' method names, config defaults and checks, and their fixed inputs (``prepare``):
the prompt's token ids, the photoguard / mist target, the DreamBooth surrogates' class images."""
from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from ldu_jax import data as data_lib
from ldu_jax.errors import ConfigError, MissingError
from ldu_jax.personalize import dreambooth
from ldu_jax.sd import models as sdm

METHODS = ("advdm", "aspl", "fsmg", "photoguard", "mist", "sds", "sds-", "pid")

SD_PARTS = ("vae", "unet", "text_encoder")


# ----------------------------------------------------------------------------- configuration

def base_config(method: str) -> ml_collections.ConfigDict:
    """Defaults shared by every baseline config (``configs/protect_<method>_*.py`` override them)."""
    if method not in METHODS:
        raise ConfigError(f"unknown baseline {method!r}; one of {', '.join(METHODS)}")
    c = ml_collections.ConfigDict()
    c.method = method
    c.seed = 0
    c.sd = "tiny"                  # Stable Diffusion: 'tiny', a diffusers folder or a hub id
    c.resolution = 0               # 0: the SD model's resolution
    c.dtype = "float32"            # compute dtype of the SD parts (params stay float32)
    c.remat = False                # recompute the VAE encoder / UNet in the backward pass (memory)
    # PGD; budgets in [0, 1] units (L-inf)
    c.eps = 16 / 255
    c.step_size = 1 / 255
    c.steps = 100                  # PGD steps (aspl: per round)
    c.random_start = False         # start from a uniform draw in the eps-ball
    c.step_decay = "none"          # 'none' or 'linear' (step_size -> step_size / 100 over the run)
    c.n_draws = 1                  # EOT: (latent sample, t, noise) draws per PGD step
    c.resample_draws = True        # fresh draws every step (EOT); False: the same draws throughout
    c.t_min = 0                    # timesteps drawn from [t_min, t_max); t_max 0: all of them
    c.t_max = 0
    c.prompt = "a photo of sks person"
    # photoguard / mist target: 'pattern' (built-in texture), 'zero' (photoguard only), or an image path
    c.target = "pattern"
    c.rate = 1e4                   # mist: weight of the semantic (noise-prediction) loss
    c.pid_loss = "add-log"         # pid: 'add-log' (mean + log-variance), 'mean', 'var'
    # aspl / fsmg: the DreamBooth surrogate (ldu_jax.personalize.dreambooth settings)
    c.rounds = 50                  # aspl rounds
    c.surrogate_steps = 3          # aspl: DreamBooth steps per phase; fsmg: training steps before PGD
    c.surrogate = ml_collections.ConfigDict({
        "lr": 5e-6, "weight_decay": 1e-2, "max_grad_norm": 1.0, "grad_accum": 1, "batch_size": 2,
        "train_text_encoder": True, "lora_rank": 0, "lora_alpha": 4.0,
        "prior_weight": 0.0, "class_prompt": "a photo of person", "class_dir": "", "num_class_images": 200,
        "class_steps": 50, "class_guidance": 7.5})
    # apply
    c.apply_batch = 4              # images per protected batch (aspl / fsmg: one identity's set)
    return c


def config_name(method: str) -> str:
    """The <name> of configs/protect_<name>_{tiny,sd21}.py for a method."""
    return "sds_minus" if method == "sds-" else method


def check_config(method: str, cfg) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown baseline {method!r}; one of {', '.join(METHODS)}")
    got = cfg.get("method")
    if got != method:
        raise ConfigError(f"--method={method} needs a baseline config for it (e.g. "
                          f"configs/protect_{config_name(method)}_tiny.py), got one for {got or 'LDU'!r}")
    if not (0 < cfg.eps <= 1 and cfg.step_size > 0):
        raise ConfigError(f"eps must be in (0, 1] and step_size > 0 ([0, 1] units), got {cfg.eps}, {cfg.step_size}")
    if cfg.step_decay not in ("none", "linear"):
        raise ConfigError(f"step_decay must be 'none' or 'linear', got {cfg.step_decay!r}")
    if cfg.pid_loss not in ("add-log", "mean", "var"):
        raise ConfigError(f"pid_loss must be 'add-log', 'mean' or 'var', got {cfg.pid_loss!r}")
    if cfg.n_draws < 1:
        raise ConfigError(f"n_draws must be >= 1, got {cfg.n_draws}")
    if method == "mist" and cfg.target == "zero":
        raise ConfigError("mist needs a target image ('pattern' or a path), not 'zero'")


# ----------------------------------------------------------------------------- inputs

def pattern_image(resolution: int) -> np.ndarray:
    """The built-in target: a high-contrast colour texture (checkers, rings, stripes), [R, R, 3] in
    [-1, 1]; deterministic, so it works offline."""
    yy, xx = np.mgrid[0:resolution, 0:resolution] / float(resolution)
    checks = ((np.floor(xx * 8) + np.floor(yy * 8)) % 2) * 2 - 1
    rings = np.sin(2 * np.pi * 10 * np.hypot(xx - 0.5, yy - 0.5))
    stripes = np.sin(2 * np.pi * (12 * xx + 5 * yy))
    img = np.stack([0.8 * checks + 0.2 * rings, 0.7 * rings - 0.3 * stripes, 0.6 * stripes - 0.4 * checks], -1)
    return np.clip(img, -1, 1).astype(np.float32)


def target_image(spec: str, resolution: int) -> np.ndarray | None:
    """[1, R, R, 3] in [-1, 1] for 'pattern' or an image path; None for 'zero'."""
    if spec == "zero":
        return None
    if spec == "pattern":
        return pattern_image(resolution)[None]
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise MissingError(f"target image {spec} does not exist (or use 'pattern' / 'zero')")
    return data_lib.load_image(path, resolution)[None]


def prepare(method: str, sd, params, cfg, resolution: int, log=print) -> dict:
    """The SD params {'vae', 'unet', 'text_encoder'} plus the method's fixed inputs: 'ids' [L] (the
    prompt), 'target' [1, R, R, 3] (photoguard, mist), and for the DreamBooth surrogates with prior
    preservation 'class_images' [N, R, R, 3] and 'class_ids' [L]."""
    out = {k: params[k] for k in SD_PARTS}
    out["ids"] = jnp.asarray(sdm.tokenize(sd, [cfg.prompt])[0])
    if method in ("photoguard", "mist"):
        t = target_image(cfg.target, resolution)
        if t is not None:
            out["target"] = jnp.asarray(t)
    if method in ("aspl", "fsmg") and cfg.surrogate.prior_weight > 0:
        s = cfg.surrogate
        if not s.class_dir:
            raise ConfigError(f"{method} with surrogate.prior_weight > 0 needs --config.surrogate.class_dir=DIR "
                              f"(images of {s.class_prompt!r}; missing ones are generated with the model)")
        gen_cfg = ml_collections.ConfigDict({
            "num_class_images": s.num_class_images, "class_prompt": s.class_prompt, "class_steps": s.class_steps,
            "class_guidance": s.class_guidance, "seed": cfg.seed})
        out["class_images"] = jnp.asarray(dreambooth.ensure_class_images(sd, params, s.class_dir, gen_cfg, log))
        out["class_ids"] = jnp.asarray(sdm.tokenize(sd, [s.class_prompt])[0])
    return out
