"""What the RL loop needs from a rollout engine, on every process of the job.

``RolloutClient`` wraps an ``Engine`` (engine.py: the JAX sampler on every process, or the vLLM pool on process 0
only) and gives the loop three calls:

- ``generate(prompt_ids, sampling) -> Rollout``: padded ``[prompt | response]`` rows, the same on every process,
  as long as the batch's longest prompt and response rounded up to a bucket length (few compiled shapes). Rows are built on process 0 and broadcast (``sharding.distributed.from_process0``): an engine
  error there (a vLLM ``TimeoutError``) is raised on process 0 and reported on the others, nobody waits forever.
- ``sync(params) -> metrics``: send the policy's weights (HF names, ``converters.hf.hf_entries``) to the engine;
  every process joins the per-tensor gathers, a failure on process 0 is reported on all of them. It counts its
  syncs and runs ``check`` after the first one or after every one (``sync_check``). A LoRA policy (``lora``) goes
  as merged weights (``lora_sync="merged"``), or (``"adapter"``, the vLLM pool) as its base once, at the first
  sync (the trainer's base: an NF4 base dequantized), then as a PEFT adapter directory per sync that the engines
  load as a new LoRA request (``VLLMPool.load_adapter``).
- ``check(params) -> metrics``: the sync-correctness probe: each engine's greedy continuation of a few probe
  prompts and its log-probs, against the trainer's log-probs of the same tokens (``rollout/sync_check.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np

from jaxrlhf.rollout.engine import Completion, SamplingParams


@dataclass
class Rollout:
    """One batch of generated samples, prompt-major (sample i answers prompt i // n).

    sequences / attention_mask: [B, P + R] int32, the prompt left-padded to P, the response right-padded to R.
    rollout_logp: [B, R] float32, the engine's log-probs of the response tokens (0 on padding).
    truncated: [B] int32, 1 where the engine stopped at max_tokens (finish_reason "length").
    """

    sequences: np.ndarray
    attention_mask: np.ndarray
    rollout_logp: np.ndarray
    truncated: np.ndarray
    prompt_len: int

    @property
    def action_mask(self) -> np.ndarray:
        """[B, R] float32: 1 on generated tokens."""
        return self.attention_mask[:, self.prompt_len:].astype(np.float32)

    def response_ids(self) -> list[list[int]]:
        p = self.prompt_len
        return [row[p:][mask[p:] > 0].tolist() for row, mask in zip(self.sequences, self.attention_mask)]

    def select(self, rows) -> "Rollout":
        """The rollout of ``rows`` (indices or a boolean mask), same padding."""
        return Rollout(self.sequences[rows], self.attention_mask[rows], self.rollout_logp[rows], self.truncated[rows],
                       prompt_len=self.prompt_len)

    @staticmethod
    def concat(parts: Sequence["Rollout"], pad_id: int) -> "Rollout":
        """One rollout of ``parts`` in order, prompts left-padded to the longest P and responses right-padded to the
        longest R among them."""
        P = max(r.prompt_len for r in parts)
        R = max(r.rollout_logp.shape[1] for r in parts)

        def widen(x, left, right, value):
            return np.pad(x, ((0, 0), (left, right)), constant_values=value)

        seqs, masks, logps = [], [], []
        for r in parts:
            left, right = P - r.prompt_len, R - r.rollout_logp.shape[1]
            seqs.append(widen(r.sequences, left, right, pad_id))
            masks.append(widen(r.attention_mask, left, right, 0))
            logps.append(widen(r.rollout_logp, 0, right, 0.0))
        return Rollout(np.concatenate(seqs), np.concatenate(masks), np.concatenate(logps),
                       np.concatenate([r.truncated for r in parts]), prompt_len=P)


def trim_to_buckets(rows: tuple[np.ndarray, ...], prompt_len: int,
                    buckets: Sequence[int] | None) -> tuple[tuple[np.ndarray, ...], int]:
    """``(sequences, attention_mask, rollout_logp, truncated)`` padded to the maximum lengths -> the same rows with
    the prompt columns cut to the bucket of the longest prompt (left padding dropped) and the response columns to
    the bucket of the longest response (``data.loader.bucket_length``), and the new prompt length. Deterministic in
    the rows, so every process trims the same way."""
    from jaxrlhf.data.loader import bucket_length

    seqs, mask, logp, truncated = rows
    response_len = mask.shape[1] - prompt_len
    p = bucket_length(int(mask[:, :prompt_len].sum(1).max(initial=0)), prompt_len, buckets)
    r = bucket_length(int(mask[:, prompt_len:].sum(1).max(initial=0)), response_len, buckets)
    cols = slice(prompt_len - p, prompt_len + r)
    return (seqs[:, cols], mask[:, cols], logp[:, :r], truncated), p


def pad_rows(prompt_rows: list[list[int]], completions: list[Completion], *, pad_id: int, prompt_len: int,
             response_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(sequences, attention_mask, rollout_logp, truncated)`` of ``completions`` (see ``Rollout``)."""
    from jaxrlhf.data.loader import left_pad, right_pad

    p_ids, p_mask = left_pad([prompt_rows[c.prompt_index] for c in completions], pad_id, length=prompt_len)
    r_ids, r_mask = right_pad([c.token_ids for c in completions], pad_id, length=response_len)
    logp = np.zeros((len(completions), response_len), np.float32)
    for i, c in enumerate(completions):
        logp[i, :len(c.logprobs)] = c.logprobs
    truncated = np.array([c.finish_reason == "length" for c in completions], np.int32)
    return np.concatenate([p_ids, r_ids], 1), np.concatenate([p_mask, r_mask], 1), logp, truncated


class RolloutClient:
    """The loop's view of an engine (module docstring).

    engine: the ``Engine`` on this process, or None (processes > 0 of a vLLM pool job).
    collective: the engine runs on every process in lockstep (the JAX sampler): ``generate`` is called everywhere.
    num_engines: engines behind ``engine`` that ``check`` probes (0: no probe, e.g. the JAX sampler).
    model_cfg: the policy's ``ModelConfig`` (names and layout of the synced tensors).
    probe_forward: jitted ``(params, {"sequences", "attention_mask", "action_mask"}) -> (logp, best logp)``, [n, R]
        (temperature 1), run in chunks of ``chunk`` rows; ``probe_prompts``: token lists of the probe prompts.
    length_buckets: ``generate`` pads each batch's prompts and responses to these lengths (``trim_to_buckets``;
        None: the default series), capped at ``prompt_len`` / ``response_len``; ``()``: always the maximum lengths.
    lora / lora_sync: the policy's ``LoraSpec`` (None: no LoRA) and how it is synced, "merged" or "adapter".
    """

    def __init__(self, engine, *, collective: bool, num_engines: int, model_cfg, pad_id: int, prompt_len: int,
                 response_len: int, sync_check: Literal["off", "first", "every"] = "off",
                 probe_prompts: list[list[int]] = (), probe_forward: Callable | None = None, chunk: int = 1,
                 tolerance: float = 0.0, length_buckets: Sequence[int] | None = (), lora=None,
                 lora_sync: str | None = None):
        self.engine, self.collective, self.num_engines = engine, collective, num_engines
        self.model_cfg, self.pad_id = model_cfg, pad_id
        self.prompt_len, self.response_len = prompt_len, response_len
        self.sync_check = sync_check
        self.probe_prompts, self.probe_forward, self.chunk, self.tolerance = (
            list(probe_prompts), probe_forward, chunk, tolerance)
        self.length_buckets = length_buckets
        self.lora, self.lora_sync = lora, lora_sync
        self.num_syncs = 0

    def _rows(self, prompts: list[list[int]], completions: Callable[[], list[Completion]], n_rows: int):
        """Rows from process 0's ``completions()`` on every process (errors propagated)."""
        from sharding.distributed import from_process0

        p, r = self.prompt_len, self.response_len
        like = (((n_rows, p + r), np.int32), ((n_rows, p + r), np.int32), ((n_rows, r), np.float32),
                ((n_rows,), np.int32))
        return from_process0(lambda: pad_rows(prompts, completions(), pad_id=self.pad_id, prompt_len=p,
                                              response_len=r), like)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> Rollout:
        if self.collective:  # every process runs the sampler's (sharded) program: call it everywhere
            done = self.engine.generate(prompt_ids, sampling)
            return self.rollout_of(prompt_ids, lambda: done, sampling.n)
        return self.rollout_of(prompt_ids, lambda: self.engine.generate(prompt_ids, sampling), sampling.n)

    def rollout_of(self, prompt_ids: list[list[int]], completions: Callable[[], list[Completion]], n: int) -> Rollout:
        """The ``Rollout`` of process 0's ``completions()`` (``n`` per prompt), on every process."""
        rows = self._rows(prompt_ids, completions, len(prompt_ids) * n)
        rows, prompt_len = trim_to_buckets(rows, self.prompt_len, self.length_buckets)
        return Rollout(*rows, prompt_len=prompt_len)

    def compile_count(self) -> int:
        """Programs the engine compiled in this process (the JAX sampler: one per batch shape and settings)."""
        return getattr(self.engine, "num_programs", 0)

    def sync(self, params: Any) -> dict:
        """Send ``params`` to the engine; with ``sync_check`` probe the engines after it. Returns metrics."""
        from jaxrlhf.models.lora import merge

        self.num_syncs += 1
        if self.lora is not None and self.lora_sync == "adapter":
            if self.num_syncs == 1:  # the trainer's base once (adapters dropped; an NF4 base dequantized)
                self._send(merge(params, None))
            stats = self._send_adapter(params)
        else:
            stats = self._send(params if self.lora is None else merge(params, self.lora.scale))
        out = {"sync/seconds": stats["seconds"], "sync/GBps": stats["bytes"] / stats["seconds"] / 1e9} if stats \
            else {}
        if stats:
            out["sync/bytes"] = float(stats["bytes"])
        if stats and "write_seconds" in stats:  # the trainer's part of it (the engines' loading is the rest)
            out["sync/write_seconds"] = stats["write_seconds"]
        if self.num_engines and (self.sync_check == "every" or (self.sync_check == "first" and self.num_syncs == 1)):
            out.update(self.check(params))
        return out

    def _send(self, params: Any) -> dict | None:
        """Plain (adapter-free) ``params`` to the engine as HF-named tensors; the engine's stats (process 0)."""
        from converters.hf import hf_entries
        from sharding.distributed import agree

        # A collective engine (the JAX sampler) takes its own shards; the pool (process 0) gets each tensor gathered
        # to an array this process can read, a collective every process joins.
        named = hf_entries(params, self.model_cfg, gather=not self.collective)
        stats, error = None, None
        if self.engine is not None:
            try:
                stats = self.engine.update_weights(named)
            except Exception as e:  # noqa: BLE001 - re-raised by agree() once the others are released
                error = e
        for _ in named:  # the remaining per-tensor gathers every process joins (all of them off process 0)
            pass
        if not self.collective:
            agree(error)
        elif error is not None:
            raise error
        return stats

    def _send_adapter(self, params: Any) -> dict | None:
        """The adapters of ``params`` as a PEFT directory the engines load as the next LoRA version (the pool;
        every process joins the gathers, process 0 writes). Stats: the adapter file's bytes, seconds to write and
        load it."""
        import time

        from converters.peft import WEIGHTS_NAME, save_adapter
        from sharding.distributed import agree

        t0 = time.perf_counter()
        path = self.engine.next_adapter_path() if self.engine is not None else ""
        save_adapter(params, self.model_cfg, self.lora, path)
        written = time.perf_counter()
        stats, error = None, None
        if self.engine is not None:
            try:
                self.engine.load_adapter(path)
                stats = {"bytes": os.path.getsize(os.path.join(path, WEIGHTS_NAME)),
                         "seconds": time.perf_counter() - t0, "write_seconds": written - t0}
            except Exception as e:  # noqa: BLE001 - re-raised by agree() once the others are released
                error = e
        agree(error)
        return stats

    def check(self, params: Any) -> dict:
        """Each engine's greedy answer to the probe prompts vs the trainer's log-probs (``sync_check``)."""
        import jax.numpy as jnp

        from jaxrlhf.rollout.sync_check import check_engines

        greedy = SamplingParams(n=1, temperature=0.0, max_tokens=self.response_len)
        prompts, n_rows = self.probe_prompts, self.num_engines * len(self.probe_prompts)

        def completions() -> list[Completion]:
            flat = [c for comps in self.engine.generate_each(prompts, greedy) for c in comps]
            return flat + flat[:n_rows - len(flat)]  # engines down right now: repeat rows to keep the shapes fixed

        seqs, attn, engine_logp, _ = self._rows(prompts, completions, n_rows)
        pad = -n_rows % self.chunk
        attn = np.concatenate([attn, attn[:1].repeat(pad, 0)])
        batch = {"sequences": np.concatenate([seqs, seqs[:1].repeat(pad, 0)]), "attention_mask": attn,
                 "action_mask": attn[:, self.prompt_len:].astype(np.float32)}
        logp, best = [], []
        for a in range(0, len(batch["sequences"]), self.chunk):
            lp, b = self.probe_forward(params, {k: jnp.asarray(v[a:a + self.chunk]) for k, v in batch.items()})
            logp.append(np.asarray(lp))
            best.append(np.asarray(b))
        return check_engines(engine_logp, np.concatenate(logp)[:n_rows], np.concatenate(best)[:n_rows],
                             attn[:n_rows, self.prompt_len:], np.arange(n_rows) // len(prompts),
                             tol=self.tolerance)
