"""Pure advantage math for jaxrlhf: KL reward shaping, GAE, REINFORCE returns, group baselines, whitening.

All functions are pure and jit-able (string options and ``n_samples`` are static Python values). Shapes are
in the names: ``_b`` = [B] one value per response, ``_bt`` = [B, T] one value per response token, where
``mask_bt`` / ``action_mask_bt`` marks the valid (generated) tokens of each row.

How OpenRLHF builds advantages, per ``--advantage_estimator``
(``openrlhf/trainer/ppo_utils/experience_maker.py``: ``compute_advantages_and_returns``,
``get_advantages_and_returns``, ``get_cumulative_returns``; ``openrlhf/models/utils.py``: ``compute_reward``),
verified against its source, and the functions here that reproduce each step:

0. Length penalties on the raw reward (OpenRLHF ``ppo_utils/length_penalty.py``): ``overlong_penalty`` (DAPO),
   ``stop_properly_penalty`` (ProRL: truncated samples). DAPO's dynamic filtering (``dynamic_filter_groups``)
   happens before, on the raw rewards, when the rollout batch is collected.
1. Group shaping of the scalar reward r_b (rows grouped as consecutive blocks of n_samples_per_prompt):
   ``group_shaped_rewards`` for rloo | reinforce_baseline | group_norm | dr_grpo; flash_reinforce subtracts the
   mean over the whole rollout batch (FlashREINFORCE: no group, no std); gae and reinforce skip it.
2. KL shaping: ``shape_rewards`` clips the (already group-shaped) reward to reward_clip_range and places it
   on the last valid token, plus -kl_coef * kl on every token (kl from ``losses.kl_estimate``; kl is all
   zeros when --use_kl_loss moves the KL into the actor loss instead).
3. Returns / advantages:
   - gae:                 ``gae(rewards, values, mask, gamma, lambd)`` -> advantages, returns.
   - reinforce, rloo, reinforce_baseline, group_norm, dr_grpo:
                          ``discounted_returns(rewards, mask, gamma)``; advantages = returns. OpenRLHF forces
                          gamma = 1.0 (with a warning) for rloo, reinforce_baseline, group_norm and dr_grpo;
                          only plain reinforce honours --gamma.
4. Normalization: ``whiten(advantages, mask)`` over ALL tokens of the whole rollout batch (not per
   micro-batch) for gae, reinforce and reinforce_baseline only (--no_advantage_std_norm: ``scale_std=False``);
   rloo, group_norm and dr_grpo are NOT whitened.

So: gae = shape_rewards + gae + whiten; reinforce = shape_rewards + discounted_returns + whiten;
reinforce_baseline = group_shaped_rewards + shape_rewards + discounted_returns(gamma=1) + whiten;
rloo / group_norm / dr_grpo = group_shaped_rewards + shape_rewards + discounted_returns(gamma=1), no whiten;
flash_reinforce = (r - batch mean) + shape_rewards + discounted_returns(gamma=1), no whiten.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple, Union, get_args

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = Union[jax.Array, float, int]

Estimator = Literal["gae", "reinforce", "reinforce_baseline", "rloo", "group_norm", "dr_grpo", "flash_reinforce"]
GroupEstimator = Literal["reinforce_baseline", "rloo", "group_norm", "dr_grpo"]


@dataclass(frozen=True)
class EstimatorSpec:
    """What an ``--advantage_estimator`` needs and does (the table below is the one place that knows)."""

    critic: bool  # a value model: GAE over its values (else returns = advantages)
    group: bool  # a per-prompt baseline over n_samples_per_prompt >= 2 responses (group_shaped_rewards)
    whiten: bool  # advantages whitened over the whole rollout batch
    gamma: bool  # honours --gamma (OpenRLHF forces gamma = 1 for the others but gae)
    batch_baseline: bool = False  # the mean reward of the whole rollout batch is subtracted (flash_reinforce)


ESTIMATORS: dict[str, EstimatorSpec] = {
    "gae": EstimatorSpec(critic=True, group=False, whiten=True, gamma=True),
    "reinforce": EstimatorSpec(critic=False, group=False, whiten=True, gamma=True),
    "reinforce_baseline": EstimatorSpec(critic=False, group=True, whiten=True, gamma=False),
    "rloo": EstimatorSpec(critic=False, group=True, whiten=False, gamma=False),
    "group_norm": EstimatorSpec(critic=False, group=True, whiten=False, gamma=False),
    "dr_grpo": EstimatorSpec(critic=False, group=True, whiten=False, gamma=False),
    "flash_reinforce": EstimatorSpec(critic=False, group=False, whiten=False, gamma=False, batch_baseline=True),
}
GROUP_ESTIMATORS = tuple(k for k, v in ESTIMATORS.items() if v.group)
assert set(get_args(Estimator)) == set(ESTIMATORS) and set(get_args(GroupEstimator)) == set(GROUP_ESTIMATORS)


def estimate(
    estimator: Estimator,
    reward_b: Array,
    kl_bt: Array,
    action_mask_bt: Array,
    values_bt: Optional[Array] = None,
    *,
    n_samples: int,
    kl_coef: ArrayLike,
    reward_clip_range: Optional[Tuple[float, float]],
    gamma: float,
    lambd: float,
    std_norm: bool = True,
) -> Tuple[Array, Array]:
    """``(advantages_bt, returns_bt)`` of one rollout batch, as OpenRLHF's ``compute_advantages_and_returns``:

        r_b       = group_shaped_rewards(r_b, n_samples, estimator)          (group estimators)
                  | r_b - mean_b r_b                                         (flash_reinforce)
        rewards   = shape_rewards(r_b, kl_bt, mask, kl_coef, reward_clip_range)
        adv, ret  = gae(rewards, values, mask, gamma, lambd)                  (critic estimators)
                  | ret = discounted_returns(rewards, mask, gamma or 1); adv = ret
        adv       = whiten(adv, mask, scale_std=std_norm)                     (whitening estimators)

    ``values_bt`` is required exactly when the estimator needs a critic. Pass ``kl_coef=0`` when the KL is an
    actor loss term (--use_kl_loss). float32 [B, T] each.
    """
    spec = ESTIMATORS[estimator]
    if spec.critic != (values_bt is not None):
        raise ValueError(f"estimate: {estimator!r} {'needs' if spec.critic else 'takes no'} critic values_bt")
    shaped_b = group_shaped_rewards(reward_b, n_samples, estimator) if spec.group else reward_b
    if spec.batch_baseline:
        shaped_b = _float(reward_b) - jnp.mean(_float(reward_b))
    rewards_bt = shape_rewards(shaped_b, kl_bt, action_mask_bt, kl_coef=kl_coef, reward_clip_range=reward_clip_range)
    mask = jnp.asarray(action_mask_bt)
    if spec.critic:
        advantages_bt, returns_bt = gae(rewards_bt, values_bt, mask, gamma=gamma, lambd=lambd)
    else:
        returns_bt = discounted_returns(rewards_bt, mask, gamma=gamma if spec.gamma else 1.0)
        advantages_bt = returns_bt
    if spec.whiten:
        advantages_bt = whiten(advantages_bt, mask, scale_std=std_norm)
    return advantages_bt, returns_bt


def _float(x: Array) -> Array:
    """Upcast to at least float32."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_bt(name: str, **arrays_bt: Array) -> None:
    shapes = {k: jnp.shape(v) for k, v in arrays_bt.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"{name}: expected arrays of one [B, T] shape, got {shapes}.")


def shape_rewards(
    reward_b: Array,
    kl_bt: Array,
    action_mask_bt: Array,
    *,
    kl_coef: ArrayLike,
    reward_clip_range: Optional[Tuple[float, float]] = None,
) -> Array:
    """Per-token rewards from a scalar reward and a per-token KL (OpenRLHF ``compute_reward``):

        r_b'        = clip(r_b, lo, hi)                    (when reward_clip_range = (lo, hi))
        last_b      = max{t : mask[b,t] = 1}               (last valid token; left and right padding both fine)
        rewards[b,t] = [t = last_b] * r_b'  -  max(kl_coef, 0) * kl[b,t] * mask[b,t]

    A row without any valid token gets all-zero rewards (no NaN; OpenRLHF would scatter r onto column T-1,
    which its GAE/returns then mask away, so the result after masking is the same). The KL term is zeroed
    at masked positions (OpenRLHF leaves it there; every consumer masks it, so nothing downstream changes).
    Returns rewards_bt, float32 [B, T].
    """
    _check_bt("shape_rewards", kl_bt=kl_bt, action_mask_bt=action_mask_bt)
    r = _float(reward_b)
    if r.shape != (kl_bt.shape[0],):
        raise ValueError(
            f"shape_rewards: reward_b must have shape [B]=({kl_bt.shape[0]},), got {r.shape}; squeeze a [B, 1] reward."
        )
    if reward_clip_range is not None:
        lo, hi = reward_clip_range
        r = jnp.clip(r, lo, hi)
    kl = _float(kl_bt)
    valid = jnp.asarray(action_mask_bt) != 0
    t_idx = jnp.arange(kl.shape[1])
    last_b = jnp.max(jnp.where(valid, t_idx[None, :], -1), axis=1)  # -1 for an empty row
    at_last = t_idx[None, :] == last_b[:, None]  # all False for an empty row
    coef = jnp.maximum(_float(jnp.asarray(kl_coef)), 0.0)
    kl_reward = jnp.where(valid, -coef * kl, jnp.zeros_like(kl))
    return jnp.where(at_last, r[:, None], jnp.zeros_like(kl)) + kl_reward


def gae(
    rewards_bt: Array,
    values_bt: Array,
    mask_bt: Array,
    *,
    gamma: float,
    lambd: float,
) -> Tuple[Array, Array]:
    """Generalized advantage estimation (OpenRLHF ``get_advantages_and_returns``):

        v = values * mask,  r = rewards * mask,  v[:, T] = 0
        delta_t = r_t + gamma * v_{t+1} - v_t
        A_t     = delta_t + gamma * lambd * A_{t+1}        (A_T = 0; a jax.lax.scan reversed over T)
        R_t     = A_t + v_t

    Masked positions are zeroed before the recursion, exactly as OpenRLHF does; values at masked positions
    of the outputs are meaningless and must stay masked. Treat both outputs as constants (targets).
    Returns (advantages_bt, returns_bt), float32 [B, T].
    """
    _check_bt("gae", rewards_bt=rewards_bt, values_bt=values_bt, mask_bt=mask_bt)
    m = _float(mask_bt)
    v = _float(values_bt) * m
    r = _float(rewards_bt) * m
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    delta_bt = r + gamma * next_v - v

    def step(carry_b: Array, delta_b: Array) -> Tuple[Array, Array]:
        carry_b = delta_b + gamma * lambd * carry_b
        return carry_b, carry_b

    _, adv_tb = jax.lax.scan(step, jnp.zeros_like(delta_bt[:, 0]), delta_bt.T, reverse=True)
    adv_bt = adv_tb.T
    return adv_bt, adv_bt + v


def discounted_returns(rewards_bt: Array, mask_bt: Array, *, gamma: float) -> Array:
    """REINFORCE cumulative returns (OpenRLHF ``get_cumulative_returns``):

        r = rewards * mask
        G_t = r_t + gamma * G_{t+1}                          (G_T = 0; a jax.lax.scan reversed over T)

    Returns returns_bt, float32 [B, T]; REINFORCE-family estimators use it as the advantage too.
    """
    _check_bt("discounted_returns", rewards_bt=rewards_bt, mask_bt=mask_bt)
    r = _float(rewards_bt) * _float(mask_bt)

    def step(carry_b: Array, r_b: Array) -> Tuple[Array, Array]:
        carry_b = r_b + gamma * carry_b
        return carry_b, carry_b

    _, ret_tb = jax.lax.scan(step, jnp.zeros_like(r[:, 0]), r.T, reverse=True)
    return ret_tb.T


def group_shaped_rewards(reward_b: Array, n_samples: int, estimator: GroupEstimator) -> Array:
    """Per-prompt baselines for the scalar rewards (the reward shaping in OpenRLHF's
    ``compute_advantages_and_returns``). Rows are grouped as consecutive blocks of ``n_samples`` responses
    to one prompt: row b belongs to group b // n_samples. For a group g with rewards r_1..r_n:

        rloo:                    r_i - (sum_j r_j - r_i) / (n - 1)      (leave-one-out mean)
        reinforce_baseline, dr_grpo: r_i - mean_j r_j
        group_norm (GRPO):       (r_i - mean_j r_j) / (std_j r_j + 1e-9)   (unbiased std, ddof=1, like torch.std)

    n_samples == 1 is an error for every estimator: rloo would divide by zero and group_norm's unbiased std
    is NaN (OpenRLHF asserts n_samples_per_prompt > 1 for rloo, reinforce_baseline and group_norm), and
    reinforce_baseline / dr_grpo would turn every reward into 0 (OpenRLHF does not check dr_grpo and
    silently trains on zero advantages). Use "reinforce" or "gae" (no group shaping) with one sample.
    Returns shaped reward_b, float32 [B].
    """
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(
            f"group_shaped_rewards: unknown estimator {estimator!r}; use one of {GROUP_ESTIMATORS} "
            "(gae and reinforce use the raw reward: skip this function)."
        )
    if not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(
            f"group_shaped_rewards: estimator {estimator!r} needs n_samples_per_prompt >= 2, got {n_samples!r}; "
            "sample several responses per prompt or use 'reinforce' / 'gae'."
        )
    r = _float(reward_b)
    if r.ndim != 1 or r.shape[0] % n_samples != 0:
        raise ValueError(
            f"group_shaped_rewards: reward_b must be [B] with B a multiple of n_samples={n_samples}, got shape "
            f"{r.shape}; keep all n_samples responses of a prompt together in the batch."
        )
    r_gn = r.reshape(-1, n_samples)
    mean_g1 = jnp.mean(r_gn, axis=1, keepdims=True)
    if estimator == "rloo":
        baseline_gn = (jnp.sum(r_gn, axis=1, keepdims=True) - r_gn) / (n_samples - 1)
        out_gn = r_gn - baseline_gn
    elif estimator in ("reinforce_baseline", "dr_grpo"):
        out_gn = r_gn - mean_g1
    else:  # group_norm
        std_g1 = jnp.std(r_gn, axis=1, keepdims=True, ddof=1)
        out_gn = (r_gn - mean_g1) / (std_g1 + 1e-9)
    return out_gn.reshape(-1)


def whiten(
    x_bt: Array,
    mask_bt: Array,
    *,
    shift_mean: bool = True,
    scale_std: bool = True,
    eps: float = 1e-8,
) -> Array:
    """Masked global whitening over every valid token of ``x_bt`` (OpenRLHF's advantage normalization):

        mu    = sum(x * mask) / sum(mask)
        var   = sum((x - mu)^2 * mask) / sum(mask)             (population variance)
        y     = (x - mu) * rsqrt(max(var, eps))                (scale_std=False: y = x - mu,
                                                                 OpenRLHF --no_advantage_std_norm)
        y     = y + mu                                         (only when shift_mean=False: rescale, keep mean)
        y     = 0 where mask == 0                               (masked positions set to 0)

    Call it once on the advantages of the WHOLE rollout batch (OpenRLHF normalizes across all experiences),
    never per micro-batch. OpenRLHF leaves (0 - mu) * rstd at masked positions; zeroing them changes nothing
    downstream because every loss masks them. Returns float32 [B, T].
    """
    x = _float(x_bt)
    m = _float(mask_bt)
    n = jnp.sum(m)
    n = jnp.where(n == 0, jnp.ones_like(n), n)
    mu = jnp.sum(jnp.where(m != 0, x * m, 0.0)) / n
    centered = x - mu
    if scale_std:
        var = jnp.sum(jnp.where(m != 0, centered**2 * m, 0.0)) / n
        y = centered * jax.lax.rsqrt(jnp.maximum(var, eps))
    else:
        y = centered
    if not shift_mean:
        y = y + mu
    return jnp.where(m != 0, y, jnp.zeros_like(y))


# ----------------------------------------------------------------------------------------------------------
# DAPO / ProRL: length penalties and dynamic filtering (NumPy: they run on the host before the advantages)
# ----------------------------------------------------------------------------------------------------------


def overlong_penalty(response_len_b, *, max_new_tokens: int, buffer_len: float, factor: float = 1.0):
    """DAPO's soft overlong punishment (OpenRLHF ``apply_overlong_penalty``), added to the raw reward:

        expected = max_new_tokens - buffer_len
        exceed_b = min(len_b - expected, buffer_len)
        penalty_b = -exceed_b / buffer_len * factor     where exceed_b > 0, else 0

    Returns penalty_b, float32 [B] (<= 0).
    """
    import numpy as np

    if not 0 < buffer_len <= max_new_tokens:
        raise ValueError(f"overlong_penalty: the buffer length must be in (0, max_new_tokens={max_new_tokens}], got "
                         f"{buffer_len}; lower --overlong_buffer_len")
    exceed = np.minimum(np.asarray(response_len_b, np.float64) - (max_new_tokens - buffer_len), buffer_len)
    return np.where(exceed > 0, -exceed / buffer_len * factor, 0.0).astype(np.float32)


def stop_properly_penalty(reward_b, truncated_b, coef: float):
    """ProRL's penalty of truncated samples (OpenRLHF ``apply_stop_properly_penalty``; truncated = the engine stopped
    at max_new_tokens, finish_reason "length"):

        r_b' = r_b * coef   if truncated_b and coef >= 0   (coef in [0, 1]: scale the reward down)
        r_b' = coef         if truncated_b and coef < 0    (a fixed negative reward)
        r_b' = r_b          otherwise

    Returns float32 [B].
    """
    import numpy as np

    if coef > 1:
        raise ValueError(f"stop_properly_penalty: the coefficient must be in [0, 1] or negative, got {coef}")
    r = np.asarray(reward_b, np.float32)
    cut = np.asarray(truncated_b, bool)
    return np.where(cut, np.float32(coef) if coef < 0 else r * np.float32(coef), r).astype(np.float32)


def dynamic_filter_groups(reward_b, n_samples: int, low: float, high: float):
    """DAPO's dynamic sampling filter (OpenRLHF ``--dynamic_filtering``): which prompt groups (consecutive blocks of
    ``n_samples`` rows) to keep,

        keep_g = low < mean_i r_gi < high   and   not (r_g1 = ... = r_gn)

    A group whose rewards are all equal has zero advantage under every group baseline (no gradient, only noise
    in the token mean); OpenRLHF's range test alone drops such groups for 0/1 rewards, the equality test drops
    them for any reward. Returns keep_g, bool [B / n_samples].
    """
    import numpy as np

    r = np.asarray(reward_b, np.float64)
    if n_samples < 2 or r.ndim != 1 or len(r) % n_samples:
        raise ValueError(f"dynamic_filter_groups: needs groups of n_samples >= 2 rows, got {n_samples} samples per "
                         f"prompt and {r.shape} rewards")
    r_gn = r.reshape(-1, n_samples)
    mean_g = r_gn.mean(1)
    return (low < mean_g) & (mean_g < high) & (r_gn.max(1) > r_gn.min(1))
