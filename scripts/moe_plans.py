"""Memory plans (``--dry_run``, jaxrlhf/plan.py) of the two reference mixture-of-experts models, Mixtral-8x7B and
Qwen3-30B-A3B, for PPO (actor + critic + reference) and GRPO (actor + reference) on 8 and 16 x 80 GiB devices.

    python scripts/moe_plans.py [--out DIR]      # prints every plan; needs no weights and no devices

The configs are the models' published ``config.json`` values (mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen3-30B-A3B).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIXTRAL_8X7B = dict(
    architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
    max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, num_local_experts=8,
    num_experts_per_tok=2, router_aux_loss_coef=0.02, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    torch_dtype="bfloat16")
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
    intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
    rope_theta=1e6, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], router_aux_loss_coef=0.001, use_sliding_window=False, sliding_window=None,
    max_window_layers=48, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")
MODELS = {"Mixtral-8x7B": MIXTRAL_8X7B, "Qwen3-30B-A3B": QWEN3_30B_A3B}
# (devices, hosts, mesh): 8 = one host, 16 = two hosts of 8; experts split over expert x fsdp
MESHES = {8: (1, "data=1,fsdp=4,expert=2,tensor=1"), 16: (2, "data=1,fsdp=8,expert=2,tensor=1")}


def ppo_config(model_dir: str, mesh: str, estimator: str):
    from jaxrlhf.ppo import PPOConfig

    return PPOConfig(pretrain=model_dir, mesh=mesh, advantage_estimator=estimator, dry_run=True, device_memory_gb=80,
                     bf16=True, gradient_checkpointing=True, prompt_max_len=1024, generate_max_len=1024,
                     rollout_batch_size=128, n_samples_per_prompt=8 if estimator == "group_norm" else 1,
                     micro_rollout_batch_size=4, micro_train_batch_size=1, train_batch_size=128,
                     vllm_num_engines=4, remote_rm_url="http://localhost:5000/get_reward", aux_loss_coef=0.001)


def plans(root: str):
    """Yield ``(model, algorithm, devices, Plan)`` for every combination."""
    from jaxrlhf.plan import hf_config_dir, plan_ppo

    for name, hf in MODELS.items():
        path = hf_config_dir(os.path.join(root, name), hf)
        for algo, estimator in (("PPO", "gae"), ("GRPO", "group_norm")):
            for devices, (hosts, mesh) in MESHES.items():
                yield name, algo, devices, plan_ppo(ppo_config(path, mesh, estimator), processes=hosts)


def main(argv=None) -> int:
    from jaxrlhf.plan import format_plan, gib

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="where the weightless config.json directories go (default: a temp)")
    args = ap.parse_args(argv)
    root = args.out or tempfile.mkdtemp(prefix="moe_plans_")
    summary = []
    for name, algo, devices, plan in plans(root):
        print(f"\n===== {name} {algo} on {devices} x 80 GiB =====")
        print(format_plan(plan))
        peak, phase, _ = plan.peak
        summary.append(f"{name:<14} {algo:<5} {devices:>3} x 80 GiB  peak {gib(peak):>7} GiB in {phase!r:<16} "
                       f"{'fits' if plan.fits() else 'does NOT fit'}")
    print("\nsummary (budget 72 GiB = 0.9 x 80):\n" + "\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
