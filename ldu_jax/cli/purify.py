"""Purify a folder of images with one adversarial setting (the library is ``ldu_jax.purify``).

    python -m ldu_jax.cli.purify --setting=jpeg:quality=75 --input=protected/ --output=purified/
    python -m ldu_jax.cli.purify --setting=diffpure:strength=0.1,steps=20 --sd=/models/sd21 \\
        --input=protected/ --output=purified/
    python -m ldu_jax.cli.purify --setting=diffpure:strength=0.25,model=shortcut --shortcut=WORKDIR \\
        --input=protected/ --output=purified/

Every readable image of --input is written to --output as <stem>.png (the inputs are only read;
unreadable files are named and skipped). Settings: none, jpeg, blur, noise, resize, diffpure,
gridpure (``ldu_jax/purify.py`` lists their options).
"""
from __future__ import annotations

from absl import flags

from ldu_jax import cli, purify, sources
from ldu_jax.errors import ConfigError

flags.DEFINE_string("setting", None, "e.g. jpeg:quality=75, blur:sigma=1, diffpure:strength=0.1", required=True)
flags.DEFINE_string("input", None, "folder of images (never modified)", required=True)
flags.DEFINE_string("output", None, "output folder", required=True)
flags.DEFINE_string("sd", "tiny", "diffpure/gridpure: Stable Diffusion ('tiny', a folder or hub id)")
flags.DEFINE_string("shortcut", "", "diffpure model=shortcut: a train.py work dir on the SD VAE's latents "
                    "('random': an untrained one, for tests)")
FLAGS = flags.FLAGS


def _main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    s = purify.parse(FLAGS.setting)
    purify.check_folders(FLAGS.input, FLAGS.output)   # before loading any model
    models = sources.diffusion_models(FLAGS.sd, FLAGS.shortcut or None) if s.name in purify.NEEDS_MODELS else None
    names = purify.purify_folder(s, FLAGS.input, FLAGS.output, models)
    print(f"{s}: wrote {len(names)} images to {FLAGS.output}")


def main():
    cli.run(_main)


if __name__ == "__main__":
    main()
