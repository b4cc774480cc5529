"""Loading a configs/*.py file by path: what jobs do with the configs their own config names
(an evaluation's method and attack configs, the mini-world build's stage configs), so the library
never imports ``configs``."""
from __future__ import annotations

import importlib.util
import os
import re

import ml_collections

from ldu_jax.errors import ConfigError, MissingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the checkout: configs/ lives here


def resolve(path: str) -> str:
    """``path``, or the project's own ``configs/...`` file when a relative path is not found here."""
    if not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(os.path.join(ROOT, path)):
        return os.path.join(ROOT, path)
    return path


def load(path: str, overrides=None) -> ml_collections.ConfigDict:
    """``get_config()`` of a configs/*.py file (``file.py:arg``: ``get_config(arg)``, as config flags
    read it), with ``overrides`` (a dict) applied; unknown keys are errors naming the key and the file."""
    path, _, arg = path.partition(".py:")
    path = resolve(path if path.endswith(".py") or not arg else path + ".py")
    if not os.path.isfile(path):
        raise MissingError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location("_cfg_" + re.sub(r"\W+", "_", path), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(arg) if arg else mod.get_config()
    for key, value in dict(overrides or {}).items():
        if key not in cfg:
            raise ConfigError(f"{path}: no config key {key!r} (an override)")
        with cfg.ignore_type():
            cfg[key] = value
    return cfg
