"""SDS(+) (Xue et al. 2024) on SD 2.1-base, 512 px, with Mist's budget and schedule, on which
their code builds: L-inf 16/255, 100 steps of 1/255, prompt "a photo"."""
from ldu_jax.protect.baselines import base_config


def get_config():
    c = base_config("sds")
    c.sd = "stabilityai/stable-diffusion-2-1-base"   # or a local diffusers folder
    c.resolution = 512
    c.eps = 16 / 255
    c.step_size = 1 / 255
    c.steps = 100
    c.prompt = "a photo"
    return c
