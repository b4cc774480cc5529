"""FSMG (Anti-DreamBooth) on SD 2.1-base, 512 px: a DreamBooth surrogate trained on the clean
images with the attack protocol (1000 steps, lr 5e-7, batch 2, text encoder trained, prior
preservation with 200 class images; set ``surrogate.class_dir``), then 100 sign-PGD steps with
eps 0.05 and step 0.005 on [-1, 1] (0.025 / 0.0025 here). To attack an already fine-tuned
DreamBooth model instead, point ``sd`` at its folder and set ``surrogate_steps=0``."""
from ldu_jax.protect.baselines import base_config


def get_config():
    c = base_config("fsmg")
    c.sd = "stabilityai/stable-diffusion-2-1-base"   # or a local diffusers folder
    c.resolution = 512
    c.eps = 0.025
    c.step_size = 0.0025
    c.steps = 100
    c.surrogate_steps = 1000
    c.prompt = "a photo of sks person"
    c.surrogate.update(lr=5e-7, batch_size=2, train_text_encoder=True, prior_weight=1.0,
                       class_prompt="a photo of person", num_class_images=200)
    return c
