"""Checkpoints: orbax managers with automatic resume, and import of official shortcut-models pickles.

A work dir holds ``checkpoints/<step>/{state, meta}``: ``state`` the train state (orbax), ``meta``
JSON with the model config and every parameter's shape, so a work dir made for another model is
reported as such instead of failing deep inside orbax.

Convert an official shortcut-models checkpoint (a pickle; only with an explicit flag, since
unpickling runs code from the file):

    python -m ldu_jax.checkpoint --pickle=ckpt.pkl --config=configs/shortcut_celebahq256.py \
        --workdir=runs/celeba_official --allow_pickle
"""
from __future__ import annotations

import os
import pickle

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    pass


def param_shapes(params) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in flat}


def make_meta(config, params, data_shape) -> dict:
    """What a checkpoint records about its run: model config, parameter shapes, input shape, VAE."""
    return {"model": config.model.to_dict(), "param_shapes": param_shapes(params),
            "data_shape": list(data_shape), "vae": config.vae}


def make_manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=opts)


def save(manager, step: int, state, meta: dict):
    manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)


def read_meta(manager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def check_compatible(saved: dict, current: dict, where: str):
    """Raise CheckpointMismatchError naming the first parameter whose shape differs."""
    a, b = saved.get("param_shapes", {}), current["param_shapes"]
    diffs = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        k = diffs[0]
        raise CheckpointMismatchError(
            f"{where} holds a checkpoint of a different model: parameter {k} has shape {a.get(k)} there "
            f"but {b.get(k)} with this config ({len(diffs)} parameters differ; saved model config: "
            f"{saved.get('model')}). Use another --workdir or the config that made it.")


def restore_latest(manager, abstract_state, meta: dict, where: str):
    """Restore the newest checkpoint into ``abstract_state``'s shapes and shardings, or None."""
    step = manager.latest_step()
    if step is None:
        return None
    check_compatible(read_meta(manager, step), meta, where)
    try:
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError) as e:
        raise CheckpointMismatchError(f"checkpoint {step} in {where} does not fit this config "
                                      f"(optimizer or state layout changed?): {e}") from e
    return out["state"]


def restore_state(workdir: str, step: int | None = None):
    """(state dict, meta) of a work dir's latest (or given) checkpoint, as saved."""
    manager = make_manager(workdir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return state, read_meta(manager, step)


def restore_params(workdir: str, ema: bool = True, step: int | None = None):
    """(params, meta) of a shortcut-model work dir: the EMA (or live) weights."""
    state, meta = restore_state(workdir, step)
    return state["params_ema" if ema else "params"], meta


def export(workdir: str, out_dir: str, keys, step: int | None = None) -> int:
    """Write the entries ``keys`` of a work dir's latest (or given) checkpoint state, with its meta,
    as a one-checkpoint work dir ``out_dir`` that the same loaders read (e.g. ``('params_ema',)``
    for ``restore_params``: a model to ship without its optimizer state). Returns the step."""
    state, meta = restore_state(workdir, step)
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"checkpoint in {workdir} has no {', '.join(missing)} (it has {', '.join(state)})")
    step = int(np.asarray(state["step"])) if "step" in state else int(make_manager(workdir).latest_step())
    manager = make_manager(out_dir, keep=1)
    save(manager, step, {k: state[k] for k in keys}, meta)
    manager.wait_until_finished()
    return step


def load_official_pickle(path: str, allow_pickle: bool = False) -> dict:
    """The ``train_state`` dict of a shortcut-models checkpoint. Refuses unless ``allow_pickle``."""
    if not allow_pickle:
        raise PermissionError(
            f"{path} is a pickle; unpickling can run arbitrary code from the file. Pass allow_pickle=True "
            "(--allow_pickle on the command line) only for files you trust.")
    with open(path, "rb") as f:
        data = pickle.load(f)
    if not isinstance(data, dict) or "train_state" not in data or "params" not in data["train_state"]:
        raise ValueError(f"{path} is not a shortcut-models checkpoint (expected a dict with "
                         "['train_state']['params'])")
    return data["train_state"]


def convert_official(pickle_path: str, config, workdir: str, input_size: int, allow_pickle: bool = False):
    """Write a shortcut-models pickle as step N of ``workdir``, checked against ``config.model``.

    ``input_size``: the DiT's spatial input size (32 for 256 px images in SD latents). As the public
    train.py does when it loads a checkpoint, the optimizer state starts afresh. Returns the step.
    """
    import jax.numpy as jnp
    from ldu_jax.models.dit import dit_from_config
    from ldu_jax.shortcut import trainer

    ts = load_official_pickle(pickle_path, allow_pickle)
    params = jax.tree_util.tree_map(jnp.asarray, ts["params"])
    params_ema = jax.tree_util.tree_map(jnp.asarray, ts.get("params_ema") or ts["params"])
    try:
        final = np.shape(params["FinalLayer_0"]["Dense_1"]["kernel"])[1]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{pickle_path}: no FinalLayer_0/Dense_1 in its params; not a shortcut DiT") from e
    out_channels = int(final) // config.model.patch_size ** 2
    model = dit_from_config(config.model, out_channels)
    tx, _ = trainer.make_optimizer(config.optim, config.max_steps)
    data_shape = (input_size, input_size, out_channels)
    ref = jax.eval_shape(lambda: trainer.init_state(model, tx, jax.random.PRNGKey(0), (1,) + data_shape))
    meta = make_meta(config, ref.params, data_shape)
    check_compatible({"param_shapes": param_shapes(params), "model": "(the pickle's)"}, meta, pickle_path)
    step = int(np.asarray(ts.get("step", 0)))
    state = trainer.TrainState(step=jnp.asarray(step, jnp.int32), params=params, params_ema=params_ema,
                               opt_state=tx.init(params))
    manager = make_manager(workdir)
    save(manager, step, state, meta)
    manager.wait_until_finished()
    return step


def _main(argv):
    from absl import flags
    f = flags.FLAGS
    step = convert_official(f.pickle, f.config, f.workdir, f.input_size, f.allow_pickle)
    print(f"wrote step {step} to {os.path.join(f.workdir, 'checkpoints')}")


if __name__ == "__main__":
    from absl import flags
    from ldu_jax import cli
    flags.DEFINE_string("pickle", None, "shortcut-models checkpoint (pickle)", required=True)
    flags.DEFINE_string("workdir", None, "output work dir", required=True)
    flags.DEFINE_bool("allow_pickle", False, "allow unpickling the file (it can run code)")
    flags.DEFINE_integer("input_size", 32, "the DiT's input size (32 for 256 px images in SD latents)")
    cli.define_config("config", None, "model config (configs/shortcut_*.py)")
    cli.run(_main)
