"""Measure a folder of images against a reference folder.

    python -m ldu_jax.cli.metrics --reference=clean/ --images=protected/ [--face] [--brisque]
        [--fid_weights=pt_inception-2015-12-05-6726825d.pth] [--clip_iqa=openai/clip-vit-base-patch32]
        [--out=metrics.csv]

Files are paired by stem (``a.jpg`` with ``a.png``); each pair gets PSNR, SSIM and L-inf (an
images file whose size differs from its reference is compared after resizing it to the
reference's size, and says so). Set-level metrics compare the two folders as sets: ``--face``
(ISM of the images to the reference identity, FDFR), ``--brisque``, ``--clip_iqa``, FID. Prints a
table and writes the CSV (per-pair rows, then a ``mean`` row and the set metrics); the library is
``ldu_jax.metrics.folders``.
"""
from __future__ import annotations

import sys

from absl import flags

from ldu_jax import cli
from ldu_jax.errors import ConfigError
from ldu_jax.metrics import folders

flags.DEFINE_string("reference", None, "folder of reference (clean) images", required=True)
flags.DEFINE_string("images", None, "folder of images to measure (paired by file stem)", required=True)
flags.DEFINE_bool("face", False, "ISM / FDFR of the images to the reference identity")
flags.DEFINE_bool("brisque", False, "BRISQUE of the images (higher = worse)")
flags.DEFINE_string("clip_iqa", "", "CLIP weights (folder or hub id) for CLIP-IQA")
flags.DEFINE_string("fid_weights", "", "FID Inception weights (pytorch-fid .pth or converted)")
flags.DEFINE_string("out", "metrics.csv", "CSV to write")
FLAGS = flags.FLAGS


def _main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    reference, images = folders.read_folder(FLAGS.reference), folders.read_folder(FLAGS.images)
    rows = folders.pair_metrics(reference, images)
    unpaired = sorted(set(images) - set(reference))
    if unpaired:
        print(f"{len(unpaired)} image(s) without a reference of the same stem: {', '.join(unpaired[:5])}",
              file=sys.stderr)
    rows = (rows + [folders.mean_row(rows)]) if rows else rows
    sets = folders.set_metrics(reference, images, face=FLAGS.face, brisque=FLAGS.brisque,
                               clip_iqa=FLAGS.clip_iqa, fid_weights=FLAGS.fid_weights)
    print(f"{'file':<24} {'PSNR':>9} {'SSIM':>8} {'Linf':>8}")
    for r in rows:
        print(f"{r['file'][:24]:<24} {r['psnr']:>9.3f} {r['ssim']:>8.4f} {r['linf']:>8.4f} {r.get('note', '')}")
    for k, v in sets.items():
        print(f"{k}: {folders.fmt(v)}")
    folders.write_csv(FLAGS.out, rows, sets)
    print(f"wrote {FLAGS.out}")


def main():
    cli.run(_main)


if __name__ == "__main__":
    main()
