"""One device Mesh for the whole job, dp / fsdp shardings, and multi-host start-up.

As in shortcut-models: a 1-D Mesh over every device (axis ``data``); the batch is sharded on its
first axis; ``dp`` replicates parameters, ``fsdp`` shards every parameter of at least
``fsdp_min_bytes`` (4 MiB by default) along its largest axis divisible by the device count.
"""
from __future__ import annotations

import itertools
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldu_jax.errors import ConfigError, UserError

AXIS = "data"
SUBJECTS = "subjects"   # the evaluation's subject axis (attacks of several subjects in one program)


def _multihost_env() -> bool:
    if any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")):
        return True
    if any(int(os.environ.get(k) or 1) > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")):
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


MODES = ("auto", "on", "off")


# Where process 0 works alone at the end (an attack's samples, an evaluation's measurements and
# report), the other processes finish first and wait for it at JAX's shutdown barrier. Past that
# barrier's timeout (JAX's default: 300 s) every process is aborted, process 0 in the middle of its
# work. A process that dies does not hold the others there: when process 0 dies they stop at once,
# when another does, process 0 stops after the heartbeat timeout (100 s; both measured).
SHUTDOWN_TIMEOUT_S = 24 * 3600


def initialize(mode: str = "auto", coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S) -> bool:
    """Start the multi-host runtime (``jax.distributed.initialize``): the one start-up path of
    every command (``ldu_jax.cli`` calls it before the command's main, from its flags), before any
    other JAX work. Returns whether this is a distributed run.

    ``mode``: ``auto`` (when a coordinator address is given, or the environment names one, a
    multi-task Slurm / MPI job or a multi-host TPU slice), ``on`` or ``off``. A TPU pod slice,
    Slurm and MPI need no other argument; a plain set of machines gives ``coordinator_address``
    (host:port of process 0), ``num_processes`` and this ``process_id`` (0 and -1: from the
    environment). ``shutdown_timeout_s``: how long the processes wait for each other at exit.
    Calling it again is a no-op."""
    if mode not in MODES:
        raise ConfigError(f"distributed must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" or not (mode == "on" or coordinator_address or _multihost_env()):
        return False
    if jax.distributed.is_initialized():
        return True
    if coordinator_address and (num_processes < 1 or not 0 <= process_id < num_processes):
        raise ConfigError(f"--coordinator_address={coordinator_address} needs --num_processes >= 1 and "
                          f"--process_id in [0, num_processes), got {num_processes} and {process_id}")
    kw = dict(coordinator_address=coordinator_address or None, num_processes=num_processes or None,
              process_id=None if process_id < 0 else process_id, shutdown_timeout_seconds=shutdown_timeout_s)
    jax.distributed.initialize(**kw)
    return True


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """``initialize(mode)`` from the environment alone (a config's ``distributed`` key)."""
    return initialize(mode)


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def batch_mesh(batch_size: int, local: bool = False) -> Mesh:
    """A Mesh over the most devices that divide both ``batch_size`` and the device count.

    Across hosts: as many of each host's devices (host by host, in process order), so that each
    host's rows of the global batch (``data.local_rows``: host i holds rows [i B / n, (i + 1) B / n))
    lie on its own devices. ``local``: this process's devices only, for work every host does on
    its own share without a collective (protecting its files)."""
    if local or jax.process_count() == 1:
        devices = jax.local_devices() if local else jax.devices()
        n = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0 and len(devices) % d == 0)
        return make_mesh(devices[:n])
    n_proc = jax.process_count()
    if batch_size % n_proc:
        raise ConfigError(f"the batch size {batch_size} must be divisible by the {n_proc} processes")
    per_host = [sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
                for p in range(n_proc)]
    n_local = min(len(h) for h in per_host)
    n = max(d for d in range(1, n_local + 1) if (batch_size // n_proc) % d == 0 and n_local % d == 0)
    return make_mesh([d for h in per_host for d in h[:n]])


def subject_mesh(n_subjects: int, batch_size: int) -> Mesh:
    """A 2-D Mesh (``subjects``, ``data``): each subject's batch over the devices ``batch_mesh``
    gives one subject alone (so its sums run in the same order and its result equals a run on its
    own), and the subjects over the most of the remaining devices that divide ``n_subjects``."""
    devices = jax.devices()
    b = batch_mesh(batch_size).devices.size
    rest = len(devices) // b
    s = max(d for d in range(1, rest + 1) if n_subjects % d == 0 and rest % d == 0)
    return Mesh(np.asarray(devices[:s * b]).reshape(s, b), (SUBJECTS, AXIS))


def map_subjects(fn, in_axes):
    """``fn`` over a leading subject axis of the arguments whose ``in_axes`` entry is 0 (None:
    shared by every subject): ``jax.vmap`` on accelerators; on CPU ``lax.map``, one subject after
    another in one program, which with the SD modules' tap convs (``sd.conv``) ran the four
    subjects' DreamBooth steps 1.51x and their TI steps 1.19x faster than vmap (there vmapped
    per-subject kernels become XLA:CPU's slow grouped convolutions; README, Benchmarks)."""
    if any(a not in (0, None) for a in in_axes):
        raise ValueError(f"map_subjects: in_axes of 0 or None only, got {in_axes}")
    if jax.default_backend() != "cpu":
        return jax.vmap(fn, in_axes=in_axes)
    mapped = [i for i, a in enumerate(in_axes) if a == 0]

    def over(*args):
        def one(xs):
            full = list(args)
            for i, x in zip(mapped, xs):
                full[i] = x
            return fn(*full)
        return jax.lax.map(one, tuple(args[i] for i in mapped))
    return over


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape, itemsize: int, n: int, min_bytes: int) -> P:
    """Shard the largest axis divisible by n, for arrays of at least min_bytes; else replicate."""
    if n == 1 or int(np.prod(shape, dtype=np.int64)) * itemsize < min_bytes:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = AXIS
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh, mode: str, min_bytes: int = 4 * 2 ** 20):
    """A pytree of NamedShardings for a (jax.eval_shape'd) train state."""
    if mode not in ("dp", "fsdp"):
        raise ConfigError(f"config.sharding must be 'dp' or 'fsdp', got {mode!r}")
    n = mesh.devices.size

    def one(leaf):
        if mode == "dp" or not hasattr(leaf, "shape"):
            return replicated(mesh)
        return NamedSharding(mesh, fsdp_spec(leaf.shape, np.dtype(leaf.dtype).itemsize, n, min_bytes))

    return jax.tree_util.tree_map(one, abstract_state)


def global_batch(mesh: Mesh, local: np.ndarray):
    """Assemble the global batch array from this host's slice (sharded on the batch axis)."""
    return jax.make_array_from_process_local_data(data_sharding(mesh), np.asarray(local))


def put(tree, sharding):
    """``jax.device_put(tree, sharding)`` for values every host holds the same of (loaded weights,
    a subject's photos): across hosts an array on this host's devices goes through host memory,
    since a device-to-device copy onto other hosts' devices needs cross-host transfers (not on CPU)."""
    if jax.process_count() > 1:
        tree = jax.tree_util.tree_map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)
    return jax.device_put(tree, sharding)


def fetch(tree):
    """``tree``'s arrays as numpy on this host, whatever their sharding: a global array that other
    hosts hold parts of is gathered (every process must call this together, as for any collective)."""
    def one(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree_util.tree_map(one, tree)


_BARRIERS = itertools.count()


class ProcessFailed(RuntimeError):
    """Raised on the other processes when one failed in work they all wait for (its own traceback
    is on that process): process 0's work for all (``process0_first``), or a host's share
    (``every_process``)."""


class ProcessInputError(ProcessFailed, UserError):
    """``ProcessFailed`` where the failed process stopped at a user error (a bad path or key): every
    host says it in one line, as that one does."""


def sync(name: str, timeout_s: int = 3600, status: str | None = None) -> str | None:
    """A barrier of every process; nothing in one process. It waits on the coordination service
    (up to ``timeout_s``), not on a device collective: on CPUs (gloo) a collective whose processes
    arrive more than 30 s apart fails, and one host may be that far behind (the persistent
    compilation cache serves only process 0's programs, so the others compile them).
    ``status``: process 0's word to the others, returned on every process after the barrier."""
    if jax.process_count() == 1:
        return status
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:   # a runtime started without jax.distributed (none here)
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
        return None
    key = f"ldu_jax/{next(_BARRIERS)}/{name}"
    if jax.process_index() == 0:
        client.key_value_set(key + "/status", status or "")
    client.wait_at_barrier(key, timeout_in_ms=timeout_s * 1000)
    return client.blocking_key_value_get(key + "/status", 60_000) or None


def sync_each(name: str, status: str | None = None, timeout_s: int = 3600) -> list[str | None]:
    """A barrier of every process that carries each one's word: every process's ``status``, in
    process order, on every process after the barrier; ``[status]`` in one process."""
    if jax.process_count() == 1:
        return [status]
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("sync_each needs the runtime started by jax.distributed.initialize (parallel.initialize)")
    key = f"ldu_jax/{next(_BARRIERS)}/{name}"
    client.key_value_set(f"{key}/status/{jax.process_index()}", status or "")
    client.wait_at_barrier(key, timeout_in_ms=timeout_s * 1000)
    return [client.blocking_key_value_get(f"{key}/status/{i}", 60_000) or None for i in range(jax.process_count())]


_USER = "user error: "   # a status's prefix when the failure was the user's input


def _failure(err: BaseException | None) -> str | None:
    return None if err is None else (_USER if isinstance(err, UserError) else "") + f"{type(err).__name__}: {err}"


def _failed(name: str, process: int, status: str) -> ProcessFailed:
    user = status.startswith(_USER)
    return (ProcessInputError if user else ProcessFailed)(
        f"{name}: process {process} failed ({status[len(_USER):] if user else status})")


def every_process(fn, name: str):
    """``fn()`` on every process (each its own share of a job), then a barrier at which each says
    whether its share failed: a process whose ``fn`` raised raises that error, the others raise
    ``ProcessFailed`` naming it, so none waits at a later barrier for a host that stopped."""
    out, err = None, None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - raised again below, after the barrier
        if jax.process_count() == 1:
            raise
        err = e
    statuses = sync_each(name, _failure(err))
    if err is not None:
        raise err
    failed = [(i, s) for i, s in enumerate(statuses) if s]
    if failed:
        raise _failed(name, *failed[0])
    return out


def share(obj, name: str):
    """Process 0's ``obj`` (JSON: dicts, lists, strings, numbers, numpy scalars as floats) on every
    process, after a barrier; ``obj`` itself in one process."""
    if jax.process_count() == 1:
        return obj
    import json
    return json.loads(sync(name, status=json.dumps(obj, default=float) if jax.process_index() == 0 else None))


def process0_first(fn, name: str, others: bool = True):
    """``fn()`` on process 0, then, after a barrier, on every other process: what process 0 writes
    (e.g. a built-in image folder under the work dir) the others find written. An exception on
    process 0 is raised after the barrier, and the others raise ``ProcessFailed`` naming it, so
    no host waits for the failed one. ``others=False``: process 0 alone runs ``fn`` (the others
    return None after the barrier)."""
    if jax.process_count() == 1:
        return fn()
    out, err = None, None
    if jax.process_index() == 0:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - raised again below, after the barrier
            err = e
    failed = sync(name, status=_failure(err))
    if err is not None:
        raise err
    if failed:
        raise _failed(name, 0, failed)
    return out if jax.process_index() == 0 or not others else fn()
