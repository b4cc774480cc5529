"""An evaluation's subjects: folders in the Anti-DreamBooth layout ``<root>/<subject>/set_{A,B,C}``
(set_B is protected and attacked; the clean sets are the identity reference)."""
from __future__ import annotations

import os

import numpy as np

from ldu_jax import data as data_lib
from ldu_jax.errors import MissingError


def find_subjects(root: str, names=()) -> list[str]:
    """The subject folders under ``root`` (``names``: only these, each required)."""
    if not os.path.isdir(root):
        raise MissingError(f"subjects root {root} does not exist")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise MissingError(f"{root}: no subject folder {', '.join(missing)}")
        found = list(names)
    if not found:
        raise MissingError(f"{root}: no subject folders (<root>/<subject>/set_B expected)")
    return found


def read_images(folder: str) -> tuple[list[str], list[np.ndarray]]:
    """(stems, uint8 RGB images) of a folder; unreadable files are skipped silently."""
    return data_lib.read_rgb_folder(folder, log=lambda s: None)
