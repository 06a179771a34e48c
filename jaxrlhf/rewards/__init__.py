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
from typing import Protocol

from jaxrlhf.rewards.function import RewardError, RewardFunction, RewardResult, parse_reward_output
from jaxrlhf.rewards.http import HttpRewardClient, split_batch

__all__ = [
    "HttpRewardClient",
    "RewardError",
    "RewardFunction",
    "RewardResult",
    "RewardSource",
    "load_remote_reward",
    "parse_remote_rm_url",
    "parse_reward_output",
    "split_batch",
]


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
