"""Checkpoints: orbax managers with automatic resume.

A work dir holds ``checkpoints/<step>/{state, meta}``: ``state`` the train state (orbax), ``meta``
JSON with the model config and every parameter's shape, so a work dir made for another model is
reported as such instead of failing deep inside orbax.

(The converter of public shortcut-models checkpoints is ``ldu_jax.jobs.import_shortcut``.)
"""
from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
# no public path in orbax 0.12 (pinned): the store its default jax.Array handler writes with
from orbax.checkpoint._src.metadata.array_metadata_store import Store as _ArrayMetadataStore

from ldu_jax import errors

# Orbax's default on TPU and CPU splits every replicated array's save over its replicas, one
# on-device slice each (replica-parallel). For small arrays each slice is an op dispatch that costs
# more than the bytes: on 8 CPU devices a short attack test spent 33 of its 207 s (profiled) slicing
# a tiny UNet's optimizer state into 8 pieces per leaf. Slices under this size are written whole by
# one replica; larger arrays (a real model's) keep the parallel write. The files are the same.
MIN_REPLICA_SLICE_BYTES = 4 << 20
_verbosity = logging.get_verbosity()
logging.set_verbosity(logging.ERROR)   # orbax warns of every override, in every command's output
try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(array_metadata_store=_ArrayMetadataStore(),
                                                  min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
        override=True)
finally:
    logging.set_verbosity(_verbosity)


class CheckpointMismatchError(errors.UserError, ValueError):
    """A work dir or a checkpoint file that holds another model (or state layout) than the config's."""


def param_shapes(params) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in flat}


def make_meta(config, params, data_shape) -> dict:
    """What a checkpoint records about its run: model config, parameter shapes, input shape, VAE."""
    return {"model": config.model.to_dict(), "param_shapes": param_shapes(params),
            "data_shape": list(data_shape), "vae": config.vae}


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def existing_steps(workdir: str) -> list[int]:
    """The steps saved in a work dir, oldest first; [] when it has none. Creates nothing."""
    path = checkpoint_dir(workdir)
    if not os.path.isdir(path):
        return []
    opts = ocp.CheckpointManagerOptions(create=False, read_only=True)
    return sorted(int(s) for s in ocp.CheckpointManager(path, options=opts).all_steps())


def make_manager(workdir: str, keep: int = 3, local: bool = False) -> ocp.CheckpointManager:
    """A manager of ``workdir``'s checkpoints. Across hosts every process takes part in its saves
    and restores; ``local``: this process alone (its own devices' arrays, no barrier with the others)."""
    mp, create = ocp.options.MultiprocessingOptions(), True
    if local and jax.process_count() > 1:   # orbax creates the folder only with every process
        mp = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                active_processes={jax.process_index()})
        os.makedirs(checkpoint_dir(workdir), exist_ok=True)
        create = False
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, multiprocessing_options=mp)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=opts)


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


def restore_state(workdir: str, step: int | None = None, local: bool = False):
    """(state dict, meta) of a work dir's latest (or given) checkpoint, its arrays replicated over
    this process's devices: whatever devices and hosts saved it (a model trained on a pod loads on
    one CPU), and usable with arrays placed on a mesh of these devices. ``local``: see make_manager."""
    manager = make_manager(workdir, local=local)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise errors.MissingError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    saved = ocp.StandardCheckpointer().metadata(os.path.join(checkpoint_dir(workdir), str(step), "state"))
    here = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.local_devices()), ("local",)),
                                      jax.sharding.PartitionSpec())
    abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                                      saved.item_metadata)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return state, read_meta(manager, step)


def restore_params(workdir: str, ema: bool = True, step: int | None = None):
    """(params, meta) of a shortcut-model work dir: the EMA (or live) weights."""
    state, meta = restore_state(workdir, step)
    return state["params_ema" if ema else "params"], meta


def export(workdir: str, out_dir: str, keys, step: int | None = None, local: bool = False) -> int:
    """Write the entries ``keys`` of a work dir's latest (or given) checkpoint state, with its meta,
    as a one-checkpoint work dir ``out_dir`` that the same loaders read (e.g. ``('params_ema',)``
    for ``restore_params``: a model to ship without its optimizer state). Returns the step.
    ``local``: by this process alone (see make_manager)."""
    state, meta = restore_state(workdir, step, local=local)
    missing = [k for k in keys if k not in state]
    if missing:
        raise errors.MissingKeyError(f"checkpoint in {workdir} has no {', '.join(missing)} (it has {', '.join(state)})")
    step = int(np.asarray(state["step"])) if "step" in state else int(make_manager(workdir).latest_step())
    manager = make_manager(out_dir, keep=1, local=local)
    # host arrays: what orbax saves from one process of many (its devices' arrays are not global)
    save(manager, step, jax.tree_util.tree_map(np.asarray, {k: state[k] for k in keys}), meta)
    manager.wait_until_finished()
    return step


if __name__ == "__main__":
    import sys
    sys.exit("error: the converter of public shortcut-models checkpoints moved: run "
             "python -m ldu_jax.cli.import_shortcut with the same flags")
