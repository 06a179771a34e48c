"""Mesh parsing and construction, partition-rule coverage, and the errors for meshes that cannot work."""
import jax
import jax.numpy as jnp
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
