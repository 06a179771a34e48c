"""Rollout engines: the ``Engine`` protocol and the in-process JAX sampler.

``jaxrlhf.rollout.vllm_pool`` (the vLLM pool, the only module importing ray/vllm) is not imported here: import it
explicitly where vLLM is installed.
"""
from jaxrlhf.rollout.engine import Completion, Engine, SamplingParams
from jaxrlhf.rollout.jax_sampler import JaxSampler

__all__ = ["Completion", "Engine", "SamplingParams", "JaxSampler"]
