"""LDU on the mini-world's models: the shipped VAE / UNet / text encoder bundle, shortcut DiT and
trained ρ (ldu_jax/miniworld/models, made by ``python -m ldu_jax.cli.build_world --install``).
The default config of ``python perturb.py``.

    get_config()          the shipped models; ρ training on world portraits ('miniworld' dataset)
    get_config('test')    a few ρ steps (the build's test profile)
"""
import os

from configs import ldu_tiny
from ldu_jax.miniworld import MODELS


def get_config(arg: str = ""):
    c = ldu_tiny.get_config()
    c.sd = os.path.join(MODELS, "sd")
    c.shortcut = os.path.join(MODELS, "shortcut")
    c.rho_checkpoint = os.path.join(MODELS, "rho")   # apply --method=ldu without --checkpoint uses it
    c.dataset = "miniworld"        # ρ training images: the world's training portraits, or a folder
    c.resolution = 64
    # The world's shortcut DiT inverts exactly only in 8 steps with fixed-point refinement (the
    # round trip reaches the VAE's own 26 dB; at k = 4 it is 12.6 dB), and its VAE reconstructs at
    # 26 dB, under the 36 dB budget: so x' = x + D(z0') - D(z0) ('residual', our option), not D(z0').
    c.steps = 8
    c.fixed_point_iters = 6
    c.output = "residual"
    c.max_steps = 400
    c.batch_size = 8
    c.log_every = 25
    c.save_every = 100
    c.grid_every = 100
    c.ti_weight = 1.0
    c.db_weight = 1.0
    c.n_draws = 4                  # ρ training: draws per image per step (the batches average the rest)
    c.draw_batch = 8
    c.heldout = "miniworld"
    # ldu-opt: 6 Gauss-Newton steps, 8 draws per gradient; CG to a small damping, because the
    # δ -> x' Jacobian is badly conditioned (measured on training-identity portraits, 32 shared
    # draws: 1 step with 6 CG steps at damping 0.1 +9.7% L_pers, 3 steps / 30 CG / 1e-3 +13.1%,
    # 6 / 30 / 3e-4 +13.7%, AdvDM +13.9%; see the README)
    c.opt_draws = 8
    c.opt_steps = 6
    c.cg_iters = 30
    c.cg_damping = 3e-4
    if arg == "test":
        c.max_steps, c.batch_size, c.log_every, c.save_every, c.grid_every = 2, 8, 1, 2, 0
        c.steps, c.fixed_point_iters = 2, 0
        c.heldout = ""
    elif arg:
        raise ValueError(f"unknown ldu_miniworld config variant {arg!r} (use '' or 'test')")
    return c
