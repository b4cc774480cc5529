"""DreamBooth on the tiny Stable Diffusion bundle (CPU, seconds): tests and the demo."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "tiny"
    c.seed = 0
    c.min_images = 2
    c.identifier = "sks"
    c.instance_prompt = "a photo of sks person"
    c.class_prompt = "a photo of person"
    c.prior_weight = 1.0              # 0 disables prior preservation
    c.num_class_images = 8
    c.class_steps = 10                # DDIM steps for generating class images
    c.class_guidance = 7.5
    c.class_images_dir = ""           # '' : <workdir>/class_images; a shared folder reuses them across runs
    c.train_text_encoder = False
    c.lora_rank = 0                   # > 0: train LoRA adapters on the UNet attention instead
    c.lora_alpha = 4.0
    c.batch_size = 8
    c.grad_accum = 1
    c.max_steps = 40
    c.lr = 1e-3
    c.weight_decay = 1e-2
    c.max_grad_norm = 1.0
    c.log_every = 10
    c.save_every = 20
    c.keep = 2
    c.validation_prompts = ("a photo of {} person", "a dslr portrait of {} person")
    c.num_samples = 2
    c.sample_steps = 10
    c.guidance = 7.5
    return c
