"""The mini-world's VAE: SD's AutoencoderKL (ldu_jax.sd.autoencoder), factor 4 (64 px -> 16x16x4), trained from
scratch on the procedural portraits (ldu_jax/miniworld/train_vae.py).

    get_config()          the real run (0.68M parameters, 2.7 MB of float32 weights)
    get_config('v2')      mini-world v2: SD's factor 8 and 4 latent channels on 128 px textured
                          portraits (128 px -> 16x16x4), SD's small KL weight
    get_config('v2-gan')  v2 continued with SD's patch discriminator and a feature-matching loss
                          (set --config.init_from=<the v2 run> to start from its weights)
    get_config('fragile') the shipped VAE's encoder fine-tuned to be as fragile as SD's, decoder frozen
                          (ldu_jax/miniworld/train_vae.py; --config.init_from=<a VAE folder or run>)
    get_config('test')    tiny widths and a handful of steps (tests)
"""
import ml_collections


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 16                # global batch, sharded over the devices
    c.max_steps = 1500
    c.log_every = 50
    c.save_every = 500
    c.keep = 2
    c.scale_batches = 8              # batches whose latent std sets scaling_factor (1 / std)
    c.model = ml_collections.ConfigDict(dict(
        sample_size=64,
        block_out_channels=(16, 32, 64),   # len - 1 downsamplings: factor 4
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    ))
    c.loss = ml_collections.ConfigDict(dict(
        rec="l1",                    # 'l1' or 'l2' (mean over pixels)
        kl_weight=1e-5,              # x KL(q(z|x) || N(0, I)), mean over latent elements
        edge_weight=0.5,             # x L1 of the finite-difference image gradients
        adv_weight=0.0,              # > 0: x the patch discriminator's adversarial loss (SD's VAE recipe)
        feat_weight=0.0,             # x L1 between the discriminator's features of photo and reconstruction
        disc_start=0,                # the step from which the discriminator and both terms are on
    ))
    c.disc = ml_collections.ConfigDict(dict(channels=(32, 64, 128), groups=8, lr=2e-4))
    c.fragile = ml_collections.ConfigDict(dict(
        weight=0.0,                  # > 0: fine-tune init_from's encoder to be fragile (train_vae's doc)
        eps=0.06,                    # the attack's L-inf radius on [-1, 1]: PhotoGuard's published budget
        pgd_steps=4,
        anchor_weight=10.0,          # x relative squared move of clean latents from init_from's
        random_weight=1.0,           # x relative squared move under a random +-eps sign change
    ))
    c.init_from = ""                 # a train_vae work dir whose weights a new run starts from
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0,
        schedule="cosine", warmup=200, grad_clip=1.0,
    ))
    if arg == "v2":
        c.batch_size = 8
        c.max_steps = 3000
        c.save_every = 250
        c.keep = 20                  # the calibration measures the encoder along the run
        c.model.sample_size = 128
        c.model.block_out_channels = (24, 48, 96, 96)   # 3 downsamplings: factor 8, as SD's KL-f8
        c.loss.kl_weight = 1e-6      # SD's KL-f8 weight
        c.optim.warmup = 300
    elif arg == "v2-gan":
        c = get_config("v2")
        c.max_steps = 1500
        c.optim.lr = 2e-4
        c.optim.warmup = 0
        c.loss.adv_weight = 0.1
        c.loss.feat_weight = 1.0
    elif arg == "fragile":
        c.max_steps = 600
        c.save_every = 100
        c.keep = 10
        c.optim.lr = 3e-4
        c.optim.warmup = 50
        c.fragile.weight = 1.0
    elif arg == "test":
        c.batch_size = 8
        c.max_steps = 30
        c.log_every = 5
        c.save_every = 15
        c.scale_batches = 2
        c.model.block_out_channels = (8, 16, 16)
        c.model.norm_num_groups = 4
        c.optim.lr = 3e-3
        c.optim.warmup = 0
    elif arg:
        raise ValueError(f"unknown miniworld_vae config variant {arg!r} (use '', 'v2', 'v2-gan', 'fragile' or 'test')")
    return c
