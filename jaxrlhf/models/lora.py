"""LoRA adapters on the decoder's linears (Hu et al. 2021), as ordinary NNX parameters.

A targeted ``Linear`` (kernel ``W`` ``[D, K]``) gets ``lora_a`` ``A`` ``[D, r]`` (Kaiming-uniform, PEFT's default:
``U(-1/sqrt(D), 1/sqrt(D))``) and ``lora_b`` ``B`` ``[r, K]`` (zeros), and computes

    y = x W + (alpha / r) * (x A) B

so a fresh adapter gives exactly the base model. Only ``lora_a`` / ``lora_b`` are trained (``is_trainable``); the
merged weight is ``W + (alpha / r) A B`` (``merge``). Names follow Hugging Face / PEFT (``q_proj`` ... ``down_proj``),
and the adapters' HF/PEFT tensor names come from the one mapping table (converters/tables.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

# PEFT's names of the Llama family's linears, and where each lives in a decoder layer.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
ADAPTER_LEAVES = ("lora_a", "lora_b")
# Names of mixture-of-experts parts (HF / PEFT spellings): the router and the experts are never adapted. On an MoE
# model MLP targets adapt only the dense MLP layers (Qwen3-MoE's mlp_only_layers); the experts stay frozen.
MOE_MODULES = ("gate", "router", "experts", "block_sparse_moe", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt: rank ``r``, ``alpha`` (scale ``alpha / r``), the targeted module names, and the dropout rate
    on the adapters' input while training (PEFT's ``lora_dropout``; off outside a train step)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_targets(target_modules) -> tuple[str, ...]:
    """``all-linear`` or PEFT module names (a list, or one comma-separated string) -> the targeted names, checked.

    A name the decoder does not have is an error naming the modules that exist (``lm_head`` is never adapted, as in
    PEFT's ``all-linear``)."""
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    names = [n.strip() for item in names for n in item.split(",") if n.strip()]
    if names == ["all-linear"]:
        return LINEAR_MODULES
    if not names:
        raise ValueError(f"--target_modules is empty: name some of {', '.join(LINEAR_MODULES)} or all-linear")
    moe = [n for n in names if n in MOE_MODULES]
    if moe:
        raise ValueError(f"--target_modules {', '.join(moe)}: the mixture-of-experts router and experts are not LoRA "
                         f"targets; adapt {', '.join(ATTENTION_MODULES)} (and the dense MLP layers' "
                         f"{', '.join(MLP_MODULES)}), or all-linear")
    unknown = [n for n in names if n not in LINEAR_MODULES]
    if unknown:
        raise ValueError(f"--target_modules {', '.join(unknown)}: no such module in this model; the linear modules "
                         f"are {', '.join(LINEAR_MODULES)} (or all-linear)")
    return tuple(n for n in LINEAR_MODULES if n in names)  # canonical order, no repeats


def targeted_linears(model, targets: tuple[str, ...]):
    """``[(flax path of the Linear, Linear)]`` for every targeted module of every layer, in layer order (an MoE
    layer's MLP is experts, which are not targets: skipped)."""
    out = []
    for i, layer in enumerate(model.model.layers):
        for name in targets:
            group = "self_attn" if name in ATTENTION_MODULES else "mlp"
            if group == "mlp" and layer.sparse:
                continue
            out.append((f"model/layers/{i}/{group}/{name}", getattr(getattr(layer, group), name)))
    return out


def apply_lora(model, spec: LoraSpec, *, seed: int, mesh=None):
    """Attach fresh adapters (A Kaiming-uniform, B zeros; fp32) to ``model``'s targeted linears, in place, and set
    ``model.lora = spec``. With ``mesh`` each adapter is placed by the architecture's partition rules (like its base
    kernel, rank axis replicated). Returns ``model``.
    """
    from sharding.tables import RULES_BY_MODEL_TYPE

    if spec.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {spec.rank}")
    if model.lora is not None:
        raise ValueError("the model already has LoRA adapters")
    rules = RULES_BY_MODEL_TYPE[model.cfg.model_type]
    key = jax.random.key(seed)
    linears = targeted_linears(model, spec.targets)
    if not linears:
        raise ValueError(f"--target_modules {','.join(spec.targets)}: every MLP of this {model.cfg.model_type} model "
                         "is a set of experts, which are not LoRA targets; add attention modules (q_proj,...)")
    for k, (path, lin) in enumerate(linears):
        din, dout = lin.kernel.shape if lin.kernel is not None else (2 * lin.kernel_nf4.shape[0], lin.kernel_nf4.shape[1])
        bound = 1.0 / din**0.5
        a = jax.random.uniform(jax.random.fold_in(key, k), (din, spec.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((spec.rank, dout), jnp.float32)
        if mesh is not None:
            from jax.sharding import NamedSharding

            a = jax.device_put(a, NamedSharding(mesh, rules.spec_for(f"{path}/lora_a")))
            b = jax.device_put(b, NamedSharding(mesh, rules.spec_for(f"{path}/lora_b")))
        lin.lora_a, lin.lora_b = nnx.Param(a), nnx.Param(b)
        lin.lora_scale, lin.lora_dropout = spec.scale, spec.dropout
    model.lora = spec
    return model


def is_adapter(path: str) -> bool:
    """True for an adapter leaf's ``/``-joined parameter path."""
    return path.rsplit("/", 1)[-1] in ADAPTER_LEAVES


def set_dropout_key(model, key) -> None:
    """Turn on adapter dropout for one forward of ``model`` (a model merged inside a train step): each adapted linear
    gets its own key ``fold_in(key, k)`` and drops its adapter input ``x`` with its spec's rate (PEFT:
    ``B A dropout(x)``; the base path ``x W`` is untouched). A model without dropout is left as it is."""
    if model.lora is None or not model.lora.dropout:
        return
    for k, (_, lin) in enumerate(targeted_linears(model, model.lora.targets)):
        lin.lora_key = jax.random.fold_in(key, k)


def adapters_off(params: dict, zero_b: dict) -> dict:
    """``params`` with every ``lora_b`` replaced by the zeros of ``zero_b`` (``{path: zeros}``, made once by
    ``zero_adapters``): the same arrays compute the base model exactly (``W x + s (x A) 0``), so a LoRA policy's
    frozen reference needs no second copy of the base."""
    from sharding import path_str

    return jax.tree_util.tree_map_with_path(lambda kp, x: zero_b.get(path_str(kp), x), params)


def zero_adapters(params: dict) -> dict:
    """``{path: zeros}`` for every ``lora_b`` leaf of ``params``, on the leaf's sharding (see ``adapters_off``)."""
    import numpy as np

    from sharding import path_str

    return {path_str(kp): jax.device_put(np.zeros(x.shape, x.dtype), x.sharding)
            for kp, x in jax.tree_util.tree_flatten_with_path(params)[0] if str(kp[-1].key) == "lora_b"}


def merge(params: dict, scale: float | None) -> dict:
    """The params dict with every adapter folded into its kernel: ``W + scale * A B`` (adapters removed; an NF4
    base kernel is dequantized to fp32 first). ``scale`` None: the adapters are dropped, not added (the base).

    Works on a nested pure dict (``nnx.split(model)[1].to_pure_dict()``); the sum runs on the arrays' devices."""
    def walk(d):
        if not isinstance(d, dict):
            return d
        out = {k: walk(v) for k, v in d.items() if k not in ADAPTER_LEAVES}
        if "kernel_nf4" in d:  # QLoRA: the 4-bit base is dequantized (fp32) first
            from jaxrlhf.models.nf4 import NF4_LEAVES, dequantize_stored

            out["kernel"] = dequantize_stored({n: out.pop(n) for n in NF4_LEAVES if n in out})
        if "lora_a" in d and scale is not None:
            w = out["kernel"]
            delta = (d["lora_a"].astype(jnp.float32) @ d["lora_b"].astype(jnp.float32)) * scale
            out["kernel"] = (w.astype(jnp.float32) + delta).astype(w.dtype)
        return out

    return walk(params)
