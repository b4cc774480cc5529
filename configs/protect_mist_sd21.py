"""Mist (Liang et al. 2023, fused mode) on SD 2.1-base, 512 px, Mist's defaults: L-inf 16/255,
100 steps of 1/255, textural loss (summed squared latent distance to the target) minus 1e4 x the
semantic loss, prompt "a photo". Mist's own target is its MIST.png texture: set ``target`` to its
path; the default is the built-in procedural texture."""
from ldu_jax.protect.baselines import base_config


def get_config():
    c = base_config("mist")
    c.sd = "stabilityai/stable-diffusion-2-1-base"   # or a local diffusers folder
    c.resolution = 512
    c.eps = 16 / 255
    c.step_size = 1 / 255
    c.steps = 100
    c.rate = 1e4
    c.target = "pattern"
    c.prompt = "a photo"
    return c
