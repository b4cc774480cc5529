"""Convert a checkpoint of the public shortcut-models code (kvfrans/shortcut-models, JAX) into a
work dir of this project, which ``train.py`` continues and ``checkpoint.restore_params`` loads:

    python -m ldu_jax.cli.import_shortcut --pickle=celeba-shortcut2-every4400001 \\
        --config=configs/shortcut_celebahq256.py --workdir=runs/celeba_official --allow_pickle

What the public code writes (its ``utils/checkpoint.py``, called by ``train.py`` every
``save_interval`` steps): one pickle file per save, named ``<save_dir><step>`` (``--save_dir``
and the step joined as strings: ``ckpts/celeba400001``, or ``ckpts/run/400001`` when the save dir
ends in ``/``), written as ``<name>.tmp`` in the same folder and renamed to ``<name>`` once
complete. The file holds ``{'train_state': {'params', 'params_ema', 'opt_state', 'step'},
'_timestamp': t}``: numpy arrays and optax's state objects. ``--pickle`` takes such a file, or
the folder that holds it when it holds exactly one.

Nothing in the file records the input size: the public DiT adds fixed sin-cos positions computed
for each call (not a parameter) and no config is saved. The patch size and the input channels are
in the parameters (the patch embedding's kernel); the size is checked against the config (its
``image_size`` through its VAE) where that can be known without downloading anything.
"""
from __future__ import annotations

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from ldu_jax import checkpoint as ckpt
from ldu_jax import errors, sources
from ldu_jax.models.dit import dit_from_config
from ldu_jax.shortcut import trainer


PickleRefusedError = errors.RefusedError   # the shared class; this name is kept for callers


class WorkdirInUseError(errors.UserError, FileExistsError):
    """The output work dir already holds checkpoints."""


_UNFINISHED = ".tmp"   # the public code's name for a save still being written


def _is_pickle(path: str) -> bool:
    """Whether a file starts like a pickle of protocol 2 or later (what ``pickle.dumps`` writes)."""
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"
    except OSError:
        return False


def find_checkpoint(path: str) -> str:
    """``path`` if it is a file; if it is a folder (the public code's save dir), the one complete
    checkpoint file in it. Raises a ``UserError`` listing what the folder holds otherwise."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise errors.MissingError(f"--pickle {path} does not exist")
    names = sorted(n for n in os.listdir(path) if not n.startswith("."))
    files = [n for n in names if os.path.isfile(os.path.join(path, n))]
    found = [n for n in files if not n.endswith(_UNFINISHED) and _is_pickle(os.path.join(path, n))]
    if len(found) == 1:
        return os.path.join(path, found[0])

    def what(n):
        p = os.path.join(path, n)
        if os.path.isdir(p):
            return f"{n}/ (a folder)"
        if n.endswith(_UNFINISHED):
            return f"{n} (an unfinished save: the public code renames it when complete)"
        return n if n in found else f"{n} (not a pickle)"
    listing = ", ".join(what(n) for n in names) or "nothing"
    if found:
        raise errors.FileFormatError(f"--pickle {path} is a folder with {len(found)} checkpoints ({listing}); "
                                     "pass the one to convert as --pickle")
    raise errors.FileFormatError(f"--pickle {path} is a folder without a complete shortcut-models checkpoint "
                                 f"(it holds: {listing}); pass the checkpoint file as --pickle")


def load_pickle(path: str, allow_pickle: bool = False) -> dict:
    """The ``train_state`` dict of a shortcut-models checkpoint (a file, or a save folder holding
    one). Refuses unless ``allow_pickle``: unpickling can run code from the file."""
    path = find_checkpoint(path)
    if not allow_pickle:
        raise errors.RefusedError(
            f"{path} is a pickle; unpickling can run arbitrary code from the file. Pass allow_pickle=True "
            "(--allow_pickle on the command line) only for files you trust.")
    if not _is_pickle(path):
        raise errors.FileFormatError(f"{path} is not a pickle (a shortcut-models checkpoint is one)")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
        raise errors.FileFormatError(f"{path} could not be unpickled (truncated, or not a shortcut-models "
                                     f"checkpoint?): {type(e).__name__}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("train_state"), dict) \
            or "params" not in data["train_state"]:
        raise errors.FileFormatError(f"{path} is not a shortcut-models checkpoint (expected a dict with "
                                     "['train_state']['params'])")
    return data["train_state"]


def describe(params) -> dict:
    """The DiT architecture that a public parameter tree implies (``num_heads`` is not recorded)."""
    try:
        p, _, c, hidden = np.shape(params["PatchEmbed_0"]["Conv_0"]["kernel"])
        mlp = np.shape(params["DiTBlock_0"]["MlpBlock_0"]["Dense_0"]["kernel"])[1]
        classes = np.shape(params["LabelEmbedder_0"]["Embed_0"]["embedding"])[0] - 1
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise errors.FileFormatError(f"the checkpoint's params are not a shortcut DiT's (no {e} where the "
                                     "patch embedding, first block or label embedding should be)") from e
    depth = sum(1 for k in params if str(k).startswith("DiTBlock_"))
    return dict(patch_size=int(p), in_channels=int(c), hidden_size=int(hidden), depth=depth,
                mlp_ratio=float(mlp) / int(hidden), num_classes=int(classes))


def expected_input(config) -> tuple[int, int, str] | None:
    """(size, channels, why) of the DiT inputs that ``config`` trains on (``image_size`` through
    ``config.vae``), or None when the VAE's config is not available without a download."""
    if config.vae == "none":
        return config.image_size, 3, f"pixels of config.image_size={config.image_size} (config.vae='none')"
    cfg = sources.vae_config(config.vae)
    if cfg is None:
        return None
    size, _, channels = cfg.latent_shape(config.image_size, "config.image_size")
    factor = cfg.factor
    return (size, channels,
            f"latents of config.image_size={config.image_size} through config.vae={config.vae!r} "
            f"(factor {factor}, {channels} channels)")


def check_input(arch: dict, config, input_size: int | None) -> tuple[int, int, int]:
    """The data shape (size, size, channels) to record, with ``input_size`` (None: the config's)
    checked against what the checkpoint fixes (patch size, channels) and what the config implies."""
    want = expected_input(config)
    p, c = arch["patch_size"], arch["in_channels"]
    if want is not None and want[1] != c:
        raise errors.ConfigError(f"the checkpoint's DiT takes {c}-channel inputs, but --config gives {want[1]}: "
                                 f"{want[2]}; set --config.vae to the VAE the checkpoint was trained with")
    if input_size is None:
        if want is None:
            raise errors.ConfigError(
                f"pass --input_size: the checkpoint does not record it, and config.vae={config.vae!r} is not "
                "available without a download to derive it from config.image_size (32 for 256 px images in SD latents)")
        input_size = want[0]
    if input_size <= 0 or input_size % p:
        raise errors.ConfigError(f"--input_size={input_size} must be a positive multiple of the checkpoint's "
                                 f"patch size {p}")
    if want is not None and want[0] != input_size:
        raise errors.ConfigError(f"--input_size={input_size} does not fit --config: expected {want[0]} ({want[2]}), "
                                 f"found {input_size}; pass --input_size={want[0]} or the config's image_size and VAE "
                                 "that the checkpoint is meant for")
    return input_size, input_size, c


def _check_model(params, meta: dict, arch: dict, config, path: str):
    """Raise CheckpointMismatchError naming the first parameter whose shape differs from config's model."""
    have, want = ckpt.param_shapes(params), meta["param_shapes"]
    diffs = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    if not diffs:
        return
    k = diffs[0]
    if k not in have:
        what = f"parameter {k} (shape {want[k]} with this config) is not in the checkpoint"
    elif k not in want:
        what = f"parameter {k} (shape {have[k]} in the checkpoint) is not in this config's model"
    else:
        what = f"parameter {k} has shape {have[k]} in the checkpoint but {want[k]} with this config"
    fields = ("hidden_size", "depth", "patch_size", "mlp_ratio", "num_classes")
    diff = [f"{f}={arch[f]:g} (config: {config.model[f]:g})" for f in fields if arch[f] != config.model[f]]
    hint = ("; the checkpoint looks like " + ", ".join(diff) + ", set those with --config.model.<key>=..."
            if diff else "")
    raise ckpt.CheckpointMismatchError(
        f"{path} does not fit --config: {what} ({len(diffs)} parameters differ){hint}")


def convert(pickle_path: str, config, workdir: str, input_size: int | None = None,
            allow_pickle: bool = False) -> int:
    """Write a shortcut-models checkpoint as step N of a new (or empty) ``workdir``, checked
    against ``config``. Returns N.

    ``input_size``: the DiT's spatial input size (32 for 256 px images in SD latents); None takes
    the config's (``image_size`` over the VAE's factor). As the public train.py does when it
    loads a checkpoint, the optimizer state starts afresh. Nothing is written when a check fails,
    and a work dir that already holds checkpoints is refused, untouched.
    """
    path = find_checkpoint(pickle_path)
    steps = ckpt.existing_steps(workdir)
    if steps:
        raise WorkdirInUseError(
            f"the work dir {workdir} already holds step{'s' if len(steps) > 1 else ''} "
            f"{', '.join(map(str, steps))} ({ckpt.checkpoint_dir(workdir)}); use another --workdir "
            "(the converter writes only into a new or empty one and leaves this one as it is)")
    ts = load_pickle(path, allow_pickle)
    to_jnp = lambda tree: jax.tree_util.tree_map(jnp.asarray, unfreeze(tree))  # noqa: E731
    params = to_jnp(ts["params"])
    params_ema = to_jnp(ts["params_ema"]) if ts.get("params_ema") is not None else params
    arch = describe(params)
    model = dit_from_config(config.model, arch["in_channels"])
    tx, _ = trainer.make_optimizer(config.optim, config.max_steps)
    probe = (arch["patch_size"],) * 2 + (arch["in_channels"],)      # the parameters do not depend on the size
    ref = jax.eval_shape(lambda: trainer.init_state(model, tx, jax.random.PRNGKey(0), (1,) + probe))
    _check_model(params, ckpt.make_meta(config, ref.params, probe), arch, config, path)
    data_shape = check_input(arch, config, input_size)
    meta = ckpt.make_meta(config, ref.params, data_shape)
    step = int(np.asarray(ts.get("step", 0)))
    state = trainer.TrainState(step=jnp.asarray(step, jnp.int32), params=params, params_ema=params_ema,
                               opt_state=tx.init(params))
    manager = ckpt.make_manager(workdir)
    ckpt.save(manager, step, state, meta)
    manager.wait_until_finished()
    return step
