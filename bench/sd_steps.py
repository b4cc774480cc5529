"""ms per jitted Textual Inversion step and DreamBooth step (loss + grad + update), f32 and bf16,
with XLA's memory estimate, on the tiny bundle, on an SD-shaped small UNet at 256 px and on the
mini-world's model (the evaluation's attacks), each with the step's images given as pixels
(encoded at every step) and as their VAE posteriors (``common.Moments``, encoded once, as the
attacks run):

    python bench/sd_steps.py                 # every model, both dtypes, both sources
    python bench/sd_steps.py --models=miniworld --dtypes=float32 --batch=4 --steps=10

"SD-shaped small": Stable Diffusion's UNet layout (4 levels, 3 cross-attention levels, 2 layers
per block, 8 heads, 768-d text context) at 0.3x its widths, with the tiny VAE at 256 px
(32x32 latents) and the tiny text encoder widened to 768.

``--convs=xla,taps`` measures each step with the SD modules' convs computed by XLA's convolution
and as taps (``ldu_jax.sd.conv``; 'auto' is taps on CPU); ``--subjects=N`` also measures the
evaluation's program of N subjects (``Attacker.train_many``): the step vmapped over them and
looped over them (``parallel.map_subjects`` on CPU), against N steps of one subject:

    python bench/sd_steps.py --models=miniworld --dtypes=float32 --sources=moments --batch=4 \
        --convs=xla,taps --subjects=4
"""
import argparse
import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import attack_db_tiny, attack_ti_tiny  # noqa: E402
from ldu_jax.miniworld import MODELS  # noqa: E402
from ldu_jax import parallel  # noqa: E402
from ldu_jax.personalize import common, dreambooth, textual_inversion as ti  # noqa: E402
from ldu_jax.sd import conv  # noqa: E402
from ldu_jax.sd import models as sdm  # noqa: E402
from ldu_jax.sd import schedule as sch  # noqa: E402

SD_SHAPED_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8,
    block_out_channels=(96, 192, 384, 384), cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sd_shaped(dtype):
    """The tiny bundle with an SD-shaped UNet (random) and a 768-d text encoder, at 256 px."""
    from ldu_jax.sd.clip import CLIPTextModel
    from ldu_jax.sd.unet import UNet, UNetConfig
    sd, params = sdm.tiny_sd(dtype=dtype)
    unet = UNet(UNetConfig.from_dict(SD_SHAPED_UNET), dtype)
    te = CLIPTextModel(dataclasses.replace(sd.text_encoder.config, hidden_size=768, intermediate_size=3072,
                                           num_attention_heads=12), dtype)
    params = {"vae": params["vae"], "unet": unet.init_params(jax.random.PRNGKey(0)),
              "text_encoder": te.init_params(jax.random.PRNGKey(1))}
    sd = dataclasses.replace(sd, unet=unet, text_encoder=te, resolution=256)
    return sd, params


def measure(fn, args, steps):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) if mem else float("nan")
    state, info = compiled(*args)
    jax.block_until_ready(info)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, info = compiled(state, *args[1:])
        jax.block_until_ready(info)
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times)), peak


def row(name, dtype, step, source, impl, program, compile_s, step_s, peak, one_s=None):
    vs = f"{one_s * 1e3 * int(program.split()[-1]) / (step_s * 1e3):9.2f}x" if one_s else f"{'':10}"
    print(f"{name:10} {dtype:9} {step:4} {source:8} {impl:5} {program:12} {compile_s:9.1f} {step_s * 1e3:9.0f} "
          f"{vs} {peak / 2 ** 20:12.0f}", flush=True)


def measure_all(name, dtype, kind, source, impl, step, state, args, steps, subjects):
    """One subject's step; with ``subjects`` > 1 also the subjects' program vmapped and mapped
    (the state and the images per subject, the rest shared), against ``subjects`` single steps."""
    c, one, m = measure(step, (state, *args), steps)
    row(name, dtype, kind, source, impl, "1 subject", c, one, m)
    if subjects < 2:
        return
    stack = lambda t: jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (subjects,) + jnp.shape(x)), t)  # noqa: E731
    axes = (0, None, 0) + (None,) * (len(args) - 2)
    batched = (stack(state), args[0], stack(args[1]), *args[2:])
    for program, fn in ((f"vmap {subjects}", jax.vmap(step, in_axes=axes)),
                        (f"map {subjects}", parallel.map_subjects(step, axes))):
        c, s, m = measure(fn, batched, steps)
        row(name, dtype, kind, source, impl, program, c, s, m, one)


def bench_model(name, impl, args):
    for dtype in args.dtypes.split(","):
        # bf16: bf16 compute in the modules, f32 parameters (master weights)
        dt = getattr(jnp, dtype)
        if name == "sd-shaped":
            sd, params = sd_shaped(dt)
        else:
            sd, params = sdm.tiny_sd(dtype=dt) if name == "tiny" else sdm.load_sd(os.path.join(MODELS, "sd"), dtype=dt)
        r = sd.resolution
        images = jax.random.uniform(jax.random.PRNGKey(0), (4, r, r, 3), minval=-1, maxval=1)
        given = {"images": images, "moments": common.moments_fn(sd)(params["vae"], images)}
        sched = sch.make_schedule(sd.scheduler)
        sd_t, p_t, tok = sdm.add_placeholder_token(sd, params, "<bench>", "person")
        for source in args.sources.split(","):
            x = given[source]
            # Textual Inversion
            cfg = attack_ti_tiny.get_config()
            tx, _ = ti.make_optimizer(cfg, args.batch)
            ids = jnp.asarray(ti.template_ids(sd_t, "<bench>", "person"))
            step = ti.make_step(sd_t, sched, tx, tok, args.batch, 0)
            measure_all(name, dtype, "TI", source, impl, step, ti.init_state(p_t, tok, tx), (p_t, x, ids),
                        args.steps, args.subjects)
            # DreamBooth (UNet fine-tuning with prior preservation)
            cfg = attack_db_tiny.get_config()
            tx = dreambooth.make_optimizer(cfg)
            ids = jnp.asarray(sdm.tokenize(sd, [cfg.instance_prompt, cfg.class_prompt]))
            step = dreambooth.make_step(sd, sched, tx, cfg, args.batch, 0)
            state = dreambooth.init_state(params, cfg, tx, jax.random.PRNGKey(0))
            measure_all(name, dtype, "DB", source, impl, step, state,
                        (dreambooth.frozen_params(params, cfg), x, x, ids[0], ids[1]), args.steps, args.subjects)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,sd-shaped,miniworld")
    ap.add_argument("--sources", default="images,moments")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--convs", default="auto", help="comma list of xla, taps, auto")
    ap.add_argument("--subjects", type=int, default=1)
    args = ap.parse_args()
    print(f"{'model':10} {'dtype':9} {'step':4} {'source':8} {'conv':5} {'program':12} {'compile_s':>9} "
          f"{'ms/step':>9} {'vs 1 by 1':>10} {'xla_peak_MiB':>12}")
    for name in args.models.split(","):
        for impl in args.convs.split(","):
            with conv.using(impl):
                bench_model(name, impl, args)


if __name__ == "__main__":
    main()
