"""No-reference image quality: BRISQUE and CLIP-IQA.

Images are uint8 HxWx3 RGB numpy arrays (HxW grey accepted by BRISQUE), as a list or an NxHxWx3
array, of any size. Each function returns one float64 score per image.

BRISQUE (Mittal et al. 2012; higher = worse, about 0-100): 36 natural-scene-statistics features
computed here in numpy/scipy, scored by the standard LIVE-trained RBF epsilon-SVR (770 support
vectors, the original release's ``allmodel`` with its feature ranges ``allrange``), evaluated here.
The model file is read (never imported or unpickled as code) from the ``brisque`` PyPI package
(``pip install --no-deps brisque==0.2.0``; its own code needs opencv and libsvm, ours does not).
The features follow that package, so scores agree with it: grey = skimage's rgb2gray in [0, 1];
MSCN with a 7x7 Gaussian (sigma 7/6), zero padding and C = 1/255; an AGGD moment-matching fit
(shape by root finding) for the MSCN map, giving (shape, (sl^2 + sr^2) / 2), and for its four
neighbour products (horizontal, vertical, both diagonals), giving (shape, mean, sl^2, sr^2);
then the same at half size (OpenCV-style bicubic resize, a = -0.75, no antialiasing).
Differences from the MATLAB original: it fits a symmetric GGD to the MSCN map, pads by
replication and halves with antialiased bicubic resizing; scores differ by a few points.

CLIP-IQA (Wang et al. 2023, zero-shot): softmax over logit_scale * cos(image, prompt) for the
antonym prompts ("Good photo.", "Bad photo."); the score is the probability of the first. The model
is ours (``ldu_jax.sd.clip.CLIPModel``, transformers' CLIPModel numerics) read from a transformers
CLIP folder or hub id; the tokenizer is transformers' CLIPTokenizer.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pickle

import numpy as np
from scipy import ndimage, optimize, special

from ldu_jax.errors import MissingError
from ldu_jax.metrics.image import as_images

BRISQUE_INSTALL = 'pip install --no-deps brisque==0.2.0'
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


# BRISQUE

def _gray(img: np.ndarray) -> np.ndarray:
    return (img.astype(np.float64) / 255.0) @ np.array([0.2125, 0.7154, 0.0721])


def _gauss7(sigma: float = 7 / 6) -> np.ndarray:
    k = np.exp(-np.arange(-3, 4) ** 2 / (2 * sigma ** 2))
    return k / k.sum()  # the normalised 7x7 kernel is the outer product of this with itself


def mscn(gray: np.ndarray, c: float = 1 / 255) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients of a grey image in [0, 1]."""
    k = _gauss7()

    def blur(x):
        return ndimage.correlate1d(ndimage.correlate1d(x, k, 0, mode='constant'), k, 1, mode='constant')

    mu = blur(gray)
    sd = np.sqrt(np.abs(mu ** 2 - blur(gray ** 2)))
    return (gray - mu) / (sd + c)


def _log_rho(a):
    return 2 * special.gammaln(2 / a) - special.gammaln(1 / a) - special.gammaln(3 / a)


def aggd_fit(x: np.ndarray) -> tuple[float, float, float, float]:
    """Moment-matching AGGD fit: (shape alpha, mean, sigma_left, sigma_right)."""
    x = np.ravel(x)
    left, right = x[x < 0], x[x >= 0]
    sl = np.sqrt(np.mean(left ** 2)) if left.size else 0.0
    sr = np.sqrt(np.mean(right ** 2)) if right.size else 0.0
    g = sl / sr if sr > 0 else 1.0
    r_hat = np.mean(np.abs(x)) ** 2 / max(np.mean(x ** 2), 1e-300)
    big_r = r_hat * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
    lo, hi = 0.05, 50.0  # rho(alpha) rises monotonically from 0 to 0.75
    target = np.log(max(big_r, 1e-300))
    if target <= _log_rho(lo):
        alpha = lo
    elif target >= _log_rho(hi):
        alpha = hi
    else:
        alpha = optimize.brentq(lambda a: _log_rho(a) - target, lo, hi, xtol=1e-14, rtol=1e-14)
    mean = (sr - sl) * np.exp(special.gammaln(2 / alpha) - 0.5 * (special.gammaln(1 / alpha)
                                                                     + special.gammaln(3 / alpha)))
    return float(alpha), float(mean), float(sl), float(sr)


def _scale_features(gray: np.ndarray) -> list[float]:
    m = mscn(gray)
    a, _, sl, sr = aggd_fit(m)
    feats = [a, (sl ** 2 + sr ** 2) / 2]
    for p in (m[:, :-1] * m[:, 1:], m[:-1, :] * m[1:, :], m[:-1, :-1] * m[1:, 1:], m[1:, :-1] * m[:-1, 1:]):
        a, mean, sl, sr = aggd_fit(p)
        feats += [a, mean, sl ** 2, sr ** 2]
    return feats


def half_bicubic(x: np.ndarray) -> np.ndarray:
    """Halve a 2-D array as OpenCV's resize(fx=fy=0.5, INTER_CUBIC): bicubic (a = -0.75) sampled at
    2i + 0.5, edge-clamped, no antialiasing; odd sizes round half to even."""
    w = np.array([-0.09375, 0.59375, 0.59375, -0.09375])
    for axis in (0, 1):
        n = x.shape[axis]
        m = int(np.rint(n * 0.5))
        idx = np.clip(2 * np.arange(m)[:, None] + np.arange(-1, 3)[None, :], 0, n - 1)
        x = np.tensordot(np.take(x, idx, axis=axis), w, axes=([axis + 1], [0]))
    return x


def brisque_features(img: np.ndarray) -> np.ndarray:
    """The 36 BRISQUE features of one uint8 image (18 at full size, then 18 at half size)."""
    (img,) = as_images([img], 'img')
    gray = _gray(img)
    if min(gray.shape) < 16:
        raise ValueError(f'brisque: image of shape {img.shape} is too small (at least 16x16)')
    return np.array(_scale_features(gray) + _scale_features(half_bicubic(gray)))


class BrisqueModel:
    """The RBF epsilon-SVR: support vectors ``sv`` (n, 36), ``coef`` (n,), ``rho``, ``gamma``, and
    the feature ranges ``lo``, ``hi`` mapped to [-1, 1] before the SVR."""

    def __init__(self, sv, coef, rho, gamma, lo, hi):
        self.sv, self.coef = np.asarray(sv, np.float64), np.asarray(coef, np.float64)
        self.rho, self.gamma = float(rho), float(gamma)
        self.lo, self.hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        f = np.atleast_2d(features)
        z = -1 + 2 * (f - self.lo) / (self.hi - self.lo)
        d2 = ((z[:, None, :] - self.sv[None]) ** 2).sum(-1)
        return np.exp(-self.gamma * d2) @ self.coef - self.rho


class _DataOnly(pickle.Unpickler):
    def find_class(self, module, name):  # plain dicts / lists / floats only: no code is loaded
        raise pickle.UnpicklingError(f'refusing to load {module}.{name}')


def _read_svm(path: str):
    header, rows = {}, []
    with open(path) as f:
        for line in f:
            if line.strip() == 'SV':
                break
            key, *val = line.split()
            header[key] = val
        for line in f:
            if line.strip():
                coef, *items = line.split()
                rows.append((float(coef), {int(k): float(v) for k, v in (t.split(':') for t in items)}))
    if header.get('svm_type') != ['epsilon_svr'] or header.get('kernel_type') != ['rbf']:
        raise ValueError(f'{path}: expected an epsilon_svr model with an rbf kernel, got {header}')
    dim = max(max(r, default=0) for _, r in rows)
    sv = np.zeros((len(rows), dim))
    for i, (_, r) in enumerate(rows):
        for k, v in r.items():
            sv[i, k - 1] = v
    return sv, np.array([c for c, _ in rows]), float(header['rho'][0]), float(header['gamma'][0])


@functools.lru_cache(maxsize=2)
def load_brisque_model(model_dir: str | None = None) -> BrisqueModel:
    """The SVR from ``model_dir`` (``svm.txt`` in libsvm format and ``normalize.pickle`` with the
    feature ranges ``min_``/``max_``); by default the files the ``brisque`` package ships."""
    if model_dir is None:
        spec = importlib.util.find_spec('brisque')  # located, not imported (its code needs opencv)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f'BRISQUE needs the LIVE model file shipped by the brisque package: {BRISQUE_INSTALL}')
        model_dir = os.path.join(next(iter(spec.submodule_search_locations)), 'models')
    svm, ranges = os.path.join(model_dir, 'svm.txt'), os.path.join(model_dir, 'normalize.pickle')
    for p in (svm, ranges):
        if not os.path.isfile(p):
            raise FileNotFoundError(f'{p}: missing BRISQUE model file ({BRISQUE_INSTALL})')
    sv, coef, rho, gamma = _read_svm(svm)
    with open(ranges, 'rb') as f:
        r = _DataOnly(f).load()
    if not isinstance(r, dict) or 'min_' not in r or 'max_' not in r:
        raise ValueError(f"{ranges}: expected a dict with keys 'min_' and 'max_'")
    lo, hi = np.asarray(r['min_'], np.float64), np.asarray(r['max_'], np.float64)
    if not lo.shape == hi.shape == (sv.shape[1],) == (36,):
        raise ValueError(f'{model_dir}: expected 36 features, got {sv.shape[1]} support-vector columns '
                         f'and ranges of shapes {lo.shape}, {hi.shape}')
    return BrisqueModel(sv, coef, rho, gamma, lo, hi)


def brisque(images, *, model_dir: str | None = None) -> np.ndarray:
    """BRISQUE score per image (higher = worse quality)."""
    model = load_brisque_model(model_dir)
    feats = np.stack([brisque_features(img) for img in as_images(images)])
    return model(feats)


# --------------------------------------------------------------------------------------------
# CLIP-IQA

_CLIP_HUB_FILES = ('config.json', 'model.safetensors', 'model.safetensors.index.json', 'model-*.safetensors',
                   'vocab.json', 'merges.txt', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'added_tokens.json')


@functools.lru_cache(maxsize=2)
def load_clip(source: str, allow_pickle: bool = False):
    """(ldu_jax.sd.clip.CLIPModel, params, CLIPTokenizer) from a transformers CLIP folder (config.json;
    flax_model.msgpack, model.safetensors, or a pytorch_model.bin only with ``allow_pickle`` or
    LDU_JAX_ALLOW_PICKLE=1) or a hub id (its config, safetensors and tokenizer are downloaded).
    Every parameter is read from the files, strictly; none is initialised at random."""
    import jax

    from ldu_jax.sd import clip, clip_tokenizer, weights
    folder = source if os.path.isdir(source) else _download_clip(source)
    path = os.path.join(folder, 'config.json')
    if not os.path.isfile(path):
        raise MissingError(f'{source}: no CLIP config ({path} not found)')
    with open(path) as f:
        model = clip.CLIPModel(clip.CLIPConfig.from_dict(json.load(f), path))
    shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    params = weights.load(folder, 'clip', shapes, allow_pickle)
    return model, params, clip_tokenizer.load(folder, f'{source}: the CLIP tokenizer')


def _download_clip(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, allow_patterns=list(_CLIP_HUB_FILES))


def clip_preprocess(img: np.ndarray, size: int) -> np.ndarray:
    """CLIP's preprocessing: shortest side to ``size`` (PIL bicubic), centre crop, mean/std; CxHxW."""
    from PIL import Image
    (img,) = as_images([img], 'img')
    h, w = img.shape[:2]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC), np.float64)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = (x[top:top + size, left:left + size] / 255.0 - CLIP_MEAN) / CLIP_STD
    return x.transpose(2, 0, 1).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _iqa_fn(model):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def fn(params, pixels, ids):
        pixels = pixels.transpose(0, 2, 3, 1)    # CxHxW (clip_preprocess, as transformers') -> our NHWC
        img = model.apply({'params': params}, pixels, method=model.get_image_features)
        txt = model.apply({'params': params}, ids, method=model.get_text_features)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        logits = jnp.exp(params['logit_scale']) * img @ txt.T
        return jax.nn.softmax(logits, axis=-1)[:, 0]
    return fn


def clip_iqa(images, clip_source, *, prompts=('Good photo.', 'Bad photo.'), batch_size: int = 32) -> np.ndarray:
    """CLIP-IQA score per image in [0, 1]: P(prompts[0]) of the softmax over the two prompts.
    ``clip_source``: a folder or hub id, or a (ldu_jax.sd.clip.CLIPModel, params, CLIPTokenizer) triple."""
    model, params, tok = load_clip(clip_source) if isinstance(clip_source, str) else clip_source
    if len(prompts) != 2:
        raise ValueError(f'clip_iqa: expected two antonym prompts, got {prompts!r}')
    if tok.padding_side != 'right':    # the text features take no mask: right padding is never attended to
        raise ValueError(f'clip_iqa: the tokenizer pads on the {tok.padding_side}; CLIP pads on the right')
    t = tok(list(prompts), padding=True, return_tensors='np')
    size = model.config.vision_config.image_size
    images = as_images(images)
    fn, out, bs = _iqa_fn(model), [], max(1, min(batch_size, len(images)))
    for i in range(0, len(images), bs):
        px = np.stack([clip_preprocess(img, size) for img in images[i:i + bs]])
        n = len(px)
        px = np.concatenate([px, np.zeros((bs - n,) + px.shape[1:], px.dtype)])  # one compiled shape
        out.append(np.asarray(fn(params, px, t['input_ids']))[:n])
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
