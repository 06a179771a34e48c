"""The experience maker: a ``Rollout`` (rollout/client.py) -> an ``Experience`` the PPO update trains on.

OpenRLHF's ``make_experience_batch`` in four pure-ish steps, each a function with explicit inputs:

1. ``forward_in_chunks``: the frozen forwards over the rollout in micro-batches of ``micro_rollout_batch_size x
   dp`` rows: the actor's (old) log-probs, the reference's log-probs, the critic's values.
2. ``score``: the scalar reward per sample: reward models (summed), plus a reward function / HTTP server (run on
   process 0 and broadcast), and the running normalisation of ``--normalize_reward`` (``running_normalize``).
3. ``make_experience``: the per-token KL (``losses.kl_estimate``), then shaping, returns and advantages through the
   estimator table (``advantages.estimate``).

Shapes: B samples (prompt-major: sample i answers prompt i // n), P prompt and R response columns; response token
t of a row sits at column P + t and is predicted by the logits at column P + t - 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np


@dataclass
class Experience:
    """One rollout batch on the host. [B] per sample, [B, R] per response token, [B, P + R] per column."""

    sequences: np.ndarray  # [B, P + R] int32
    attention_mask: np.ndarray  # [B, P + R] int32
    action_mask: np.ndarray  # [B, R] float32: 1 on generated tokens
    prompt_len: int  # P
    rollout_logp: np.ndarray  # [B, R] the engine's log-probs
    old_logp: np.ndarray | None  # [B, R] the trainer's actor before the update (None: on-policy, ppo_step)
    ref_logp: np.ndarray  # [B, R] the reference (zeros without one)
    values: np.ndarray  # [B, R] the critic's (zeros without one)
    reward: np.ndarray  # [B] the raw reward, before normalisation and shaping
    kl: np.ndarray  # [B, R] per-token KL(actor || reference) estimate, masked
    advantages: np.ndarray  # [B, R]
    returns: np.ndarray  # [B, R]
    info: dict = field(default_factory=dict)  # per-batch extras: the reward function's extra logs (means)

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(self, rows: np.ndarray, *keys: str) -> dict[str, np.ndarray]:
        """A train batch: the rows' sequences, masks, token and sequence counts (the loss normalisers of
        ``--loss_agg_mode``) and the named fields."""
        mask = self.action_mask[rows]
        return {"sequences": self.sequences[rows], "attention_mask": self.attention_mask[rows], "action_mask": mask,
                "num_tokens": np.float32(max(mask.sum(), 1.0)),
                "num_sequences": np.float32(max((mask.sum(1) > 0).sum(), 1.0)),
                **{k: getattr(self, k)[rows] for k in keys}}


def forward_in_chunks(forwards: Sequence[Callable[[dict], Mapping[str, Any]]], sequences: np.ndarray,
                      attention_mask: np.ndarray, chunk: int, *, prompt_len: int) -> dict[str, np.ndarray]:
    """``{name: concatenated result}`` over ``chunk``-row slices; each fn maps ``{"sequences", "attention_mask",
    "action_mask"}`` host rows (the same on every process; [rows, P + R] and [rows, R]) to ``{name: [rows, ...]}``
    (one jitted program may compute several roles' outputs). Every chunk is dispatched before any result is
    read back, so the host never waits between programs."""
    outs: dict[str, list] = {}
    action_mask = attention_mask[:, prompt_len:].astype(np.float32)
    for a in range(0, len(sequences), chunk):
        rows = {"sequences": sequences[a:a + chunk], "attention_mask": attention_mask[a:a + chunk],
                "action_mask": action_mask[a:a + chunk]}
        for fn in forwards:
            for name, value in fn(rows).items():
                outs.setdefault(name, []).append(value)
    return {name: np.concatenate([np.asarray(v) for v in parts]) for name, parts in outs.items()}


def score(sequences: np.ndarray, attention_mask: np.ndarray, *, response_ids: list[list[int]], chunk: int,
          reward_models=None, remote_reward=None, tokenizer=None, prompts: list[str] = (), labels: list = (),
          n_samples: int = 1, normalize: bool = False) -> tuple[np.ndarray, dict]:
    """``(reward [B] float32, extra logs)``: reward models' summed scores (``--normalize_reward``: by their configs'
    mean/std) plus the reward function's / servers' (``remote_reward(queries, prompts, labels)``, called on process
    0 alone; its rewards broadcast, its errors raised on every process). Extra logs are process 0's."""
    from sharding.distributed import from_process0

    B = len(sequences)
    reward = np.zeros(B, np.float32)
    if reward_models is not None:
        with reward_models.on_device():
            for a in range(0, B, chunk):
                reward[a:a + chunk] = reward_models(sequences[a:a + chunk], attention_mask[a:a + chunk],
                                                    normalize=normalize)
    extra: dict = {}
    if remote_reward is not None:
        responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        queries = [prompts[i // n_samples] + r for i, r in enumerate(responses)]
        answered: dict = {}

        def call() -> np.ndarray:
            answered["res"] = remote_reward(queries, [prompts[i // n_samples] for i in range(B)],
                                            [labels[i // n_samples] for i in range(B)])
            return np.asarray(answered["res"].rewards, np.float32)

        reward = reward + from_process0(call, ((B,), np.float32))
        if answered:
            extra = {k: float(np.nanmean(v)) for k, v in answered["res"].extra_logs.items()}
    return reward, extra


def running_normalize(reward: np.ndarray, stats: Mapping[str, float]) -> tuple[np.ndarray, dict]:
    """Welford running mean/variance over every reward seen so far; rewards become (r - mean) / std.

    ``stats``: ``{"count", "mean", "m2"}`` (zeros at the start); returns the normalised rewards and the new stats."""
    import math

    count, mean, m2 = stats["count"], stats["mean"], stats["m2"]
    for r in reward.astype(np.float64):
        count += 1
        d = r - mean
        mean += d / count
        m2 += d * (r - mean)
    std = math.sqrt(m2 / max(count - 1, 1)) if count > 1 else 1.0
    return ((reward - mean) / max(std, 1e-8)).astype(np.float32), {"count": count, "mean": mean, "m2": m2}


def make_experience(sequences: np.ndarray, attention_mask: np.ndarray, rollout_logp: np.ndarray, *, prompt_len: int,
                    old_logp: np.ndarray | None, ref_logp: np.ndarray | None, values: np.ndarray | None,
                    raw_reward: np.ndarray, reward: np.ndarray, estimator: str, n_samples: int, kl_coef: float,
                    kl_estimator: str, use_kl_loss: bool, reward_clip_range: tuple[float, float], gamma: float,
                    lambd: float, std_norm: bool, info: dict | None = None) -> Experience:
    """Per-token KL, then ``advantages.estimate``: the rewards (``reward``, normalised or not) shaped with
    ``-kl_coef x KL`` (0 with ``use_kl_loss``: the KL is then an actor loss term) into advantages and returns."""
    import jax.numpy as jnp

    from jaxrlhf import advantages as adv
    from jaxrlhf import losses

    action_mask = attention_mask[:, prompt_len:].astype(np.float32)
    kl = np.zeros_like(rollout_logp) if ref_logp is None else np.asarray(
        losses.kl_estimate(jnp.asarray(old_logp), jnp.asarray(ref_logp), kl_estimator)) * action_mask
    advantages, returns = adv.estimate(
        estimator, jnp.asarray(reward), jnp.asarray(kl), jnp.asarray(action_mask),
        None if values is None else jnp.asarray(values), n_samples=n_samples,
        kl_coef=0.0 if use_kl_loss else kl_coef, reward_clip_range=tuple(reward_clip_range), gamma=gamma,
        lambd=lambd, std_norm=std_norm)
    zeros = np.zeros_like(rollout_logp)
    return Experience(sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
                      prompt_len=prompt_len, rollout_logp=rollout_logp, old_logp=old_logp,
                      ref_logp=zeros if ref_logp is None else ref_logp, values=zeros if values is None else values,
                      reward=raw_reward, kl=kl, advantages=np.asarray(advantages), returns=np.asarray(returns),
                      info=dict(info or {}))


def experience_metrics(exp: Experience) -> dict[str, float]:
    """What the loop logs about a rollout batch (OpenRLHF's names where it has them)."""
    mask = exp.action_mask
    n_tok = max(mask.sum(), 1.0)
    out = {}
    if exp.old_logp is not None:  # on-policy updates log the drift from their own forward (ppo_step)
        drift = np.abs(exp.rollout_logp - exp.old_logp)[mask > 0]
        out = {"rollout/logprob_diff_mean": float(drift.mean()), "rollout/logprob_diff_max": float(drift.max())}
    return {**out, "reward": float(exp.reward.mean()), "kl": float((exp.kl * mask).sum() / n_tok),
            "response_length": float(mask.sum(1).mean()), "return": float(exp.returns[:, 0].mean()),
            "advantage_abs": float(np.abs(exp.advantages).sum() / n_tok),
            "shape/prompt_len": exp.prompt_len, "shape/response_len": mask.shape[1],
            **{f"reward/{k}": v for k, v in exp.info.items()}}
