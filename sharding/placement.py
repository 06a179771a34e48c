"""Role placement: which devices a model (actor, critic, reference, reward) lives on, and host offload.

``--ref_mesh`` / ``--reward_mesh`` take a mesh spec with an optional device offset, ``SPEC[@FIRST]``:

- ``4x2``       the role gets its own mesh of that shape on the first devices of every host (the same devices as
                ``--mesh`` when the sizes match: only the layout differs, e.g. ``1x8`` for a frozen model);
- ``2x2@4``     the role's mesh starts at device 4 of every host: a disjoint device subset when ``--mesh`` covers
                devices 0..3 (OpenRLHF's separate reference / reward GPUs), e.g. on 8-GPU nodes
                ``--mesh 4x4 --ref_mesh 4x4@4`` on 4 nodes: actor and critic on GPUs 0-3 of every node, the
                reference on GPUs 4-7.

Every mesh takes the same local devices on every host (``size / num_processes`` each), so each one spans all
processes and its tensor axis stays inside a host (``distributed.check_mesh_hosts``). Without role meshes,
``--mesh`` must use every device, as before. Forward outputs come back to the host (``train/steps.make_forward``),
so roles on different meshes exchange nothing device to device.

Offload (``--ref_offload``, ``--reward_offload``): a frozen model's parameters live in host memory between uses
(``offload``: the ``pinned_host`` memory kind where the backend has one, else NumPy copies of this process's
shards) and come back to their devices and shardings for the experience pass (``onload``), which frees the device
copy again when it ends. Verified on the CPU (NumPy fallback, 1 and 2 processes: tests/test_multihost.py); the
``pinned_host`` path on GPUs/TPUs has not run here: check it there with those tests' placement cases.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from sharding.mesh import MeshSpec, parse_mesh


@dataclass(frozen=True)
class RolePlacement:
    """A mesh shape and the first local device it takes on every host."""

    spec: MeshSpec
    first: int = 0

    def __str__(self) -> str:
        return f"{self.spec}@{self.first}" if self.first else str(self.spec)


def parse_placement(text: str, what: str) -> RolePlacement:
    """``"4x2"`` / ``"2x2@4"`` -> RolePlacement; errors name the flag."""
    m = re.fullmatch(r"\s*([^@]+?)\s*(?:@\s*(\d+)\s*)?", text)
    if not m:
        raise ValueError(f"{what} {text!r} is not understood: write SPEC or SPEC@FIRST_DEVICE, e.g. 4x2 or 2x2@4")
    try:
        spec = parse_mesh(m.group(1))
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    return RolePlacement(spec, int(m.group(2) or 0))


def plan_devices(main: str, roles: Mapping[str, Optional[str]], num_processes: int = 1) -> dict[str, Any]:
    """Check that the meshes fit on ``num_processes`` hosts: ``{"per_host": devices each host needs,
    "placements": {"main": RolePlacement, role: RolePlacement, ...}}`` (no jax; used by the dry run too)."""
    placements = {"main": RolePlacement(parse_mesh(main), 0)}
    for name, text in roles.items():
        if text is not None:
            placements[name] = parse_placement(text, f"--{name}_mesh")
    per_host = 0
    for name, p in placements.items():
        flag = "--mesh" if name == "main" else f"--{name}_mesh"
        if p.spec.size % num_processes:
            raise ValueError(f"{flag} {p.spec} has {p.spec.size} devices, which do not split over {num_processes} "
                             "processes: every host takes the same number of devices of each mesh")
        per_host = max(per_host, p.first + p.spec.size // num_processes)
    return {"per_host": per_host, "placements": placements}


def make_meshes(main: str, roles: Mapping[str, Optional[str]]) -> dict[str, Any]:
    """``{"main": Mesh, role: Mesh}``: ``--mesh`` on local devices 0.., each role on its own slice (see module doc).

    Every device of every host must belong to some mesh (an unused GPU is a mistake, not a default).
    """
    import jax

    from sharding.mesh import make_mesh

    plan = plan_devices(main, roles, jax.process_count())
    local = jax.local_device_count()
    used = [False] * local
    meshes = {}
    for name, p in plan["placements"].items():
        flag = "--mesh" if name == "main" else f"--{name}_mesh"
        per_host = p.spec.size // jax.process_count()
        if p.first + per_host > local:
            raise ValueError(
                f"{flag} {p} needs devices {p.first}..{p.first + per_host - 1} of each host, which has {local}: "
                "lower the mesh size or its @offset")
        from sharding.distributed import process_devices

        meshes[name] = make_mesh(p.spec, devices=process_devices(p.first, per_host))
        for i in range(p.first, p.first + per_host):
            used[i] = True
    if not all(used):
        idle = [i for i, u in enumerate(used) if not u]
        raise ValueError(f"devices {idle} of each host are in no mesh (--mesh {main}"
                         + "".join(f", --{k}_mesh {v}" for k, v in roles.items() if v) + "): size the meshes to "
                         f"use all {local} devices per host")
    return meshes


# ---------------------------------------------------------------------------------------------------------------------
# Offload
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class HostShards:
    """A global array kept as NumPy copies of this process's shards (backends without a ``pinned_host`` memory)."""

    shape: tuple
    dtype: Any
    sharding: Any
    shards: list  # [(device, numpy array)]


def _has_pinned_host(x) -> bool:
    dev = next(iter(x.sharding.addressable_devices))
    try:
        return any(m.kind == "pinned_host" for m in dev.addressable_memories())
    except (AttributeError, NotImplementedError):  # a backend without memory kinds
        return False


def offload(tree):
    """Every array of ``tree`` moved to host memory, keeping its sharding (no device memory afterwards)."""
    import jax
    import numpy as np

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if _has_pinned_host(x):
            return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))
        return HostShards(x.shape, x.dtype, x.sharding, [(s.device, np.asarray(s.data)) for s in x.addressable_shards])

    return jax.tree_util.tree_map(one, tree)


def onload(tree):
    """The inverse of ``offload``: arrays back in device memory with their shardings (host copies are kept)."""
    import jax

    def one(x):
        if isinstance(x, HostShards):
            arrays = [jax.device_put(a, d) for d, a in x.shards]
            return jax.make_array_from_single_device_arrays(x.shape, x.sharding, arrays)
        if isinstance(x, jax.Array) and x.sharding.memory_kind == "pinned_host":
            return jax.device_put(x, x.sharding.with_memory_kind("device"))
        return x

    return jax.tree_util.tree_map(one, tree, is_leaf=lambda x: isinstance(x, HostShards))


def on_device_bytes(tree) -> int:
    """Bytes of ``tree`` this process holds in device memory (offloaded leaves count 0)."""
    import jax

    total = 0
    for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, HostShards)):
        if isinstance(x, jax.Array) and x.sharding.memory_kind != "pinned_host":
            total += sum(s.data.nbytes for s in x.addressable_shards)
    return total
