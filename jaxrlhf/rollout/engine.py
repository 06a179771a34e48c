"""The rollout ``Engine`` protocol: what every generator of PPO/GRPO rollouts offers.

Two implementations exist: ``jaxrlhf.rollout.vllm_pool`` (a Ray pool of vLLM engines) and
``jaxrlhf.rollout.jax_sampler.JaxSampler`` (the in-process JAX fallback). Trainers talk to either through this
structural protocol only; there is no base class.

Conventions shared by every engine:

- Input: ``prompt_token_ids[i]`` is prompt ``i`` as a list of token ids (no padding).
- Output order is prompt-major, as OpenRLHF flattens it: for prompt ``i`` its ``sampling.n`` samples come
  consecutively, so completion ``r`` belongs to prompt ``r // n``.
- ``Completion.token_ids`` are the generated tokens only (not the prompt). When ``finish_reason == "stop"`` they end
  with the stop token (an EOS id or one of ``sampling.stop_token_ids``); ``"length"`` means ``max_tokens`` tokens were
  generated without meeting a stop token.
- ``Completion.logprobs[t] = log softmax(z_t / T)[token_t]`` in fp32, where ``z_t`` are the model's logits at step t
  and ``T`` the sampling temperature (``T = 1`` when ``temperature == 0``, greedy), taken *before* top-k / top-p
  truncation: the log-probability of the token under the temperature-scaled full distribution.
- ``update_weights`` takes ``(hf_name, array, transposed)`` entries with Hugging Face names, exactly as
  ``converters.hf.hf_entries`` yields them (the array in Flax layout; its HF layout is ``array.T`` when
  ``transposed``: the engine transposes where it copies anyway), or ``(hf_name, array)`` pairs in HF layout
  (``converters.hf.hf_tensors``); arrays may be numpy or jax arrays of any float dtype (cast to the engine's
  dtype). A subset of the model's tensors may be sent.
- Optional, for LoRA policies (the vLLM pool has it, ``rollout/setup.lora_sync_mode`` asks): ``adapter_support(rank)``
  (None, or why not), ``next_adapter_path()`` and ``load_adapter(path)``: the engine generates with the PEFT adapter
  directory ``path`` on top of its base from then on (vLLM 0.32 reads LoRA adapters from a local directory only,
  no in-memory tensors: the trainer writes it to /dev/shm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]
Tensor = Any  # numpy.ndarray or jax.Array


@dataclass(frozen=True)
class SamplingParams:
    """How to sample (vLLM's field names and meanings).

    n: samples per prompt.
    temperature: logits are divided by it before sampling; 0 means greedy (argmax).
    top_p: nucleus sampling, keep the smallest set of most likely tokens whose probability mass reaches top_p
        (1.0 = off); applied after top_k, on the renormalised top-k distribution.
    top_k: keep only the k most likely tokens (-1 = off).
    max_tokens: most tokens generated per sample (the stop token included).
    seed: seeds the PRNG; the same seed, prompts and settings give the same samples.
    stop_token_ids: extra token ids that end a sample (besides the engine's EOS ids); the stop token is kept.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"SamplingParams.seed must be in [0, 2**32), got {self.seed}")
        # Accept any iterable of ints (lists from YAML/CLI) but store a hashable tuple.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One generated sample.

    prompt_index: index of its prompt in the ``generate`` call.
    token_ids: generated tokens, ending with the stop token when finish_reason is "stop".
    logprobs: per token, fp32 ``log softmax(logits / T)[token]`` before top-k/top-p truncation (T = 1 if greedy).
    finish_reason: "stop" (met an EOS / stop token) or "length" (reached max_tokens).
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


def as_entries(named: Iterable[tuple]) -> Iterator[tuple[str, Tensor, bool]]:
    """What ``update_weights`` receives, as ``(hf_name, array, transposed)``: ``hf_entries`` triples as they are,
    HF-layout ``(hf_name, array)`` pairs with ``transposed=False``."""
    for item in named:
        yield item if len(item) == 3 else (*item, False)


@runtime_checkable
class Engine(Protocol):
    """A rollout generator: sample completions, take new weights, shut down."""

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """``len(prompt_token_ids) * sampling.n`` completions, prompt-major (see the module docstring)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple]) -> None:
        """Load ``hf_entries`` triples or HF-layout ``(hf_name, array)`` pairs into the engine's model."""
        ...

    def close(self) -> None:
        """Release the engine's devices / processes; the engine is unusable afterwards."""
        ...
