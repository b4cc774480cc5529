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
    c.output = "decode"            # x' = D(z0') (the paper); 'residual': x' = x + D(z0') - D(z0)
    c.remat = False                # recompute VAE / UNet / DiT in the backward pass (memory)
    c.dtype = "float32"            # compute dtype of the SD parts and the DiT: float32 or bfloat16
    c.perturber = ml_collections.ConfigDict(dict(widths=(16, 32), norm="group", residual=True))
    # objective: maximise L_pers subject to d(x', x) <= eps
    c.distance = "mse"             # 'mse' (on [-1, 1] images) or 'ssim' (1 - SSIM)
    c.eps = (8 / 255) ** 2         # MSE budget on [-1, 1]: PSNR 36.1 dB on [0, 1]
    c.multiplier = "dual"          # 'dual' (λ <- max(0, λ + lam_lr (d/eps - 1))) or 'hinge'
    c.lam_init = 0.0
    c.lam_lr = 0.5
    c.hinge_weight = 10.0
    c.ti_weight = 1.0              # Textual Inversion surrogate
    c.db_weight = 0.0              # DreamBooth surrogate
    c.placeholder_token = "<person>"
    c.init_word = "person"
    c.learned_embeds = ""          # a learned_embeds.safetensors from an attack run (else init_word)
    c.ti_prompt = "a photo of {} person"
    c.db_prompt = "a photo of sks person"
    c.n_draws = 2                  # (latent sample, t, noise) draws per image
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
    # apply
    c.apply_batch = 4
    c.opt_steps = 10               # ldu-opt: Adam steps on δ per batch
    c.opt_lr = 0.05
    return c
