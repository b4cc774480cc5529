"""``python perturb.py``: the command in ``ldu_jax/cli/perturb.py`` (``--help`` lists its flags)."""
from ldu_jax.cli.perturb import __doc__, main  # noqa: F401 - absl's --help prints __main__'s docstring

if __name__ == "__main__":
    main()
