"""``python tests/multihost_main.py <module> [args]``: run ``python -m <module> [args]`` with every
process of a multi-process run writing its compiled programs to the persistent cache.

JAX writes cache entries from process 0 only, and on CPU the other processes' cache keys differ
from process 0's (the topology fingerprint is per process), so without this they compile every
program on every run of the multi-host tests. Entries written here are keyed as JAX keys them;
only who may write changes. If JAX's internals move, the command runs unpatched (slower, same
result)."""
import os
import runpy
import sys

import jax  # noqa: F401 - the modules patched below

try:
    from jax._src import compiler, distributed
    _write = compiler._cache_write

    def _write_from_any_process(*args, **kwargs):
        pid = distributed.global_state.process_id
        distributed.global_state.process_id = 0
        try:
            return _write(*args, **kwargs)
        finally:
            distributed.global_state.process_id = pid

    compiler._cache_write = _write_from_any_process
except (ImportError, AttributeError):   # pragma: no cover - another JAX
    pass

if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    sys.path[0] = os.getcwd()   # as python -m: the working directory, not tests/
    runpy.run_module(module, run_name="__main__", alter_sys=True)
