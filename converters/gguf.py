"""GGUF file -> Hugging Face safetensors directory: ``python -m converters gguf-to-hf SRC.gguf DST``.

transformers' GGUF loader (the ``gguf`` package; ``pip install 'jaxrlhf[gguf]'``) reads the file's architecture,
tokenizer, chat template and weights, dequantizing quantized tensors (Q4_1, Q8_0, ...) to float32. Such a model
refuses ``save_pretrained`` ("quantized with GGUF, not serializable"), so its weights are copied into a fresh model
of the same class built from the same config without the quantization entry, and that is written as an ordinary
HF directory (safetensors, config.json, generation_config.json, tokenizer with its chat template) that transformers,
vLLM and jaxrlhf's own loader read. The directory replaces DST as a whole (converters/atomic.py).

Note the numbers: a dequantized Q4_1 model equals the quantized one exactly (each weight is the block's scale x
its 4-bit code + the block's minimum), not the original bf16 model the GGUF was quantized from.
"""
from __future__ import annotations

import os

from converters.atomic import replace_dir


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ValueError("reading GGUF files needs the gguf package: pip install 'jaxrlhf[gguf]' "
                         "(or pip install gguf accelerate)") from e


def gguf_to_hf(src: str, dst: str, *, dtype: str | None = None, overwrite: bool = False) -> str:
    """Write the model in the GGUF file ``src`` as an HF directory at ``dst``; returns ``dst``.

    dtype: ``float32`` (default: what the loader dequantizes to), ``bfloat16`` or ``float16``.
    """
    src = os.path.abspath(src)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: no such GGUF file (pass the path of a .gguf file)")
    with open(src, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{src} is not a GGUF file (it does not start with the GGUF magic bytes)")
    _require_gguf()
    import torch
    import transformers

    folder, name = os.path.split(src)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config.__class__.from_dict(
        {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"})
    if dtype is not None:
        config.dtype = dtype
    with torch.device("meta"):
        model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.generation_config = quantized.generation_config
    if config.tie_word_embeddings:
        model.tie_weights()
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    del quantized
    with replace_dir(dst, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return os.path.abspath(dst)
