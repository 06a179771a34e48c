"""Flax NNX models of the Llama family and its mixture-of-experts relatives (Mixtral, Qwen3-MoE), built from Hugging
Face configs."""
from jaxrlhf.models.config import FAMILIES, ModelConfig
from jaxrlhf.models.decoder import Decoder, default_positions, init_cache, last_token_values


def from_pretrained(path: str, *, mesh=None, dtype=None, head: str | None = None,
                    value_head_prefix: str | None = None, remat: bool = False, seed: int = 0,
                    progress: bool = False) -> Decoder:
    """Load an HF checkpoint directory (safetensors) or a converted jaxrlhf checkpoint as a ``Decoder``.

    ``mesh`` shards the parameters by the architecture's partition rules as they are read (no full host copy);
    ``dtype`` (e.g. ``jnp.bfloat16``) casts them, None keeps the checkpoint's dtype; ``head`` "lm" / "score"
    (None: detected); ``value_head_prefix`` names the score tensor ("score" for HF, "value_head" for OpenRLHF).
    """
    # Loading lives in converters/ with the mapping tables; imported here lazily to keep imports one-way.
    from converters.hf import load

    return load(path, mesh=mesh, dtype=dtype, head=head, value_head_prefix=value_head_prefix, remat=remat,
                seed=seed, progress=progress)[0]


__all__ = ["FAMILIES", "ModelConfig", "Decoder", "from_pretrained", "init_cache", "default_positions",
           "last_token_values"]
