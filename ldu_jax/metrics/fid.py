"""Fréchet Inception Distance with the standard FID network (TF's 2015-12-05 Inception graph).

The network is the one pytorch-fid ports (FIDInceptionA/C/E_1/E_2; BatchNorm eps 1e-3), in
inference mode: images in [0, 1] (or uint8) of any size are resized to 299x299 bilinearly
(align_corners=False, no antialias), scaled to [-1, 1], and mapped to the 2048-d pool3 features.
Weights come from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (needs torch) or from a
`.safetensors` / `.npz` file converted from it once (torch key names and layouts); the command
is ``ldu_jax/cli/fid.py``:

    python -m ldu_jax.cli.fid convert --weights=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.safetensors
    python -m ldu_jax.cli.fid stats --weights=inception_fid.safetensors --images=DIR --out=ref.npz
    python -m ldu_jax.cli.fid score --weights=inception_fid.safetensors A B   # folders or .npz

`params` below is the whole Flax variable dict {'params': ..., 'batch_stats': ...}.
Statistics files are pytorch-fid's: .npz with `mu` [2048] and `sigma` [2048, 2048].
"""

from __future__ import annotations

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ldu_jax import data as data_lib
from ldu_jax import files
from ldu_jax.errors import ConfigError, FileFormatError, MissingError

SIZE = 299
DIMS = 2048
_HI = jax.lax.Precision.HIGHEST  # f32 accuracy on GPU (TF32) and TPU (bf16 passes) too


class WeightsError(FileFormatError):
    """A weight or statistics file cannot be used (a ``ValueError`` and a ``UserError``)."""


# ----------------------------------------------------------------------------- resizing

@functools.cache
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's 1-D linear interpolation (align_corners=False).

    Source positions are computed in float32 as torch does, so the weights match its own.
    """
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = np.clip(src - i0.astype(f32), f32(0), f32(1))
    m = np.zeros((n_out, n_in), f32)
    np.add.at(m, (np.arange(n_out), i0), f32(1) - w1)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m


def resize_bilinear(images, size: int = SIZE):
    """Resize [..., H, W, C] to [..., size, size, C] as torch's bilinear interpolate (jnp)."""
    h, w = images.shape[-3], images.shape[-2]
    if (h, w) == (size, size):
        return images
    x = jnp.einsum('oh,...hwc->...owc', _resize_matrix(h, size), images, precision=_HI)
    return jnp.einsum('pw,...owc->...opc', _resize_matrix(w, size), x, precision=_HI)


def resize_bilinear_np(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """numpy twin of `resize_bilinear` for one float32 HxWxC image (host-side, any size)."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    x = np.einsum('oh,hwc->owc', _resize_matrix(h, size), image)
    return np.einsum('pw,owc->opc', _resize_matrix(w, size), x).astype(np.float32)


# ----------------------------------------------------------------------------- network

class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm (running stats, eps 1e-3) -> ReLU; torch's BasicConv2d."""
    features: int
    kernel: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=_HI, name='conv')(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
        return nn.relu(x)


def _avg3(x):  # 3x3 stride-1 average over the in-image pixels only (count_include_pad=False)
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x):
    return nn.max_pool(x, (3, 3), (2, 2))


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name='branch1x1')(x)
        b5 = BasicConv(48, name='branch5x5_1')(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
        b3 = BasicConv(64, name='branch3x3dbl_1')(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
        bp = BasicConv(self.pool_features, name='branch_pool')(_avg3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
        bd = BasicConv(64, name='branch3x3dbl_1')(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
        bd = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
        return jnp.concatenate([b3, bd, _max3s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        row, col = {'kernel': (1, 7), 'padding': (0, 3)}, {'kernel': (7, 1), 'padding': (3, 0)}
        b1 = BasicConv(192, name='branch1x1')(x)
        b7 = BasicConv(c, name='branch7x7_1')(x)
        b7 = BasicConv(c, **row, name='branch7x7_2')(b7)
        b7 = BasicConv(192, **col, name='branch7x7_3')(b7)
        bd = BasicConv(c, name='branch7x7dbl_1')(x)
        bd = BasicConv(c, **col, name='branch7x7dbl_2')(bd)
        bd = BasicConv(c, **row, name='branch7x7dbl_3')(bd)
        bd = BasicConv(c, **col, name='branch7x7dbl_4')(bd)
        bd = BasicConv(192, **row, name='branch7x7dbl_5')(bd)
        bp = BasicConv(192, name='branch_pool')(_avg3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, name='branch3x3_1')(x)
        b3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
        b7 = BasicConv(192, name='branch7x7x3_1')(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
        return jnp.concatenate([b3, b7, _max3s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """E_1 (`pool='avg'`, count_include_pad=False) or E_2 (`pool='max'`) of the FID graph."""
    pool: str

    @nn.compact
    def __call__(self, x):
        row, col = {'kernel': (1, 3), 'padding': (0, 1)}, {'kernel': (3, 1), 'padding': (1, 0)}
        b1 = BasicConv(320, name='branch1x1')(x)
        b3 = BasicConv(384, name='branch3x3_1')(x)
        b3 = jnp.concatenate([BasicConv(384, **row, name='branch3x3_2a')(b3),
                              BasicConv(384, **col, name='branch3x3_2b')(b3)], axis=-1)
        bd = BasicConv(448, name='branch3x3dbl_1')(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
        bd = jnp.concatenate([BasicConv(384, **row, name='branch3x3dbl_3a')(bd),
                              BasicConv(384, **col, name='branch3x3dbl_3b')(bd)], axis=-1)
        if self.pool == 'avg':
            p = _avg3(x)
        else:
            p = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        bp = BasicConv(192, name='branch_pool')(p)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """Images [N, H, W, 3] float in [0, 1] -> pool3 features [N, 2048] (inference only).

    Submodule names are torchvision's / pytorch-fid's, so weights map one to one.
    """

    @nn.compact
    def __call__(self, images):
        x = resize_bilinear(images.astype(jnp.float32)) * 2.0 - 1.0
        x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
        x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
        x = _max3s2(x)
        x = BasicConv(80, name='Conv2d_3b_1x1')(x)
        x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
        x = _max3s2(x)
        x = FIDInceptionA(32, name='Mixed_5b')(x)
        x = FIDInceptionA(64, name='Mixed_5c')(x)
        x = FIDInceptionA(64, name='Mixed_5d')(x)
        x = InceptionB(name='Mixed_6a')(x)
        for name, c in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
            x = FIDInceptionC(c, name=name)(x)
        x = InceptionD(name='Mixed_7a')(x)
        x = FIDInceptionE('avg', name='Mixed_7b')(x)
        x = FIDInceptionE('max', name='Mixed_7c')(x)
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------- weights

# (collection, flax leaf) <-> torch suffix
_LEAF_TO_TORCH = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
                  ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
                  ('batch_stats', 'var'): 'running_var'}
_IGNORED = ('fc.weight', 'fc.bias')  # the 1008-way classifier; not part of pool3


@functools.lru_cache(maxsize=1)
def _template() -> dict:
    """{flat flax path: shape} of the variables, traced once (no compute)."""
    shapes = jax.eval_shape(InceptionV3FID().init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))
    return {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}


def _torch_name(path: tuple) -> str:
    return '.'.join(path[1:-1]) + '.' + _LEAF_TO_TORCH[(path[0], path[-1])]


def _is_ignored(key: str) -> bool:
    return key in _IGNORED or key.endswith('.num_batches_tracked')


def params_from_state_dict(state: dict, source: str = 'state dict') -> dict:
    """Flax variables from {torch key: array} (pytorch-fid layout); errors name `source` and keys."""
    flat, missing, bad_shape = {}, [], []
    expected = set()
    for path, shape in _template().items():
        key = _torch_name(path)
        expected.add(key)
        if key not in state:
            missing.append(key)
            continue
        a = np.asarray(state[key], np.float32)
        if path[-1] == 'kernel':
            a = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a  # OIHW -> HWIO
        if a.shape != tuple(shape):
            bad_shape.append(f'{key} {np.shape(state[key])}')
            continue
        flat[path] = jnp.asarray(a)
    unexpected = sorted(k for k in state if k not in expected and not _is_ignored(k))
    problems = []
    if missing:
        problems.append(f'missing keys ({len(missing)}): {", ".join(missing[:10])}'
                        + (' ...' if len(missing) > 10 else ''))
    if unexpected:
        problems.append(f'unexpected keys ({len(unexpected)}): {", ".join(unexpected[:10])}'
                        + (' ...' if len(unexpected) > 10 else ''))
    if bad_shape:
        problems.append(f'wrong shapes: {", ".join(bad_shape[:10])}')
    if problems:
        raise WeightsError(f'{source}: not FID Inception weights: ' + '; '.join(problems))
    return traverse_util.unflatten_dict(flat)


def state_dict_from_params(params: dict) -> dict[str, np.ndarray]:
    """{torch key: float32 array} in torch layout (the converted-file layout)."""
    out = {}
    for path, v in traverse_util.flatten_dict(params).items():
        a = np.asarray(v, np.float32)
        out[_torch_name(path)] = np.ascontiguousarray(a.transpose(3, 2, 0, 1) if path[-1] == 'kernel' else a)
    return out


def init_random(seed: int = 0) -> dict:
    """Random variables (He-normal convs, identity BatchNorm), for tests; fast (no forward)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in _template().items():
        if path[-1] == 'kernel':
            a = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:3]))
        elif path[-1] in ('scale', 'var'):
            a = np.ones(shape)
        else:
            a = np.zeros(shape)
        flat[path] = jnp.asarray(a, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def _load_torch(path: pathlib.Path) -> dict:
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f'{path}: reading a PyTorch .pth file needs torch: `pip install torch`, or convert it once '
            f'where torch is installed: python -m ldu_jax.cli.fid convert --weights={path} '
            f'--out=inception_fid.safetensors') from None
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files; reported by name
        raise WeightsError(f'{path}: cannot read as a torch state dict ({type(e).__name__}: {e})') from None
    if not isinstance(state, dict):
        raise WeightsError(f'{path}: expected a state dict, found {type(state).__name__}')
    return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, 'detach')}


def load_weights(path) -> dict:
    """Variables from pytorch-fid's .pth (needs torch) or a converted .safetensors / .npz."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingError(f'FID Inception weights {path} not found')
    suffix = path.suffix.lower()
    if suffix in ('.pth', '.pt', '.bin'):
        state = _load_torch(path)
    elif suffix == '.safetensors':
        from safetensors.numpy import load_file
        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - reported by name
            raise WeightsError(f'{path}: cannot read as safetensors ({type(e).__name__}: {e})') from None
    elif suffix == '.npz':
        try:
            with np.load(path, allow_pickle=False) as z:
                state = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - reported by name
            raise WeightsError(f'{path}: cannot read as .npz ({type(e).__name__}: {e})') from None
    else:
        raise WeightsError(f'{path}: unknown weight format {suffix!r} (use .pth, .safetensors or .npz)')
    return params_from_state_dict(state, str(path))


def save_weights(path, params) -> None:
    """Write variables as .safetensors or .npz (torch key names and layouts), atomically."""
    path = pathlib.Path(path)
    state = state_dict_from_params(params)
    suffix = path.suffix.lower()
    if suffix == '.safetensors':
        from safetensors.numpy import save
        data = save(state, metadata={'format': 'pt', 'model': 'pytorch-fid InceptionV3 (FID)'})
        with files.atomic_write(path) as f:
            f.write(data)
    elif suffix == '.npz':
        with files.atomic_write(path) as f:
            np.savez(f, **state)
    else:
        raise WeightsError(f'{path}: cannot write weights as {suffix!r} (use .safetensors or .npz)')


# ----------------------------------------------------------------------------- features

@jax.jit
def _forward(params, images):
    return InceptionV3FID().apply(params, images)


def _as_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 or float [0, 1] [N, H, W, 3] -> float32 [0, 1]; clear errors otherwise."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f'expected images [N, H, W, 3], got shape {images.shape}')
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f'expected uint8 or float images in [0, 1], got dtype {images.dtype}')
    images = images.astype(np.float32)
    if images.size and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(f'float images must be in [0, 1], got [{images.min():.3g}, {images.max():.3g}] '
                         '(map [-1, 1] images with (x + 1) / 2)')
    return images


def features(params, images, batch_size: int = 50) -> np.ndarray:
    """Pool3 features [N, 2048] (float32) of uint8 or [0, 1] float images [N, H, W, 3].

    Runs in batches of exactly `batch_size` (the last one zero-padded), so each image size
    compiles once.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be positive, got {batch_size}')
    images = np.asarray(images)
    n = len(images)
    out = np.zeros((n, DIMS), np.float32)
    pending = None  # dispatch the next batch before fetching the previous one
    for start in range(0, n, batch_size):
        chunk = _as_unit_float(images[start:start + batch_size])
        k = len(chunk)
        if k < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - k,) + chunk.shape[1:], np.float32)])
        result = _forward(params, chunk)
        if pending is not None:
            s, kk, r = pending
            out[s:s + kk] = np.asarray(r)[:kk]
        pending = (start, k, result)
    if pending is not None:
        s, kk, r = pending
        out[s:s + kk] = np.asarray(r)[:kk]
    return out


# ----------------------------------------------------------------------------- statistics

def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and sample covariance [D, D] (ddof 1, as pytorch-fid), float64."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f'need features [N >= 2, D], got shape {feats.shape}')
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def save_stats(path, mu, sigma) -> None:
    """Write pytorch-fid's .npz (keys `mu`, `sigma`) atomically."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    with files.atomic_write(path) as f:
        np.savez(f, mu=mu, sigma=sigma)


def load_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a pytorch-fid .npz; errors name the file and what is wrong."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingError(f'FID statistics {path} not found')
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ('mu', 'sigma') if k not in z.files]
            if missing:
                raise WeightsError(f'{path}: missing key(s) {", ".join(missing)} (found: {", ".join(z.files)})')
            mu, sigma = z['mu'], z['sigma']
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - reported by name
        raise WeightsError(f'{path}: cannot read as .npz ({type(e).__name__}: {e})') from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise WeightsError(f'{path}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]')
    return mu, sigma


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2: the eigenvalues of S1 S2 equal those of the
    symmetric S1^(1/2) S2 S1^(1/2), so two ``eigh`` calls replace a general ``sqrtm`` (a 2048-d
    ``scipy.linalg.sqrtm`` takes ~35 s on two cores; this takes a few seconds) and stay real and
    finite for the rank-deficient covariances of small sets."""
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussian fits."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = len(mu1)
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f'mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}')
    if not (np.isfinite(s1).all() and np.isfinite(s2).all()):
        raise ValueError('frechet_distance: covariances are not finite')
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product(s1, s2))


def frechet_distance_features(f1, f2) -> float:
    """``frechet_distance`` of the Gaussian fits of two feature sets, computed from the features:
    with A = (f - mu) / sqrt(n - 1), S = A^T A and tr((S1 S2)^(1/2)) is the nuclear norm of
    A1 A2^T, an n1 x n2 matrix: exact, and fast for sets smaller than the feature dimension."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f'expected two [N >= 2, D] feature sets, got {f1.shape} and {f2.shape}')
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a1, a2 = (f1 - mu1) / np.sqrt(len(f1) - 1), (f2 - mu2) / np.sqrt(len(f2) - 1)
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2.0 * nuclear)


def fid(params, images_a, images_b, batch_size: int = 50) -> float:
    """FID between two image sets (uint8 or [0, 1] float [N, H, W, 3], N >= 2 each)."""
    f1, f2 = features(params, images_a, batch_size), features(params, images_b, batch_size)
    if len(f1) * len(f2) <= DIMS * DIMS:
        return frechet_distance_features(f1, f2)
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def fid_to_stats(params, images, stats_path, batch_size: int = 50) -> float:
    """FID between an image set and precomputed statistics (pytorch-fid .npz)."""
    mu2, s2 = load_stats(stats_path)
    mu1, s1 = gaussian_stats(features(params, images, batch_size))
    return frechet_distance(mu1, s1, mu2, s2)


# ----------------------------------------------------------------------------- folders

def _read_image(path) -> np.ndarray:
    """One file as pytorch-fid reads it (PIL, .convert('RGB'), original size) resized to 299, [0, 1]."""
    with Image.open(path) as img:
        a = np.asarray(img.convert('RGB'), np.float32) / 255.0
    return resize_bilinear_np(a)


def folder_features(params, folder, batch_size: int = 50, log=print):
    """(features [N, 2048], [(path, reason)] of unreadable files) of every image under `folder`;
    a missing folder, or one without image files, is a ``MissingError``."""
    if not pathlib.Path(folder).is_dir():
        raise MissingError(f'image folder {folder} does not exist')
    try:
        paths = data_lib.list_images(folder)
    except data_lib.DataError as e:   # no image files
        raise MissingError(str(e)) from None
    feats, bad, batch = [], [], []

    def flush():
        if batch:
            feats.append(features(params, np.stack(batch), batch_size))
            batch.clear()

    for p in tqdm(paths, desc=f'FID features {folder}', dynamic_ncols=True, disable=None):
        try:
            batch.append(_read_image(p))
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            bad.append((p, f'cannot decode ({type(e).__name__}: {e})'))
        if len(batch) == batch_size:
            flush()
    flush()
    data_lib.report_bad(bad, len(paths), log)
    return (np.concatenate(feats) if feats else np.zeros((0, DIMS), np.float32)), bad


def folder_stats(params, folder, batch_size: int = 50, log=print):
    """((mu, sigma), number of images used, [(path, reason)] of unreadable files) of a folder;
    fewer than two readable images is a ``FileFormatError``."""
    feats, bad = folder_features(params, folder, batch_size, log)
    if len(feats) < 2:
        raise FileFormatError(f'{folder}: {len(feats)} readable image(s); FID statistics need at least 2')
    return gaussian_stats(feats), len(feats), bad


@functools.lru_cache(maxsize=1)
def _load_weights_once(path: str) -> dict:
    return load_weights(path)


def stats_of(source, weights=None, batch_size: int = 50, log=print):
    """((mu, sigma), [(path, reason)] of unreadable files) of an .npz statistics file or an image
    folder (whose features need the Inception ``weights`` file, loaded once for several calls)."""
    if pathlib.Path(source).suffix.lower() == '.npz':
        return load_stats(source), []
    if not weights:
        raise ConfigError(f'{source} is a folder: --weights is needed to compute its features')
    stats, _, bad = folder_stats(_load_weights_once(str(weights)), source, batch_size, log)
    return stats, bad


def fid_of_sources(a, b, weights=None, batch_size: int = 50, log=print):
    """(FID, [(path, reason)] of unreadable files) between two sources, each an image folder or an
    .npz statistics file (``stats_of``); statistics of different dimensions are a ``FileFormatError``."""
    (mu1, s1), bad1 = stats_of(a, weights, batch_size, log)
    (mu2, s2), bad2 = stats_of(b, weights, batch_size, log)
    if mu1.shape != mu2.shape:
        raise FileFormatError(f'{a} has {len(mu1)}-d statistics but {b} has {len(mu2)}-d ones')
    return frechet_distance(mu1, s1, mu2, s2), bad1 + bad2
