"""Mist (fused textural + semantic loss) on the tiny random SD bundle: tests and smoke runs."""
from ldu_jax.protect.baselines import base_config


def get_config():
    c = base_config("mist")
    c.sd = "tiny"
    c.eps = 8 / 255                # L-inf budget on [0, 1]
    c.step_size = 2 / 255
    c.steps = 4
    c.apply_batch = 4
    return c
