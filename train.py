"""Train a shortcut model from scratch, on one CPU, a GPU, or every host of a TPU pod.

    python train.py --config=configs/shortcut_tiny.py --workdir=runs/tiny
    python train.py --config=configs/shortcut_celebahq256.py --workdir=runs/celeba \
        --config.dataset=/data/celebahq256 [--config.<key>=<value> ...]

Rerunning with the same --workdir resumes from its newest checkpoint. The work dir gets
``metrics.jsonl``, ``checkpoints/`` and ``samples/step_<n>_k<steps>.png``.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "work dir: checkpoints, metrics.jsonl, samples", required=True)
config_flags.DEFINE_config_file("config", "configs/shortcut_tiny.py", "a configs/*.py file", lock_config=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from ldu_jax.shortcut.run import train
    try:
        train(FLAGS.config, FLAGS.workdir)
    except Exception as e:  # clear one-line errors for the user's mistakes, tracebacks for ours
        from ldu_jax.data import DataError
        from ldu_jax.checkpoint import CheckpointMismatchError
        from ldu_jax.shortcut.run import TrainingDiverged
        if isinstance(e, (DataError, CheckpointMismatchError, TrainingDiverged, FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        raise


if __name__ == "__main__":
    app.run(main)
