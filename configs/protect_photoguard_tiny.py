"""PhotoGuard encoder attack on the tiny SD bundle: tests and smoke runs."""
from ldu_jax.protect.baselines import base_config


def get_config():
    c = base_config("photoguard")
    c.sd = "tiny"
    c.eps = 8 / 255                # L-inf budget on [0, 1]
    c.step_size = 2 / 255
    c.steps = 4
    c.apply_batch = 4
    c.random_start = True
    c.step_decay = "linear"
    return c
