"""LDU on Stable Diffusion 1.5 as the public code: ρ trained at 256 px on SD 1.5, a shortcut DiT-B
trained on that VAE's latents (train.py with configs/shortcut_celebahq256.py and --config.vae set
to the same SD folder), k = 4, batch 16, AdamW 1e-4, TI surrogate "a photo of <person> person".

    python perturb.py train --config=configs/ldu_sd15.py --workdir=runs/rho_sd15 \
        --config.sd=/models/stable-diffusion-v1-5 --config.shortcut=runs/shortcut_sd15 \
        --config.dataset=/data/celebahq/train
"""
from configs import ldu_tiny


def get_config():
    c = ldu_tiny.get_config()
    c.sd = "runwayml/stable-diffusion-v1-5"
    c.shortcut = "runs/shortcut_sd15"
    c.resolution = 256
    c.dataset = "/data/celebahq/train"
    c.remat = True
    c.perturber.widths = (64, 128, 256, 512)
    c.batch_size = 16
    c.max_steps = 20_000
    c.lr = 1e-4
    c.weight_decay = 1e-2
    c.log_every = 50
    c.save_every = 1000
    c.keep = 3
    c.grid_every = 1000
    c.apply_batch = 8
    c.opt_steps = 100
    c.opt_lr = 0.01
    return c
