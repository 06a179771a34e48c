"""DPO / cDPO / IPO: the loss on real models (policy + reference on the 4x2 mesh) against a NumPy loop over
transformers' log-probabilities, an end-to-end run that raises the chosen-over-rejected margin and exports a causal LM
that transformers loads with the same logits, and bad flags.

Tolerances: sequence log-probs are sums of ~8 fp32 terms of size ~3: 1e-4 absolute against float64 references;
losses and rewards derived from them agree to 1e-4 as well.
"""
import json
import os

import numpy as np
import pytest
import torch
import transformers

from jaxrlhf.data.preference import PairedDataset
from jaxrlhf.data.tokenizer import load_tokenizer
from jaxrlhf.dpo import DPOConfig, cli, main, make_dpo_loss, make_reference, ref_logprobs
from tests.preference_tiny import fixed_preference_rows, log_sigmoid, response_logprob, tiny_model, write_jsonl


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    tiny_model(root / "policy", seed=0)
    tiny_model(root / "ref", seed=5)
    return root


# ---------------------------------------------------------------------------------------------- loss vs NumPy


def test_sequence_logprobs_matches_a_loop():
    from jaxrlhf import losses

    rng = np.random.default_rng(0)
    B, T, V = 4, 7, 11
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    ids = rng.integers(0, V, (B, T))
    mask = (rng.random((B, T)) < 0.6).astype(np.float32)
    mask[:, 0] = 1  # position 0 is never a target, whatever the mask says
    mask[3] = 0  # no target at all: sum 0, mean 0
    total, mean = losses.sequence_logprobs(logits, ids, mask)
    for b in range(B):
        s, n = 0.0, 0
        for t in range(1, T):
            if mask[b, t]:
                z = logits[b, t - 1].astype(np.float64)
                s += z[ids[b, t]] - np.log(np.exp(z - z.max()).sum()) - z.max()
                n += 1
        assert abs(float(total[b]) - s) < 1e-4 and abs(float(mean[b]) - (s / n if n else 0.0)) < 1e-5


def test_dpo_losses_match_numpy_loop_over_transformers_logprobs(root):
    """Policy and reference log-probs (the reference's through the jitted ``prepare`` hook), then DPO, cDPO, IPO and
    the NLL term, each against a NumPy loop over transformers' logits of every unpadded sequence."""
    from flax import nnx

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.train.steps import make_forward
    from sharding import make_mesh

    mesh = make_mesh("4x2")
    tok = load_tokenizer(root / "policy")
    ds = PairedDataset(fixed_preference_rows(8, seed=2), tok, prompt_key="prompt", max_len=16)
    batch = ds.batch(np.arange(8))
    ref_def, ref_state = nnx.split(from_pretrained(str(root / "ref"), mesh=mesh))
    ref_params = ref_state.to_pure_dict()
    prepare = make_reference(make_forward(ref_def, ref_logprobs, params=ref_params, mesh=mesh), ref_params,
                             rows_per_call=4)  # two chunks
    b = prepare(batch)

    policy = transformers.AutoModelForCausalLM.from_pretrained(root / "policy").eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(root / "ref").eval()
    pc, pr, rc, rr, pc_mean = [], [], [], [], []
    for p in ds.items:
        n = len(p.prompt_ids)
        s, m = response_logprob(policy, p.prompt_ids + p.chosen_ids, n)
        pc.append(s)
        pc_mean.append(m)
        pr.append(response_logprob(policy, p.prompt_ids + p.rejected_ids, n)[0])
        rc.append(response_logprob(ref, p.prompt_ids + p.chosen_ids, n)[0])
        rr.append(response_logprob(ref, p.prompt_ids + p.rejected_ids, n)[0])
    np.testing.assert_allclose(b["ref_chosen_logp"], rc, atol=1e-4)
    np.testing.assert_allclose(b["ref_rejected_logp"], rr, atol=1e-4)

    graphdef, state = nnx.split(from_pretrained(str(root / "policy"), mesh=mesh))
    params = state.to_pure_dict()
    beta = 0.5
    modes = {"dpo": (0.0, False, 0.0), "cdpo+nll": (0.2, False, 0.3), "ipo": (0.0, True, 0.0)}
    fns = {mode: make_dpo_loss(beta=beta, label_smoothing=ls, ipo=ipo, nll_loss_coef=c)
           for mode, (ls, ipo, c) in modes.items()}
    got = make_forward(graphdef, lambda model, b: {k: fn(model, b) for k, fn in fns.items()}, params=params,
                       mesh=mesh)(params, b)  # one compile for the three losses
    for mode, (ls, ipo, nll_coef) in modes.items():
        loss, m = got[mode]
        pref, acc, margin = 0.0, 0.0, 0.0
        for i in range(8):
            h = (pc[i] - pr[i]) - (rc[i] - rr[i])
            if ipo:
                pref += (h - 1 / (2 * beta)) ** 2 / 8
            else:
                pref += (-(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h)) / 8
            cr, rj = beta * (pc[i] - rc[i]), beta * (pr[i] - rr[i])
            acc += (cr > rj) / 8
            margin += (cr - rj) / 8
        nll = -np.mean(pc_mean)
        assert abs(float(m["preference_loss"]) - pref) < 1e-4 * max(1.0, pref), (mode, float(m["preference_loss"]), pref)
        assert abs(float(m["nll_loss"]) - nll) < 1e-4, (mode, float(m["nll_loss"]), nll)
        assert abs(float(loss) - (pref + nll_coef * nll)) < 1e-4 * max(1.0, pref), mode
        assert abs(float(m["margin"]) - margin) < 1e-4 and float(m["acc"]) == acc, mode
        assert abs(float(m["chosen_reward"]) - beta * np.mean(np.subtract(pc, rc))) < 1e-4, mode


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(root):
    train = write_jsonl(root / "train.jsonl", fixed_preference_rows(128, seed=0))
    evaluation = write_jsonl(root / "eval.jsonl", fixed_preference_rows(32, seed=1))
    cfg = DPOConfig(pretrain=str(root / "policy"), dataset=train, eval_dataset=evaluation, prompt_key="prompt",
                    max_len=16, train_batch_size=16, micro_train_batch_size=2, max_epochs=1, learning_rate=1e-3,
                    lr_warmup_ratio=0.0, beta=0.1, eval_steps=4, save_path=str(root / "out"),
                    ckpt_path=str(root / "out" / "ckpt"))
    return cfg, main(cfg)


def test_dpo_raises_the_chosen_over_rejected_margin(trained):
    cfg, out = trained
    log = [json.loads(line) for line in open(out["log"])]
    assert len(log) == 8
    # step 1 is measured on the initial policy, which IS the reference: every implicit reward is 0
    assert abs(log[0]["margin"]) < 1e-4 and abs(log[0]["chosen_reward"]) < 1e-4
    assert abs(log[0]["loss"] - np.log(2)) < 1e-4
    assert log[-1]["loss"] < log[0]["loss"] - 0.1
    ev = out["eval"]
    assert ev["eval/margin"] > 0.2 and ev["eval/acc"] >= 0.9, ev  # held-out pairs
    assert ev["eval/chosen_reward"] > 0 > ev["eval/reject_reward"], ev
    first_eval = next(r for r in log if "eval/margin" in r)
    assert ev["eval/margin"] > first_eval["eval/margin"]


def test_exported_policy_matches_in_transformers(trained):
    from flax import nnx

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.train.steps import make_forward
    from sharding import make_mesh

    cfg, out = trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(cfg.save_path).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 15, (8, 12))
    mask = (np.arange(12)[None] < rng.integers(4, 13, (8, 1))).astype(np.int32)
    ids = ids * mask
    mesh = make_mesh("4x2")
    graphdef = nnx.split(from_pretrained(cfg.save_path, mesh=mesh))[0]
    logits = make_forward(graphdef, lambda m, b: m(b["ids"], b["mask"]), params=out["params"], mesh=mesh)(
        out["params"], {"ids": ids, "mask": mask})
    with torch.no_grad():
        ref = hf(torch.tensor(ids).long(), attention_mask=torch.tensor(mask)).logits.numpy()
    for b in range(8):  # padded positions are not compared
        n = int(mask[b].sum())
        np.testing.assert_allclose(np.asarray(logits)[b, :n], ref[b, :n], atol=1e-4)
    # and the export is not the initial model
    init = transformers.AutoModelForCausalLM.from_pretrained(cfg.pretrain).eval()
    with torch.no_grad():
        assert np.abs(init(torch.tensor(ids[:1]).long()).logits.numpy() - ref[:1]).max() > 1e-2


@pytest.mark.slow
def test_ipo_nll_separate_reference_bf16_and_resume(root):
    """--ref_pretrain (a different model: the first margin is not 0), --ipo with --nll_loss_coef under --bf16, and an
    interrupted run resumed from its checkpoint ends exactly where the uninterrupted run ends."""
    import shutil

    train = write_jsonl(root / "train2.jsonl", fixed_preference_rows(64, seed=3))

    def cfg(name, **kw):
        return DPOConfig(pretrain=str(root / "policy"), ref_pretrain=str(root / "ref"), dataset=train,
                         prompt_key="prompt", max_len=16, train_batch_size=16, micro_train_batch_size=2,
                         learning_rate=1e-3, ipo=True, nll_loss_coef=0.1, bf16=True, save_steps=1,
                         save_path=str(root / name), ckpt_path=str(root / name / "ckpt"), **kw)

    full = main(cfg("full"))
    log = [json.loads(line) for line in open(full["log"])]
    assert len(log) == 4 and abs(log[0]["margin"]) > 1e-2 and log[-1]["preference_loss"] < log[0]["preference_loss"]
    shutil.copytree(root / "full" / "ckpt", root / "cut" / "ckpt")
    shutil.rmtree(root / "cut" / "ckpt" / "4")
    shutil.rmtree(root / "cut" / "ckpt" / "3")
    resumed = main(cfg("cut", load_checkpoint=True))
    rlog = [json.loads(line) for line in open(resumed["log"])]
    assert [r["step"] for r in rlog] == [3, 4]
    for k in ("loss", "preference_loss", "nll_loss", "margin", "grad_norm"):
        assert rlog[-1][k] == log[-1][k], (k, rlog[-1][k], log[-1][k])


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0"], "--beta must be > 0"),
    (["--label_smoothing", "0.6"], "--label_smoothing must be in [0, 0.5)"),
    (["--ipo", "--label_smoothing", "0.1"], "does not apply to --ipo"),
    (["--packing_samples"], "--packing_samples is not supported by the DPO trainer"),
])
def test_bad_flags(root, flags, message, capsys):
    with pytest.raises(SystemExit):
        cli(["--pretrain", str(root / "policy"), "--dataset", "x.jsonl"] + flags)
    assert message in capsys.readouterr().err


def test_bad_reference_and_data(root, capsys):
    data = write_jsonl(root / "d.jsonl", fixed_preference_rows(8, seed=0))
    other = root / "other_vocab"
    from tests.tiny import save_tiny

    save_tiny("llama3", other, vocab_size=40)
    base = ["--pretrain", str(root / "policy"), "--prompt_key", "prompt", "--save_path", str(root / "bad")]
    assert cli(base + ["--dataset", data, "--ref_pretrain", str(other)]) == 2
    assert "has vocab_size 40" in capsys.readouterr().err
    assert cli(base + ["--dataset", data, "--rejected_key", "worse"]) == 2
    assert "key 'worse' not in dataset" in capsys.readouterr().err
    assert cli(base + ["--dataset", data, "--apply_chat_template", "--input_template", "{}:"]) == 2
    assert "not both" in capsys.readouterr().err
    assert not os.path.exists(root / "bad" / "config.json")


def test_dpo_with_lora_raises_the_held_out_margin(root):
    """LoRA r=8 on every linear, the frozen base as the reference: step 1 is exactly the reference (B = 0), then the
    held-out margin rises."""
    train = write_jsonl(root / "train_lora.jsonl", fixed_preference_rows(64, seed=0))
    evaluation = write_jsonl(root / "eval_lora.jsonl", fixed_preference_rows(16, seed=1))
    cfg = DPOConfig(pretrain=str(root / "policy"), dataset=train, eval_dataset=evaluation, prompt_key="prompt",
                    max_len=16, train_batch_size=16, micro_train_batch_size=2, max_epochs=1, learning_rate=1e-2,
                    lr_warmup_ratio=0.0, beta=0.1, eval_steps=2, save_path=str(root / "out_lora"),
                    ckpt_path=str(root / "out_lora" / "ckpt"), lora_rank=8, lora_alpha=16)
    out = main(cfg)
    log = [json.loads(line) for line in open(out["log"])]
    assert abs(log[0]["margin"]) < 1e-4 and abs(log[0]["loss"] - np.log(2)) < 1e-4
    evals = [r["eval/margin"] for r in log if "eval/margin" in r]
    assert evals[-1] > evals[0] and evals[-1] > 0, evals
