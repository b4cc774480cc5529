"""Textual Inversion on the tiny Stable Diffusion bundle (CPU, seconds): tests and the demo."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "tiny"                 # 'tiny', a diffusers folder, or a hub id
    c.seed = 0
    c.min_images = 2
    c.placeholder_token = "<person>"
    c.init_word = "person"
    c.templates = "person"           # a template set of personalize/textual_inversion.py, or a list
    c.batch_size = 8
    c.grad_accum = 1
    c.max_steps = 40                 # optimizer steps
    c.lr = 5e-3
    c.scale_lr = False               # lr x batch x accumulation, as diffusers' --scale_lr
    c.weight_decay = 1e-2
    c.log_every = 10
    c.save_every = 20
    c.keep = 2
    c.validation_prompts = ("a photo of {} person", "a dslr portrait of {} person")
    c.num_samples = 2
    c.sample_steps = 10              # DDIM steps
    c.guidance = 7.5
    return c
