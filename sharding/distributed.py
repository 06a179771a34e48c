"""Multi-host start-up: one JAX process per host (or per GPU) joined by ``jax.distributed.initialize``.

Every entry point runs unchanged on N processes. Each process runs the same Python program (the multi-controller
model); the mesh spans the devices of all processes; every jitted step is one SPMD program over all of them.

Where the process group comes from (``--dist_init auto``, the default, takes the first that applies):

1. ``--coordinator_address host:port --num_processes N --process_id I`` (all three) on the command line;
2. ``JAXRLHF_COORDINATOR_ADDRESS`` / ``JAXRLHF_NUM_PROCESSES`` / ``JAXRLHF_PROCESS_ID`` in the environment (what
   ``scripts/ray_launch_trainers.py`` sets for each trainer process it starts on a Ray cluster);
3. SLURM, when ``srun`` started more than one task: the coordinator is the first host of ``SLURM_STEP_NODELIST``,
   the port ``JAX_COORDINATOR_PORT`` or one derived from ``SLURM_JOB_ID`` (jax's own SLURM rule), the process
   count and id ``SLURM_NTASKS`` / ``SLURM_PROCID``. One task per node sees all the node's GPUs; several tasks per
   node get one GPU each (``SLURM_LOCALID``), as jax's auto-detection does;
4. Open MPI (``mpirun``: ``OMPI_COMM_WORLD_SIZE`` > 1) and Cloud TPU VMs (pods: ``gcloud ... tpu-vm ssh
   --worker=all``): jax's own cluster auto-detection (``jax.distributed.initialize()`` with nothing set);
5. otherwise a single process (no coordinator).

``--dist_init jax`` always hands the unset values to jax's auto-detection (SLURM, Open MPI, TPU pods, Kubernetes);
``--dist_init off`` never initializes (one process, whatever the environment says).

Mesh layout across hosts (``check_mesh_hosts``): the ``tensor`` axis is the fastest-varying one and must stay
inside a host (its all-reduces run every layer, over NVLink / ICI, never over the network); the ``data`` and
``fsdp`` axes span the hosts, every host holding an equal share of the batch rows. ``--mesh 8x4`` on 4 nodes of 8
GPUs: fsdp 8 = 2 per node x 4 nodes, tensor 4 inside a node.

Host data (the "global view"): every process builds the same global NumPy batch (prompt order, rollouts, rewards;
process 0 alone talks to reward servers and the vLLM pool and broadcasts what it got), and ``global_array`` hands
each process's devices only their own shards of it. ``host_array`` brings a (sharded) result back to every host.

CPU clusters and tests: on the CPU the collectives between processes use gloo
(``jax_cpu_collectives_implementation``), set here before jax starts its backend.
"""
from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional

ENV_COORDINATOR = "JAXRLHF_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXRLHF_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXRLHF_PROCESS_ID"


def _flag(default: Any, help: str) -> Any:  # noqa: A002 - argparse's word; jaxrlhf.cli.arg without importing jaxrlhf
    return field(default=default, metadata={"help": help})


@dataclass
class DistributedConfig:
    """Multi-host flags; an entry point's config inherits them (``class PPOConfig(DistributedConfig, ...)``)."""

    dist_init: Literal["auto", "off", "jax"] = _flag(
        "auto", "multi-host start-up: auto (flags, JAXRLHF_* env, SLURM, MPI, TPU pod, else one process), off (one "
                "process), jax (jax's own cluster auto-detection)")
    coordinator_address: Optional[str] = _flag(None, "host:port of process 0's coordinator (with --num_processes, "
                                                     "--process_id)")
    num_processes: Optional[int] = _flag(None, "number of JAX processes (hosts) of the job")
    process_id: Optional[int] = _flag(None, "this process's rank, 0 .. num_processes-1")
    local_device_ids: Optional[tuple[int, ...]] = _flag(None, "devices this process uses (default: all of the "
                                                              "host's; one id per process for one process per GPU)")

    def __post_init__(self):
        # --num_processes alone is allowed: it sizes a --dry_run plan and is checked against what the environment
        # says; --coordinator_address needs the other two, --process_id needs a coordinator (or jax's detection).
        if self.coordinator_address is not None and (self.num_processes is None or self.process_id is None):
            raise ValueError("--coordinator_address needs --num_processes and --process_id too (or leave all three "
                             "out to take them from SLURM / the JAXRLHF_* environment / TPU metadata)")
        if self.process_id is not None and self.coordinator_address is None and self.dist_init != "jax":
            raise ValueError("--process_id without --coordinator_address: pass both (and --num_processes)")
        if self.dist_init == "off" and (self.coordinator_address is not None or (self.num_processes or 1) > 1):
            raise ValueError("--dist_init off (one process) contradicts --coordinator_address / --num_processes > 1: "
                             "drop one or the other")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"--num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or 1):
            raise ValueError(f"--process_id must be in 0..{(self.num_processes or 1) - 1} (--num_processes "
                             f"{self.num_processes}), got {self.process_id}")
        if self.coordinator_address is not None:
            _check_address(self.coordinator_address, "--coordinator_address")


def _check_address(address: str, what: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{what} {address!r} is not host:port (e.g. 10.0.0.1:12355)")


@dataclass(frozen=True)
class Launch:
    """The resolved process group. ``num_processes`` None: left to jax's auto-detection (``source`` says which)."""

    source: str
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = 1
    process_id: Optional[int] = 0
    local_device_ids: Optional[tuple[int, ...]] = None
    jax_detects: bool = False  # call jax.distributed.initialize and let it fill what is None

    @property
    def multi_process(self) -> bool:
        return self.jax_detects or (self.num_processes or 1) > 1


SINGLE = Launch("single process")


def resolve_launch(cfg: DistributedConfig, environ: Mapping[str, str] | None = None) -> Launch:
    """Where the process group comes from (see the module docstring); reads ``environ`` only, starts nothing."""
    launch = _resolve(cfg, os.environ if environ is None else environ)
    want = cfg.num_processes
    if want is not None and launch.num_processes is not None and want != launch.num_processes:
        if launch is SINGLE:
            raise ValueError(f"--num_processes {want} but no process group to join: pass --coordinator_address "
                             "host:port and --process_id, or start the processes with srun / mpirun / "
                             "scripts/ray_launch_trainers.py / on a TPU pod")
        raise ValueError(f"--num_processes {want} but {launch.source} says {launch.num_processes} processes")
    return launch


def _resolve(cfg: DistributedConfig, env: Mapping[str, str]) -> Launch:
    ids = tuple(cfg.local_device_ids) if cfg.local_device_ids is not None else None
    if cfg.dist_init == "off":
        return SINGLE
    if cfg.coordinator_address is not None:
        return Launch("flags", cfg.coordinator_address, cfg.num_processes, cfg.process_id, ids)
    if ENV_COORDINATOR in env:
        try:
            n, i = int(env[ENV_NUM_PROCESSES]), int(env[ENV_PROCESS_ID])
        except (KeyError, ValueError):
            raise ValueError(f"{ENV_COORDINATOR} is set but {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID} are missing or "
                             f"not integers ({env.get(ENV_NUM_PROCESSES)!r}, {env.get(ENV_PROCESS_ID)!r}): the "
                             "launcher must set all three") from None
        _check_address(env[ENV_COORDINATOR], ENV_COORDINATOR)
        if not 0 <= i < n:
            raise ValueError(f"{ENV_PROCESS_ID}={i} is not in 0..{n - 1} ({ENV_NUM_PROCESSES}={n})")
        return Launch(f"environment ({ENV_COORDINATOR})", env[ENV_COORDINATOR], n, i, ids)
    if cfg.dist_init == "jax":
        return Launch("jax auto-detection", None, cfg.num_processes, cfg.process_id, ids, jax_detects=True)
    slurm = _slurm_launch(env, ids)
    if slurm is not None:
        return slurm
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return Launch("Open MPI (jax auto-detection)", None, None, None, ids, jax_detects=True)
    if _tpu_vm(env):
        return Launch("Cloud TPU VM (jax auto-detection)", None, None, None, ids, jax_detects=True)
    return SINGLE


_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _slurm_launch(env: Mapping[str, str], ids: Optional[tuple[int, ...]]) -> Launch | None:
    """A Launch from srun's variables when srun started more than one task; None otherwise."""
    if not all(v in env for v in _SLURM_VARS) or int(env["SLURM_NTASKS"]) <= 1:
        return None
    n, i = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
    port = env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1))
    host = first_slurm_host(env["SLURM_STEP_NODELIST"])
    if ids is None:
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or n)
        if n > nodes:  # several tasks per node: one device each (jax's SLURM convention)
            ids = (int(env["SLURM_LOCALID"]),)
    return Launch("SLURM (srun)", f"{host}:{port}", n, i, ids)


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``node001`` / ``node001,host2`` / ``node[001-016],host2`` -> ``node001``."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise ValueError(f"cannot read the first host of SLURM_STEP_NODELIST {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[,-]", ranges)[0]


def _tpu_vm(env: Mapping[str, str]) -> bool:
    if env.get("TPU_SKIP_MDS_QUERY") is not None and "TPU_WORKER_HOSTNAMES" not in env:
        return False
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    return os.path.exists("/dev/accel0") or (os.path.isdir("/dev/vfio") and _has_module("libtpu"))


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def start(cfg: DistributedConfig, devices_per_host: Callable[[int], int]) -> Launch:
    """Join the process group (before jax starts its backend) and return how it was formed.

    ``devices_per_host(num_processes)``: devices each host must contribute to the run's meshes (it raises a
    ValueError when they do not split evenly). On a machine without accelerators each process's CPU poses as that
    many devices (``--xla_force_host_platform_device_count``) and the processes talk through gloo. Calling it again
    in a process that already joined is a no-op.
    """
    from sharding.mesh import MeshSpec, _accelerator_present, use_host_devices

    launch = resolve_launch(cfg)
    use_host_devices(MeshSpec(fsdp=devices_per_host(launch.num_processes or 1)))
    import jax

    if not launch.multi_process:
        return launch
    if jax.distributed.is_initialized():
        return launch
    if not _accelerator_present():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {}
    knows_detection = "cluster_detection_method" in inspect.signature(jax.distributed.initialize).parameters
    if not launch.jax_detects and knows_detection:
        # Everything resolved here: keep jax's auto-detection from overriding local_device_ids (under SLURM it
        # would restrict a one-task-per-node process to GPU 0).
        kwargs["cluster_detection_method"] = "deactivate"
    try:
        jax.distributed.initialize(coordinator_address=launch.coordinator_address,
                                   num_processes=launch.num_processes, process_id=launch.process_id,
                                   local_device_ids=None if launch.local_device_ids is None
                                   else list(launch.local_device_ids), **kwargs)
    except RuntimeError as e:
        raise RuntimeError(f"jax.distributed.initialize failed ({launch.source}, coordinator "
                           f"{launch.coordinator_address or 'auto'}, {launch.num_processes or 'auto'} processes, "
                           f"this one {launch.process_id if launch.process_id is not None else 'auto'}): {e}. "
                           "Is every process started, and can each reach the coordinator's host:port?") from e
    if launch.jax_detects:
        launch = Launch(launch.source, launch.coordinator_address, jax.process_count(), jax.process_index(),
                        launch.local_device_ids, jax_detects=True)
    return launch


# ---------------------------------------------------------------------------------------------------------------------
# Mesh layout across hosts
# ---------------------------------------------------------------------------------------------------------------------


def check_mesh_hosts(mesh, what: str = "--mesh") -> None:
    """Tensor groups inside one host; data/fsdp spread over every host with an equal share each. ValueError if not.

    ``mesh`` has axes (data, fsdp, expert, tensor). A single-process mesh always passes.
    """
    import jax
    import numpy as np

    procs = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)  # [data, fsdp, expert, tensor]
    n_proc = jax.process_count()
    local = jax.local_device_count()
    shape = "x".join(str(s) for s in procs.shape)
    for idx in np.ndindex(procs.shape[:-1]):
        group = set(procs[idx].tolist())
        if len(group) > 1:
            raise ValueError(
                f"{what} {shape} (data x fsdp x expert x tensor) puts one tensor-parallel group on processes "
                f"{sorted(group)}: the tensor axis must stay inside a host ({local} devices per process here). Use a "
                f"tensor size that divides {local} and put the rest on fsdp, e.g. --mesh "
                f"{mesh.size // min(local, procs.shape[-1])}x{min(local, procs.shape[-1])}")
    owners = procs[..., 0].reshape(-1)  # process of each batch (data x fsdp x expert) position
    counts = np.bincount(owners, minlength=n_proc)
    if (counts == 0).any():
        raise ValueError(f"{what} {shape} has no devices on processes {np.flatnonzero(counts == 0).tolist()}: every "
                         f"process must hold part of the mesh (it has {n_proc} processes x {local} devices)")
    if len(set(counts.tolist())) > 1:
        raise ValueError(f"{what} {shape} gives the processes unequal shares of the data/fsdp axes "
                         f"({counts.tolist()} positions): use the same number of devices on every host")


def process_devices(first: int, count: int) -> list:
    """Devices ``first .. first+count-1`` of every process's local list, process by process (a mesh's device list)."""
    import jax

    out = []
    by_proc: dict[int, list] = {}
    for d in jax.devices():
        by_proc.setdefault(d.process_index, []).append(d)
    for p in sorted(by_proc):
        local = sorted(by_proc[p], key=lambda d: d.id)
        if first + count > len(local):
            raise ValueError(f"devices {first}..{first + count - 1} of each host are asked for, but process {p} has "
                             f"{len(local)}: lower the mesh size or its @offset")
        out.extend(local[first:first + count])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Host data <-> global arrays
# ---------------------------------------------------------------------------------------------------------------------


def global_array(x, sharding):
    """A host NumPy value (the same on every process) as a global array: each process fills only its own shards.

    Global jax arrays pass through untouched, and so does any jax array in a single process (jit reshards it); a
    process-local jax array in a multi-process job goes through the host. In one process this is ``device_put``.
    """
    import jax
    import numpy as np

    if isinstance(x, jax.Array) and (not x.is_fully_addressable or jax.process_count() == 1):
        return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def host_array(x):
    """A (possibly cross-host sharded) array as a NumPy array on every process: an all-gather when needed.

    A collective when ``x`` spans processes: every process must call it, in the same order.
    """
    import jax
    import numpy as np

    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def from_process0(compute, like):
    """Run ``compute()`` on process 0 only and give its result to every process (one broadcast).

    ``like``: a pytree of ``(shape, dtype)`` pairs matching ``compute()``'s result (a pytree of arrays), used to
    receive on the other processes. An exception on process 0 is re-raised there and reported on the others
    (``RuntimeError``) instead of leaving them waiting. With one process it is just ``compute()``.
    """
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return compute()
    from jax.experimental import multihost_utils

    is_pair = lambda t: isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], tuple)  # noqa: E731
    error = None
    value = jax.tree_util.tree_map(lambda s: np.zeros(s[0], s[1]), like, is_leaf=is_pair)
    if jax.process_index() == 0:
        try:
            value = jax.tree_util.tree_map(np.asarray, compute())
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others have been told
            error = e
    ok, value = multihost_utils.broadcast_one_to_all((np.int32(error is None), value))
    if error is not None:
        raise error
    if not int(ok):
        raise RuntimeError("process 0 failed in a step it runs for every process (see its log for the error)")
    return jax.tree_util.tree_map(np.asarray, value)


def agree(error: BaseException | None) -> None:
    """After a step process 0 ran alone while the others waited: raise ``error`` there and a RuntimeError on the
    others, or return everywhere (one broadcast)."""
    import numpy as np

    def status():
        if error is not None:
            raise error
        return np.int32(0)

    from_process0(status, ((), np.int32))
