"""Test set-up: 8 fake CPU devices (before jax is imported) and shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sharding.mesh import use_host_devices  # noqa: E402

use_host_devices("8")  # the device count set above, and a thread pool its collectives cannot deadlock

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
