"""Tiny shortcut model: trains on a CPU in seconds (smoke runs, tests, the demo)."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Data: an image folder (recursive; jpg/png/webp), 'synthetic', or 'tfds:<name>'.
    c.dataset = "synthetic"
    c.image_size = 16           # pixels fed to the VAE (or to the DiT in pixel space)
    c.random_flip = True
    # Latent space: 'none' (pixel space), 'tiny' (random small VAE), a diffusers folder or hub id.
    c.vae = "none"
    c.batch_size = 16           # global batch, split over all devices and hosts
    c.max_steps = 60
    c.log_every = 10
    c.save_every = 30
    c.keep = 2
    c.sample_every = 0          # 0: only at the end
    c.sample_steps = (1, 4, 128)
    c.num_samples = 8
    # FID of EMA samples at each of sample_steps every fid_every steps (0: off), as shortcut-models
    # reports it: reference statistics from `python -m ldu_jax.cli.fid stats` and the weights.
    c.fid_every = 0
    c.fid_stats = ""            # reference .npz (mu, sigma)
    c.fid_weights = ""          # pytorch-fid Inception weights (.pth) or a converted .safetensors
    c.fid_samples = 64          # generated images per FID
    c.fid_batch = 16
    c.sharding = "dp"           # 'dp' or 'fsdp'
    c.fsdp_min_bytes = 4 * 2 ** 20
    c.distributed = "auto"      # jax.distributed.initialize(): 'auto', 'on', 'off'

    c.model = ml_collections.ConfigDict(dict(
        train_type="shortcut",  # 'shortcut' or 'naive' (plain flow matching)
        hidden_size=64, patch_size=2, depth=2, num_heads=2, mlp_ratio=2.0, dropout=0.0,
        num_classes=1, class_dropout_prob=1.0, cfg_scale=0.0,
        denoise_timesteps=128, bootstrap_every=2, bootstrap_ema=1, bootstrap_cfg=0,
        bootstrap_dt_bias=0,
        dtype="float32", remat=False, attention="einsum",
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.1,
        schedule="constant",    # 'constant' or 'cosine'
        warmup=0, grad_clip=0.0,  # 0: no clipping
        ema=0.99,
    ))
    return c
