"""Test set-up: 8 fake CPU devices (before jax is imported) and shared fixtures."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sharding.mesh import use_host_devices  # noqa: E402

# 8 CPU devices (a count already in XLA_FLAGS is kept) and a thread pool their collectives cannot deadlock
use_host_devices("8")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
