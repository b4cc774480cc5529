"""From clean photos to the papers' results table: protect -> purify -> personalize -> generate ->
measure, cell by cell, cached in a work dir (``runner``); what a cell measures (``measure``); the
tables, plots and sample grids (``report``); the subjects' folders (``subjects``); and whether a
world is as vulnerable as Stable Diffusion (``calibrate``). The command is ``ldu_jax/cli/evaluate.py``."""
from ldu_jax.evaluate.runner import Runner, cells_of, run, subject_groups

__all__ = ["Runner", "cells_of", "run", "subject_groups"]
