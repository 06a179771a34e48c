"""Partition rules: an ordered table of ``regex -> PartitionSpec`` per architecture, applied to parameter paths.

A parameter path is the ``/``-joined key path of the state pytree, e.g. ``model/layers/3/self_attn/q_proj/kernel``.
The first rule whose regex ``re.search``-matches the path gives the spec. A parameter that no rule matches is an
error (never silently replicated), and so is a dimension the mesh cannot divide.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


@dataclass(frozen=True)
class PartitionRules:
    """An architecture's ordered rule table."""

    name: str
    rules: tuple[tuple[str, P], ...]

    def spec_for(self, path: str) -> P:
        for pattern, spec in self.rules:
            if re.search(pattern, path):
                return spec
        raise ValueError(
            f"no partition rule of {self.name!r} matches parameter {path!r}: add a rule for it to the table "
            f"(sharding/rules.py or the architecture's table); parameters are never replicated silently"
        )


def path_str(keypath: Sequence[Any]) -> str:
    """``('model', 'layers', 0, 'kernel')``-like jax key path -> ``'model/layers/0/kernel'``."""
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _check_divisible(path: str, shape: tuple[int, ...], spec: P, mesh) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"partition spec {spec} for {path!r} has more entries than its rank-{len(shape)} shape")
    for dim, axes in enumerate(spec):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        n = 1
        for a in names:
            n *= mesh.shape[a]
        if shape[dim] % n:
            raise ValueError(
                f"parameter {path!r} dimension {dim} (size {shape[dim]}) cannot be split {n} ways over mesh "
                f"axis {'x'.join(names)}: choose a mesh whose {'x'.join(names)} size divides {shape[dim]}"
            )


def partition_specs(state, rules: PartitionRules, mesh=None):
    """Pytree of PartitionSpec matching ``state`` (arrays or ShapeDtypeStructs); checks divisibility if ``mesh``."""

    def one(keypath, leaf):
        path = path_str(keypath)
        spec = rules.spec_for(path)
        if mesh is not None:
            _check_divisible(path, tuple(leaf.shape), spec, mesh)
        return spec

    return jax.tree_util.tree_map_with_path(one, state)


def named_shardings(state, rules: PartitionRules, mesh):
    """Pytree of NamedSharding on ``mesh`` for every leaf of ``state``."""
    specs = partition_specs(state, rules, mesh)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_state(state, rules: PartitionRules, mesh):
    """Place every leaf of ``state`` on ``mesh`` according to ``rules``."""
    return jax.device_put(state, named_shardings(state, rules, mesh))


def constrain(x, mesh, spec: P):
    """``with_sharding_constraint`` on an activation; a no-op when ``mesh`` is None (single device)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
