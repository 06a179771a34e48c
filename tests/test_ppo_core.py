"""The PPO core's pieces, reached directly: the update on a hand-made Experience (losses checked against NumPy on
transformers' logits and values), the rollout client against a fake Engine, the shared resume-or-refuse."""
import math

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from jaxrlhf.models import from_pretrained
from jaxrlhf.rollout import Completion, Engine, SamplingParams
from jaxrlhf.rollout.client import RolloutClient, pad_rows
from jaxrlhf.train import ppo_step
from jaxrlhf.train.experience import Experience
from jaxrlhf.train.steps import init_optimizer, make_train_step
from sharding import make_mesh
from tests.tiny import positions, save_tiny

P, R, B, VOCAB = 4, 3, 8, 96


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("core")
    lm = save_tiny("llama3", root / "lm")
    critic = save_tiny("llama3", root / "critic", kind="score", seed=1)
    return root, lm, critic


def hand_made_experience(seed: int = 0, B: int = B) -> Experience:
    """Left-padded prompts, right-padded responses of several lengths, random log-probs and advantages."""
    rng = np.random.default_rng(seed)
    prompt_lens, response_lens = rng.integers(1, P + 1, B), rng.integers(1, R + 1, B)
    seqs = np.zeros((B, P + R), np.int32)
    attn = np.zeros((B, P + R), np.int32)
    for i in range(B):
        seqs[i, P - prompt_lens[i]:P] = rng.integers(3, VOCAB, prompt_lens[i])
        seqs[i, P:P + response_lens[i]] = rng.integers(3, VOCAB, response_lens[i])
        attn[i, P - prompt_lens[i]:P + response_lens[i]] = 1
    mask = attn[:, P:].astype(np.float32)
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    return Experience(sequences=seqs, attention_mask=attn, action_mask=mask, prompt_len=P, rollout_logp=f(B, R),
                      old_logp=f(B, R) * 0.3 - 4.0, ref_logp=f(B, R) - 4.0, values=f(B, R), reward=f(B),
                      kl=np.zeros((B, R), np.float32), advantages=f(B, R) * mask, returns=f(B, R) * mask)


def torch_outputs(model, exp: Experience, *, score: bool):
    """transformers' per-token log-probs of the response tokens (lm) or per-token values (score), [B, R]."""
    ids, attn = torch.tensor(exp.sequences, dtype=torch.long), torch.tensor(exp.attention_mask)
    pos = torch.tensor(positions(exp.attention_mask), dtype=torch.long)
    with torch.no_grad():
        if score:
            hidden = model.model(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
            out = model.score(hidden)[..., 0].numpy()
            return out[:, P - 1:P + R - 1]
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float()
        logp = torch.log_softmax(logits[:, P - 1:P + R - 1], -1)
        return torch.gather(logp, -1, ids[:, P:, None])[..., 0].numpy()


def trainer(path, loss_fn, *, head: str, mesh):
    graphdef, state = nnx.split(from_pretrained(path, mesh=mesh, head=head))
    params = state.to_pure_dict()
    tx = optax.sgd(1e-2)
    opt = init_optimizer(tx, params, mesh)
    return make_train_step(graphdef, loss_fn, tx, params=params, opt_state=opt, mesh=mesh), params, opt


def test_ppo_update_losses_match_numpy_on_transformers_outputs(tiny):
    """ppo_update's reported losses are those of the parameters before the update: recompute them in NumPy from
    transformers' logits and values (OpenRLHF's PolicyLoss / ValueLoss formulas), fp32, 1e-5."""
    root, lm, critic = tiny
    mesh = make_mesh("4x2")
    exp = hand_made_experience()
    eps, vclip = 0.2, 0.5
    actor_step, actor, actor_opt = trainer(root / "lm", ppo_step.policy_loss_fn(
        temperature=1.0, eps_clip_low=eps, eps_clip_high=eps, dual_clip=None,
        entropy_coef=0.0, use_kl_loss=False, kl_estimator="k1"), head="lm", mesh=mesh)
    critic_step, crit, critic_opt = trainer(root / "critic", ppo_step.value_loss_fn(
        value_clip=vclip), head="score", mesh=mesh)
    state = ppo_step.PPOState(actor=actor, actor_opt=actor_opt, critic=crit, critic_opt=critic_opt)
    before = jax.tree_util.tree_map(np.asarray, actor)  # the step donates the device buffers
    new, metrics = ppo_step.ppo_update(state, exp, actor_step=actor_step, critic_step=critic_step,
                                       train_batch_size=B, micro_batch=4, max_epochs=1, seed=0, use_kl_loss=False)

    mask, n = exp.action_mask, exp.action_mask.sum()
    ratio = np.exp(torch_outputs(lm, exp, score=False) - exp.old_logp)
    pg = np.maximum(-exp.advantages * ratio, -exp.advantages * np.clip(ratio, 1 - eps, 1 + eps))
    assert math.isclose(metrics["actor/policy_loss"], (pg * mask).sum() / n, rel_tol=1e-5, abs_tol=1e-6)
    v = torch_outputs(critic, exp, score=True)
    v_clip = exp.values + np.clip(v - exp.values, -vclip, vclip)
    vl = 0.5 * np.maximum((v - exp.returns) ** 2, (v_clip - exp.returns) ** 2)
    assert math.isclose(metrics["critic/value_loss"], (vl * mask).sum() / n, rel_tol=1e-5)
    assert 0.0 <= metrics["actor/clip_frac"] <= 1.0
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(jax.tree_util.tree_leaves(new.actor), jax.tree_util.tree_leaves(before))]
    assert max(moved) > 0  # the update happened


def test_ppo_update_split_and_frozen_actor(tiny):
    """Two train batches x two epochs: the micro-batch split does not change the result; a frozen actor (no
    actor_step) is left exactly as it was."""
    root, _, _ = tiny
    mesh = make_mesh("4x2")
    exp = hand_made_experience(1, B=16)
    loss = ppo_step.policy_loss_fn(temperature=0.7, eps_clip_low=0.2, eps_clip_high=0.28, dual_clip=3.0,
                                   entropy_coef=0.01, use_kl_loss=True, kl_estimator="k3", chunk=3)
    results = []
    for micro in (8, 4):
        step, params, opt = trainer(root / "lm", loss, head="lm", mesh=mesh)
        state = ppo_step.PPOState(actor=params, actor_opt=opt, kl_coef=0.1)
        new, m = ppo_step.ppo_update(state, exp, actor_step=step, critic_step=None, train_batch_size=8,
                                     micro_batch=micro, max_epochs=2, seed=3, use_kl_loss=True)
        results.append((jax.tree_util.tree_map(np.asarray, new.actor), m))
        assert {"actor/loss", "actor/policy_loss", "actor/clip_frac", "actor/approx_kl", "actor/entropy",
                "actor/kl_loss"} <= set(m)
    for a, b in zip(jax.tree_util.tree_leaves(results[0][0]), jax.tree_util.tree_leaves(results[1][0])):
        np.testing.assert_allclose(a, b, atol=1e-6)  # fp32 summation order only
    state = ppo_step.PPOState(actor=trainer(root / "lm", loss, head="lm", mesh=mesh)[1], actor_opt=None)
    frozen, _ = ppo_step.ppo_update(state, exp, actor_step=None, critic_step=None, train_batch_size=4,
                                    micro_batch=4, max_epochs=1, seed=3, use_kl_loss=True)
    assert frozen.actor is state.actor


def test_on_policy_update_equals_one_with_a_separate_old_logp_forward(tiny):
    """One update per rollout: old log-probs taken from the update's own forward (stop-gradient) give the update a
    separate forward's old log-probs give (fp32, 1e-6), and the drift metrics match NumPy on transformers'."""
    root, lm, _ = tiny
    mesh = make_mesh("4x2")
    exp = hand_made_experience(2)
    args = dict(temperature=1.0, eps_clip_low=0.2, eps_clip_high=0.2, dual_clip=None, entropy_coef=0.0,
                use_kl_loss=False, kl_estimator="k1")
    exp.old_logp = torch_outputs(lm, exp, score=False)  # the policy before the update, as the experience pass has it
    results = []
    for on_policy in (False, True):
        step, params, opt = trainer(root / "lm", ppo_step.policy_loss_fn(**args, on_policy=on_policy), head="lm",
                                    mesh=mesh)
        new, m = ppo_step.ppo_update(ppo_step.PPOState(actor=params, actor_opt=opt), exp, actor_step=step,
                                     critic_step=None, train_batch_size=B, micro_batch=4, max_epochs=1, seed=0,
                                     use_kl_loss=False, on_policy=on_policy)
        results.append((jax.tree_util.tree_map(np.asarray, new.actor), m))
    (off, m_off), (on, m_on) = results
    for a, b in zip(jax.tree_util.tree_leaves(off), jax.tree_util.tree_leaves(on)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert math.isclose(m_on["actor/policy_loss"], m_off["actor/policy_loss"], rel_tol=1e-5, abs_tol=1e-7)
    assert m_on["actor/clip_frac"] == 0.0 and m_on["actor/approx_kl"] == 0.0
    drift = np.abs(exp.rollout_logp - exp.old_logp)[exp.action_mask > 0]
    assert math.isclose(m_on["rollout/logprob_diff_mean"], drift.mean(), rel_tol=1e-5)
    assert math.isclose(m_on["rollout/logprob_diff_max"], drift.max(), rel_tol=1e-5)


def test_ppo_state_checkpoint_round_trip():
    state = ppo_step.PPOState(actor={"w": 1}, actor_opt={"m": 2}, step=5, kl_coef=0.3,
                              reward_stats={"count": 4.0, "mean": 1.0, "m2": 2.0})
    assert set(state.arrays()) == {"actor", "actor_opt"}
    back = ppo_step.PPOState(actor=None, actor_opt=None).restored(state.arrays(), state.meta())
    assert back == state


# ---------------------------------------------------------------------------------------------------------------------
# The rollout client against a fake engine
# ---------------------------------------------------------------------------------------------------------------------


class FakeEngine:
    """Implements the Engine protocol: sample k of prompt i answers ``[i + 10, k + 10, ...]`` of length 1 + (i + k)
    % R with log-probs -(t + 1) / 10; ``update_weights`` may fail after ``fail_after`` tensors."""

    def __init__(self, fail_after: int | None = None):
        self.fail_after, self.loaded, self.probes = fail_after, [], 0

    def generate(self, prompt_token_ids, sampling: SamplingParams):
        out = []
        for i in range(len(prompt_token_ids)):
            for k in range(sampling.n):
                length = 1 + (i + k) % R
                out.append(Completion(i, [i + 10, k + 10, 7][:length], [-(t + 1) / 10 for t in range(length)],
                                      "length" if length == R else "stop"))
        return out

    def generate_each(self, prompt_token_ids, sampling):
        self.probes += 1
        return [self.generate(prompt_token_ids, sampling)]

    def update_weights(self, named_tensors):
        for name, *_ in named_tensors:
            if self.fail_after is not None and len(self.loaded) == self.fail_after:
                raise TimeoutError("engine 0 did not answer within 600 s")
            self.loaded.append(name)
        return {"seconds": 1.0, "bytes": 1e9}

    def close(self):
        pass


def test_fake_engine_is_an_engine():
    assert isinstance(FakeEngine(), Engine)


def test_client_generate_pads_rows_prompt_major(tiny):
    root, _, _ = tiny
    client = RolloutClient(FakeEngine(), collective=False, num_engines=0, model_cfg=None, pad_id=0, prompt_len=P,
                           response_len=R)
    prompts = [[5], [6, 7, 8], [9, 9, 9, 9]]
    rollout = client.generate(prompts, SamplingParams(n=2, max_tokens=R))
    assert rollout.sequences.shape == (6, P + R) and rollout.rollout_logp.shape == (6, R)
    for row in range(6):
        i, k = divmod(row, 2)
        length = 1 + (i + k) % R
        want_prompt = [0] * (P - len(prompts[i])) + prompts[i]
        want_resp = ([i + 10, k + 10, 7][:length] + [0] * R)[:R]
        assert rollout.sequences[row].tolist() == want_prompt + want_resp
        assert rollout.attention_mask[row].tolist() == [0] * (P - len(prompts[i])) + [1] * (len(prompts[i]) + length) \
            + [0] * (R - length)
        np.testing.assert_allclose(rollout.rollout_logp[row, :length], [-(t + 1) / 10 for t in range(length)])
        assert (rollout.rollout_logp[row, length:] == 0).all()
    assert rollout.response_ids()[1] == [10, 11]


def test_client_sync_counts_checks_and_propagates_engine_errors(tiny, monkeypatch):
    root, _, _ = tiny
    mesh = make_mesh("4x2")
    model = from_pretrained(root / "lm", mesh=mesh)
    params = nnx.split(model)[1].to_pure_dict()
    engine = FakeEngine()

    def probe(params, rows):  # the trainer agrees with the engine exactly
        rows = {k: np.asarray(v) for k, v in rows.items()}
        ref = pad_rows([[5]], engine.generate([[5]], SamplingParams(n=1, max_tokens=R)), pad_id=0, prompt_len=P,
                       response_len=R)[2]
        logp = np.repeat(ref, len(rows["sequences"]), 0)
        return logp, logp

    client = RolloutClient(engine, collective=False, num_engines=1, model_cfg=model.cfg, pad_id=0, prompt_len=P,
                           response_len=R, sync_check="first", probe_prompts=[[5]],
                           probe_forward=probe, chunk=8, tolerance=1e-4)
    first = client.sync(params)
    assert client.num_syncs == 1 and engine.probes == 1 and first["sync/GBps"] == 1.0
    n_tensors = len(engine.loaded)
    assert n_tensors == len(jax.tree_util.tree_leaves(params))
    client.sync(params)
    assert client.num_syncs == 2 and engine.probes == 1  # "first": probed once

    import converters.hf as hf

    drained = []
    real = hf.hf_entries

    def counting(*a, **k):
        for item in real(*a, **k):
            drained.append(item[0])
            yield item

    monkeypatch.setattr(hf, "hf_entries", counting)
    failing = RolloutClient(FakeEngine(fail_after=2), collective=False, num_engines=0, model_cfg=model.cfg, pad_id=0,
                            prompt_len=P, response_len=R)
    with pytest.raises(TimeoutError, match="did not answer"):
        failing.sync(params)
    assert len(drained) == n_tensors  # the remaining gathers were still joined (multi-host: nobody left waiting)
