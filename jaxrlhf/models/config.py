"""Model configuration read from a Hugging Face ``config.json`` (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, and the
mixture-of-experts Mixtral and Qwen3-MoE)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

# model_type -> what differs inside the shared Llama-family decoder.
#   qkv_bias: q/k/v projections carry a bias regardless of config (Qwen2);
#   qk_norm:  RMSNorm over head_dim on q and k before RoPE (Qwen3).
FAMILIES: dict[str, dict[str, bool]] = {
    "llama": {"qkv_bias": False, "qk_norm": False},
    "mistral": {"qkv_bias": False, "qk_norm": False},
    "qwen2": {"qkv_bias": True, "qk_norm": False},
    "qwen3": {"qkv_bias": False, "qk_norm": True},
    "mixtral": {"qkv_bias": False, "qk_norm": False},
    "qwen3_moe": {"qkv_bias": False, "qk_norm": True},
}
# Mixture-of-experts families: the sparse layers' MLP is a routed set of experts (models/moe.py).
MOE_TYPES = ("mixtral", "qwen3_moe")
# Router settings of other MoE families that this router does not implement (a config that sets one is refused
# rather than silently routed differently): key -> the only accepted value(s).
ROUTER_FIXED = {"scoring_func": ("softmax",), "topk_method": ("greedy",), "router_jitter_noise": (0, 0.0),
                "n_group": (None, 1), "routed_scaling_factor": (None, 1, 1.0), "n_shared_experts": (None, 0)}
ROPE_TYPES = ("default", "llama3", "linear")
REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the Flax decoder needs, plus the original HF config dict for export."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q, k, v projections
    o_bias: bool = False  # bias on the output projection (Llama attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False
    # per-layer sliding attention window (None = full attention)
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # mixture of experts (0 experts: dense). moe_layers[i]: layer i routes over the experts (else a dense MLP of
    # intermediate_size); each expert is a SwiGLU MLP of moe_intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1 (Mixtral: always)
    moe_layers: tuple[bool, ...] = ()
    router_aux_loss_coef: float = 0.0  # the checkpoint's own coefficient (informational; --aux_loss_coef applies)
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    @property
    def num_params(self) -> int:
        return self.param_counts()["total"]

    def param_counts(self) -> dict[str, int]:
        """Parameter counts: ``total``, ``experts`` (routed expert weights, all experts of all sparse layers) and
        ``active`` (what one token's forward uses: everything but the experts it is not routed to)."""
        d, f, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        sparse = sum(self.moe_layers)
        expert = 3 * d * self.moe_intermediate_size
        norms = 2 * d + (2 * self.head_dim if self.qk_norm else 0)
        biases = (self.head_dim * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0) + \
            (d if self.o_bias else 0)
        base = v * d * (1 if self.tie_word_embeddings else 2) + L * (attn + norms + biases) + d
        base += (L - sparse) * (3 * d * f + (2 * f + d if self.mlp_bias else 0)) + sparse * d * self.num_experts
        experts = sparse * self.num_experts * expert
        return {"total": base + experts, "experts": experts,
                "active": base + sparse * self.num_experts_per_tok * expert}

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"unsupported model_type {model_type!r}: jaxrlhf supports {', '.join(sorted(FAMILIES))} "
                "(Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, Mixtral, Qwen3-MoE)"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{model_type}: hidden_act {act!r} is not supported (only 'silu')")
        fam = FAMILIES[model_type]
        for key in REQUIRED_INTS:
            if key not in hf:
                raise KeyError(key)
            if not isinstance(hf[key], int) or isinstance(hf[key], bool) or hf[key] < 1:
                raise ValueError(f"{key!r} must be a positive integer, got {hf[key]!r}")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope = {**legacy, **rope}
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{model_type}: rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        L = hf["num_hidden_layers"]
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=L,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_positions=int(rope.get("original_max_position_embeddings", 8192)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=fam["qkv_bias"] or bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=fam["qk_norm"],
            sliding_windows=_sliding_windows(model_type, hf, L),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            **(_moe_fields(model_type, hf, L) if model_type in MOE_TYPES else {}),
            hf_config=dict(hf),
        )

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"model directory {path} does not exist (resolved to {os.path.abspath(path)}): "
                                    "pass a local Hugging Face model directory or converted checkpoint")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path} has no config.json: point at a Hugging Face model directory")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                hf = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e}): fix the file or re-save the model with "
                             "transformers' save_pretrained") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{cfg_path} holds a JSON {type(hf).__name__}, not an object of config keys")
        try:
            return cls.from_hf_dict(hf)
        except KeyError as e:
            raise ValueError(f"{cfg_path} has no {e.args[0]!r} key, which a {hf.get('model_type')} config needs: "
                             "add it, or re-save the model with transformers' save_pretrained") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{cfg_path}: {e}") from None

    def inv_freq(self):
        """RoPE inverse frequencies ``theta^(-2i/d)``, with llama3 / linear scaling applied (NumPy, float64)."""
        import numpy as np

        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        if self.rope_type == "linear":
            inv = inv / self.rope_factor
        elif self.rope_type == "llama3":
            # Llama 3.1 scaling: long wavelengths are divided by `factor`, short ones kept, smooth in between.
            old = self.rope_original_max_positions
            low_wl = old / self.rope_low_freq_factor
            high_wl = old / self.rope_high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wl, inv / self.rope_factor, inv)
            smooth = (old / wavelen - self.rope_low_freq_factor) / (
                self.rope_high_freq_factor - self.rope_low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.rope_factor + smooth * scaled
            medium = (wavelen >= high_wl) & (wavelen <= low_wl)
            inv = np.where(medium, smoothed, scaled)
        return inv


def _moe_fields(model_type: str, hf: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The MoE fields of a ``mixtral`` / ``qwen3_moe`` config, checked."""
    experts = hf.get("num_local_experts", hf.get("num_experts"))  # Mixtral's name; Qwen3-MoE's (saved as both)
    top_k = hf.get("num_experts_per_tok")
    for key, value in (("num_local_experts / num_experts", experts), ("num_experts_per_tok", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{model_type}: {key} must be a positive integer, got {value!r}")
    if top_k > experts:
        raise ValueError(f"{model_type}: num_experts_per_tok {top_k} exceeds the {experts} experts")
    for key, allowed in ROUTER_FIXED.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"{model_type}: router option {key}={hf[key]!r} is not supported (jaxrlhf routes by "
                             f"softmax then greedy top-k; accepted: {allowed}): remove it from config.json")
    if model_type == "mixtral":  # every layer sparse; experts are intermediate_size wide; weights renormalised
        return {"num_experts": experts, "num_experts_per_tok": top_k, "moe_intermediate_size": hf["intermediate_size"],
                "norm_topk_prob": True, "moe_layers": (True,) * num_layers,
                "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.0))}
    step = hf.get("decoder_sparse_step", 1)
    only_dense = hf.get("mlp_only_layers") or []
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"{model_type}: decoder_sparse_step must be a positive integer, got {step!r}")
    if not isinstance(hf.get("norm_topk_prob", False), bool):
        raise ValueError(f"{model_type}: norm_topk_prob must be true or false, got {hf['norm_topk_prob']!r}")
    moe_ff = hf.get("moe_intermediate_size")
    if not isinstance(moe_ff, int) or moe_ff < 1:
        raise ValueError(f"{model_type}: moe_intermediate_size must be a positive integer, got {moe_ff!r}")
    return {"num_experts": experts, "num_experts_per_tok": top_k, "moe_intermediate_size": moe_ff,
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
            "moe_layers": tuple(i not in only_dense and (i + 1) % step == 0 for i in range(num_layers)),
            "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.0))}


def _sliding_windows(model_type: str, hf: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if model_type in ("mistral", "mixtral"):
        return (window,) * num_layers
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if hf.get("use_sliding_window") and window:
        first_full = hf.get("max_window_layers", num_layers)
        return tuple(window if i >= first_full else None for i in range(num_layers))
    return (None,) * num_layers
