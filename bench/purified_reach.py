"""How much of each protection's move of the VAE latent survives each purification?

A protection that attacks the encoder works by moving E(x') away from E(x). A purification P
should undo that move. This bench reads an evaluation work dir's cached photos (the clean set_B,
each method's protected set_B, and both after each purification) and measures, under ``--vae``
(default the fragile world's encoder), for every method x setting:

- before: |E(x') - E(x)| / |E(x)|, the protection's latent move;
- after:  |E(P(x')) - E(P(x))| / |E(P(x))|, what is left of it against the clean photos given
  the same purification (the evaluation's purifications are seeded, so clean and protected photos
  get the same noise);
- kept: after / before; and the pixel change before and after (PSNR of x' to x, of P(x') to P(x)).

The clean row gives the purification's own move of the latent, |E(P(x)) - E(x)| / |E(x)|.

    python bench/purified_reach.py --eval=runs/eval_fragile_db1000
"""
import argparse
import os
import sys

import numpy as np

from latent_reach import read, to_m11

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ldu_jax.sd import vae as vae_lib  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval", required=True, help="an evaluation work dir (its cells/ and subjects/)")
    ap.add_argument("--vae", default="runs/mw_fragile/export/sd/vae")
    args = ap.parse_args()

    vae = vae_lib.load_vae(args.vae)
    cells = os.path.join(args.eval, "cells")
    subjects = sorted(os.listdir(cells))

    def encode(images):
        return np.asarray(vae_lib.encode(vae, vae.params, images))

    def folder_images(folders):
        return to_m11(np.concatenate([read(f) for f in folders]))

    def per_subject(*parts):
        return [os.path.join(cells, s, *parts) for s in subjects]

    def done(folders):
        return all(os.path.isdir(f) and os.listdir(f) for f in folders)

    def move(a, b):   # mean over photos of |E(a) - E(b)| / |E(b)|, from latents
        return 100 * np.mean(np.linalg.norm((a - b).reshape(len(a), -1), axis=1)
                             / np.linalg.norm(b.reshape(len(b), -1), axis=1))

    def psnr(a, b):
        return np.mean(10 * np.log10(4 / np.mean(np.square(np.asarray(a - b)), axis=(1, 2, 3))))

    x = folder_images([os.path.join(args.eval, "subjects", s, "set_B") for s in subjects])
    z = encode(x)
    settings = sorted({d for s in subjects for d in os.listdir(os.path.join(cells, s, "none"))
                       if d != "none" and done(per_subject("none", d, "images"))})
    clean = {st: folder_images(per_subject("none", st, "images")) for st in settings}
    clean_z = {st: encode(im) for st, im in clean.items()}
    print(f"{len(x)} photos of {', '.join(subjects)}; latent moved = |E(a) - E(b)| / |E(b)| under {args.vae}\n")
    print("| method | setting | PSNR(x', x) | latent moved before | PSNR(P(x'), P(x)) | latent moved after | kept |")
    print("|---|---|---|---|---|---|---|")
    for st in settings:
        print(f"| clean | {st} | – | – | {psnr(clean[st], x):.2f} (to x) | {move(clean_z[st], z):.1f}% (to E(x)) | – |")
    methods = sorted(m for m in os.listdir(os.path.join(cells, subjects[0]))
                     if m != "none" and done(per_subject(m, "protected")))
    for m in methods:
        xp = folder_images(per_subject(m, "protected"))
        before = move(encode(xp), z)
        for st in settings:
            if not done(per_subject(m, st, "images")):
                continue
            pp = folder_images(per_subject(m, st, "images"))
            after = move(encode(pp), clean_z[st])
            print(f"| {m} | {st} | {psnr(xp, x):.2f} | {before:.1f}% | {psnr(pp, clean[st]):.2f} | "
                  f"{after:.1f}% | {after / before:.2f} |", flush=True)


if __name__ == "__main__":
    main()
