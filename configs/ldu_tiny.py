"""LDU on tiny models (CPU, a few minutes): tests and the demo. Tiny random models protect nothing;
point ``sd`` and ``shortcut`` at real ones (see ldu_sd15.py)."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.sd = "tiny"                  # Stable Diffusion: 'tiny', a diffusers folder or a hub id
    c.shortcut = "random"          # shortcut DiT: a train.py work dir (on this SD's VAE latents), or 'random'
    c.resolution = 0               # 0: the SD model's resolution
    c.dataset = "samples"          # ρ training images: a folder, 'samples' (built-in portraits) or
                                   # 'miniworld' (the mini-world's training portraits)
    c.rho_checkpoint = ""          # apply --method=ldu: ρ work dir used when --checkpoint is not given
    # pipeline
    c.steps = 4                    # k shortcut steps for invert and denoise
    c.rounds = 1                   # invert -> shift -> denoise cycles
    c.fixed_point_iters = 0        # refinement of each inversion step
    c.output = "decode"            # x' = D(z0') (the paper); 'residual': x' = x + D(z0'(δ)) - D(z0'(0))
    c.remat = False                # recompute VAE / UNet / DiT in the backward pass (memory)
    c.dtype = "float32"            # compute dtype of the SD parts and the DiT: float32 or bfloat16
    c.perturber = ml_collections.ConfigDict(dict(widths=(16, 32), norm="group", residual=True))
    # objective: maximise L_pers subject to d(x', x) <= eps
    c.distance = "mse"             # 'mse' (on [-1, 1] images) or 'ssim' (1 - SSIM)
    c.eps = (8 / 255) ** 2         # MSE budget on [-1, 1]: PSNR 36.1 dB on [0, 1]
    c.constraint = "project"       # 'project': each image's change scaled onto the budget (x + s (x' - x));
                                   # 'dual': the paper's Lagrangian,
                                   #   λ <- clip(λ + lam_lr clip(d/eps - 1, ±1), 0, lam_max);
                                   # 'hinge': the public code's fixed hinge_weight x relu(d/eps - 1)
    c.lam_init = 0.0
    c.lam_lr = 0.5
    c.lam_max = 100.0
    c.hinge_weight = 10.0
    c.ti_weight = 1.0              # Textual Inversion surrogate
    c.db_weight = 0.0              # DreamBooth surrogate
    c.placeholder_token = "<person>"
    c.init_word = "person"
    c.learned_embeds = ""          # a learned_embeds.safetensors from an attack run (else init_word)
    c.ti_prompt = "a photo of {} person"
    c.db_prompt = "a photo of sks person"
    c.n_draws = 2                  # (latent sample, t, noise) draws per image
    c.draw_batch = 0               # draws per UNet call (0: all in one; fewer saves memory)
    c.encoder_weight = 0.0         # + weight x mean |E(x') - E(x)|^2 (VAE posterior means) in the maximised loss
    c.quantize = True              # straight-through uint8 rounding of x' before the losses
    # ρ training
    c.batch_size = 4
    c.max_steps = 20
    c.lr = 1e-3
    c.weight_decay = 0.0
    c.log_every = 5
    c.save_every = 10
    c.keep = 2
    c.grid_every = 0
    c.heldout = ""                 # images whose L_pers gain (protected / clean - 1) is logged at each
                                   # log step: a folder, 'miniworld' (held-out identities), '' = none
    c.heldout_draws = 16
    # apply
    c.apply_batch = 4
    c.opt_method = "gn"            # ldu-opt: 'gn' (Gauss-Newton steps in the image metric) or 'adam'
    c.opt_steps = 10               # ldu-opt: steps on δ per batch
    c.opt_draws = 0                # ldu-opt: draws per gradient and per score (0: n_draws)
    c.cg_iters = 6                 # gn: conjugate-gradient steps for (JᵀJ + μ) p = Jᵀ h
    c.cg_damping = 0.1             # gn: μ relative to the curvature along the gradient
    c.step_frac = 1.0              # gn: step length in the image / budget radius, cosine-decayed to
    c.step_frac_end = 0.1          #     step_frac_end
    c.grad_ema = 0.5               # gn: EMA of the image gradient across steps
    c.bisect_iters = 8             # gn: bisection steps scaling δ onto the budget (uint8-rounded image)
    c.scale_max = 2.0              # gn: the largest scale of δ tried
    c.opt_lr = 0.05                # adam: learning rate
    return c
