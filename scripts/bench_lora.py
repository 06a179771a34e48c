"""LoRA vs full fine-tuning: optimizer-state bytes and SFT train-step time, the same model, batch and step code.

    .venv/bin/python scripts/bench_lora.py [--model .cache/models/smollm2-135m-instruct] [--rank 16] \\
        [--batch 4] [--seq 256] [--steps 5] [--warmup 2] [--mesh 1] [--qlora] [--out bench_lora.json]

Both variants run ``jaxrlhf.sft.sft_loss`` through ``train.steps.make_train_step`` with
``train.optim.make_optimizer`` (clip 1.0 + AdamW, fp32), on the batch of scripts/bench_sft.py. LoRA: rank
``--rank``, alpha 2r, every linear (all-linear), only the adapters trained (``trainable_with_lora``). Reported:
trained parameters, optimizer-state bytes (every array leaf of the optax state, summed), and the median step time
of ``--steps`` steps after ``--warmup`` untimed ones (JAX compiles there), the variants interleaved; each step
ends with ``jax.block_until_ready`` on the new parameters and the loss copied to the host. ``--qlora`` adds QLoRA
(NF4 base, models/nf4.py), with and without double-quantized scales (qlora-dq): their parameter bytes and the
forward's relative logits error against the fp32 base.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_sft import BETAS, EPS, LR, MAX_NORM, make_batch  # noqa: E402  (scripts/ is not a package)


def stepper(model_dir: str, mesh, ids, loss_mask, rank: int, *, four_bit: bool = False, reference=None,
            double_quant: bool = False):
    """(step() -> seconds, {trained parameters, optimizer bytes, parameter bytes}) for full fine-tuning (rank 0),
    LoRA, or QLoRA (``four_bit``: NF4 base; with ``reference`` fp32 logits, the 4-bit forward's relative error)."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.models.lora import LINEAR_MODULES, LoraSpec, apply_lora
    from jaxrlhf.sft import sft_loss
    from jaxrlhf.train.optim import make_optimizer
    from jaxrlhf.train.steps import init_optimizer, make_train_step, split_params, stack_micro_batches
    from jaxrlhf.train.lora import trainable_with_lora

    model = from_pretrained(model_dir, mesh=mesh, dtype=np.float32)
    trainable = None
    forward_error = None
    if four_bit:
        from jaxrlhf.models.nf4 import quantize_base

        quantize_base(model, mesh=mesh, double_quant=double_quant)
        if reference is not None:
            got = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
            forward_error = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
    if rank:
        apply_lora(model, LoraSpec(rank=rank, alpha=2.0 * rank, targets=LINEAR_MODULES), seed=0, mesh=mesh)
        trainable = trainable_with_lora("lm")
    graphdef, state = nnx.split(model)
    st = {"params": state.to_pure_dict()}
    del model, state
    tx, _ = make_optimizer(learning_rate=LR, total_steps=10_000, warmup_ratio=0.0, min_lr_ratio=1.0,
                           weight_decay=0.0, betas=BETAS, eps=EPS, max_norm=MAX_NORM)
    trained = split_params(st["params"], trainable)[0]
    st["opt"] = init_optimizer(tx, trained, mesh)
    info = {"trained_parameters": sum(x.size for x in jax.tree_util.tree_leaves(trained)),
            "total_parameters": sum(x.size for x in jax.tree_util.tree_leaves(st["params"])),
            "optimizer_state_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(st["opt"]) if hasattr(x, "nbytes")),
            "parameter_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(st["params"])),
            **({"forward_rel_error_vs_fp32": forward_error} if forward_error is not None else {})}
    train_step = make_train_step(graphdef, sft_loss, tx, params=st["params"], opt_state=st["opt"], mesh=mesh,
                                 trainable=trainable)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask,
             "num_tokens": np.float32(loss_mask[:, 1:].sum())}
    micro = stack_micro_batches(batch, len(ids))

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        st["params"], st["opt"], m = train_step(st["params"], st["opt"], micro)
        jax.block_until_ready(st["params"])
        loss = float(m["loss"])
        return time.perf_counter() - t0, loss

    return step, info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=".cache/models/smollm2-135m-instruct")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mesh", default="1")
    p.add_argument("--qlora", action="store_true", help="also QLoRA (NF4 base + LoRA r=--rank), with its forward "
                                                          "error against the fp32 base on the batch")
    p.add_argument("--out", default="bench_lora.json")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.rank < 1:
        p.error("--steps, --warmup and --rank must be >= 1")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model}: no config.json (scripts/real_model.sh fetches SmolLM2-135M)")

    from sharding import make_mesh, use_host_devices

    use_host_devices(args.mesh)
    import jax
    import numpy as np

    mesh = make_mesh(args.mesh)
    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    ids, loss_mask = make_batch(args.batch, args.seq, vocab)
    variants = {"full": stepper(args.model, mesh, ids, loss_mask, 0),
                f"lora r={args.rank}": stepper(args.model, mesh, ids, loss_mask, args.rank)}
    if args.qlora:
        from flax import nnx

        from jaxrlhf.models import from_pretrained

        base = from_pretrained(args.model, mesh=mesh)
        reference = np.asarray(nnx.jit(lambda m, x: m(x))(base, ids))
        del base
        variants[f"qlora r={args.rank}"] = stepper(args.model, mesh, ids, loss_mask, args.rank, four_bit=True,
                                                   reference=reference)
        variants[f"qlora-dq r={args.rank}"] = stepper(args.model, mesh, ids, loss_mask, args.rank, four_bit=True,
                                                      reference=reference, double_quant=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    losses: dict[str, list[float]] = {k: [] for k in variants}
    for name, (step, _) in variants.items():
        for _ in range(args.warmup):
            losses[name].append(step()[1])
    for _ in range(args.steps):
        for name, (step, _) in variants.items():
            dt, loss = step()
            times[name].append(dt)
            losses[name].append(loss)
    rows = [{"variant": name, **info, "median_step_s": statistics.median(times[name]),
             "min_step_s": min(times[name]), "first_loss": losses[name][0], "last_loss": losses[name][-1]}
            for name, (_, info) in variants.items()]
    print(f"\nSFT step, {args.model}, fp32, batch {args.batch} x seq {args.seq}, mesh {args.mesh} "
          f"({len(jax.devices())} x {jax.devices()[0].platform}), median of {args.steps} steps")
    print(f"{'variant':<12} {'trained params':>15} {'params MiB':>11} {'optimizer MiB':>14} {'step (s)':>9} "
          f"{'min (s)':>8} {'loss 1st->last':>16}")
    for r in rows:
        print(f"{r['variant']:<12} {r['trained_parameters']:>15,} {r['parameter_bytes'] / 2**20:>11.2f} "
              f"{r['optimizer_state_bytes'] / 2**20:>14.2f} {r['median_step_s']:>9.3f} {r['min_step_s']:>8.3f} "
              f"{r['first_loss']:>7.4f}->{r['last_loss']:.4f}")
    full, lora = rows[:2]
    if args.qlora:
        for q in rows[2:]:
            print(f"{q['variant']}: parameters {q['parameter_bytes'] / 2**20:.1f} MiB vs "
                  f"{lora['parameter_bytes'] / 2**20:.1f} MiB with the fp32 base; forward logits relative error of "
                  f"the NF4 base vs fp32: {q['forward_rel_error_vs_fp32']:.4f}")
    print(f"optimizer state: {full['optimizer_state_bytes'] / lora['optimizer_state_bytes']:.0f}x smaller with LoRA; "
          f"step time ratio full/LoRA {full['median_step_s'] / lora['median_step_s']:.2f}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    result = {"args": vars(args), "rows": rows, "raw_step_times": times, "load_average": os.getloadavg()}
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
