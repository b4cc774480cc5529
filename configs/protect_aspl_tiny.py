"""ASPL (Anti-DreamBooth) on the tiny SD bundle: 2 rounds of 2 surrogate steps and 4 PGD steps."""
from ldu_jax.protect.baselines import base_config


def get_config():
    c = base_config("aspl")
    c.sd = "tiny"
    c.eps = 8 / 255                # L-inf budget on [0, 1]
    c.step_size = 2 / 255
    c.steps = 4
    c.apply_batch = 4
    c.rounds = 2
    c.surrogate_steps = 2
    c.surrogate.update(lr=1e-3, train_text_encoder=False, prior_weight=0.0)
    return c
