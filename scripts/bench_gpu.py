"""GPU figures: actor train-step MFU of a 1B Llama, JAX-sampler tokens/s, bf16-vs-fp32 log-prob drift.

    PYTHONPATH=. python scripts/bench_gpu.py [--batch 8] [--prompt 512] [--response 512] [--steps 5] \\
        [--mesh N] [--out bench_gpu.json]

Runs where jax sees GPUs (or TPUs), with no install step and no network: the lent GPU machine's image has jax,
flax, optax and transformers but not this project, hence ``PYTHONPATH=.``. Nothing is downloaded: the model is a
Llama-3.2-1B-shaped config (16 layers, hidden 2048, MLP 8192, 32 heads / 8 KV heads, vocab 128256, tied
embeddings), randomly initialised.

1. Actor train step (PPO policy loss, ``train.ppo_step.policy_loss_fn`` through ``train.steps.make_train_step``,
   fp32 master weights, bf16 compute, AdamW), ``[batch, prompt + response]`` rows, the LM head on response positions
   only, remat (gradient checkpointing) off and on. Median step time after 2 warm-up steps, each step blocked on;
   MFU = model FLOPs / time / peak, with model FLOPs per token = 6 x non-embedding parameters + 12 x layers x
   hidden x sequence length (PaLM's convention: no credit for remat's recomputation) plus the LM head, 6 x hidden
   x vocab on response tokens. Peak dense bf16 FLOP/s by device kind (H100/H200 SXM 989e12, A100 312e12; else
   ``--peak_tflops``).
2. JAX sampler: ``--sample_batch`` prompts of ``--prompt`` tokens, ``--sample_tokens`` new tokens, bf16 weights,
   temperature 1; tokens/s after a compile run.
3. Drift: log-probs of the response tokens with bf16 compute vs fp32, same weights and rows: mean / max |diff|.

Verified: only the ``--tiny`` smoke run on the CPU (tests/test_scripts.py); no GPU has been lent to the project
yet, so the GPU figures are unmeasured. On a GPU machine check it with ``PYTHONPATH=. python scripts/bench_gpu.py
--tiny`` first (seconds), then without ``--tiny``.

Benchmarks are not tests: this prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
                eos_token_id=128001, pad_token_id=0, hidden_act="silu")
TINY = dict(LLAMA_1B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2)  # --tiny: a smoke run
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(kind: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def model_flops_per_step(cfg, batch: int, prompt: int, response: int) -> float:
    """PaLM-style model FLOPs of one train step (forward + backward), LM head on response positions only."""
    d, L, V = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    body = cfg.num_params - V * d * (1 if cfg.tie_word_embeddings else 2)
    T = prompt + response
    return batch * T * (6 * body + 12 * L * d * T) + batch * response * 6 * d * V


def rows(batch: int, prompt: int, response: int, vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    seqs = rng.integers(3, vocab, (batch, prompt + response)).astype(np.int32)
    return {"sequences": seqs, "attention_mask": np.ones_like(seqs),
            "action_mask": np.ones((batch, response), np.float32)}


def bench_train(cfg, mesh, *, batch: int, prompt: int, response: int, steps: int, remat: bool) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxrlhf.train import ppo_step
    from jaxrlhf.train.optim import make_optimizer
    from jaxrlhf.train.steps import init_optimizer, make_train_step, stack_micro_batches

    graphdef, params = _init(cfg, mesh, remat=remat)
    tx, _ = make_optimizer(learning_rate=1e-6, total_steps=1000, warmup_ratio=0.0, min_lr_ratio=1.0,
                           weight_decay=0.0, betas=(0.9, 0.95), max_norm=1.0)
    opt = init_optimizer(tx, params, mesh)
    loss = ppo_step.policy_loss_fn(temperature=1.0, eps_clip_low=0.2, eps_clip_high=0.2, dual_clip=None,
                                   entropy_coef=0.0, use_kl_loss=False, kl_estimator="k1", chunk=256)
    step = make_train_step(graphdef, loss, tx, params=params, opt_state=opt, mesh=mesh, compute_dtype=jnp.bfloat16)
    b = rows(batch, prompt, response, cfg.vocab_size)
    b.update(old_logp=np.full((batch, response), -10.0, np.float32), advantages=np.ones((batch, response),
                                                                                         np.float32),
             num_tokens=np.float32(batch * response))
    micro = stack_micro_batches(b, batch)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        params, opt, _ = jax.block_until_ready(step(params, opt, micro))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _init(cfg, mesh, *, remat: bool, dtype=None):
    """(graphdef, params) of a random model, sharded by the partition rules, created on the devices."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrlhf.models.decoder import Decoder
    from sharding import named_shardings
    from sharding.tables import RULES_BY_MODEL_TYPE

    dtype = dtype or jnp.float32
    abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0), mesh=mesh, remat=remat))
    graphdef, state = nnx.split(abstract)
    shardings = named_shardings(state.to_pure_dict(), RULES_BY_MODEL_TYPE[cfg.model_type], mesh)

    def make():
        return nnx.split(Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0), mesh=mesh, remat=remat))[1].to_pure_dict()

    params = jax.jit(make, out_shardings=shardings)()
    return graphdef, params


def bench_sampler(cfg, mesh, *, batch: int, prompt: int, new_tokens: int) -> float:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxrlhf.rollout import JaxSampler, SamplingParams

    graphdef, params = _init(cfg, mesh, remat=False, dtype=jnp.bfloat16)
    model = nnx.merge(graphdef, params)
    sampler = JaxSampler(model, mesh=mesh, pad_token_id=0, eos_token_ids=[cfg.vocab_size + 1],  # never stops early
                         max_prompt_len=prompt)
    prompts = rows(batch, prompt, 0, cfg.vocab_size)["sequences"].tolist()
    sp = SamplingParams(n=1, temperature=1.0, max_tokens=new_tokens, seed=0)
    sampler.generate(prompts, sp)  # compile
    t0 = time.perf_counter()
    out = sampler.generate(prompts, sp)
    return sum(len(c.token_ids) for c in out) / (time.perf_counter() - t0)


def bench_drift(cfg, mesh, *, batch: int, prompt: int, response: int) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from jaxrlhf.train import ppo_step
    from jaxrlhf.train.steps import make_forward

    graphdef, params = _init(cfg, mesh, remat=False)
    fn = ppo_step.logprob_fn(temperature=1.0, chunk=256)
    b = rows(batch, prompt, response, cfg.vocab_size, seed=1)
    fp32 = np.asarray(make_forward(graphdef, fn, params=params, mesh=mesh)(params, b))
    bf16 = np.asarray(make_forward(graphdef, fn, params=params, mesh=mesh, compute_dtype=jnp.bfloat16)(params, b))
    diff = np.abs(fp32 - bf16)
    return {"logp_absdiff_mean": float(diff.mean()), "logp_absdiff_max": float(diff.max()),
            "logp_fp32_mean": float(fp32.mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--response", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--sample_batch", type=int, default=64)
    p.add_argument("--sample_tokens", type=int, default=256)
    p.add_argument("--mesh", default=None, help="default: all devices as FSDP (e.g. 8 or 1)")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak bf16 TFLOP/s of one device (else by kind)")
    p.add_argument("--skip", default="", help="comma-separated: train, sampler, drift")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script runs (CPU, tests)")
    p.add_argument("--out", default="bench_gpu.json")
    args = p.parse_args(argv)
    import jax

    from jaxrlhf.models.config import ModelConfig
    from sharding import make_mesh

    devices = jax.devices()
    kind = devices[0].device_kind
    mesh = make_mesh(args.mesh or str(len(devices)))
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch % dp or args.sample_batch % dp:
        p.error(f"--batch {args.batch} and --sample_batch {args.sample_batch} must be multiples of the mesh's "
                f"data-parallel size {dp} (--mesh {args.mesh or len(devices)})")
    cfg = ModelConfig.from_hf_dict(TINY if args.tiny else LLAMA_1B)
    skip = set(filter(None, args.skip.split(",")))
    res: dict = {"device": kind, "devices": len(devices), "jax": jax.__version__, "params": cfg.num_params,
                 "batch": args.batch, "prompt": args.prompt, "response": args.response}
    peak = peak_flops(kind, args.peak_tflops)
    flops = model_flops_per_step(cfg, args.batch, args.prompt, args.response)
    lines = [f"{cfg.num_params / 1e9:.2f}B Llama on {len(devices)} x {kind} (jax {jax.__version__})"]
    if "train" not in skip:
        for remat in (False, True):
            s = bench_train(cfg, mesh, batch=args.batch, prompt=args.prompt, response=args.response,
                            steps=args.steps, remat=remat)
            key = f"train_remat_{'on' if remat else 'off'}"
            res[key] = {"s_per_step": s, "tokens_per_s": args.batch * (args.prompt + args.response) / s,
                        "model_tflops_per_s": flops / s / 1e12,
                        "mfu": flops / s / (peak * len(devices)) if peak else None}
            mfu = f"{res[key]['mfu']:.1%}" if peak else "n/a (--peak_tflops)"
            lines.append(f"train step, remat {'on ' if remat else 'off'}: {s:.3f} s, "
                         f"{res[key]['tokens_per_s']:.0f} tok/s, {flops / s / 1e12:.0f} TFLOP/s, MFU {mfu}")
    if "sampler" not in skip:
        tps = bench_sampler(cfg, mesh, batch=args.sample_batch, prompt=args.prompt, new_tokens=args.sample_tokens)
        res["sampler_tokens_per_s"] = tps
        lines.append(f"JAX sampler: {args.sample_batch} x {args.sample_tokens} new tokens, bf16: {tps:.0f} tok/s")
    if "drift" not in skip:
        res["drift"] = bench_drift(cfg, mesh, batch=4, prompt=args.prompt, response=args.response)
        lines.append(f"bf16 vs fp32 response log-probs: mean |diff| {res['drift']['logp_absdiff_mean']:.2e}, "
                     f"max {res['drift']['logp_absdiff_max']:.2e}")
    print("\n".join(lines))
    with open(args.out + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
