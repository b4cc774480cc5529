"""Protecting a folder of photos, the input/output side: read, map a perturbation back, write, report.

The model works on a centre square crop resized to R x R in [-1, 1]. Its perturbation is resized
back onto that crop of the full-resolution original; the quantised result is scaled down until it
meets the budget, written as PNG, read back and measured. Inputs are only ever opened for reading.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
import time
import warnings
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ldu_jax import data, files
from ldu_jax.errors import ConfigError
from ldu_jax.metrics import image as metrics

REPORT_NAME = 'report.csv'
REPORT_COLUMNS = ('file', 'method', 'width', 'height', 'psnr', 'ssim', 'linf', 'budget_ok',
                  'seconds', 'error')


class DiffStats(NamedTuple):
    """Exact integer summary of |a - b| between uint8 arrays."""
    max_abs: int
    sum_sq: int
    count: int


def diff_stats(a_u8, b_u8) -> DiffStats:
    """Max |a - b|, sum of (a - b)**2 and the number of values, exactly, for equal-shape uint8."""
    a, b = np.asarray(a_u8), np.asarray(b_u8)
    if a.shape != b.shape or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f'expected equal-shape uint8 arrays, got {a.dtype} {a.shape} and '
                         f'{b.dtype} {b.shape}')
    d = np.maximum(a, b) - np.minimum(a, b)  # |a - b| without leaving uint8
    return DiffStats(int(d.max(initial=0)),
                     int(np.square(d, dtype=np.uint16).sum(dtype=np.uint64)), d.size)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Perturbation budget. 'mse': mean squared error on the [-1, 1] scale; 'linf': max abs
    difference on the [0, 1] scale."""
    kind: str
    eps: float

    def __post_init__(self):
        if self.kind not in ('mse', 'linf'):
            raise ValueError(f"budget kind must be 'mse' or 'linf', got {self.kind!r}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f'budget eps must be finite and >= 0, got {self.eps!r}')

    def measure_stats(self, st: DiffStats) -> float:
        """The budgeted distance from diff_stats."""
        if self.kind == 'linf':
            return st.max_abs / 255.0
        return st.sum_sq / max(st.count, 1) / 127.5 ** 2

    def ok_stats(self, st: DiffStats) -> bool:
        """Whether diff_stats are within budget (linf in integer units: max / 255 <= eps)."""
        tol = 1e-9 if self.kind == 'linf' else 1e-9 * self.eps
        return self.measure_stats(st) <= self.eps + tol

    def measure(self, orig_u8, out_u8) -> float:
        """The budgeted distance between two uint8 images."""
        return self.measure_stats(diff_stats(orig_u8, out_u8))

    def ok(self, orig_u8, out_u8) -> bool:
        """Whether `out_u8` is within budget of `orig_u8`."""
        return self.ok_stats(diff_stats(orig_u8, out_u8))


@dataclasses.dataclass(frozen=True, eq=False)
class Item:
    """One decoded input: `stem` is the output name (without '.png')."""
    path: pathlib.Path
    stem: str
    original_u8: np.ndarray  # HxWx3, EXIF-oriented
    model_input: np.ndarray  # RxRx3 float32 in [-1, 1]
    icc_profile: bytes | None = None  # kept for the output when it is an RGB profile


def check_dirs(input_dir, output_dir) -> None:
    """Refuse an output folder equal to, or inside, the input folder (symlinks resolved)."""
    inp, out = pathlib.Path(input_dir), pathlib.Path(output_dir)
    if not inp.exists():
        raise data.DataError(f'input folder {inp} does not exist')
    if not inp.is_dir():
        raise data.DataError(f'input path {inp} is not a folder')
    if out.exists() and not out.is_dir():
        raise ConfigError(f'output path {out} exists and is not a folder')
    rin, rout = inp.resolve(), out.resolve()
    if rout == rin:
        raise ConfigError(f'output folder {out} is the input folder {inp}: refusing to write there')
    if rin in rout.parents:
        raise ConfigError(f'output folder {out} is inside the input folder {inp} (inputs are listed '
                          'recursively, so outputs would become inputs): choose a folder outside it')


def output_names(paths) -> list[str]:
    """Collision-free output stems: the file stem; for a shared stem, stem + '_' + extension;
    a numeric suffix if that still collides. Case-insensitive, for case-insensitive filesystems."""
    paths = [pathlib.Path(p) for p in paths]
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem.casefold()] = counts.get(p.stem.casefold(), 0) + 1
    wanted = [p.stem if counts[p.stem.casefold()] == 1 else f'{p.stem}_{p.suffix.lstrip(".")}'
              for p in paths]
    taken = {w.casefold() for w in wanted}
    names, used = [], set()
    for w in wanted:
        name, k = w, 1
        while name.casefold() in used or (name != w and name.casefold() in taken):
            k += 1
            name = f'{w}_{k}'
        used.add(name.casefold())
        names.append(name)
    return names


def crop_box(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the centre square crop the model sees (integer pixels)."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def read_item(path, stem: str, resolution: int, max_pixels: int | None = None) -> Item:
    """Decode one file (EXIF-oriented RGB, as data.load_image) at full size and at the model's
    resolution; raises data.DataError. `max_pixels` defaults to PIL's Image.MAX_IMAGE_PIXELS (PIL's
    own hard limit of twice that still applies)."""
    path = pathlib.Path(path)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        if path.stat().st_size == 0:
            raise data.DataError(f'{path}: empty file (0 bytes)')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # checked just below
            with Image.open(path) as img:
                if limit is not None and img.width * img.height > limit:
                    raise data.DataError(
                        f'{path}: {img.width}x{img.height} exceeds the limit of {limit} pixels '
                        '(possible decompression bomb)')
                img.load()
                icc = img.info.get('icc_profile')
                rgb = data._to_rgb(ImageOps.exif_transpose(img))
        top, left, side = crop_box(rgb.height, rgb.width)
        small = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC,
                           box=(left, top, left + side, top + side))
    except data.DataError:
        raise
    except UnidentifiedImageError:
        raise data.DataError(f'{path}: not a recognised image file') from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, MemoryError) as e:
        raise data.DataError(f'{path}: cannot decode ({type(e).__name__}: {e})') from None
    if not (isinstance(icc, bytes) and icc[16:20] == b'RGB '):  # e.g. a CMYK or grey profile
        icc = None
    return Item(path, stem, np.asarray(rgb, np.uint8).copy(),
                np.asarray(small, np.float32) / 127.5 - 1.0, icc)


def read_inputs(input_dir, resolution: int, max_pixels: int | None = None):
    """All images under `input_dir`: (items, bad) with bad = [(path, reason)]."""
    paths = data.list_images(input_dir)
    items, bad = [], []
    for path, stem in zip(paths, output_names(paths)):
        try:
            items.append(read_item(path, stem, resolution, max_pixels))
        except data.DataError as e:
            bad.append((path, str(e)))
    return items, bad


def _resize_float(x: np.ndarray, side: int) -> np.ndarray:
    """Bicubic resize of a float HxWxC array to side x side, per channel, in float32."""
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., i], np.float32), 'F')
                        .resize((side, side), Image.Resampling.BICUBIC)) for i in range(x.shape[-1])]
    return np.stack(chans, -1)


def apply_perturbation(original_u8, model_input, protected_model, budget: Budget,
                       iters: int = 20):
    """Map the model-resolution perturbation onto the original; scale it down if needed (an L-inf
    budget clips the resized perturbation into its ball instead, so it is never scaled down).

    Returns (out_u8, {'scale': s, 'scaled': bool}); out_u8 always meets `budget` (s = 0 is the
    original itself).
    """
    orig = np.asarray(original_u8)
    if orig.dtype != np.uint8 or orig.ndim != 3 or orig.shape[-1] != 3:
        raise ValueError(f'original must be uint8 HxWx3, got {orig.dtype} {orig.shape}')
    delta = np.asarray(protected_model, np.float32) - np.asarray(model_input, np.float32)
    if not np.isfinite(delta).all():
        raise ValueError('perturbation is not finite')
    top, left, side = crop_box(*orig.shape[:2])
    crop = (slice(top, top + side), slice(left, left + side))
    base_u8 = orig[crop]
    base = base_u8.astype(np.float32)
    delta_px = _resize_float(delta, side) * np.float32(127.5)  # [-1, 1] units -> pixel units
    if budget.kind == 'linf':  # bicubic resizing overshoots an L-inf ball: clip back into it
        bound = np.float32(math.floor(budget.eps * 255 + 1e-6))
        np.clip(delta_px, -bound, bound, out=delta_px)
    outside = orig.size - base_u8.size  # unchanged values: |diff| = 0

    def render(s: float):  # the crop at scale s, and whether the whole image is within budget
        x = np.multiply(delta_px, np.float32(s))
        x += base
        np.clip(np.rint(x, out=x), 0, 255, out=x)
        crop_u8 = x.astype(np.uint8)
        st = diff_stats(base_u8, crop_u8)
        return crop_u8, budget.ok_stats(st._replace(count=st.count + outside))

    best, full_ok = render(1.0)
    scale = 1.0
    if not full_ok:
        lo, hi, best = 0.0, 1.0, base_u8
        for _ in range(iters):  # invariant: scale lo is within budget
            mid = 0.5 * (lo + hi)
            cand, ok = render(mid)
            if ok:
                lo, best = mid, cand
            else:
                hi = mid
        scale = lo
    out = orig.copy()
    out[crop] = best
    return out, {'scale': scale, 'scaled': not full_ok}


def _save_png_atomic(path: pathlib.Path, array_u8: np.ndarray, icc_profile: bytes | None) -> None:
    with files.atomic_write(path) as f:
        Image.fromarray(array_u8, 'RGB').save(f, format='PNG', **({'icc_profile': icc_profile} if icc_profile else {}))


def write_output(out_dir, name: str, out_u8, orig_u8, budget: Budget,
                 icc_profile: bytes | None = None) -> dict:
    """Save `<name>.png` atomically, read it back and measure it against the original."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f'{name}.png'
    _save_png_atomic(path, np.ascontiguousarray(out_u8, np.uint8), icc_profile)
    with Image.open(path) as img:
        back = np.asarray(img.convert('RGB'))
    orig = np.asarray(orig_u8)
    if back.shape != orig.shape:
        raise RuntimeError(f'{path}: read back {back.shape}, expected {orig.shape}')
    st = diff_stats(orig, back)
    ssim = (float(metrics.ssim(orig.astype(np.float32) / 255, back.astype(np.float32) / 255))
            if min(orig.shape[:2]) >= 11 else float('nan'))  # too small for an 11x11 window
    return {'output': path.name, 'width': orig.shape[1], 'height': orig.shape[0],
            'psnr': 10 * math.log10(255.0 ** 2 * st.count / st.sum_sq) if st.sum_sq else math.inf,
            'ssim': ssim, 'linf': st.max_abs / 255.0, 'budget_ok': budget.ok_stats(st)}


def _cell(key: str, value) -> str:
    if value is None or value == '':
        return ''
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # 'inf' / 'nan'
        return f'{value:.4f}' if key in ('psnr', 'seconds') else f'{value:.6f}'
    return str(value)


def write_report(out_dir, rows) -> pathlib.Path:
    """Write `report.csv` (REPORT_COLUMNS, other keys ignored) atomically; returns its path."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_NAME
    with files.atomic_write(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(REPORT_COLUMNS)
        for row in rows:
            writer.writerow([_cell(k, row.get(k)) for k in REPORT_COLUMNS])
    return path


def _error_row(file: str, method: str, error: str) -> dict:
    return {'file': file, 'method': method, 'output': '', 'error': error}


PART_PREFIX = '.report.part-'   # a host's rows of a run across hosts, merged into report.csv


def _part_path(out_dir: pathlib.Path, index: int, count: int) -> pathlib.Path:
    return out_dir / f'{PART_PREFIX}{index}-of-{count}.json'


def protect_folder(input_dir, output_dir, method: str, resolution: int, budget: Budget,
                   protect_batch: Callable[[np.ndarray, int], np.ndarray], batch_size: int,
                   log: Callable[[str], None] = print, max_pixels: int | None = None, *,
                   process_index: int = 0, process_count: int = 1,
                   barrier: Callable[[str], None] | None = None,
                   every_process: Callable[[Callable[[], None], str], None] | None = None) -> list[dict]:
    """Protect every image under `input_dir` into `output_dir/<name>.png` plus `report.csv`.

    Batch `i` of the folder is files [i * batch_size, (i + 1) * batch_size) of the sorted list
    (the ones that decode); `protect_batch(x, i)` maps it, [batch_size, R, R, 3] float32 in
    [-1, 1], to the same shape (a random protection draws from `i`, so a folder's result does not
    depend on what the protector did before, nor on how many hosts share the folder); it is always
    called with exactly `batch_size` rows (a short batch is padded by repetition). Only a batch's
    decoded images are held in memory. Rows follow the input order; 'file' is the input path
    relative to `input_dir`, 'seconds' the batch's model time / n plus the image's own time.

    Across hosts (`process_count` > 1, every host calling this with its `process_index`, a
    `barrier(name)` of all of them and `every_process(fn, name)`, which runs each host's share and
    stops every host when one failed (`parallel.every_process`); `output_dir` on storage every
    host sees): host p protects batches p, p + n, p + 2n, ... and writes their files (each file
    exactly once, atomically) and its rows to a part file; after a barrier every host reads all
    parts and returns every row, and process 0 writes the one report.csv and removes the parts. A
    host whose batches raise stops with its error and the others with one naming it. A killed run
    is rerun as a whole (every file is rewritten; parts left by it are replaced or removed).
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
    if process_count > 1 and (barrier is None or every_process is None):
        raise ValueError('a folder shared by several processes needs their barrier and every_process')
    check_dirs(input_dir, output_dir)
    root, out_dir = pathlib.Path(input_dir), pathlib.Path(output_dir)
    paths = data.list_images(root)
    names = output_names(paths)
    real_inputs = {os.path.realpath(p) for p in paths}
    for target in [out_dir / f'{n}.png' for n in names] + [out_dir / REPORT_NAME]:
        if os.path.realpath(target) in real_inputs:
            raise ConfigError(f'output {target} would overwrite an input file')
    out_dir.mkdir(parents=True, exist_ok=True)
    rel = {p: p.relative_to(root).as_posix() for p in paths}
    rows: dict[pathlib.Path, dict] = {}
    bad: list[tuple[pathlib.Path, str]] = []

    def run(batch: list[Item], index: int) -> None:
        x = np.stack([it.model_input for it in batch]).astype(np.float32)
        x = x[np.arange(batch_size) % len(batch)]  # pad by repeating: one compiled shape
        t0 = time.perf_counter()
        y = np.asarray(protect_batch(x, index), np.float32)
        model_s = (time.perf_counter() - t0) / len(batch)
        if y.shape != x.shape:
            raise ValueError(f'protect_batch returned shape {y.shape}, expected {x.shape}')
        for it, y_i in zip(batch, y):
            t1 = time.perf_counter()
            try:
                out, info = apply_perturbation(it.original_u8, it.model_input, y_i, budget)
            except ValueError as e:
                rows[it.path] = _error_row(rel[it.path], method, f'{it.path}: {e}')
                log(f'failed {it.path}: {e}')
                continue
            row = write_output(out_dir, it.stem, out, it.original_u8, budget, it.icc_profile)
            row.update(file=rel[it.path], method=method, error='',
                       seconds=model_s + time.perf_counter() - t1, **info)
            rows[it.path] = row
            log(f'{rel[it.path]} -> {row["output"]}: psnr {row["psnr"]:.2f} ssim {row["ssim"]:.4f} '
                f'linf {row["linf"] * 255:.0f}/255' + (f' (scaled x{info["scale"]:.3f})'
                                                       if info['scaled'] else ''))

    def protect_mine() -> None:
        mine = 0
        for index, first in enumerate(range(0, len(paths), batch_size)):
            if index % process_count != process_index:
                continue
            pending: list[Item] = []
            for path, name in zip(paths[first:first + batch_size], names[first:first + batch_size]):
                mine += 1
                try:
                    pending.append(read_item(path, name, resolution, max_pixels))
                except data.DataError as e:
                    bad.append((path, str(e)))
                    rows[path] = _error_row(rel[path], method, str(e))
            if pending:
                run(pending, index)
        data.report_bad(bad, mine, log)

    if process_count > 1:
        every_process(protect_mine, 'protect_folder: batches')
        result = _merge_parts(out_dir, paths, rel, rows, process_index, process_count, barrier)
    else:
        protect_mine()
        result = [rows[p] for p in paths]
    if process_index == 0:
        write_report(out_dir, result)
        for stale in out_dir.glob(f'{PART_PREFIX}*'):  # this run's, and any a killed run left
            stale.unlink(missing_ok=True)
    return result


def _merge_parts(out_dir, paths, rel, rows, process_index: int, process_count: int, barrier) -> list[dict]:
    """Every host's rows in the input order: each host writes its own part, then (after a
    barrier) reads all of them; a second barrier keeps the parts until every host has read them."""
    files.write_json(_part_path(out_dir, process_index, process_count), [rows[p] for p in paths if p in rows])
    barrier('protect_folder: parts written')
    merged: dict[str, dict] = {}
    for i in range(process_count):
        with open(_part_path(out_dir, i, process_count), encoding='utf-8') as f:
            for row in json.load(f):
                if row['file'] in merged:
                    raise RuntimeError(f'{row["file"]} was protected by two processes')
                merged[row['file']] = row
    barrier('protect_folder: parts read')
    missing = [rel[p] for p in paths if rel[p] not in merged]
    if missing:
        raise RuntimeError(f'no process protected {missing[0]} ({len(missing)} files missing)')
    return [merged[rel[p]] for p in paths]
