"""Python reward functions: `--remote_rm_url path/to/reward.py`, as in OpenRLHF.

The file must define

    def reward_func(queries: list[str], prompts: list[str], labels: list[str | None]):
        ...

where `queries[i]` is prompt + response text of sample i (decoded from the rollout),
`prompts[i]` its prompt text and `labels[i]` the dataset label (e.g. the reference
answer; None when the dataset has none). It is called positionally with the whole
batch and may return either

- a sequence of B numbers (list, NumPy array, torch or JAX tensor): the rewards, or
- a dict {"rewards": [B], "scores": [B] (optional), "extra_logs": {name: scalar or [B]}
  (optional)}, OpenRLHF's current form. "scores" (default: the rewards) is what
  dynamic filtering looks at; "extra_logs" are only logged.

The same shapes are what an HTTP reward server answers (see `http.py`), so the
parsing below is shared by both sources.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


class RewardError(RuntimeError):
    """A reward source failed or answered something that is not a valid reward batch."""


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """One batch of rewards.

    rewards_b:   [B] float32, finite; the reward used for advantages.
    scores_b:    [B] float32, finite; OpenRLHF's "scores" (for dynamic filtering),
                 equal to the rewards when the source gave none.
    extra_logs:  name -> [B] float32 for logging only (may hold NaN); a scalar a source
                 returned for its chunk is repeated over that chunk's samples, so the
                 batch mean of a log is the sample-weighted mean of what was returned.
    """

    rewards: np.ndarray  # [B] float32
    scores: np.ndarray  # [B] float32
    extra_logs: dict[str, np.ndarray]  # name -> [B] float32


def truncate(text: str, limit: int = 300) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _describe(value: Any) -> str:
    return truncate(repr(value), 200)


def _to_numpy(value: Any) -> np.ndarray:
    """A list/tuple/NumPy array/torch tensor/JAX array/number as a NumPy array, without importing torch."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor (any device, any float dtype)
        value = value.detach().cpu()
        if getattr(value, "is_floating_point", lambda: False)():
            value = value.float()  # bfloat16 has no NumPy equivalent
        return value.numpy()
    return np.asarray(value)


def _numeric_array(value: Any, *, what: str, source: str) -> np.ndarray:
    """`value` as a float64 array; RewardError if it is not numbers (strings, None, nested lists of uneven length)."""
    try:
        array = _to_numpy(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RewardError(f"{source}: {what} is not an array of numbers ({exc}); got {_describe(value)}") from exc
    if array.dtype.kind not in "biuf":
        raise RewardError(
            f"{source}: {what} must be numbers (int/float/bool), got dtype {array.dtype} from {_describe(value)}"
        )
    return array.astype(np.float64)


def _per_sample(value: Any, *, what: str, source: str, batch_size: int, allow_nonfinite: bool) -> np.ndarray:
    """`value` as a [batch_size] float32 array; RewardError on a wrong shape or (unless allowed) NaN/inf."""
    array = _numeric_array(value, what=what, source=source)
    if array.ndim != 1 or array.shape[0] != batch_size:
        raise RewardError(
            f"{source}: {what} has the wrong shape: expected {batch_size} values (one per query, shape "
            f"[{batch_size}]), got shape {list(array.shape)}: {_describe(value)}"
        )
    array = array.astype(np.float32)
    if not allow_nonfinite and not np.all(np.isfinite(array)):
        bad = np.flatnonzero(~np.isfinite(array))
        raise RewardError(
            f"{source}: {what} must be finite numbers, got {array[bad[:8]].tolist()} at positions "
            f"{bad[:8].tolist()} (expected {batch_size} finite values, {bad.size} are NaN/inf)"
        )
    return array


def parse_reward_output(output: Any, *, batch_size: int, source: str) -> RewardResult:
    """Validate what a reward function or reward server returned for `batch_size` queries.

    Accepts a sequence/array of `batch_size` numbers, or a mapping with "rewards"
    (required), "scores" and "extra_logs" (optional); see the module docstring.
    `source` names the function/server in error messages.
    """
    if isinstance(output, Mapping):
        if "rewards" not in output:
            raise RewardError(
                f"{source}: returned a dict without a 'rewards' entry (keys: {sorted(map(str, output))}); "
                f"return {{'rewards': [one number per query], ...}} or a plain list of numbers. "
                f"Got {_describe(output)}"
            )
        rewards = _per_sample(
            output["rewards"], what="'rewards'", source=source, batch_size=batch_size, allow_nonfinite=False
        )
        scores_raw = output.get("scores")
        scores = (
            rewards
            if scores_raw is None
            else _per_sample(scores_raw, what="'scores'", source=source, batch_size=batch_size, allow_nonfinite=False)
        )
        extra_raw = output.get("extra_logs") or {}
        if not isinstance(extra_raw, Mapping):
            raise RewardError(f"{source}: 'extra_logs' must be a dict name -> number(s), got {_describe(extra_raw)}")
        extra_logs = {
            str(name): _extra_log(value, name=str(name), source=source, batch_size=batch_size)
            for name, value in extra_raw.items()
        }
        return RewardResult(rewards=rewards, scores=scores, extra_logs=extra_logs)
    if isinstance(output, (str, bytes)) or output is None:
        raise RewardError(
            f"{source}: expected a list of {batch_size} numbers or a dict with 'rewards', got {_describe(output)}"
        )
    rewards = _per_sample(output, what="rewards", source=source, batch_size=batch_size, allow_nonfinite=False)
    return RewardResult(rewards=rewards, scores=rewards, extra_logs={})


def _extra_log(value: Any, *, name: str, source: str, batch_size: int) -> np.ndarray:
    """An extra log as [batch_size] float32: a scalar is repeated, a [batch_size] array kept as is."""
    array = _numeric_array(value, what=f"extra_logs[{name!r}]", source=source)
    if array.ndim == 0:
        return np.full((batch_size,), array.reshape(()), dtype=np.float32)
    if array.shape != (batch_size,):
        raise RewardError(
            f"{source}: extra_logs[{name!r}] must be one number or {batch_size} numbers (one per query), "
            f"got shape {list(array.shape)}: {_describe(value)}"
        )
    return array.astype(np.float32)


def concat_results(results: Sequence[RewardResult], *, sources: Sequence[str]) -> RewardResult:
    """Join the results of consecutive batch chunks (in order) into one result.

    Every chunk must report the same extra_logs names: a name missing from one chunk
    would leave holes in the batch.
    """
    if not results:
        return RewardResult(
            rewards=np.zeros((0,), np.float32), scores=np.zeros((0,), np.float32), extra_logs={}
        )
    names = set(results[0].extra_logs)
    for result, source in zip(results[1:], sources[1:]):
        if set(result.extra_logs) != names:
            raise RewardError(
                f"reward sources disagree on extra_logs: {sources[0]} returned {sorted(names)}, "
                f"{source} returned {sorted(result.extra_logs)}; every server must log the same names"
            )
    return RewardResult(
        rewards=np.concatenate([r.rewards for r in results]),
        scores=np.concatenate([r.scores for r in results]),
        extra_logs={name: np.concatenate([r.extra_logs[name] for r in results]) for name in sorted(names)},
    )


def check_batch(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[str | None]) -> int:
    """The batch size B; ValueError unless queries, prompts and labels all have B entries."""
    if not (len(queries) == len(prompts) == len(labels)):
        raise ValueError(
            f"queries, prompts and labels must have one entry per sample, got lengths "
            f"{len(queries)}, {len(prompts)}, {len(labels)}"
        )
    return len(queries)


def load_reward_module_function(path: str) -> Callable[..., Any]:
    """`reward_func` from the Python file at `path`, imported with importlib (the file runs once, here)."""
    abspath = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(abspath):
        raise RewardError(
            f"reward file {path!r} not found (looked at {abspath}); --remote_rm_url takes a .py file that "
            f"defines reward_func(queries, prompts, labels), or http(s) URLs of reward servers"
        )
    digest = hashlib.sha1(abspath.encode()).hexdigest()[:12]
    module_name = f"jaxrlhf_reward_file_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, abspath)
    if spec is None or spec.loader is None:
        raise RewardError(f"reward file {abspath}: Python cannot import it (is it a .py source file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses/pickle in the file look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise RewardError(f"reward file {abspath} failed to import: {type(exc).__name__}: {exc}") from exc
    reward_func = getattr(module, "reward_func", None)
    if reward_func is None:
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise RewardError(
            f"reward file {abspath} defines no `reward_func`; define "
            f"`def reward_func(queries, prompts, labels): ...` (names found: {truncate(', '.join(public), 200)})"
        )
    if not callable(reward_func):
        raise RewardError(f"reward file {abspath}: `reward_func` is a {type(reward_func).__name__}, not a function")
    return reward_func


class RewardFunction:
    """A `reward_func` loaded from a Python file, called on the whole batch in this process.

    `source(queries, prompts, labels) -> RewardResult`; RewardError when the function
    raises or returns the wrong number of values, NaN or inf.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.reward_func = load_reward_module_function(path)

    def __repr__(self) -> str:
        return f"RewardFunction({self.path!r})"

    def __call__(
        self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[str | None]
    ) -> RewardResult:
        batch_size = check_batch(queries, prompts, labels)
        source = f"reward_func in {self.path}"
        try:
            output = self.reward_func(list(queries), list(prompts), list(labels))
        except Exception as exc:
            raise RewardError(f"{source} raised {type(exc).__name__}: {truncate(str(exc), 500)}") from exc
        return parse_reward_output(output, batch_size=batch_size, source=source)

