"""ASPL (Anti-DreamBooth, Van Le et al. 2023) on SD 2.1-base, 512 px: 50 rounds of {3 DreamBooth
steps of a copy of the surrogate on the clean images, 6 sign-PGD steps, 3 steps of the surrogate
on the perturbed images}; eps 0.05 and step 0.005 on [-1, 1] (0.025 / 0.0025 here); surrogate
DreamBooth: lr 5e-6, batch 2, text encoder trained, prior preservation (weight 1) with 200 class
images of "a photo of person" (set ``surrogate.class_dir``; missing images are generated).
Each batch of ``apply_batch`` images is one person's set."""
from ldu_jax.protect.baselines import base_config


def get_config():
    c = base_config("aspl")
    c.sd = "stabilityai/stable-diffusion-2-1-base"   # or a local diffusers folder
    c.resolution = 512
    c.eps = 0.025
    c.step_size = 0.0025
    c.steps = 6
    c.rounds = 50
    c.surrogate_steps = 3
    c.prompt = "a photo of sks person"
    c.surrogate.update(lr=5e-6, batch_size=2, train_text_encoder=True, prior_weight=1.0,
                       class_prompt="a photo of person", num_class_images=200)
    return c
