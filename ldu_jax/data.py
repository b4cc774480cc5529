"""Image folders in and out: listing, robust decoding, deterministic batches, saving.

Images are float32 HxWx3 arrays in [-1, 1]. Nothing here uses JAX or global state.
"""

from __future__ import annotations

import math
import pathlib
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ldu_jax import files
from ldu_jax.errors import ConfigError, FileFormatError

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')

_ALPHA_MODES = ('RGBA', 'LA', 'PA', 'La', 'RGBa')
_WHITE = (255, 255, 255)


class DataError(FileFormatError):
    """A dataset folder or image file cannot be used."""


def list_images(root) -> list[pathlib.Path]:
    """Image files under `root`, recursive and sorted; hidden files and folders are skipped."""
    root = pathlib.Path(root)
    if not root.exists():
        raise DataError(f'dataset folder {root} does not exist')
    if not root.is_dir():
        raise DataError(f'dataset path {root} is not a folder')
    paths = sorted(
        p for p in root.rglob('*')
        if p.suffix.lower() in IMAGE_EXTS
        and not any(part.startswith('.') for part in p.relative_to(root).parts)
        and p.is_file())
    if not paths:
        raise DataError(f'no image files ({", ".join(IMAGE_EXTS)}) found under {root}')
    return paths


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited over white."""
    if img.mode.startswith('I'):  # 16-bit ('I;16', 'I;16B', ...) or 32-bit int holding 16-bit data
        a = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L')
    elif img.mode == 'F':  # float, on PIL's 0..255 scale
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), 'L')
    if img.mode in _ALPHA_MODES or 'transparency' in img.info:
        rgba = img.convert('RGBA')
        bg = Image.new('RGBA', rgba.size, _WHITE + (255,))
        return Image.alpha_composite(bg, rgba).convert('RGB')
    return img.convert('RGB')


def load_image(path, size: int) -> np.ndarray:
    """Decode, orient, centre-crop and resize one file to float32 [size, size, 3] in [-1, 1]."""
    path = pathlib.Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f'{path}: empty file (0 bytes)')
        with Image.open(path) as img:
            img.draft(img.mode, (size, size))  # JPEG: cheap downscale while decoding
            img.load()
            img = _to_rgb(ImageOps.exif_transpose(img))
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f'{path}: not a recognised image file') from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f'{path}: cannot decode ({type(e).__name__}: {e})') from None
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def load_images(paths: Sequence, size: int):
    """Decode what can be decoded: returns (images [N, size, size, 3], good_paths, [(path, reason)])."""
    images, good, bad = [], [], []
    for p in paths:
        try:
            images.append(load_image(p, size))
            good.append(p)
        except DataError as e:
            bad.append((p, str(e)))
    arr = np.stack(images) if images else np.zeros((0, size, size, 3), np.float32)
    return arr, good, bad


def read_rgb_folder(folder, log: Callable[[str], None] = print) -> tuple[list[str], list[np.ndarray]]:
    """(stems, uint8 RGB images at their own size) of a folder's images, in ``list_images`` order;
    files that cannot be decoded are reported by name through ``log`` and skipped."""
    paths = list_images(folder)
    stems, images, bad = [], [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(np.asarray(_to_rgb(im)))
            stems.append(p.stem)
        except Exception as e:  # noqa: BLE001 - reported by name
            bad.append((p, str(e)))
    if bad:
        report_bad(bad, len(paths), log)
    return stems, images


def report_bad(bad, total: int, log: Callable[[str], None] = print) -> None:
    """Log one line per unusable file, then a count line; nothing when all files were fine."""
    if not bad:
        return
    for path, reason in bad:
        log(f'skipped {path}: {reason}')
    log(f'skipped {len(bad)} of {total} files')


class ImageFolder:
    """The images of one folder as an infinite deterministic stream of global batches, of which
    this host decodes and yields its rows only.

    Every host lists the folder and draws the same permutations, so global batch k is the same
    whatever the number of hosts; host i of n yields rows [i * B / n, (i + 1) * B / n) of it and
    reads only their files. Files are decoded lazily (per batch) and, with `cache`, kept in
    memory. Files that fail to decode are remembered in `bad`, logged once, and replaced in
    batches by the next usable file of the epoch's permutation.
    """

    def __init__(self, root, size: int, *, process_index: int = 0, process_count: int = 1,
                 cache: bool = True, log: Callable[[str], None] = print):
        self.root = pathlib.Path(root)
        self.size = size
        self.process_index, self.process_count = process_index, process_count
        self.cache = cache
        self._log = log
        self._bad: dict[pathlib.Path, str] = {}
        self._images: dict[pathlib.Path, np.ndarray] = {}
        self.paths = list_images(self.root)
        if not any(self._get(p) is not None for p in self.paths):  # stops at the first usable file
            raise DataError(f'no usable images under {self.root}: all {len(self._bad)} files '
                            f'failed to decode (first: {next(iter(self._bad.values()))})')

    @property
    def bad(self) -> list[tuple[pathlib.Path, str]]:
        return list(self._bad.items())

    def __len__(self) -> int:
        return len(self.paths)

    def _get(self, path) -> np.ndarray | None:
        """Decoded image, or None for a (remembered) bad file."""
        if path in self._bad:
            return None
        img = self._images.get(path)
        if img is None:
            try:
                img = load_image(path, self.size)
            except DataError as e:
                self._bad[path] = str(e)
                self._log(f'skipped {path}: {e}')
                return None
            if self.cache:
                self._images[path] = img
        return img

    def _epoch(self, seed: int, epoch: int):
        rng = np.random.default_rng([seed, epoch, 0])   # one permutation for every host
        n = len(self.paths)
        return rng.permutation(n), rng.random(n) < 0.5

    def batches(self, batch_size: int, seed: int, *, flip: bool = True,
                start_step: int = 0) -> Iterator[np.ndarray]:
        """This host's rows of global batches start_step, start_step+1, ... of ``batch_size``
        images; global batch k depends only on (seed, k).

        Sample i = k * batch_size + j is position i % n of epoch i // n's permutation.
        """
        local = local_rows(batch_size, self.process_count)
        first = self.process_index * local
        n = len(self.paths)
        epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for step in _count(start_step):
            out = np.empty((local, self.size, self.size, 3), np.float32)
            for row in range(local):
                j = first + row
                epoch, pos = divmod(step * batch_size + j, n)
                if epoch not in epochs:
                    epochs = {e: v for e, v in epochs.items() if e >= epoch - 1}
                    epochs[epoch] = self._epoch(seed, epoch)
                perm, flips = epochs[epoch]
                for t in range(n):  # skip bad files; __init__ guarantees a usable one exists
                    img = self._get(self.paths[perm[(pos + t) % n]])
                    if img is not None:
                        break
                out[row] = img[:, ::-1] if flip and flips[pos] else img
            yield out


def local_rows(batch_size: int, process_count: int) -> int:
    """Rows of a global batch of ``batch_size`` on each of ``process_count`` hosts."""
    if batch_size % process_count:
        raise ConfigError(f"the batch size {batch_size} must be divisible by the {process_count} processes")
    return batch_size // process_count


def _count(start: int) -> Iterator[int]:
    while True:
        yield start
        start += 1


def synthetic_batches(batch_size: int, size: int, channels: int, seed: int, start_step: int = 0, *,
                      process_index: int = 0, process_count: int = 1) -> Iterator[np.ndarray]:
    """Infinite stream of smooth random images in [-1, 1]: this host's rows of global batches of
    ``batch_size``; global batch k depends only on (seed, k)."""
    local = local_rows(batch_size, process_count)
    rows = slice(process_index * local, (process_index + 1) * local)
    coords = np.linspace(0.0, 1.0, size, endpoint=False)
    yy, xx = np.meshgrid(coords, coords, indexing='ij')
    terms = 4
    for step in _count(start_step):
        rng = np.random.default_rng([seed, step])
        shape = (batch_size, 1, 1, channels, terms)
        fx, fy = rng.uniform(-3, 3, (2,) + shape)
        phase = rng.uniform(0, 2 * np.pi, shape)
        amp = rng.uniform(0.2, 1.0, shape)
        waves = amp * np.sin(2 * np.pi * (fx * xx[..., None, None] + fy * yy[..., None, None]) + phase)
        yield (waves.sum(-1) / amp.sum(-1)).astype(np.float32)[rows]


def to_uint8(array) -> np.ndarray:
    """Float in [-1, 1] (or already uint8) to uint8."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    return np.clip(np.rint((array.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_image_atomic(path, array) -> None:
    """Write an image (HxW[x3], float in [-1, 1] or uint8) via a temp file and os.replace."""
    path = pathlib.Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), 'PNG')
    array = to_uint8(array)
    img = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
    with files.atomic_write(path) as f:
        img.save(f, format=fmt)


def make_grid(images, ncol: int, pad: int = 2) -> np.ndarray:
    """Tile [N, H, W, 3] images (in [-1, 1] or uint8) into one uint8 grid, white padding."""
    images = to_uint8(images)
    n, h, w, c = images.shape
    ncol = max(1, min(ncol, n))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = img
    return grid


def procedural_portrait(identity: int, variant: int | None = None, height: int = 96, width: int = 80) -> np.ndarray:
    """A simple cartoon portrait in [-1, 1], deterministic: ``identity`` fixes skin, hair and
    background colours; ``variant`` (None: the canonical view) shifts the face and the lighting."""
    yy, xx = np.mgrid[0:height, 0:width] / float(height)
    rng = np.random.default_rng(identity)
    skin = rng.uniform(0.45, 0.9, 3) * [1.0, 0.8, 0.7]
    hair_colour, bg = rng.uniform(0, 0.6, 3), rng.uniform(0.1, 0.9, 3)
    dx = dy = 0.0
    light = 1.0
    if variant is not None:
        v = np.random.default_rng([identity, variant])
        dx, dy, light = v.uniform(-0.04, 0.04), v.uniform(-0.03, 0.03), v.uniform(0.85, 1.1)
    cx, cy = 0.42 + dx, 0.5 + dy
    face = np.exp(-(((xx - cx) / 0.22) ** 2 + ((yy - cy) / 0.3) ** 2))[..., None]
    hair = ((yy < cy - 0.2 + 0.1 * np.sin(xx * 9 + identity)) & (face[..., 0] > 0.2))[..., None]
    eyes = (np.exp(-(((xx - cx + 0.08) ** 2 + (yy - cy + 0.05) ** 2) / 0.0008))
            + np.exp(-(((xx - cx - 0.08) ** 2 + (yy - cy + 0.05) ** 2) / 0.0008)))[..., None]
    img = bg * (0.7 + 0.3 * yy[..., None]) * (1 - face) + skin * face
    img = np.where(hair, hair_colour, img) * (1 - 0.8 * eyes) * light
    return (img.clip(0, 1) * 2 - 1).astype(np.float32)
