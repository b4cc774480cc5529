"""The evaluation: protect -> purify -> personalize -> generate -> measure, the papers' table
(``ldu_jax/evaluate/runner.py`` describes the work dir and its cache).

    python -m ldu_jax.cli.evaluate --config=configs/eval_tiny.py --workdir=runs/eval
    python -m ldu_jax.cli.evaluate --config=configs/eval_miniworld.py --workdir=runs/eval_miniworld
"""
from absl import flags

from ldu_jax import cli
from ldu_jax.evaluate import runner

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "evaluation work dir (cells, results.csv, results.md, plots/)", required=True)
cli.define_config("config", None, "a configs/eval_*.py file")


def _main(argv):
    del argv
    runner.run(FLAGS.config, FLAGS.workdir)


def main():
    cli.run(_main, multihost=True)


if __name__ == "__main__":
    main()
