"""Textual Inversion on the mini-world's text-to-image model (shipped in ldu_jax/miniworld/models/sd)."""
import os

from configs import attack_ti_tiny
from ldu_jax.miniworld import MODELS


def get_config():
    c = attack_ti_tiny.get_config()
    c.model = os.path.join(MODELS, "sd")
    c.batch_size = 4
    c.max_steps = 300
    c.lr = 5e-3
    c.log_every = 25
    c.save_every = 100
    c.num_samples = 8
    c.sample_steps = 25
    c.guidance = 3.0
    return c
