"""Mesh parsing and construction, partition-rule coverage, and the errors for meshes that cannot work."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from converters.hf import abstract_model
from jaxrlhf.models import ModelConfig
from sharding import MeshSpec, PartitionRules, make_mesh, parse_mesh, partition_specs, shard_state
from sharding.tables import LLAMA_FAMILY
from tests.tiny import FAMILIES, hf_config


@pytest.mark.parametrize("text, want", [
    ("8", MeshSpec(fsdp=8)), ("4x2", MeshSpec(fsdp=4, tensor=2)), ("2x2x2", MeshSpec(2, 2, 2)),
    ("data=2,fsdp=2,tensor=2", MeshSpec(2, 2, 2)), ("tensor=8", MeshSpec(tensor=8)), (" 1X8 ", MeshSpec(1, 1, 8)),
    ("1x2x2x2", MeshSpec(fsdp=2, expert=2, tensor=2)), ("data=1,fsdp=2,expert=2,tensor=2", MeshSpec(1, 2, 2, 2)),
    ("expert=8", MeshSpec(expert=8)),
])
def test_parse_mesh(text, want):
    assert parse_mesh(text) == want


@pytest.mark.parametrize("text, msg", [
    ("4x2x1x1x1", "not understood"), ("4*2", "not understood"), ("0x8", ">= 1"),
    ("pipe=2", "unknown axis 'pipe'"), ("fsdp=2,fsdp=4", "given twice"),
])
def test_parse_mesh_errors(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_mesh(text)


def test_make_mesh_axes_and_errors():
    mesh = make_mesh("4x2")
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    assert str(parse_mesh("1x2x2x2")) == "1x2x2x2" and str(parse_mesh("2x2x2")) == "2x2x2"
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="mesh 4x3 needs 12 devices, 8 available: pick a mesh whose product is 8"):
        make_mesh("4x3")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("head", ["lm", "score"])
def test_every_parameter_has_a_rule(family, head):
    cfg = ModelConfig.from_hf_dict(hf_config(family).to_dict())
    for mesh_text in ("4x2", "8x1", "1x8", "2x2x2"):
        mesh = make_mesh(mesh_text)
        _, abstract = abstract_model(cfg, head=head, dtype=jnp.float32, mesh=mesh)
        specs = jax.tree_util.tree_leaves(partition_specs(abstract, LLAMA_FAMILY, mesh),
                                          is_leaf=lambda x: isinstance(x, P))
        assert specs and all(isinstance(s, P) for s in specs)


def test_unmatched_parameter_raises():
    rules = PartitionRules("partial", tuple(r for r in LLAMA_FAMILY.rules if "mlp" not in r[0]))
    state = {"model": {"layers": {0: {"mlp": {"up_proj": {"kernel": jnp.zeros((4, 8))}}}}}}
    with pytest.raises(ValueError, match=r"no partition rule of 'partial' matches parameter "
                                         r"'model/layers/0/mlp/up_proj/kernel'"):
        partition_specs(state, rules)


def test_indivisible_dimension_names_parameter_and_axis():
    state = {"model": {"layers": {0: {"mlp": {"up_proj": {"kernel": jnp.zeros((6, 8))}}}}}}
    with pytest.raises(ValueError, match=r"'model/layers/0/mlp/up_proj/kernel' dimension 0 \(size 6\) cannot be "
                                         r"split 4 ways over mesh axis fsdp"):
        shard_state(state, LLAMA_FAMILY, make_mesh("4x2"))


def test_shard_state_places_shards():
    mesh = make_mesh("2x2x2")
    state = {"model": {"layers": {0: {"mlp": {"down_proj": {"kernel": jnp.arange(64.0).reshape(8, 8)}}}}}}
    out = shard_state(state, LLAMA_FAMILY, mesh)
    k = out["model"]["layers"][0]["mlp"]["down_proj"]["kernel"]
    assert k.sharding.spec == P("tensor", "fsdp")
    assert k.addressable_shards[0].data.shape == (4, 4)  # replicated over `data`
    assert (jnp.asarray(k) == state["model"]["layers"][0]["mlp"]["down_proj"]["kernel"]).all()


# 30 rounds of 8 independent sharded matmuls (all-gathers inside), dispatched without waiting: many programs in
# flight on 8 host devices. XLA aborts a collective whose participants have not all arrived after the terminate
# timeout (40 s by default; 10 s here so that a deadlock fails fast).
_MANY_PROGRAMS = r"""
import os
os.environ["XLA_FLAGS"] = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=5 "
                           "--xla_cpu_collective_call_terminate_timeout_seconds=10")
from sharding import make_mesh, use_host_devices
use_host_devices("4x2")
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = make_mesh("4x2")
spec = NamedSharding(mesh, P("fsdp", "tensor"))
f = jax.jit(lambda x, w: jnp.tanh(jnp.tanh(x @ w) @ w).sum())
xs = [jax.device_put(np.full((512, 512), i / 512, np.float32), spec) for i in range(8)]
w = jax.device_put(np.eye(512, dtype=np.float32), NamedSharding(mesh, P("tensor", "fsdp")))
outs = [f(x, w) for _ in range(30) for x in xs]
print("pool", os.environ.get("PJRT_NPROC"), "sum", float(sum(jax.block_until_ready(outs))))
"""


def _run_many_programs(pool: str | None):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC", "NPROC")}
    if pool is not None:
        env["PJRT_NPROC"] = pool
    return subprocess.run([sys.executable, "-c", _MANY_PROGRAMS], capture_output=True, text=True, timeout=300,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_host_devices_survive_many_programs_in_flight():
    """use_host_devices sizes XLA:CPU's pool (4 threads a device) so that collectives of programs in flight
    together cannot hold every thread (sharding.mesh._size_host_thread_pool; the CI run it mends aborted)."""
    proc = _run_many_programs(pool=None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, pool, _, total = proc.stdout.split()
    assert pool == str(max(os.cpu_count(), 4 * 8))
    want = 30 * sum(512 * 512 * np.tanh(np.tanh(np.float32(i / 512))) for i in range(8))  # w = I: tanh(tanh(x))
    assert float(total) == pytest.approx(want, rel=1e-4)


@pytest.mark.slow
def test_host_device_pool_of_one_thread_a_device_deadlocks():
    """The control: XLA's default pool (max(cores, devices) = 8 threads here) deadlocks on the same programs and XLA
    aborts the process. If this starts passing, a newer XLA has fixed it and _size_host_thread_pool can go."""
    proc = _run_many_programs(pool="8")
    assert proc.returncode == -6 and "Termination timeout" in proc.stderr, (proc.returncode, proc.stderr[-2000:])
