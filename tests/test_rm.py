"""Reward model: preference data, the pairwise loss on a real model against a NumPy loop over transformers' scores,
an end-to-end run on the 4x2 mesh (learns a preference, stores reward mean/std, exports a sequence classifier that
transformers loads and scores identically), and bad input.

Tolerances: fp32 JAX vs float64 NumPy/PyTorch references agree to 1e-4 absolute on scores and losses of order 1.
"""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
import transformers
from datasets import Dataset

from jaxrlhf.data.preference import PairedDataset, check_vocab, join
from jaxrlhf.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from jaxrlhf.rm import RMConfig, cli, main, make_rm_loss, pair_rewards
from tests.preference_tiny import (fixed_preference_rows, log_sigmoid, set_preference_rows, tiny_model, torch_score,
                                   unpad, write_jsonl)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("rm")


@pytest.fixture(scope="module")
def tok(root):
    return build_tiny_tokenizer(root / "tok", list("abcdefghij:? \n"))


# ---------------------------------------------------------------------------------------------- data


def test_pairs_template_eos_and_padding(tok):
    rows = [{"q": "abc", "c": "de\n", "r": "f", "margin": 2}, {"q": "a", "c": "j", "r": "hhh", "margin": None}]
    ds = PairedDataset(rows, tok, prompt_key="q", chosen_key="c", rejected_key="r",
                       input_template="{}?", max_len=64, source="x")
    assert len(ds) == 2 and ds.has_margin and ds.num_dropped == ds.num_truncated == 0
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    assert ds[0].prompt_ids == ids("abc?")
    assert ds[0].chosen_ids == ids("de") + [eos]  # trailing newline stripped, EOS appended
    assert ds[1].rejected_ids == ids("hhh") + [eos]
    b = ds.batch([0, 1])
    assert ds.seq_len == 8 and b["chosen_input_ids"].shape == (2, 8)  # longest row (7) rounded up to 8
    np.testing.assert_array_equal(b["chosen_input_ids"][0], ids("abc?de") + [eos, 0])
    np.testing.assert_array_equal(b["chosen_attention_mask"][0], [1] * 7 + [0])
    np.testing.assert_array_equal(b["chosen_loss_mask"][0], [0, 0, 0, 0, 1, 1, 1, 0])  # response + EOS only
    np.testing.assert_array_equal(b["rejected_loss_mask"][1], [0, 0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(b["margin"], [2.0, 0.0])
    assert b["num_pairs"] == 2 and b["num_pairs"].shape == ()
    # left padding: the same tokens at the right edge
    left = PairedDataset(rows, tok, prompt_key="q", chosen_key="c", rejected_key="r", input_template="{}?",
                         max_len=64, padding_side="left").batch([1])
    np.testing.assert_array_equal(left["chosen_input_ids"][0], [0, 0, 0, 0] + ids("a?j") + [eos])
    np.testing.assert_array_equal(left["chosen_loss_mask"][0], [0] * 6 + [1, 1])
    # no margin field
    assert not PairedDataset([{"chosen": "a", "rejected": "b"}], tok).has_margin


def test_truncation_keeps_eos_and_long_prompts_are_dropped(tok):
    eos = tok.eos_token_id
    assert join([5, 6], [7, 8, 9, eos], 4, eos) == ([5, 6, 7, eos], True)
    assert join([5], [7, eos], 4, eos) == ([5, 7, eos], False)
    rows = [{"prompt": "a" * 8, "chosen": "b", "rejected": "c"},  # 8 >= max_len - 2: dropped
            {"prompt": "a" * 3, "chosen": "b" * 9, "rejected": "c"},  # truncated
            {"prompt": "a", "chosen": "b", "rejected": "c"}]
    ds = PairedDataset(rows, tok, prompt_key="prompt", max_len=10, source="long")
    assert (len(ds), ds.num_dropped, ds.num_truncated, ds.rows) == (2, 1, 1, [1, 2])
    assert "1 dropped" in ds.summary() and "1 truncated" in ds.summary()
    b = ds.batch([0])
    row = unpad(b["chosen_input_ids"][0], b["chosen_attention_mask"][0])
    assert len(row) == 10 and row[-1] == eos and row[:3] == tok("aaa", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="all 1 pairs were dropped.*raise --max_len"):
        PairedDataset(rows[:1], tok, prompt_key="prompt", max_len=10)


def test_chat_template_split_with_and_without_prompt_key(tok):
    eos = tok.eos_token_id
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [{"prompt": "abc", "chosen": "de", "rejected": [{"role": "assistant", "content": "f"}]}]
    ds = PairedDataset(rows, tok, prompt_key="prompt", apply_chat_template=True)
    assert ds[0].prompt_ids == ids("<s><|user|>abc</s><|assistant|>")
    assert ds[0].chosen_ids == ids("de</s>") and ds[0].chosen_ids[-1] == eos  # EOS written by the template
    assert ds[0].rejected_ids == ids("f</s>")
    # conversations only: the prompt is every message but the last, shared by both
    conv = [{"role": "system", "content": "j"}, {"role": "user", "content": "abc"}]
    rows = [{"chosen": conv + [{"role": "assistant", "content": "de"}],
             "rejected": conv + [{"role": "assistant", "content": "f"}]}]
    ds2 = PairedDataset(Dataset.from_list(rows), tok, apply_chat_template=True)
    assert ds2[0].prompt_ids == ids("<s><|system|>j</s><|user|>abc</s><|assistant|>")
    assert ds2[0].chosen_ids == ids("de</s>") and ds2[0].rejected_ids == ids("f</s>")
    rows[0]["rejected"] = [{"role": "user", "content": "zzz"}, {"role": "assistant", "content": "f"}]
    with pytest.raises(ValueError, match="must share every message but the last"):
        PairedDataset(rows, tok, apply_chat_template=True, source="conv")


def test_bad_records_name_the_problem(tok):
    rows = [{"question": "a", "good": "b", "bad": "c"}]
    with pytest.raises(KeyError, match=r"key 'chosen' not in dataset d.jsonl; available keys: \['question', 'good', "
                                       r"'bad'\]"):
        PairedDataset(rows, tok, prompt_key="question", source="d.jsonl")
    with pytest.raises(ValueError, match=r"row 1 of dataset t: 'chosen' is int \('5'\); expected a string"):
        PairedDataset([{"chosen": "a", "rejected": "b"}, {"chosen": 5, "rejected": "b"}], tok, source="t")
    with pytest.raises(ValueError, match=r"'rejected' is list.*needs --apply_chat_template"):
        PairedDataset([{"chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}], tok)
    with pytest.raises(ValueError, match=r"row 0 of dataset m: margin 'margin' is str"):
        PairedDataset([{"chosen": "a", "rejected": "b", "margin": "big"}], tok, source="m")
    with pytest.raises(ValueError, match=r"row 1 of dataset r is list"):
        PairedDataset([{"chosen": "a", "rejected": "b"}, ["a", "b"]], tok, source="r")
    with pytest.raises(ValueError, match="dataset e is empty"):
        PairedDataset([], tok, source="e")
    with pytest.raises(ValueError, match="no '\\{\\}' placeholder"):
        PairedDataset([{"chosen": "a", "rejected": "b"}], tok, input_template="Q:")
    ds = PairedDataset([{"chosen": "j", "rejected": "b"}], tok)
    with pytest.raises(ValueError, match="produced token id .* beyond the model's vocab_size 5"):
        check_vocab(ds, 5, "--pretrain m")


# ---------------------------------------------------------------------------------------------- loss vs NumPy


@pytest.fixture(scope="module")
def score_model(root):
    return tiny_model(root / "score_model", kind="score", seed=3)


LOSSES = {"sigmoid": ("sigmoid", False), "sigmoid+margin": ("sigmoid", True), "logexp": ("logexp", False)}


def test_rm_loss_matches_numpy_loop_over_transformers_scores(score_model):
    """Scores read at the last real token with left and with right padding; the loss (sigmoid, sigmoid with margin,
    logexp), accuracy and mean rewards against a NumPy loop over transformers' scores of each unpadded sequence.
    (Everything in one jitted function: one compile.)"""
    from flax import nnx

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.train.steps import make_forward
    from sharding import make_mesh

    mesh = make_mesh("4x2")
    tok = load_tokenizer(score_model)
    rows = fixed_preference_rows(8, seed=1)
    batches = {side: PairedDataset(rows, tok, prompt_key="prompt", max_len=16, padding_side=side).batch(np.arange(8))
               for side in ("right", "left")}
    assert batches["left"]["chosen_attention_mask"][:, 0].min() == 0  # really left-padded (ragged lengths)

    def everything(model, bs):
        out = {side: {"rewards": pair_rewards(model, b)} for side, b in bs.items()}
        for side, b in bs.items():
            out[side].update({name: make_rm_loss(*args)(model, b) for name, args in LOSSES.items()})
        return out

    graphdef, state = nnx.split(from_pretrained(score_model, mesh=mesh))
    params = state.to_pure_dict()
    got = make_forward(graphdef, everything, params=params, mesh=mesh)(params, batches)

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(score_model).eval()
    b = batches["right"]
    ref_c = [torch_score(hf, unpad(b["chosen_input_ids"][i], b["chosen_attention_mask"][i])) for i in range(8)]
    ref_r = [torch_score(hf, unpad(b["rejected_input_ids"][i], b["rejected_attention_mask"][i])) for i in range(8)]
    margins = [float(m) for m in b["margin"]]
    assert len(set(margins)) > 1
    ref_loss = {"sigmoid": np.mean([-log_sigmoid(c - r) for c, r in zip(ref_c, ref_r)]),
                "sigmoid+margin": np.mean([-log_sigmoid(c - r - m) for c, r, m in zip(ref_c, ref_r, margins)]),
                "logexp": np.mean([math.log1p(math.exp(r - c)) for c, r in zip(ref_c, ref_r)])}
    for side in ("right", "left"):
        chosen, rejected = got[side]["rewards"]
        np.testing.assert_allclose(chosen, ref_c, atol=1e-4)
        np.testing.assert_allclose(rejected, ref_r, atol=1e-4)
        for name in LOSSES:
            loss, metrics = got[side][name]
            assert abs(float(loss) - ref_loss[name]) < 1e-4, (side, name, float(loss), ref_loss[name])
            assert float(metrics["acc"]) == np.mean(np.array(ref_c) > np.array(ref_r))
            assert abs(float(metrics["chosen_reward"]) - np.mean(ref_c)) < 1e-4
            assert abs(float(metrics["reject_reward"]) - np.mean(ref_r)) < 1e-4
    assert ref_loss["sigmoid+margin"] > ref_loss["sigmoid"] + 1e-3  # the margin really enters


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(root):
    """A causal LM turned reward model (fresh score head), trained 8 steps on the 4x2 mesh."""
    model = tiny_model(root / "lm", kind="lm", seed=0)
    train = write_jsonl(root / "train.jsonl", set_preference_rows(256, seed=0))
    evaluation = write_jsonl(root / "eval.jsonl", set_preference_rows(64, seed=1))
    cfg = RMConfig(pretrain=model, dataset=train, eval_dataset=evaluation, prompt_key="prompt", max_len=16,
                   train_batch_size=32, micro_train_batch_size=4, max_epochs=1, learning_rate=1e-3,
                   lr_warmup_ratio=0.0, eval_steps=4, save_path=str(root / "out"), ckpt_path=str(root / "out" / "ckpt"))
    return cfg, main(cfg)


def test_rm_learns_a_preference_it_did_not_know(trained):
    cfg, out = trained
    log = [json.loads(line) for line in open(out["log"])]
    assert len(log) == 8
    # step 1's metrics come from the initial model: chance on this data (both response sets are chosen equally often)
    assert log[0]["acc"] <= 0.75, log[0]
    assert log[-1]["loss"] < log[0]["loss"] - 0.2
    assert out["eval"]["eval/acc"] >= 0.9, out["eval"]  # held-out pairs
    assert out["eval"]["eval/chosen_reward"] > out["eval"]["eval/reject_reward"]
    assert os.path.getsize(os.path.join(cfg.save_path, "rm_metrics.png")) > 1000


def test_exported_rm_scores_identically_in_transformers(trained):
    """config.json: a *ForSequenceClassification with the eval reward mean/std; transformers' scores == JAX's."""
    from flax import nnx

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.rewards.model import RewardModels
    from jaxrlhf.train.steps import make_forward
    from sharding import make_mesh

    cfg, out = trained
    hf_cfg = json.load(open(os.path.join(cfg.save_path, "config.json")))
    assert hf_cfg["architectures"] == ["LlamaForSequenceClassification"] and hf_cfg["num_labels"] == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(cfg.save_path).eval()
    tok = load_tokenizer(cfg.save_path)  # the tokenizer was exported beside the weights
    evaluation = PairedDataset(set_preference_rows(64, seed=1), tok, prompt_key="prompt", max_len=16)
    # mean / std: every chosen and rejected reward of the eval set, scored by transformers, unbiased std
    scores = []
    for p in evaluation.items:
        scores += [torch_score(hf, p.prompt_ids + p.chosen_ids), torch_score(hf, p.prompt_ids + p.rejected_ids)]
    assert abs(hf_cfg["mean"] - np.mean(scores)) < 1e-4 and abs(hf_cfg["std"] - np.std(scores, ddof=1)) < 1e-4
    assert out["reward_mean"] == hf_cfg["mean"] and hf_cfg["std"] > 0.1

    # a padded batch: transformers (which finds the last non-pad token itself) vs the trained JAX parameters
    mesh = make_mesh("4x2")
    b = evaluation.batch(np.arange(8))
    graphdef = nnx.split(from_pretrained(cfg.save_path, mesh=mesh))[0]
    jax_c, jax_r = make_forward(graphdef, pair_rewards, params=out["params"], mesh=mesh)(out["params"], b)
    with torch.no_grad():
        hf_c = hf(torch.tensor(b["chosen_input_ids"]).long(),
                  attention_mask=torch.tensor(b["chosen_attention_mask"])).logits[:, 0].numpy()
    np.testing.assert_allclose(jax_c, hf_c, atol=1e-4)
    np.testing.assert_allclose(jax_c, scores[0:16:2], atol=1e-4)
    # PPO's reward model reader applies the stored normalisation
    rms = RewardModels([cfg.save_path], mesh=mesh)
    seqs, attn = b["rejected_input_ids"], b["rejected_attention_mask"]
    np.testing.assert_allclose(rms(seqs, attn, normalize=True), (np.asarray(jax_r) - hf_cfg["mean"]) / hf_cfg["std"],
                               atol=1e-4)


# ---------------------------------------------------------------------------------------------- bad input


def _cli_error(capsys, argv) -> str:
    assert cli(argv) == 2
    return capsys.readouterr().err


def test_bad_input_fails_before_compute(root, capsys):
    model = tiny_model(root / "bad_lm", kind="lm")
    good = write_jsonl(root / "good.jsonl", fixed_preference_rows(8, seed=0))
    base = ["--pretrain", model, "--prompt_key", "prompt", "--save_path", str(root / "bad"), "--train_batch_size", "8",
            "--micro_train_batch_size", "1"]
    empty = root / "empty.jsonl"
    empty.write_text("")
    assert "is empty" in _cli_error(capsys, base + ["--dataset", str(empty)])
    err = _cli_error(capsys, base + ["--dataset", good, "--chosen_key", "best"])
    assert "key 'best' not in dataset" in err and "available keys: ['prompt', 'chosen', 'rejected', 'margin']" in err
    wrong = write_jsonl(root / "wrong.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                               {"prompt": "a", "chosen": {"text": "b"}, "rejected": "c"}])
    assert "'chosen' is dict" in _cli_error(capsys, base + ["--dataset", wrong])
    nomargin = write_jsonl(root / "nomargin.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 8)
    assert "no 'margin' field" in _cli_error(capsys, base + ["--dataset", nomargin, "--margin_loss"])
    assert "but --dataset_probs has 2 value(s)" in _cli_error(capsys, base + ["--dataset", good, "--dataset_probs",
                                                                               "0.5,0.5"])
    with pytest.raises(SystemExit):
        cli(base + ["--dataset", good, "--margin_loss", "--loss", "logexp"])
    assert "--margin_loss needs --loss sigmoid" in capsys.readouterr().err
    assert not os.path.exists(root / "bad" / "config.json")  # nothing was trained or exported


def test_rm_with_lora_trains_adapters_and_the_score_head(root, trained):
    """LoRA on a causal LM turned reward model: the adapters and the fresh score head train (PEFT's
    modules_to_save), the base does not; the preference is learned."""
    cfg, _ = trained
    lora = dataclasses.replace(cfg, save_path=str(root / "out_lora"), ckpt_path=str(root / "out_lora" / "ckpt"),
                               lora_rank=8, lora_alpha=16, learning_rate=1e-2, eval_steps=8)
    out = main(lora)
    log = [json.loads(line) for line in open(out["log"])]
    assert log[-1]["loss"] < log[0]["loss"] - 0.1, (log[0], log[-1])
    from flax import nnx

    from jaxrlhf.models import from_pretrained

    start = nnx.state(from_pretrained(cfg.pretrain, head="score", seed=cfg.seed)).to_pure_dict()
    p = out["params"]
    assert np.array_equal(np.asarray(p["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]),
                          np.asarray(start["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]))
    assert not np.array_equal(np.asarray(p["score"]["kernel"]), np.asarray(start["score"]["kernel"]))
    assert np.abs(np.asarray(p["model"]["layers"][0]["mlp"]["up_proj"]["lora_b"])).max() > 0
