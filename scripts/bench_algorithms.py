"""The built-in demo under issue 12's options: reward curve, steps/s and phase times per variant, in one run.

    .venv/bin/python scripts/bench_algorithms.py [baseline is_token_clip async_is ...]

Each variant is ``python -m jaxrlhf.ppo --mesh 4x2`` (the demo: 90 PPO steps, one vLLM engine where vLLM is
installed) with extra flags; it prints one JSON line per variant: the 5-step means of the sampled reward, the
median step time after the first two steps, the median seconds of each phase, the largest staleness and the mean
fraction of tokens the IS correction masked or clipped. Compare variants of the same run only (the machine's load
changes between runs).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time

IS_CLIP = ["--is_correction_level", "token", "--is_correction_mode", "clip", "--is_correction_threshold", "0.5", "2.0"]
VARIANTS = {
    "baseline": [],
    "is_token_clip": IS_CLIP,
    "async_is": ["--async_train", *IS_CLIP],
    "gspo_dapo": ["--policy_loss_type", "gspo", "--dynamic_filtering", "--overlong_buffer_len", "1"],
}


def run(name: str, root: str) -> dict:
    demo = f"{root}/{name}"
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "jaxrlhf.ppo", "--mesh", "4x2", "--demo_dir", demo, *VARIANTS[name]],
                          capture_output=True, text=True)
    if done.returncode:
        return {"variant": name, "failed": done.stderr.strip().splitlines()[-1:]}
    log = [json.loads(line) for line in open(f"{demo}/run/logs/metrics.jsonl")]
    rewards = [r["reward"] for r in log]
    steady = log[2:]
    phases = sorted({k for r in steady for k in r if k.startswith("time/")})
    return {"variant": name, "steps": len(log), "wall_s": round(time.time() - start, 1),
            "median_step_s": round(statistics.median(r["step_time"] for r in steady), 3),
            "reward_5step_means": [round(statistics.mean(rewards[i:i + 5]), 3) for i in range(0, len(rewards), 5)],
            "phases_median_s": {k[5:]: round(statistics.median(r.get(k, 0.0) for r in steady), 3) for k in phases},
            "staleness_max": max(r.get("rollout/staleness_max", 0) for r in log),
            "is_filtered_frac_mean": round(statistics.mean(r.get("is/filtered_frac", 0.0) for r in log), 4)}


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as root:
        for name in names or list(VARIANTS):
            print(json.dumps(run(name, root)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
