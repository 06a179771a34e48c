"""Tiny random Hugging Face models of every supported family, saved as real safetensors directories."""
from __future__ import annotations

import numpy as np
import torch
import transformers

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name -> (config class, model_type-specific overrides); covers every feature the decoder claims.
FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, rope_theta=500000.0)),
    "llama3.2-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "llama2-bias": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
    "mistral-window": (transformers.MistralConfig, dict(sliding_window=4, head_dim=16)),
    "qwen2": (transformers.Qwen2Config, dict()),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32)),
}

# Mixture-of-experts families (kept out of FAMILIES: tests/test_moe.py covers them). 4 experts, top-2; Qwen3-MoE with
# a dense first layer (mlp_only_layers) and renormalised top-k weights.
MOE_FAMILIES = {
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                                    decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True,
                                                    head_dim=32)),
}


def hf_config(family: str, **overrides):
    cls, extra = {**FAMILIES, **MOE_FAMILIES}[family]
    return cls(**{**COMMON, **extra, **overrides})


def save_tiny(family: str, path, *, kind: str = "lm", dtype=torch.float32, seed: int = 0, **overrides):
    """Build a random HF model (``kind`` lm or score) and ``save_pretrained`` it; returns the torch model."""
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    if kind == "score":
        cfg.num_labels = 1
        model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    # Random init has tiny norms/biases; perturb everything so every tensor matters in the parity checks.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.to(dtype).eval()
    model.save_pretrained(str(path))
    return model


def left_padded_batch(batch: int = 4, length: int = 12, vocab: int = 96, seed: int = 0):
    """Token ids (pads = 0, real tokens >= 3) and a left-padded mask with ragged lengths."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for b in range(batch):
        mask[b, : rng.randint(0, length // 2 + 1) if b else 0] = 0
    ids = ids * mask
    return ids, mask


def positions(mask):
    return np.maximum(mask.cumsum(-1) - 1, 0)


# ---------------------------------------------------------------------------------------------------------------------
# The addition task of the demo on a tiny model (trainer tests)
# ---------------------------------------------------------------------------------------------------------------------
def char_model(path, family: str = "llama3", **overrides) -> None:
    """A tiny random ``family`` model (vocab 32, 64 positions) with the demo's character tokenizer at ``path``."""
    from jaxrlhf.data.tokenizer import build_tiny_tokenizer
    from jaxrlhf.demo import CHARS

    save_tiny(family, path, vocab_size=32, max_position_embeddings=64, **overrides)
    build_tiny_tokenizer(str(path), CHARS)


def write_additions(path, n: int = 10) -> None:
    """SFT rows ``{"input": "a+b=", "output": "a+b"}`` for single digits a, b < ``n`` (JSON lines)."""
    import json

    rows = [{"input": f"{a}+{b}=", "output": str(a + b)} for a in range(n) for b in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_addition_prompts(path, n: int = 4) -> None:
    """PPO prompts ``{"question": "a+b=", "answer": "a+b"}`` for a, b < ``n`` (JSON lines; the demo's verifier)."""
    import json

    path.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(n) for b in range(n)))
