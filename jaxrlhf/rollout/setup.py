"""The rollout-engine flags (OpenRLHF's ``--vllm_*`` spelling and the sampling flags) and the engine they describe:
the in-process JAX sampler, or a Ray pool of vLLM engines (rollout/vllm_pool.py) on process 0."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal, Optional

from jaxrlhf.cli import arg


@dataclass
class RolloutFlags:
    """Sampling and engine flags; a config that generates inherits them (call ``check_rollout_flags``)."""

    temperature: float = arg(1.0, "sampling temperature (log-probs use the same temperature)")
    top_p: float = arg(1.0, "nucleus sampling")
    top_k: int = arg(-1, "top-k sampling (-1: off)")
    vllm_num_engines: int = arg(0, "vLLM engines for rollouts, each a Ray actor (0: in-process JAX sampler; the "
                                   "built-in demo uses 1 wherever vLLM and Ray are installed)")
    vllm_tensor_parallel_size: int = arg(1, "GPUs per vLLM engine (reserved on one node by a placement group)")
    vllm_gpu_memory_utilization: float = arg(0.9, "fraction of each engine GPU vLLM may use")
    vllm_kv_cache_mb: int = arg(256, "KV cache per engine in MiB (required on CPU; 0 on GPU: sized by vLLM)")
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = arg(
        "auto", "rollout dtype of the vLLM engines and of the JAX sampler (auto: bfloat16 with --bf16, else float32)")
    enable_prefix_caching: bool = arg(False, "vLLM prefix caching (reset after every weight sync)")
    enforce_eager: bool = arg(False, "vLLM without CUDA graphs")
    vllm_sync_backend: Literal["ray", "nccl"] = arg("ray", "weight broadcast: ray (object store, any machine) or "
                                                           "nccl (GPU clusters)")
    weight_sync_bucket_mb: int = arg(256, "weight broadcast bucket size in MiB")
    vllm_sync_check: Literal["off", "first", "every"] = arg(
        "first", "after a weight sync, compare each engine's greedy continuation and logprobs of probe prompts with "
                 "the trainer's and stop on a mismatch: off, after the first sync, or after every sync")
    vllm_sync_lora: Literal["auto", "adapter", "merged"] = arg(
        "auto", "with LoRA on the vLLM pool: adapter (engines start with enable_lora and load each new adapter "
                "version as a LoRA request: only the adapters travel), merged (the merged weights are broadcast), "
                "auto (adapter where the engines can take it, else merged; the log says which)")
    vllm_request_timeout: float = arg(600.0, "seconds to wait for one engine's answer before failing")
    ray_address: Optional[str] = arg(None, "join this Ray cluster (e.g. auto or ray://host:10001); default: start a "
                                           "local one")


@dataclass
class PromptFlags:
    """The prompt-dataset flags (PPO's spelling) of a config that samples from a prompt dataset."""

    prompt_data: Optional[str] = arg(None, "prompt dataset(s), comma-separated: files, type@dir, save_to_disk dirs")
    prompt_data_probs: Optional[str] = arg(None, "mixing probabilities of --prompt_data, comma-separated")
    prompt_split: str = arg("train", "dataset split")
    input_key: str = arg("input", "prompt field")
    label_key: Optional[str] = arg(None, "label field passed to the reward function")
    prompt_max_len: int = arg(1024, "prompt tokens kept (left-truncated)")
    generate_max_len: int = arg(1024, "most tokens generated per sample")


def load_prompts(flags: PromptFlags, tokenizer, *, apply_chat_template: bool, input_template: Optional[str],
                 max_samples: int, seed: int, rollout_batch_size: int):
    """``--prompt_data`` blended and tokenized (``PromptDataset``), checked against ``--rollout_batch_size``."""
    from jaxrlhf.data.prompts import PromptDataset
    from jaxrlhf.data.sources import blend, parse_probs, split_specs

    records = blend(split_specs(flags.prompt_data), parse_probs(flags.prompt_data_probs), seed=seed,
                    max_samples=max_samples, split=flags.prompt_split)
    data = PromptDataset(records, tokenizer, input_key=flags.input_key, label_key=flags.label_key,
                         apply_chat_template=apply_chat_template, input_template=input_template,
                         prompt_max_len=flags.prompt_max_len, source=flags.prompt_data)
    if data.num_truncated:
        print(f"[data] {data.num_truncated} of {len(data)} prompts were longer than --prompt_max_len "
              f"{flags.prompt_max_len} and were left-truncated", file=sys.stderr)
    if len(data) < rollout_batch_size:
        raise ValueError(f"--rollout_batch_size {rollout_batch_size} exceeds the {len(data)} prompts of "
                         f"--prompt_data: lower it")
    return data


def check_rollout_flags(flags: RolloutFlags) -> None:
    if flags.vllm_num_engines < 0:
        raise ValueError(f"--vllm_num_engines must be >= 0, got {flags.vllm_num_engines}")


def engine_dtype(flags: RolloutFlags, bf16: bool) -> str:
    """``--vllm_dtype``, with ``auto`` = the trainer's compute dtype."""
    return flags.vllm_dtype if flags.vllm_dtype != "auto" else ("bfloat16" if bf16 else "float32")


def lora_sync_mode(flags: RolloutFlags, engine, lora) -> str | None:
    """How a LoRA policy reaches the engine (None without LoRA; ``--vllm_sync_lora``): "adapter" (the vLLM pool
    loads each adapter version as a LoRA request, ``VLLMPool.load_adapter``) where the engine can take it, else
    "merged" (the merged weights are broadcast). Says which in the log (process 0, which holds the pool)."""
    if lora is None:
        return None
    import jax

    can = getattr(engine, "adapter_support", None)
    if not flags.vllm_num_engines:
        reason = "the JAX sampler takes merged weights"
    elif flags.vllm_sync_lora == "merged":
        reason = "--vllm_sync_lora merged"
    else:
        reason = can(lora.rank) if can is not None else None  # None: the pool can (process 0)
    if flags.vllm_num_engines:  # the pool lives on process 0: every process follows its answer
        import numpy as np

        from sharding.distributed import from_process0

        reason = None if int(from_process0(lambda: np.int32(reason is None), ((), np.int32))) else (
            reason or "the vLLM engines cannot take adapters")
    if flags.vllm_sync_lora == "adapter" and reason is not None:
        raise ValueError(f"--vllm_sync_lora adapter: {reason}; use --vllm_sync_lora auto or merged")
    mode = "merged" if reason is not None else "adapter"
    if jax.process_index() == 0:
        how = f"adapters only (vLLM LoRA requests, r={lora.rank})" if mode == "adapter" else \
            f"merged weights ({reason})"
        print(f"[lora] weight sync: {how}", file=sys.stderr)
    return mode


def make_engine(flags: RolloutFlags, *, model, pretrain: str, tokenizer, mesh, prompt_max_len: int,
                generate_max_len: int, bf16: bool, seed: int, prompt_buckets=(), lora=None):
    """The JAX sampler over ``model`` (on every process; prompts padded to ``prompt_buckets``, see ``JaxSampler``;
    computing in the engine dtype, ``engine_dtype``),
    or the vLLM pool of ``pretrain`` (process 0; None on the others). A converted (Orbax) ``pretrain`` starts the
    engines from dummy weights: sync before generating. ``lora`` (the policy's ``LoraSpec``): the engines start
    with vLLM's LoRA support for its rank unless ``--vllm_sync_lora merged``."""
    import jax

    eos = (tokenizer.eos_token_id,)
    if not flags.vllm_num_engines:
        import jax.numpy as jnp

        from jaxrlhf.rollout import JaxSampler

        return JaxSampler(model, mesh=mesh, pad_token_id=tokenizer.pad_token_id, eos_token_ids=eos,
                          max_prompt_len=prompt_max_len, prompt_buckets=prompt_buckets,
                          compute_dtype=jnp.dtype(engine_dtype(flags, bf16)))
    if jax.process_index() != 0:
        return None
    try:
        from jaxrlhf.rollout.vllm_pool import PoolConfig, VLLMPool
    except ImportError as e:
        raise ImportError(f"--vllm_num_engines {flags.vllm_num_engines} needs vLLM and Ray ({e}); install them with "
                          f"scripts/setup.sh, or use --vllm_num_engines 0 for the JAX sampler") from None
    from converters.hf import is_flax_checkpoint

    return VLLMPool(PoolConfig(
        model=pretrain, load_format="dummy" if is_flax_checkpoint(pretrain) else "auto",
        num_engines=flags.vllm_num_engines, tensor_parallel_size=flags.vllm_tensor_parallel_size,
        dtype=engine_dtype(flags, bf16), gpu_memory_utilization=flags.vllm_gpu_memory_utilization,
        kv_cache_mb=flags.vllm_kv_cache_mb, enable_prefix_caching=flags.enable_prefix_caching,
        enforce_eager=flags.enforce_eager, max_model_len=prompt_max_len + generate_max_len,
        eos_token_ids=eos, seed=seed, sync_backend=flags.vllm_sync_backend, bucket_mb=flags.weight_sync_bucket_mb,
        request_timeout_s=flags.vllm_request_timeout, ray_address=flags.ray_address,
        max_lora_rank=lora.rank if lora is not None and flags.vllm_sync_lora != "merged" and lora.rank <= 512
        else 0))  # vLLM takes adapters up to rank 512
