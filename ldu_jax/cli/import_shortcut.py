"""Convert a checkpoint of the public shortcut-models code into a work dir that ``train.py``
continues and LDU loads (``ldu_jax/jobs/import_shortcut.py`` says what the public code writes and
what is checked).

    python -m ldu_jax.cli.import_shortcut --pickle=celeba-shortcut2-every4400001 \\
        --config=configs/shortcut_celebahq256.py --workdir=runs/celeba_official --allow_pickle
"""
from absl import flags

from ldu_jax import checkpoint as ckpt
from ldu_jax import cli
from ldu_jax.errors import ConfigError
from ldu_jax.jobs import import_shortcut

FLAGS = flags.FLAGS
flags.DEFINE_string("pickle", None, "shortcut-models checkpoint: the pickle file, or the save folder holding "
                    "exactly one", required=True)
flags.DEFINE_string("workdir", None, "output work dir (new or empty)", required=True)
flags.DEFINE_bool("allow_pickle", False, "allow unpickling the file (it can run code)")
flags.DEFINE_integer("input_size", None, "the DiT's input size (32 for 256 px images in SD latents); "
                     "default: the config's image_size over its VAE's factor")
cli.define_config("config", None, "model config (configs/shortcut_*.py)")


def _main(argv):
    del argv
    if FLAGS.config is None:
        raise ConfigError("--config is required (the model config, e.g. configs/shortcut_celebahq256.py)")
    step = import_shortcut.convert(FLAGS.pickle, FLAGS.config, FLAGS.workdir, FLAGS.input_size, FLAGS.allow_pickle)
    print(f"wrote step {step} to {ckpt.checkpoint_dir(FLAGS.workdir)}")


def main():
    cli.run(_main)


if __name__ == "__main__":
    main()
