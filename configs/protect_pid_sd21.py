"""PID (Li et al. 2024) on SD 2.1-base, 512 px: eps 12.75/255 (0.05), 1000 steps of 1/255 from a
random start, loss 'add-log' (MSE of the posterior mean plus that of its log-variance)."""
from ldu_jax.protect.baselines import base_config


def get_config():
    c = base_config("pid")
    c.sd = "stabilityai/stable-diffusion-2-1-base"   # or a local diffusers folder
    c.resolution = 512
    c.eps = 12.75 / 255
    c.step_size = 1 / 255
    c.steps = 1000
    c.random_start = True
    c.pid_loss = "add-log"
    return c
