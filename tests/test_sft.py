"""SFT end to end on tiny models and the 4x2 CPU mesh: the loss falls, the export loads in transformers with the same
logits, resume == uninterrupted (packed rows, across an epoch boundary), bad data fails before any compute."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxrlhf.models import from_pretrained
from jaxrlhf.sft import SFTConfig, cli, main
from tests.cli_runner import run_cli_with
from tests.tiny import char_model, write_additions

TIMING_KEYS = ("time", "step_time", "samples_per_s", "tokens_per_s")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Llama with a character tokenizer and 100 single-digit additions."""
    root = tmp_path_factory.mktemp("sft")
    char_model(root / "model")
    write_additions(root / "add.jsonl")
    return root


def make_cfg(root, run: str, **kw) -> SFTConfig:
    base = dict(mesh="4x2", pretrain=str(root / "model"), dataset=str(root / "add.jsonl"), input_key="input",
                output_key="output", max_len=16, train_batch_size=16, micro_train_batch_size=2, max_epochs=3,
                learning_rate=3e-3, lr_warmup_ratio=0.1, eval_holdout=0.2, save_path=str(root / run),
                ckpt_path=str(root / run / "checkpoints_sft"), seed=3)
    base.update(kw)
    return SFTConfig(**base)


def read_log(path):
    return [json.loads(line) for line in open(path)]


def test_loss_falls_and_export_matches_transformers(setup):
    out = main(make_cfg(setup, "run", max_epochs=6))
    log = read_log(out["log"])
    assert out["steps"] == 30 and [r["step"] for r in log] == list(range(1, 31))  # 80 train rows / 16 x 6 epochs
    assert log[-1]["loss"] < 0.5 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])
    evals = [r["eval/loss"] for r in log if "eval/loss" in r]
    assert len(evals) == 6 and evals[-1] < 0.7 * evals[0], evals  # once per epoch, held-out rows
    assert log[0]["lr"] < log[1]["lr"] and log[-1]["lr"] < max(r["lr"] for r in log)  # warm-up, then decay

    # The HF export in --save_path loads in transformers and gives the logits of the trained parameters.
    save = setup / "run"
    assert os.path.isdir(save / "checkpoints_sft" / "30")  # the export kept the checkpoints living inside it
    assert os.path.getsize(save / "sft_metrics.png") > 1000
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(save)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(save))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids = np.array([tok("3+4=7")["input_ids"] + [eos], tok("2+2=4")["input_ids"] + [pad]])  # 6 tokens each
    mask = np.array([[1] * 6, [1] * 5 + [0]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    graphdef, _ = nnx.split(from_pretrained(str(setup / "model")))
    model = nnx.merge(graphdef, jax.device_get(out["params"]))
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask > 0], ref[mask > 0], atol=1e-4, rtol=1e-4)
    # and the trained model answers training questions better than the random start did
    start = transformers.AutoModelForCausalLM.from_pretrained(str(setup / "model")).eval()
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(m(torch.tensor(ids[:1])).logits[0, 3:-1], torch.tensor(ids[0, 4:]))
               for m in (start, hf)]
    assert nll[1] < nll[0]


def test_resume_equals_uninterrupted_with_packing_bf16_remat(setup):
    kw = dict(packing_samples=True, train_batch_size=8, micro_train_batch_size=1, max_steps=7, save_steps=1,
              max_ckpt_num=10, eval_steps=2, max_epochs=2, bf16=True, gradient_checkpointing=True)
    full = main(make_cfg(setup, "full", **kw))
    ref = read_log(full["log"])
    assert [r["step"] for r in ref] == list(range(1, 8))
    # crash after step 4: keep checkpoints 1..4 only, then resume (step 5 starts the second epoch: 40 rows / 8)
    crashed = setup / "crashed"
    shutil.copytree(setup / "full" / "checkpoints_sft", crashed / "checkpoints_sft")
    for s in (5, 6, 7):
        shutil.rmtree(crashed / "checkpoints_sft" / str(s))
    out = main(make_cfg(setup, "crashed", load_checkpoint=True, **kw))
    resumed = read_log(out["log"])
    assert [r["step"] for r in resumed] == [5, 6, 7]
    for a, b in zip(resumed, ref[4:]):
        for k in b:
            if k not in TIMING_KEYS:
                assert a[k] == b[k], (a["step"], k, a[k], b[k])
    for a, b in zip(jax.tree_util.tree_leaves(out["params"]), jax.tree_util.tree_leaves(full["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def cli_cfg(cfg: SFTConfig) -> int:
    return run_cli_with(cli, cfg)


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("missing_key", "--input_key 'question' is not a field of dataset"),
    ("empty_file", "is empty"),
    ("row_not_object", "line 2 is a list ('[1, 2]'), not a JSON object"),
    ("value_type", "'input' is int ('5'); expected a string. The record: {'input': 5, 'output': 'x'}"),
    ("probs_length", "--dataset names 2 dataset(s)"),
    ("no_output_key", "--output_key is required"),
    ("batch", "--train_batch_size 12 must be a multiple of --micro_train_batch_size x data-parallel size = 2 x 4"),
])
def test_bad_data_fails_before_any_compute(setup, tmp_path, case, message, capsys):
    good = str(setup / "add.jsonl")
    flags = {
        "missing_key": dict(input_key="question"),
        "empty_file": dict(dataset=_write(tmp_path / "empty.jsonl", "")),
        "row_not_object": dict(dataset=_write(tmp_path / "rows.jsonl", '{"input": "1+1=", "output": "2"}\n[1, 2]\n')),
        "value_type": dict(dataset=_write(tmp_path / "types.jsonl",
                                          '{"input": "1+1=", "output": "2"}\n{"input": 5, "output": "x"}\n')),
        "probs_length": dict(dataset=f"{good},{good}", dataset_probs="0.5"),
        # no --output_key and no 'output' field to read by default (data/sft.py)
        "no_output_key": dict(output_key=None, dataset=_write(tmp_path / "answer.jsonl", '{"input": "1+1=", '
                                                                                      '"answer": "2"}\n' * 10)),
        "batch": dict(train_batch_size=12),
    }[case]
    cfg = make_cfg(setup, f"bad_{case}", **flags)
    assert cli_cfg(cfg) == 2
    err = capsys.readouterr().err
    assert message in err, err
    if case == "missing_key":
        assert "available keys: ['input', 'output']" in err
    assert not os.path.exists(cfg.save_path), "the run started (created --save_path) before failing"


def test_existing_checkpoints_need_load_checkpoint(setup, tmp_path, capsys):
    from jaxrlhf.train.checkpoint import Checkpointer

    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, {"x": jnp.zeros(2)}, {"step": 3})
    cfg = make_cfg(setup, "stale", ckpt_path=str(tmp_path / "ckpt"))
    assert cli_cfg(cfg) == 2
    assert "already holds checkpoints (steps [3]): pass --load_checkpoint" in capsys.readouterr().err
    assert not os.path.exists(cfg.save_path)


@pytest.mark.slow
def test_builtin_demo_runs_offline(tmp_path):
    """``python -m jaxrlhf.sft --mesh 4x2`` with no --pretrain: the tiny addition demo (about a minute here)."""
    out = main(SFTConfig(demo_dir=str(tmp_path / "demo")))
    log = read_log(out["log"])
    evals = [r["eval/loss"] for r in log if "eval/loss" in r]
    assert log[-1]["loss"] < 0.25 * log[0]["loss"] and evals[-1] < 0.5 * evals[0], (log[0], log[-1], evals)
    assert os.path.isfile(tmp_path / "demo" / "run" / "model.safetensors")


def _lora_model(base: str, params, *, load_in_4bit: bool = False):
    """A jaxrlhf model with LoRA adapters (alpha 16, all-linear) of ``params``' shapes, holding ``params``."""
    from jaxrlhf.train.lora import add_lora

    a = params["model"]["layers"][0]["self_attn"]["q_proj"]["lora_a"]
    model = add_lora(from_pretrained(base), lora_rank=a.shape[1], lora_alpha=16.0, target_modules=["all-linear"],
                     lora_path=None, seed=0, load_in_4bit=load_in_4bit)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.device_get(params))
    nnx.update(model, state)
    return model


def test_lora_sft_learns_and_exports_merged_and_peft(setup):
    """LoRA r=8: the loss falls; --save_path is the merged model (transformers: our logits); --lora_save_adapter
    writes a PEFT directory that PEFT loads on the base with the same logits; the base weights did not move."""
    import peft

    out = main(make_cfg(setup, "lora", max_epochs=4, learning_rate=1e-2, lora_rank=8, lora_alpha=16,
                        lora_save_adapter=True))
    log = read_log(out["log"])
    assert log[-1]["loss"] < 0.7 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])
    base = str(setup / "model")
    base_params = nnx.state(from_pretrained(base)).to_pure_dict()
    np.testing.assert_array_equal(np.asarray(out["params"]["model"]["layers"][1]["mlp"]["up_proj"]["kernel"]),
                                  np.asarray(base_params["model"]["layers"][1]["mlp"]["up_proj"]["kernel"]))
    ids = np.array([[3, 5, 4, 6, 9, 2], [4, 7, 5, 8, 2, 0]])
    mask = np.array([[1] * 6, [1] * 5 + [0]])
    ours = np.asarray(_lora_model(base, out["params"])(jnp.asarray(ids), jnp.asarray(mask)))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(setup / "lora")).eval()
    adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                             out["lora_adapter"]).eval()
    for ref in (merged, adapted):
        with torch.no_grad():
            theirs = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        np.testing.assert_allclose(ours[mask > 0], theirs[mask > 0], atol=1e-4, rtol=1e-4)


def test_lora_resume_equals_uninterrupted(setup):
    kw = dict(train_batch_size=8, micro_train_batch_size=1, max_steps=4, save_steps=1, max_ckpt_num=10,
              max_epochs=1, lora_rank=4, learning_rate=1e-2, eval_holdout=0.0)
    full = main(make_cfg(setup, "lora_full", **kw))
    crashed = setup / "lora_crashed"
    shutil.copytree(setup / "lora_full" / "checkpoints_sft", crashed / "checkpoints_sft")
    for s in (3, 4):
        shutil.rmtree(crashed / "checkpoints_sft" / str(s))
    out = main(make_cfg(setup, "lora_crashed", load_checkpoint=True, **kw))
    ref, resumed = read_log(full["log"]), read_log(out["log"])
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, ref[2:]):
        assert all(a[k] == b[k] for k in b if k not in TIMING_KEYS), (a, b)
    for a, b in zip(jax.tree_util.tree_leaves(out["params"]), jax.tree_util.tree_leaves(full["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the LoRA checkpoints do not resume as a full fine-tuning run (another parameter layout)
    with pytest.raises(ValueError, match="LoRA: checkpoint '--lora_rank 4 --lora_alpha 16.0 --target_modules "
                                         "all-linear', this run None"):
        main(make_cfg(setup, "lora_crashed", load_checkpoint=True, **{**kw, "lora_rank": 0}))


@pytest.mark.slow  # ~20 s; QLoRA training on 4x2 is covered fast by tests/test_nf4.py
def test_qlora_sft_learns_and_exports_the_dequantized_merge(setup):
    """--load_in_4bit: NF4 base + LoRA r=8; the loss falls, the base codes do not move, and the merged export
    (NF4 dequantized + W + alpha/r A B) loads in transformers with the logits of the trained 4-bit model."""
    from jaxrlhf.models.nf4 import quantize_base

    out = main(make_cfg(setup, "qlora", max_epochs=3, learning_rate=1e-2, lora_rank=8, lora_alpha=16,
                        load_in_4bit=True, eval_holdout=0.0))
    log = read_log(out["log"])
    assert log[-1]["loss"] < 0.7 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])
    ids = np.array([[3, 5, 4, 6, 9, 2], [4, 7, 5, 8, 2, 0]])
    mask = np.array([[1] * 6, [1] * 5 + [0]])
    model = quantize_base(from_pretrained(str(setup / "model")))
    codes = np.asarray(model.model.layers[0].mlp.gate_proj.kernel_nf4[...])
    np.testing.assert_array_equal(np.asarray(out["params"]["model"]["layers"][0]["mlp"]["gate_proj"]["kernel_nf4"]),
                                  codes)
    ours = np.asarray(_lora_model(str(setup / "model"), out["params"], load_in_4bit=True)(jnp.asarray(ids),
                                                                                         jnp.asarray(mask)))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(setup / "qlora")).eval()
    with torch.no_grad():
        theirs = merged(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours[mask > 0], theirs[mask > 0], atol=1e-4, rtol=1e-4)

