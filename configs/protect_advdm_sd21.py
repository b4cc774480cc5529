"""AdvDM (Liang et al. 2023) on SD 2.1-base, 512 px, with the settings Mist uses for it:
L-inf 16/255, 100 steps of 1/255, one (latent, t, noise) draw per step, prompt "a photo"."""
from ldu_jax.protect.baselines import base_config


def get_config():
    c = base_config("advdm")
    c.sd = "stabilityai/stable-diffusion-2-1-base"   # or a local diffusers folder
    c.resolution = 512
    c.eps = 16 / 255
    c.step_size = 1 / 255
    c.steps = 100
    c.prompt = "a photo"
    return c
