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
    """What to adapt: rank ``r``, ``alpha`` (scale ``alpha / r``) and the targeted module names."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

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
        lin.lora_scale = spec.scale
    model.lora = spec
    return model


def is_adapter(path: str) -> bool:
    """True for an adapter leaf's ``/``-joined parameter path."""
    return path.rsplit("/", 1)[-1] in ADAPTER_LEAVES


def merge(params: dict, scale: float) -> dict:
    """The params dict with every adapter folded into its kernel: ``W + scale * A B`` (adapters removed; an NF4
    base kernel is dequantized to fp32 first).

    Works on a nested pure dict (``nnx.split(model)[1].to_pure_dict()``); the sum runs on the arrays' devices."""
    def walk(d):
        if not isinstance(d, dict):
            return d
        out = {k: walk(v) for k, v in d.items() if k not in ADAPTER_LEAVES}
        if "kernel_nf4" in d:  # QLoRA: the 4-bit base is dequantized (fp32) first
            from jaxrlhf.models.nf4 import dequantize

            out["kernel"] = dequantize(out.pop("kernel_nf4"), out.pop("kernel_absmax"))
        if "lora_a" in d:
            w = out["kernel"]
            delta = (d["lora_a"].astype(jnp.float32) @ d["lora_b"].astype(jnp.float32)) * scale
            out["kernel"] = (w.astype(jnp.float32) + delta).astype(w.dtype)
        return out

    return walk(params)
