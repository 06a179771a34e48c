"""Today's RL algorithms (issue 12) against plain NumPy loops written from the papers / OpenRLHF 0.11's formulas:
the IS correction (TIS, ICEPOP, seq-mask-TIS, the FlashREINFORCE binary-KL trust region, TV gating), GSPO, loss
aggregation, the unbiased-gradient KL loss, the flash_reinforce estimator, DAPO's length penalties and dynamic
filtering. Tolerances: fp32, 1e-5 relative unless stated."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import advantages as A
from jaxrlhf import losses as L

jax.config.update("jax_enable_x64", False)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


def masks():
    """Right padding, left padding, a full row and a fully masked row (B=4, T=5)."""
    return np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.float32)


def logps(seed, spread=0.3):
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.05, 3.0, (4, 5)).astype(np.float32)
    mu = (old + rng.normal(0, spread, old.shape)).clip(max=-1e-3).astype(np.float32)
    return old, mu


# ------------------------------------------------------------------------------------------------ IS correction


def is_loop(old, mu, mask, level, mode, gating, low, high):
    """The correction written token by token (losses.is_correction's docstring)."""
    B, T = old.shape
    coef, filt = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        x = {t: max(min(float(old[b, t]) - float(mu[b, t]), 20.0), -20.0) for t in range(T)}
        w = {t: math.exp(x[t]) for t in range(T)}

        def tok_stat(t):
            if gating == "ratio":
                return w[t]
            pm = min(max(math.exp(mu[b, t]), 1e-6), 1 - 1e-6)
            pp = min(max(math.exp(old[b, t]), 1e-6), 1 - 1e-6)
            if gating == "binary_kl":
                return pm * (math.log(pm) - math.log(pp)) + (1 - pm) * (math.log(1 - pm) - math.log(1 - pp))
            return abs(pp - pm)

        if level == "seq":
            if gating == "ratio":
                s = math.exp(sum(x[t] for t in idx) / len(idx)) if idx else 1.0
            else:
                s = sum(tok_stat(t) for t in idx) / len(idx) if idx else 0.0
                s = max(s, 0.0) if gating == "binary_kl" else s
        for t in range(T):
            st = s if level == "seq" else tok_stat(t)
            keep = low <= st <= high
            if mode == "mask":
                coef[b, t] = w[t] if keep else 0.0
            else:
                coef[b, t] = min(max(w[t], low), high)
                keep = low <= w[t] <= high
            filt[b, t] = float(mask[b, t] and not keep)
    return coef, filt


@pytest.mark.parametrize("level,mode,gating,low,high", [
    ("token", "clip", "ratio", 0.5, 2.0),  # TIS
    ("token", "mask", "ratio", 0.5, 2.0),  # ICEPOP
    ("seq", "mask", "ratio", 0.8, 1.25),  # seq-mask-TIS
    ("seq", "mask", "binary_kl", -math.inf, 5e-3),  # FlashREINFORCE trust region
    ("token", "mask", "binary_kl", -math.inf, 1e-2),
    ("seq", "mask", "tv", -math.inf, 0.05),
    ("token", "mask", "tv", 0.0, 0.05),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_is_correction_matches_loop(level, mode, gating, low, high, seed):
    old, mu = logps(seed)
    mask = masks()
    coef, filt, w = L.is_correction(old, mu, mask, level=level, mode=mode, gating=gating, low=low, high=high)
    ref_coef, ref_filt = is_loop(old, mu, mask, level, mode, gating, low, high)
    valid = mask > 0
    close(np.asarray(coef)[valid], ref_coef[valid])
    np.testing.assert_array_equal(np.asarray(filt), ref_filt)
    close(np.asarray(w)[valid], np.exp(old - mu)[valid])


def test_is_correction_on_crafted_pairs():
    """Known verdicts: token ratios pi/mu = [1, 4, 0.25] (row 0) and [1.1, 0.9, 1] (row 1)."""
    mu = np.log(np.array([[0.2, 0.1, 0.4], [0.5, 0.5, 0.5]], np.float32))
    old = np.log(np.array([[0.2, 0.4, 0.1], [0.55, 0.45, 0.5]], np.float32))
    mask = np.ones((2, 3), np.float32)
    kw = dict(low=0.5, high=2.0)
    tis, tis_f, _ = L.is_correction(old, mu, mask, level="token", mode="clip", gating="ratio", **kw)
    close(tis, [[1, 2, 0.5], [1.1, 0.9, 1]])
    np.testing.assert_array_equal(tis_f, [[0, 1, 1], [0, 0, 0]])
    icepop, icepop_f, _ = L.is_correction(old, mu, mask, level="token", mode="mask", gating="ratio", **kw)
    close(icepop, [[1, 0, 0], [1.1, 0.9, 1]])
    np.testing.assert_array_equal(icepop_f, tis_f)
    # row 0's geometric mean is (1 * 4 * 0.25)^(1/3) = 1: a sequence gate keeps it, per-token weights stay
    seq, seq_f, _ = L.is_correction(old, mu, mask, level="seq", mode="mask", gating="ratio", low=0.9, high=1.1)
    close(seq, [[1, 4, 0.25], [1.1, 0.9, 1]])
    np.testing.assert_array_equal(seq_f, np.zeros((2, 3)))
    # the binary-KL trust region rejects row 0 (token KLs ~0.17), admits row 1 (~0.003)
    bkl, bkl_f, _ = L.is_correction(old, mu, mask, level="seq", mode="mask", gating="binary_kl", low=-math.inf,
                                    high=0.01)
    close(bkl, [[0, 0, 0], [1.1, 0.9, 1]])
    np.testing.assert_array_equal(bkl_f, [[1, 1, 1], [0, 0, 0]])


def test_is_correction_refuses_clip_without_token_ratio():
    old, mu = logps(0)
    for level, gating in (("seq", "ratio"), ("token", "binary_kl")):
        with pytest.raises(ValueError, match="clip"):
            L.is_correction(old, mu, masks(), level=level, mode="clip", gating=gating, low=0.5, high=2.0)


def test_flash_reinforce_gradient_matches_the_paper():
    """FlashREINFORCE (flash_reinforce estimator + seq/binary_kl/mask correction + seq-mean-token-mean, one update:
    ratio 1) has the gradient of its reference loss -(1/B) sum_b (1/T_b) sum_t admitted_b w_bt A_b log pi_bt."""
    old, mu = logps(3, spread=0.05)
    mu[0] = old[0] - 1.0  # far off: rejected
    mask = masks()[:3]
    old, mu = old[:3], mu[:3]
    reward = np.array([1.0, 0.0, 0.5], np.float32)
    adv, _ = A.estimate("flash_reinforce", reward, np.zeros_like(mask), mask, n_samples=1, kl_coef=0.0,
                        reward_clip_range=None, gamma=1.0, lambd=1.0)
    delta = 5e-3

    def loss(logp):
        coef, _, _ = L.is_correction(jax.lax.stop_gradient(logp), mu, mask, level="seq", mode="mask",
                                     gating="binary_kl", low=-math.inf, high=delta)
        pg, _ = L.ppo_policy_loss(logp, jax.lax.stop_gradient(logp), adv, eps_clip_low=0.2, eps_clip_high=0.2)
        return L.aggregate_loss(coef * pg, mask, "seq-mean-token-mean", num_tokens_total=mask.sum(),
                                num_sequences_total=3)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(old)))
    ref = np.zeros_like(old)
    for b in range(3):
        idx = np.flatnonzero(mask[b])
        pm = np.clip(np.exp(mu[b, idx]), 1e-6, 1 - 1e-6)
        pp = np.clip(np.exp(old[b, idx]), 1e-6, 1 - 1e-6)
        kl = max(np.mean(pm * np.log(pm / pp) + (1 - pm) * np.log((1 - pm) / (1 - pp))), 0.0)
        if kl <= delta:
            ref[b, idx] = -np.exp(old[b, idx] - mu[b, idx]) * (reward[b] - reward.mean()) / len(idx) / 3
    assert ref[0].sum() == 0 and np.abs(ref[1:]).sum() > 0  # one rejected, the others admitted
    close(grad, ref)


# ------------------------------------------------------------------------------------------------ GSPO, aggregation


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_matches_loop(seed):
    old, _ = logps(seed)
    rng = np.random.default_rng(seed + 10)
    logp = (old + rng.normal(0, 0.2, old.shape)).astype(np.float32)
    adv = np.repeat(rng.normal(size=(4, 1)), 5, 1).astype(np.float32)
    mask = masks()
    loss, clipped = L.gspo_policy_loss(logp, old, adv, mask, eps_clip_low=0.1, eps_clip_high=0.15)
    for b in range(4):
        idx = np.flatnonzero(mask[b])
        s = math.exp(np.mean(logp[b, idx] - old[b, idx])) if len(idx) else 1.0
        for t in range(5):
            a = float(adv[b, t])
            ref = -min(s * a, min(max(s, 0.9), 1.15) * a)
            close(loss[b, t], ref)
            assert clipped[b, t] == float(min(max(s, 0.9), 1.15) * a < s * a)

    def total(lp):
        pg, _ = L.gspo_policy_loss(lp, old, adv, mask, eps_clip_low=0.1, eps_clip_high=0.15)
        return L.aggregate_loss(pg, mask, "seq-mean-token-mean", num_tokens_total=mask.sum(), num_sequences_total=3)

    grad = np.asarray(jax.grad(total)(jnp.asarray(logp)))
    for b in range(3):  # d/dlogp_bt of -s_b A_b / 3 (unclipped rows): -s_b A_b / (3 |y_b|)
        idx = np.flatnonzero(mask[b])
        s = math.exp(np.mean(logp[b, idx] - old[b, idx]))
        if 0.9 <= s <= 1.15:
            close(grad[b, idx], -s * adv[b, 0] / len(idx) / 3, tol=1e-4)


def test_aggregate_loss_modes_and_micro_batch_split():
    rng = np.random.default_rng(0)
    loss, mask = rng.normal(size=(4, 5)).astype(np.float32), masks()
    n_tok, n_seq = mask.sum(), 3
    tok = (loss * mask).sum() / n_tok
    seq = sum((loss[b] * mask[b]).sum() / mask[b].sum() for b in range(3)) / 3
    for mode, ref in (("token-mean", tok), ("seq-mean-token-mean", seq)):
        kw = dict(num_tokens_total=n_tok, num_sequences_total=n_seq)
        close(L.aggregate_loss(loss, mask, mode, **kw), ref)
        close(sum(L.aggregate_loss(loss[i:i + 2], mask[i:i + 2], mode, **kw) for i in (0, 2)), ref)
    with pytest.raises(ValueError, match="unknown mode"):
        L.aggregate_loss(loss, mask, "seq-mean-token-sum", num_tokens_total=1, num_sequences_total=1)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_unbiased_gradient(kind):
    old, ref = logps(5)
    logp = (old + 0.1).astype(np.float32)
    value = L.kl_loss_unbiased_gradient(logp, ref, old, kind)
    close(value, L.kl_estimate(logp, ref, kind))
    grad = jax.grad(lambda lp: jnp.sum(L.kl_loss_unbiased_gradient(lp, ref, old, kind)))(jnp.asarray(logp))
    close(grad, np.exp(logp - old) * (logp - ref))  # w (log pi - log pi_ref): the reverse-KL gradient


# ------------------------------------------------------------------------------------------------ estimators, DAPO


def test_flash_reinforce_estimator():
    mask = masks()
    reward = np.array([1.0, 0.0, 0.5, 2.0], np.float32)
    adv, ret = A.estimate("flash_reinforce", reward, np.zeros_like(mask), mask, n_samples=1, kl_coef=0.0,
                          reward_clip_range=None, gamma=0.5, lambd=1.0)
    expected = np.broadcast_to((reward - reward.mean())[:, None], mask.shape)  # batch mean, no std, gamma = 1
    valid = mask > 0  # (values at padding are meaningless and masked by every consumer)
    close(np.asarray(adv)[valid], expected[valid])
    close(np.asarray(ret)[valid], expected[valid])
    assert not A.ESTIMATORS["flash_reinforce"].group and not A.ESTIMATORS["flash_reinforce"].whiten


def test_overlong_and_stop_properly_penalties():
    lengths = np.array([0, 10, 12, 13, 15, 16, 20])
    got = A.overlong_penalty(lengths, max_new_tokens=16, buffer_len=4, factor=0.5)
    ref = [-min(n - 12, 4) / 4 * 0.5 if n - 12 > 0 else 0.0 for n in lengths]
    close(got, ref)
    r, cut = np.array([1.0, 0.5, -1.0]), np.array([1, 0, 1])
    close(A.stop_properly_penalty(r, cut, 0.5), [0.5, 0.5, -0.5])
    close(A.stop_properly_penalty(r, cut, -0.3), [-0.3, 0.5, -0.3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.stop_properly_penalty(r, cut, 1.5)
    with pytest.raises(ValueError, match="buffer"):
        A.overlong_penalty(lengths, max_new_tokens=16, buffer_len=20)


def test_dynamic_filter_groups_hand_counted():
    # 5 groups of 4: all 0 (drop), all 1 (drop), mixed (keep), all 0.5 (drop: equal), mixed mean 0.5 (keep)
    r = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0, .5, .5, .5, .5, 0, 1, 1, 0], np.float32)
    np.testing.assert_array_equal(A.dynamic_filter_groups(r, 4, 0.0, 1.0), [False, False, True, False, True])
    np.testing.assert_array_equal(A.dynamic_filter_groups(r, 4, 0.3, 1.0), [False, False, False, False, True])
    with pytest.raises(ValueError, match="n_samples >= 2"):
        A.dynamic_filter_groups(r, 1, 0.0, 1.0)
