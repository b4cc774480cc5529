"""Measure a folder of images against a reference folder.

    python -m ldu_jax.metrics --reference clean/ --images protected/ [--face] [--brisque]
        [--fid_weights pt_inception-2015-12-05-6726825d.pth] [--clip_iqa openai/clip-vit-base-patch32]
        [--out metrics.csv]

Files are paired by stem (``a.jpg`` with ``a.png``); each pair gets PSNR, SSIM and L-inf (an
images file whose size differs from its reference is compared after resizing it to the
reference's size, and says so). Set-level metrics compare the two folders as sets: ``--face``
(ISM of the images to the reference identity, FDFR), ``--brisque``, ``--clip_iqa``, FID. Prints a
table and writes the CSV (per-pair rows, then a ``mean`` row and the set metrics).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import numpy as np
from PIL import Image

from ldu_jax import data as data_lib
from ldu_jax import files
from ldu_jax.metrics import image as im

PAIR_COLUMNS = ("file", "psnr", "ssim", "linf", "note")


def read_folder(folder: str) -> dict[str, np.ndarray]:
    """{stem: uint8 RGB} of a folder's images; unreadable files are reported by name and skipped."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {folder} does not exist")
    stems, images = data_lib.read_rgb_folder(folder, lambda s: print(s, file=sys.stderr))
    out = dict(zip(stems, images))
    if not out:
        raise FileNotFoundError(f"{folder}: no readable images")
    return out


def pair_metrics(reference: dict, images: dict) -> list[dict]:
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


def set_metrics(reference: dict, images: dict, args) -> dict:
    """Set-level metrics; a metric that cannot run is reported with its reason, not raised."""
    ref, imgs = list(reference.values()), list(images.values())
    out = {}

    def attempt(name, fn):
        try:
            out.update(fn())
        except Exception as e:  # noqa: BLE001 - the reason goes in the table
            out[name] = f"skipped: {e}"

    if args.face:
        from ldu_jax.metrics import face
        attempt("face", lambda: {k: v for k, v in face.face_metrics(imgs, ref).items() if k in ("fdfr", "ism")})
    if args.brisque:
        from ldu_jax.metrics import quality
        attempt("brisque", lambda: {"brisque": float(np.mean(quality.brisque(imgs)))})
    if args.clip_iqa:
        from ldu_jax.metrics import quality
        attempt("clip_iqa", lambda: {"clip_iqa": float(np.mean(quality.clip_iqa(imgs, args.clip_iqa)))})
    if args.fid_weights:
        from ldu_jax.metrics import fid

        def run_fid():
            p = fid.load_weights(args.fid_weights)
            size = ref[0].shape[:2]
            same = lambda xs: np.stack([x if x.shape[:2] == size else np.asarray(  # noqa: E731
                Image.fromarray(x).resize((size[1], size[0]), Image.BICUBIC)) for x in xs])
            return {"fid": fid.fid(p, same(ref), same(imgs), batch_size=min(16, max(len(ref), len(imgs))))}
        attempt("fid", run_fid)
    return out


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ldu_jax.metrics", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="folder of reference (clean) images")
    ap.add_argument("--images", required=True, help="folder of images to measure (paired by file stem)")
    ap.add_argument("--face", action="store_true", help="ISM / FDFR of the images to the reference identity")
    ap.add_argument("--brisque", action="store_true", help="BRISQUE of the images (higher = worse)")
    ap.add_argument("--clip_iqa", default="", help="CLIP weights (folder or hub id) for CLIP-IQA")
    ap.add_argument("--fid_weights", default="", help="FID Inception weights (pytorch-fid .pth or converted)")
    ap.add_argument("--out", default="metrics.csv", help="CSV to write (default: ./metrics.csv)")
    args = ap.parse_args(argv)
    try:
        reference, images = read_folder(args.reference), read_folder(args.images)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = pair_metrics(reference, images)
    unpaired = sorted(set(images) - set(reference))
    if unpaired:
        print(f"{len(unpaired)} image(s) without a reference of the same stem: {', '.join(unpaired[:5])}",
              file=sys.stderr)
    mean = {"file": "mean"}
    for k in ("psnr", "ssim", "linf"):
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        mean[k] = float(np.mean(vals)) if vals else math.nan
    sets = set_metrics(reference, images, args)
    print(f"{'file':<24} {'PSNR':>9} {'SSIM':>8} {'Linf':>8}")
    for r in rows + ([mean] if rows else []):
        print(f"{r['file'][:24]:<24} {r['psnr']:>9.3f} {r['ssim']:>8.4f} {r['linf']:>8.4f} {r.get('note', '')}")
    for k, v in sets.items():
        print(f"{k}: {_fmt(v)}")
    with files.atomic_write(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PAIR_COLUMNS)
        for r in rows + ([mean] if rows else []):
            w.writerow([_fmt(r.get(k, "")) for k in PAIR_COLUMNS])
        for k, v in sets.items():
            w.writerow([k, _fmt(v), "", "", ""])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
