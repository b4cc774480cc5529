"""Measure a folder of images against a reference folder (the library behind
``python -m ldu_jax.cli.metrics``).

Files are paired by stem (``a.jpg`` with ``a.png``); each pair gets PSNR, SSIM and L-inf (an
images file whose size differs from its reference is compared after resizing it to the
reference's size, and says so). Set-level metrics compare the two folders as sets: face identity
(ISM of the images to the reference identity, FDFR), BRISQUE, CLIP-IQA, FID. ``write_csv`` writes
the per-pair rows, then a ``mean`` row and the set metrics.
"""
from __future__ import annotations

import csv
import math
import os
import sys

import numpy as np
from PIL import Image

from ldu_jax import data as data_lib
from ldu_jax import files
from ldu_jax.errors import MissingError
from ldu_jax.metrics import face as face_lib
from ldu_jax.metrics import fid as fid_lib
from ldu_jax.metrics import image as im
from ldu_jax.metrics import quality

PAIR_COLUMNS = ("file", "psnr", "ssim", "linf", "note")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def read_folder(folder: str, log=_stderr) -> dict[str, np.ndarray]:
    """{stem: uint8 RGB} of a folder's images; unreadable files are reported by name and skipped.
    A missing folder, or one without a readable image, is a ``MissingError``."""
    if not os.path.isdir(folder):
        raise MissingError(f"folder {folder} does not exist")
    try:
        stems, images = data_lib.read_rgb_folder(folder, log)
    except data_lib.DataError as e:   # no image files at all
        raise MissingError(str(e)) from None
    out = dict(zip(stems, images))
    if not out:
        raise MissingError(f"{folder}: no readable images")
    return out


def pair_metrics(reference: dict, images: dict) -> list[dict]:
    """One row (file, psnr, ssim, linf, note) per stem present in both folders, sorted by stem."""
    rows = []
    for stem in sorted(set(reference) & set(images)):
        a, b, note = reference[stem], images[stem], ""
        if a.shape != b.shape:
            b = np.asarray(Image.fromarray(b).resize((a.shape[1], a.shape[0]), Image.BICUBIC))
            note = f"resized from {images[stem].shape[1]}x{images[stem].shape[0]}"
        x, y = a.astype(np.float32) / 255, b.astype(np.float32) / 255
        ssim = float(im.ssim(x, y)) if min(a.shape[:2]) >= 11 else math.nan
        rows.append({"file": stem, "psnr": float(im.psnr(x, y)), "ssim": ssim, "linf": float(im.linf(x, y)),
                     "note": note})
    return rows


def mean_row(rows: list[dict]) -> dict:
    """The ``mean`` row of ``pair_metrics`` rows (NaNs left out)."""
    mean = {"file": "mean"}
    for k in ("psnr", "ssim", "linf"):
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        mean[k] = float(np.mean(vals)) if vals else math.nan
    return mean


def set_metrics(reference: dict, images: dict, *, face: bool = False, brisque: bool = False,
                clip_iqa: str = "", fid_weights: str = "") -> dict:
    """Set-level metrics; a metric that cannot run is reported with its reason, not raised.

    ``face``: ISM / FDFR of the images to the reference identity; ``brisque``: mean BRISQUE of the
    images; ``clip_iqa``: CLIP weights (folder or hub id) for CLIP-IQA; ``fid_weights``: FID
    Inception weights (pytorch-fid .pth or converted)."""
    ref, imgs = list(reference.values()), list(images.values())
    out = {}

    def attempt(name, fn):
        try:
            out.update(fn())
        except Exception as e:  # noqa: BLE001 - the reason goes in the table
            out[name] = f"skipped: {e}"

    if face:
        attempt("face", lambda: {k: v for k, v in face_lib.face_metrics(imgs, ref).items() if k in ("fdfr", "ism")})
    if brisque:
        attempt("brisque", lambda: {"brisque": float(np.mean(quality.brisque(imgs)))})
    if clip_iqa:
        attempt("clip_iqa", lambda: {"clip_iqa": float(np.mean(quality.clip_iqa(imgs, clip_iqa)))})
    if fid_weights:
        def run_fid():
            p = fid_lib.load_weights(fid_weights)
            size = ref[0].shape[:2]
            same = lambda xs: np.stack([x if x.shape[:2] == size else np.asarray(  # noqa: E731
                Image.fromarray(x).resize((size[1], size[0]), Image.BICUBIC)) for x in xs])
            return {"fid": fid_lib.fid(p, same(ref), same(imgs), batch_size=min(16, max(len(ref), len(imgs))))}
        attempt("fid", run_fid)
    return out


def fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_csv(path: str, rows: list[dict], sets: dict) -> None:
    """Atomically write ``PAIR_COLUMNS`` rows (``rows``: the pairs and the mean row), then one
    ``name, value`` row per set metric."""
    with files.atomic_write(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PAIR_COLUMNS)
        for r in rows:
            w.writerow([fmt(r.get(k, "")) for k in PAIR_COLUMNS])
        for k, v in sets.items():
            w.writerow([k, fmt(v), "", "", ""])
