"""PhotoGuard encoder attack (Salman et al. 2023) on SD 2.1-base, 512 px: eps 0.06 and step 0.02
on the [-1, 1] scale (0.03 / 0.01 here, [0, 1] units), 1000 iterations, random start, step size
decaying linearly to 1/100. ``target``: 'pattern' (default), 'zero' (minimise ||E(x')||) or a path."""
from ldu_jax.protect.baselines import base_config


def get_config():
    c = base_config("photoguard")
    c.sd = "stabilityai/stable-diffusion-2-1-base"   # or a local diffusers folder
    c.resolution = 512
    c.eps = 0.03
    c.step_size = 0.01
    c.steps = 1000
    c.random_start = True
    c.step_decay = "linear"
    c.target = "pattern"
    return c
