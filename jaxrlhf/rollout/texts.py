"""Generated samples as text rows (what ``batch_inference`` and ``iterative_dpo`` write): any ``Engine`` (the vLLM
pool or the JAX sampler), prompts in, one row per sample out, each traceable to its prompt."""
from __future__ import annotations

from typing import Sequence

from jaxrlhf.rollout.engine import SamplingParams


def sample_rows(engine, tokenizer, prompts: Sequence[str], prompt_ids: Sequence[list[int]],
                indices: Sequence[int], sampling: SamplingParams, labels: Sequence | None = None) -> list[dict]:
    """``len(prompts) * sampling.n`` rows, prompt-major: ``{"prompt_index": indices[i], "sample_index": j,
    "input": prompts[i], "output": decoded response (special tokens skipped), "finish_reason", "num_tokens":
    generated tokens, "label"}`` (the label only where ``labels`` has one). ``indices[i]`` is prompt i's index in the
    dataset."""
    completions = engine.generate([list(p) for p in prompt_ids], sampling)
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    rows, seen = [], {}
    for c, text in zip(completions, texts):
        i = c.prompt_index
        j = seen[i] = seen.get(i, -1) + 1
        row = {"prompt_index": int(indices[i]), "sample_index": j, "input": prompts[i], "output": text,
               "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)}
        if labels is not None and labels[i] is not None:
            row["label"] = labels[i]
        rows.append(row)
    return rows
