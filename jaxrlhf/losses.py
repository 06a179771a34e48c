"""Pure loss math for jaxrlhf: log-probs, entropy, KL estimators, PPO policy/value, DPO/IPO/cDPO, KTO, RM.

Every function here is a small pure function on arrays: no model, no optimizer, no global state. They are
all jit-able (string/bool/None options are static Python values; close over them or mark them static).
Shapes are in the argument names: ``_b`` = [B] (one value per sequence), ``_bt`` = [B, T] (one value per
response token), ``_btv`` = [B, T, V] (logits over the vocabulary).

Semantics follow OpenRLHF (``openrlhf/models/loss.py``, ``openrlhf/models/utils.py`` and
``openrlhf/trainer/ppo_utils/kl_controller.py``), checked against its source:

- ``kl_estimate``            == ``compute_approx_kl`` (k1/k2/k3, result clamped to [-10, 10]).
- ``ppo_policy_loss``        == ``PolicyLoss`` (policy_loss_type="ppo") before aggregation, including the
  [-20, 20] clamp of the log-ratio that recent OpenRLHF applies and the dual clip for A < 0.
- ``ppo_value_loss``         == ``ValueLoss`` before aggregation.
- ``gspo_policy_loss``       == ``PolicyLoss`` with policy_loss_type="gspo" (sequence-level ratio), not aggregated.
- ``is_correction``          == ``PolicyLoss``'s rollout/trainer importance-sampling correction (TIS, ICEPOP,
  seq-mask-TIS) generalised as OpenRLHF 0.11's ``--algo.advantage.is_correction_{level,mode,gating,threshold}``
  (FlashREINFORCE's binary-KL trust region is ``level="seq", gating="binary_kl", mode="mask"``).
- ``aggregate_loss``         == ``aggregate_loss`` / ``agg_loss`` for ``--loss_agg_mode`` token-mean |
  seq-mean-token-mean.
- ``kl_loss_unbiased_gradient``: the KL loss term whose value is the k1/k2/k3 estimate and whose gradient is the
  true reverse-KL gradient weighted by pi/pi_old (DeepSeek-V3.2's unbiased KL estimate).
- ``token_mean_over_batch`` / ``sequence_mean_over_batch`` == ``aggregate_loss`` with the global batch
  totals (``batch_num_tokens`` / ``global_batch_size``); no ``dp_size`` factor is needed here because a JAX
  step sums over the whole (sharded) global batch instead of averaging per-rank gradients.
- ``logprobs_from_hidden``   == ``logprobs_from_logits`` / ``entropy_from_logits`` of ``h @ w``, in chunks.
- ``sequence_logprobs``      == the DPO/KTO trainers' ``_get_batch_logps`` (sum and mean over the response).
- ``dpo_loss``               == ``DPOLoss`` (per pair, not averaged).
- ``kto_loss``               == ``KTOLoss`` (uneven sampling; per sample, not averaged).
- ``pairwise_rm_loss``       == ``PairWiseLoss`` ("sigmoid") / ``LogExpLoss`` ("logexp"), per pair.
- ``adaptive_kl_coef``       == ``AdaptiveKLController.update``.
- ``load_balancing_loss``    == transformers' ``load_balancing_loss_func`` (Mixtral / Qwen3-MoE aux loss, with the
  attention mask); ``router_z_loss`` == ST-MoE's router z-loss (Zoph et al. 2022).

Losses are returned per token / per sample; the caller aggregates (``token_mean_over_batch`` for the PPO
family, a plain or masked mean for the pairwise losses), so that micro-batching and padding never change
the result.
"""
from __future__ import annotations

from typing import Literal, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from jaxrlhf.models.decoder import dense

Array = jax.Array
ArrayLike = Union[jax.Array, float, int]

KL_CLAMP = 10.0  # OpenRLHF clamps every KL estimate to [-10, 10].
LOG_RATIO_CLAMP = 20.0  # OpenRLHF clamps log(pi/pi_old) to [-20, 20] before exp in the PPO loss.
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean")
IS_LEVELS = ("off", "token", "seq")
IS_MODES = ("mask", "clip")
IS_GATINGS = ("ratio", "binary_kl", "tv")


def _float(x: Array) -> Array:
    """Upcast to at least float32 (bf16/fp16 -> fp32; fp64 stays fp64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# Masked reductions
# ----------------------------------------------------------------------------------------------------------


def masked_sum(x: Array, mask: Array, axis: Optional[Union[int, Tuple[int, ...]]] = None) -> Array:
    """sum(x * mask) over ``axis`` (all axes when None), in at least fp32.

    Positions where ``mask == 0`` contribute exactly 0 even when ``x`` is NaN/inf there (a ``where``, not a
    bare product). ``mask`` may be bool, int or float (float masks act as weights).
    """
    x = _float(x)
    m = jnp.asarray(mask).astype(x.dtype)
    return jnp.sum(jnp.where(m != 0, x * m, jnp.zeros_like(x)), axis=axis)


def masked_mean(x: Array, mask: Array, axis: Optional[Union[int, Tuple[int, ...]]] = None) -> Array:
    """sum(x * mask) / sum(mask) over ``axis`` (all axes when None).

    Same as OpenRLHF's ``masked_mean`` except for an all-zero mask: OpenRLHF returns NaN (0/0), this
    returns 0, so a fully padded row or micro-batch contributes nothing instead of poisoning the step.
    """
    x = _float(x)
    m = jnp.asarray(mask).astype(x.dtype)
    num = masked_sum(x, m, axis=axis)
    den = jnp.sum(m, axis=axis)
    return num / jnp.where(den == 0, jnp.ones_like(den), den)


def token_mean_over_batch(loss_bt: Array, mask_bt: Array, num_tokens_total: ArrayLike) -> Array:
    """Token-level aggregation that is invariant to how the global batch is split:

        L = sum_{b,t} loss[b,t] * mask[b,t] / N_global

    Contract: ``num_tokens_total`` (N_global) is the number of valid tokens (sum of ``mask``) in the WHOLE
    global train batch (the optimizer step's batch), not in the micro-batch passed here. With that, for any
    split of the batch into micro-batches k = 1..K,

        sum_k token_mean_over_batch(loss_k, mask_k, N_global) == token_mean_over_batch(loss, mask, N_global)

    and the same holds for the gradients, so gradient accumulation must SUM the micro-batch gradients (not
    average them). Dividing each micro-batch by its own token count instead would weight tokens of short
    micro-batches more, and the result would depend on the split. This is OpenRLHF's ``aggregate_loss``
    with ``token_level_loss=True`` and ``batch_num_tokens`` set (there is no ``dp_size`` factor because a
    JAX step reduces over the full sharded batch rather than averaging per-rank gradients).

    Compute N_global outside the differentiated function (e.g. ``mask.sum()`` over the global batch) and
    pass it as a constant; it is wrapped in ``stop_gradient``.
    """
    n = jax.lax.stop_gradient(_float(jnp.asarray(num_tokens_total)))
    return masked_sum(loss_bt, mask_bt) / n


def sequence_mean_over_batch(loss_bt: Array, mask_bt: Array, num_sequences_total: ArrayLike) -> Array:
    """Sequence-level aggregation (OpenRLHF ``aggregate_loss`` with ``token_level_loss=False``):

        L = sum_b [count_b > 0] * (sum_t loss[b,t] * mask[b,t] / (count_b + 1e-8)) / S_global

    with count_b = sum_t mask[b,t]. ``num_sequences_total`` (S_global) is the number of sequences with at
    least one valid token in the WHOLE global train batch; the same micro-batch contract as
    ``token_mean_over_batch`` applies (sum micro-batch losses/gradients).
    """
    loss_bt = _float(loss_bt)
    m = jnp.asarray(mask_bt).astype(loss_bt.dtype)
    count_b = jnp.sum(m, axis=-1)
    seq_loss_b = masked_sum(loss_bt, m, axis=-1) / (count_b + 1e-8)
    seq_loss_b = jnp.where(count_b > 0, seq_loss_b, jnp.zeros_like(seq_loss_b))
    n = jax.lax.stop_gradient(_float(jnp.asarray(num_sequences_total)))
    return jnp.sum(seq_loss_b) / n


def aggregate_loss(loss_bt: Array, mask_bt: Array, mode: str, *, num_tokens_total: ArrayLike,
                   num_sequences_total: Optional[ArrayLike] = None) -> Array:
    """``--loss_agg_mode``: ``token-mean`` (every token weighs the same: ``token_mean_over_batch`` over N_global
    tokens) or ``seq-mean-token-mean`` (every sequence weighs the same: ``sequence_mean_over_batch`` over S_global
    sequences). Both follow the micro-batch contract of ``token_mean_over_batch`` (sum the micro-batches)."""
    if mode == "token-mean":
        return token_mean_over_batch(loss_bt, mask_bt, num_tokens_total)
    if mode == "seq-mean-token-mean":
        if num_sequences_total is None:
            raise ValueError("aggregate_loss: seq-mean-token-mean needs num_sequences_total (the step's sequences)")
        return sequence_mean_over_batch(loss_bt, mask_bt, num_sequences_total)
    raise ValueError(f"aggregate_loss: unknown mode {mode!r}; use one of {LOSS_AGG_MODES}")


# ----------------------------------------------------------------------------------------------------------
# Log-probs, entropy, KL
# ----------------------------------------------------------------------------------------------------------


def logprobs_from_logits(logits_btv: Array, labels_bt: Array, temperature: ArrayLike = 1.0) -> Array:
    """Log-probability of each label under softmax(logits / temperature), in fp32:

        z = float32(logits) / temperature
        logp[b,t] = z[b,t,labels[b,t]] - logsumexp_v z[b,t,v]

    The full [B, T, V] log_softmax is never built: one logsumexp reduction and one gather (XLA fuses the
    upcast and the division into both). ``labels_bt`` must be in [0, V) at positions that are used; at
    masked positions (e.g. -100 ignore ids) the value is undefined and must be masked out by the caller.
    Returns logp_bt, float32 [B, T].
    """
    if logits_btv.ndim != labels_bt.ndim + 1:
        raise ValueError(
            f"logprobs_from_logits: logits shape {logits_btv.shape} must be labels shape {labels_bt.shape} "
            "plus a trailing vocab axis; shift logits/labels so they align (logits[:, :-1], labels[:, 1:])."
        )
    z = _float(logits_btv) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, labels_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse


def logprobs_from_hidden(h_btd: Array, w_dv: Array, labels_bt: Array, temperature: ArrayLike = 1.0, *,
                         chunk: int = 128, with_entropy: bool = False,
                         transpose_w: bool = False) -> Tuple[Array, Optional[Array]]:
    """``logprobs_from_logits`` (and ``entropy_from_logits``) of ``logits = h @ w`` without ever building the
    [B, T, V] logits: the head and the log-softmax run over ``chunk`` positions at a time,

        for each chunk c of positions:  z_bcv = float32(h_bcd @ w_dv) / temperature
                                        logp_bc = z[labels] - logsumexp_v z,   H_bc = logsumexp_v z - sum_v p z

    and each chunk is recomputed in the backward pass (``jax.checkpoint``), so the peak memory of the loss is
    O(B x chunk x V) in both passes instead of O(B x T x V). The matmul is the decoder's (``Decoder.logits``:
    operands in ``h``'s dtype, fp32 accumulation): values and gradients equal the unchunked path's up to fp32
    summation order. ``transpose_w``: ``w`` is ``[V, D]`` (a tied head's embedding), ``logits = h @ w^T``.
    Returns ``(logp_bt, entropy_bt or None)``, float32 [B, T].
    """
    B, T = labels_bt.shape
    c = max(1, min(int(chunk), T))
    n = -(-T // c)
    pad = n * c - T
    h = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, -1).swapaxes(0, 1)  # [n, B, c, D]
    labels = jnp.pad(labels_bt.astype(jnp.int32), ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)
    w = w_dv.astype(h_btd.dtype)

    @jax.checkpoint
    def one(args):
        h_bcd, labels_bc = args
        z = dense(h_bcd, w, out_dtype=jnp.float32, transpose_w=transpose_w) / temperature
        lse = jax.nn.logsumexp(z, axis=-1)
        logp = jnp.take_along_axis(z, labels_bc[..., None], axis=-1)[..., 0] - lse
        ent = lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1) if with_entropy else jnp.zeros_like(lse)
        return logp, ent

    logp, ent = jax.lax.map(one, (h, labels))

    def unchunk(x_nbc):
        return x_nbc.swapaxes(0, 1).reshape(B, n * c)[:, :T]

    return unchunk(logp), (unchunk(ent) if with_entropy else None)


def next_token_nll(logits_btv: Array, input_ids_bt: Array, loss_mask_bt: Array, num_tokens_total: ArrayLike) -> Array:
    """Language-modelling loss of the learned tokens (SFT), invariant to the micro-batch split:

        L = - sum_{b,t>0} m[b,t] * log softmax(logits[b,t-1])[x[b,t]] / N_global     (m = loss_mask)

    ``logits_btv[:, t]`` predicts token t+1; ``num_tokens_total`` = sum of ``loss_mask[:, 1:]`` over the whole
    step batch (see ``token_mean_over_batch``).
    """
    logp_bt = logprobs_from_logits(logits_btv[:, :-1], input_ids_bt[:, 1:])
    return token_mean_over_batch(-logp_bt, loss_mask_bt[:, 1:], num_tokens_total)


def entropy_from_logits(logits_btv: Array, temperature: ArrayLike = 1.0) -> Array:
    """Entropy of softmax(logits / temperature) per position, in fp32:

        z = float32(logits) / temperature,  p = softmax(z)
        H[b,t] = logsumexp_v z[b,t,v] - sum_v p[b,t,v] * z[b,t,v]

    (OpenRLHF ``compute_entropy``). Returns entropy_bt, float32 [B, T].
    """
    z = _float(logits_btv) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jax.nn.softmax(z, axis=-1)
    return lse - jnp.sum(p * z, axis=-1)


def kl_estimate(logp_bt: Array, ref_logp_bt: Array, kind: Literal["k1", "k2", "k3"] = "k1") -> Array:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs (Schulman's k1/k2/k3):

        x  = logp - ref_logp                 (fp32)
        k1 = x
        k2 = x^2 / 2
        k3 = exp(-x) - 1 + x                 (= r - 1 - log r with r = pi_ref/pi)
        kl = clip(k, -10, 10)                (as OpenRLHF's compute_approx_kl)

    For k2/k3 x is first clipped to [-20, 20]: the clamped output is identical (|x| > 4.48 already gives
    k2 > 10, |x| >= 11 gives k3 >= 10), but exp(-x) can no longer overflow, so gradients stay finite when the
    estimate is used as a loss (GRPO's KL loss). Returns kl_bt, float32 [B, T]; positions are not masked.
    """
    x = _float(logp_bt) - _float(ref_logp_bt)
    if kind == "k1":
        k = x
    elif kind == "k2":
        xc = jnp.clip(x, -2 * KL_CLAMP, 2 * KL_CLAMP)
        k = xc * xc / 2.0
    elif kind == "k3":
        xc = jnp.clip(x, -2 * KL_CLAMP, 2 * KL_CLAMP)
        k = jnp.exp(-xc) - 1.0 + xc
    else:
        raise ValueError(f"kl_estimate: unknown kind {kind!r}; use 'k1', 'k2' or 'k3'.")
    return jnp.clip(k, -KL_CLAMP, KL_CLAMP)


# ----------------------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logp_bt: Array,
    old_logp_bt: Array,
    advantages_bt: Array,
    *,
    eps_clip_low: float,
    eps_clip_high: float,
    dual_clip: Optional[float] = None,
) -> Tuple[Array, Array]:
    """Per-token PPO clipped surrogate loss (OpenRLHF ``PolicyLoss``, policy_loss_type="ppo"), NOT aggregated:

        r      = exp(clip(logp - old_logp, -20, 20))
        surr1  = r * A
        surr2  = clip(r, 1 - eps_clip_low, 1 + eps_clip_high) * A
        clip1  = min(surr1, surr2)
        loss   = -clip1                                    (dual_clip is None)
        loss   = -(A < 0 ? max(clip1, dual_clip * A) : clip1)   (dual clip, Ye et al. 2019; dual_clip > 1)
        clipped = float(surr2 < surr1)                     (OpenRLHF's clip_ratio indicator)

    ``old_logp_bt`` and ``advantages_bt`` are constants (wrapped in ``stop_gradient``); the gradient flows
    through ``logp_bt`` only. Returns (loss_bt, clipped_bt), both float32 [B, T]; aggregate loss_bt with
    ``token_mean_over_batch`` and clipped_bt with ``masked_mean``.
    """
    _check_clips(eps_clip_low, eps_clip_high, dual_clip, "ppo_policy_loss")
    old_logp = jax.lax.stop_gradient(_float(old_logp_bt))
    log_ratio = jnp.clip(_float(logp_bt) - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return _clipped_surrogate(jnp.exp(log_ratio), advantages_bt, eps_clip_low, eps_clip_high, dual_clip)


def _check_clips(eps_clip_low, eps_clip_high, dual_clip, who: str) -> None:
    if isinstance(eps_clip_low, (int, float)) and not 0.0 <= eps_clip_low < 1.0:
        raise ValueError(f"{who}: eps_clip_low must be in [0, 1), got {eps_clip_low}.")
    if isinstance(eps_clip_high, (int, float)) and eps_clip_high < 0.0:
        raise ValueError(f"{who}: eps_clip_high must be >= 0, got {eps_clip_high}.")
    if dual_clip is not None and isinstance(dual_clip, (int, float)) and dual_clip <= 1.0:
        raise ValueError(f"{who}: dual_clip must be > 1.0 (or None to disable), got {dual_clip}.")


def _clipped_surrogate(ratio, advantages_bt, eps_clip_low, eps_clip_high, dual_clip):
    """``(-objective, clipped)``: the clipped surrogate of ``ppo_policy_loss``'s docstring for a given ratio."""
    adv = jax.lax.stop_gradient(_float(advantages_bt))
    surr1 = ratio * adv
    surr2 = jnp.clip(ratio, 1.0 - eps_clip_low, 1.0 + eps_clip_high) * adv
    clip1 = jnp.minimum(surr1, surr2)
    if dual_clip is None:
        objective = clip1
    else:
        clip2 = jnp.maximum(clip1, dual_clip * adv)
        objective = jnp.where(adv < 0, clip2, clip1)
    clipped = (surr2 < surr1).astype(jnp.float32)
    return -objective, clipped


def gspo_policy_loss(
    logp_bt: Array,
    old_logp_bt: Array,
    advantages_bt: Array,
    mask_bt: Array,
    *,
    eps_clip_low: float,
    eps_clip_high: float,
    dual_clip: Optional[float] = None,
) -> Tuple[Array, Array]:
    """Per-token GSPO loss (Zheng et al. 2025, arXiv 2507.18071; OpenRLHF ``PolicyLoss`` with
    policy_loss_type="gspo"), NOT aggregated: one importance ratio per SEQUENCE, the geometric mean of its tokens',

        s_b     = exp(clip(sum_t m[b,t] (logp - old_logp)[b,t] / max(sum_t m[b,t], 1), -20, 20))
        loss_bt = the clipped surrogate of ppo_policy_loss with r[b,t] = s_b   (dual clip as there)

    The gradient flows through the mean of ``logp_bt`` (so every token of a sequence gets s_b A / |y| of it). With
    the IS correction on, OpenRLHF takes the ratio against the engine's log-probs: pass them as ``old_logp_bt``.
    Aggregate with ``sequence_mean_over_batch`` (OpenRLHF forces the sequence mean for GSPO). The [-20, 20] clamp
    of the mean log-ratio is ours (OpenRLHF has none; it only changes ratios beyond e^20). Returns (loss_bt,
    clipped_bt), float32 [B, T].
    """
    _check_clips(eps_clip_low, eps_clip_high, dual_clip, "gspo_policy_loss")
    old_logp = jax.lax.stop_gradient(_float(old_logp_bt))
    seq_log_ratio_b = masked_sum(_float(logp_bt) - old_logp, mask_bt, axis=-1) / jnp.maximum(
        jnp.sum(jnp.asarray(mask_bt).astype(jnp.float32), axis=-1), 1.0)
    ratio_b1 = jnp.exp(jnp.clip(seq_log_ratio_b, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))[:, None]
    return _clipped_surrogate(jnp.broadcast_to(ratio_b1, jnp.shape(logp_bt)), advantages_bt, eps_clip_low,
                              eps_clip_high, dual_clip)


def _bernoulli_pair(logp_a: Array, logp_b: Array) -> Tuple[Array, Array]:
    """The two sampled-token probabilities, clipped into [1e-6, 1 - 1e-6] (as FlashREINFORCE's reference)."""
    return (jnp.clip(jnp.exp(logp_a), 1e-6, 1 - 1e-6), jnp.clip(jnp.exp(logp_b), 1e-6, 1 - 1e-6))


def is_correction(
    old_logp_bt: Array,
    rollout_logp_bt: Array,
    mask_bt: Array,
    *,
    level: str,
    mode: str,
    gating: str,
    low: float,
    high: float,
) -> Tuple[Array, Array, dict]:
    """Importance-sampling correction of the rollout/trainer mismatch: the engine (vLLM, another dtype, an older
    policy in async training) sampled from mu, the loss differentiates pi. Per response token, with pi the
    trainer's old log-probs and mu the engine's,

        x_t = clip(log pi_t - log mu_t, -20, 20),   w_t = exp(x_t)         (the per-token IS weight, a constant)

    a gating statistic per UNIT (a token for level="token", a sequence for level="seq"):

        ratio:      token: w_t                       seq: exp(mean_t x_t)            (geometric mean)
        binary_kl:  token: KL(Bern(mu_t) || Bern(pi_t)) = mu log(mu/pi) + (1-mu) log((1-mu)/(1-pi))
                    seq:   max(mean_t of that, 0)                                    (mu_t, pi_t in [1e-6, 1-1e-6])
        tv:         token: |pi_t - mu_t|             seq: mean_t of that             (TV of the two Bernoullis)

    and the coefficient that multiplies the per-token policy loss:

        keep   = low <= statistic <= high           (a sequence's verdict applies to all its tokens)
        mask:  coef_t = w_t * keep_t                (out-of-band units get no gradient, the others their w_t)
        clip:  coef_t = clip(w_t, low, high)        (level="token", gating="ratio" only: TIS)

    The named methods: TIS = (token, clip, ratio); ICEPOP = (token, mask, ratio); seq-mask-TIS = (seq, mask, ratio);
    the FlashREINFORCE trust region = (seq, mask, binary_kl) with (low, high) = (-inf, delta). Returns
    ``(coef_bt, filtered_bt, w_bt)``: the coefficient, 1.0 on valid tokens whose unit was masked or whose weight was
    clipped (0 elsewhere), and the raw weights w (all stop-gradient, float32 [B, T]).
    """
    if level not in IS_LEVELS[1:] or mode not in IS_MODES or gating not in IS_GATINGS:
        raise ValueError(f"is_correction: level {level!r} / mode {mode!r} / gating {gating!r}: use level in "
                         f"{IS_LEVELS[1:]}, mode in {IS_MODES}, gating in {IS_GATINGS}")
    if mode == "clip" and (level != "token" or gating != "ratio"):
        raise ValueError("is_correction: mode 'clip' clamps a per-token ratio (TIS): it needs level 'token' and gating "
                         "'ratio'; use mode 'mask' to filter sequences or by a divergence")
    old = jax.lax.stop_gradient(_float(old_logp_bt))
    mu = jax.lax.stop_gradient(_float(rollout_logp_bt))
    m = jnp.asarray(mask_bt).astype(jnp.float32)
    valid = m > 0
    x = jnp.clip(old - mu, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    w = jnp.exp(x)
    if gating == "ratio":
        stat = w if level == "token" else jnp.exp(masked_mean(x, m, axis=-1))[:, None]
    else:
        p_mu, p_pi = _bernoulli_pair(mu, old)
        if gating == "binary_kl":
            tok = p_mu * (jnp.log(p_mu) - jnp.log(p_pi)) + (1 - p_mu) * (jnp.log1p(-p_mu) - jnp.log1p(-p_pi))
        else:
            tok = jnp.abs(p_pi - p_mu)
        stat = tok if level == "token" else masked_mean(tok, m, axis=-1)[:, None]
        if gating == "binary_kl" and level == "seq":
            stat = jnp.maximum(stat, 0.0)
    keep = jnp.broadcast_to((stat >= low) & (stat <= high), w.shape)
    coef = jnp.where(keep, w, 0.0) if mode == "mask" else jnp.clip(w, low, high)  # clip: stat is w, keep = in band
    filtered = jnp.where(valid, (~keep).astype(jnp.float32), 0.0)
    return jax.lax.stop_gradient(coef), filtered, jax.lax.stop_gradient(w)


def kl_loss_unbiased_gradient(logp_bt: Array, ref_logp_bt: Array, old_logp_bt: Array,
                              kind: Literal["k1", "k2", "k3"] = "k3") -> Array:
    """A per-token KL loss term whose VALUE is ``kl_estimate(logp, ref_logp, kind)`` and whose GRADIENT is the true
    gradient of the reverse KL(pi || pi_ref) for samples drawn from pi_old (DeepSeek-V3.2's unbiased KL estimate):

        grad = w * (log pi - log pi_ref) * grad log pi,     w = stop_gradient(exp(clip(log pi - log pi_old, +-20)))
        term = sg(k) + g - sg(g),   g = sg(w * clip(log pi - log pi_ref, +-20)) * log pi

    (E_{pi_old}[w (log pi - log pi_ref) grad log pi] = grad KL(pi || pi_ref); the k1/k2/k3 estimators' own
    gradients are biased for it, k3's being (1 - pi_ref/pi) grad log pi.) Returns float32 [B, T], not masked.
    """
    logp = _float(logp_bt)
    k = kl_estimate(logp, ref_logp_bt, kind)
    w = jnp.exp(jnp.clip(logp - _float(old_logp_bt), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    g = jax.lax.stop_gradient(w * jnp.clip(logp - _float(ref_logp_bt), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) * logp
    return jax.lax.stop_gradient(k) + g - jax.lax.stop_gradient(g)


def ppo_value_loss(
    values_bt: Array,
    old_values_bt: Array,
    returns_bt: Array,
    *,
    value_clip: Optional[float] = None,
) -> Array:
    """Per-token PPO value loss (OpenRLHF ``ValueLoss``), NOT aggregated:

        v_clip = old_v + clip(v - old_v, -value_clip, value_clip)
        loss   = 0.5 * max((v_clip - R)^2, (v - R)^2)      (value_clip set)
        loss   = 0.5 * (v - R)^2                            (value_clip None)

    ``old_values_bt`` and ``returns_bt`` are constants (``stop_gradient``). Returns loss_bt, float32 [B, T].
    """
    v = _float(values_bt)
    old_v = jax.lax.stop_gradient(_float(old_values_bt))
    ret = jax.lax.stop_gradient(_float(returns_bt))
    if value_clip is None:
        return 0.5 * (v - ret) ** 2
    if isinstance(value_clip, (int, float)) and value_clip < 0:
        raise ValueError(f"ppo_value_loss: value_clip must be >= 0 (or None to disable), got {value_clip}.")
    v_clipped = old_v + jnp.clip(v - old_v, -value_clip, value_clip)
    return 0.5 * jnp.maximum((v_clipped - ret) ** 2, (v - ret) ** 2)


def adaptive_kl_coef(
    kl_coef: ArrayLike,
    current_kl: ArrayLike,
    n_steps: ArrayLike,
    *,
    kl_target: float,
    kl_horizon: float,
) -> Array:
    """One update of the adaptive KL controller (Ziegler et al. 2019; OpenRLHF ``AdaptiveKLController``):

        e        = clip(current_kl / kl_target - 1, -0.2, 0.2)
        new_coef = kl_coef * (1 + e * n_steps / kl_horizon)

    OpenRLHF calls it once per PPO step with n_steps = rollout_batch_size * n_samples_per_prompt. The fixed
    controller (OpenRLHF ``FixedKLController``, used when no kl_target is given) keeps ``kl_coef`` unchanged:
    just do not call this. Returns the new coefficient as a float32 scalar array.
    """
    if isinstance(kl_target, (int, float)) and kl_target <= 0:
        raise ValueError(f"adaptive_kl_coef: kl_target must be > 0, got {kl_target}; omit it for a fixed KL coef.")
    if isinstance(kl_horizon, (int, float)) and kl_horizon <= 0:
        raise ValueError(f"adaptive_kl_coef: kl_horizon must be > 0, got {kl_horizon}.")
    err = jnp.clip(_float(jnp.asarray(current_kl)) / kl_target - 1.0, -0.2, 0.2)
    return _float(jnp.asarray(kl_coef)) * (1.0 + err * n_steps / kl_horizon)


# ----------------------------------------------------------------------------------------------------------
# Preference losses
# ----------------------------------------------------------------------------------------------------------


def sequence_logprobs(logits_btv: Array, input_ids_bt: Array, loss_mask_bt: Array) -> Tuple[Array, Array]:
    """Sum and mean of the log-probabilities of the masked tokens of each sequence (OpenRLHF DPO/KTO
    ``_get_batch_logps``), in fp32:

        logp[b,t] = log softmax(logits[b,t-1])[x[b,t]]            (t >= 1: logits at t-1 predict token t)
        sum_b     = sum_{t>=1} m[b,t] * logp[b,t]
        mean_b    = sum_b / max(sum_{t>=1} m[b,t], 1)

    ``loss_mask_bt`` marks the target tokens (the response, EOS included); ``loss_mask[:, 0]`` is ignored (nothing
    predicts a sequence's first token). Returns (sum_b, mean_b), float32 [B].
    """
    logp_bt = logprobs_from_logits(logits_btv[:, :-1], input_ids_bt[:, 1:])
    m = loss_mask_bt[:, 1:]
    total = masked_sum(logp_bt, m, axis=-1)
    count = jnp.sum(jnp.asarray(m).astype(total.dtype), axis=-1)
    return total, total / jnp.maximum(count, 1.0)


def dpo_loss(
    chosen_logp_b: Array,
    rejected_logp_b: Array,
    ref_chosen_logp_b: Array,
    ref_rejected_logp_b: Array,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    ipo: bool = False,
) -> Tuple[Array, Array, Array]:
    """DPO / cDPO / IPO loss per pair (OpenRLHF ``DPOLoss`` before its ``.mean()``).

    Inputs are sequence log-probs (sum over response tokens) of policy and reference. With

        h = (chosen_logp - rejected_logp) - (ref_chosen_logp - ref_rejected_logp)

        DPO/cDPO: loss = -(1 - ls) * log sigmoid(beta * h) - ls * log sigmoid(-beta * h)   (ls = label_smoothing)
        IPO:      loss = (h - 1 / (2 * beta))^2
        chosen_reward   = beta * (chosen_logp - ref_chosen_logp)        (stop_gradient)
        rejected_reward = beta * (rejected_logp - ref_rejected_logp)    (stop_gradient)

    Returns (loss_b, chosen_reward_b, rejected_reward_b), float32 [B]; the DPO trainer averages loss_b.
    """
    if isinstance(beta, (int, float)) and beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}.")
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"dpo_loss: label_smoothing (cDPO) must be in [0, 1], got {label_smoothing}.")
    pc, pr = _float(chosen_logp_b), _float(rejected_logp_b)
    rc, rr = _float(ref_chosen_logp_b), _float(ref_rejected_logp_b)
    h = (pc - pr) - (rc - rr)
    if ipo:
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        loss = -jax.nn.log_sigmoid(beta * h) * (1.0 - label_smoothing) - jax.nn.log_sigmoid(-beta * h) * label_smoothing
    chosen_reward = jax.lax.stop_gradient(beta * (pc - rc))
    rejected_reward = jax.lax.stop_gradient(beta * (pr - rr))
    return loss, chosen_reward, rejected_reward


def kto_loss(
    policy_logp_b: Array,
    ref_logp_b: Array,
    desirable_b: Array,
    kl_b_or_scalar: ArrayLike,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    kl_mask_b: Optional[Array] = None,
) -> Tuple[Array, Array]:
    """KTO loss per sample (OpenRLHF ``KTOLoss``, uneven sampling, before its ``.mean()``).

    ``kl_b_or_scalar`` is the KL reference point's raw material: per-row log-ratios
    policy_KL_logp - ref_KL_logp of MISMATCHED (prompt, completion) pairs, shape [B'], or an already
    reduced scalar. With rho = logp - ref_logp of the real pairs:

        z0     = stop_gradient(max(mean(kl_b), 0))        (mean over kl_mask_b when given)
        loss_b = desirable_weight   * (1 - sigmoid(beta * (rho - z0)))   if desirable_b
                 undesirable_weight * (1 - sigmoid(beta * (z0 - rho)))   otherwise
        reward_b = stop_gradient(beta * rho)

    OpenRLHF averages the KL over each rank's micro-batch and then across ranks with an all-reduce; here
    pass the arrays of the whole (sharded) batch and the mean is the global one. The trainer averages
    loss_b over all samples (desirable and undesirable together). Returns (loss_b, rewards_b), float32 [B].
    """
    if isinstance(beta, (int, float)) and beta <= 0:
        raise ValueError(f"kto_loss: beta must be > 0, got {beta}.")
    rho = _float(policy_logp_b) - _float(ref_logp_b)
    kl = _float(jnp.asarray(kl_b_or_scalar))
    if kl.ndim == 0:
        kl_mean = kl
    elif kl_mask_b is None:
        kl_mean = jnp.mean(kl)
    else:
        kl_mean = masked_mean(kl, kl_mask_b)
    z0 = jax.lax.stop_gradient(jnp.maximum(kl_mean, 0.0))
    desirable = jnp.asarray(desirable_b).astype(bool)
    chosen_losses = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (rho - z0)))
    rejected_losses = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - rho)))
    loss = jnp.where(desirable, chosen_losses, rejected_losses)
    rewards = jax.lax.stop_gradient(beta * rho)
    return loss, rewards


def pairwise_rm_loss(
    chosen_b: Array,
    rejected_b: Array,
    margin_b: Optional[Array] = None,
    kind: Literal["sigmoid", "logexp"] = "sigmoid",
) -> Array:
    """Pairwise reward-model loss per pair (OpenRLHF ``PairWiseLoss`` / ``LogExpLoss`` before ``.mean()``):

        sigmoid: loss = -log sigmoid(chosen - rejected - margin)      (margin = 0 when None)
        logexp:  loss = log(1 + exp(rejected - chosen))               (= softplus, computed stably)

    Mathematically sigmoid and logexp coincide without a margin. OpenRLHF's LogExpLoss silently ignores a
    margin; here passing one with kind="logexp" is an error. Returns loss_b, float32 [B].
    """
    c, r = _float(chosen_b), _float(rejected_b)
    if kind == "sigmoid":
        d = c - r
        if margin_b is not None:
            d = d - _float(margin_b)
        return -jax.nn.log_sigmoid(d)
    if kind == "logexp":
        if margin_b is not None:
            raise ValueError(
                "pairwise_rm_loss: kind='logexp' has no margin term (OpenRLHF's LogExpLoss ignores it); "
                "pass margin_b=None or use kind='sigmoid'."
            )
        return jax.nn.softplus(r - c)
    raise ValueError(f"pairwise_rm_loss: unknown kind {kind!r}; use 'sigmoid' or 'logexp'.")


# ---------------------------------------------------------------------------------------------------------------------
# Mixture-of-experts auxiliary losses (router logits: ``_lbte`` = [L_moe, B, T, E], one slice per sparse layer)
# ---------------------------------------------------------------------------------------------------------------------
def load_balancing_loss(router_logits_lbte: Array, mask_bt: Array, top_k: int) -> Array:
    """Switch-Transformer load-balancing loss over all sparse layers, as transformers' ``load_balancing_loss_func``.

    With ``p = softmax(logits)`` per token and layer, ``sel_e = [e in top_k(p)]`` and the real tokens ``m`` (mask),
    counted over every layer ``l`` and token ``n`` together (``M = L sum_n m_n``)::

        f_e = sum_{l,n} m_n sel_{l,n,e} / M        (assignments routed to e; sums to top_k)
        P_e = sum_{l,n} m_n p_{l,n,e} / M          (router probability of e)
        loss = E * sum_e f_e P_e

    A uniform router gives ``top_k``; collapse onto k experts gives ``E`` (for k = 1).
    """
    L, _, _, E = router_logits_lbte.shape
    p = jax.nn.softmax(router_logits_lbte.astype(jnp.float32), axis=-1)
    _, idx = jax.lax.top_k(p, top_k)
    sel = jax.nn.one_hot(idx, E, dtype=jnp.float32).sum(-2)  # [L, B, T, E]
    m = mask_bt.astype(jnp.float32)[None, :, :, None]
    total = L * jnp.maximum(jnp.sum(mask_bt.astype(jnp.float32)), 1.0)
    f_e = jnp.sum(sel * m, axis=(0, 1, 2)) / total
    p_e = jnp.sum(p * m, axis=(0, 1, 2)) / total
    return E * jnp.sum(f_e * p_e)


def router_z_loss(router_logits_lbte: Array, mask_bt: Array) -> Array:
    """ST-MoE router z-loss: ``mean_{l, real n} (logsumexp_e logits_{l,n,e})^2`` (keeps router logits small)."""
    z = jax.nn.logsumexp(router_logits_lbte.astype(jnp.float32), axis=-1) ** 2  # [L, B, T]
    m = jnp.broadcast_to(mask_bt.astype(jnp.float32)[None], z.shape)
    return masked_mean(z, m)


def moe_aux_losses(entries, *, top_k: int, aux_loss_coef: float, z_loss_coef: float) -> Tuple[Array, dict]:
    """``coef_aux * load_balancing_loss + coef_z * router_z_loss``, averaged over the forwards in ``entries``
    (``[(router_logits_lbte, mask_bt)]``, one per forward a loss function ran), and the two losses as metrics."""
    aux = sum(load_balancing_loss(lg, m, top_k) for lg, m in entries) / len(entries)
    z = sum(router_z_loss(lg, m) for lg, m in entries) / len(entries)
    return aux_loss_coef * aux + z_loss_coef * z, {"aux_loss": aux, "router_z_loss": z}
