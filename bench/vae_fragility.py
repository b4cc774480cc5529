"""What makes a VAE as fragile as Stable Diffusion's KL-f8 under PhotoGuard's encoder attack?

Trains factor-8 VAE variants (``configs/miniworld_vae.py:v2`` with one change each to the model,
the loss or the portraits it learns: ``VARIANTS``) and runs ``calibrate.encoder_attack`` (eps 0.06
in [-1, 1]) at every kept checkpoint, on held-out portraits drawn like the training data. Prints one
row per (variant, step): the round-trip PSNR of clean and attacked photos and the drop (issue 17's
gate 1 asks >= 10 dB), how far the attack moves the latent (relative) and that over the relative
pixel change (amplification), and the posterior's std over the latents' std (how much noise the
decoder learned to ignore).

    python bench/vae_fragility.py --workdir=/tmp/frag                        # every variant, 64 px
    python bench/vae_fragility.py --workdir=/tmp/frag --variants=base,clean --size=128 --steps=3000

Runs resume from their checkpoints; finished measurements are cached in ``<workdir>/rows.json``.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import miniworld_vae  # noqa: E402
from ldu_jax import checkpoint as ckpt  # noqa: E402
from ldu_jax import files  # noqa: E402
from ldu_jax.evaluate import calibrate  # noqa: E402
from ldu_jax.jobs import build_world as build  # noqa: E402
from ldu_jax.miniworld import train_vae, world  # noqa: E402
from ldu_jax.sd import vae as vae_lib  # noqa: E402

# name -> config overrides on configs/miniworld_vae.py:v2, and the portraits it trains on
# (world.render's style, sensor_noise and grain)
WIDE = {"model.block_out_channels": (48, 96, 192, 192), "model.layers_per_block": 2}
VARIANTS = {
    "base": ({}, {}),
    "clean": ({}, {"sensor_noise": 0.0}),                   # no sensor noise in the photos
    "smooth": ({}, {"sensor_noise": 0.0, "grain": 0.0}),    # nor v2's white grain
    "v1-clean": ({}, {"style": "v1", "sensor_noise": 0.0}),  # flat v1 shapes: fully compressible content
    "sd-kl": ({"loss.kl_weight": 2e-8}, {}),                # SD's KL weight per element (1e-6 x 16k / 786k)
    "wide": (WIDE, {}),
    "clean-wide": (WIDE, {"sensor_noise": 0.0}),
    "l2": ({"loss.rec": "l2", "loss.edge_weight": 0.0}, {}),
    "c16": ({"model.latent_channels": 16}, {}),            # 4x the latent (SD3's 16 channels): sharper
}


def variant_config(name, size, steps, save_every):
    overrides, look = VARIANTS[name]
    c = miniworld_vae.get_config("v2")
    c.model.sample_size = size
    c.max_steps, c.save_every, c.keep, c.log_every = steps, save_every, 100, 100
    c.optim.warmup = min(c.optim.warmup, steps // 10)
    for key, value in overrides.items():
        node, leaf = key.rsplit(".", 1)
        setattr(c[node], leaf, value)
    return c, {"style": "v2", **look}


def posterior_noise(module, params, images_u8) -> float:
    """Mean posterior std over the std of the posterior means: the latent noise the decoder sees."""
    x = jnp.asarray(images_u8, jnp.float32) / 127.5 - 1.0
    mean, logvar = module.apply({"params": params}, x, method=module.encode)
    return float(jnp.mean(jnp.exp(0.5 * logvar)) / jnp.std(mean))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--save_every", type=int, default=500)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--attack_steps", type=int, default=200)
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    for v in names:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    cache = os.path.join(args.workdir, "rows.json")
    rows = files.read_json(cache) or {}
    for name in names:
        c, look = variant_config(name, args.size, args.steps, args.save_every)
        run = os.path.join(args.workdir, f"{name}-{args.size}")
        t0 = time.time()
        start = int(ckpt.make_manager(run).latest_step() or 0) if os.path.isdir(run) else 0
        train_vae.train_vae(c, run, build.world_batches(512, c.batch_size, c.seed, args.size, **look), log=print)
        if args.steps > start:
            print(f"{name}: {(time.time() - t0) / (args.steps - start):.2f} s/step")
        x = np.stack([world.render(h, 0, args.size, np.uint8, **look) for h in world.heldout_identities(args.images)])
        module = train_vae.make_vae_module(c.model)
        for step in sorted(ckpt.make_manager(run).all_steps()):
            key = f"{name}-{args.size}@{step}"
            if key in rows:
                continue
            state, _ = ckpt.restore_state(run, step)
            params = jax.tree_util.tree_map(np.asarray, state["params"])
            r = calibrate.encoder_attack(vae_lib.VAE(module, None), params, x, args.attack_steps)
            r["posterior_noise"] = posterior_noise(module, params, x)
            rows[key] = r
            files.write_json(cache, rows)
            print(f"{key}: rec {r['psnr_rec_clean']:.1f} dB, attacked {r['psnr_rec_protected']:.1f} "
                  f"(drop {r['psnr_drop']:.2f}), latent {100 * r['latent_rel_change']:.0f}%", flush=True)
    print("\n| variant | step | rec dB | attacked dB | drop dB | latent moved | amplification | posterior noise |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted(rows, key=lambda k: (k.split("@")[0], int(k.split("@")[1]))):
        r = rows[key]
        v, s = key.split("@")
        print(f"| {v} | {s} | {r['psnr_rec_clean']:.1f} | {r['psnr_rec_protected']:.1f} | {r['psnr_drop']:.2f} | "
              f"{100 * r['latent_rel_change']:.0f}% | {r['latent_amplification']:.2f} | {r['posterior_noise']:.3f} |")


if __name__ == "__main__":
    main()
