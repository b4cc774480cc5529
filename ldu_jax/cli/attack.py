"""Personalization attacks on a folder of photos: Textual Inversion or DreamBooth, then generation.

    python -m ldu_jax.cli.attack ti --config=configs/attack_ti_tiny.py --images=DIR --workdir=DIR
    python -m ldu_jax.cli.attack dreambooth --config=configs/attack_db_sd21.py --images=DIR --workdir=DIR

Writes ``metrics.jsonl``, orbax checkpoints (a rerun resumes), the result (TI:
``learned_embeds.safetensors``; DreamBooth: ``model/`` or, with LoRA, ``lora.safetensors``), and
``samples/<prompt-slug>/NNN.png``: ``num_samples`` images per validation prompt.
"""
from absl import flags

from ldu_jax import cli
from ldu_jax.errors import ConfigError
from ldu_jax.jobs import attack

FLAGS = flags.FLAGS
flags.DEFINE_string("images", None, "folder of the subject's images", required=True)
flags.DEFINE_string("workdir", None, "work dir", required=True)
cli.define_config("config", None, "configs/attack_*.py")


def _main(argv):
    if len(argv) != 2:
        raise ConfigError(f"usage: python -m ldu_jax.cli.attack {{{','.join(attack.KINDS)}}} --config=... "
                          "--images=DIR --workdir=DIR")
    attack.run(argv[1], FLAGS.config, FLAGS.images, FLAGS.workdir)


def main():
    cli.run(_main, multihost=True)


if __name__ == "__main__":
    main()
