"""PPO and its REINFORCE/GRPO family: ``python -m jaxrlhf.ppo --mesh 4x2 [flags]``.

Flags follow OpenRLHF's classic spelling; ``--config run.yaml`` takes the same keys. With no ``--pretrain`` the
built-in demo runs (jaxrlhf/demo.py): a tiny model learns to add with a verifiable reward, no network needed.

One step: prompts -> engine.generate (n samples each) -> on the mesh, in micro-batches: actor (old) log-probs,
reference log-probs, critic values, rewards -> KL shaping + advantages -> ``--max_epochs`` passes of jitted actor
and critic updates over ``--train_batch_size`` batches -> weight sync to the engine -> metrics and checkpoint.

Batch arithmetic (as OpenRLHF): ``--rollout_batch_size`` prompts x ``--n_samples_per_prompt`` samples per step;
``--train_batch_size`` samples per optimizer update; ``--micro_train_batch_size`` and
``--micro_rollout_batch_size`` are per data-parallel rank (dp = data x fsdp mesh axes), so a micro-batch holds
``micro x dp`` samples across the mesh and gradient accumulation makes up the rest.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

from jaxrlhf.cli import arg, config_to_dict, parse_config
from jaxrlhf.plan import PlanFlags
from sharding.distributed import DistributedConfig

Estimator = Literal["gae", "reinforce", "reinforce_baseline", "rloo", "group_norm", "dr_grpo"]


@dataclass
class PPOConfig(DistributedConfig, PlanFlags):  # + multi-host flags (sharding/distributed.py), --dry_run (plan.py)
    # ---- mesh and randomness
    mesh: str = arg("4x2", "device mesh: FSDPxTENSOR (4x2), DATAxFSDPxTENSOR (2x2x2) or data=2,fsdp=2,tensor=2")
    seed: int = arg(42, "seed of every PRNG key (sampling, shuffling, value-head init)")
    # ---- models
    pretrain: Optional[str] = arg(None, "actor (policy) HF directory or converted checkpoint; None runs the demo")
    reward_pretrain: Optional[str] = arg(None, "reward model directory(ies), comma-separated: scores are summed")
    critic_pretrain: Optional[str] = arg(None, "critic init (default: the reward model, else the actor)")
    value_head_prefix: Optional[str] = arg(None, "score tensor prefix: score (HF) or value_head (OpenRLHF); None detects")
    remote_rm_url: Optional[str] = arg(None, "reward.py with reward_func(queries, prompts, labels), or HTTP URL(s)")
    remote_rm_timeout: float = arg(60.0, "seconds per HTTP reward request before a retry")
    # ---- data
    prompt_data: Optional[str] = arg(None, "prompt dataset(s), comma-separated: files, type@dir, save_to_disk dirs")
    prompt_data_probs: Optional[str] = arg(None, "mixing probabilities of --prompt_data, comma-separated")
    prompt_split: str = arg("train", "dataset split")
    input_key: str = arg("input", "prompt field")
    label_key: Optional[str] = arg(None, "label field passed to the reward function")
    apply_chat_template: bool = arg(False, "wrap prompts with the tokenizer's chat template")
    input_template: Optional[str] = arg(None, "prompt template with {} for the input, e.g. 'Q: {}\\nA:'")
    max_samples: Optional[int] = arg(None, "use at most this many prompts per dataset")
    prompt_max_len: int = arg(1024, "prompt tokens kept (left-truncated)")
    generate_max_len: int = arg(1024, "most tokens generated per sample")
    # ---- batch arithmetic
    rollout_batch_size: int = arg(1024, "prompts per PPO step")
    n_samples_per_prompt: int = arg(1, "completions sampled per prompt")
    micro_rollout_batch_size: int = arg(8, "samples per data-parallel rank per experience forward")
    train_batch_size: int = arg(128, "samples per optimizer update")
    micro_train_batch_size: int = arg(4, "samples per data-parallel rank per micro-batch (gradient accumulation)")
    max_epochs: int = arg(1, "passes over each rollout batch")
    num_episodes: int = arg(1, "passes over the prompt dataset")
    max_steps: Optional[int] = arg(None, "stop after this many PPO steps (default: num_episodes x dataset)")
    # ---- sampling
    temperature: float = arg(1.0, "sampling temperature (log-probs use the same temperature)")
    top_p: float = arg(1.0, "nucleus sampling")
    top_k: int = arg(-1, "top-k sampling (-1: off)")
    # ---- optimisation
    actor_learning_rate: float = arg(1e-6, "actor peak learning rate")
    critic_learning_rate: float = arg(9e-6, "critic peak learning rate")
    lr_warmup_ratio: float = arg(0.03, "fraction of updates spent in linear warm-up")
    min_lr_ratio: float = arg(0.1, "cosine decay floor as a fraction of the peak")
    l2: float = arg(0.0, "AdamW weight decay")
    adam_betas: tuple[float, ...] = arg((0.9, 0.95), "AdamW betas")
    max_norm: float = arg(1.0, "gradient clipping by global norm")
    bf16: bool = arg(False, "bf16 compute (fp32 master weights and optimizer state)")
    gradient_checkpointing: bool = arg(False, "recompute layer activations in the backward pass")
    freezing_actor_steps: int = arg(-1, "train only the critic for this many first steps")
    # ---- PPO
    advantage_estimator: Estimator = arg("gae", "gae | reinforce | reinforce_baseline | rloo | group_norm | dr_grpo")
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
    # ---- outputs
    save_path: str = arg("./ckpt", "final HF exports (actor/, critic/) and logs")
    ckpt_path: str = arg("./ckpt/checkpoints_ppo", "training checkpoints")
    save_steps: int = arg(-1, "checkpoint every N steps (-1: only at the end)")
    max_ckpt_num: int = arg(3, "checkpoints kept")
    load_checkpoint: bool = arg(False, "resume from the latest checkpoint in --ckpt_path")
    logging_steps: int = arg(1, "log every N steps")
    use_tensorboard: Optional[str] = arg(None, "TensorBoard log directory")
    use_wandb: Optional[str] = arg(None, "W&B: 'true' or an API key")
    wandb_project: str = arg("jaxrlhf", "W&B project")
    wandb_run_name: Optional[str] = arg(None, "W&B run name")
    demo_dir: str = arg(".cache/jaxrlhf-demo", "where the built-in demo caches its tokenizer, data and SFT model")
    # rollout engines: a Ray pool of vLLM engines (jaxrlhf/rollout/vllm_pool.py) or the in-process JAX sampler
    vllm_num_engines: int = arg(0, "vLLM engines for rollouts, each a Ray actor (0: in-process JAX sampler; the "
                                   "built-in demo uses 1 wherever vLLM and Ray are installed)")
    vllm_tensor_parallel_size: int = arg(1, "GPUs per vLLM engine (reserved on one node by a placement group)")
    vllm_gpu_memory_utilization: float = arg(0.9, "fraction of each engine GPU vLLM may use")
    vllm_kv_cache_mb: int = arg(256, "KV cache per engine in MiB (required on CPU; 0 on GPU: sized by vLLM)")
    vllm_dtype: str = arg("auto", "engine dtype: bfloat16, float16, float32 or auto (bfloat16 with --bf16, else "
                                  "float32)")
    enable_prefix_caching: bool = arg(False, "vLLM prefix caching (reset after every weight sync)")
    enforce_eager: bool = arg(False, "vLLM without CUDA graphs")
    vllm_sync_backend: Literal["ray", "nccl"] = arg("ray", "weight broadcast: ray (object store, any machine) or "
                                                           "nccl (GPU clusters)")
    weight_sync_bucket_mb: int = arg(256, "weight broadcast bucket size in MiB")
    vllm_sync_check: Literal["off", "first", "every"] = arg(
        "first", "after a weight sync, compare each engine's greedy continuation and logprobs of probe prompts with "
                 "the trainer's and stop on a mismatch: off, after the first sync, or after every sync")
    vllm_request_timeout: float = arg(600.0, "seconds to wait for one engine's answer before failing")
    ray_address: Optional[str] = arg(None, "join this Ray cluster (e.g. auto or ray://host:10001); default: start a "
                                           "local one")

    # ---- role placement (sharding/placement.py): default everything on --mesh
    ref_mesh: Optional[str] = arg(None, "reference model's own mesh, SPEC[@FIRST_DEVICE] per host, e.g. 2x2@4")
    reward_mesh: Optional[str] = arg(None, "reward models' own mesh, SPEC[@FIRST_DEVICE] per host, e.g. 4@4")
    ref_offload: bool = arg(False, "keep the reference model in host memory between experience passes")
    reward_offload: bool = arg(False, "keep the reward models in host memory between experience passes")

    def __post_init__(self):
        super().__post_init__()
        if self.kl_horizon <= 0:
            raise ValueError("--kl_horizon must be > 0")
        if self.eps_clip_low_high is not None and len(self.eps_clip_low_high) != 2:
            raise ValueError(f"--eps_clip_low_high takes two numbers (low,high), got {self.eps_clip_low_high}")
        if len(self.reward_clip_range) != 2:
            raise ValueError(f"--reward_clip_range takes two numbers (low,high), got {self.reward_clip_range}")
        if self.advantage_estimator in ("rloo", "reinforce_baseline", "group_norm", "dr_grpo") \
                and self.n_samples_per_prompt < 2:
            raise ValueError(f"--advantage_estimator {self.advantage_estimator} needs a group: set "
                             "--n_samples_per_prompt >= 2")
        if self.vllm_num_engines < 0:
            raise ValueError(f"--vllm_num_engines must be >= 0, got {self.vllm_num_engines}")


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
    with contextlib.ExitStack() as cleanup:
        return _main(cfg, cleanup)


def _main(cfg: PPOConfig, cleanup: contextlib.ExitStack) -> dict:
    # -- plan only (--dry_run), or join the process group before jax starts (sharding/distributed.py)
    from sharding import distributed, make_mesh, placement

    roles_mesh = {"ref": cfg.ref_mesh, "reward": cfg.reward_mesh}
    if cfg.dry_run:
        from jaxrlhf.plan import dry_run_ppo
        from sharding import parse_mesh

        spec = parse_mesh(cfg.mesh)
        check_batch_arithmetic(cfg, spec.data * spec.fsdp)
        return dry_run_ppo(cfg)
    launch = distributed.start(cfg, lambda n: placement.plan_devices(cfg.mesh, roles_mesh, n)["per_host"])
    if cfg.device_memory_gb is not None:  # refuse a plan that cannot fit before loading anything
        from jaxrlhf.plan import PPO_KNOBS, check_fits, plan_ppo

        check_fits(plan_ppo(cfg, processes=launch.num_processes), PPO_KNOBS)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from converters.hf import export_hf, hf_tensors
    from jaxrlhf import advantages as adv
    from jaxrlhf import losses
    from jaxrlhf.data.loader import BatchIterator, left_pad, right_pad
    from jaxrlhf.data.prompts import PromptDataset
    from jaxrlhf.data.sources import blend, parse_probs, split_specs
    from jaxrlhf.data.tokenizer import load_tokenizer
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.rewards import load_remote_reward
    from jaxrlhf.rewards.model import RewardModels
    from jaxrlhf.rollout import SamplingParams
    from jaxrlhf.rollout.sync_check import check_engines, default_tolerance
    from jaxrlhf.train.checkpoint import Checkpointer
    from jaxrlhf.train.metrics import MetricsLogger, PhaseTimer, plot_metrics
    from jaxrlhf.train.optim import make_optimizer
    from jaxrlhf.train.steps import init_optimizer, make_forward, make_train_step, stack_micro_batches

    meshes = placement.make_meshes(cfg.mesh, roles_mesh) if any(roles_mesh.values()) \
        else {"main": make_mesh(cfg.mesh)}
    for name, m in meshes.items():
        distributed.check_mesh_hosts(m, "--mesh" if name == "main" else f"--{name}_mesh")
    mesh = meshes["main"]
    if cfg.pretrain is None and jax.process_count() > 1:
        raise ValueError("the built-in demo runs in one process: pass --pretrain, --prompt_data and a reward")
    if cfg.pretrain is None:
        from jaxrlhf import demo

        cfg = demo.prepare(cfg, mesh)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    check_batch_arithmetic(cfg, dp)
    if cfg.reward_pretrain is None and cfg.remote_rm_url is None:
        raise ValueError("no reward: pass --reward_pretrain (reward model dir) or --remote_rm_url (reward.py / URL)")
    if cfg.prompt_data is None:
        raise ValueError("--prompt_data is required with --pretrain")
    compute_dtype = jnp.bfloat16 if cfg.bf16 else None
    key = jax.random.key(cfg.seed)

    # ---------------------------------------------------------------- data
    tokenizer = load_tokenizer(cfg.pretrain)
    specs = split_specs(cfg.prompt_data)
    records = blend(specs, parse_probs(cfg.prompt_data_probs), seed=cfg.seed, max_samples=cfg.max_samples,
                    split=cfg.prompt_split)
    data = PromptDataset(records, tokenizer, input_key=cfg.input_key, label_key=cfg.label_key,
                         apply_chat_template=cfg.apply_chat_template, input_template=cfg.input_template,
                         prompt_max_len=cfg.prompt_max_len, source=cfg.prompt_data)
    if data.num_truncated:
        print(f"[data] {data.num_truncated} of {len(data)} prompts were longer than --prompt_max_len "
              f"{cfg.prompt_max_len} and were left-truncated", file=sys.stderr)
    if len(data) < cfg.rollout_batch_size:
        raise ValueError(f"--rollout_batch_size {cfg.rollout_batch_size} exceeds the {len(data)} prompts of "
                         f"--prompt_data: lower it")
    batches = BatchIterator(len(data), cfg.rollout_batch_size, seed=cfg.seed)
    total_steps = cfg.num_episodes * batches.batches_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    samples = cfg.rollout_batch_size * cfg.n_samples_per_prompt
    updates_per_step = cfg.max_epochs * samples // cfg.train_batch_size

    # ---------------------------------------------------------------- models
    actor = from_pretrained(cfg.pretrain, mesh=mesh, dtype=jnp.float32, head="lm",
                            remat=cfg.gradient_checkpointing)
    model_cfg = actor.cfg
    actor_def, actor_state = nnx.split(actor)
    actor_params = actor_state.to_pure_dict()
    need_ref = cfg.init_kl_coef > 0 or cfg.use_kl_loss
    ref_params = ref_def = ref_shapes = None
    if need_ref:  # a separate frozen copy (the actor's buffers are donated on update), stored in the compute dtype;
        # on its own devices with --ref_mesh, in host memory between experience passes with --ref_offload
        ref_def, ref_state = nnx.split(from_pretrained(cfg.pretrain, mesh=meshes.get("ref", mesh), head="lm",
                                                       dtype=compute_dtype or jnp.float32))
        ref_params = ref_state.to_pure_dict()
        ref_shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                            ref_params)
        if cfg.ref_offload:
            ref_params = placement.offload(ref_params)
    use_critic = cfg.advantage_estimator == "gae"
    critic_def = critic_params = None
    if use_critic:
        critic_src = cfg.critic_pretrain or (cfg.reward_pretrain.split(",")[0] if cfg.reward_pretrain else cfg.pretrain)
        critic = from_pretrained(critic_src, mesh=mesh, dtype=jnp.float32, head="score",
                                 value_head_prefix=cfg.value_head_prefix, remat=cfg.gradient_checkpointing,
                                 seed=cfg.seed)
        critic_def, critic_state = nnx.split(critic)
        critic_params = critic_state.to_pure_dict()
    reward_models = RewardModels(cfg.reward_pretrain.split(","), mesh=meshes.get("reward", mesh),
                                 value_head_prefix=cfg.value_head_prefix,
                                 compute_dtype=compute_dtype) if cfg.reward_pretrain else None
    if reward_models is not None and cfg.reward_offload:
        reward_models.offload()
    remote_reward = load_remote_reward(cfg.remote_rm_url, timeout_s=cfg.remote_rm_timeout) \
        if cfg.remote_rm_url else None

    engine = _rollout_engine(cfg, actor, tokenizer, mesh)  # None on processes > 0 when the vLLM pool is used
    if engine is not None:
        cleanup.callback(engine.close)
    del actor  # the engine and actor_params hold what is needed

    # ---------------------------------------------------------------- jitted pieces
    P_LEN, R_LEN = cfg.prompt_max_len, cfg.generate_max_len
    eps_low, eps_high = cfg.eps_clip_low_high or (cfg.eps_clip, cfg.eps_clip)

    def response_logits(model, b):
        return model(b["seqs"], b["attn"])[:, P_LEN - 1:P_LEN + R_LEN - 1]  # logits that predict the response

    def logprob_fn(model, b):
        return losses.logprobs_from_logits(response_logits(model, b), b["seqs"][:, P_LEN:], cfg.temperature)

    def probe_fn(model, b):  # temperature-1 log-probs of the response tokens, and the best log-prob per position
        logp_btv = jax.nn.log_softmax(response_logits(model, b).astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp_btv, b["seqs"][:, P_LEN:, None], -1)[..., 0], logp_btv.max(-1)

    def value_fn(model, b):
        return model(b["seqs"], b["attn"])[:, P_LEN - 1:P_LEN + R_LEN - 1]

    def actor_loss(model, b):
        logits = response_logits(model, b)
        logp = losses.logprobs_from_logits(logits, b["seqs"][:, P_LEN:], cfg.temperature)
        mask, n = b["action_mask"], b["num_tokens"]
        pg_bt, clipped_bt = losses.ppo_policy_loss(logp, b["old_logp"], b["advantages"], eps_clip_low=eps_low,
                                                   eps_clip_high=eps_high, dual_clip=cfg.dual_clip)
        loss = losses.token_mean_over_batch(pg_bt, mask, n)
        metrics = {"policy_loss": loss, "clip_frac": losses.token_mean_over_batch(clipped_bt, mask, n),
                   "approx_kl": losses.token_mean_over_batch(b["old_logp"] - logp, mask, n)}
        if cfg.entropy_coef:
            ent = losses.token_mean_over_batch(losses.entropy_from_logits(logits, cfg.temperature), mask, n)
            loss = loss - cfg.entropy_coef * ent
            metrics["entropy"] = ent
        if cfg.use_kl_loss:
            kl = losses.token_mean_over_batch(losses.kl_estimate(logp, b["ref_logp"], cfg.kl_estimator), mask, n)
            loss = loss + b["kl_coef"] * kl
            metrics["kl_loss"] = kl
        return loss, metrics

    def critic_loss(model, b):
        values = value_fn(model, b)
        loss = losses.token_mean_over_batch(
            losses.ppo_value_loss(values, b["old_values"], b["returns"], value_clip=cfg.value_clip),
            b["action_mask"], b["num_tokens"])
        return loss, {"value_loss": loss}

    total_updates = max(1, total_steps * updates_per_step)

    def optimizer(lr):
        return make_optimizer(learning_rate=lr, total_steps=total_updates, warmup_ratio=cfg.lr_warmup_ratio,
                              min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.l2, betas=tuple(cfg.adam_betas),
                              max_norm=cfg.max_norm)

    actor_tx, actor_lr = optimizer(cfg.actor_learning_rate)
    actor_opt = init_optimizer(actor_tx, actor_params, mesh)
    actor_step = make_train_step(actor_def, actor_loss, actor_tx, params=actor_params, opt_state=actor_opt,
                                 mesh=mesh, compute_dtype=compute_dtype)
    actor_logp = make_forward(actor_def, logprob_fn, params=actor_params, mesh=mesh, compute_dtype=compute_dtype)
    ref_forward = actor_logp if "ref" not in meshes else make_forward(  # --ref_mesh: compiled for its own mesh
        ref_def, logprob_fn, params=ref_shapes, mesh=meshes["ref"], compute_dtype=compute_dtype)
    actor_probe = make_forward(actor_def, probe_fn, params=actor_params, mesh=mesh, compute_dtype=compute_dtype)
    if use_critic:
        critic_tx, _ = optimizer(cfg.critic_learning_rate)
        critic_opt = init_optimizer(critic_tx, critic_params, mesh)
        critic_step = make_train_step(critic_def, critic_loss, critic_tx, params=critic_params,
                                      opt_state=critic_opt, mesh=mesh, compute_dtype=compute_dtype)
        critic_values = make_forward(critic_def, value_fn, params=critic_params, mesh=mesh,
                                     compute_dtype=compute_dtype)

    # ---------------------------------------------------------------- checkpoints and logs
    ckpt = Checkpointer(cfg.ckpt_path, max_to_keep=cfg.max_ckpt_num)

    def train_state():
        state = {"actor": actor_params, "actor_opt": actor_opt}
        if use_critic:
            state.update(critic=critic_params, critic_opt=critic_opt)
        return state

    start_step, kl_coef = 0, cfg.init_kl_coef
    reward_stats = {"count": 0.0, "mean": 0.0, "m2": 0.0}  # running moments for --normalize_reward
    if cfg.load_checkpoint and ckpt.latest_step() is not None:
        last = ckpt.latest_step()
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                          train_state())
        state, meta = ckpt.restore(last, abstract)
        actor_params, actor_opt = state["actor"], state["actor_opt"]
        if use_critic:
            critic_params, critic_opt = state["critic"], state["critic_opt"]
        start_step, kl_coef, reward_stats = meta["step"], meta["kl_coef"], meta["reward_stats"]
        batches.load_state(meta["data"])
        if not cfg.vllm_num_engines:
            engine.update_weights(hf_tensors(actor_params, model_cfg, host=False))
        print(f"[ckpt] resumed from step {start_step} of {cfg.ckpt_path}", file=sys.stderr)

    os.makedirs(cfg.save_path, exist_ok=True)
    log_dir = os.path.join(cfg.save_path, "logs")
    logger = MetricsLogger(log_dir, use_tensorboard=cfg.use_tensorboard,
                           use_wandb=(False if cfg.use_wandb in (None, "false") else cfg.use_wandb),
                           wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name,
                           config=config_to_dict(cfg), total_steps=total_steps,
                           progress_keys=("reward", "kl", "step_time"))

    def in_chunks(n_rows: int, size: int):
        return [(i, min(i + size, n_rows)) for i in range(0, n_rows, size)]

    def engine_rows(prompt_rows: list[list[int]], completions) -> tuple | None:
        """Engine output as padded ``[prompt | response]`` rows, their attention mask and the engine's log-probs."""
        if completions is None:
            return None
        p_ids, p_mask = left_pad([prompt_rows[c.prompt_index] for c in completions], tokenizer.pad_token_id,
                                 length=P_LEN)
        r_ids, r_mask = right_pad([c.token_ids for c in completions], tokenizer.pad_token_id, length=R_LEN)
        logp = np.zeros((len(completions), R_LEN), np.float32)
        for i, c in enumerate(completions):
            logp[i, :len(c.logprobs)] = c.logprobs
        return np.concatenate([p_ids, r_ids], 1), np.concatenate([p_mask, r_mask], 1), logp

    def share(value, n_rows: int):
        """Rows built on process 0 (the only one talking to the vLLM pool), on every process."""
        shapes = [((n_rows, P_LEN + R_LEN), np.int32), ((n_rows, P_LEN + R_LEN), np.int32), ((n_rows, R_LEN),
                                                                                             np.float32)]
        return _share_from_process0(value, shapes)

    # Weight sync: hf_tensors gathers one tensor at a time (a collective on every process); the pool gets host
    # arrays, except NCCL on one host (device arrays handed over by DLPack); the JAX sampler keeps device arrays.
    weights_on_host = bool(cfg.vllm_num_engines) and not (cfg.vllm_sync_backend == "nccl"
                                                         and jax.process_count() == 1)
    probe_prompts = data.batch(list(range(min(4, len(data)))))[1]
    n_syncs = 0

    def sync_weights() -> dict:
        """Broadcast the actor to the rollout engine; with the pool, optionally check the engines against it."""
        nonlocal n_syncs
        n_syncs += 1
        named = hf_tensors(actor_params, model_cfg, host=weights_on_host)
        out: dict = {}
        if engine is None:
            for _ in named:  # processes > 0 join the per-tensor gathers; process 0 sends
                pass
        else:
            stats = engine.update_weights(named)
            if stats:
                out = {"sync/seconds": stats["seconds"], "sync/GBps": stats["bytes"] / stats["seconds"] / 1e9}
        if cfg.vllm_num_engines and (cfg.vllm_sync_check == "every" or (cfg.vllm_sync_check == "first"
                                                                        and n_syncs == 1)):
            out.update(check_sync())
        return out

    def check_sync() -> dict:
        greedy = SamplingParams(n=1, temperature=0.0, max_tokens=R_LEN)
        n_rows = cfg.vllm_num_engines * len(probe_prompts)
        built = None
        if engine is not None:
            per_engine = engine.generate_each(probe_prompts, greedy)
            flat = [c for comps in per_engine for c in comps]
            flat += flat[:n_rows - len(flat)]  # engines down right now: repeat rows to keep the shapes fixed
            built = engine_rows(probe_prompts, flat)
        p_seqs, p_attn, p_logp = share(built, n_rows)
        chunk = cfg.micro_rollout_batch_size * dp
        pad = -n_rows % chunk
        mb = {"seqs": np.concatenate([p_seqs, p_seqs[:1].repeat(pad, 0)]),
              "attn": np.concatenate([p_attn, p_attn[:1].repeat(pad, 0)])}
        t_logp, t_best = [], []
        for a, b in in_chunks(len(mb["seqs"]), chunk):
            lp, best = actor_probe(actor_params, {k: jnp.asarray(v[a:b]) for k, v in mb.items()})
            t_logp.append(np.asarray(lp))
            t_best.append(np.asarray(best))
        engine_of_row = np.arange(n_rows) // len(probe_prompts)
        return check_engines(p_logp, np.concatenate(t_logp)[:n_rows], np.concatenate(t_best)[:n_rows],
                             p_attn[:, P_LEN:], engine_of_row,
                             tol=default_tolerance(_engine_dtype(cfg)))

    sync_metrics: dict = {}
    if cfg.vllm_num_engines:  # the engines start from --pretrain (or dummy weights): give them the actor's
        sync_metrics = sync_weights()

    # ---------------------------------------------------------------- the loop
    timer = PhaseTimer()
    metrics: dict = {}
    for step in range(start_step, total_steps):
        t_step = time.perf_counter()
        timer.reset()
        step_key = jax.random.fold_in(key, step)
        idx = batches.next_batch()
        prompts, prompt_ids, labels = data.batch(idx)

        # -- generate
        with timer("generate"):
            sampling = SamplingParams(n=cfg.n_samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                                      top_k=cfg.top_k, max_tokens=R_LEN,
                                      seed=int(jax.random.randint(step_key, (), 0, 2**31 - 1)))
            completions = engine.generate(prompt_ids, sampling) if engine is not None else None
            seqs, attn, rollout_logp = share(engine_rows(prompt_ids, completions), samples)
        n = cfg.n_samples_per_prompt
        action_mask = attn[:, P_LEN:].astype(np.float32)
        response_ids = [seqs[i, P_LEN:][attn[i, P_LEN:] > 0].tolist() for i in range(samples)]

        # -- experience: old/ref log-probs, values, rewards
        with timer("experience"):
            chunk = cfg.micro_rollout_batch_size * dp
            old_logp = np.zeros((samples, R_LEN), np.float32)
            ref_logp = np.zeros_like(old_logp)
            values = np.zeros_like(old_logp)
            rm_reward = np.zeros(samples, np.float32)
            offloaded = contextlib.ExitStack()  # --ref_offload / --reward_offload: back on their devices for this pass
            ref_on_device = placement.onload(ref_params) if cfg.ref_offload else ref_params
            if reward_models is not None:
                offloaded.enter_context(reward_models.on_device())
            for a, b in in_chunks(samples, chunk):
                mb = {"seqs": seqs[a:b], "attn": attn[a:b]}  # host arrays, the same on every process
                old_logp[a:b] = np.asarray(actor_logp(actor_params, mb))
                if need_ref:
                    ref_logp[a:b] = np.asarray(ref_forward(ref_on_device, mb))
                if use_critic:
                    values[a:b] = np.asarray(critic_values(critic_params, mb))
                if reward_models is not None:
                    rm_reward[a:b] = reward_models(seqs[a:b], attn[a:b], normalize=cfg.normalize_reward)
            offloaded.close()
            del ref_on_device
            reward = rm_reward
            extra_logs: dict = {}
            if remote_reward is not None:
                responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
                queries = [prompts[i // n] + r for i, r in enumerate(responses)]
                answered: dict = {}

                def score():  # process 0 alone calls the reward function / servers; the others get its rewards
                    answered["res"] = remote_reward(queries, [prompts[i // n] for i in range(samples)],
                                                    [labels[i // n] for i in range(samples)])
                    return np.asarray(answered["res"].rewards, np.float32)

                reward = reward + distributed.from_process0(score, ((samples,), np.float32))
                if answered:  # extra logs: process 0 logs them
                    extra_logs = {k: float(np.nanmean(v)) for k, v in answered["res"].extra_logs.items()}
            raw_reward = reward.copy()
            if cfg.normalize_reward and reward_models is None:
                reward, reward_stats = _running_normalize(reward, reward_stats)

            kl_bt = np.asarray(losses.kl_estimate(jnp.asarray(old_logp), jnp.asarray(ref_logp), cfg.kl_estimator)) \
                * action_mask if need_ref else np.zeros_like(old_logp)
            shaped = reward
            if cfg.advantage_estimator in ("rloo", "reinforce_baseline", "group_norm", "dr_grpo"):
                shaped = np.asarray(adv.group_shaped_rewards(jnp.asarray(reward), n, cfg.advantage_estimator))
            token_rewards = adv.shape_rewards(jnp.asarray(shaped), jnp.asarray(kl_bt), jnp.asarray(action_mask),
                                              kl_coef=0.0 if cfg.use_kl_loss else kl_coef,
                                              reward_clip_range=tuple(cfg.reward_clip_range))
            mask_j = jnp.asarray(action_mask)
            if use_critic:
                advantages, returns = adv.gae(token_rewards, jnp.asarray(values), mask_j, gamma=cfg.gamma,
                                              lambd=cfg.lambd)
            else:
                gamma = cfg.gamma if cfg.advantage_estimator == "reinforce" else 1.0
                returns = adv.discounted_returns(token_rewards, mask_j, gamma=gamma)
                advantages = returns
            if cfg.advantage_estimator in ("gae", "reinforce", "reinforce_baseline"):
                advantages = adv.whiten(advantages, mask_j, scale_std=not cfg.no_advantage_std_norm)
            advantages, returns = np.asarray(advantages), np.asarray(returns)

        # -- train
        with timer("train"):
            rng = np.random.default_rng([cfg.seed, step])
            train_metrics: dict[str, list] = {}
            micro = cfg.micro_train_batch_size * dp
            for _ in range(cfg.max_epochs):
                order = rng.permutation(samples)
                for a in range(0, samples, cfg.train_batch_size):
                    rows = order[a:a + cfg.train_batch_size]
                    batch = {"seqs": seqs[rows], "attn": attn[rows], "action_mask": action_mask[rows],
                             "num_tokens": np.float32(max(action_mask[rows].sum(), 1.0))}
                    if step >= cfg.freezing_actor_steps:
                        ab = {**batch, "old_logp": old_logp[rows], "advantages": advantages[rows]}
                        if cfg.use_kl_loss:
                            ab.update(ref_logp=ref_logp[rows], kl_coef=np.float32(kl_coef))
                        actor_params, actor_opt, m = actor_step(actor_params, actor_opt,
                                                                stack_micro_batches(ab, micro))
                        _collect(train_metrics, m, "actor/")
                    if use_critic:
                        cb = {**batch, "old_values": values[rows], "returns": returns[rows]}
                        critic_params, critic_opt, m = critic_step(critic_params, critic_opt,
                                                                   stack_micro_batches(cb, micro))
                        _collect(train_metrics, m, "critic/")
        if step >= cfg.freezing_actor_steps:
            with timer("sync"):
                sync_metrics.update(sync_weights())

        # -- bookkeeping
        train_means = {k: float(np.mean([float(x) for x in v])) for k, v in train_metrics.items()}
        for k in ("actor/loss", "critic/loss"):
            if k in train_means and not math.isfinite(train_means[k]):
                ckpt.wait()
                raise FloatingPointError(
                    f"{k} is {train_means[k]} at step {step + 1}: stopping. The last good checkpoint in "
                    f"{cfg.ckpt_path} (step {ckpt.latest_step()}) is untouched; lower the learning rate or "
                    f"check the rewards, then resume with --load_checkpoint")
        mean_kl = float((kl_bt * action_mask).sum() / max(action_mask.sum(), 1.0))
        if cfg.kl_target is not None:
            kl_coef = float(losses.adaptive_kl_coef(kl_coef, mean_kl, samples, kl_target=cfg.kl_target,
                                                    kl_horizon=cfg.kl_horizon))
        gen_tokens = float(action_mask.sum())
        metrics = {
            "reward": float(raw_reward.mean()),
            "kl": mean_kl,
            "kl_coef": kl_coef,
            "response_length": float(action_mask.sum(1).mean()),
            "return": float(returns[:, 0].mean()),
            "advantage_abs": float(np.abs(advantages).sum() / max(action_mask.sum(), 1.0)),
            "rollout/logprob_diff_mean": float(np.abs(rollout_logp - old_logp)[action_mask > 0].mean()),
            "rollout/logprob_diff_max": float(np.abs(rollout_logp - old_logp)[action_mask > 0].max()),
            "actor_lr": float(actor_lr(max(step * updates_per_step, 0))),
            "step_time": time.perf_counter() - t_step,
            "generate_tokens_per_s": gen_tokens / max(timer.seconds.get("generate", 1e-9), 1e-9),
            **train_means, **timer.metrics(), **sync_metrics, **{f"reward/{k}": v for k, v in extra_logs.items()},
        }
        sync_metrics = {}
        if (step + 1) % cfg.logging_steps == 0 or step + 1 == total_steps:
            logger.log(step + 1, metrics)
        if (cfg.save_steps > 0 and (step + 1) % cfg.save_steps == 0) or step + 1 == total_steps:
            ckpt.save(step + 1, train_state(), {
                "step": step + 1, "kl_coef": kl_coef, "reward_stats": reward_stats, "data": batches.state(),
                "seed": cfg.seed})
    ckpt.wait()
    logger.close()

    # ---------------------------------------------------------------- outputs
    out = {"metrics": metrics, "log": os.path.join(log_dir, "metrics.jsonl"), "steps": total_steps}
    if jax.process_index() != 0 and start_step < total_steps:  # multi-host: join process 0's per-tensor gathers
        for params in [actor_params] + ([critic_params] if use_critic else []):  # (same order as its exports)
            for _ in hf_tensors(params, model_cfg):
                pass
    if jax.process_index() == 0 and start_step < total_steps:
        plot = os.path.join(cfg.save_path, "ppo_metrics.png")
        plot_metrics(out["log"], ["reward", "kl", "response_length"], plot)
        out["plot"] = plot
        out["actor"] = export_hf(actor_params, model_cfg, os.path.join(cfg.save_path, "actor"), head="lm",
                                 aux_from=cfg.pretrain, overwrite=True)
        if use_critic:
            out["critic"] = export_hf(critic_params, model_cfg, os.path.join(cfg.save_path, "critic"),
                                      head="score", aux_from=cfg.pretrain, overwrite=True)
    return out


def _engine_dtype(cfg: PPOConfig) -> str:
    return cfg.vllm_dtype if cfg.vllm_dtype != "auto" else ("bfloat16" if cfg.bf16 else "float32")


def _rollout_engine(cfg: PPOConfig, actor, tokenizer, mesh):
    """The in-process JAX sampler, or the Ray pool of vLLM engines (on process 0 only; None elsewhere)."""
    import jax

    eos = (tokenizer.eos_token_id,)
    if not cfg.vllm_num_engines:
        from jaxrlhf.rollout import JaxSampler

        return JaxSampler(actor, mesh=mesh, pad_token_id=tokenizer.pad_token_id, eos_token_ids=eos,
                          max_prompt_len=cfg.prompt_max_len)
    if jax.process_index() != 0:
        return None
    try:
        from jaxrlhf.rollout.vllm_pool import PoolConfig, VLLMPool
    except ImportError as e:
        raise ImportError(f"--vllm_num_engines {cfg.vllm_num_engines} needs vLLM and Ray ({e}); install them with "
                          f"scripts/setup.sh, or use --vllm_num_engines 0 for the JAX sampler") from None
    from converters.hf import is_flax_checkpoint

    return VLLMPool(PoolConfig(  # a converted (Orbax) --pretrain: engines start from dummy weights, synced before use
        model=cfg.pretrain, load_format="dummy" if is_flax_checkpoint(cfg.pretrain) else "auto",
        num_engines=cfg.vllm_num_engines, tensor_parallel_size=cfg.vllm_tensor_parallel_size,
        dtype=_engine_dtype(cfg), gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        kv_cache_mb=cfg.vllm_kv_cache_mb, enable_prefix_caching=cfg.enable_prefix_caching,
        enforce_eager=cfg.enforce_eager, max_model_len=cfg.prompt_max_len + cfg.generate_max_len,
        eos_token_ids=eos, seed=cfg.seed, sync_backend=cfg.vllm_sync_backend, bucket_mb=cfg.weight_sync_bucket_mb,
        request_timeout_s=cfg.vllm_request_timeout, ray_address=cfg.ray_address))


def _share_from_process0(value, shapes: list):
    """``value`` (a tuple of arrays with these (shape, dtype)s, None off process 0) broadcast from process 0."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    if value is None:
        value = tuple(np.zeros(shape, dtype) for shape, dtype in shapes)
    return tuple(np.asarray(x) for x in multihost_utils.broadcast_one_to_all(value))


def _is_process0() -> bool:
    import jax

    return jax.process_index() == 0


def _collect(into: dict, metrics: dict, prefix: str) -> None:
    for k, v in metrics.items():
        into.setdefault(prefix + k, []).append(v)


def _running_normalize(reward, stats):
    """Welford running mean/variance over every reward seen so far; rewards become (r - mean) / std."""
    import numpy as np

    count, mean, m2 = stats["count"], stats["mean"], stats["m2"]
    for r in reward.astype(np.float64):
        count += 1
        d = r - mean
        mean += d / count
        m2 += d * (r - mean)
    std = math.sqrt(m2 / max(count - 1, 1)) if count > 1 else 1.0
    return ((reward - mean) / max(std, 1e-8)).astype(np.float32), {"count": count, "mean": mean, "m2": m2}


def cli(argv: list[str] | None = None) -> int:
    from jaxrlhf.rewards import RewardError

    cfg = parse_config(PPOConfig, argv, prog="python -m jaxrlhf.ppo")
    try:
        out = main(cfg)
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError, RewardError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if out.get("dry_run") or not _is_process0():  # a plan was printed / process 0 reports for the job
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
