"""HF <-> Flax tensor mapping tables, one per architecture, used in both directions.

Each row maps an HF tensor-name template to a Flax parameter-path template; ``{i}``-style fields match one name
component and carry over. ``transpose`` says the 2-D layouts differ (HF Linear ``[out, in]``, Flax kernel
``[in, out]``). A ``stacked`` row (mixture-of-experts weights) has an ``{e}`` field in its HF name only: the Flax
parameter ``[E, ...]`` is the stack over ``e = 0..E-1`` of the HF tensors (each transposed when ``transpose``), so
one row serves hub checkpoints' per-expert tensors (also what transformers' ``save_pretrained`` writes and vLLM's
MoE loaders read). Import, export and the rollout weight sync all go through :func:`hf_name` / :func:`flax_path`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorMap:
    hf: str
    flax: str
    transpose: bool
    stacked: bool = False  # HF has one tensor per expert ({e} in hf); Flax one [E, ...] parameter


LLAMA_FAMILY: tuple[TensorMap, ...] = (
    TensorMap("model.embed_tokens.weight", "model/embed_tokens/embedding", False),
    TensorMap("model.layers.{i}.self_attn.{p}_proj.weight", "model/layers/{i}/self_attn/{p}_proj/kernel", True),
    TensorMap("model.layers.{i}.self_attn.{p}_proj.bias", "model/layers/{i}/self_attn/{p}_proj/bias", False),
    TensorMap("model.layers.{i}.self_attn.{p}_norm.weight", "model/layers/{i}/self_attn/{p}_norm/scale", False),
    TensorMap("model.layers.{i}.mlp.{p}_proj.weight", "model/layers/{i}/mlp/{p}_proj/kernel", True),
    TensorMap("model.layers.{i}.mlp.{p}_proj.bias", "model/layers/{i}/mlp/{p}_proj/bias", False),
    TensorMap("model.layers.{i}.{n}_layernorm.weight", "model/layers/{i}/{n}_layernorm/scale", False),
    TensorMap("model.norm.weight", "model/norm/scale", False),
    TensorMap("lm_head.weight", "lm_head/kernel", True),
    # Scalar head of critics / reward models: HF *ForSequenceClassification calls it `score`, OpenRLHF
    # `value_head` (its --value_head_prefix); the prefix is renamed to `score` before lookup.
    TensorMap("score.weight", "score/kernel", True),
    # LoRA adapters (models/lora.py), as PEFT names them under its ``base_model.model.`` prefix (PEFT_PREFIX):
    # lora_A.weight is [r, in] (our lora_a [in, r]), lora_B.weight [out, r] (our lora_b [r, out]).
    TensorMap("model.layers.{i}.{g}.{p}_proj.lora_A.weight", "model/layers/{i}/{g}/{p}_proj/lora_a", True),
    TensorMap("model.layers.{i}.{g}.{p}_proj.lora_B.weight", "model/layers/{i}/{g}/{p}_proj/lora_b", True),
)

# Mixture-of-experts layers: the router (``gate``, [E, D] in HF) and E stacked SwiGLU experts. Mixtral's hub names
# w1 / w3 / w2 are gate / up / down.
MIXTRAL: tuple[TensorMap, ...] = (
    TensorMap("model.layers.{i}.block_sparse_moe.gate.weight", "model/layers/{i}/mlp/gate/kernel", True),
    TensorMap("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", "model/layers/{i}/mlp/experts/gate_proj",
              True, stacked=True),
    TensorMap("model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", "model/layers/{i}/mlp/experts/up_proj",
              True, stacked=True),
    TensorMap("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", "model/layers/{i}/mlp/experts/down_proj",
              True, stacked=True),
) + LLAMA_FAMILY
QWEN3_MOE: tuple[TensorMap, ...] = (
    TensorMap("model.layers.{i}.mlp.gate.weight", "model/layers/{i}/mlp/gate/kernel", True),
    TensorMap("model.layers.{i}.mlp.experts.{e}.{p}_proj.weight", "model/layers/{i}/mlp/experts/{p}_proj", True,
              stacked=True),
) + LLAMA_FAMILY  # + the dense MLP of layers in mlp_only_layers / off decoder_sparse_step

# PEFT's tensor names are the base model's module path under this prefix (adapter_model.safetensors).
PEFT_PREFIX = "base_model.model."

TABLES: dict[str, tuple[TensorMap, ...]] = {**{t: LLAMA_FAMILY for t in ("llama", "mistral", "qwen2", "qwen3")},
                                            "mixtral": MIXTRAL, "qwen3_moe": QWEN3_MOE}

# HF class-name stem per model_type, for the exported config's "architectures".
ARCH_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral",
              "qwen3_moe": "Qwen3Moe"}

# Non-parameter buffers some older checkpoints carry; skipped on import.
IGNORED_HF = (re.compile(r"rotary_emb\.inv_freq$"),)


def _compile(template: str, sep: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()]) + f"(?P<{m.group(1)}>[^{re.escape(sep)}]+)"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]))


_COMPILED: dict[int, list[tuple[re.Pattern, re.Pattern, TensorMap]]] = {}


def _rows(table: tuple[TensorMap, ...]):
    key = id(table)
    if key not in _COMPILED:
        _COMPILED[key] = [(_compile(r.hf, "."), _compile(r.flax, "/"), r) for r in table]
    return _COMPILED[key]


def table_for(model_type: str) -> tuple[TensorMap, ...]:
    if model_type not in TABLES:
        raise ValueError(f"no converter table for model_type {model_type!r}; supported: {', '.join(sorted(TABLES))}")
    return TABLES[model_type]


def flax_path(table, hf: str) -> tuple[str, bool, int | None] | None:
    """HF tensor name -> (Flax path, transpose, expert index: the slice of a stacked parameter, else None), or None
    when no row matches."""
    for hf_re, _, row in _rows(table):
        m = hf_re.fullmatch(hf)
        if m and (not row.stacked or m.group("e").isdigit()):
            fields = m.groupdict()
            expert = int(fields.pop("e")) if row.stacked else None
            return row.flax.format(**fields), row.transpose, expert
    return None


def hf_name(table, path: str) -> tuple[str, bool, bool]:
    """Flax path -> (HF tensor name, transpose, stacked); a path no row maps is an error. For a ``stacked`` row the
    name keeps its ``{e}`` field: ``name.format(e=j)`` names expert ``j``'s tensor (see :func:`expert_names`)."""
    for _, fx_re, row in _rows(table):
        m = fx_re.fullmatch(path)
        if m:
            return row.hf.format(**m.groupdict(), **({"e": "{e}"} if row.stacked else {})), row.transpose, row.stacked
    raise ValueError(f"Flax parameter {path!r} has no HF name in the converter table: add a row to converters/tables.py")


def expert_names(name: str, stacked: bool, num: int) -> list[str]:
    """The HF tensor names behind one Flax parameter: ``[name]``, or expert ``0..num-1``'s for a stacked one."""
    return [name.format(e=j) for j in range(num)] if stacked else [name]
