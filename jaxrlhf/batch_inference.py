"""Batch inference: ``python -m jaxrlhf.batch_inference --eval_task generate|rm [flags]`` (OpenRLHF classic's
``batch_inference.py`` interface and flag names).

``--eval_task generate``: the prompts of ``--dataset`` (``--input_key``, ``--input_template`` or
``--apply_chat_template``, ``--max_samples``; with ``--iter K`` only prompts ``[K R, (K+1) R)`` for
``--rollout_batch_size R``, as OpenRLHF's iterative scripts) -> ``--best_of_n`` samples each on the vLLM pool
(``--vllm_num_engines N``: prompts spread over the engines by load) or the in-process JAX sampler
(``--vllm_num_engines 0``) -> ``--output_path`` JSON lines, one row per sample::

    {"prompt_index": dataset row, "sample_index": j, "input": prompt text, "output": response, "finish_reason",
     "num_tokens": generated tokens, "label": the --label_key field (when given)}

``--eval_task rm``: rows with ``input`` / ``output`` (``--input_key`` / ``--output_key``) scored by reward models
(``--reward_pretrain a,b``: summed), a ``reward.py`` or reward servers (``--remote_rm_url``); each row gets a
``reward`` field, or with ``--post_processor`` (jaxrlhf/data/postprocess.py):

- ``rs``: the best response per prompt -> ``{"input", "output"}`` SFT data (``jaxrlhf.sft`` reads
  it with its default keys);
- ``csft``: every row, its normalised reward written into the prompt through ``--reward_template``;
- ``iter_dpo``: best / worst response per prompt -> ``{"prompt", "chosen", "rejected"}`` (``jaxrlhf.dpo``
  reads it with its default keys); prompts whose best and worst score the same are dropped and counted.

Outputs are written whole (temporary file + rename). Generation is resumable: rows are appended chunk by chunk
(``--chunk_size`` prompts) to ``OUTPUT.progress`` (its first line records the settings); a rerun with the same flags
keeps the complete chunks and generates the rest, with the same per-chunk seeds, so a killed and resumed run
writes what an uninterrupted one would. An existing ``--output_path`` means the work is done: nothing is redone.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

from jaxrlhf.cli import arg, config_to_dict, parse_config
from jaxrlhf.data.postprocess import DEFAULT_REWARD_TEMPLATE
from jaxrlhf.rewards import RewardFlags
from jaxrlhf.rollout.setup import RolloutFlags, check_rollout_flags
from sharding.distributed import DistributedConfig

PROGRESS = ".progress"  # suffix of the resumable generation's working file


@dataclass
class BatchInferenceConfig(DistributedConfig, RolloutFlags, RewardFlags):  # + the engine and sampling flags
    # (rollout/setup.py), the reward flags of --eval_task rm (rewards/)
    eval_task: Literal["generate", "rm"] = arg("generate", "generate samples, or score input/output rows (rm)")
    output_path: str = arg(None, "the JSON-lines file written (atomically)")
    # ---- models
    pretrain: Optional[str] = arg(None, "policy (generate): HF directory or converted checkpoint; rm: the tokenizer "
                                        "for --reward_pretrain (default: the first reward model's)")
    normalize_reward: bool = arg(False, "rm: reward models' scores normalised by their configs' mean/std")
    mesh: str = arg("1x1", "device mesh of the JAX sampler / reward models: FSDPxTENSOR, e.g. 4x2")
    seed: int = arg(42, "seed of the sampling (chunk k of the prompts is sampled with seed + its first row x n)")
    bf16: bool = arg(False, "bf16 compute (JAX sampler, reward models; vLLM: --vllm_dtype auto)")
    # ---- data
    dataset: Optional[str] = arg(None, "input dataset(s), comma-separated: files, type@dir, save_to_disk dirs")
    dataset_probs: Optional[str] = arg(None, "mixing probabilities of --dataset, comma-separated")
    dataset_split: str = arg("train", "split of --dataset")
    input_key: str = arg("input", "prompt field")
    output_key: str = arg("output", "rm: response field")
    label_key: Optional[str] = arg(None, "label field passed to the reward function and kept in the rows (rm: "
                                         "default 'label' when the rows have it)")
    input_template: Optional[str] = arg(None, "template with {} for the input, e.g. 'User: {}\\nAssistant: '")
    apply_chat_template: bool = arg(False, "format inputs with the tokenizer's chat template")
    max_samples: Optional[int] = arg(None, "use at most this many rows of --dataset")
    iter: Optional[int] = arg(None, "generate: only prompts [iter x R, (iter+1) x R) for --rollout_batch_size R")
    rollout_batch_size: int = arg(512, "prompts per --iter")
    # ---- generation
    best_of_n: int = arg(1, "samples per prompt")
    max_new_tokens: int = arg(1024, "most tokens generated per sample")
    prompt_max_len: int = arg(1024, "prompt tokens kept (left-truncated)")
    greedy_sampling: bool = arg(False, "greedy decoding (temperature 0)")
    chunk_size: int = arg(64, "generate: prompts per engine call (the resume granularity); rm: rows per call")
    micro_batch_size: int = arg(16, "rm: rows per reward-model forward")
    max_len: int = arg(4096, "rm: most tokens of input + output")
    # ---- post-processing
    post_processor: Optional[Literal["rs", "csft", "iter_dpo"]] = arg(
        None, "rm: rs (best per prompt, SFT data), csft (reward in the prompt), iter_dpo (best/worst pairs)")
    reward_template: str = arg(DEFAULT_REWARD_TEMPLATE, "csft: the prompt with its score, {input} and {reward}")

    def __post_init__(self):
        super().__post_init__()
        check_rollout_flags(self)
        if not self.output_path:
            raise ValueError("--output_path is required: the JSON-lines file to write")
        for flag in ("best_of_n", "max_new_tokens", "prompt_max_len", "chunk_size", "micro_batch_size",
                     "rollout_batch_size", "max_len"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if self.input_template is not None and "{}" not in self.input_template:
            raise ValueError(f"--input_template {self.input_template!r} has no '{{}}' placeholder for the input")
        if self.post_processor is not None and self.eval_task != "rm":
            raise ValueError("--post_processor applies to scored rows: use it with --eval_task rm")
        if self.post_processor == "csft":
            from jaxrlhf.data.postprocess import check_reward_template

            check_reward_template(self.reward_template)
        if self.iter is not None and self.iter < 0:
            raise ValueError(f"--iter must be >= 0, got {self.iter}")


def sampling_for(cfg: BatchInferenceConfig, first_row: int):
    """The sampling of the chunk whose first prompt is ``first_row`` of the run (a resumed chunk repeats it)."""
    from jaxrlhf.rollout import SamplingParams

    return SamplingParams(n=cfg.best_of_n, temperature=0.0 if cfg.greedy_sampling else cfg.temperature,
                          top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_new_tokens,
                          seed=(cfg.seed + first_row * cfg.best_of_n) % 2**32)


def load_records(cfg: BatchInferenceConfig):
    """``--dataset`` blended (``data.sources.blend``), at most ``--max_samples`` rows; an empty one is an error."""
    from jaxrlhf.data.sources import blend, parse_probs, split_specs

    if not cfg.dataset:
        raise ValueError("--dataset is required: a json/jsonl/parquet file, type@dir or a save_to_disk directory")
    records = blend(split_specs(cfg.dataset), parse_probs(cfg.dataset_probs, flag="--dataset_probs"), seed=cfg.seed,
                    max_samples=cfg.max_samples, split=cfg.dataset_split, flags=("--dataset", "--dataset_probs"))
    if cfg.max_samples is not None and len(records) > cfg.max_samples:
        records = records.select(range(cfg.max_samples))
    if len(records) == 0:
        raise ValueError(f"dataset {cfg.dataset} is empty: it has 0 records")
    return records


class Progress:
    """A one-line progress display on stderr: done / total samples, samples/s over this run, ETA."""

    def __init__(self, what: str, total: int, done: int = 0):
        self.what, self.total, self.start_done, self.done = what, total, done, done
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        rate = (self.done - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = (f"[{self.what}] {self.done}/{self.total} samples ({100 * self.done / max(self.total, 1):.0f}%) | "
                f"{rate:.1f} samples/s | ETA {eta:.0f}s")
        print(("\r" + line) if self.tty else line, end="" if self.tty and self.done < self.total else "\n",
              file=sys.stderr, flush=True)

    def rate(self) -> float:
        return (self.done - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------------


def open_engine(cfg: BatchInferenceConfig, mesh, tokenizer, run: contextlib.ExitStack):
    """The JAX sampler over ``--pretrain``, or the vLLM pool (a converted checkpoint's weights are broadcast to it
    first: its engines start from dummy weights). Closed by ``run``."""
    import jax.numpy as jnp
    from flax import nnx

    from converters.hf import hf_entries, is_flax_checkpoint
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.rollout.setup import make_engine

    model = None
    if not cfg.vllm_num_engines or is_flax_checkpoint(cfg.pretrain):
        model = from_pretrained(cfg.pretrain, mesh=mesh, dtype=jnp.bfloat16 if cfg.bf16 else jnp.float32, head="lm")
    engine = make_engine(cfg, model=model, pretrain=cfg.pretrain, tokenizer=tokenizer, mesh=mesh,
                         prompt_max_len=cfg.prompt_max_len, generate_max_len=cfg.max_new_tokens, bf16=cfg.bf16,
                         seed=cfg.seed, prompt_buckets=None)
    run.callback(engine.close)
    if cfg.vllm_num_engines and model is not None:
        engine.update_weights(hf_entries(nnx.split(model)[1].to_pure_dict(), model.cfg))
    return engine


def settings_fingerprint(cfg: BatchInferenceConfig) -> dict:
    """What a resumed generation must share with the progress file it continues."""
    keys = ("pretrain", "dataset", "dataset_probs", "dataset_split", "input_key", "label_key", "input_template",
            "apply_chat_template", "max_samples", "iter", "rollout_batch_size", "best_of_n", "max_new_tokens",
            "prompt_max_len", "greedy_sampling", "temperature", "top_p", "top_k", "seed", "chunk_size",
            "vllm_num_engines")
    plain = config_to_dict(cfg)
    return {f"--{k}": plain[k] for k in keys}


def complete_chunks(rows: list[dict], chunks: list[list[int]], n: int) -> tuple[list[dict], set[int]]:
    """``(rows of the complete chunks, their chunk numbers)``: a chunk is complete when each of its prompts has its
    ``n`` samples (a run killed mid-chunk leaves an incomplete one, generated again)."""
    have: dict[int, set] = {}
    for r in rows:
        have.setdefault(r["prompt_index"], set()).add(r["sample_index"])
    done = {c for c, idx in enumerate(chunks) if all(len(have.get(i, ())) == n for i in idx)}
    keep = {i for c in done for i in chunks[c]}
    return [r for r in rows if r["prompt_index"] in keep], done


def resume_progress(path: str, fingerprint: dict, chunks: list[list[int]], n: int) -> tuple[list[dict], set[int]]:
    """The rows and chunk numbers already generated into the progress file ``path`` (rewritten to hold exactly
    them); ValueError when it was written with other settings."""
    from jaxrlhf.data.postprocess import read_jsonl_lines, write_jsonl
    from jaxrlhf.train.run import differences

    if not os.path.exists(path):
        write_jsonl(path, [{"progress_of": fingerprint}])
        return [], set()
    lines = read_jsonl_lines(path)
    saved = lines[0].get("progress_of") if lines else None
    if saved != fingerprint:
        raise ValueError(f"{path} holds an unfinished generation with other settings "
                         f"({'; '.join(differences(saved, fingerprint))}): rerun with the same flags to resume it, or "
                         "delete it to start over")
    rows, done = complete_chunks(lines[1:], chunks, n)
    write_jsonl(path, [lines[0], *rows])
    print(f"[generate] resuming: {len(done)} of {len(chunks)} chunks already in {path}", file=sys.stderr)
    return rows, done


def generate(cfg: BatchInferenceConfig) -> dict:
    from jaxrlhf.data.postprocess import write_jsonl
    from jaxrlhf.data.prompts import PromptDataset
    from jaxrlhf.data.tokenizer import load_tokenizer
    from jaxrlhf.rollout.texts import sample_rows
    from jaxrlhf.train.run import start_meshes

    if cfg.pretrain is None:
        raise ValueError("--pretrain is required with --eval_task generate: the policy to sample from")
    tokenizer = load_tokenizer(cfg.pretrain)
    data = PromptDataset(load_records(cfg), tokenizer, input_key=cfg.input_key, label_key=cfg.label_key,
                         apply_chat_template=cfg.apply_chat_template, input_template=cfg.input_template,
                         prompt_max_len=cfg.prompt_max_len, source=cfg.dataset)
    if data.num_truncated:
        print(f"[data] {data.num_truncated} of {len(data)} prompts were longer than --prompt_max_len "
              f"{cfg.prompt_max_len} and were left-truncated", file=sys.stderr)
    first = 0 if cfg.iter is None else cfg.iter * cfg.rollout_batch_size
    last = len(data) if cfg.iter is None else min(first + cfg.rollout_batch_size, len(data))
    if first >= last:
        raise ValueError(f"--iter {cfg.iter} x --rollout_batch_size {cfg.rollout_batch_size} = {first} is past the "
                         f"{len(data)} prompts of --dataset")
    indices = list(range(first, last))
    mesh = start_meshes(cfg)[1]["main"]  # after every check of the data
    chunks = [indices[a:a + cfg.chunk_size] for a in range(0, len(indices), cfg.chunk_size)]
    progress_path = cfg.output_path + PROGRESS
    rows, done = resume_progress(progress_path, settings_fingerprint(cfg), chunks, cfg.best_of_n)
    tokens = 0
    with contextlib.ExitStack() as run:
        engine = open_engine(cfg, mesh, tokenizer, run) if len(done) < len(chunks) else None
        progress = Progress("generate", len(indices) * cfg.best_of_n, len(rows))  # samples/s: generation only
        with open(progress_path, "a") as f:
            for c, idx in enumerate(chunks):
                if c in done:
                    continue
                prompts, prompt_ids, labels = data.batch(idx)
                new = sample_rows(engine, tokenizer, prompts, prompt_ids, idx, sampling_for(cfg, idx[0]),
                                  labels if cfg.label_key else None)
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
                f.flush()
                os.fsync(f.fileno())
                rows += new
                tokens += sum(r["num_tokens"] for r in new)
                progress.update(len(new))
    rows.sort(key=lambda r: (r["prompt_index"], r["sample_index"]))
    write_jsonl(cfg.output_path, rows)
    os.remove(progress_path)
    return {"output_path": cfg.output_path, "rows": len(rows), "prompts": len(indices),
            "samples_per_s": progress.rate(), "tokens_per_s": tokens / max(time.perf_counter() - progress.t0, 1e-9)}


# ---------------------------------------------------------------------------------------------------------------------
# rm (+ post-processing)
# ---------------------------------------------------------------------------------------------------------------------


def read_scored_inputs(cfg: BatchInferenceConfig) -> tuple[list[dict], list]:
    """``(rows, labels)`` of ``--dataset`` for scoring: every row must have a string ``--input_key`` and
    ``--output_key`` (KeyError naming the row otherwise)."""
    records = load_records(cfg)
    rows = records.to_list()
    for key, flag in ((cfg.input_key, "--input_key"), (cfg.output_key, "--output_key")):
        for i, r in enumerate(rows):
            if not isinstance(r.get(key), str):
                raise KeyError(f"{flag} '{key}' is missing or not a string in row {i} of dataset {cfg.dataset} "
                               f"(available keys: {sorted(k for k, v in r.items() if v is not None)})")
    label_key = cfg.label_key or ("label" if "label" in records.column_names else None)
    if label_key is not None and label_key not in records.column_names:
        raise KeyError(f"--label_key '{label_key}' is not a field of dataset {cfg.dataset}; available keys: "
                       f"{records.column_names}")
    labels = [None if label_key is None or r[label_key] is None else str(r[label_key]) for r in rows]
    if cfg.input_key != "input" or cfg.output_key != "output":  # the post-processors read input / output
        rows = [{**r, "input": r[cfg.input_key], "output": r[cfg.output_key]} for r in rows]
    return rows, labels


def post_process(rows: list[dict], processor: Optional[str], template: str) -> tuple[list[dict], str]:
    """``(rows written, one-line summary)`` of ``--post_processor``."""
    from jaxrlhf.data import postprocess

    if processor is None:
        return rows, f"{len(rows)} scored rows"
    if processor == "rs":
        out = postprocess.rejection_sampling(rows)
        return out, f"rs: the best of {len(rows)} responses for each of {len(out)} prompts"
    if processor == "csft":
        return postprocess.conditional_sft(rows, template), f"csft: {len(rows)} rows with the score in the prompt"
    pairs, dropped = postprocess.iterative_dpo_pairs(rows)
    return pairs, (f"iter_dpo: {len(pairs)} pairs; {dropped} prompt(s) dropped because their best and worst "
                   f"responses scored the same")


def score(cfg: BatchInferenceConfig) -> dict:
    from jaxrlhf.data import postprocess
    from jaxrlhf.rewards.texts import score_texts

    from jaxrlhf.rewards import load_rewards

    rows, labels = read_scored_inputs(cfg)
    if cfg.post_processor == "iter_dpo":
        postprocess.iterative_dpo_pairs([{**r, "reward": 0.0} for r in rows])  # a single response per prompt: refuse
    tokenizer = mesh = None
    if cfg.reward_pretrain:
        import jax.numpy as jnp

        from jaxrlhf.data.tokenizer import load_tokenizer
        from jaxrlhf.train.run import start_meshes

        mesh = start_meshes(cfg)[1]["main"]
        tokenizer = load_tokenizer(cfg.pretrain or cfg.reward_pretrain.split(",")[0])
    rewards = load_rewards(cfg, mesh=mesh, compute_dtype=jnp.bfloat16 if cfg.bf16 and mesh is not None else None)
    progress = Progress("rm", len(rows))
    extras: dict = {}
    for a in range(0, len(rows), cfg.chunk_size):
        part = rows[a:a + cfg.chunk_size]
        reward, extra = score_texts([r["input"] for r in part], [r["output"] for r in part],
                                    labels[a:a + cfg.chunk_size], tokenizer=tokenizer, chunk=cfg.micro_batch_size,
                                    normalize=cfg.normalize_reward, max_len=cfg.max_len, **rewards)
        for r, x in zip(part, reward):
            r["reward"] = float(x)
        for k, v in extra.items():
            extras[k] = extras.get(k, 0.0) + v * len(part)
        progress.update(len(part))
    stats = {**postprocess.reward_stats(rows), **{k: v / len(rows) for k, v in extras.items()}}
    out, summary = post_process(rows, cfg.post_processor, cfg.reward_template)
    if not out:
        raise ValueError(f"{summary}: nothing to write")
    postprocess.write_jsonl(cfg.output_path, out)
    print(f"[rm] {summary}; " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()), file=sys.stderr)
    return {"output_path": cfg.output_path, "rows": len(out), "summary": summary, **stats}


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def main(cfg: BatchInferenceConfig) -> dict:
    """Run the task; returns a summary (output path, rows, throughput or reward statistics)."""
    if os.path.exists(cfg.output_path):
        print(f"[{cfg.eval_task}] {cfg.output_path} already exists: nothing to do (delete it to redo the work)",
              file=sys.stderr)
        return {"output_path": cfg.output_path, "skipped": True}
    return generate(cfg) if cfg.eval_task == "generate" else score(cfg)


def cli(argv: list[str] | None = None) -> int:
    from jaxrlhf.cli import report_errors
    from jaxrlhf.rewards import RewardError

    cfg = parse_config(BatchInferenceConfig, argv, prog="python -m jaxrlhf.batch_inference")
    out = report_errors(main, cfg, (ValueError, KeyError, TypeError, OSError, RuntimeError, RewardError))
    if out is None:
        return 2
    if not out.get("skipped"):
        rate = f", {out['samples_per_s']:.1f} samples/s" if "samples_per_s" in out else ""
        print(f"done: {out['rows']} rows -> {out['output_path']}{rate}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
