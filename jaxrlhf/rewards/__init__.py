"""Reward sources for the PPO loop.

Non-model sources, selected by OpenRLHF's `--remote_rm_url`:
- `path/to/reward.py`: a Python file defining `reward_func(queries, prompts, labels)`
  (function.py), imported once with importlib and called in this process;
- `http://host:port/path[,http://host2:port/path...]`: reward servers speaking
  OpenRLHF's JSON protocol (http.py); the batch is split into contiguous chunks over them.

Every source is called as `source(queries, prompts, labels) -> RewardResult` with
`queries[i]` = prompt + response text, `prompts[i]` the prompt, `labels[i]` the dataset
label or None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Protocol

from jaxrlhf.cli import arg

from jaxrlhf.rewards.function import RewardError, RewardFunction, RewardResult, parse_reward_output
from jaxrlhf.rewards.http import HttpRewardClient, split_batch

__all__ = [
    "HttpRewardClient",
    "RewardFlags",
    "RewardError",
    "RewardFunction",
    "RewardResult",
    "RewardSource",
    "load_remote_reward",
    "parse_remote_rm_url",
    "parse_reward_output",
    "split_batch",
]


@dataclass
class RewardFlags:
    """The reward flags (OpenRLHF's spelling) of a config that scores samples; ``load_rewards`` builds them."""

    reward_pretrain: Optional[str] = arg(None, "reward model directory(ies), comma-separated: scores are summed")
    remote_rm_url: Optional[str] = arg(None, "reward.py with reward_func(queries, prompts, labels), or HTTP URL(s)")
    remote_rm_timeout: float = arg(60.0, "seconds per HTTP reward request before a retry")
    value_head_prefix: Optional[str] = arg(None, "score tensor prefix: score (HF) or value_head (OpenRLHF); None "
                                                 "detects")
    remote_rm_token: Optional[str] = arg(None, "token the HTTP reward server requires (default: $JAXRLHF_RM_TOKEN; "
                                               "prefer the variable: flags show in `ps`)")


def require_reward(flags: RewardFlags) -> None:
    """ValueError when the flags name no reward at all (checked before anything is loaded)."""
    if flags.reward_pretrain is None and flags.remote_rm_url is None:
        raise ValueError("no reward: pass --reward_pretrain (reward model dirs) and/or --remote_rm_url (reward.py or "
                         "http URLs)")


def load_rewards(flags: RewardFlags, *, mesh, compute_dtype=None) -> dict:
    """``{"reward_models": RewardModels or None, "remote_reward": source or None}`` (the keyword arguments of
    ``rewards.texts.score_texts``); ValueError when the flags name no reward at all."""
    require_reward(flags)
    models = None
    if flags.reward_pretrain:
        from jaxrlhf.rewards.model import RewardModels

        models = RewardModels(flags.reward_pretrain.split(","), mesh=mesh, value_head_prefix=flags.value_head_prefix,
                              compute_dtype=compute_dtype)
    remote = load_remote_reward(flags.remote_rm_url, timeout_s=flags.remote_rm_timeout,
                                token=flags.remote_rm_token) if flags.remote_rm_url else None
    return {"reward_models": models, "remote_reward": remote}


class RewardSource(Protocol):
    """Anything called as `source(queries, prompts, labels) -> RewardResult` (a structural type, no base class)."""

    def __call__(
        self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[str | None]
    ) -> RewardResult: ...


def parse_remote_rm_url(spec: str | Sequence[str]) -> list[str]:
    """The entries of a `--remote_rm_url` value: comma-separated (or a list), stripped, empty ones dropped.

    Valid: exactly one `.py` file, or one or more http(s) URLs. ValueError otherwise.
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    entries = [p.strip() for p in parts if p and p.strip()]
    if not entries:
        raise ValueError("--remote_rm_url is empty: give a reward .py file or http(s) URLs of reward servers")
    files = [e for e in entries if not e.lower().startswith(("http://", "https://"))]
    for entry in files:
        if not entry.endswith(".py"):
            raise ValueError(
                f"--remote_rm_url entry {entry!r} is neither a .py reward file nor an http(s) URL; "
                f"use path/to/reward.py or http://host:port/path"
            )
    if files and len(entries) > 1:
        raise ValueError(
            f"--remote_rm_url {','.join(entries)!r}: give either one .py reward file or a comma-separated list "
            f"of http(s) URLs, not {len(files)} file(s) with {len(entries) - len(files)} URL(s)"
        )
    return entries


def load_remote_reward(
    spec: str | Sequence[str], *, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
    token: str | None = None, deadline_s: float | None = None,
) -> RewardSource:
    """The reward source named by a `--remote_rm_url` value.

    `reward.py` -> RewardFunction (imports the file now; RewardError if that fails);
    `http://a/x,http://b/x` -> HttpRewardClient (nothing is contacted until the first
    call). `timeout_s`, `retries`, `backoff_s`, `token` (None: $JAXRLHF_RM_TOKEN) and
    `deadline_s` (None: every attempt's timeout plus the waits) apply to HTTP requests only.
    """
    entries = parse_remote_rm_url(spec)
    if entries[0].endswith(".py") and not entries[0].lower().startswith(("http://", "https://")):
        return RewardFunction(entries[0])
    return HttpRewardClient(entries, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, token=token,
                            deadline_s=deadline_s)
