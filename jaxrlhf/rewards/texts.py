"""Scores of (prompt text, response text) pairs from every reward source: reward models (model.py, summed) and a
reward function / reward servers (``--remote_rm_url``), for ``batch_inference --eval_task rm`` and the iterative
DPO loop.

Reward models read ``tokens(input) + tokens(output) + [EOS]`` (each text tokenized without special tokens, the EOS
id appended, as a generated sample ends), left-padded to a bucket length, in chunks of ``chunk`` rows (the last
chunk is filled up with copies, so every call has the same batch size). The reward function / servers get
``queries[i] = input[i] + output[i]``, ``prompts[i] = input[i]`` and the labels, in one call.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def score_texts(inputs: Sequence[str], outputs: Sequence[str], labels: Sequence | None = None, *, tokenizer=None,
                reward_models=None, remote_reward=None, chunk: int = 16, normalize: bool = False,
                max_len: int = 4096) -> tuple[np.ndarray, dict]:
    """``(reward [B] float32, extra logs {name: mean})``: the sum of every given source's reward (module
    docstring). ``normalize``: reward models' scores by their configs' mean/std."""
    from jaxrlhf.data.loader import bucket_length, left_pad
    from jaxrlhf.data.preference import with_eos

    B = len(inputs)
    reward = np.zeros(B, np.float32)
    if reward_models is not None:
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        prompt_ids = tokenizer(list(inputs), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(list(outputs), add_special_tokens=False)["input_ids"]
        seqs = [list(p) + with_eos(r, eos) for p, r in zip(prompt_ids, response_ids)]
        longest = max(map(len, seqs), default=1)
        if longest > max_len:
            raise ValueError(f"a prompt + response has {longest} tokens, more than --max_len {max_len}: raise it")
        length = bucket_length(longest, max_len)
        with reward_models.on_device():
            for a in range(0, B, chunk):
                part = seqs[a:a + chunk]
                ids, attn = left_pad(part + [part[-1]] * (chunk - len(part)), pad, length=length)
                reward[a:a + len(part)] = reward_models(ids, attn, normalize=normalize)[:len(part)]
    extra: dict = {}
    if remote_reward is not None:
        labels = list(labels) if labels is not None else [None] * B
        res = remote_reward([p + r for p, r in zip(inputs, outputs)], list(inputs), labels)
        reward = reward + np.asarray(res.rewards, np.float32)
        extra = {k: float(np.nanmean(v)) for k, v in res.extra_logs.items()}
    return reward, extra
