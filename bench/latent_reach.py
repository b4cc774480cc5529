"""How far can a protection move the VAE latent at a fixed PSNR, depending on where its change lives?

LDU's protected photo is x + D(z0'(shift)) - D(z0'(0)): its change lies in the decoder's range.
The pixel-space baselines change any pixel. This bench asks, for the held-out portraits at one PSNR
budget (default 36 dB, the evaluation's), how far each kind of change moves E(x), the latent that
the attacks train on, relative to |E(x)|:

- random pixel noise (gaussian, and L-inf signs at the budget's radius);
- a random latent direction decoded: D(z + dz) - D(z);
- the decoder-range change optimised to move the latent (Adam on dz, the residual scaled onto
  the budget at every step): an upper bound for any method whose change goes through the decoder,
  LDU and ldu-opt included;
- the pixel change optimised for the same objective in the L2 ball of the same budget.

Each is measured under ``--vae`` (default the fragile world's encoder, built by
``python -m ldu_jax.cli.build_world --workdir=runs/mw_fragile --profile=fragile --stages=vae,export``)
and ``--base_vae`` (the shipped one). With ``--eval=<evaluation work dir>`` the methods' protected
set_B photos there are measured the same way.

    python bench/latent_reach.py
    python bench/latent_reach.py --eval=runs/eval_fragile --subjects=4
"""
import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ldu_jax import data as data_lib  # noqa: E402
from ldu_jax.miniworld import MODELS, world  # noqa: E402
from ldu_jax.sd import vae as vae_lib  # noqa: E402


def read(folder):
    return np.stack(data_lib.read_rgb_folder(folder, log=lambda *_: None)[1])


def to_m11(images):
    return jnp.asarray(images, jnp.float32) / 127.5 - 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae", default="runs/mw_fragile/export/sd/vae")
    ap.add_argument("--base_vae", default=os.path.join(MODELS, "sd", "vae"))
    ap.add_argument("--subjects", type=int, default=4, help="held-out identities (their set_B photos)")
    ap.add_argument("--psnr", type=float, default=36.0)
    ap.add_argument("--steps", type=int, default=300, help="Adam steps of both optimised changes")
    ap.add_argument("--eval", default="", help="an evaluation work dir: also measure its protected photos")
    args = ap.parse_args()

    vaes = {"fragile": vae_lib.load_vae(args.vae), "base": vae_lib.load_vae(args.base_vae)}
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "subjects")
        subjects = world.write_heldout_subjects(root, args.subjects)
        x = to_m11(np.concatenate([read(os.path.join(root, s, "set_B")) for s in subjects]))
    mse = 4 * 10 ** (-args.psnr / 10)   # the budget as mean squared error on [-1, 1]

    def encode(v, images):
        return vae_lib.encode(v, v.params, images)

    z = {k: encode(v, x) for k, v in vaes.items()}

    def rel_moves(v, z0, images):   # per image |E(x') - E(x)|^2 / |E(x)|^2
        d = encode(v, images) - z0
        return jnp.sum(jnp.square(d), axis=(1, 2, 3)) / jnp.sum(jnp.square(z0), axis=(1, 2, 3))

    def onto_budget(r):
        m = jnp.mean(jnp.square(r), axis=(1, 2, 3), keepdims=True)
        return r * jnp.sqrt(mse / jnp.maximum(m, 1e-12))

    def row(name, images):
        psnr = 10 * np.log10(4 / np.mean(np.square(np.asarray(images - x)), axis=(1, 2, 3)))
        moved = {k: 100 * np.sqrt(np.asarray(rel_moves(v, z[k], images))) for k, v in vaes.items()}
        print(f"| {name} | {psnr.mean():.2f} | {moved['fragile'].mean():.1f}% | {moved['base'].mean():.1f}% |",
              flush=True)

    fragile = vaes["fragile"]
    z_f = z["fragile"]
    d0 = vae_lib.decode(fragile, fragile.params, z_f)

    def through_decoder(dz):
        return onto_budget(vae_lib.decode(fragile, fragile.params, z_f + dz) - d0)

    def objective(r):   # minus the mean relative squared move of the fragile latent
        return -jnp.mean(rel_moves(fragile, z_f, jnp.clip(x + r, -1, 1)))

    def ascend(param, make, lr):
        opt = optax.adam(lr)
        state = opt.init(param)
        grad = jax.jit(jax.grad(lambda p: objective(make(p))))
        for _ in range(args.steps):
            update, state = opt.update(grad(param), state)
            param = param + update
        return jnp.clip(x + make(param), -1, 1)

    key = jax.random.PRNGKey(0)
    noise = jax.random.normal(key, x.shape)
    sz = float(jnp.std(z_f))
    print(f"{len(x)} held-out portraits, budget PSNR {args.psnr:g} dB; latent moved = |E(x') - E(x)| / |E(x)|\n")
    print("| change | PSNR dB | latent moved (fragile encoder) | latent moved (base encoder) |")
    print("|---|---|---|---|")
    row("random pixel gaussian", jnp.clip(x + onto_budget(noise), -1, 1))
    row("random pixel signs (L-inf)", jnp.clip(x + np.sqrt(mse) * jnp.sign(noise), -1, 1))
    dz = jax.random.normal(key, z_f.shape)
    row("random latent direction, decoded", jnp.clip(x + through_decoder(0.3 * sz * dz), -1, 1))
    row("decoder range, optimised (bound for LDU)", ascend(0.1 * sz * dz, through_decoder, 0.05 * sz))
    row("pixels, optimised (L2 ball)", ascend(onto_budget(noise), onto_budget, 0.003))
    if args.eval:
        cells = os.path.join(args.eval, "cells")
        methods = sorted({m for s in subjects for m in os.listdir(os.path.join(cells, s))
                          if os.path.isdir(os.path.join(cells, s, m, "protected"))})
        for m in methods:
            folders = [os.path.join(cells, s, m, "protected") for s in subjects]
            if all(os.path.isdir(f) for f in folders):
                row(f"{m} ({args.eval})", to_m11(np.concatenate([read(f) for f in folders])))


if __name__ == "__main__":
    main()
