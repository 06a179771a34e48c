"""Tests for jaxrlhf.advantages against independent Python-loop references.

The references below are written from the equations (and OpenRLHF's loop formulation), token by token, in
float64. Tolerances: fp32 results vs float64 references with rtol=1e-5, atol=1e-5 (recursions over T=12
tokens accumulate ~T ulps), unless a test says otherwise.
"""
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import advantages as A
from jaxrlhf import losses as L

RTOL = 1e-5
ATOL = 1e-5
SEEDS = [0, 1, 2, 3]


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def random_mask(rng, B, T):
    """Padding at both ends (mask[b, s:s+n] = 1); row 0 empty, row 1 full."""
    mask = np.zeros((B, T), dtype=np.float32)
    mask[1, :] = 1
    for b in range(2, B):
        s = rng.integers(0, T // 3 + 1)
        n = rng.integers(1, T - s + 1)
        mask[b, s : s + n] = 1
    return mask


# ------------------------------------------------------------------------------------------------ references


def ref_shape_rewards(r, kl, mask, kl_coef, clip_range):
    B, T = kl.shape
    coef = max(kl_coef, 0.0)
    out = np.zeros((B, T))
    for b in range(B):
        rb = float(r[b])
        if clip_range is not None:
            rb = min(max(rb, clip_range[0]), clip_range[1])
        for t in range(T):
            if mask[b, t]:
                out[b, t] = -coef * float(kl[b, t])
        for t in reversed(range(T)):  # last valid token gets the scalar reward
            if mask[b, t] > 0.5:
                out[b, t] += rb
                break
    return out


def ref_gae(rewards, values, mask, gamma, lambd):
    B, T = rewards.shape
    adv = np.zeros((B, T))
    ret = np.zeros((B, T))
    for b in range(B):
        v = [float(values[b, t]) * float(mask[b, t]) for t in range(T)]
        r = [float(rewards[b, t]) * float(mask[b, t]) for t in range(T)]
        last = 0.0
        for t in reversed(range(T)):
            nv = v[t + 1] if t < T - 1 else 0.0
            delta = r[t] + gamma * nv - v[t]
            last = delta + gamma * lambd * last
            adv[b, t] = last
            ret[b, t] = last + v[t]
    return adv, ret


def ref_returns(rewards, mask, gamma):
    B, T = rewards.shape
    out = np.zeros((B, T))
    for b in range(B):
        g = 0.0
        for t in reversed(range(T)):
            g = float(rewards[b, t]) * float(mask[b, t]) + gamma * g
            out[b, t] = g
    return out


def ref_group(r, n, estimator):
    out = []
    for g0 in range(0, len(r), n):
        grp = [float(v) for v in r[g0 : g0 + n]]
        mean = sum(grp) / n
        for i, ri in enumerate(grp):
            if estimator == "rloo":
                out.append(ri - (sum(grp) - ri) / (n - 1))
            elif estimator in ("reinforce_baseline", "dr_grpo"):
                out.append(ri - mean)
            else:
                out.append((ri - mean) / (statistics.stdev(grp) + 1e-9))
    return np.array(out)


def ref_whiten(x, mask, scale_std=True):
    vals = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    mu = sum(vals) / len(vals)
    var = sum((v - mu) ** 2 for v in vals) / len(vals)
    rstd = 1 / np.sqrt(max(var, 1e-8)) if scale_std else 1.0
    return np.where(mask != 0, (x.astype(np.float64) - mu) * rstd, 0.0)


# ------------------------------------------------------------------------------------------------ unit tests


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("clip_range", [None, (-1.0, 0.5)])
def test_shape_rewards(seed, clip_range):
    rng = np.random.default_rng(seed)
    B, T = 6, 12
    r = rng.normal(size=B).astype(np.float32) * 2
    kl = rng.normal(size=(B, T)).astype(np.float32)
    mask = random_mask(rng, B, T)
    kl_coef = 0.05
    fn = jax.jit(lambda a, b, c: A.shape_rewards(a, b, c, kl_coef=kl_coef, reward_clip_range=clip_range))
    out = np.asarray(fn(r, kl, mask))
    close(out, ref_shape_rewards(r, kl, mask, kl_coef, clip_range))
    assert np.all(np.isfinite(out)) and np.all(out[0] == 0)  # empty row: all zero, no NaN
    # bool mask works the same
    close(fn(r, kl, mask.astype(bool)), out)
    # negative kl_coef behaves like 0 (OpenRLHF)
    close(A.shape_rewards(r, kl, mask, kl_coef=-1.0), ref_shape_rewards(r, kl, mask, 0.0, None))
    with pytest.raises(ValueError, match="reward_b must have shape"):
        A.shape_rewards(r[:, None], kl, mask, kl_coef=0.1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lambd", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.9)])
def test_gae(seed, gamma, lambd):
    rng = np.random.default_rng(seed)
    B, T = 5, 12
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    mask = random_mask(rng, B, T)
    adv, ret = jax.jit(lambda a, b, c: A.gae(a, b, c, gamma=gamma, lambd=lambd))(rewards, values, mask)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lambd)
    close(adv, ref_adv)
    close(ret, ref_ret)
    with pytest.raises(ValueError, match="one \\[B, T\\] shape"):
        A.gae(rewards, values[:, :-1], mask, gamma=gamma, lambd=lambd)


def test_gae_closed_form():
    # lambda = 1, gamma = 1, values 0: advantage = return = sum of future masked rewards
    r = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    m = np.array([[0, 1, 1, 0]], dtype=np.float32)
    adv, ret = A.gae(r, np.zeros_like(r), m, gamma=1.0, lambd=1.0)
    close(adv, [[5.0, 5.0, 3.0, 0.0]])
    close(ret, [[5.0, 5.0, 3.0, 0.0]])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns(seed, gamma):
    rng = np.random.default_rng(seed)
    B, T = 5, 12
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    mask = random_mask(rng, B, T)
    out = jax.jit(lambda a, b: A.discounted_returns(a, b, gamma=gamma))(rewards, mask)
    close(out, ref_returns(rewards, mask, gamma))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("estimator", ["reinforce_baseline", "rloo", "group_norm", "dr_grpo"])
@pytest.mark.parametrize("n", [2, 4])
def test_group_shaped_rewards(seed, estimator, n):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=3 * n).astype(np.float32)
    r[:n] = 0.5  # a constant group: std 0 -> group_norm gives 0, not NaN
    fn = jax.jit(A.group_shaped_rewards, static_argnums=(1, 2))
    out = np.asarray(fn(r, n, estimator))
    close(out, ref_group(r, n, estimator), atol=1e-5)
    assert np.all(np.isfinite(out))
    # every estimator gives zero-sum groups (rloo: sum_i r_i - (n-1)/(n-1) * ... = n/(n-1) * centered sum = 0)
    close(out.reshape(-1, n).sum(1), np.zeros(3), atol=1e-5)


def test_group_shaped_rewards_known_values():
    r = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=np.float32)  # groups of 3: [1,0,0], [1,1,1]
    close(A.group_shaped_rewards(r, 3, "rloo"), [1.0, -0.5, -0.5, 0.0, 0.0, 0.0])
    close(A.group_shaped_rewards(r, 3, "reinforce_baseline"), [2 / 3, -1 / 3, -1 / 3, 0, 0, 0])
    std = statistics.stdev([1.0, 0.0, 0.0])  # unbiased, like torch.std
    close(A.group_shaped_rewards(r, 3, "group_norm"), [(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std, 0, 0, 0])


def test_group_shaped_rewards_errors():
    r = np.zeros(6, dtype=np.float32)
    for est in ("reinforce_baseline", "rloo", "group_norm", "dr_grpo"):
        with pytest.raises(ValueError, match="needs n_samples_per_prompt >= 2"):
            A.group_shaped_rewards(r, 1, est)
    with pytest.raises(ValueError, match="multiple of n_samples=4"):
        A.group_shaped_rewards(r, 4, "rloo")
    with pytest.raises(ValueError, match="unknown estimator"):
        A.group_shaped_rewards(r, 2, "gae")


@pytest.mark.parametrize("seed", SEEDS)
def test_whiten(seed):
    rng = np.random.default_rng(seed)
    B, T = 5, 12
    x = (rng.normal(size=(B, T)) * 3 + 2).astype(np.float32)
    mask = random_mask(rng, B, T)
    out = np.asarray(jax.jit(A.whiten)(x, mask))
    close(out, ref_whiten(x, mask))
    valid = out[mask != 0]
    assert abs(valid.mean()) < 1e-5 and abs(valid.std() - 1) < 1e-4
    assert np.all(out[mask == 0] == 0)
    # --no_advantage_std_norm: centre only
    close(A.whiten(x, mask, scale_std=False), ref_whiten(x, mask, scale_std=False))
    # shift_mean=False keeps the mean, rescales the spread
    kept = np.asarray(A.whiten(x, mask, shift_mean=False))[mask != 0]
    close(kept.mean(), x[mask != 0].astype(np.float64).mean(), atol=1e-4)
    # constant input: var clamped at eps, no NaN
    c = np.asarray(A.whiten(np.full((2, 3), 5.0, np.float32), np.ones((2, 3))))
    assert np.all(c == 0)


# ------------------------------------------------------------------------------------------------ pipelines


def ref_openrlhf_pipeline(estimator, r, kl, values, mask, n, kl_coef, clip_range, gamma, lambd):
    """OpenRLHF's compute_advantages_and_returns for one rollout batch, written as plain loops."""
    r = [float(v) for v in r]
    if estimator in ("rloo", "reinforce_baseline", "group_norm", "dr_grpo"):
        r = list(ref_group(np.array(r), n, estimator))
        gamma = 1.0  # OpenRLHF forces gamma = 1 for the group estimators
    rewards = ref_shape_rewards(np.array(r), kl, mask, kl_coef, clip_range)
    if estimator == "gae":
        adv, ret = ref_gae(rewards, values, mask, gamma, lambd)
    else:
        ret = ref_returns(rewards, mask, gamma)
        adv = ret.copy()
    if estimator in ("gae", "reinforce", "reinforce_baseline"):
        adv = ref_whiten(adv, mask)
    return np.where(mask != 0, adv, 0.0), np.where(mask != 0, ret, 0.0)


def jax_pipeline(estimator, r, kl, values, mask, n, kl_coef, clip_range, gamma, lambd):
    """The estimator table's composition (``advantages.estimate``), masked like the reference."""
    adv, ret = A.estimate(estimator, r, kl, mask, values if A.ESTIMATORS[estimator].critic else None, n_samples=n,
                          kl_coef=kl_coef, reward_clip_range=clip_range, gamma=gamma, lambd=lambd)
    m = jnp.asarray(mask) != 0
    return jnp.where(m, adv, 0.0), jnp.where(m, ret, 0.0)


def test_estimator_table():
    """What each estimator needs, as OpenRLHF 0.11.2 does it (only gae has a critic; rloo/group_norm/dr_grpo are
    not whitened; only gae and reinforce honour --gamma)."""
    assert [k for k, v in A.ESTIMATORS.items() if v.critic] == ["gae"]
    assert set(A.GROUP_ESTIMATORS) == {"reinforce_baseline", "rloo", "group_norm", "dr_grpo"}
    assert {k for k, v in A.ESTIMATORS.items() if v.whiten} == {"gae", "reinforce", "reinforce_baseline"}
    assert {k for k, v in A.ESTIMATORS.items() if v.gamma} == {"gae", "reinforce"}
    with pytest.raises(ValueError, match="needs critic"):
        A.estimate("gae", np.zeros(2), np.zeros((2, 3)), np.ones((2, 3)), n_samples=1, kl_coef=0.0,
                   reward_clip_range=None, gamma=1.0, lambd=1.0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("estimator", ["gae", "reinforce", "reinforce_baseline", "rloo", "group_norm", "dr_grpo"])
def test_estimator_pipelines(seed, estimator):
    rng = np.random.default_rng(seed)
    n, B, T = 4, 8, 12
    r = rng.normal(size=B).astype(np.float32) * 3
    logp = rng.normal(size=(B, T)).astype(np.float32) - 2
    ref_logp = logp + rng.normal(size=(B, T)).astype(np.float32) * 0.3
    kl = np.asarray(L.kl_estimate(logp, ref_logp, "k1"))
    values = rng.normal(size=(B, T)).astype(np.float32)
    mask = random_mask(rng, B, T)
    args = (estimator, r, kl, values, mask, n, 0.02, (-2.0, 2.0), 0.97, 0.95)
    adv, ret = jax.jit(jax_pipeline, static_argnums=(0, 5, 6, 7, 8, 9))(*args)
    ref_adv, ref_ret = ref_openrlhf_pipeline(*args)
    close(adv, ref_adv, atol=5e-5)  # whitening divides by std ~O(1): a few ulps of the inputs
    close(ret, ref_ret)
