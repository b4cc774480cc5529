"""The mini-world's shortcut DiT, trained by train.py on the latents of the mini-world VAE
(ldu_jax.jobs.build_world sets ``dataset`` and ``vae`` to the world's training images and VAE).

    get_config()          the real run
    get_config('test')    tiny widths and a handful of steps
"""
from configs import shortcut_tiny


def get_config(arg: str = ""):
    c = shortcut_tiny.get_config()
    c.dataset = "runs/miniworld/data/train/images"
    c.vae = "runs/miniworld/vae/vae"
    c.image_size = 64              # 64 px -> 16x16x4 latents
    c.batch_size = 32
    c.max_steps = 2500
    c.log_every = 50
    c.save_every = 1000
    c.model.update(dict(hidden_size=128, patch_size=2, depth=4, num_heads=4, mlp_ratio=4.0))
    c.optim.update(dict(lr=6e-4, schedule="cosine", warmup=200, grad_clip=1.0, ema=0.995))
    if arg == "test":
        c.batch_size, c.max_steps, c.log_every, c.save_every = 8, 4, 2, 4
        c.sample_steps, c.num_samples = (1, 4), 4
        c.model.update(dict(hidden_size=32, depth=1, num_heads=2, mlp_ratio=2.0))
        c.optim.update(dict(warmup=0, ema=0.9))
    elif arg:
        raise ValueError(f"unknown miniworld_shortcut config variant {arg!r} (use '' or 'test')")
    return c
