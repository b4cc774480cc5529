"""Train a shortcut model from scratch, on one CPU, a GPU, or every host of a TPU pod.

    python train.py --config=configs/shortcut_tiny.py --workdir=runs/tiny
    python train.py --config=configs/shortcut_celebahq256.py --workdir=runs/celeba \\
        --config.dataset=/data/celebahq256 [--config.<key>=<value> ...]

(``python -m ldu_jax.cli.train`` and the ``ldu-train`` console script are the same command.)
Rerunning with the same --workdir resumes from its newest checkpoint. The work dir gets
``metrics.jsonl``, ``checkpoints/`` and ``samples/step_<n>_k<steps>.png``.
"""
from absl import flags

from ldu_jax import cli
from ldu_jax.jobs import train_shortcut

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "work dir: checkpoints, metrics.jsonl, samples", required=True)
cli.define_config("config", "configs/shortcut_tiny.py", "a configs/*.py file")


def _main(argv):
    del argv
    train_shortcut.train(FLAGS.config, FLAGS.workdir)


def main():
    cli.run(_main, multihost=True)


if __name__ == "__main__":
    main()
