"""The commands (``python -m ldu_jax.cli.<command>``, or the ``ldu-*`` console scripts), and their
shared plumbing: config flags, the compilation cache, user errors reported in one line.

Each command module is thin: it defines its flags and calls one library function; the flags
here (``--distributed``, ``--coordinator_address``, ``--num_processes``, ``--process_id``) start the
multi-host runtime for every command. A
``errors.UserError`` (bad path, file, config key or value) ends the command with ``error: <message>``
and exit status 1; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import re
import sys

import jax
from absl import app, flags, logging

from ldu_jax import config_file, parallel
from ldu_jax.errors import UserError

# Every command runs on one host or many: these start the multi-host runtime (parallel.initialize)
# before the command's main. TPU pod slices, Slurm and MPI need none of them.
flags.DEFINE_enum("distributed", "auto", list(parallel.MODES),
                  "multi-host start-up: auto (from the environment or --coordinator_address), on, off")
flags.DEFINE_string("coordinator_address", "", "a plain set of machines: host:port of process 0")
flags.DEFINE_integer("num_processes", 0, "with --coordinator_address: how many processes in all")
flags.DEFINE_integer("process_id", -1, "with --coordinator_address: this process's id, 0 .. num_processes - 1")


def _clean(e) -> str:
    return re.sub(r"\s+", " ", str(e).encode().decode("unicode_escape")).strip(" '\"")


def define_config(name: str, default: str | None, help_text: str):
    """``config_flags.DEFINE_config_file`` that names an unknown override key instead of a traceback;
    a relative ``default`` (``configs/<file>.py``) is found from any working directory.

    config_flags resolves ``--<name>.a.b=v`` overrides while defining the flag, so errors surface here.
    """
    from ml_collections import config_flags
    if default:
        default = config_file.resolve(default)   # a built-in default works from any directory
    for i, arg in enumerate(sys.argv):          # so does --config=configs/<file>.py (the console scripts)
        if arg.startswith(f"--{name}="):
            path, sep, rest = arg.split("=", 1)[1].partition(":")
            if not os.path.isfile(config_file.resolve(path)):
                sys.exit(f"error: --{name}: config file {path} does not exist")
            sys.argv[i] = f"--{name}={config_file.resolve(path)}{sep}{rest}"
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


CACHE_ENV = "LDU_JAX_COMPILE_CACHE"


def enable_compilation_cache(path: str | None = None) -> str:
    """Keep XLA's compiled programs on disk, so a command run again (an evaluation resumed, the
    same protection on new photos) loads its programs instead of compiling them: ``path``, else
    $LDU_JAX_COMPILE_CACHE, else ~/.cache/ldu_jax/xla; '' turns it off. Returns the folder used.
    JAX's own settings apply (e.g. JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, 1 s by default)."""
    if path is None:
        path = os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "ldu_jax", "xla"))
    if path and not jax.config.jax_compilation_cache_dir:   # a cache set by the caller wins
        jax.config.update("jax_compilation_cache_dir", path)
    return jax.config.jax_compilation_cache_dir or ""


def run(main, multihost=False):
    """``app.run(main)`` with clean messages for bad flags and for a ``UserError`` raised by main,
    and the persistent compilation cache on (``enable_compilation_cache``). ``multihost``: the
    command runs across several processes: True, or a function of the command's argv saying
    whether this use of it does (e.g. ``perturb.py train`` and ``apply``, not the demo); others
    refuse to start as one of many. ``--help`` prints the command module's docstring (absl prints
    ``__main__``'s, which a console script lacks)."""
    entry = sys.modules.get("__main__")
    if entry is not None and not entry.__doc__:
        entry.__doc__ = sys.modules[main.__module__].__doc__

    def wrapped(argv):
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        f = flags.FLAGS
        try:
            across = multihost(argv) if callable(multihost) else multihost
            if parallel.initialize(f.distributed, f.coordinator_address, f.num_processes, f.process_id) \
                    and not across and jax.process_count() > 1:
                raise UserError(f"{os.path.basename(sys.argv[0])} runs in one process for now (across hosts: "
                                "train.py, perturb.py train and apply, build_world, attack, evaluate); start it "
                                "without --coordinator_address / --distributed=on")
            enable_compilation_cache()
            return main(argv)
        except UserError as e:
            sys.exit(f"error: {e}")

    app.run(wrapped, flags_parser=_parse)
