"""GRPO end to end on the real model: jaxrlhf (JAX sampler, and one vLLM engine) against TRL's GRPOTrainer.

    .venv/bin/python scripts/bench_e2e.py [--steps 4] [--prompts 8] [--group 4] [--new_tokens 32] [--bf16] \\
        [--model DIR] [--skip trl,vllm] [--jax_flags "..."] [--out bench_e2e.json]

Model: SmolLM2-135M-Instruct (scripts/real_model.sh) on the CPU, fp32 everywhere, or with ``--bf16`` bf16 compute
and fp32 master weights on both sides (jaxrlhf ``--bf16``: bf16 train steps and rollouts; TRL ``bf16=True``:
torch autocast). Task: the arithmetic questions of
examples/arithmetic (chat template) with its verifier as the reward, the same prompts in the same order for every
framework. One step: ``--prompts`` prompts x ``--group`` samples of at most ``--new_tokens`` tokens at temperature
1, group-normalised advantages (GRPO), no KL term (beta 0), one optimizer update over all samples (AdamW, lr 1e-6).

- jaxrlhf: ``python -m jaxrlhf.ppo --advantage_estimator group_norm`` (``--vllm_num_engines 0`` and ``1``); its
  per-step ``step_time`` and phase split (``time/*``) come from its metrics log.
- TRL (``pip install --no-deps trl==1.16.0`` on demand: its pins would move the project's packages):
  ``GRPOTrainer`` with ``per_device_train_batch_size = prompts x group``, ``num_generations = group``,
  ``max_completion_length = new_tokens``, ``beta = 0``, ``use_cpu``; a callback times each optimizer step.

Each framework runs in its own process (one after the other, so they do not share the 2 cores); reported: the
median seconds per step after the first (compilation / warm-up), the ratio TRL / jaxrlhf, jaxrlhf's phase split,
and each run's peak RSS (its whole process tree, sampled every 0.5 s: the vLLM engine's Ray workers included).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
PHASES = ("generate", "reward", "experience", "train", "sync", "data", "log", "save")

TRL_SCRIPT = r'''
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
sys.path.insert(0, sys.argv[2])
from examples.arithmetic.reward import reward_func

a = json.loads(sys.argv[1])
rows = [json.loads(line) for line in open(a["prompts_file"])]
data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["input"]}], "label": r["label"]} for r in rows])

def reward(prompts, completions, label, **_):
    texts = [c[-1]["content"] for c in completions]
    return reward_func(texts, [""] * len(texts), label)["rewards"]

class Clock(TrainerCallback):
    def __init__(self):
        self.t, self.steps = time.perf_counter(), []
    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        self.steps.append(now - self.t)
        self.t = now

tok = AutoTokenizer.from_pretrained(a["model"])
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
cfg = GRPOConfig(output_dir=a["out"], per_device_train_batch_size=a["prompts"] * a["group"],
                 num_generations=a["group"], max_completion_length=a["new_tokens"], beta=0.0, learning_rate=1e-6,
                 max_steps=a["steps"], logging_steps=1, use_cpu=True, report_to="none", save_strategy="no",
                 temperature=1.0, shuffle_dataset=False, seed=0, bf16=a["bf16"], disable_dropout=True)
clock = Clock()
trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                      callbacks=[clock])
clock.t = time.perf_counter()
trainer.train()
rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
print("BENCH " + json.dumps({"step_times": clock.steps, "rewards": rewards}))
'''


def tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], log_path: str, env: dict | None = None) -> tuple[int, int, str]:
    """``(returncode, peak RSS of the process tree in bytes, stdout)``; stderr goes to ``log_path``."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
        peak = [0]

        def watch():
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(0.5)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        out = proc.stdout.read()
        proc.wait()
        t.join()
    return proc.returncode, peak[0], out


def after_first(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def run_jaxrlhf(args, prompts: str, work: str, engines: int) -> dict:
    out = os.path.join(work, f"jaxrlhf-{engines}")
    cmd = [sys.executable, "-m", "jaxrlhf.ppo", "--pretrain", args.model, "--prompt_data", prompts,
           "--label_key", "label", "--apply_chat_template", "--remote_rm_url",
           os.path.join(ROOT, "examples", "arithmetic", "reward.py"), "--advantage_estimator", "group_norm",
           "--n_samples_per_prompt", str(args.group), "--rollout_batch_size", str(args.prompts),
           "--train_batch_size", str(args.prompts * args.group), "--micro_train_batch_size", str(args.micro),
           "--micro_rollout_batch_size", str(args.micro), "--prompt_max_len", str(args.prompt_max_len),
           "--generate_max_len", str(args.new_tokens), "--max_steps", str(args.steps), "--init_kl_coef", "0",
           "--actor_learning_rate", "1e-6", "--lr_warmup_ratio", "0", "--mesh", "1", "--vllm_num_engines",
           str(engines), "--vllm_sync_check", "off", "--save_path", out, "--ckpt_path", os.path.join(out, "ckpt"),
           "--save_steps", "-1", "--max_ckpt_num", "1", *(["--bf16"] if args.bf16 else []), *args.jax_flags.split()]
    rc, peak, _ = run_measured(cmd, out + ".log")
    if rc != 0:
        raise RuntimeError(f"jaxrlhf ({engines} engines) failed (rc {rc}); see {out}.log")
    log = [json.loads(line) for line in open(os.path.join(out, "logs", "metrics.jsonl"))]
    steps = [r["step_time"] for r in log]
    phases = {k: after_first([r.get(f"time/{k}", 0.0) for r in log])
              for k in (*PHASES, "update_actor", "experience_forward")}
    rates = {k: after_first([r.get(f"{k}_tokens_per_s", 0.0) for r in log]) for k in ("generate", "experience",
                                                                                       "train")}
    return {"step_times": steps, "s_per_step": after_first(steps), "phases": phases, "tokens_per_s": rates,
            "peak_rss_gb": peak / 2**30, "rewards": [r["reward"] for r in log],
            "compile_count": log[-1].get("compile/count")}


def ensure_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        print("[bench] installing trl==1.16.0 --no-deps (its pins would move the project's packages)",
              file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "trl==1.16.0"], check=True)


def run_trl(args, prompts: str, work: str) -> dict:
    ensure_trl()
    a = {"model": args.model, "prompts_file": prompts, "out": os.path.join(work, "trl"), "prompts": args.prompts,
         "group": args.group, "new_tokens": args.new_tokens, "steps": args.steps, "bf16": args.bf16}
    rc, peak, out = run_measured([sys.executable, "-c", TRL_SCRIPT, json.dumps(a), ROOT],
                                 os.path.join(work, "trl.log"))
    if rc != 0:
        raise RuntimeError(f"TRL failed (rc {rc}); see {os.path.join(work, 'trl.log')}")
    res = json.loads(next(line for line in out.splitlines() if line.startswith("BENCH "))[6:])
    return {"step_times": res["step_times"], "s_per_step": after_first(res["step_times"]),
            "peak_rss_gb": peak / 2**30, "rewards": res["rewards"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF directory (default: scripts/real_model.sh's SmolLM2-135M)")
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per framework (the first is not counted)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="samples per prompt")
    p.add_argument("--new_tokens", type=int, default=32, help="most generated tokens per sample")
    p.add_argument("--prompt_max_len", type=int, default=64)
    p.add_argument("--micro", type=int, default=8, help="jaxrlhf micro-batch rows (train and experience)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 compute with fp32 master weights on both sides (jaxrlhf --bf16, TRL bf16=True: torch "
                        "autocast); default fp32 everywhere")
    p.add_argument("--skip", default="", help="comma-separated: trl, vllm, jax")
    p.add_argument("--jax_flags", default="", help="extra jaxrlhf.ppo flags, e.g. '--fixed_shapes --logits_chunk_size "
                                                   "4096' for the padded, unchunked layout (peak memory before/after)")
    p.add_argument("--out", default="bench_e2e.json")
    args = p.parse_args(argv)
    if min(args.steps, args.prompts, args.group, args.new_tokens) < 1 or args.steps < 2:
        p.error("--steps must be >= 2 and the sizes >= 1")
    skip = {s for s in args.skip.split(",") if s}
    tag = f" [{args.jax_flags}]" if args.jax_flags else ""
    if args.model is None:
        r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "real_model.sh")], cwd=ROOT, check=True,
                           capture_output=True, text=True)
        args.model = os.path.join(ROOT, r.stdout.strip().splitlines()[-1])
    from examples.arithmetic.make_prompts import questions

    results: dict = {}
    with tempfile.TemporaryDirectory() as work:
        prompts = os.path.join(work, "prompts.jsonl")
        with open(prompts, "w") as f:
            for row in questions(args.prompts * args.steps, seed=0, max_operand=100):
                f.write(json.dumps(row) + "\n")
        if "jax" not in skip:
            print("[bench] jaxrlhf, JAX sampler", file=sys.stderr)
            results["jaxrlhf (JAX sampler)" + tag] = run_jaxrlhf(args, prompts, work, engines=0)
        if "vllm" not in skip:
            print("[bench] jaxrlhf, one vLLM engine", file=sys.stderr)
            results["jaxrlhf (vLLM pool, 1 engine)" + tag] = run_jaxrlhf(args, prompts, work, engines=1)
        if "trl" not in skip:
            print("[bench] TRL GRPOTrainer", file=sys.stderr)
            results["TRL GRPOTrainer"] = run_trl(args, prompts, work)

    print(f"\nGRPO on {os.path.basename(os.path.normpath(args.model))}, {'bf16' if args.bf16 else 'fp32'} CPU "
          f"({os.cpu_count()} cores): "
          f"{args.prompts} prompts x {args.group} samples x <= {args.new_tokens} tokens; median of steps 2..{args.steps}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'run':<32} {'s/step':>8} {'peak RSS GB':>12}  steps (s)")
    for name, r in results.items():
        print(f"{name:<32} {r['s_per_step']:>8.2f} {r['peak_rss_gb']:>12.2f}  "
              + " ".join(f"{x:.1f}" for x in r["step_times"]))
    trl = results.get("TRL GRPOTrainer")
    for name, r in results.items():
        if name.startswith("jaxrlhf"):
            split = ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items() if v)
            print(f"{name}: phases (s) {split}; tokens/s {r['tokens_per_s']}; compiled programs "
                  f"{r['compile_count']}")
            if trl:
                r["speedup_over_trl"] = trl["s_per_step"] / r["s_per_step"]
                print(f"  TRL s/step / {name} s/step = {r['speedup_over_trl']:.2f}x")
    out = {"args": vars(args), "results": results, "load_average": os.getloadavg()}
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
