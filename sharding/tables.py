"""Partition rule tables, one per architecture (first match wins; see rules.py).

Llama family layout (kernels are [in, out]): column-parallel projections (q/k/v, gate/up, lm_head) split their
input dim over ``fsdp`` and their output dim over ``tensor``; row-parallel ones (o, down) the other way round, so
a layer needs one all-reduce over ``tensor`` after attention and one after the MLP. The embedding splits the vocab
over ``tensor`` and hidden over ``fsdp``. Norm scales and small biases are replicated on purpose (listed rules,
not a fallback).

Mixture-of-experts families (Mixtral, Qwen3-MoE) add rules for the stacked experts (``[E, in, out]``: E over the
``expert`` axis, the matrix like the dense MLP's) and the router, ahead of the Llama-family rules.
"""
from jax.sharding import PartitionSpec as P

from sharding.rules import PartitionRules

LLAMA_FAMILY = PartitionRules(
    "llama-family",
    (
        (r"embed_tokens/embedding$", P("tensor", "fsdp")),
        (r"self_attn/(q|k|v)_proj/kernel$", P("fsdp", "tensor")),
        (r"self_attn/(q|k|v)_proj/bias$", P("tensor")),
        (r"self_attn/o_proj/kernel$", P("tensor", "fsdp")),
        (r"self_attn/o_proj/bias$", P()),
        (r"self_attn/(q|k)_norm/scale$", P()),
        (r"mlp/(gate|up)_proj/kernel$", P("fsdp", "tensor")),
        (r"mlp/(gate|up)_proj/bias$", P("tensor")),
        (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),
        (r"mlp/down_proj/bias$", P()),
        (r"(input_layernorm|post_attention_layernorm|model/norm)/scale$", P()),
        (r"^lm_head/kernel$", P("fsdp", "tensor")),
        (r"^score/kernel$", P("fsdp", None)),
        # LoRA adapters (models/lora.py): A [in, r], B [r, out]. The rank axis is replicated; the other axis is split
        # over the base kernel's axis for that dim (column-parallel: in over fsdp, out over tensor; row-parallel the
        # other way round) and then over the remaining axis too, so adapters, their gradients and Adam state are
        # spread over every device (ZeRO-3) instead of replicated over the axis the base splits the other dim over.
        (r"(self_attn/(q|k|v)_proj|mlp/(gate|up)_proj)/lora_a$", P(("fsdp", "tensor"), None)),
        (r"(self_attn/(q|k|v)_proj|mlp/(gate|up)_proj)/lora_b$", P(None, ("tensor", "fsdp"))),
        (r"(self_attn/o_proj|mlp/down_proj)/lora_a$", P(("tensor", "fsdp"), None)),
        (r"(self_attn/o_proj|mlp/down_proj)/lora_b$", P(None, ("fsdp", "tensor"))),
        # QLoRA's NF4 base (models/nf4.py): codes [in/2, out] split like the kernel; block scales [in/64, out] keep
        # the block axis whole (few blocks) and split out over both axes, like the adapters' B.
        (r"(self_attn/(q|k|v)_proj|mlp/(gate|up)_proj)/kernel_nf4$", P("fsdp", "tensor")),
        (r"(self_attn/(q|k|v)_proj|mlp/(gate|up)_proj)/kernel_absmax$", P(None, ("tensor", "fsdp"))),
        (r"(self_attn/o_proj|mlp/down_proj)/kernel_nf4$", P("tensor", "fsdp")),
        (r"(self_attn/o_proj|mlp/down_proj)/kernel_absmax$", P(None, ("fsdp", "tensor"))),
        # double-quantized scales: the int8 scales above, their fp32 block absmax (1/256 of them) and offset
        (r"(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel_absmax_(scale|offset)$", P()),
    ),
)

# Mixture-of-experts layers (models/moe.py), first: stacked experts [E, in, out] split E over ``expert`` and the
# matrix like the dense MLP (gate/up column-parallel, down row-parallel); the router [D, E] is small: replicated.
MOE_RULES = (
    (r"mlp/experts/(gate|up)_proj$", P("expert", "fsdp", "tensor")),
    (r"mlp/experts/down_proj$", P("expert", "tensor", "fsdp")),
    (r"mlp/gate/kernel$", P()),
)
MOE_FAMILY = PartitionRules("moe-family", MOE_RULES + LLAMA_FAMILY.rules)

# model_type -> rule table.
RULES_BY_MODEL_TYPE = {**{t: LLAMA_FAMILY for t in ("llama", "mistral", "qwen2", "qwen3")},
                       **{t: MOE_FAMILY for t in ("mixtral", "qwen3_moe")}}
