"""Train-step time of a tiny mixture-of-experts model next to a dense model of the same active size, on one mesh.

    .venv/bin/python scripts/bench_moe.py [--mesh 1x2x2x2] [--batch 8] [--seq 128] [--steps 5] [--warmup 2] \\
        [--out bench_moe.json]

Models (random, built by transformers and saved, fp32): a Mixtral with 8 experts of width F, top-2 routing, and a
Llama with the same hidden size, layers, heads and vocabulary whose MLP is 2F wide: per token both run the same
matmuls (the "active" parameters match up to the router), the MoE holds 4x the MLP parameters. Rows:
- ``dense``: the Llama;
- ``moe ragged``: the Mixtral with the default exact dispatch (sort by expert, ``jax.lax.ragged_dot``, unsort);
- ``moe one-hot``: the same Mixtral with the dense reference dispatch (every expert on every token).
One step = ``jaxrlhf.sft.sft_loss`` through ``train.steps.make_train_step`` (one micro-batch, AdamW, clipping; the
MoE rows add ``--aux_loss_coef 0.01``), steps interleaved across the rows, each ending with the loss on the host.
Reported: median step time, tokens/s, and the parameter counts.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

COMMON = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
EXPERT_FF, EXPERTS, TOP_K = 512, 8, 2


def save_models(root: str) -> dict[str, str]:
    import torch
    import transformers

    torch.manual_seed(0)
    out = {"dense": os.path.join(root, "dense"), "moe": os.path.join(root, "moe")}
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, intermediate_size=TOP_K * EXPERT_FF)) \
        .save_pretrained(out["dense"])
    transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, intermediate_size=EXPERT_FF, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)) \
        .save_pretrained(out["moe"])
    return out


def stepper(model_dir: str, mesh, ids, *, dispatch: str | None):
    """One jitted SFT step on ``mesh`` (blocking on its loss) and the model's parameter counts."""
    import numpy as np
    from flax import nnx

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.sft import sft_loss
    from jaxrlhf.train.optim import make_optimizer
    from jaxrlhf.train.steps import init_optimizer, make_train_step, stack_micro_batches

    model = from_pretrained(model_dir, mesh=mesh, dtype=np.float32)
    for layer in model.model.layers:
        if dispatch is not None and layer.sparse:
            layer.mlp.dispatch = dispatch
    counts = model.cfg.param_counts()
    graphdef, state = nnx.split(model)
    tx, _ = make_optimizer(learning_rate=1e-5, total_steps=10_000, warmup_ratio=0.0, min_lr_ratio=1.0,
                           weight_decay=0.0, betas=(0.9, 0.95), max_norm=1.0)
    st = {"params": nnx.to_pure_dict(state)}
    st["opt"] = init_optimizer(tx, st["params"], mesh)
    step_fn = make_train_step(graphdef, sft_loss, tx, params=st["params"], opt_state=st["opt"], mesh=mesh,
                              aux_loss_coef=0.01)
    loss_mask = np.ones(ids.shape, np.float32)
    micro = stack_micro_batches({"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask,
                                 "num_tokens": np.float32(loss_mask[:, 1:].sum())}, len(ids))

    def step() -> float:
        st["params"], st["opt"], m = step_fn(st["params"], st["opt"], micro)
        return float(m["loss"])

    return step, counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mesh", default="1x2x2x2", help="data x fsdp x expert x tensor (default 1x2x2x2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="bench_moe.json")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")

    from sharding import make_mesh, use_host_devices

    use_host_devices(args.mesh)
    import jax
    import numpy as np

    mesh = make_mesh(args.mesh)
    ids = np.random.default_rng(0).integers(3, COMMON["vocab_size"], (args.batch, args.seq)).astype(np.int32)
    with tempfile.TemporaryDirectory() as root:
        dirs = save_models(root)
        rows = {"dense": stepper(dirs["dense"], mesh, ids, dispatch=None),
                "moe ragged": stepper(dirs["moe"], mesh, ids, dispatch="ragged"),
                "moe one-hot": stepper(dirs["moe"], mesh, ids, dispatch="dense")}
        times: dict[str, list[float]] = {k: [] for k in rows}
        for i in range(args.warmup + args.steps):
            for name, (step, _) in rows.items():
                t0 = time.perf_counter()
                step()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    result = {"mesh": args.mesh, "devices": f"{len(jax.devices())} x {jax.devices()[0].platform}",
              "jax": jax.__version__, "batch": args.batch, "seq": args.seq, "rows": {}}
    print(f"train step on mesh {args.mesh} ({result['devices']}), batch {args.batch} x {args.seq} tokens, "
          f"median of {args.steps}:")
    print(f"  {'model':<12} {'params':>12} {'active':>12} {'step ms':>9} {'tokens/s':>10}")
    for name, (_, counts) in rows.items():
        med = statistics.median(times[name])
        result["rows"][name] = {"step_s": med, "tokens_per_s": tokens / med, **counts}
        print(f"  {name:<12} {counts['total']:>12,} {counts['active']:>12,} {1e3 * med:>9.1f} {tokens / med:>10.0f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
