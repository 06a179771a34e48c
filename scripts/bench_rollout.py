"""Benchmark the vLLM rollout pool: weight broadcast bandwidth and rollout throughput, each against a peer.

    .venv/bin/python scripts/bench_rollout.py --out /tmp/bench_rollout.json [--demo_steps 12] [--model DIR]

1. broadcast: a random Qwen2-0.5B-shaped model (24 layers, hidden 896, head_dim 64, vocab 151936; ~0.49B params;
   ``--model tiny``: 4 layers, hidden 256, where per-call overheads show)
   ``--model DIR``: any HF directory, e.g. the real SmolLM2-135M of scripts/real_model.sh)
   is trained nowhere, only moved into one vLLM engine, best of 3 syncs:
   - ``shm``: what PPO does, ``VLLMPool.update_weights(hf_entries(params))``: cast on the devices, written shard by
     shard into shared-memory buckets (no transpose: the engine loads transposed views), in-place reload; its
     ``write_seconds`` is the trainer's part (the engine loads bucket k while bucket k+1 is written);
   - ``object store``: the peer, the transport before it (and still the one for engines on other nodes):
     ``hf_tensors`` gathered and transposed on the host, packed and put in Ray's object store;
   - ``memcpy``: one ``np.copyto`` of the same number of bytes (the physical limit of this machine).
2. rollout tokens/s, same model and prompts (64 prompts x 64 new tokens, sampling, warm):
   - the pool (1 engine, through Ray), - the same vLLM ``LLM`` called directly in this process (pool overhead),
   - the JAX sampler (``jaxrlhf.rollout.JaxSampler``, unsharded, fp32 params / fp32 compute).
3. with ``--demo_steps N``: the built-in PPO demo's mean step time over steps 3..N with the pool
   (1 engine) vs with the JAX sampler (``JAXRLHF_NO_VLLM=1``), each a fresh ``python -m jaxrlhf.ppo`` run.

Benchmarks are not tests: this prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
QWEN05 = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build(path: str, spec: dict) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    with torch.no_grad():
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**spec))
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_broadcast_and_rollout(model_dir: str, prompts: list[list[int]], max_tokens: int, kv_mb: int,
                                dtype: str) -> dict:
    import jax
    from flax import nnx

    from converters.hf import hf_entries, hf_tensors
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.rollout import JaxSampler, SamplingParams
    from jaxrlhf.rollout.vllm_pool import PoolConfig, VLLMPool

    res: dict = {}
    model = from_pretrained(model_dir, dtype=jax.numpy.float32)
    params = nnx.split(model)[1].to_pure_dict()
    sampling = SamplingParams(n=1, temperature=1.0, max_tokens=max_tokens, seed=0)

    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))  # fp32
    res["memcpy_s"] = memcpy_s(nbytes if dtype == "float32" else nbytes // 2)  # the bytes the engine receives

    pool = VLLMPool(PoolConfig(model=model_dir, num_engines=1, dtype=dtype, kv_cache_mb=kv_mb,
                               eos_token_ids=(2,), bucket_mb=256, max_model_len=1024))
    try:
        shm = [pool.update_weights(hf_entries(params, model.cfg)) for _ in range(4)][1:]  # the first maps the files
        res["broadcast_s"] = min(s["seconds"] for s in shm)
        res["broadcast_write_s"] = min(s["write_seconds"] for s in shm)
        res["broadcast_bytes"] = shm[0]["bytes"]
        res["broadcast_buckets"] = shm[0]["buckets"]
        pool.cfg = dataclasses.replace(pool.cfg, shared_memory=False)
        store = [pool.update_weights(hf_tensors(params, model.cfg)) for _ in range(3)]
        res["object_store_s"] = min(s["seconds"] for s in store)
        res["object_store_write_s"] = min(s["write_seconds"] for s in store)
        pool.generate(prompts[:4], sampling)  # warm
        res["pool_s"] = min(timed(lambda: pool.generate(prompts, sampling), 2))
        out = pool.generate(prompts, sampling)
        res["pool_tokens"] = sum(len(c.token_ids) for c in out)
    finally:
        pool.close()

    res.update(direct_vllm(model_dir, prompts, max_tokens, kv_mb, dtype))
    sampler = JaxSampler(model, pad_token_id=0, eos_token_ids=[2], max_prompt_len=max(map(len, prompts)))
    sampler.generate(prompts, sampling)  # compile
    res["jax_s"] = min(timed(lambda: sampler.generate(prompts, sampling), 2))
    res["jax_tokens"] = sum(len(c.token_ids) for c in sampler.generate(prompts, sampling))
    return res


def memcpy_s(nbytes: int) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    return min(timed(lambda: np.copyto(dst, src), 3))


def direct_vllm(model_dir: str, prompts: list[list[int]], max_tokens: int, kv_mb: int, dtype: str) -> dict:
    """The same vLLM engine settings as the pool's, called in this process (no Ray, no pool)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM
    from vllm import SamplingParams as VSP
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, dtype=dtype, kv_cache_memory_bytes=kv_mb << 20, skip_tokenizer_init=True,
              max_model_len=1024, seed=0, logprobs_mode="processed_logprobs")
    vsp = VSP(n=1, temperature=1.0, max_tokens=max_tokens, seed=0, logprobs=0, detokenize=False, stop_token_ids=[2])
    tp = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(tp[:4], vsp, use_tqdm=False)  # warm
    secs = min(timed(lambda: llm.generate(tp, vsp, use_tqdm=False), 2))
    tokens = sum(len(o.outputs[0].token_ids) for o in llm.generate(tp, vsp, use_tqdm=False))
    return {"direct_s": secs, "direct_tokens": tokens}


def demo_step_time(steps: int, use_vllm: bool, workdir: str) -> float:
    env = dict(os.environ, JAXRLHF_NO_VLLM="0" if use_vllm else "1")
    run = os.path.join(workdir, "vllm" if use_vllm else "jax")
    subprocess.run([sys.executable, "-m", "jaxrlhf.ppo", "--mesh", "4x2", "--max_steps", str(steps),
                    "--save_path", run, "--ckpt_path", os.path.join(run, "ckpt")], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = [json.loads(line) for line in open(os.path.join(run, "logs", "metrics.jsonl"))]
    return float(np.mean([r["step_time"] for r in log[2:]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_rollout.json")
    ap.add_argument("--model", default="qwen0.5b",
                    help="qwen0.5b: the broadcast figure's size; tiny (4 layers, hidden 256): per-call overheads show; "
                         "or an HF directory (e.g. the real SmolLM2-135M of scripts/real_model.sh)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--kv_cache_mb", type=int, default=512)
    ap.add_argument("--dtype", default="float32",
                    help="engine dtype; bfloat16 needs AVX512-BF16/AMX on the CPU build (on this project's AVX2-only "
                         "machines a bf16 0.5B engine took 500 s to start and over 8 min for the rollout)")
    ap.add_argument("--demo_steps", type=int, default=0, help="also time the PPO demo (0: skip)")
    args = ap.parse_args()
    if args.model not in ("qwen0.5b", "tiny") and not os.path.isfile(os.path.join(args.model, "config.json")):
        ap.error(f"--model {args.model}: neither qwen0.5b, tiny nor an HF directory with a config.json")

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 1000, int(rng.integers(8, 33))).tolist() for _ in range(args.prompts)]  # ids < vocab
    with tempfile.TemporaryDirectory() as tmp:
        if args.model in ("qwen0.5b", "tiny"):
            model_dir = os.path.join(tmp, f"{args.model}-random")
            n_params = build(model_dir, QWEN05 if args.model == "qwen0.5b" else TINY)
        else:
            import transformers

            model_dir = os.path.abspath(args.model)
            n_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        res = {"params": n_params, **bench_broadcast_and_rollout(model_dir, prompts, args.max_tokens,
                                                                  args.kv_cache_mb, args.dtype)}
        if args.demo_steps:
            res["demo_step_s_vllm"] = demo_step_time(args.demo_steps, True, tmp)
            res["demo_step_s_jax"] = demo_step_time(args.demo_steps, False, tmp)

    gb = res["broadcast_bytes"] / 1e9
    rows = [
        ("params", f"{n_params / 1e9:.3f} B", ""),
        (f"sync, shared memory ({args.dtype}, 1 engine)", f"{res['broadcast_s']:.3f} s",
         f"{gb / res['broadcast_s']:.2f} GB/s"),
        ("  of which the trainer's writes", f"{res['broadcast_write_s']:.3f} s",
         f"{gb / res['broadcast_write_s']:.2f} GB/s"),
        ("sync, object store (the peer)", f"{res['object_store_s']:.3f} s", f"{gb / res['object_store_s']:.2f} GB/s"),
        ("  of which the trainer's writes", f"{res['object_store_write_s']:.3f} s",
         f"{gb / res['object_store_write_s']:.2f} GB/s"),
        ("memcpy of the same bytes", f"{res['memcpy_s']:.3f} s", f"{gb / res['memcpy_s']:.2f} GB/s"),
        ("  memcpy / sync (shm, object store)", f"{res['memcpy_s'] / res['broadcast_s']:.3f}",
         f"{res['memcpy_s'] / res['object_store_s']:.3f}"),
        ("  memcpy / trainer's writes (shm)", f"{res['memcpy_s'] / res['broadcast_write_s']:.3f}", ""),
        ("rollout: pool (Ray, 1 engine)", f"{res['pool_s']:.2f} s", f"{res['pool_tokens'] / res['pool_s']:.0f} tok/s"),
        ("rollout: vLLM direct", f"{res['direct_s']:.2f} s", f"{res['direct_tokens'] / res['direct_s']:.0f} tok/s"),
        ("rollout: JAX sampler", f"{res['jax_s']:.2f} s", f"{res['jax_tokens'] / res['jax_s']:.0f} tok/s"),
    ]
    if args.demo_steps:
        rows += [("demo step: pool", f"{res['demo_step_s_vllm']:.2f} s", ""),
                 ("demo step: JAX sampler", f"{res['demo_step_s_jax']:.2f} s", "")]
    for r in rows:
        print(f"{r[0]:42s} {r[1]:>14s} {r[2]:>16s}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
