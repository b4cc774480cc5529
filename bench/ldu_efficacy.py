"""LDU's objective at a matched budget: how much each protection raises the personalization
surrogates' loss over the clean photo, on the shipped mini-world models and held-out portraits.

    python bench/ldu_efficacy.py                         # 8 held-out portraits, every method
    python bench/ldu_efficacy.py --methods=ldu-opt,advdm --images=4 --opt_steps=4
    python bench/ldu_efficacy.py --set=train             # portraits of training identities instead

Every method's output goes through the same path as a written file (``protect.io.apply_perturbation``
with the MSE budget eps = (8/255)^2 on [-1, 1], i.e. PSNR >= 36.1 dB: the uint8 image, scaled back
toward the original until it holds), so all methods are compared at the same PSNR budget:

- advdm, photoguard: L-inf PGD (``--linf``/255, 50 steps of 0.5/255) then scaled onto the budget;
  the L-inf radius is set a little above the one that gives 36 dB so the budget binds.
- ldu-opt: ``optimize_shift`` with the config's settings (configs/ldu_miniworld.py).
- ldu: one pass of the trained ρ (``--rho``, default the shipped one).

Measured on the written images: PSNR, SSIM, and the relative gain L(x') / L(x) - 1 of the Textual
Inversion and DreamBooth surrogate losses, each on ``--draws`` (latent sample, t, noise) draws that
are the same for every method (mean ± std over images); seconds per image (compilation excluded).
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

from configs import ldu_miniworld, protect_advdm_tiny, protect_photoguard_tiny  # noqa: E402
from ldu_jax import data as data_lib  # noqa: E402
from ldu_jax.metrics import image as im  # noqa: E402
from ldu_jax.miniworld import MODELS, world  # noqa: E402
from ldu_jax.protect import baselines as bl  # noqa: E402
from ldu_jax.protect import io as pio  # noqa: E402
from ldu_jax.protect import ldu  # noqa: E402
from ldu_jax.jobs import protect as prun  # noqa: E402


def portraits(n: int, which: str, seed: int):
    idents = world.heldout_identities(n, seed) if which == "heldout" else world.train_identities(n, seed)
    u8 = np.stack([data_lib.to_uint8(world.render(ident, 1)) for ident in idents])
    return u8, u8.astype(np.float32) / 127.5 - 1


def timed_jit(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return np.asarray(out), time.perf_counter() - t0


def baseline(method, sd_path, linf, steps):
    c = (protect_advdm_tiny if method == "advdm" else protect_photoguard_tiny).get_config()
    c.sd, c.eps, c.step_size, c.steps = sd_path, linf / 255, 0.5 / 255, steps
    c.random_start, c.step_decay = False, "none"
    sd, params, _ = prun.load_baseline(method, c, log=lambda s: None)
    return lambda x: timed_jit(lambda p, x: bl.protect(method, sd, p, x, jax.random.PRNGKey(0), c)[0], params, x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="advdm,photoguard,ldu-opt,ldu")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--set", default="heldout", choices=["heldout", "train"])
    ap.add_argument("--seed", type=int, default=0, help="which identities of the set")
    ap.add_argument("--draws", type=int, default=64)
    ap.add_argument("--linf", type=float, default=5.0, help="baselines' L-inf radius in /255 before scaling")
    ap.add_argument("--pgd_steps", type=int, default=50)
    ap.add_argument("--opt_steps", type=int, default=0, help="ldu-opt steps (0: the config's)")
    ap.add_argument("--rho", default=os.path.join(MODELS, "rho"))
    ap.add_argument("--set_config", action="append", default=[], help="ldu config override key=value")
    args = ap.parse_args()

    c = ldu_miniworld.get_config()
    for kv in args.set_config:
        k, v = kv.split("=", 1)
        c[k] = type(c[k])(v) if not isinstance(c[k], bool) else v.lower() in ("1", "true")
    if args.opt_steps:
        c.opt_steps = args.opt_steps
    models, params, ti_ids, db_ids, _, _ = prun.load_models(c, log=lambda s: None)
    u8, x = portraits(args.images, args.set, args.seed)
    xj = jnp.asarray(x)
    budget = pio.Budget("mse", float(c.eps))
    key = jax.random.PRNGKey(2026)

    def surrogate_losses(imgs):
        out = {}
        for name, (tw, dw) in (("TI", (1.0, 0.0)), ("DB", (0.0, 1.0))):
            cs = c.copy_and_resolve_references()
            cs.ti_weight, cs.db_weight = tw, dw
            out[name] = np.asarray(jax.jit(lambda p, y: ldu.pers_loss(models, p, y, ti_ids, db_ids, key, cs,
                                                                       args.draws))(params, jnp.asarray(imgs)))
        return out

    clean = surrogate_losses(x)
    protectors = {
        "advdm": lambda: baseline("advdm", c.sd, args.linf, args.pgd_steps),
        "photoguard": lambda: baseline("photoguard", c.sd, args.linf, args.pgd_steps),
        "ldu-opt": lambda: (lambda x: timed_jit(
            lambda p, x: ldu.optimize_shift(models, p, x, ti_ids, db_ids, jax.random.PRNGKey(c.seed), c)[0],
            params, x)),
        "ldu": lambda: (lambda x: timed_jit(lambda p, x: ldu.constrained_images(models, p, x, c),
                                            {**params, "rho": prun.rho_checkpoint(args.rho)[0]}, x)),
    }
    print(f"{args.images} {args.set} portraits (seed {args.seed}), budget PSNR >= {10 * np.log10(4 / c.eps):.2f} dB "
          f"on the written uint8 image, {args.draws} shared draws per surrogate")
    print(f"clean L_TI {clean['TI'].mean():.4f}, L_DB {clean['DB'].mean():.4f}")
    head = (f"{'method':12} {'PSNR dB':>14} {'in [36,37]':>10} {'SSIM':>6} {'TI gain %':>14} {'DB gain %':>14} "
            f"{'s/img':>8}")
    print(head + "\n" + "-" * len(head), flush=True)
    for m in args.methods.split(","):
        prot, secs = protectors[m]()(xj)
        out = np.stack([pio.apply_perturbation(u8[i], x[i], prot[i], budget)[0] for i in range(len(u8))])
        xo = out.astype(np.float32) / 127.5 - 1
        mse = np.mean(np.square(xo - x), axis=(1, 2, 3))
        psnr = 10 * np.log10(4 / np.maximum(mse, 1e-12))
        ssim = np.asarray(im.ssim(jnp.asarray(out / 255.0), jnp.asarray(u8 / 255.0)))
        loss = surrogate_losses(xo)
        gain = {k: 100 * (loss[k] / clean[k] - 1) for k in loss}
        inband = np.mean((psnr >= 36.0) & (psnr <= 37.0))
        print(f"{m:12} {psnr.mean():7.2f} ± {psnr.std():4.2f} {inband:10.2f} {ssim.mean():6.3f} "
              f"{gain['TI'].mean():7.1f} ± {gain['TI'].std():4.1f} {gain['DB'].mean():7.1f} ± {gain['DB'].std():4.1f} "
              f"{secs / len(u8):8.3f}", flush=True)


if __name__ == "__main__":
    main()
