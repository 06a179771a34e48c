#!/usr/bin/env bash
# Submit PPO as a Ray job (OpenRLHF's workflow) to a cluster started with scripts/ray_cluster.sh:
# scripts/ray_launch_trainers.py reserves one node of GPUs per JAX trainer process and starts them (joined by
# jax.distributed through JAXRLHF_* variables); trainer 0 then places the vLLM engines on the cluster's other GPUs.
#
#   bash scripts/ray_ppo_job.sh   (on the head: its job API listens on loopback, see ray_cluster.sh; from elsewhere
#   tunnel it first: ssh -L 8265:127.0.0.1:8265 HEAD)
#   JAXRLHF_PRINT_ARGS=1 bash scripts/ray_ppo_job.sh      # print the trainer flags for a --dry_run and stop
#   python -m jaxrlhf.ppo $(JAXRLHF_PRINT_ARGS=1 bash scripts/ray_ppo_job.sh) --dry_run --device_memory_gb 80
# Verified by the project: `bash -n` and a --dry_run of this job's trainer flags (tests/test_scripts.py); it has
# not run on a real cluster (the project's machines are single CPU hosts). On yours: dry-run the printed flags
# (JAXRLHF_PRINT_ARGS=1, see above), then run once with --max_steps 2 before a long job.
set -euo pipefail

# ---------------------------------------------------------------- knobs (every one overridable from the environment)
REPO=${REPO:-$HOME/jaxrlhf}                                  # checkout with .venv (the same path on every node)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}                     # interpreter the trainers run with
HEAD_IP=${HEAD_IP:-127.0.0.1}                                # Ray head (its dashboard takes the job)
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}                       # the head's job-submission port
MODEL=${MODEL:-/shared/models/Meta-Llama-3-8B-Instruct}      # actor + reference: HF dir or converted checkpoint
REWARD_MODEL=${REWARD_MODEL:-/shared/models/llama3-8b-rm}    # reward model, also the critic's init
PROMPTS=${PROMPTS:-/shared/data/prompts.jsonl}               # prompt dataset
OUT=${OUT:-/shared/runs/ppo-8b-ray}                          # --save_path (process 0 writes exports, logs, plot)
CKPT=${CKPT:-/shared/runs/ppo-8b-ray/checkpoints}            # --ckpt_path (every trainer writes its shards)
NUM_TRAINERS=${NUM_TRAINERS:-2}                              # JAX trainer processes = trainer nodes
GPUS_PER_TRAINER=${GPUS_PER_TRAINER:-8}                      # GPUs per trainer node (all of a node)
CPUS_PER_TRAINER=${CPUS_PER_TRAINER:-16}                     # CPUs reserved per trainer (tokenizing, host work)
VLLM_ENGINES=${VLLM_ENGINES:-4}                              # vLLM engines on the remaining GPUs
VLLM_TP=${VLLM_TP:-2}                                        # GPUs per engine
JOB_ENV=${JOB_ENV:-XLA_PYTHON_CLIENT_MEM_FRACTION=0.95}      # extra KEY=VALUE for every trainer (space-separated)

PPO_ARGS=(
  --mesh 8x2                              # fsdp 8 (4 per node x 2 nodes) x tensor 2 (inside a node): 16 GPUs
  --pretrain "$MODEL"                     # actor; the reference is a frozen copy
  --reward_pretrain "$REWARD_MODEL"       # reward model (critic init too)
  --prompt_data "$PROMPTS"                # prompts
  --input_key input                       # prompt field
  --apply_chat_template                   # chat-format the prompts
  --prompt_max_len 1024                   # prompt tokens kept
  --generate_max_len 1024                 # most tokens generated
  --rollout_batch_size 512                # prompts per step
  --n_samples_per_prompt 1                # completions per prompt
  --advantage_estimator gae               # PPO with a critic
  --train_batch_size 128                  # samples per update
  --micro_train_batch_size 2              # per data-parallel rank per micro-batch
  --micro_rollout_batch_size 4            # per data-parallel rank per experience forward
  --max_epochs 1                          # passes over each rollout batch
  --actor_learning_rate 5e-7              # actor peak learning rate
  --critic_learning_rate 9e-6             # critic peak learning rate
  --init_kl_coef 0.01                     # KL penalty
  --normalize_reward                      # reward model's mean/std
  --bf16                                  # bf16 compute
  --gradient_checkpointing                # recompute activations
  --vllm_num_engines "$VLLM_ENGINES"      # rollout engines
  --vllm_tensor_parallel_size "$VLLM_TP"  # GPUs per engine
  --vllm_sync_backend nccl                # weight broadcast over NCCL
  --ray_address auto                      # trainer 0 drives the engines in this Ray cluster
  --save_path "$OUT"
  --ckpt_path "$CKPT"
  --save_steps 50                         # checkpoint every 50 steps
  --load_checkpoint                       # resume if a checkpoint exists
  --use_tensorboard "$OUT/tb"
)

if [ "${JAXRLHF_PRINT_ARGS:-0}" = 1 ]; then  # flags for a --dry_run, with the trainer process count
  printf '%s\n' "${PPO_ARGS[@]}" --num_processes "$NUM_TRAINERS"
  exit 0
fi

env_flags=()
for kv in $JOB_ENV; do env_flags+=(--env "$kv"); done
cd "$REPO"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}  # the cluster's token: ~/.ray/auth_token or RAY_AUTH_TOKEN
"$REPO/.venv/bin/ray" job submit --address "http://$HEAD_IP:$DASHBOARD_PORT" --working-dir "$REPO" \
  --runtime-env-json '{"excludes": [".venv", ".cache", "*.safetensors"]}' -- \
  "$PYTHON" scripts/ray_launch_trainers.py --num_trainers "$NUM_TRAINERS" --gpus_per_trainer "$GPUS_PER_TRAINER" \
  --cpus_per_trainer "$CPUS_PER_TRAINER" "${env_flags[@]}" -- \
  "$PYTHON" -m jaxrlhf.ppo "${PPO_ARGS[@]}"
