"""Parse `--mesh` strings and build the (data, fsdp, expert, tensor) device mesh.

Axis names are fixed: ``data`` (pure data parallelism: parameters replicated), ``fsdp`` (parameters, gradients and
optimizer state sharded: the ZeRO-3 equivalent; the batch is split over it too), ``expert`` (mixture-of-experts
models: the stacked experts are split over it; every other parameter is replicated over it and the batch is split
over it, so for them it is one more data-parallel axis) and ``tensor`` (Megatron-style tensor parallelism inside a
layer). Every mesh has all four axes, a missing one has size 1, so partition rules never need to know which axes a
run uses.

Axis types: we build the mesh with ``AxisType.Auto`` on every axis. jax >= 0.10 ``make_mesh`` defaults to Explicit
axes, where every array carries its sharding in its type and many ops demand the user resolve shardings by hand.
jaxrlhf places parameters and batches explicitly (jit in/out shardings, ``with_sharding_constraint`` on activations)
and lets XLA's sharding propagation (GSPMD / Shardy) handle the rest; that is Auto mode. It behaves the same on
jax 0.10 and 0.11.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

AXES = ("data", "fsdp", "expert", "tensor")
# PartitionSpec entry for the batch dimension: split over every data-like axis.
BATCH = ("data", "fsdp", "expert")


@dataclass(frozen=True)
class MeshSpec:
    """Sizes of the four mesh axes (``expert`` last among the fields so ``MeshSpec(data, fsdp, tensor)`` reads as
    before; the mesh's axis order is ``AXES``)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Axis sizes in ``AXES`` order (data, fsdp, expert, tensor)."""
        return (self.data, self.fsdp, self.expert, self.tensor)

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.expert * self.tensor

    @property
    def batch_ways(self) -> int:
        """How many ways the batch is split (data x fsdp x expert)."""
        return self.data * self.fsdp * self.expert

    def __str__(self) -> str:
        if self.expert > 1:
            return "x".join(str(s) for s in self.shape)
        return f"{self.data}x{self.fsdp}x{self.tensor}" if self.data > 1 else f"{self.fsdp}x{self.tensor}"


def batch_ways(mesh) -> int:
    """Data-parallel size of a built mesh: the product of the ``BATCH`` axes."""
    n = 1
    for a in BATCH:
        n *= mesh.shape[a]
    return n


def parse_mesh(text: str) -> MeshSpec:
    """Parse a mesh string.

    ``"8"`` -> fsdp=8; ``"4x2"`` -> fsdp=4 x tensor=2; ``"2x2x2"`` -> data=2 x fsdp=2 x tensor=2;
    ``"1x2x2x2"`` -> data=1 x fsdp=2 x expert=2 x tensor=2; ``"data=2,fsdp=2,expert=2,tensor=2"`` names the axes
    (any subset, any order).
    """
    s = text.strip().lower()
    if "=" in s:
        sizes: dict[str, int] = {}
        for part in s.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in AXES:
                raise ValueError(f"mesh {text!r}: unknown axis {name!r}; axes are {', '.join(AXES)}")
            if name in sizes:
                raise ValueError(f"mesh {text!r}: axis {name!r} given twice")
            sizes[name] = _positive(value, text)
        return MeshSpec(**sizes)
    if not re.fullmatch(r"\d+(x\d+){0,3}", s):
        raise ValueError(
            f"mesh {text!r} is not understood: write FSDPxTENSOR (4x2), DATAxFSDPxTENSOR (2x2x2), "
            "DATAxFSDPxEXPERTxTENSOR (1x2x2x2) or data=1,fsdp=2,expert=2,tensor=2"
        )
    dims = [_positive(d, text) for d in s.split("x")]
    if len(dims) == 1:
        return MeshSpec(fsdp=dims[0])
    if len(dims) == 2:
        return MeshSpec(fsdp=dims[0], tensor=dims[1])
    if len(dims) == 3:
        return MeshSpec(data=dims[0], fsdp=dims[1], tensor=dims[2])
    return MeshSpec(data=dims[0], fsdp=dims[1], expert=dims[2], tensor=dims[3])


def _positive(value: str, text: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"mesh {text!r}: axis size {value!r} is not an integer") from None
    if n < 1:
        raise ValueError(f"mesh {text!r}: axis sizes must be >= 1, got {n}")
    return n


def _accelerator_present() -> bool:
    """Best guess, before jax starts, whether this machine has a GPU or TPU jax will use."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    if os.path.exists("/dev/nvidia0") or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio"):
        return True
    return False


def use_host_devices(spec: MeshSpec | str) -> None:
    """On a machine without accelerators, make the CPU look like ``spec.size`` devices.

    Sets ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``. XLA reads the flag when jax creates its CPU
    client (the first ``jax.devices()``), so this works after ``import jax`` as long as no device was touched yet.
    A count already set in XLA_FLAGS is left alone. Also sizes XLA:CPU's thread pool for that count
    (``_size_host_thread_pool``, read at the same moment). No-op where a GPU/TPU is present.
    """
    if isinstance(spec, str):
        spec = parse_mesh(spec)
    if _accelerator_present():
        return
    flags = os.environ.get("XLA_FLAGS", "")
    found = re.search(r"xla_force_host_platform_device_count=(\d+)", flags)
    if found is None:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={spec.size}".strip()
    _size_host_thread_pool(int(found.group(1)) if found else spec.size)


def _size_host_thread_pool(devices: int) -> None:
    """Give XLA:CPU's thread pool 4 threads per host device (``PJRT_NPROC``; one set by the user is kept).

    Each host device runs its share of a program on a thread of one pool, which XLA sizes to max(cores, devices)
    by default, and a collective blocks its thread until every participant has arrived. With several independent
    programs in flight (JAX's asynchronous dispatch), the blocked participants can hold every thread while a
    participant they wait for is still queued: a deadlock that XLA ends after 40 s by aborting the process
    ("Termination timeout ... Exiting to ensure a consistent program state"). Seen here with 8 devices on 2 cores:
    pools of 8, 9 and 12 threads deadlocked on 30 rounds of 8 independent sharded matmuls, pools of 16 and 32 never
    did (tests/test_sharding.py::test_host_devices_survive_many_programs_in_flight). 4x leaves room over the 2x that
    sufficed there; its price is thread oversubscription: the demo's train phase (8 devices, 2 cores) took 0.165 s
    a step with 8 threads, 0.174 with 16 and 0.181 with 32. Accelerators never come here (``use_host_devices``).
    """
    if devices > 1 and not {"PJRT_NPROC", "NPROC"} & os.environ.keys():
        os.environ["PJRT_NPROC"] = str(max(os.cpu_count() or 1, 4 * devices))


def make_mesh(spec: MeshSpec | str, devices=None):
    """Build a ``jax.sharding.Mesh`` with axes (data, fsdp, expert, tensor), all of type Auto (see module docstring).

    ``devices`` defaults to all devices of all processes. The tensor axis is the fastest-varying one, so on a
    multi-GPU host it stays inside the host's NVLink domain.
    """
    import jax
    from jax.sharding import AxisType

    if isinstance(spec, str):
        spec = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    if spec.size != len(devices):
        raise ValueError(
            f"mesh {spec} needs {spec.size} devices, {len(devices)} available: pick a mesh whose product is "
            f"{len(devices)}" + (" (on a CPU machine, set the mesh before jax touches a device)" if
                                 devices[0].platform == "cpu" else "")
        )
    return jax.make_mesh(spec.shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
