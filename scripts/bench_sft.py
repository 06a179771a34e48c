"""SFT train-step throughput: jaxrlhf (the shared jitted step + sft_loss) next to an equivalent PyTorch step.

    .venv/bin/python scripts/bench_sft.py [--batch 4] [--seq 256] [--steps 5] [--warmup 2] [--mesh 1] \\
        [--threads N] [--model DIR] [--out bench_sft.json]

Model: a ~127M-parameter Llama-style config (hidden 768, 12 layers, 12 heads, MLP 1792, vocab 32000, untied head),
randomly initialised ONCE by transformers and saved, or ``--model DIR`` (e.g. the real SmolLM2-135M of
scripts/real_model.sh); both frameworks start from those same weights.

One step, both sides, fp32 everywhere: forward over [batch, seq] tokens, next-token cross entropy averaged over the
learned tokens (the second half of each row; the first half is the "prompt"), backward, global-norm clipping at 1.0,
AdamW (lr 1e-5, betas 0.9/0.95, eps 1e-8, no weight decay).
- jaxrlhf: ``jaxrlhf.sft.sft_loss`` through ``train.steps.make_train_step`` (one micro-batch) and
  ``train.optim.make_optimizer`` on the ``--mesh`` (default: one device, the whole CPU).
- PyTorch: ``transformers.LlamaForCausalLM(labels=...)`` (the same loss), ``clip_grad_norm_``, ``torch.optim.AdamW``.
Timed: ``--steps`` steps after ``--warmup`` untimed ones (JAX compiles during warm-up), the two frameworks'
steps interleaved so that other load on the machine hits both alike; each step ends with the loss on the host.
Reported: median step time and tokens/s (batch x seq / step time). The first-step losses of the two must agree
(same weights, same batch): a check that the two sides compute the same thing.

On a shared, oversubscribed CPU, intra-op threads wait on each other (a 2-thread PyTorch step measured several
times slower than a 1-thread one on a loaded 2-core machine): compare ``--threads 1`` too.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=1792, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)
LR, BETAS, EPS, MAX_NORM = 1e-5, (0.9, 0.95), 1e-8, 1.0


def make_batch(batch: int, seq: int, vocab_size: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, (batch, seq)).astype(np.int32)
    loss_mask = np.zeros((batch, seq), np.float32)
    loss_mask[:, seq // 2:] = 1.0  # the second half is the "response"
    return ids, loss_mask


def jax_stepper(model_dir: str, mesh_text: str, ids, loss_mask):
    """A closure running one jaxrlhf SFT step (blocking on its loss), and a description of the devices."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.sft import sft_loss
    from jaxrlhf.train.optim import make_optimizer
    from jaxrlhf.train.steps import init_optimizer, make_train_step, stack_micro_batches
    from sharding import make_mesh

    mesh = make_mesh(mesh_text)
    model = from_pretrained(model_dir, mesh=mesh, dtype=np.float32)
    graphdef, state = nnx.split(model)
    tx, _ = make_optimizer(learning_rate=LR, total_steps=10_000, warmup_ratio=0.0, min_lr_ratio=1.0,
                           weight_decay=0.0, betas=BETAS, eps=EPS, max_norm=MAX_NORM)
    st = {"params": state.to_pure_dict()}
    del model, state
    st["opt"] = init_optimizer(tx, st["params"], mesh)
    train_step = make_train_step(graphdef, sft_loss, tx, params=st["params"], opt_state=st["opt"], mesh=mesh)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask,
             "num_tokens": np.float32(loss_mask[:, 1:].sum())}
    micro = stack_micro_batches(batch, len(ids))

    def step() -> float:
        st["params"], st["opt"], m = train_step(st["params"], st["opt"], micro)
        return float(m["loss"])

    return step, f"jax {jax.__version__}, {len(jax.devices())} x {jax.devices()[0].platform}"


def torch_stepper(model_dir: str, ids, loss_mask):
    """A closure running one PyTorch step (forward, backward, clip, AdamW), and a description."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()
    labels[torch.tensor(loss_mask) == 0] = -100  # HF shifts labels itself and averages over the rest

    def step() -> float:
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def timed(step) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = step()
    return time.perf_counter() - t0, loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (JAX compiles here)")
    p.add_argument("--mesh", default="1", help="jaxrlhf mesh (default one device)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N); N=1 also makes XLA's CPU matmuls single-threaded (default: both "
                        "frameworks use every core)")
    p.add_argument("--model", default=None,
                   help="an HF Llama directory to time instead of the random config (e.g. the real model of "
                        "scripts/real_model.sh)")
    p.add_argument("--out", default="bench_sft.json")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")

    from sharding import use_host_devices

    use_host_devices(args.mesh)
    if args.threads == 1:  # before jax starts its CPU client
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            tmp = args.model
            model_cfg = json.load(open(os.path.join(tmp, "config.json")))
            n_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(tmp).parameters())
        else:
            torch.manual_seed(0)
            hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL))
            n_params = sum(p.numel() for p in hf_model.parameters())
            hf_model.save_pretrained(tmp)
            model_cfg = MODEL
            del hf_model
        gc.collect()
        ids, loss_mask = make_batch(args.batch, args.seq, model_cfg["vocab_size"])
        print(f"model: {n_params / 1e6:.1f}M parameters; batch {args.batch} x seq {args.seq} = {tokens} tokens/step",
              file=sys.stderr)
        steppers = {"jaxrlhf (JAX/XLA)": jax_stepper(tmp, args.mesh, ids, loss_mask),
                    "PyTorch eager": torch_stepper(tmp, ids, loss_mask)}
    runs = {name: {"step_times": [], "losses": [], "info": info} for name, (_, info) in steppers.items()}
    for name, (step, _) in steppers.items():  # warm-up (JAX compiles), one framework after the other
        for _ in range(args.warmup):
            dt, loss = timed(step)
            runs[name]["losses"].append(loss)
            runs[name].setdefault("first_step_s", dt)
        print(f"{name}: warm-up done (first step {runs[name]['first_step_s']:.2f}s)", file=sys.stderr)
    for i in range(args.steps):  # timed steps interleaved, so load from other processes hits both alike
        for name, (step, _) in steppers.items():
            dt, loss = timed(step)
            runs[name]["step_times"].append(dt)
            print(f"  step {i + 1}: {name} {dt:.3f}s", file=sys.stderr)

    rows = []
    for name, r in runs.items():
        med = statistics.median(r["step_times"])
        rows.append({"framework": name, "median_step_s": med, "min_step_s": min(r["step_times"]),
                     "tokens_per_s": tokens / med, "first_step_s": r["first_step_s"], "first_loss": r["losses"][0],
                     "versions": r["info"]})
    jx, pt = rows[0], rows[1]
    loss_gap = abs(jx["first_loss"] - pt["first_loss"])
    result = {
        "model": {**{k: model_cfg.get(k) for k in MODEL}, "path": args.model, "parameters": n_params}, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "warmup": args.warmup, "dtype": "float32", "mesh": args.mesh, "threads": args.threads, "rows": rows,
        "speedup_jax_over_torch": pt["median_step_s"] / jx["median_step_s"], "first_loss_abs_diff": loss_gap,
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "machine": platform.machine(),
        "raw_step_times": {name: r["step_times"] for name, r in runs.items()},
    }
    print(f"\nSFT train step, {n_params / 1e6:.0f}M-param Llama, fp32, batch {args.batch} x seq {args.seq} "
          f"({tokens} tokens), AdamW + clip, median of {args.steps} steps")
    print(f"{'framework':<20} {'step (s)':>9} {'min (s)':>9} {'tokens/s':>10} {'1st step (s)':>13} {'1st loss':>9}")
    for r in rows:
        print(f"{r['framework']:<20} {r['median_step_s']:>9.3f} {r['min_step_s']:>9.3f} {r['tokens_per_s']:>10.1f} "
              f"{r['first_step_s']:>13.2f} {r['first_loss']:>9.4f}")
    print(f"speed-up (PyTorch step time / jaxrlhf step time): {result['speedup_jax_over_torch']:.2f}x; "
          f"first-step loss difference {loss_gap:.2e}; load average {result['load_average'][0]:.1f} on "
          f"{os.cpu_count()} cores")
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")
    if loss_gap > 1e-3 * abs(pt["first_loss"]):
        print(f"error: the first-step losses differ by {loss_gap:.3g}: the two steps do not compute the same loss",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
