"""The mini-world's text-to-image latent diffusion model: a small CLIP text encoder and a
cross-attention UNet on the 16x16x4 latents of the mini-world VAE (configs/miniworld_vae.py), SD's
DDPM schedule, caption dropout for classifier-free guidance (ldu_jax/miniworld/train_t2i.py).

    get_config()              the shipped t2i: scene captions (skin, shirt and background named as
                              well as the face's attributes), v-prediction, the text encoder frozen
                              at its random initialisation (as SD freezes CLIP), 6000 steps
    get_config('attributes')  the first recipe, kept for the README's diagnosis: attribute captions,
                              epsilon loss, the text encoder trained jointly (it collapsed to a
                              constant and the model ignored its text), 2000 steps
    get_config('test')        tiny widths and a handful of steps (tests)
"""
import ml_collections

from ldu_jax.miniworld.train_t2i import ATTACK_PROMPTS


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.resolution = 64                # image size in px (the VAE's factor 4 gives 16x16 latents)
    c.batch_size = 32                # global batch, sharded over the devices
    c.max_steps = 6000
    c.log_every = 50
    c.save_every = 500
    c.keep = 2
    c.cfg_dropout = 0.1              # probability of training on the empty prompt
    c.ema = 0.995                    # EMA of the weights (with diffusers' warm-up); 0: save the live weights
    c.vocab_batches = 200            # batches whose captions make the tokenizer (when no vocabulary is given)
    c.base_words = True              # also make the tiny tokenizer's prompt words single tokens
    c.scene_captions = True          # world.caption(..., scene=True): also skin, shirt and background
    c.text_lr_scale = 0.0            # the text encoder's learning rate / the UNet's (0: frozen)
    c.scheduler = ml_collections.ConfigDict(dict(prediction_type="v_prediction"))   # over SD's DDPM defaults
    c.model = ml_collections.ConfigDict(dict(
        text=ml_collections.ConfigDict(dict(
            hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
            max_length=48,           # tokens per prompt (scene captions run to ~40)
        )),
        unet=ml_collections.ConfigDict(dict(
            latent_channels=4,
            block_out_channels=(32, 64, 64),   # multiples of 32 (the Flax UNet's GroupNorm)
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            num_heads=4,
        )),
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=1e-2,
        schedule="cosine", warmup=200, grad_clip=1.0,
    ))
    # Sample grid written at the end (samples/step_<n>.png): num_samples per prompt.
    c.sample_prompts = ("a photo of a person",) + tuple(p for p in ATTACK_PROMPTS if "sks" not in p)
    c.num_samples = 4
    c.sample_steps = 25
    c.guidance = 5.0
    if arg == "attributes":
        c.scene_captions = False
        c.text_lr_scale = 1.0
        c.scheduler.prediction_type = "epsilon"
        c.model.text.max_length = 32
        c.max_steps = 2000
        c.save_every = 1000
    elif arg == "test":
        c.batch_size = 8
        c.max_steps = 30
        c.log_every = 5
        c.save_every = 15
        c.ema = 0.9
        c.vocab_batches = 2
        c.base_words = False
        c.num_samples = 0
        c.model.text.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_length=16)
        c.model.unet.update(block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), num_heads=2)
        c.optim.update(lr=1e-3, warmup=0)
    elif arg:
        raise ValueError(f"unknown miniworld_t2i config variant {arg!r} (use '', 'attributes' or 'test')")
    return c
