"""OpenRLHF's other spellings of the PPO flags, as data for ``jaxrlhf.cli`` (``PPOConfig.ALIASES`` / ``IGNORED``).

``OPENRLHF_ALIASES``: OpenRLHF 0.11's dotted names (``openrlhf/cli/train_ppo_ray.py``) of jaxrlhf's flags, and those
of the flags its later releases added (``algo.advantage.is_correction_{level,mode,gating}``,
``actor.loss_agg_mode``): an OpenRLHF launch script or YAML file runs as it is. ``DEEPSPEED_ONLY``: the DeepSpeed,
placement and kernel flags (classic and dotted spellings) that change nothing in the math here, each with the reason
printed in the one notice line. Features that jaxrlhf does not have yet (EMA, evaluation sets, agents) are
deliberately in neither table: passing them is an unknown-flag error rather than a silent change of the run. LoRA
takes the classic spellings (``--lora_rank``, ``--lora_alpha``, ``--target_modules``, ``--lora_dropout``,
``--load_in_4bit``; train/lora.py); dotted LoRA names are not mapped (an unknown-flag error).
"""
from __future__ import annotations

OPENRLHF_ALIASES = {
    "actor.model_name_or_path": "pretrain", "reward.model_name_or_path": "reward_pretrain",
    "critic.model_name_or_path": "critic_pretrain", "reward.remote_url": "remote_rm_url",
    "ds.value_head_prefix": "value_head_prefix", "ref.offload": "ref_offload", "reward.offload": "reward_offload",
    "data.prompt_dataset": "prompt_data", "data.prompt_probs": "prompt_data_probs", "data.prompt_split": "prompt_split",
    "data.input_key": "input_key", "data.label_key": "label_key", "data.input_template": "input_template",
    "data.apply_chat_template": "apply_chat_template", "data.max_samples": "max_samples",
    "rollout.batch_size": "rollout_batch_size", "rollout.micro_batch_size": "micro_rollout_batch_size",
    "rollout.n_samples_per_prompt": "n_samples_per_prompt", "rollout.max_new_tokens": "generate_max_len",
    "rollout.temperature": "temperature", "rollout.top_p": "top_p",
    "train.batch_size": "train_batch_size", "train.micro_batch_size": "micro_train_batch_size",
    "train.max_epochs": "max_epochs", "train.num_episodes": "num_episodes", "train.seed": "seed",
    "train.async_enable": "async_train", "train.async_queue_size": "async_queue_size",
    "train.partial_rollout_enable": "partial_rollout",
    "actor.adam.lr": "actor_learning_rate", "critic.adam.lr": "critic_learning_rate",
    "actor.adam.betas": "adam_betas", "actor.adam.weight_decay": "l2", "actor.lr_warmup_ratio": "lr_warmup_ratio",
    "actor.min_lr_ratio": "min_lr_ratio", "actor.max_norm": "max_norm",
    "actor.gradient_checkpointing_enable": "gradient_checkpointing",
    "actor.eps_clip": "eps_clip", "actor.eps_clip_low_high": "eps_clip_low_high", "actor.dual_clip": "dual_clip",
    "actor.entropy_coef": "entropy_coef", "actor.policy_loss_type": "policy_loss_type",
    "actor.loss_agg_mode": "loss_agg_mode", "critic.value_clip": "value_clip",
    "critic.freezing_steps": "freezing_actor_steps",
    "algo.advantage.estimator": "advantage_estimator", "algo.advantage.gamma": "gamma",
    "algo.advantage.lambd": "lambd", "algo.advantage.no_std_norm": "no_advantage_std_norm",
    "algo.advantage.is_correction_level": "is_correction_level",
    "algo.advantage.is_correction_mode": "is_correction_mode",
    "algo.advantage.is_correction_gating": "is_correction_gating",
    "algo.advantage.is_correction_threshold": "is_correction_threshold",
    "algo.advantage.is_correction_enable": "is_correction_enable",
    "algo.advantage.is_correction_type": "is_correction_type",
    "algo.kl.init_coef": "init_kl_coef", "algo.kl.target": "kl_target", "algo.kl.horizon": "kl_horizon",
    "algo.kl.estimator": "kl_estimator", "algo.kl.use_loss": "use_kl_loss",
    "algo.dynamic_filtering_enable": "dynamic_filtering", "algo.dynamic_filtering_range": "dynamic_filtering_range",
    "reward.clip_range": "reward_clip_range", "reward.normalize_enable": "normalize_reward",
    "reward.overlong_buffer_len": "overlong_buffer_len", "reward.overlong_penalty_factor": "overlong_penalty_factor",
    "reward.stop_properly_penalty_coef": "stop_properly_penalty_coef",
    "vllm.num_engines": "vllm_num_engines", "vllm.tensor_parallel_size": "vllm_tensor_parallel_size",
    "vllm.gpu_memory_utilization": "vllm_gpu_memory_utilization", "vllm.enforce_eager": "enforce_eager",
    "vllm.enable_prefix_caching": "enable_prefix_caching",
    "ckpt.path": "ckpt_path", "ckpt.output_dir": "save_path", "ckpt.save_steps": "save_steps",
    "ckpt.max_num": "max_ckpt_num", "ckpt.load_enable": "load_checkpoint", "logger.logging_steps": "logging_steps",
    "logger.tensorboard_dir": "use_tensorboard", "logger.wandb.key": "use_wandb",
    "logger.wandb.project": "wandb_project", "logger.wandb.run_name": "wandb_run_name",
    "ds.param_dtype": ("bf16", {"bf16": "true", "bfloat16": "true", "fp32": "false", "float32": "false"}),
}
_MESH = "sharding is the device mesh's (--mesh data x fsdp x tensor)"
_PLACEMENT = "placement is --mesh / --ref_mesh / --reward_mesh and --vllm_num_engines"
_XLA = "XLA compiles and fuses the model itself"
# DeepSpeed / placement / kernel flags of OpenRLHF (classic and 0.11 spellings): no effect on the math here.
DEEPSPEED_ONLY = {
    **{k: _MESH for k in ("zero_stage", "ds.zero_stage", "zpg", "ds.zpg", "overlap_comm", "ds.overlap_comm",
                          "ds.tensor_parallel_size", "ring_attn_size", "ds.ring_attn_size", "ring_attn_head_stride",
                          "ds.ring_attn_head_stride", "ds.use_universal_ckpt", "use_universal_ckpt")},
    **{k: "the optimizer state lives sharded on the mesh (no CPU offload)"
       for k in ("adam_offload", "ds.adam_offload")},
    **{k: _XLA for k in ("flash_attn", "attn_implementation", "ds.attn_implementation", "use_liger_kernel",
                         "ds.use_liger_kernel", "deepcompile", "ds.deepcompile", "ds.experts_implementation",
                         "packing_samples", "ds.packing_samples", "grad_accum_dtype", "ds.grad_accum_dtype",
                         "gradient_checkpointing_use_reentrant", "actor.gradient_checkpointing_reentrant")},
    **{k: _PLACEMENT for k in (
        "actor_num_nodes", "actor_num_gpus_per_node", "ref_num_nodes", "ref_num_gpus_per_node", "critic_num_nodes",
        "critic_num_gpus_per_node", "reward_num_nodes", "reward_num_gpus_per_node", "colocate_actor_ref",
        "colocate_critic_reward", "colocate_all_models", "actor.num_nodes", "actor.num_gpus_per_node",
        "ref.num_nodes", "ref.num_gpus_per_node", "critic.num_nodes", "critic.num_gpus_per_node",
        "reward.num_nodes", "reward.num_gpus_per_node", "train.colocate_actor_ref", "train.colocate_critic_reward",
        "train.colocate_all", "deepspeed_enable_sleep", "ds.enable_sleep", "vllm_enable_sleep", "vllm.enable_sleep",
        "vllm_sync_with_ray", "vllm.sync_with_ray", "local_rank", "use_ms")},
    **{k: "the micro-batch flags fix the shapes (length buckets)" for k in (
        "use_dynamic_batch", "train.dynamic_batch_enable", "rollout_max_tokens_per_gpu", "rollout.max_tokens_per_gpu",
        "train_max_tokens_per_gpu", "train.max_tokens_per_gpu", "vllm_generate_batch_size",
        "rollout.vllm_generate_batch_size")},
    **{k: "checkpoints are Orbax, the final model an HF export" for k in (
        "save_hf_ckpt", "ckpt.save_hf", "disable_ds_ckpt", "ckpt.disable_ds", "max_ckpt_mem", "ckpt.max_mem")},
    **{k: "the tokenizer loads as transformers does" for k in ("disable_fast_tokenizer", "data.disable_fast_tokenizer",
                                                              "data.dataloader_num_workers")},
    "full_determinism": "runs are deterministic by their seeds", "train.full_determinism_enable":
        "runs are deterministic by their seeds",
    "vllm.sync_backend": "see --vllm_sync_backend (ray | nccl)",
    "data.max_len": "lengths are --prompt_max_len and --generate_max_len",
}
