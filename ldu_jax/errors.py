"""What a user can fix, as one exception type: the entry points print it in one line; every other
exception is a bug and keeps its traceback.

Each subclass also derives from the built-in type callers already expect (``ValueError``,
``FileNotFoundError``), so ``except ValueError`` around a library call still works.
"""


class UserError(Exception):
    """A bad path, file, flag, config key or value: the message says which, and what to do."""


class ConfigError(UserError, ValueError):
    """A config key or value (or a model folder's config.json entry) that is unknown or unsupported."""


class MissingError(UserError, FileNotFoundError):
    """A file, folder or checkpoint the user named does not exist."""


class FileFormatError(UserError, ValueError):
    """A file the user named exists but is not what it should be (wrong format, wrong contents)."""


class RefusedError(UserError, PermissionError, ValueError):
    """A file the user named that we will not read without their say-so: a pickle (unpickling can run
    code from the file) without ``allow_pickle`` / ``--allow_pickle`` / ``LDU_JAX_ALLOW_PICKLE=1``.
    Also a ``ValueError``, as the SD weights' refusal of a ``.bin`` was one."""


class MissingKeyError(UserError, KeyError):
    """A file or work dir the user named that lacks an entry it should hold (a checkpoint without
    the state key asked for). Printed as its message, not quoted as a ``KeyError`` would be."""

    def __str__(self):
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()
