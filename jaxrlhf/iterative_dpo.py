"""Online iterative DPO (RLHFlow's recipe) in one process: ``python -m jaxrlhf.iterative_dpo --pretrain SFT_DIR
--prompt_data P --remote_rm_url reward.py|--reward_pretrain RM [flags]``.

Iteration k (RLHFlow's three steps, with the engines kept alive instead of restarted from disk):

1. generate: the next ``--rollout_batch_size`` prompts of ``--prompt_data`` (wrapping around), ``--best_of_n``
   samples each with the current policy, on the vLLM pool (``--vllm_num_engines N``; the new weights are broadcast
   to it after every iteration's update) or the in-process JAX sampler;
2. score and pair: reward models (summed), a ``reward.py`` or reward servers; per prompt chosen = the best
   response, rejected = the worst (equal scores: no pair, counted; jaxrlhf/data/postprocess.py);
3. train: ``--max_epochs`` of DPO on the pairs (jaxrlhf/dpo.py's loss, the shared ``fit`` loop), the reference
   being ``--ref_pretrain`` (default: the initial policy, as RLHFlow), starting from the current policy with a fresh
   optimizer.

Outputs under ``--save_path``: ``iter_K/samples.jsonl`` (every scored sample) and ``iter_K/pairs.jsonl``,
``iter_K/model`` (the policy after iteration K, an HF directory; its training log in ``iter_K/model/logs``),
``iter_K/checkpoints`` (that iteration's DPO checkpoints) and ``iterations.jsonl`` (per iteration: reward
statistics of its samples, pairs, dropped prompts, DPO metrics). With ``--final_eval`` one more batch is sampled and
scored after the last iteration (no training): the final policy's statistics, the row ``"iteration": N``.

Resume (``--load_checkpoint``): finished iterations (rows of ``iterations.jsonl``) are skipped and the policy is
their last model; an interrupted iteration reuses its saved samples (nothing is sampled twice) and its DPO run
continues from its last checkpoint. The result equals an uninterrupted run's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

from jaxrlhf.cli import arg, config_to_dict
from jaxrlhf.dpo import DPOConfig
from jaxrlhf.rewards import RewardFlags, require_reward
from jaxrlhf.rollout.setup import PromptFlags, RolloutFlags, check_rollout_flags
from jaxrlhf.train.run import at_least_one, differences

ITERATIONS = "iterations.jsonl"


@dataclass
class IterativeDPOConfig(DPOConfig, RolloutFlags, PromptFlags, RewardFlags):  # + DPO's (and the offline trainers')
    # flags, the engine and sampling flags, the prompt-dataset flags (rollout/setup.py), the reward flags (rewards/)
    best_of_n: int = arg(8, "samples per prompt (>= 2: the best and the worst make the pair)")
    rollout_batch_size: int = arg(64, "prompts per iteration")
    num_iterations: int = arg(3, "generate -> score -> DPO rounds")
    final_eval: bool = arg(True, "after the last iteration, sample and score one more batch (no training)")
    normalize_reward: bool = arg(False, "reward models' scores normalised by their configs' mean/std")
    # ---- outputs
    save_path: str = arg("./ckpt/iterative_dpo", "per-iteration samples, pairs, models and iterations.jsonl")
    ckpt_path: str = arg("", "unused: each iteration checkpoints into --save_path/iter_K/checkpoints")

    def __post_init__(self):
        super().__post_init__()
        check_rollout_flags(self)
        at_least_one(self, "rollout_batch_size", "num_iterations", "prompt_max_len", "generate_max_len")
        if self.best_of_n < 2:
            raise ValueError(f"--best_of_n {self.best_of_n}: iterative DPO pairs the best with the worst response "
                             "of each prompt, so it needs --best_of_n >= 2")
        require_reward(self)


def iteration_dir(cfg: IterativeDPOConfig, k: int) -> str:
    return os.path.join(cfg.save_path, f"iter_{k}")


def settings(cfg: IterativeDPOConfig) -> dict:
    """What a resumed run must share with the iterations it continues (recorded in every row of iterations.jsonl)."""
    plain = config_to_dict(cfg)
    keys = ("pretrain", "ref_pretrain", "prompt_data", "prompt_data_probs", "input_key", "label_key",
            "apply_chat_template", "input_template", "max_samples", "best_of_n", "rollout_batch_size", "temperature",
            "top_p", "top_k", "generate_max_len", "prompt_max_len", "reward_pretrain", "remote_rm_url", "seed",
            "beta", "max_epochs", "learning_rate", "train_batch_size")
    return {f"--{k}": plain[k] for k in keys}


def finished_iterations(cfg: IterativeDPOConfig) -> list[dict]:
    """The rows of ``iterations.jsonl`` (one per finished iteration); refuses a started run without
    ``--load_checkpoint``, and a resume with other settings unless ``--allow_config_change``."""
    path = os.path.join(cfg.save_path, ITERATIONS)
    started = os.path.isdir(cfg.save_path) and any(e.startswith("iter_") for e in os.listdir(cfg.save_path))
    if started and not cfg.load_checkpoint:
        raise ValueError(f"--save_path {cfg.save_path} already holds iterations of a run: pass --load_checkpoint to "
                         "resume it, or choose another --save_path")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    diffs = differences(rows[-1].get("settings") if rows else None, settings(cfg))
    if rows and diffs and not cfg.allow_config_change:
        raise ValueError(f"{path} was written by a run with other settings ({'; '.join(diffs)}): resume with the "
                         "same flags, pass --allow_config_change if the change is deliberate, or choose another "
                         "--save_path")
    return rows


def sample_and_score(cfg: IterativeDPOConfig, k: int, *, engine, tokenizer, data, rewards: dict, chunk: int):
    """Iteration ``k``'s scored samples (``iter_K/samples.jsonl``; reused when it exists) and reward statistics."""
    from jaxrlhf.data.postprocess import read_jsonl_lines, reward_stats, write_jsonl
    from jaxrlhf.rewards.texts import score_texts
    from jaxrlhf.rollout import SamplingParams
    from jaxrlhf.rollout.texts import sample_rows

    path = os.path.join(iteration_dir(cfg, k), "samples.jsonl")
    if os.path.exists(path):
        print(f"[iter {k}] reusing the samples of {path}", file=sys.stderr)
        rows = read_jsonl_lines(path)
    else:
        idx = [(k * cfg.rollout_batch_size + j) % len(data) for j in range(cfg.rollout_batch_size)]
        prompts, prompt_ids, labels = data.batch(idx)
        sampling = SamplingParams(n=cfg.best_of_n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                  max_tokens=cfg.generate_max_len, seed=(cfg.seed + 7919 * k) % 2**32)
        rows = sample_rows(engine, tokenizer, prompts, prompt_ids, idx, sampling, labels)
        reward, extra = score_texts([r["input"] for r in rows], [r["output"] for r in rows],
                                    [r.get("label") for r in rows], tokenizer=tokenizer, chunk=chunk,
                                    normalize=cfg.normalize_reward, max_len=cfg.prompt_max_len + cfg.generate_max_len
                                    + 1, **rewards)
        rows = [{**r, "reward": float(x)} for r, x in zip(rows, reward)]
        for name, value in extra.items():  # the reward function's logs (e.g. accuracy) ride on the first row
            rows[0][f"log/{name}"] = value
        write_jsonl(path, rows)
    extra = {k2[4:]: v for k2, v in rows[0].items() if k2.startswith("log/")}
    return rows, {**reward_stats(rows), **extra}


def _policy_model(cfg: IterativeDPOConfig, mesh, policy: str):
    """The policy to train from ``policy`` (``load_model``: with LoRA, adapters on it). After the first iteration
    ``policy`` is the merged export of the previous one: with --lora_path it gets fresh adapters of that adapter's
    shape (the adapter itself is already merged in)."""
    from jaxrlhf.train.supervised import load_model

    if cfg.lora_path and policy != cfg.pretrain:
        from converters.peft import read_spec

        spec = read_spec(cfg.lora_path)
        cfg = dataclasses.replace(cfg, lora_path=None, lora_rank=spec.rank, lora_alpha=spec.alpha,
                                  target_modules=list(spec.targets))
    return load_model(cfg, mesh, head="lm", path=policy)


def main(cfg: IterativeDPOConfig) -> dict:
    """Run the loop; returns ``{"iterations": rows of iterations.jsonl, "policy": the final policy's directory}``."""
    from jaxrlhf.train.supervised import setup_mesh

    mesh = setup_mesh(cfg)

    import jax.numpy as jnp
    from flax import nnx

    from converters.hf import export_hf, hf_entries, is_flax_checkpoint
    from jaxrlhf.data.postprocess import iterative_dpo_pairs, write_jsonl
    from jaxrlhf.data.preference import PairedDataset
    from jaxrlhf.dpo import FORWARD_KEYS, REF_NAMES, make_dpo_loss, ref_logprobs
    from jaxrlhf.rewards import load_rewards
    from jaxrlhf.rollout.setup import load_prompts, make_engine
    from jaxrlhf.train.lora import plain_model, plain_params
    from jaxrlhf.train.supervised import fit, frozen_reference, load_tokenizer_for, reference_path
    from sharding import batch_ways

    # ---------------------------------------------------------------- data and every check before any compute
    if cfg.prompt_data is None:
        raise ValueError("--prompt_data is required: the prompts to sample from")
    tokenizer = load_tokenizer_for(cfg)
    data = load_prompts(cfg, tokenizer, apply_chat_template=cfg.apply_chat_template, input_template=cfg.input_template,
                        max_samples=cfg.max_samples, seed=cfg.seed, rollout_batch_size=cfg.rollout_batch_size)
    ref_path = reference_path(cfg.ref_pretrain, cfg.pretrain)
    done = finished_iterations(cfg)
    policy = done[-1]["policy"] if done else cfg.pretrain
    dp = batch_ways(mesh)
    micro = cfg.micro_train_batch_size * dp

    # ---------------------------------------------------------------- reward, reference, policy, engine
    rewards = load_rewards(cfg, mesh=mesh, compute_dtype=jnp.bfloat16 if cfg.bf16 else None)
    prepare = frozen_reference(cfg, mesh, ref_path, ref_logprobs, keys=FORWARD_KEYS, names=REF_NAMES)
    loss_fn = make_dpo_loss(beta=cfg.beta, label_smoothing=cfg.label_smoothing, ipo=cfg.ipo,
                            nll_loss_coef=cfg.nll_loss_coef)
    model = _policy_model(cfg, mesh, policy)
    model_cfg = model.cfg
    rows_out = list(done)
    with contextlib.ExitStack() as run:
        engine = make_engine(cfg, model=plain_model(model, mesh), pretrain=cfg.pretrain, tokenizer=tokenizer, mesh=mesh,
                             prompt_max_len=cfg.prompt_max_len, generate_max_len=cfg.generate_max_len, bf16=cfg.bf16,
                             seed=cfg.seed, prompt_buckets=None)
        run.callback(engine.close)
        if cfg.vllm_num_engines and (policy != cfg.pretrain or is_flax_checkpoint(cfg.pretrain)):
            engine.update_weights(hf_entries(plain_params(nnx.split(model)[1].to_pure_dict(), model.lora), model_cfg))
        for k in range(len(done), cfg.num_iterations):
            out_dir = iteration_dir(cfg, k)
            samples, stats = sample_and_score(cfg, k, engine=engine, tokenizer=tokenizer, data=data,
                                              rewards=rewards, chunk=micro)
            pairs, dropped = iterative_dpo_pairs(samples)
            write_jsonl(os.path.join(out_dir, "pairs.jsonl"), pairs)
            row = {"iteration": k, **stats, "pairs": len(pairs), "dropped_equal": dropped}
            print(f"[iter {k}] " + ", ".join(f"{n} {v:.4g}" for n, v in row.items() if n != "iteration"),
                  file=sys.stderr)
            ckpt_dir = os.path.join(out_dir, "checkpoints")
            iter_cfg = dataclasses.replace(cfg, save_path=os.path.join(out_dir, "model"), ckpt_path=ckpt_dir,
                                           load_checkpoint=os.path.isdir(ckpt_dir), pretrain=policy,
                                           train_batch_size=min(cfg.train_batch_size, len(pairs) // micro * micro))
            if iter_cfg.train_batch_size:
                train = PairedDataset(pairs, tokenizer, prompt_key="prompt", chosen_key="chosen",
                                      rejected_key="rejected", input_template=None, apply_chat_template=False,
                                      max_len=cfg.max_len, source=os.path.join(out_dir, "pairs.jsonl"))
                result = fit(iter_cfg, mesh=mesh, model=model, loss_fn=loss_fn, train_data=train, name="dpo",
                             prepare=prepare, plot_keys=("loss", "margin", "acc"),
                             progress_keys=("loss", "acc", "margin", "step_time"))
                params = result["params"]
                row.update({f"dpo/{n}": v for n, v in result["metrics"].items()  # timings: in the iteration's log
                            if n not in ("step_time", "samples_per_s", "tokens_per_s")})
            else:  # fewer pairs than one micro-batch: the policy stays as it is
                print(f"[iter {k}] {len(pairs)} pairs, fewer than one micro-batch ({micro}): no update",
                      file=sys.stderr)
                params = nnx.split(model)[1].to_pure_dict()
                export_hf(params, model_cfg, iter_cfg.save_path, head="lm", aux_from=cfg.pretrain, overwrite=True)
            engine.update_weights(hf_entries(plain_params(params, model.lora), model_cfg,
                                             gather=bool(cfg.vllm_num_engines)))
            policy = iter_cfg.save_path
            model = _policy_model(cfg, mesh, policy)  # the next DPO run's (fit donates its buffers)
            rows_out.append({**row, "policy": policy, "settings": settings(cfg)})
            write_jsonl(os.path.join(cfg.save_path, ITERATIONS), rows_out)
        final = None
        if cfg.final_eval:
            _, final = sample_and_score(cfg, cfg.num_iterations, engine=engine, tokenizer=tokenizer, data=data,
                                        rewards=rewards, chunk=micro)
            print("[final] " + ", ".join(f"{n} {v:.4g}" for n, v in final.items()), file=sys.stderr)
    return {"iterations": rows_out, "final": final, "policy": policy}


def cli(argv: list[str] | None = None) -> int:
    from jaxrlhf.cli import parse_config, report_errors
    from jaxrlhf.rewards import RewardError

    cfg = parse_config(IterativeDPOConfig, argv, prog="python -m jaxrlhf.iterative_dpo")
    out = report_errors(main, cfg, (ValueError, KeyError, TypeError, OSError, FloatingPointError, RewardError))
    if out is None:
        return 2
    print(f"\ndone: {len(out['iterations'])} iterations; policy {out['policy']}")
    for row in out["iterations"] + ([{"iteration": "final", **out["final"]}] if out["final"] else []):
        accuracy = f", accuracy {row['accuracy']:.3f}" if "accuracy" in row else ""
        print(f"  iteration {row['iteration']}: reward mean {row['reward_mean']:.4f}, best-of-n "
              f"{row['reward_best_of_n']:.4f}{accuracy}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
