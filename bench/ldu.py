"""LDU speed and memory: ms per ρ train step, images/s of apply (ldu, ldu-opt), XLA's memory
estimate with and without remat.

    python bench/ldu.py                      # tiny config
    python bench/ldu.py --model=sd-shaped    # SD-shaped small UNet and text encoder, 256 px

Uses a random shortcut DiT (identity flow) of the tiny config; the cost of the DiT itself is
measured by bench/shortcut_train.py.
"""
import argparse
import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import ldu_tiny  # noqa: E402
from ldu_jax.models.perturber import Perturber  # noqa: E402
from ldu_jax.protect import ldu  # noqa: E402
from ldu_jax import sources  # noqa: E402
from ldu_jax.jobs import protect as prun  # noqa: E402
from ldu_jax.sd import models as sdm  # noqa: E402


def build(model: str, config):
    models, params, ti_ids, db_ids, shape, res = prun.load_models(config, log=lambda s: None)
    if model == "sd-shaped":
        from sd_steps import sd_shaped
        sd, p = sd_shaped(jnp.float32)
        sd, p, ti_ids, db_ids = ldu.placeholder_setup(sd, p, config)
        res = 256
        shape = sdm.latent_shape(sd, res)
        dit, dit_params, null = sources.shortcut("random", shape)
        models = dataclasses.replace(models, sd=sd, dit=dit.clone(remat=config.remat),
                                     rho=Perturber(widths=(64, 128, 256, 512)))
        params = {**p, "dit": dit_params}
    return models, params, ti_ids, db_ids, shape, res


def timed(compiled, args, steps, carry=False):
    out = compiled(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = compiled(*((out[0],) + tuple(args[1:])) if carry else args)
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def mem_mib(compiled):
    m = compiled.memory_analysis()
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2 ** 20 if m else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "sd-shaped"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--opt_steps", type=int, default=10)
    args = ap.parse_args()
    print(f"{'what':28} {'remat':5} {'compile_s':>9} {'ms':>9} {'img/s':>8} {'xla_MiB':>8}")
    for remat in (False, True):
        config = ldu_tiny.get_config()
        config.update(remat=remat, opt_steps=args.opt_steps)
        models, params, ti_ids, db_ids, shape, res = build(args.model, config)
        x = jax.random.uniform(jax.random.PRNGKey(0), (args.batch, res, res, 3), minval=-1, maxval=1)
        tx = ldu.make_rho_optimizer(config)
        state = ldu.init_rho_state(models, tx, jax.random.PRNGKey(0), shape, config)
        params = {**params, "rho": state.rho}
        cases = [
            ("rho train step", ldu.make_rho_step(models, tx, config, 0), (state, params, x, ti_ids, db_ids), True),
            ("apply ldu", lambda p, x: ldu.protect_images(models, p, x, config)[0], (params, x), False),
            (f"apply ldu-opt ({args.opt_steps} steps)",
             lambda p, x: ldu.optimize_shift(models, p, x, ti_ids, db_ids, jax.random.PRNGKey(0), config)[0],
             (params, x), False),
        ]
        for name, fn, fargs, carry in cases:
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(*fargs).compile()
            c = time.perf_counter() - t0
            s = timed(compiled, fargs, args.steps, carry)
            print(f"{name:28} {str(remat):5} {c:9.1f} {s * 1e3:9.0f} {args.batch / s:8.2f} {mem_mib(compiled):8.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
