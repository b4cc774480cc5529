"""FID with the standard FID Inception network (the library is ``ldu_jax.metrics.fid``).

    python -m ldu_jax.cli.fid convert --weights=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.safetensors
    python -m ldu_jax.cli.fid stats --weights=inception_fid.safetensors --images=DIR --out=ref.npz [--batch_size=50]
    python -m ldu_jax.cli.fid score [--weights=inception_fid.safetensors] A B [--batch_size=50]

``convert``: pytorch-fid's .pth (needs torch) to .safetensors / .npz, once. ``stats``: the mu / sigma
.npz of an image folder (pytorch-fid's format). ``score``: the FID between A and B, each an image
folder or an .npz statistics file (``--weights`` is needed when one is a folder).
Exit status 1 when some image files could not be read (they are named) or on an error.
"""
from __future__ import annotations

from absl import flags

from ldu_jax import cli
from ldu_jax.errors import ConfigError
from ldu_jax.metrics import fid

COMMANDS = ("convert", "stats", "score")

flags.DEFINE_string("weights", None, "FID Inception weights: pytorch-fid .pth, or a converted .safetensors / .npz "
                    "(score: needed when A or B is a folder)")
flags.DEFINE_string("images", None, "stats: the image folder")
flags.DEFINE_string("out", None, "convert: the .safetensors / .npz to write; stats: the .npz to write")
flags.DEFINE_integer("batch_size", 50, "images per Inception batch (stats, score)", lower_bound=1)
FLAGS = flags.FLAGS


def _need(command: str, *names: str) -> None:
    missing = [f"--{n}" for n in names if not FLAGS[n].value]
    if missing:
        raise ConfigError(f"{command} needs {' and '.join(missing)}")


def _main(argv):
    args = argv[1:]
    if not args or args[0] not in COMMANDS:
        raise ConfigError(f"expected a command: {', '.join(COMMANDS)} (got {' '.join(args) or 'none'})")
    command, rest = args[0], args[1:]
    if command != "score" and rest:
        raise ConfigError(f"{command}: unexpected arguments {' '.join(rest)}")
    if command == "convert":
        _need(command, "weights", "out")
        fid.save_weights(FLAGS.out, fid.load_weights(FLAGS.weights))
        print(f"wrote {FLAGS.out}")
        return 0
    if command == "stats":
        _need(command, "weights", "images", "out")
        (mu, sigma), n, bad = fid.folder_stats(fid.load_weights(FLAGS.weights), FLAGS.images, FLAGS.batch_size)
        fid.save_stats(FLAGS.out, mu, sigma)
        print(f"wrote {FLAGS.out} ({n} images)")
        return 1 if bad else 0
    if len(rest) != 2:
        raise ConfigError(f"score needs two sources A B (image folders or .npz statistics), got {len(rest)}")
    value, bad = fid.fid_of_sources(rest[0], rest[1], FLAGS.weights, FLAGS.batch_size)
    print(f"FID: {value:.4f}")
    return 1 if bad else 0


def main():
    cli.run(_main)


if __name__ == "__main__":
    main()
