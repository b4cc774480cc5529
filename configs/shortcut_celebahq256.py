"""The public DiT-B recipe on CelebA-HQ 256 (latents of sd-vae-ft-mse): unconditional, 410k steps.

    python train.py --config=configs/shortcut_celebahq256.py --workdir=runs/celeba \
        --config.dataset=/data/celebahq256
"""
from configs import shortcut_tiny


def get_config():
    c = shortcut_tiny.get_config()
    c.dataset = "/data/celebahq256"
    c.image_size = 256
    c.vae = "stabilityai/sd-vae-ft-mse"
    c.batch_size = 64
    c.max_steps = 410_000
    c.log_every = 1000
    c.save_every = 20_000
    c.keep = 3
    c.sample_every = 20_000
    c.num_samples = 16
    c.fid_every = 0             # e.g. 20000 with fid_stats / fid_weights set
    c.fid_samples = 10000
    c.fid_batch = 128
    c.model.update(dict(
        hidden_size=768, patch_size=2, depth=12, num_heads=12, mlp_ratio=4.0,
        num_classes=1, class_dropout_prob=1.0, cfg_scale=0.0,
        denoise_timesteps=128, bootstrap_every=8, bootstrap_ema=1, bootstrap_cfg=0, bootstrap_dt_bias=0,
    ))
    c.optim.update(dict(lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.1, ema=0.999))
    return c
