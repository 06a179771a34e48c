"""Data layer: tokenizers, dataset sources and blending, prompt, SFT and preference datasets, packing, padding and
batch order.

    from jaxrlhf.data import load_tokenizer, blend, PromptDataset, SFTDataset, PairedDataset, BatchIterator

Submodules: tokenizer (load_tokenizer, build_tiny_tokenizer), sources (load_records, blend, holdout_split), prompts
(PromptDataset), sft (SFTDataset), preference (PairedDataset, UnpairedDataset), packing (PackedDataset), loader
(left_pad, right_pad, BatchIterator). `loader` needs only NumPy; the names from the other submodules are imported on
first use so that `jaxrlhf.data.loader` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

from jaxrlhf.data.loader import BatchIterator, left_pad, right_pad

_LAZY = {
    "build_tiny_tokenizer": "jaxrlhf.data.tokenizer",
    "load_tokenizer": "jaxrlhf.data.tokenizer",
    "DEFAULT_CHARS": "jaxrlhf.data.tokenizer",
    "DEFAULT_CHAT_TEMPLATE": "jaxrlhf.data.tokenizer",
    "load_records": "jaxrlhf.data.sources",
    "blend": "jaxrlhf.data.sources",
    "split_specs": "jaxrlhf.data.sources",
    "parse_probs": "jaxrlhf.data.sources",
    "PromptDataset": "jaxrlhf.data.prompts",
    "PromptItem": "jaxrlhf.data.prompts",
    "truncate_left": "jaxrlhf.data.prompts",
    "holdout_split": "jaxrlhf.data.sources",
    "SFTDataset": "jaxrlhf.data.sft",
    "SFTSample": "jaxrlhf.data.sft",
    "PairedDataset": "jaxrlhf.data.preference",
    "UnpairedDataset": "jaxrlhf.data.preference",
    "Pair": "jaxrlhf.data.preference",
    "Unpaired": "jaxrlhf.data.preference",
    "check_vocab": "jaxrlhf.data.preference",
    "PackedDataset": "jaxrlhf.data.packing",
    "pack_lengths": "jaxrlhf.data.packing",
}

__all__ = ["BatchIterator", "left_pad", "right_pad", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxrlhf.data' has no attribute '{name}'")
