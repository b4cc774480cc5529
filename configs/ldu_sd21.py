"""LDU on Stable Diffusion 2.1-base (512 px model; ρ trained at 256 px), otherwise as ldu_sd15."""
from configs import ldu_sd15


def get_config():
    c = ldu_sd15.get_config()
    c.sd = "stabilityai/stable-diffusion-2-1-base"
    c.shortcut = "runs/shortcut_sd21"
    return c
