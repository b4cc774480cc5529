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
    h, w = a.shape[-3:-1]
    kern = [float(v) for v in gaussian_kernel(sigma)]  # Python floats keep the input's dtype
    n = len(kern)
    if min(h, w) < n:
        raise ValueError(f'ssim needs images of at least {n}x{n}, got {h}x{w}')
    x, y = a.astype(dtype), b.astype(dtype)
    stats = jnp.stack([x, y, x * x, y * y, x * y])

    def blur(z):  # separable 'valid' Gaussian filter over the H and W axes, as shifted sums
        z = sum(kern[i] * z[..., i:i + h - n + 1, :, :] for i in range(n))  # (XLA CPU's conv
        return sum(kern[i] * z[..., i:i + w - n + 1, :] for i in range(n))  # is far slower)

    mx, my, mxx, myy, mxy = blur(stats)
    vx, vy, cov = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap.mean(axis=(-3, -2)).mean(axis=-1)  # per channel, then over channels


def as_images(images, what: str = 'images') -> list[np.ndarray]:
    """A list of contiguous uint8 HxWx3 arrays from a list of images or an NxHxWxC array."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f'{what}: expected a list of images or an NxHxWxC array, got an array of shape '
                             f'{images.shape} (wrap a single image in a list)')
        images = list(images)
    out = []
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.dtype != np.uint8:
            raise ValueError(f'{what}[{i}]: expected uint8 pixels, got {img.dtype}')
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        elif img.ndim == 3 and img.shape[-1] == 4:
            img = img[..., :3]
        elif img.ndim == 3 and img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f'{what}[{i}]: expected an HxWx3 image, got shape {img.shape}')
        out.append(np.ascontiguousarray(img))
    return out
