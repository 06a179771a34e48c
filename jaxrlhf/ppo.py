"""PPO and its REINFORCE/GRPO family: ``python -m jaxrlhf.ppo --mesh 4x2 [flags]``.

Flags follow OpenRLHF's classic spelling; ``--config run.yaml`` takes the same keys. With no ``--pretrain`` the
built-in demo runs (jaxrlhf/demo.py): a tiny model learns to add with a verifiable reward, no network needed.

One step, as cleanrl's loop: generate (rollout/client.py: prompts -> the engine, n samples each) -> make experience
(train/experience.py: old/ref log-probs, values and rewards in micro-batches on the mesh, KL shaping, advantages
from the estimator table) -> update (train/ppo_step.py: ``--max_epochs`` passes of jitted actor and critic updates
over ``--train_batch_size`` batches) -> sync (the new weights to the engine) -> log and checkpoint
(train/run.py: the run infrastructure every trainer shares).

Batch arithmetic (as OpenRLHF): ``--rollout_batch_size`` prompts x ``--n_samples_per_prompt`` samples per step;
``--train_batch_size`` samples per optimizer update; ``--micro_train_batch_size`` and
``--micro_rollout_batch_size`` are per data-parallel rank (dp = data x fsdp mesh axes), so a micro-batch holds
``micro x dp`` samples across the mesh and gradient accumulation makes up the rest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from jaxrlhf.advantages import ESTIMATORS, Estimator
from jaxrlhf.cli import arg, error_text, parse_config
from jaxrlhf.openrlhf_flags import DEEPSPEED_ONLY, OPENRLHF_ALIASES
from jaxrlhf.rewards import RewardFlags
from jaxrlhf.rollout.setup import PromptFlags, RolloutFlags, check_rollout_flags
from jaxrlhf.train.lora import LoraFlags
from jaxrlhf.train.run import RunFlags, at_least_one


@dataclass
class PPOConfig(RunFlags, RolloutFlags, PromptFlags, RewardFlags, LoraFlags):  # + the shared run, engine, prompt,
    # reward flags and LoRA's (train/lora.py: the same --lora_rank etc. apply to the actor and the critic)
    ALIASES: ClassVar[dict] = OPENRLHF_ALIASES
    IGNORED: ClassVar[dict] = DEEPSPEED_ONLY
    # ---- models (+ the reward flags: rewards.RewardFlags; the prompt flags: rollout.setup.PromptFlags)
    critic_pretrain: Optional[str] = arg(None, "critic init (default: the reward model, else the actor)")
    # ---- batch arithmetic and optimisation
    rollout_batch_size: int = arg(1024, "prompts per PPO step")
    n_samples_per_prompt: int = arg(1, "completions sampled per prompt")
    micro_rollout_batch_size: int = arg(8, "samples per data-parallel rank per experience forward")
    micro_train_batch_size: int = arg(4, "samples per data-parallel rank per micro-batch (gradient accumulation)")
    num_episodes: int = arg(1, "passes over the prompt dataset")
    actor_learning_rate: float = arg(1e-6, "actor peak learning rate")
    critic_learning_rate: float = arg(9e-6, "critic peak learning rate")
    freezing_actor_steps: int = arg(-1, "train only the critic for this many first steps")
    # ---- PPO
    advantage_estimator: Estimator = arg("gae", " | ".join(ESTIMATORS))
    eps_clip: float = arg(0.2, "PPO ratio clip")
    eps_clip_low_high: Optional[tuple[float, ...]] = arg(None, "separate low,high clip (e.g. 0.2,0.28)")
    dual_clip: Optional[float] = arg(None, "dual-clip constant (> 1) for negative advantages")
    value_clip: Optional[float] = arg(0.5, "value clip around the old values")
    entropy_coef: float = arg(0.0, "entropy bonus")
    gamma: float = arg(1.0, "discount")
    lambd: float = arg(1.0, "GAE lambda")
    init_kl_coef: float = arg(0.01, "KL coefficient (reward penalty, or loss weight with --use_kl_loss)")
    kl_target: Optional[float] = arg(None, "adaptive KL target (None: fixed coefficient)")
    kl_horizon: int = arg(10000, "adaptive KL horizon")
    kl_estimator: Literal["k1", "k2", "k3"] = arg("k1", "KL estimator")
    use_kl_loss: bool = arg(False, "KL as an actor loss term instead of a reward penalty")
    reward_clip_range: tuple[float, ...] = arg((-10.0, 10.0), "clip the scalar reward")
    normalize_reward: bool = arg(False, "normalise rewards (RM config mean/std, else running statistics)")
    no_advantage_std_norm: bool = arg(False, "do not divide advantages by their std")
    # ---- today's RL algorithms (OpenRLHF 0.11 semantics; README "PPO" lists them with an example each)
    policy_loss_type: Literal["ppo", "gspo"] = arg("ppo", "ppo (per-token ratio) or gspo (sequence-level geometric-"
                                                          "mean ratio, arXiv 2507.18071)")
    loss_agg_mode: Optional[Literal["token-mean", "seq-mean-token-mean"]] = arg(
        None, "token-mean (every token weighs the same) or seq-mean-token-mean (every sample does); default "
              "token-mean, seq-mean-token-mean with gspo")
    is_correction_level: Literal["off", "token", "seq"] = arg(
        "off", "importance-sampling correction of the engine/trainer mismatch, per token or per sequence (off: none)")
    is_correction_mode: Literal["mask", "clip"] = arg("mask", "out-of-band units: mask (no gradient: ICEPOP, seq-"
                                                              "mask-TIS) or clip the token weight (TIS)")
    is_correction_gating: Literal["ratio", "binary_kl", "tv"] = arg(
        "ratio", "statistic tested against the threshold: ratio pi/mu, binary_kl or tv of the sampled tokens")
    is_correction_threshold: tuple[float, ...] = arg((0.5, 5.0), "LOW HIGH band of the gating statistic (one value: "
                                                                 "HIGH only)")
    is_correction_enable: bool = arg(False, "OpenRLHF 0.11.0 spelling: turn the correction on as "
                                            "--is_correction_type says")
    is_correction_type: Optional[Literal["tis", "icepop", "seq-mask-tis"]] = arg(
        None, "OpenRLHF 0.11.0 shorthand: tis = token/clip, icepop = token/mask, seq-mask-tis = seq/mask (ratio)")
    kl_unbiased_gradient: bool = arg(False, "with --use_kl_loss: keep the estimator's value, back-propagate the true "
                                            "reverse-KL gradient weighted by pi/pi_old")
    dynamic_filtering: bool = arg(False, "DAPO: drop prompt groups whose rewards are all equal or whose mean is "
                                         "outside --dynamic_filtering_range, and sample more to refill the batch")
    dynamic_filtering_range: tuple[float, ...] = arg((0.0, 1.0), "LOW HIGH: keep groups with LOW < mean reward < "
                                                                 "HIGH")
    dynamic_filtering_max_rounds: int = arg(4, "extra generation rounds per step to refill a filtered batch (then "
                                               "dropped groups fill it: no gradient from them)")
    overlong_buffer_len: Optional[float] = arg(None, "DAPO overlong penalty: responses longer than "
                                                     "--generate_max_len minus this many tokens are penalised")
    overlong_penalty_factor: float = arg(1.0, "DAPO overlong penalty at --generate_max_len tokens")
    stop_properly_penalty_coef: Optional[float] = arg(None, "truncated samples' reward x this (in [0, 1]), or set "
                                                            "to it (< 0)")
    async_train: bool = arg(False, "the engines generate the next batches while the trainer updates (needs "
                                   "--vllm_num_engines >= 1; pair with --is_correction_level)")
    async_queue_size: int = arg(1, "with --async_train: generated batches in flight at most (the staleness bound)")
    partial_rollout: bool = arg(False, "with --async_train: a weight sync does not wait for the batch being "
                                       "generated; its unfinished samples continue under the new weights")
    partial_rollout_tokens: int = arg(32, "with --partial_rollout: tokens generated between chances to sync")
    # ---- shapes
    logits_chunk_size: int = arg(128, "response positions per chunk of the LM head and log-softmax (the loss's "
                                 "peak memory ~ micro-batch x chunk x vocab x 4 bytes)")
    length_buckets: Optional[tuple[int, ...]] = arg(None, "each batch's prompts and responses are padded to the "
                                                          "smallest of these lengths that holds the longest one "
                                                          "(default: 16, 24, 32, 48, 64, 96, ..., capped at the max lengths)")
    fixed_shapes: bool = arg(False, "pad every batch to --prompt_max_len + --generate_max_len (one compiled shape)")
    # ---- outputs and role placement (sharding/placement.py: default everything on --mesh)
    ckpt_path: str = arg("./ckpt/checkpoints_ppo", "training checkpoints")
    demo_dir: str = arg(".cache/jaxrlhf-demo", "where the built-in demo caches its tokenizer, data and SFT model")
    ref_mesh: Optional[str] = arg(None, "reference model's own mesh, SPEC[@FIRST_DEVICE] per host, e.g. 2x2@4")
    reward_mesh: Optional[str] = arg(None, "reward models' own mesh, SPEC[@FIRST_DEVICE] per host, e.g. 4@4")
    ref_offload: bool = arg(False, "keep the reference model in host memory between experience passes")
    reward_offload: bool = arg(False, "keep the reward models in host memory between experience passes")

    def __post_init__(self):
        super().__post_init__()
        check_rollout_flags(self)
        self.check_lora()
        if self.uses_lora and (self.ref_mesh or self.ref_offload):
            raise ValueError("with LoRA the reference model is the actor's own base (adapters off), not a second "
                             "copy: drop --ref_mesh / --ref_offload")
        at_least_one(self, "rollout_batch_size", "n_samples_per_prompt", "micro_rollout_batch_size", "num_episodes",
                     "prompt_max_len", "generate_max_len", "kl_horizon", "logits_chunk_size")
        if self.eps_clip_low_high is not None and len(self.eps_clip_low_high) != 2:
            raise ValueError(f"--eps_clip_low_high takes two numbers (low,high), got {self.eps_clip_low_high}")
        if self.length_buckets is not None and (not self.length_buckets or min(self.length_buckets) < 1):
            raise ValueError(f"--length_buckets takes positive lengths (e.g. 64,128,256), got {self.length_buckets}")
        if len(self.reward_clip_range) != 2:
            raise ValueError(f"--reward_clip_range takes two numbers (low,high), got {self.reward_clip_range}")
        if ESTIMATORS[self.advantage_estimator].group and self.n_samples_per_prompt < 2:
            raise ValueError(f"--advantage_estimator {self.advantage_estimator} needs a group: set "
                             "--n_samples_per_prompt >= 2")
        self._check_algorithms()

    def _check_algorithms(self) -> None:
        at_least_one(self, "async_queue_size", "partial_rollout_tokens")
        if self.dynamic_filtering_max_rounds < 0:
            raise ValueError(f"--dynamic_filtering_max_rounds must be >= 0, got {self.dynamic_filtering_max_rounds}")
        if self.is_correction_enable or self.is_correction_type:  # OpenRLHF 0.11.0's switch and shorthand
            self.is_correction_level, self.is_correction_mode = {
                "tis": ("token", "clip"), "icepop": ("token", "mask"), "seq-mask-tis": ("seq", "mask")}[
                self.is_correction_type or "tis"]
            self.is_correction_gating = "ratio"
        t = self.is_correction_threshold
        if len(t) not in (1, 2) or (len(t) == 2 and t[0] > t[1]):
            raise ValueError(f"--is_correction_threshold takes LOW HIGH (LOW <= HIGH) or one HIGH, got "
                             f"{self.is_correction_threshold}")
        if self.is_correction_mode == "clip" and (self.is_correction_level == "seq" or
                                                  self.is_correction_gating != "ratio"):
            raise ValueError("--is_correction_mode clip clamps each token's ratio (TIS): it needs "
                             "--is_correction_level token and --is_correction_gating ratio; use mask to filter "
                             "sequences or gate on a divergence")
        if self.kl_unbiased_gradient and not self.use_kl_loss:
            raise ValueError("--kl_unbiased_gradient changes the gradient of the KL loss: add --use_kl_loss (with a "
                             "reward penalty the KL has no gradient)")
        if self.dynamic_filtering:
            if self.n_samples_per_prompt < 2:
                raise ValueError("--dynamic_filtering drops prompt groups: set --n_samples_per_prompt >= 2")
            if len(self.dynamic_filtering_range) != 2 or not self.dynamic_filtering_range[0] < \
                    self.dynamic_filtering_range[1]:
                raise ValueError(f"--dynamic_filtering_range takes LOW HIGH with LOW < HIGH, got "
                                 f"{self.dynamic_filtering_range}")
        if self.overlong_buffer_len is not None and not 0 < self.overlong_buffer_len <= self.generate_max_len:
            raise ValueError(f"--overlong_buffer_len must be in (0, --generate_max_len {self.generate_max_len}], got "
                             f"{self.overlong_buffer_len}")
        if self.stop_properly_penalty_coef is not None and self.stop_properly_penalty_coef > 1:
            raise ValueError(f"--stop_properly_penalty_coef must be in [0, 1] (scale) or < 0 (fixed reward), got "
                             f"{self.stop_properly_penalty_coef}")
        if self.partial_rollout and not self.async_train:
            raise ValueError("--partial_rollout continues samples across weight syncs of --async_train: add "
                             "--async_train")

    @property
    def is_correction(self):
        """The ``ppo_step.ISCorrection`` of the flags (one threshold value = HIGH only)."""
        from jaxrlhf.train.ppo_step import ISCorrection

        t = self.is_correction_threshold
        low, high = (float("-inf"), t[0]) if len(t) == 1 else t
        return ISCorrection(self.is_correction_level, self.is_correction_mode, self.is_correction_gating, low, high)

    @property
    def agg_mode(self) -> str:
        return self.loss_agg_mode or ("seq-mean-token-mean" if self.policy_loss_type == "gspo" else "token-mean")

    @property
    def buckets(self) -> tuple[int, ...] | None:
        """What ``data.loader.bucket_length`` pads to: () with --fixed_shapes (always the maximum)."""
        return () if self.fixed_shapes else self.length_buckets

    @property
    def role_meshes(self) -> dict:
        return {"ref": self.ref_mesh, "reward": self.reward_mesh}

    @property
    def needs_reference(self) -> bool:
        return self.init_kl_coef > 0 or self.use_kl_loss


def check_batch_arithmetic(cfg: PPOConfig, dp: int) -> None:
    """Every batch flag must divide the next; the message names the flags and the numbers."""
    samples = cfg.rollout_batch_size * cfg.n_samples_per_prompt
    rules = [
        (samples % cfg.train_batch_size == 0,
         f"--train_batch_size {cfg.train_batch_size} must divide --rollout_batch_size x --n_samples_per_prompt "
         f"= {cfg.rollout_batch_size} x {cfg.n_samples_per_prompt} = {samples}"),
        (cfg.train_batch_size % (cfg.micro_train_batch_size * dp) == 0,
         f"--train_batch_size {cfg.train_batch_size} must be a multiple of --micro_train_batch_size x "
         f"data-parallel size = {cfg.micro_train_batch_size} x {dp} = {cfg.micro_train_batch_size * dp} "
         f"(dp = data x fsdp of --mesh {cfg.mesh})"),
        (samples % (cfg.micro_rollout_batch_size * dp) == 0,
         f"--rollout_batch_size x --n_samples_per_prompt = {samples} must be a multiple of "
         f"--micro_rollout_batch_size x data-parallel size = {cfg.micro_rollout_batch_size} x {dp}"),
    ]
    for ok, msg in rules:
        if not ok:
            raise ValueError(msg)


def main(cfg: PPOConfig) -> dict:
    """Run PPO; returns a summary (last metrics, output paths). The rollout engine is shut down however it ends."""
    if cfg.dry_run:  # plan only
        from jaxrlhf.plan import dry_run_ppo
        from sharding import parse_mesh

        spec = parse_mesh(cfg.mesh)
        check_batch_arithmetic(cfg, spec.data * spec.fsdp)
        return dry_run_ppo(cfg)
    from jaxrlhf.train.run import start_meshes

    launch, meshes = start_meshes(cfg, cfg.role_meshes)  # before jax initializes a backend
    if cfg.device_memory_gb is not None:  # refuse a plan that cannot fit before loading anything
        from jaxrlhf.plan import PPO_KNOBS, check_fits, plan_ppo

        check_fits(plan_ppo(cfg, processes=launch.num_processes), PPO_KNOBS)
    from converters.hf import export_hf
    from jaxrlhf.ppo_setup import (adapt_kl, async_batch, build, checkpoint_trees, collect_batch, generate_batch,
                                   make_experience_step, score_batch, throughput)
    from jaxrlhf.train.experience import experience_metrics
    from jaxrlhf.train.metrics import PhaseTimer, plot_metrics
    from jaxrlhf.train.ppo_step import ppo_update
    from jaxrlhf.train.run import stop_if_not_finite
    from sharding import batch_ways

    if cfg.pretrain is None:
        from jaxrlhf import demo

        cfg = demo.prepare(cfg, meshes["main"])
    check_batch_arithmetic(cfg, batch_ways(meshes["main"]))
    with contextlib.ExitStack() as run:
        p = build(cfg, meshes, run)  # data, models, jitted steps, engine, checkpointer, logger; resumed state
        state, metrics, timer = p.state, {}, PhaseTimer()
        pending = p.client.sync(state.actor) if cfg.vllm_num_engines or state.step else {}  # engines get the actor
        for step in range(state.step, p.total_steps):
            t_step = time.perf_counter()
            timer.reset()
            batch, raw, info, round_metrics = collect_batch(
                (lambda r: async_batch(cfg, p, state.step, timer)) if p.pipeline else
                (lambda r: generate_batch(cfg, p, step, r, state.step, timer)),
                lambda b: score_batch(cfg, p, b, cfg.micro_rollout_batch_size * p.dp), n=cfg.n_samples_per_prompt,
                groups=cfg.rollout_batch_size, dynamic_range=cfg.dynamic_filtering_range if cfg.dynamic_filtering
                else None, max_rounds=cfg.dynamic_filtering_max_rounds, pad_id=p.tokenizer.pad_token_id, timer=timer)
            with timer("experience"):
                exp, reward_stats, exp_metrics = make_experience_step(cfg, p, state, batch, raw, info, timer)
                state = dataclasses.replace(state, reward_stats=reward_stats)
            train_actor = step >= cfg.freezing_actor_steps
            with timer("train"):
                state, train_metrics = ppo_update(
                    state, exp, actor_step=p.actor_step if train_actor else None, critic_step=p.critic_step,
                    train_batch_size=cfg.train_batch_size, micro_batch=cfg.micro_train_batch_size * p.dp,
                    max_epochs=cfg.max_epochs, seed=cfg.seed, use_kl_loss=cfg.use_kl_loss, on_policy=p.on_policy,
                    rollout_logp=cfg.is_correction.on, timer=timer, dropout_key=cfg.dropout_rng(step))
            if train_actor:
                with timer("sync"):
                    pending.update(p.client.sync(state.actor))
            with timer("log"):
                stop_if_not_finite({k: train_metrics[k] for k in ("actor/loss", "critic/loss") if k in train_metrics},
                                   step=step + 1, ckpt=p.ckpt, ckpt_path=cfg.ckpt_path,
                                   hint="lower the learning rate or check the rewards")
                logged = {**experience_metrics(exp), **round_metrics, **exp_metrics,
                          "actor_lr": float(p.actor_lr(step * p.updates_per_step))}
                state = dataclasses.replace(state, step=step + 1, kl_coef=adapt_kl(cfg, state.kl_coef, logged["kl"],
                                                                                    len(exp)))
            with timer("save"):
                if (cfg.save_steps > 0 and state.step % cfg.save_steps == 0) or state.step == p.total_steps:
                    p.ckpt.save(state.step, *checkpoint_trees(state, p.batches, p.pipeline, p.client, p.mesh,
                                                              cfg.seed, p.fingerprint))
            metrics = {**logged, "kl_coef": state.kl_coef, "step_time": time.perf_counter() - t_step,
                       **train_metrics, **timer.metrics(),
                       **throughput(exp, timer.seconds, epochs=cfg.max_epochs, train_actor=train_actor),
                       "compile/count": p.compile_count(), **pending}
            pending = {}
            if state.step % cfg.logging_steps == 0 or state.step == p.total_steps:
                p.logger.log(state.step, metrics)

    # ---------------------------------------------------------------- outputs (also when resumed at the last step)
    import jax

    out = {"metrics": metrics, "log": os.path.join(cfg.save_path, "logs", "metrics.jsonl"), "steps": p.total_steps}
    if jax.process_index() == 0:
        out["plot"] = os.path.join(cfg.save_path, "ppo_metrics.png")
        plot_metrics(out["log"], ["reward", "kl", "response_length"], out["plot"])
    from converters.peft import save_adapter
    from jaxrlhf.train.lora import plain_params

    for role, params, head in (("actor", state.actor, "lm"), ("critic", state.critic, "score")):
        if params is not None:  # every process: sharded tensors are gathered one by one; process 0 writes
            lora = p.lora.get(role)  # LoRA: the merged model (+ the PEFT adapter with --lora_save_adapter)
            path = export_hf(plain_params(params, lora), p.model_cfg, os.path.join(cfg.save_path, role), head=head,
                             aux_from=cfg.pretrain, overwrite=True)
            adapter = None
            if lora is not None and cfg.lora_save_adapter:
                adapter = save_adapter(params, p.model_cfg, lora, os.path.join(cfg.save_path, role, "lora_adapter"),
                                       base_model=cfg.pretrain, dropout=cfg.lora_dropout)
            if jax.process_index() == 0:
                out[role] = path
                if adapter:
                    out[f"{role}_lora_adapter"] = adapter
    return out


def cli(argv: list[str] | None = None) -> int:
    from jaxrlhf.rewards import RewardError

    cfg = parse_config(PPOConfig, argv, prog="python -m jaxrlhf.ppo")
    try:
        out = main(cfg)
    except (ValueError, KeyError, OSError, FloatingPointError, RewardError) as e:
        print(f"error: {error_text(e)}", file=sys.stderr)
        return 2
    import jax

    if out.get("dry_run") or jax.process_index() != 0:  # a plan was printed / process 0 reports for the job
        return 0
    from jaxrlhf.train.metrics import read_metrics

    rewards = [r["reward"] for r in read_metrics(out["log"]) if "reward" in r]
    if len(rewards) >= 10:  # mean of the first and last five logged steps
        trend = f"reward {sum(rewards[:5]) / 5:.3f} (first 5 steps) -> {sum(rewards[-5:]) / 5:.3f} (last 5 steps)"
    else:
        trend = f"final reward {out['metrics'].get('reward', float('nan')):.3f}"
    print(f"\ndone: {out['steps']} PPO steps; {trend}")
    print(f"  metrics: {out['log']}")
    for k in ("plot", "actor", "critic"):
        if k in out:
            print(f"  {k}: {out[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
