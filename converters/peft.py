"""PEFT LoRA adapter directories <-> jaxrlhf adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

Tensor names come from the architecture's one mapping table (converters/tables.py) under PEFT's
``base_model.model.`` prefix: ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` is ``[r, in]``
(our ``lora_a`` ``[in, r]`` transposed), ``lora_B.weight`` ``[out, r]``. Only plain LoRA is read: no DoRA, no
rsLoRA, no bias adapters, no per-module ranks.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from converters.atomic import replace_dir
from converters.hf import _to_host_hf, _write_json, flat_params
from converters.safetensors_io import SafetensorsDir, write_file
from converters.tables import PEFT_PREFIX, flax_path, hf_name, table_for
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.lora import LoraSpec, is_adapter, parse_targets
from sharding import path_str

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_config(spec: LoraSpec, *, base_model: str | None, dropout: float = 0.0) -> dict:
    """PEFT's ``LoraConfig`` fields for ``spec`` (the keys PEFT needs; it fills in the rest)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": dropout, "target_modules": list(spec.targets),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}


def save_adapter(params: dict, cfg: ModelConfig, spec: LoraSpec, dst: str, *, base_model: str | None = None,
                 dropout: float = 0.0, overwrite: bool = True) -> str | None:
    """Write the adapters of ``params`` as a PEFT adapter directory ``dst`` (replaced atomically), fp32.

    Call it on every process (an adapter sharded across hosts is gathered: a collective); process 0 writes and
    returns ``dst``, the others return None."""
    table = table_for(cfg.model_type)
    host = {}
    for path, arr in flat_params(params):
        if is_adapter(path):
            name, transpose, _ = hf_name(table, path)
            host[PEFT_PREFIX + name] = _to_host_hf(arr, transpose, np.float32)
    if not host:
        raise ValueError("no LoRA adapters in the parameters: train with --lora_rank or load --lora_path")
    if jax.process_index() != 0:
        return None
    with replace_dir(dst, overwrite=overwrite) as tmp:
        specs = [(n, a.dtype, a.shape) for n, a in host.items()]
        write_file(os.path.join(tmp, WEIGHTS_NAME), specs, host.__getitem__)
        _write_json(os.path.join(tmp, CONFIG_NAME), adapter_config(spec, base_model=base_model, dropout=dropout))
    return dst


def read_spec(path: str) -> LoraSpec:
    """The ``LoraSpec`` of a PEFT adapter directory; what this loader cannot represent is an error naming it."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise ValueError(f"--lora_path {path}: no {CONFIG_NAME} (a PEFT LoRA adapter directory holds {CONFIG_NAME} "
                         f"and {WEIGHTS_NAME})")
    with open(file) as f:
        c = json.load(f)
    if c.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"--lora_path {path}: peft_type {c.get('peft_type')!r}; only LORA adapters load")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if c.get(key, ok) != ok:
            raise ValueError(f"--lora_path {path}: {key}={c[key]!r} is not supported (plain LoRA only: {key}={ok!r})")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if c.get(key):
            raise ValueError(f"--lora_path {path}: {key} is not supported (one rank and alpha for every module)")
    targets = c.get("target_modules")
    if not isinstance(targets, (list, str)) or (isinstance(targets, str) and targets != "all-linear"):
        raise ValueError(f"--lora_path {path}: target_modules {targets!r} must be a list of module names")
    if isinstance(targets, list):  # PEFT may write full module paths (all-linear expanded): keep the module names;
        targets = sorted({t.rsplit(".", 1)[-1] for t in targets})  # an adapter on some layers only fails in load
    return LoraSpec(rank=int(c["r"]), alpha=float(c["lora_alpha"]), targets=parse_targets(targets))


def load_adapter(params: dict, cfg: ModelConfig, path: str) -> dict:
    """``params`` (with fresh adapters of ``read_spec(path)``'s shape attached) with the adapter tensors of ``path``
    put in place, each on its parameter's sharding. Missing, unexpected or mis-shaped tensors are errors."""
    table = table_for(cfg.model_type)
    src = SafetensorsDir(path)
    wanted = {p: a for p, a in flat_params(params) if is_adapter(p)}
    found = {}
    for name in src.tensors:
        mapped = flax_path(table, name[len(PEFT_PREFIX):]) if name.startswith(PEFT_PREFIX) else None
        if mapped is None or mapped[0] not in wanted:
            raise ValueError(f"{path}: tensor {name!r} matches no LoRA adapter of this model (--target_modules or "
                             "the architecture differ)")
        found[mapped[0]] = (name, mapped[1])
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ValueError(f"{path}: {len(missing)} adapter tensor(s) missing, e.g. for {missing[0]}")
    out = {}
    for p, like in wanted.items():
        name, transpose = found[p]
        host = src.read(name)
        host = host.T if transpose else host
        if tuple(host.shape) != tuple(like.shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {src.tensors[name].shape}, the adapter config "
                             f"implies {tuple(reversed(like.shape)) if transpose else tuple(like.shape)}")
        out[p] = jax.device_put(np.asarray(host, like.dtype), like.sharding)
    return jax.tree_util.tree_map_with_path(lambda kp, leaf: out.get(path_str(kp), leaf), params)
