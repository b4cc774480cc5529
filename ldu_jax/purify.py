"""Purifications ("adversarial settings"): what an attacker may do to protected photos before
personalizing on them. Each is a function of uint8 HxWx3 images (a list; any sizes) and returns
images of the same sizes:

    none                      the images unchanged
    jpeg:quality=75           a real JPEG encode/decode round trip (Pillow's libjpeg)
    blur:sigma=1.0            Gaussian blur (sigma in pixels)
    noise:sigma=0.05          additive Gaussian noise (sigma on the [0, 1] scale), clipped
    resize:factor=0.5         down-scale then up-scale back (bicubic)
    diffpure:strength=0.1,steps=10,model=sd
                              DiffPure: encode with the SD VAE, noise the latent to t* = strength,
                              denoise (DDIM with the SD UNet, unconditional; or ``model=shortcut``:
                              the shortcut DiT from flow time 1 - strength), decode
    gridpure:strength=0.1,steps=10,iterations=1
                              GrIDPure-style: DiffPure on overlapping model-sized tiles of the image
                              up-scaled to twice the model resolution, overlaps averaged, repeated

A setting is written ``name:key=value,...`` (``parse``) so configs and result tables name it in one
string; a bad one is a ``ConfigError``. The command is ``ldu_jax/cli/purify.py``
(``python -m ldu_jax.cli.purify --setting=jpeg:quality=75 --input=DIR --output=DIR``); the
diffusion models come from ``ldu_jax.sources.diffusion_models``.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import ndimage

from ldu_jax import data as data_lib
from ldu_jax.errors import ConfigError, FileFormatError, MissingError
from ldu_jax.personalize import common
from ldu_jax.sd import models as sdm
from ldu_jax.sd import schedule as sch
from ldu_jax.sd import vae as vae_lib
from ldu_jax.shortcut import sampling, targets, trainer

DEFAULTS = {
    "none": {},
    "jpeg": {"quality": 75},
    "blur": {"sigma": 1.0},
    "noise": {"sigma": 0.05, "seed": 0},
    "resize": {"factor": 0.5},
    "diffpure": {"strength": 0.1, "steps": 10, "model": "sd", "seed": 0},
    "gridpure": {"strength": 0.1, "steps": 10, "iterations": 1, "model": "sd", "seed": 0},
}
NEEDS_MODELS = ("diffpure", "gridpure")
DIFFPURE_MODELS = ("sd", "shortcut")


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    params: tuple  # sorted (key, value) pairs, defaults filled in

    def kw(self) -> dict:
        return dict(self.params)

    def __str__(self) -> str:
        given = ",".join(f"{k}={v}" for k, v in self.params if k != "seed")
        return f"{self.name}:{given}" if given else self.name


def _value(text: str, default):
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            v = float(text)
            return int(v) if isinstance(default, int) and v.is_integer() else v
        except ValueError:
            raise ConfigError(f"purification setting: {text!r} is not a number") from None
    return text


def parse(spec: str) -> Setting:
    """``"jpeg:quality=75"`` -> Setting; unknown names or keys are ``ConfigError``s that name them."""
    name, _, rest = str(spec).strip().partition(":")
    if name not in DEFAULTS:
        raise ConfigError(f"unknown purification {name!r}; one of {', '.join(DEFAULTS)}")
    params = dict(DEFAULTS[name])
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or key not in params:
            raise ConfigError(f"purification {name!r}: unknown or malformed option {item!r} "
                              f"(options: {', '.join(params) or 'none'})")
        params[key] = _value(val.strip(), params[key])
    return Setting(name, tuple(sorted(params.items())))


# ---------------------------------------------------------------------------- pixel purifications

def jpeg(images, quality: int = 75):
    """JPEG round trip at ``quality`` (1-95) with the real encoder."""
    if not 1 <= int(quality) <= 100:
        raise ConfigError(f"JPEG quality must be in 1..100, got {quality}")
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return out


def blur(images, sigma: float = 1.0):
    """Gaussian blur of each channel (sigma in pixels, kernel truncated at 4 sigma, reflecting edges)."""
    return [np.clip(np.rint(ndimage.gaussian_filter(np.asarray(i, np.float64), (sigma, sigma, 0))), 0, 255)
            .astype(np.uint8) for i in images]


def noise(images, sigma: float = 0.05, seed: int = 0):
    """Additive Gaussian noise with std ``sigma`` on the [0, 1] scale, rounded and clipped."""
    rng = np.random.default_rng(seed)
    return [np.clip(np.round(np.asarray(i, np.float64) + rng.normal(0, 255 * sigma, np.shape(i))), 0, 255)
            .astype(np.uint8) for i in images]


def _resize_u8(img, size_wh, resample=Image.BICUBIC):
    return np.asarray(Image.fromarray(np.asarray(img, np.uint8)).resize(size_wh, resample))


def resize(images, factor: float = 0.5):
    """Down-scale by ``factor`` and back up to the original size (bicubic)."""
    if not 0 < factor <= 1:
        raise ConfigError(f"resize factor must be in (0, 1], got {factor}")
    out = []
    for img in images:
        h, w = np.shape(img)[:2]
        small = _resize_u8(img, (max(1, round(w * factor)), max(1, round(h * factor))))
        out.append(_resize_u8(small, (w, h)))
    return out


# ---------------------------------------------------------------------------- diffusion purifications

@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionModels:
    """What DiffPure needs: an SD bundle (its VAE, and its UNet for ``model=sd``) and optionally a
    shortcut DiT on that VAE's latents (``model=shortcut``). Hashable by identity (jit-static)."""
    sd: Any
    params: Any            # {'vae', 'unet', 'text_encoder'[, 'dit']}
    dit: Any = None
    null_label: int = 0
    shortcut_steps: int = 128  # the shortcut grid: strength is rounded to a multiple of 1 / steps

    __hash__ = object.__hash__


@functools.partial(jax.jit, static_argnames=("models", "model", "steps"))
def _diffpure_batch(models, params, x, key, strength, *, model: str, steps: int):
    """[B,R,R,3] in [-1, 1] -> purified, one compiled program per (model, steps, shape)."""
    vae = vae_lib.VAE(models.sd.vae, None)
    z = vae_lib.encode(vae, params["vae"], x)
    eps = jax.random.normal(key, z.shape, z.dtype)
    if model == "sd":
        sched = sch.make_schedule(models.sd.scheduler)
        ts = sch.diffpure_timesteps(sched.num_train_timesteps, strength, steps)
        z_t = sch.add_noise(sched, z, eps, jnp.full((z.shape[0],), ts[0]))
        uncond = sdm.text_embed(models.sd, params["text_encoder"], sdm.tokenize(models.sd, [""]))
        uncond = jnp.repeat(uncond, z.shape[0], 0)
        z = sch.ddim_from(common._predictor(models.sd), params["unet"], sched, z_t, ts, uncond, uncond, guidance=1.0)
    else:
        raise ValueError(f"unknown DiffPure model {model!r}")
    return vae_lib.decode(vae, params["vae"], z)


@functools.partial(jax.jit, static_argnames=("models", "start"))
def _shortcut_batch(models, params, x, key, *, start: int):
    vae = vae_lib.VAE(models.sd.vae, None)
    z = vae_lib.encode(vae, params["vae"], x)
    k = models.shortcut_steps
    eps = jax.random.normal(key, z.shape, z.dtype)
    z_t = targets.interpolate(eps, z, jnp.full((z.shape[0],), start / k))
    labels = jnp.full((z.shape[0],), models.null_label, jnp.int32)
    z = sampling.denoise(trainer.make_apply(models.dit), params["dit"], z_t, labels, steps=k, start=start,
                         null_label=models.null_label)
    return vae_lib.decode(vae, params["vae"], z)


def diffpure_model_res(models: DiffusionModels, x, strength: float, steps: int = 10, model: str = "sd",
                       seed: int = 0, batch: int = 4):
    """DiffPure on images already at the model resolution, [N,R,R,3] float in [-1, 1]."""
    x = np.asarray(x, np.float32)
    if not 0 <= strength <= 1:
        raise ConfigError(f"DiffPure strength must be in [0, 1], got {strength}")
    if model not in DIFFPURE_MODELS:
        raise ConfigError(f"unknown DiffPure model {model!r}; one of {', '.join(DIFFPURE_MODELS)}")
    if strength == 0:
        return x.copy()
    if model == "shortcut":
        if models.dit is None:
            raise ConfigError("diffpure model=shortcut needs a shortcut model (evaluate's `shortcut` config key, "
                              "purify's --shortcut)")
        start = round((1 - strength) * models.shortcut_steps)
        if start >= models.shortcut_steps:
            return x.copy()
        fn = functools.partial(_shortcut_batch, models, start=start)
    else:
        fn = functools.partial(_diffpure_batch, models, strength=jnp.float32(strength), model=model,
                               steps=int(steps))
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        pad = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)]) if len(chunk) < batch else chunk
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        out.append(np.asarray(fn(models.params, jnp.asarray(pad), key))[:len(chunk)])
    return np.concatenate(out)


def _to_model(img, res):
    return _resize_u8(img, (res, res)).astype(np.float32) / 127.5 - 1


def diffpure(images, models: DiffusionModels, strength: float = 0.1, steps: int = 10, model: str = "sd",
             seed: int = 0):
    """DiffPure each image: resized to the model resolution, purified, resized back to its size."""
    if strength == 0:
        return [np.asarray(i, np.uint8).copy() for i in images]
    res = models.sd.resolution
    x = np.stack([_to_model(i, res) for i in images])
    y = data_lib.to_uint8(diffpure_model_res(models, x, strength, steps, model, seed))
    return [_resize_u8(o, (np.shape(i)[1], np.shape(i)[0])) for o, i in zip(y, images)]


def gridpure(images, models: DiffusionModels, strength: float = 0.1, steps: int = 10, iterations: int = 1,
             model: str = "sd", seed: int = 0):
    """GrIDPure-style tiled DiffPure: each image is up-scaled to 2R x 2R, cut into 3 x 3 tiles of
    R x R with stride R / 2, every tile purified, overlaps averaged; ``iterations`` times."""
    res = models.sd.resolution
    big, stride = 2 * res, res // 2
    starts = list(range(0, big - res + 1, stride))
    out = []
    for n, img in enumerate(images):
        x = _resize_u8(img, (big, big)).astype(np.float32) / 127.5 - 1
        for it in range(iterations):
            tiles = np.stack([x[r:r + res, c:c + res] for r in starts for c in starts])
            tiles = diffpure_model_res(models, tiles, strength, steps, model, seed=seed + 1000 * n + it,
                                       batch=len(tiles))
            acc, cnt = np.zeros_like(x), np.zeros(x.shape[:2] + (1,), np.float32)
            for t, (r, c) in zip(tiles, [(r, c) for r in starts for c in starts]):
                acc[r:r + res, c:c + res] += t
                cnt[r:r + res, c:c + res] += 1
            x = acc / cnt
        out.append(_resize_u8(data_lib.to_uint8(x), (np.shape(img)[1], np.shape(img)[0])))
    return out


# ---------------------------------------------------------------------------- dispatch

def make(setting: Setting | str, models: DiffusionModels | None = None) -> Callable[[list], list]:
    """``images -> images`` for a setting; DiffPure settings need ``models`` (``sources.diffusion_models``)."""
    s = parse(setting) if isinstance(setting, str) else setting
    kw = s.kw()
    if s.name == "none":
        return lambda images: [np.asarray(i, np.uint8).copy() for i in images]
    if s.name in NEEDS_MODELS:
        if models is None:
            raise ValueError(f"purification {s.name!r} needs diffusion models")
        fn = diffpure if s.name == "diffpure" else gridpure
        return lambda images: fn(images, models, **kw)
    fn = {"jpeg": jpeg, "blur": blur, "noise": noise, "resize": resize}[s.name]
    return lambda images: fn(images, **kw)


def check_folders(input_dir: str, output_dir: str) -> None:
    """A ``MissingError`` when ``input_dir`` is not a folder, a ``ConfigError`` when ``output_dir`` is
    the same folder (cheap: callers run it before loading models)."""
    if os.path.abspath(input_dir) == os.path.abspath(output_dir):
        raise ConfigError(f"output folder {output_dir} must differ from the input folder")
    if not os.path.isdir(input_dir):
        raise MissingError(f"input folder {input_dir} does not exist")


def purify_folder(setting, input_dir: str, output_dir: str, models: DiffusionModels | None = None,
                  log=print) -> list[str]:
    """Purify every image of ``input_dir`` into ``output_dir/<stem>.png`` (atomic writes; inputs only
    read); returns the written file names. Unreadable files are reported by name and skipped.
    Bad folders raise as ``check_folders`` says; one without a readable image is a ``FileFormatError``."""
    check_folders(input_dir, output_dir)
    try:
        names, images = data_lib.read_rgb_folder(input_dir, log)
    except data_lib.DataError as e:   # no image files
        raise FileFormatError(str(e)) from None
    if not images:
        raise FileFormatError(f"{input_dir}: no readable images (jpg/png/webp)")
    out = make(setting, models)(images)
    written = []
    for name, img in zip(names, out):
        data_lib.save_image_atomic(os.path.join(output_dir, f"{name}.png"), np.asarray(img, np.uint8))
        written.append(f"{name}.png")
    return written

