"""Textual Inversion on SD 1.5 as in the public LDU scripts: 512 px, batch 1 x accumulation 4,
lr 5e-4 scaled by batch (2e-3 effective), constant schedule, 1500 steps, init word "person"."""
from configs import attack_ti_tiny


def get_config():
    c = attack_ti_tiny.get_config()
    c.model = "runwayml/stable-diffusion-v1-5"
    c.batch_size = 1
    c.grad_accum = 4
    c.max_steps = 1500
    c.lr = 5e-4
    c.scale_lr = True
    c.log_every = 50
    c.save_every = 500
    c.num_samples = 16
    c.sample_steps = 100
    return c
