"""The mini-world's face recognition model: identity embedder + face / no-face detector.

    python -m ldu_jax.cli.build_world --workdir=runs/miniworld --stages=data,identity   # the build's identity stage

Data are rendered on the fly by ``ldu_jax.miniworld.world`` (batch k is a function of (seed, k)).
"""
import ml_collections


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.world_seed = 0            # which training identities (world.train_identities(n, world_seed))
    c.n_identities = 256        # training identities (classes)
    c.image_size = 64
    c.batch_size = 48           # portraits per step (global)
    c.neg_batch = 24            # non-face images per step (global); batch_size + neg_batch is sharded
    c.max_steps = 600
    c.log_every = 25
    c.save_every = 250
    c.keep = 2
    c.blur_prob = 0.3           # share of images (faces and non-faces) Gaussian-blurred, sigma 0.3..blur_max px
    c.blur_max = 1.2
    c.prefetch = 2              # batches rendered ahead in a background thread
    c.eval_heldout = 24         # held-out identities measured at the end (ISM same vs other, detector)
    c.model = ml_collections.ConfigDict(dict(
        widths=(16, 32, 64, 128),   # one stage each; the stem and each later stage halve the size
        blocks=1,                   # residual blocks (two 3x3 convs) per stage
        embed_dim=64,
        groups=8,                   # GroupNorm groups
    ))
    c.loss = ml_collections.ConfigDict(dict(
        scale=24.0,                 # cosine-softmax temperature (CosFace)
        margin=0.2,                 # additive cosine margin on the true class
        face_weight=1.0,            # weight of the face / no-face binary cross-entropy
    ))
    c.optim = ml_collections.ConfigDict(dict(lr=2e-3, warmup=100, weight_decay=1e-4, grad_clip=1.0))
    if arg == "test":  # tiny widths, a handful of steps (tests, the build's test profile)
        c.n_identities, c.batch_size, c.neg_batch = 8, 8, 8
        c.max_steps, c.log_every, c.save_every, c.prefetch, c.eval_heldout = 4, 2, 4, 1, 2
        c.model.widths, c.model.groups = (8, 16), 4
        c.optim.warmup = 0
    elif arg:
        raise ValueError(f"unknown miniworld_identity config variant {arg!r} (use '' or 'test')")
    return c
