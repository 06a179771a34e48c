"""Tests for jaxrlhf.losses against independent NumPy / Python-loop references.

Tolerances: fp32 results are compared with rtol=1e-5 (atol=1e-6 for values near 0) against float64 NumPy
references unless a test says otherwise; finite-difference gradient checks use a looser, stated tolerance.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import losses as L

RTOL = 1e-5
ATOL = 1e-6
SEEDS = [0, 1, 2]


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def random_mask(rng, B, T, allow_empty=True):
    """Rows with padding at both ends: mask[b, s:s+n] = 1; row 0 is empty when allow_empty."""
    mask = np.zeros((B, T), dtype=np.float32)
    for b in range(B):
        if allow_empty and b == 0:
            continue
        s = rng.integers(0, T // 3 + 1)
        n = rng.integers(1, T - s + 1)
        mask[b, s : s + n] = 1
    return mask


# ------------------------------------------------------------------------------------------------ reductions


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_sum_and_mean(seed):
    rng = np.random.default_rng(seed)
    B, T = 5, 9
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask = random_mask(rng, B, T)
    x[mask == 0] = np.nan  # masked garbage must not leak
    tot, cnt = 0.0, 0.0
    row_sum = np.zeros(B)
    row_cnt = np.zeros(B)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                tot += float(x[b, t])
                cnt += 1
                row_sum[b] += float(x[b, t])
                row_cnt[b] += 1
    close(L.masked_sum(x, mask), tot)
    close(L.masked_mean(x, mask), tot / cnt)
    close(L.masked_sum(x, mask, axis=1), row_sum)
    # empty row 0 -> 0 (not NaN)
    expected_rows = np.where(row_cnt > 0, row_sum / np.maximum(row_cnt, 1), 0.0)
    close(L.masked_mean(x, mask, axis=1), expected_rows)
    assert float(L.masked_mean(x, np.zeros_like(mask))) == 0.0
    # jit + bool mask
    close(jax.jit(L.masked_mean)(x, mask.astype(bool)), tot / cnt)


# ------------------------------------------------------------------------------------------------ logprobs / entropy


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits(seed, temperature):
    rng = np.random.default_rng(seed)
    B, T, V = 3, 7, 11
    logits = (rng.normal(size=(B, T, V)) * 4).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T))
    ref = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            lp = np_log_softmax(logits[b, t].astype(np.float64) / temperature)
            ref[b, t] = lp[labels[b, t]]
    out = jax.jit(L.logprobs_from_logits)(logits, labels, temperature)
    assert out.dtype == jnp.float32 and out.shape == (B, T)
    close(out, ref)


def test_logprobs_bf16_upcast():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 4, 50)) * 3, dtype=jnp.bfloat16)
    labels = rng.integers(0, 50, size=(2, 4))
    out = L.logprobs_from_logits(logits, labels)
    assert out.dtype == jnp.float32
    # reference from the same bf16 values, computed in float64
    lf = np.asarray(logits.astype(jnp.float32), dtype=np.float64)
    ref = np.take_along_axis(np_log_softmax(lf), labels[..., None], axis=-1)[..., 0]
    close(out, ref)
    with pytest.raises(ValueError, match="trailing vocab axis"):
        L.logprobs_from_logits(logits, labels[..., None])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_entropy_from_logits(seed, temperature):
    rng = np.random.default_rng(seed)
    B, T, V = 2, 5, 13
    logits = (rng.normal(size=(B, T, V)) * 3).astype(np.float32)
    ref = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            lp = np_log_softmax(logits[b, t].astype(np.float64) / temperature)
            ref[b, t] = -sum(math.exp(v) * v for v in lp)
    close(L.entropy_from_logits(logits, temperature), ref)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_logprobs_from_hidden_in_chunks(chunk):
    """Chunked head + log-softmax == a float64 NumPy loop over the full logits (values), and == the unchunked
    path (logprobs/entropy_from_logits of h @ w) in value and in gradient w.r.t. h and w, fp32 summation order
    only (1e-5). T=7 is not a multiple of 3 (a padded last chunk); 64 > T is one chunk."""
    rng = np.random.default_rng(0)
    B, T, D, V, temperature = 2, 7, 6, 11, 0.8
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    w = rng.normal(size=(D, V)).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T))
    weights = rng.normal(size=(2, B, T)).astype(np.float32)
    z = (h.astype(np.float64) @ w.astype(np.float64)) / temperature
    ref_lp, ref_ent = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            lp = np_log_softmax(z[b, t])
            ref_lp[b, t] = lp[labels[b, t]]
            ref_ent[b, t] = -sum(math.exp(v) * v for v in lp)

    def chunked(h, w):
        lp, ent = L.logprobs_from_hidden(h, w, labels, temperature, chunk=chunk, with_entropy=True)
        return (lp * weights[0]).sum() + (ent * weights[1]).sum(), (lp, ent)

    def full(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
        lp, ent = L.logprobs_from_logits(logits, labels, temperature), L.entropy_from_logits(logits, temperature)
        return (lp * weights[0]).sum() + (ent * weights[1]).sum(), (lp, ent)

    (_, (lp, ent)), grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(h, w)
    (_, _), want = jax.jit(jax.value_and_grad(full, argnums=(0, 1), has_aux=True))(h, w)
    close(lp, ref_lp)
    close(ent, ref_ent)
    for g, r in zip(grads, want):
        close(g, r)
    assert L.logprobs_from_hidden(h, w, labels, temperature, chunk=chunk)[1] is None


# ------------------------------------------------------------------------------------------------ KL


def ref_kl(x, kind):
    if kind == "k1":
        k = x
    elif kind == "k2":
        k = x * x / 2
    else:
        k = math.exp(-x) - 1 + x
    return min(max(k, -10.0), 10.0)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("seed", SEEDS)
def test_kl_estimate_matches_loop(kind, seed):
    rng = np.random.default_rng(seed)
    logp = rng.normal(size=(4, 6)).astype(np.float32) * 2 - 1
    ref_logp = rng.normal(size=(4, 6)).astype(np.float32) * 2 - 1
    expected = np.array(
        [[ref_kl(float(logp[b, t]) - float(ref_logp[b, t]), kind) for t in range(6)] for b in range(4)]
    )
    close(jax.jit(L.kl_estimate, static_argnames="kind")(logp, ref_logp, kind=kind), expected, rtol=1e-5, atol=1e-5)


def test_kl_estimate_clamp_and_finite_grads():
    x = np.array([-200.0, -30.0, -12.0, -5.0, -0.5, 0.0, 0.5, 5.0, 12.0, 30.0, 200.0], dtype=np.float32)
    zeros = np.zeros_like(x)
    k1 = np.asarray(L.kl_estimate(x, zeros, "k1"))
    k2 = np.asarray(L.kl_estimate(x, zeros, "k2"))
    k3 = np.asarray(L.kl_estimate(x, zeros, "k3"))
    close(k1, np.clip(x, -10, 10))
    assert k1.min() == -10.0 and k1.max() == 10.0
    assert k2.max() == 10.0 and k3.max() == 10.0 and k2.min() >= 0 and k3.min() >= 0
    for i, xi in enumerate(x):
        close(k2[i], ref_kl(float(xi), "k2"), atol=1e-5)
        if abs(xi) < 80:
            close(k3[i], ref_kl(float(xi), "k3"), atol=1e-5)
        else:
            assert k3[i] == 10.0
    for kind in ("k1", "k2", "k3"):
        g = jax.grad(lambda lp: jnp.sum(L.kl_estimate(lp, zeros, kind)))(jnp.asarray(x))
        assert np.all(np.isfinite(np.asarray(g))), (kind, g)
        # clamped region has zero gradient
        assert float(g[0]) == 0.0 and float(g[-1]) == 0.0
    # derivative of k3 inside the unclamped region: 1 - exp(-x)
    g3 = jax.grad(lambda lp: jnp.sum(L.kl_estimate(lp, zeros, "k3")))(jnp.asarray(x))
    close(g3[4:7], 1 - np.exp(-x[4:7].astype(np.float64)))
    with pytest.raises(ValueError, match="unknown kind"):
        L.kl_estimate(x, zeros, "k4")


# ------------------------------------------------------------------------------------------------ PPO policy loss


def ref_policy_loss_token(logp, old, adv, lo, hi, dual):
    lr = min(max(logp - old, -20.0), 20.0)
    r = math.exp(lr)
    s1 = r * adv
    s2 = min(max(r, 1 - lo), 1 + hi) * adv
    c1 = min(s1, s2)
    if dual is not None and adv < 0:
        obj = max(c1, dual * adv)
    else:
        obj = c1
    return -obj, float(s2 < s1)


def ref_policy_grad_token(logp, old, adv, lo, hi, dual):
    """d loss / d logp, derived by hand: the active branch is r*A (grad r*A) or a constant (grad 0)."""
    r = math.exp(logp - old)
    s1 = r * adv
    s2 = min(max(r, 1 - lo), 1 + hi) * adv
    c1 = min(s1, s2)
    if dual is not None and adv < 0 and dual * adv > c1:
        return 0.0
    if s1 <= s2:
        return -r * adv
    return 0.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dual", [None, 3.0])
def test_ppo_policy_loss_matches_loop(seed, dual):
    rng = np.random.default_rng(seed)
    B, T = 4, 8
    lo, hi = 0.2, 0.28
    logp = rng.normal(size=(B, T)).astype(np.float32) * 0.5 - 2
    old = logp + rng.normal(size=(B, T)).astype(np.float32) * 0.6
    adv = rng.normal(size=(B, T)).astype(np.float32)
    fn = jax.jit(lambda a, b, c: L.ppo_policy_loss(a, b, c, eps_clip_low=lo, eps_clip_high=hi, dual_clip=dual))
    loss, clipped = fn(logp, old, adv)
    ref_loss = np.zeros((B, T))
    ref_clip = np.zeros((B, T))
    ref_grad = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            args = (float(logp[b, t]), float(old[b, t]), float(adv[b, t]), lo, hi, dual)
            ref_loss[b, t], ref_clip[b, t] = ref_policy_loss_token(*args)
            ref_grad[b, t] = ref_policy_grad_token(*args)
    close(loss, ref_loss)
    np.testing.assert_array_equal(np.asarray(clipped), ref_clip)
    assert 0 < ref_clip.sum() < B * T  # the test exercises both branches
    grad = jax.grad(lambda lp: jnp.sum(fn(lp, old, adv)[0]))(jnp.asarray(logp))
    close(grad, ref_grad)
    # old_logp and advantages are constants
    g_old = jax.grad(lambda o: jnp.sum(fn(logp, o, adv)[0]))(jnp.asarray(old))
    g_adv = jax.grad(lambda a: jnp.sum(fn(logp, old, a)[0]))(jnp.asarray(adv))
    assert float(jnp.abs(g_old).max()) == 0.0 and float(jnp.abs(g_adv).max()) == 0.0


def test_ppo_policy_loss_finite_differences():
    """Central differences (fp32, h=1e-3, atol=2e-3) at points away from the clip kinks."""
    logp = jnp.array([[-1.0, -2.0, -0.5, -1.5]], dtype=jnp.float32)
    old = jnp.array([[-1.05, -1.9, -0.9, -1.0]], dtype=jnp.float32)
    adv = jnp.array([[1.0, -2.0, 0.5, -1.0]], dtype=jnp.float32)

    def f(lp):
        return jnp.sum(L.ppo_policy_loss(lp, old, adv, eps_clip_low=0.2, eps_clip_high=0.2, dual_clip=1.5)[0])

    g = np.asarray(jax.grad(f)(logp))
    h = 1e-3
    for j in range(4):
        e = np.zeros((1, 4), dtype=np.float32)
        e[0, j] = h
        fd = (float(f(logp + e)) - float(f(logp - e))) / (2 * h)
        assert abs(fd - g[0, j]) < 2e-3, (j, fd, g[0, j])


def test_ppo_dual_clip_behaviour():
    # A < 0 and ratio far above 1 + eps: standard PPO loss grows as -r*A; dual clip caps it at -c*A.
    adv = jnp.array([[-1.0, -1.0, 1.0, -1.0]])
    old = jnp.zeros((1, 4))
    logp = jnp.log(jnp.array([[10.0, 2.0, 10.0, 0.5]]))
    std, _ = L.ppo_policy_loss(logp, old, adv, eps_clip_low=0.2, eps_clip_high=0.2)
    dual, _ = L.ppo_policy_loss(logp, old, adv, eps_clip_low=0.2, eps_clip_high=0.2, dual_clip=3.0)
    close(std, [[10.0, 2.0, -1.2, 0.8]])  # -max(r, 1-eps)*A for A<0; -min(r, 1+eps)*A for A>0
    close(dual, [[3.0, 2.0, -1.2, 0.8]])  # only the A<0, r>c token is capped
    dual_fn = functools.partial(L.ppo_policy_loss, eps_clip_low=0.2, eps_clip_high=0.2, dual_clip=3.0)
    g = jax.grad(lambda lp: jnp.sum(dual_fn(lp, old, adv)[0]))(logp)
    close(g, [[0.0, 2.0, 0.0, 0.0]])  # capped token: no gradient; r=2 (A<0, unclipped): -r*A = 2
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip must be > 1.0"):
            L.ppo_policy_loss(logp, old, adv, eps_clip_low=0.2, eps_clip_high=0.2, dual_clip=bad)


def test_ppo_policy_log_ratio_clamp():
    logp = jnp.array([[0.0, 0.0]])
    old = jnp.array([[-500.0, 500.0]])  # exp would overflow / underflow without the [-20, 20] clamp
    adv = jnp.array([[-1.0, 1.0]])
    loss, _ = L.ppo_policy_loss(logp, old, adv, eps_clip_low=0.2, eps_clip_high=0.2)
    close(loss, [[math.exp(20.0), -math.exp(-20.0)]], rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(loss)))


# ------------------------------------------------------------------------------------------------ value loss


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_ppo_value_loss(seed, clip):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(3, 5)).astype(np.float32)
    old = v + rng.normal(size=(3, 5)).astype(np.float32) * 0.4
    ret = rng.normal(size=(3, 5)).astype(np.float32)
    ref = np.zeros((3, 5))
    for b in range(3):
        for t in range(5):
            vv, oo, rr = float(v[b, t]), float(old[b, t]), float(ret[b, t])
            if clip is None:
                ref[b, t] = 0.5 * (vv - rr) ** 2
            else:
                vc = oo + min(max(vv - oo, -clip), clip)
                ref[b, t] = 0.5 * max((vc - rr) ** 2, (vv - rr) ** 2)
    close(jax.jit(lambda a, b, c: L.ppo_value_loss(a, b, c, value_clip=clip))(v, old, ret), ref)


# ------------------------------------------------------------------------------------------------ aggregation


def _policy_token_losses(w, x_btd, labels_bt, old_bt, adv_bt):
    """Tiny differentiable 'model': logits = x @ w, so gradients w.r.t. a parameter can be compared."""
    logits = jnp.einsum("btd,dv->btv", x_btd, w)
    logp = L.logprobs_from_logits(logits, labels_bt)
    loss, _ = L.ppo_policy_loss(logp, old_bt, adv_bt, eps_clip_low=0.2, eps_clip_high=0.2)
    return loss


@pytest.mark.parametrize("seed", SEEDS)
def test_token_mean_micro_batch_invariance(seed):
    rng = np.random.default_rng(seed)
    B, T, D, V = 8, 10, 4, 7
    w = jnp.asarray(rng.normal(size=(D, V)).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(B, T, D)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, V, size=(B, T)))
    old = jnp.asarray(rng.normal(size=(B, T)).astype(np.float32) - 2)
    adv = jnp.asarray(rng.normal(size=(B, T)).astype(np.float32))
    mask = random_mask(rng, B, T)
    mask[1, :] = 1  # very unequal token counts across rows
    mask = jnp.asarray(mask)
    n_global = float(mask.sum())

    @jax.jit
    @jax.value_and_grad
    def loss_and_grad(w_, x_, labels_, old_, adv_, mask_):
        return L.token_mean_over_batch(_policy_token_losses(w_, x_, labels_, old_, adv_), mask_, n_global)

    full_loss, full_grad = loss_and_grad(w, x, labels, old, adv, mask)
    # reference: plain loop over valid tokens
    tok = np.asarray(_policy_token_losses(w, x, labels, old, adv), dtype=np.float64)
    close(full_loss, sum(tok[b, t] for b in range(B) for t in range(T) if mask[b, t]) / n_global)
    for splits in ([0, 8], [0, 4, 8], [0, 1, 2, 5, 8], list(range(9))):
        slices = [slice(a, b) for a, b in zip(splits[:-1], splits[1:])]
        parts = [loss_and_grad(w, x[sl], labels[sl], old[sl], adv[sl], mask[sl]) for sl in slices]
        loss_sum = sum(float(p[0]) for p in parts)
        grad_sum = sum(np.asarray(p[1], dtype=np.float64) for p in parts)
        close(loss_sum, full_loss, rtol=1e-5, atol=1e-6)
        close(grad_sum, full_grad, rtol=1e-5, atol=1e-6)
    # control: the per-micro-batch mean is NOT split invariant (so the test above can fail)
    per_mb = [slice(0, 1), slice(1, 8)]
    naive = sum(
        float(L.masked_mean(_policy_token_losses(w, x[s], labels[s], old[s], adv[s]), mask[s])) for s in per_mb
    ) / 2
    assert abs(naive - float(full_loss)) > 1e-4


@pytest.mark.parametrize("seed", SEEDS)
def test_sequence_mean_over_batch(seed):
    rng = np.random.default_rng(seed)
    B, T = 6, 7
    loss = rng.normal(size=(B, T)).astype(np.float32)
    mask = random_mask(rng, B, T)  # row 0 empty: excluded
    n_seq = int((mask.sum(1) > 0).sum())
    ref = 0.0
    for b in range(B):
        c = mask[b].sum()
        if c > 0:
            ref += sum(float(loss[b, t]) for t in range(T) if mask[b, t]) / (c + 1e-8)
    ref /= n_seq
    close(L.sequence_mean_over_batch(loss, mask, n_seq), ref)
    parts = sum(float(L.sequence_mean_over_batch(loss[i : i + 2], mask[i : i + 2], n_seq)) for i in range(0, B, 2))
    close(parts, ref)


# ------------------------------------------------------------------------------------------------ DPO / KTO / RM


def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["dpo", "cdpo", "ipo"])
def test_dpo_loss(seed, mode):
    rng = np.random.default_rng(seed)
    B = 6
    pc, pr, rc, rr = (rng.normal(size=B).astype(np.float32) * 5 - 30 for _ in range(4))
    beta = 0.1
    ls = 0.1 if mode == "cdpo" else 0.0
    ipo = mode == "ipo"
    loss, cr, rj = jax.jit(lambda *a: L.dpo_loss(*a, beta=beta, label_smoothing=ls, ipo=ipo))(pc, pr, rc, rr)
    ref = []
    for i in range(B):
        h = (float(pc[i]) - float(pr[i])) - (float(rc[i]) - float(rr[i]))
        if ipo:
            ref.append((h - 1 / (2 * beta)) ** 2)
        else:
            ref.append(-(1 - ls) * np_logsigmoid(beta * h) - ls * np_logsigmoid(-beta * h))
    close(loss, ref, rtol=1e-5, atol=1e-5)  # inputs ~30 in fp32: absolute error ~1e-6 * 30 on h
    close(cr, beta * (pc.astype(np.float64) - rc), atol=1e-5)
    close(rj, beta * (pr.astype(np.float64) - rr), atol=1e-5)
    # gradient of sigmoid DPO w.r.t. chosen logp: -beta * sigmoid(-beta h) (ls=0)
    if mode == "dpo":
        g = jax.grad(lambda x: jnp.sum(L.dpo_loss(x, pr, rc, rr, beta=beta)[0]))(jnp.asarray(pc))
        h = (pc.astype(np.float64) - pr) - (rc - rr)
        close(g, -beta / (1 + np.exp(beta * h)), atol=1e-6)
        g_r = jax.grad(lambda x: jnp.sum(L.dpo_loss(x, pr, rc, rr, beta=beta)[1]))(jnp.asarray(pc))
        assert float(jnp.abs(g_r).max()) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kl_sign", [1.0, -1.0])
def test_kto_loss(seed, kl_sign):
    rng = np.random.default_rng(seed)
    B = 8
    logp = rng.normal(size=B).astype(np.float32) - 20
    ref_logp = logp + rng.normal(size=B).astype(np.float32)
    desirable = rng.integers(0, 2, size=B).astype(bool)
    kl_b = (np.abs(rng.normal(size=B)) * kl_sign).astype(np.float32)
    beta, dw, uw = 0.1, 1.0, 1.33
    kto = functools.partial(L.kto_loss, beta=beta, desirable_weight=dw, undesirable_weight=uw)
    loss, rewards = kto(logp, ref_logp, desirable, kl_b)
    z0 = max(float(np.mean(kl_b.astype(np.float64))), 0.0)
    if kl_sign < 0:
        assert z0 == 0.0  # clamped at 0
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    ref = []
    for i in range(B):
        rho = float(logp[i]) - float(ref_logp[i])
        if desirable[i]:
            ref.append(dw * (1 - sig(beta * (rho - z0))))
        else:
            ref.append(uw * (1 - sig(beta * (z0 - rho))))
    close(loss, ref, atol=1e-6)
    close(rewards, beta * (logp.astype(np.float64) - ref_logp), atol=1e-5)
    # the KL term is detached: no gradient flows into it
    g_kl = jax.grad(lambda k: jnp.sum(kto(logp, ref_logp, desirable, k)[0]))(jnp.asarray(kl_b))
    assert float(jnp.abs(g_kl).max()) == 0.0
    # scalar KL and masked KL
    loss_s, _ = kto(logp, ref_logp, desirable, jnp.float32(np.mean(kl_b)))
    close(loss_s, loss)
    kl_pad = np.concatenate([kl_b, np.full(3, 99.0, np.float32)])
    kl_mask = np.concatenate([np.ones(B), np.zeros(3)])
    loss_m, _ = kto(logp, ref_logp, desirable, kl_pad, kl_mask_b=kl_mask)
    close(loss_m, loss)


@pytest.mark.parametrize("seed", SEEDS)
def test_pairwise_rm_loss(seed):
    rng = np.random.default_rng(seed)
    B = 7
    c = rng.normal(size=B).astype(np.float32) * 3
    r = rng.normal(size=B).astype(np.float32) * 3
    m = np.abs(rng.normal(size=B)).astype(np.float32)
    ref_sig = [-np_logsigmoid(float(c[i]) - float(r[i])) for i in range(B)]
    ref_mar = [-np_logsigmoid(float(c[i]) - float(r[i]) - float(m[i])) for i in range(B)]
    ref_le = [math.log(1 + math.exp(float(r[i]) - float(c[i]))) for i in range(B)]
    close(L.pairwise_rm_loss(c, r), ref_sig)
    close(L.pairwise_rm_loss(c, r, m), ref_mar)
    close(L.pairwise_rm_loss(c, r, kind="logexp"), ref_le)
    # stable for large gaps (log(1+exp(200)) would overflow in fp32 if computed naively)
    big = L.pairwise_rm_loss(jnp.array([-100.0]), jnp.array([100.0]), kind="logexp")
    close(big, [200.0])
    with pytest.raises(ValueError, match="no margin term"):
        L.pairwise_rm_loss(c, r, m, kind="logexp")
    with pytest.raises(ValueError, match="unknown kind"):
        L.pairwise_rm_loss(c, r, kind="hinge")


# ------------------------------------------------------------------------------------------------ KL controller


def test_adaptive_kl_coef():
    def ref(coef, cur, n, target, horizon):
        err = min(max(cur / target - 1, -0.2), 0.2)
        return coef * (1 + err * n / horizon)

    for cur in (0.0, 0.05, 0.1, 0.11, 0.5, 3.0):
        got = L.adaptive_kl_coef(0.02, cur, 256, kl_target=0.1, kl_horizon=10000)
        close(got, ref(0.02, cur, 256, 0.1, 10000))
    # error clipped at +-0.2
    close(L.adaptive_kl_coef(1.0, 100.0, 10, kl_target=1.0, kl_horizon=10), 1.2)
    close(L.adaptive_kl_coef(1.0, 0.0, 10, kl_target=1.0, kl_horizon=10), 0.8)
    # several updates in a row, jitted
    step = jax.jit(lambda c, k: L.adaptive_kl_coef(c, k, 64, kl_target=0.05, kl_horizon=1000))
    c, c_ref = jnp.float32(0.01), 0.01
    for kl in (0.2, 0.01, 0.06, 0.04):
        c, c_ref = step(c, kl), ref(c_ref, kl, 64, 0.05, 1000)
    close(c, c_ref)
    with pytest.raises(ValueError, match="kl_target must be > 0"):
        L.adaptive_kl_coef(0.01, 0.1, 1, kl_target=0.0, kl_horizon=10)
