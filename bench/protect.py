"""Seconds per image of every protection, side by side: the pixel-space baselines (AdvDM, ASPL,
FSMG, PhotoGuard, Mist, SDS+, SDS-, PID) and LDU (``ldu``: one pass of a freshly initialised ρ;
``ldu-opt``: per-image optimisation of the shift), on the tiny bundle and on an SD-shaped small
model at 256 px, in one run.

    python bench/protect.py                                   # both models, reduced step counts
    python bench/protect.py --models=tiny --steps=100         # tiny only, 100 PGD steps
    python bench/protect.py --models=sd-shaped --methods=advdm,pid,ldu --steps=5

Step counts are flags (the published ones, e.g. 100 PGD steps or ASPL's 50 x (3+6+3), are slow on a
CPU); the cost of a PGD method grows linearly with its steps, so seconds per image at the
published settings ~ the figure here x published steps / steps used. "SD-shaped small" is
bench/sd_steps.py's model (SD's UNet layout at 0.3x widths, tiny VAE, 768-d text encoder).
Compilation time is reported separately and excluded from s/img. ``--convs=xla,taps`` compares the
SD modules' convolutions (``ldu_jax.sd.conv``; 'auto': taps on CPU).
"""
import argparse
import functools
import importlib
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import jax
import jax.numpy as jnp
import numpy as np

from ldu_jax import parallel
from ldu_jax.protect import baselines as bl
from ldu_jax.sd import conv


def baseline_config(method, args, model):
    c = importlib.import_module(f"configs.protect_{bl.config_name(method)}_tiny").get_config()
    c.steps = args.steps
    c.rounds = args.rounds
    c.surrogate_steps = args.surrogate_steps
    c.n_draws = args.n_draws
    if model == "sd-shaped":
        c.surrogate.train_text_encoder = False
    return c


def load_model(model):
    from ldu_jax import sources
    if model == "tiny":
        sd, params = sources.sd("tiny")
        return sd, params, sd.resolution
    from sd_steps import sd_shaped
    sd, params = sd_shaped(jnp.float32)
    return sd, params, 256


def describe(method, c):
    if method == "aspl":
        return f"{c.rounds}x({c.surrogate_steps}+{c.steps}+{c.surrogate_steps})"
    if method == "fsmg":
        return f"{c.surrogate_steps}+{c.steps}"
    return str(c.steps)


def _protect(method, sd, c, p, x, k):
    return bl.protect(method, sd, p, x, k, c)[0]


def timed(fn, args, repeats):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        ts.append(time.perf_counter() - t0)
    return compile_s, float(np.median(ts))


def ldu_cases(model, args):
    """(name, steps description, fn, fn args) for ldu and ldu-opt."""
    from bench_ldu import build  # bench/ldu.py

    from configs import ldu_tiny
    from ldu_jax.protect import ldu
    config = ldu_tiny.get_config()
    config.update(opt_steps=args.opt_steps)
    models, params, ti_ids, db_ids, shape, res = build(model, config)
    tx = ldu.make_rho_optimizer(config)
    state = ldu.init_rho_state(models, tx, jax.random.PRNGKey(0), shape, config)
    params = {**params, "rho": state.rho}
    x = jax.random.uniform(jax.random.PRNGKey(0), (args.batch, res, res, 3), minval=-1, maxval=1)
    return [
        ("ldu", f"k={config.steps}", lambda p, x: ldu.protect_images(models, p, x, config)[0], (params, x)),
        ("ldu-opt", f"{args.opt_steps}",
         lambda p, x: ldu.optimize_shift(models, p, x, ti_ids, db_ids, jax.random.PRNGKey(0), config)[0],
         (params, x)),
    ]


def bench_model(model, impl, methods, args):
    base = [m for m in methods if m in bl.METHODS]
    if base:
        sd, p, res = load_model(model)
        mesh = parallel.batch_mesh(args.batch)
        dsh, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
        x = jax.device_put(jax.random.uniform(jax.random.PRNGKey(0), (args.batch, res, res, 3),
                                              minval=-1, maxval=1), dsh)
        for method in base:
            c = baseline_config(method, args, model)
            params = jax.device_put(bl.prepare(method, sd, p, c, res, log=lambda s: None), rep)
            fn = functools.partial(_protect, method, sd, c)
            comp, s = timed(fn, (params, x, jax.random.PRNGKey(0)), args.repeats)
            print(f"{model:10} {impl:5} {method:11} {describe(method, c):>14} {comp:9.1f} {s / args.batch:9.3f}",
                  flush=True)
    if any(m in ("ldu", "ldu-opt") for m in methods):
        for name, steps, fn, fargs in ldu_cases(model, args):
            if name in methods:
                comp, s = timed(fn, fargs, args.repeats)
                print(f"{model:10} {impl:5} {name:11} {steps:>14} {comp:9.1f} {s / args.batch:9.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,sd-shaped")
    ap.add_argument("--methods", default=",".join(bl.METHODS + ("ldu", "ldu-opt")))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="PGD steps (aspl: per round)")
    ap.add_argument("--rounds", type=int, default=2, help="aspl rounds")
    ap.add_argument("--surrogate_steps", type=int, default=3, help="aspl: per phase; fsmg: before PGD")
    ap.add_argument("--n_draws", type=int, default=1)
    ap.add_argument("--opt_steps", type=int, default=10, help="ldu-opt Adam steps")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--convs", default="auto", help="the SD modules' convs: comma list of xla, taps, auto")
    args = ap.parse_args()
    methods = args.methods.split(",")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; batch {args.batch}", flush=True)
    print(f"{'model':10} {'conv':5} {'method':11} {'steps':>14} {'compile_s':>9} {'s/img':>9}", flush=True)
    for model in args.models.split(","):
        for impl in args.convs.split(","):
            with conv.using(impl):
                bench_model(model, impl, methods, args)


def _import_bench_ldu():
    """bench/ldu.py as module ``bench_ldu`` (its name clashes with the package ``ldu_jax.protect.ldu``)."""
    spec = importlib.util.spec_from_file_location("bench_ldu", os.path.join(ROOT, "bench", "ldu.py"))
    sys.modules["bench_ldu"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["bench_ldu"])


if __name__ == "__main__":
    _import_bench_ldu()
    main()
