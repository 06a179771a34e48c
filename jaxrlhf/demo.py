"""The built-in demo behind ``python -m jaxrlhf.ppo --mesh 4x2`` (no ``--pretrain``): offline, about 5 minutes on 2 cores.

Task: single-digit addition, ``"7+5="`` -> ``"12"``, rewarded 1 by a verifier (a ``reward.py`` loaded through
``--remote_rm_url``, the same path users take) when the answer is right.

The policy is warm-started by a short SFT phase on deliberately *unreliable* demonstrations: for each prompt the
answer shown is right only 30% of the time, off by one (a+b+1) 50% of the time and random otherwise. The SFT model
therefore mostly says the wrong sum (its greedy answer is a+b+1), and samples the right one about a third of the
time. PPO must move probability onto the answers the verifier accepts: the reward rising from ~0.3 towards 1 is
learning which answer is correct, not a length or format trick (every answer has the same format and length).

Everything is built locally and cached in ``--demo_dir``: a character tokenizer, a random tiny Llama saved as a
real HF safetensors directory, the SFT model (trained on the same mesh with the shared train step and exported
as an HF directory) and the prompt file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import numpy as np

DEMO_VERSION = "3"
CHARS = list("0123456789+=")
REWARD_PY = '''"""Verifier for the demo: 1.0 when the completion is exactly the sum, else 0.0."""


def reward_func(queries, prompts, labels):
    rewards = [1.0 if q[len(p):].strip() == label else 0.0 for q, p, label in zip(queries, prompts, labels)]
    return {"rewards": rewards, "extra_logs": {"accuracy": rewards}}
'''

# PPO settings for the demo, applied only to flags the user left at their defaults.
DEMO_FLAGS = dict(
    prompt_max_len=4, generate_max_len=3, label_key="label",
    rollout_batch_size=32, n_samples_per_prompt=4, micro_rollout_batch_size=16,
    train_batch_size=64, micro_train_batch_size=8, num_episodes=30,
    actor_learning_rate=3e-4, critic_learning_rate=1e-3, lr_warmup_ratio=0.05, init_kl_coef=0.001,
)


def _answer(a: int, b: int, rng: np.random.Generator) -> int:
    u = rng.random()
    if u < 0.3:
        return a + b
    if u < 0.8:
        return a + b + 1
    return int(rng.integers(0, 19))


def save_tiny_llama(path: str, tok, *, seed: int) -> None:
    """A random tiny Llama (2 layers, hidden 128, head_dim 64, vocab 32) for the character tokenizer ``tok``, saved
    with it as an HF directory by transformers (the demos' starting point)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    if len(tok) > hf_cfg.vocab_size:
        raise ValueError(f"the tiny Llama's vocabulary ({hf_cfg.vocab_size}) is smaller than the tokenizer's")
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(path)
    tok.save_pretrained(path)


def _sft_loss(model, b):
    from jaxrlhf import losses

    logits = model(b["input_ids"], attention_mask=b["attention_mask"])
    return losses.next_token_nll(logits, b["input_ids"], b["loss_mask"], b["num_tokens"]), {}


def _build_sft(out_dir: str, tok_dir: str, mesh, seed: int) -> None:
    from flax import nnx

    from converters.hf import export_hf
    from jaxrlhf.data.loader import right_pad
    from jaxrlhf.data.tokenizer import load_tokenizer
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.train.optim import make_optimizer
    from jaxrlhf.train.steps import init_optimizer, make_train_step, stack_micro_batches

    tok = load_tokenizer(tok_dir)
    base = out_dir + ".base"
    save_tiny_llama(base, tok, seed=seed)
    model = from_pretrained(base, mesh=mesh)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    rng = np.random.default_rng(seed)
    steps, batch = 400, 128
    tx, _ = make_optimizer(learning_rate=3e-3, total_steps=steps, warmup_ratio=0.05, weight_decay=0.0)
    opt = init_optimizer(tx, params, mesh)
    step_fn = make_train_step(graphdef, _sft_loss, tx, params=params, opt_state=opt, mesh=mesh)
    eos = tok.eos_token_id
    for i in range(steps):
        rows, loss_rows = [], []
        for _ in range(batch):
            a, b = (int(x) for x in rng.integers(0, 10, 2))
            p = tok(f"{a}+{b}=", add_special_tokens=False)["input_ids"]
            r = tok(str(_answer(a, b, rng)), add_special_tokens=False)["input_ids"] + [eos]
            rows.append(p + r)
            loss_rows.append([0] * len(p) + [1] * len(r))
        ids, mask = right_pad(rows, tok.pad_token_id, length=8)
        lm, _ = right_pad(loss_rows, 0, length=8)
        b = {"input_ids": ids, "attention_mask": mask, "loss_mask": lm.astype(np.float32),
             "num_tokens": np.float32(lm[:, 1:].sum())}
        params, opt, m = step_fn(params, opt, stack_micro_batches(b, batch))
        if (i + 1) % 100 == 0:
            print(f"[demo] SFT step {i + 1}/{steps}: loss {float(m['loss']):.3f}", file=sys.stderr)
    export_hf(params, model.cfg, out_dir, head="lm", aux_from=base, overwrite=True)
    shutil.rmtree(base, ignore_errors=True)


def _vllm_installed() -> bool:
    """vLLM and Ray importable, and not turned off with JAXRLHF_NO_VLLM=1 (then the JAX sampler runs)."""
    import importlib.util

    return os.environ.get("JAXRLHF_NO_VLLM", "0") != "1" and all(
        importlib.util.find_spec(m) is not None for m in ("vllm", "ray"))


def run_paths(root: str, *, load_checkpoint: bool) -> dict:
    """``save_path`` / ``ckpt_path`` of a built-in demo run under its cache ``root``: ``root/run``. A new demo
    (no ``--load_checkpoint``) moves the previous demo's run aside to ``root/run.prev`` (replacing an older one)
    instead of refusing its checkpoints, so ``make demo`` can be run again; ``--load_checkpoint`` resumes it."""
    run = os.path.join(root, "run")
    if os.path.isdir(run) and not load_checkpoint:
        prev = run + ".prev"
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(run, prev)
        print(f"[demo] new run: the previous demo run was moved to {prev} (pass --load_checkpoint to resume it "
              "instead)", file=sys.stderr)
    return dict(save_path=run, ckpt_path=os.path.join(run, "checkpoints"))


def prepare(cfg, mesh):
    """Build (or reuse) the demo's tokenizer, SFT policy, prompts and verifier; return ``cfg`` (a PPO config)
    pointing at them, with the demo's settings on every flag the user left at its default."""
    import jax

    from jaxrlhf.cli import at_defaults, field_default
    from jaxrlhf.data.tokenizer import build_tiny_tokenizer

    if jax.process_count() > 1:
        raise ValueError("the built-in demo runs in one process: pass --pretrain, --prompt_data and a reward")

    root = os.path.abspath(cfg.demo_dir)
    stamp = os.path.join(root, f"ready-v{DEMO_VERSION}-seed{cfg.seed}")
    sft_dir = os.path.join(root, f"sft-seed{cfg.seed}")
    if not os.path.exists(stamp):
        os.makedirs(root, exist_ok=True)
        print(f"[demo] building the tiny addition task in {root} (once; cached)", file=sys.stderr)
        tok_dir = os.path.join(root, "tokenizer")
        build_tiny_tokenizer(tok_dir, CHARS)
        _build_sft(sft_dir, tok_dir, mesh, cfg.seed)
        with open(os.path.join(root, "prompts.jsonl.tmp"), "w") as f:
            for a in range(10):
                for b in range(10):
                    f.write(json.dumps({"input": f"{a}+{b}=", "label": str(a + b)}) + "\n")
        os.replace(os.path.join(root, "prompts.jsonl.tmp"), os.path.join(root, "prompts.jsonl"))
        with open(os.path.join(root, "reward.py"), "w") as f:
            f.write(REWARD_PY)
        open(stamp, "w").close()
    changes = dict(DEMO_FLAGS, vllm_num_engines=1 if _vllm_installed() else 0)  # vLLM rollouts, as OpenRLHF's
    if cfg.save_path == field_default(cfg, "save_path"):
        changes.update(run_paths(root, load_checkpoint=cfg.load_checkpoint))
    cfg = dataclasses.replace(at_defaults(cfg, changes), pretrain=sft_dir, prompt_data=os.path.join(
        root, "prompts.jsonl"), remote_rm_url=os.path.join(root, "reward.py"))
    engine = f"{cfg.vllm_num_engines} vLLM engine(s)" if cfg.vllm_num_engines else "the JAX sampler"
    print(f"[demo] PPO on the addition task: policy {sft_dir}, verifier {cfg.remote_rm_url}, rollouts on {engine}",
          file=sys.stderr)
    return cfg
