"""Reward from Flax reward models (``--reward_pretrain a,b``): the scores of several models are summed.

Each model is an HF ``*ForSequenceClassification`` directory or an OpenRLHF value-head checkpoint (``score`` /
``value_head`` tensor, see ``--value_head_prefix``), loaded sharded on the training mesh. The score is read at the
last real token of each sequence. With ``normalize``, a model's score becomes ``(s - mean) / std`` using the
``mean`` / ``std`` its config.json carries (written by OpenRLHF's and jaxrlhf's RM trainers).
"""
from __future__ import annotations

import contextlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models import from_pretrained, last_token_values
from jaxrlhf.train.steps import make_forward


def _score(model, batch):
    return last_token_values(model(batch["seqs"], batch["attn"]), batch["attn"])


class RewardModels:
    def __init__(self, paths: list[str], *, mesh, value_head_prefix: str | None = None, compute_dtype=None):
        self.models = []
        for path in paths:
            model = from_pretrained(path, mesh=mesh, head="score", value_head_prefix=value_head_prefix)
            graphdef, state = nnx.split(model)
            params = state.to_pure_dict()
            hf = model.cfg.hf_config
            mean, std = float(hf.get("mean", 0.0)), float(hf.get("std", 1.0))
            fwd = make_forward(graphdef, _score, params=params, mesh=mesh, compute_dtype=compute_dtype)
            self.models.append((path, params, fwd, mean, std))
        self.offloaded = False

    def __call__(self, seqs_bt: np.ndarray, attn_bt: np.ndarray, *, normalize: bool) -> np.ndarray:
        """Summed scores ``[B]`` (float32) of one micro-batch."""
        total = np.zeros(seqs_bt.shape[0], np.float32)
        for _, params, fwd, mean, std in self.models:
            s = np.asarray(fwd(params, {"seqs": jnp.asarray(seqs_bt), "attn": jnp.asarray(attn_bt)}))
            total += (s - mean) / std if normalize else s
        return total

    # -- host offload between uses (--reward_offload; sharding/placement.py)
    def offload(self) -> None:
        """Keep every model's parameters in host memory; ``on_device()`` brings them back for a pass."""
        from sharding.placement import offload

        self.models = [(path, offload(params), fwd, mean, std) for path, params, fwd, mean, std in self.models]
        self.offloaded = True

    @contextlib.contextmanager
    def on_device(self):
        """The parameters in device memory inside the block (a no-op unless offloaded); freed again after it."""
        if not self.offloaded:
            yield self
            return
        from sharding.placement import onload

        host = self.models
        self.models = [(path, onload(params), fwd, mean, std) for path, params, fwd, mean, std in host]
        try:
            yield self
        finally:
            self.models = host
