"""Shared pieces of the RM / DPO / KTO tests: a tiny model + character tokenizer, synthetic preference data, and
reference log-probs / scores computed with the transformers (PyTorch) models one unpadded sequence at a time."""
from __future__ import annotations

import json

import numpy as np
import torch
import transformers

from tests.tiny import save_tiny

A, B = "abcde", "vwxyz"  # two letter sets
CHARS = list(A + B + ":")


def tiny_model(path, *, kind: str = "lm", seed: int = 0):
    """A random 2-layer Llama (vocab 32) with the character tokenizer saved beside it; returns the path as str."""
    from jaxrlhf.data.tokenizer import build_tiny_tokenizer

    save_tiny("llama3", path, kind=kind, seed=seed, vocab_size=32, max_position_embeddings=64)
    build_tiny_tokenizer(str(path), CHARS)
    return str(path)


def word(rng, letters: str, lo: int = 2, hi: int = 6) -> str:
    return "".join(rng.choice(list(letters), int(rng.integers(lo, hi))))


def set_preference_rows(n: int, seed: int):
    """Pairs whose preference only a model that reads both prompt and response can learn: the prompt is a word of
    one letter set, the chosen response a word of the same set, the rejected one of the other set. Either set is
    chosen half of the time, so chosen and rejected responses look alike on their own (chance at init)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        same, other = (A, B) if rng.random() < 0.5 else (B, A)
        rows.append({"prompt": word(rng, same) + ":", "chosen": word(rng, same), "rejected": word(rng, other)})
    return rows


def fixed_preference_rows(n: int, seed: int):
    """Pairs with one fixed preference: set A responses over set B responses (DPO / KTO can raise its margin)."""
    rng = np.random.default_rng(seed)
    return [{"prompt": word(rng, A + B) + ":", "chosen": word(rng, A), "rejected": word(rng, B), "margin":
             float(rng.integers(0, 3))} for _ in range(n)]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------- references


def torch_logits(model: transformers.PreTrainedModel, ids) -> np.ndarray:
    """float64 logits [T, V] of one unpadded sequence."""
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].double().numpy()


def response_logprob(model, ids, prompt_len: int) -> tuple[float, float]:
    """(sum, mean) of log p(token t | tokens < t) over t = max(prompt_len, 1) .. T-1, by a plain loop (float64)."""
    z = torch_logits(model, ids)
    total, count = 0.0, 0
    for t in range(max(prompt_len, 1), len(ids)):
        row = z[t - 1]
        m = row.max()
        total += float(row[ids[t]] - m - np.log(np.exp(row - m).sum()))
        count += 1
    return total, total / max(count, 1)


def torch_score(model: transformers.PreTrainedModel, ids) -> float:
    """A sequence classifier's score of one unpadded sequence (its last token)."""
    with torch.no_grad():
        return float(model(torch.tensor([list(ids)])).logits[0, 0])


def unpad(ids_row, mask_row) -> list[int]:
    return [int(t) for t, m in zip(ids_row, mask_row) if m]


def log_sigmoid(x: float) -> float:
    return -float(np.logaddexp(0.0, -x))
