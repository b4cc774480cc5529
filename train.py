"""``python train.py``: the command in ``ldu_jax/cli/train.py`` (``--help`` lists its flags)."""
from ldu_jax.cli.train import __doc__, main  # noqa: F401 - absl's --help prints __main__'s docstring

if __name__ == "__main__":
    main()
