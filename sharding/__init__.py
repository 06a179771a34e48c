"""Device meshes and partition rules: the only place that knows how arrays are laid out on devices."""
from sharding.mesh import AXES, BATCH, MeshSpec, batch_ways, make_mesh, parse_mesh, use_host_devices
from sharding.rules import (
    PartitionRules,
    constrain,
    named_shardings,
    partition_specs,
    path_str,
    shard_state,
)

__all__ = [
    "AXES", "BATCH", "MeshSpec", "batch_ways", "make_mesh", "parse_mesh", "use_host_devices",
    "PartitionRules", "constrain", "named_shardings", "partition_specs", "path_str", "shard_state",
]
