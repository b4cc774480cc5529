"""LDU on the mini-world's models (ldu_jax.miniworld.build): its VAE / UNet / text encoder bundle
and its shortcut DiT, ρ trained on the world's training portraits."""
from configs import ldu_tiny


def get_config():
    c = ldu_tiny.get_config()
    c.sd = "runs/miniworld/t2i/sd"
    c.shortcut = "runs/miniworld/shortcut"
    c.dataset = "runs/miniworld/data/train/images"
    c.resolution = 64
    c.max_steps = 2000
    c.batch_size = 8
    c.log_every = 25
    c.save_every = 250
    c.grid_every = 250
    c.ti_weight = 1.0
    c.db_weight = 1.0
    c.opt_steps = 50
    return c
