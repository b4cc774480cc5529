"""Shared command-line plumbing: flag parsing and user errors reported in one line."""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the checkout: configs/ lives here


def _clean(e) -> str:
    return re.sub(r"\s+", " ", str(e).encode().decode("unicode_escape")).strip(" '\"")


def define_config(name: str, default: str | None, help_text: str):
    """``config_flags.DEFINE_config_file`` that names an unknown override key instead of a traceback;
    a relative ``default`` (``configs/<file>.py``) is found from any working directory.

    config_flags resolves ``--<name>.a.b=v`` overrides while defining the flag, so errors surface here.
    """
    from ml_collections import config_flags
    if default and not os.path.isabs(default) and not os.path.exists(default):
        default = os.path.join(ROOT, default)   # a built-in default works from any directory
    try:
        return config_flags.DEFINE_config_file(name, default, help_text, lock_config=True)
    except (AttributeError, KeyError) as e:
        key = _clean(e).split("'")[0].split(" Did you mean")[0].strip(" '\"")
        bad = [a.split("=")[0] for a in sys.argv[1:] if a.startswith(f"--{name}.") and key in a.split("=")[0]]
        sys.exit(f"error: {bad[0] if bad else key}: no such config key {key!r} ({_clean(e)})")


def _parse(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # config_flags overrides
        sys.exit(f"error: bad --config override: {_clean(e)}")


def run(main, user_errors=()):
    """``app.run(main)`` with clean messages for bad flags and for ``user_errors`` raised by main."""
    from ldu_jax.checkpoint import CheckpointMismatchError
    from ldu_jax.data import DataError
    expected = (DataError, CheckpointMismatchError, FileNotFoundError, PermissionError) + tuple(user_errors)

    def wrapped(argv):
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        try:
            return main(argv)
        except expected as e:
            sys.exit(f"error: {e}")

    app.run(wrapped, flags_parser=_parse)
