"""DreamBooth on SD 2.1-base, the Anti-DreamBooth protocol: prior preservation with 200 class
images of "a photo of person" (weight 1), text encoder trained, 512 px, batch 2, lr 5e-7, 1000
steps, instance prompt "a photo of sks person"; then 16 images per prompt, 100 steps, guidance 7.5."""
from configs import attack_db_tiny


def get_config():
    c = attack_db_tiny.get_config()
    c.model = "stabilityai/stable-diffusion-2-1-base"
    c.num_class_images = 200
    c.class_steps = 50
    c.train_text_encoder = True
    c.batch_size = 2
    c.max_steps = 1000
    c.lr = 5e-7
    c.log_every = 50
    c.save_every = 250
    c.num_samples = 16
    c.sample_steps = 100
    return c
