"""Textual Inversion on SD 2.1-base as in the public LDU scripts: as SD 1.5 but 400 steps."""
from configs import attack_ti_sd15


def get_config():
    c = attack_ti_sd15.get_config()
    c.model = "stabilityai/stable-diffusion-2-1-base"
    c.max_steps = 400
    return c
