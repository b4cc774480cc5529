"""DreamBooth on the mini-world's text-to-image model: prior preservation on generated class
images, UNet only (the Anti-DreamBooth protocol, scaled to the world's small model)."""
import os

from configs import attack_db_tiny
from ldu_jax.miniworld import MODELS


def get_config():
    c = attack_db_tiny.get_config()
    c.model = os.path.join(MODELS, "sd")
    c.num_class_images = 32
    c.class_steps = 25
    c.class_guidance = 3.0
    c.batch_size = 4
    c.max_steps = 300
    c.lr = 1e-4
    c.log_every = 25
    c.save_every = 100
    c.num_samples = 8
    c.sample_steps = 25
    c.guidance = 3.0
    return c
