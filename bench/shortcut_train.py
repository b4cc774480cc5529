"""Shortcut-model train step speed: ms/step, images/s, XLA-estimated FLOPs and achieved GFLOP/s.

    python bench/shortcut_train.py                         # DiT-S/2 on 32x32x4 latents, batch 32, f32
    python bench/shortcut_train.py --batch=64 --set model.attention=xla --set model.remat=True
    python bench/shortcut_train.py --config=configs/shortcut_celebahq256.py --batch=8

Times the full jitted update (bootstrap targets with the EMA model + forward/backward + AdamW + EMA)
on data already on device. Uses every device of the default backend.
"""
import argparse
import ast
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ldu_jax import parallel  # noqa: E402
from ldu_jax.models.dit import dit_from_config  # noqa: E402
from ldu_jax.shortcut import trainer  # noqa: E402

# The reference point of the issue: DiT-S/2 (hidden 384, depth 12, 6 heads) on 32x32x4 latents.
DIT_S = dict(hidden_size=384, depth=12, num_heads=6, patch_size=2, mlp_ratio=4.0, bootstrap_every=8)


def load_config(path):
    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a configs/*.py file (default: DiT-S/2 on tiny's settings)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input_size", type=int, default=32, help="spatial size of the DiT input")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--set", action="append", default=[], help="config override key=value, e.g. model.remat=True")
    args = ap.parse_args()

    config = load_config(args.config or "configs/shortcut_tiny.py")
    if args.config is None:
        config.model.update(DIT_S)
    for item in args.set:
        key, value = item.split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        node[leaf] = value

    mesh = parallel.make_mesh()
    model = dit_from_config(config.model, args.channels)
    tx, schedule = trainer.make_optimizer(config.optim, 1000)
    shape = (args.input_size, args.input_size, args.channels)
    init = lambda k: trainer.init_state(model, tx, k, (1,) + shape)  # noqa: E731
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shard = parallel.state_shardings(abstract, mesh, config.sharding, config.fsdp_min_bytes)
    state = jax.jit(init, out_shardings=shard)(jax.random.PRNGKey(0))
    dsh, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
    step = jax.jit(trainer.make_train_step(model, tx, schedule, config.model, config.optim.ema, 0),
                   in_shardings=(shard, dsh, dsh), out_shardings=(shard, rep), donate_argnums=(0,))
    x = parallel.global_batch(mesh, np.random.default_rng(0).standard_normal((args.batch,) + shape, np.float32))
    y = parallel.global_batch(mesh, np.zeros(args.batch, np.int32))

    t0 = time.perf_counter()
    compiled = step.lower(state, x, y).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))
    state, info = compiled(state, x, y)
    jax.block_until_ready(info)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, info = compiled(state, x, y)
        jax.block_until_ready(info)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    m = config.model
    print(f"model hidden={m.hidden_size} depth={m.depth} heads={m.num_heads} patch={m.patch_size} "
          f"dtype={m.dtype} remat={m.remat} attention={m.attention}; input {shape}, batch {args.batch}, "
          f"{jax.device_count()} x {jax.devices()[0].platform}")
    print(f"compile_s      {compile_s:.1f}")
    print(f"ms_per_step    {sec * 1e3:.0f}  (median of {args.steps}; min {min(times) * 1e3:.0f})")
    print(f"images_per_s   {args.batch / sec:.2f}")
    print(f"xla_gflop_step {flops / 1e9:.1f}")
    print(f"gflop_per_s    {flops / 1e9 / sec:.1f}")
    print(f"loss           {float(info['loss']):.4f}")


if __name__ == "__main__":
    main()
