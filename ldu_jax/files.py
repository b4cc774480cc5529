"""Writing files so that a killed run never leaves a half-written one: the one place for it.

A file is written to a temporary name beside its destination and renamed onto it; it gets the
permissions ``open()`` would give it (0666 less the umask), not ``mkstemp``'s 0600.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it to read it
    would, for a moment, give files other threads create, e.g. orbax's, the wrong mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", **open_kw):
    """``with atomic_write(path, "w") as f:`` write ``f``; on success it replaces ``path`` (its
    folder is created), on an exception ``path`` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(dest):
    """``with atomic_dir(dest) as tmp:`` fill the folder ``tmp`` (``<dest>.tmp``, absent on entry);
    on success it replaces ``dest``, on an exception ``dest`` is left as it was."""
    dest = os.fspath(dest).rstrip("/")
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def write_json(path, obj, indent: int = 1, sort_keys: bool = False):
    """JSON, atomically (numpy scalars as floats); ends with a newline."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys, default=float)
        f.write("\n")


def read_json(path):
    """The JSON at ``path``, or None if it is missing or unreadable (a cache entry to recompute)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
