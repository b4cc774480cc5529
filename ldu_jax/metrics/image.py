"""Image quality metrics for images in [0, 1]: HxWxC, or batched ...xHxWxC (one value per image).

mse, psnr and linf are numpy (float64); ssim is jax.numpy (jitted, differentiable, usable
inside other jitted code) and also accepts numpy arrays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _pair(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim < 3:
        raise ValueError(f'expected two images of equal shape ...xHxWxC, got {a.shape} and {b.shape}')
    return a, b


def mse(a, b):
    """Mean squared error per image."""
    a, b = _pair(a, b)
    return np.square(a - b).mean(axis=(-3, -2, -1))


def psnr(a, b, data_range: float = 1.0):
    """Peak signal-to-noise ratio in dB per image; inf for identical images."""
    m = mse(a, b)
    with np.errstate(divide='ignore'):
        return 10.0 * np.log10(data_range ** 2 / m)


def linf(a, b):
    """Largest absolute difference per image."""
    a, b = _pair(a, b)
    return np.abs(a - b).max(axis=(-3, -2, -1))


def gaussian_kernel(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """Normalised 1-D Gaussian, radius int(truncate * sigma + 0.5) (11 taps for sigma 1.5)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


@functools.partial(jax.jit, static_argnames=('data_range', 'sigma', 'k1', 'k2'))
def ssim(a, b, data_range: float = 1.0, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03):
    """Structural similarity (Wang et al. 2004) per image, averaged over channels.

    Gaussian window (sigma 1.5, 11x11), population statistics, mean over the 'valid' region:
    matches skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, channel_axis=-1).
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.ndim < 3:
        raise ValueError(f'expected two images of equal shape ...xHxWxC, got {a.shape} and {b.shape}')
    dtype = jnp.result_type(a.dtype, b.dtype, jnp.float32)
    *batch, h, w, c = a.shape
    kern = gaussian_kernel(sigma)
    if min(h, w) < kern.size:
        raise ValueError(f'ssim needs images of at least {kern.size}x{kern.size}, got {h}x{w}')

    def planes(x):  # [..., H, W, C] -> [N * C, 1, H, W]
        x = jnp.moveaxis(x.astype(dtype).reshape(-1, h, w, c), -1, 1)
        return x.reshape(-1, 1, h, w)

    x, y = planes(a), planes(b)
    stats = jnp.concatenate([x, y, x * x, y * y, x * y], axis=0)
    kern = jnp.asarray(kern, dtype)
    for shape in ((1, 1, -1, 1), (1, 1, 1, -1)):  # separable: rows, then columns
        stats = jax.lax.conv_general_dilated(stats, kern.reshape(shape), (1, 1), 'VALID',
                                             precision=jax.lax.Precision.HIGHEST)
    mx, my, mxx, myy, mxy = jnp.split(stats, 5, axis=0)
    vx, vy, cov = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    per_channel = smap.reshape(-1, c, smap.shape[-2], smap.shape[-1]).mean(axis=(-2, -1))
    return per_channel.mean(axis=-1).reshape(batch)
