"""KTO: unpaired data and its mismatched pairs, the loss on real models against a NumPy loop over transformers'
log-probabilities, an end-to-end run on the 4x2 mesh, and bad input.

Tolerances: 1e-4 absolute (fp32 JAX vs float64 references; sequence log-probs of order 10).
"""
import json
import math

import numpy as np
import pytest
import transformers

from jaxrlhf.data.preference import UnpairedDataset
from jaxrlhf.data.tokenizer import load_tokenizer
from jaxrlhf.kto import KTOConfig, cli, main, make_kto_loss, make_reference, sample_logprobs
from tests.preference_tiny import fixed_preference_rows, response_logprob, tiny_model, unpad, write_jsonl


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto")
    tiny_model(root / "policy", seed=0)
    tiny_model(root / "ref", seed=5)
    return root


def unpaired_rows(n: int, seed: int):
    """Each preference pair becomes a desirable and an undesirable sample."""
    rows = []
    for r in fixed_preference_rows(n, seed):
        rows.append({"input": r["prompt"], "output": r["chosen"], "label": True})
        rows.append({"input": r["prompt"], "output": r["rejected"], "label": False})
    return rows


# ---------------------------------------------------------------------------------------------- data


def test_unpaired_batch_holds_the_shifted_mismatched_pairs(root):
    tok = load_tokenizer(root / "policy")
    rows = [{"input": "ab:", "output": "cc", "label": True}, {"input": "v:", "output": "wxyz", "label": 0},
            {"input": "e:", "output": "d", "label": 1}]
    ds = UnpairedDataset(rows, tok, max_len=16, source="u")
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    assert [it.desirable for it in ds.items] == [True, False, True] and ds.num_desirable == 2
    b = ds.batch([2, 0, 1])
    rows_of = lambda key: [unpad(b[f"{key}input_ids"][i], b[f"{key}attention_mask"][i]) for i in range(3)]  # noqa
    assert rows_of("") == [ids("e:d") + [eos], ids("ab:cc") + [eos], ids("v:wxyz") + [eos]]
    # prompt i with the response of row i+1 (mod 3): OpenRLHF's unmatched y'|x
    assert rows_of("kl_") == [ids("e:cc") + [eos], ids("ab:wxyz") + [eos], ids("v:d") + [eos]]
    np.testing.assert_array_equal(b["kl_loss_mask"][0][:5], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(b["desirable"], [1, 1, 0])
    assert (b["num_samples"], b["num_desirable"], b["num_undesirable"]) == (3, 2, 1)
    assert b["input_ids"].shape == (3, ds.seq_len) and ds.seq_len % 8 == 0
    # a one-sample batch (the last eval chunk) borrows the next sample's response
    one = ds.batch([2])
    assert unpad(one["kl_input_ids"][0], one["kl_attention_mask"][0]) == ids("e:cc") + [eos]
    # chat template, the response being the last message of the input conversation
    conv = [{"input": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}], "label": False},
            {"input": [{"role": "user", "content": "v"}, {"role": "assistant", "content": "w"}], "label": True}]
    chat = UnpairedDataset(conv, tok, output_key=None, apply_chat_template=True)
    assert chat[0].prompt_ids == ids("<s><|user|>ab</s><|assistant|>") and chat[0].response_ids == ids("cd</s>")


def test_unpaired_bad_records(root):
    tok = load_tokenizer(root / "policy")
    good = {"input": "a", "output": "b", "label": True}
    with pytest.raises(KeyError, match=r"key 'label' not in dataset s; available keys: \['input', 'output', 'y'\]"):
        UnpairedDataset([{"input": "a", "output": "b", "y": 1}], tok, source="s")
    with pytest.raises(ValueError, match=r"row 1 of dataset s: label 'label' is str \('yes'\); expected true/false"):
        UnpairedDataset([good, {**good, "label": "yes"}], tok, source="s")
    with pytest.raises(ValueError, match=r"label 'label' is int \('2'\)"):
        UnpairedDataset([good, {**good, "label": 2}], tok, source="s")
    with pytest.raises(ValueError, match="--output_key is required"):
        UnpairedDataset([good, good], tok, output_key=None)
    with pytest.raises(ValueError, match="give it at least 2"):
        UnpairedDataset([good], tok)
    with pytest.raises(ValueError, match=r"'output' is list"):
        UnpairedDataset([good, {**good, "output": ["b"]}], tok)


# ---------------------------------------------------------------------------------------------- loss vs NumPy


def test_kto_loss_matches_numpy_loop_over_transformers_logprobs(root):
    from flax import nnx

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.train.steps import make_forward
    from sharding import make_mesh

    mesh = make_mesh("4x2")
    tok = load_tokenizer(root / "policy")
    ds = UnpairedDataset(unpaired_rows(6, seed=4)[:12], tok, max_len=16)
    order = np.random.default_rng(0).permutation(12)[:8]  # desirable and undesirable mixed
    ref_def, ref_state = nnx.split(from_pretrained(str(root / "ref"), mesh=mesh))
    ref_params = ref_state.to_pure_dict()
    b = make_reference(make_forward(ref_def, sample_logprobs, params=ref_params, mesh=mesh), ref_params,
                       rows_per_call=8)(ds.batch(order))
    graphdef, state = nnx.split(from_pretrained(str(root / "policy"), mesh=mesh))
    params = state.to_pure_dict()
    beta, dw, uw = 0.5, 1.0, 1.5
    loss, m = make_forward(graphdef, make_kto_loss(beta=beta, desirable_weight=dw, undesirable_weight=uw),
                           params=params, mesh=mesh)(params, b)

    policy = transformers.AutoModelForCausalLM.from_pretrained(root / "policy").eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(root / "ref").eval()
    items = [ds.items[i] for i in order]
    rho, kl, desirable = [], [], []
    for i, it in enumerate(items):
        n = len(it.prompt_ids)
        matched = it.prompt_ids + it.response_ids
        mismatched = it.prompt_ids + items[(i + 1) % 8].response_ids
        rho.append(response_logprob(policy, matched, n)[0] - response_logprob(ref, matched, n)[0])
        kl.append(response_logprob(policy, mismatched, n)[0] - response_logprob(ref, mismatched, n)[0])
        desirable.append(it.desirable)
    np.testing.assert_allclose(b["ref_logp"], [response_logprob(ref, it.prompt_ids + it.response_ids,
                                                                len(it.prompt_ids))[0] for it in items], atol=1e-4)
    z0 = max(0.0, float(np.mean(kl)))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    ref_loss = np.mean([dw * (1 - sig(beta * (r - z0))) if d else uw * (1 - sig(beta * (z0 - r)))
                        for r, d in zip(rho, desirable)])
    assert 0 < sum(desirable) < 8
    assert abs(float(loss) - ref_loss) < 1e-4, (float(loss), ref_loss)
    assert abs(float(m["kl"]) - z0) < 1e-4
    assert abs(float(m["chosen_reward"]) - beta * np.mean([r for r, d in zip(rho, desirable) if d])) < 1e-4
    assert abs(float(m["reject_reward"]) - beta * np.mean([r for r, d in zip(rho, desirable) if not d])) < 1e-4


# ---------------------------------------------------------------------------------------------- end to end


def test_kto_end_to_end(root):
    train = write_jsonl(root / "train.jsonl", unpaired_rows(64, seed=0))
    cfg = KTOConfig(pretrain=str(root / "policy"), dataset=train, eval_holdout=0.125, output_key="output",
                    max_len=16, train_batch_size=16, micro_train_batch_size=2, max_epochs=1, learning_rate=1e-3,
                    lr_warmup_ratio=0.0, beta=0.1, undesirable_loss_weight=1.2, eval_steps=3,
                    save_path=str(root / "out"), ckpt_path=str(root / "out" / "ckpt"))
    out = main(cfg)
    log = [json.loads(line) for line in open(out["log"])]
    assert len(log) == 7  # 112 training samples / 16
    # step 1: the policy is the reference, every rho is 0: loss = (w_d * #d + w_u * #u) / 2 / n
    assert abs(log[0]["chosen_reward"]) < 1e-4 and abs(log[0]["kl"]) < 1e-4
    assert log[-1]["loss"] < log[0]["loss"] - 0.03
    assert log[-1]["chosen_reward"] > 0 > log[-1]["reject_reward"]
    ev = out["eval"]
    assert ev["eval/chosen_reward"] > ev["eval/reject_reward"] and math.isfinite(ev["eval/kl"]), ev
    hf_cfg = json.load(open(f"{cfg.save_path}/config.json"))
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"]
    transformers.AutoModelForCausalLM.from_pretrained(cfg.save_path)  # loads


def test_bad_flags_and_data(root, capsys):
    with pytest.raises(SystemExit):
        cli(["--pretrain", str(root / "policy"), "--dataset", "x.jsonl", "--train_batch_size", "1"])
    assert "--train_batch_size must be >= 2" in capsys.readouterr().err
    data = write_jsonl(root / "d.jsonl", unpaired_rows(8, seed=0))
    base = ["--pretrain", str(root / "policy"), "--dataset", data, "--save_path", str(root / "bad"),
            "--train_batch_size", "8", "--micro_train_batch_size", "1"]
    assert cli(base + ["--output_key", "response"]) == 2
    assert "key 'response' not in dataset" in capsys.readouterr().err
    assert cli(base) == 2  # no --output_key and no chat template
    assert "--output_key is required" in capsys.readouterr().err
