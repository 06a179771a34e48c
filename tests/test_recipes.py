"""The generation recipes learn (slow tier): on the built-in addition task (jaxrlhf/demo.py: an SFT model that says
the right sum about 30% of the time, a verifier reward.py), a rejection-sampling round (generate 8 -> rs -> SFT)
and 3 iterations of online iterative DPO each raise the sampled accuracy well above the start.

Measured on 2 CPU cores (JAX sampler, seed 42): rs round 0.271 -> 0.603; iterative DPO 0.274 (iteration 0's
samples) -> 0.600 -> 0.646 -> 0.712 (after the third update). Both tests together take about a minute (the demo model is built once, ~45 s).
"""
import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from jaxrlhf import demo
    from jaxrlhf.ppo import PPOConfig
    from sharding import make_mesh

    cfg = demo.prepare(PPOConfig(demo_dir=str(tmp_path_factory.mktemp("demo")), mesh="4x2"), make_mesh("4x2"))
    return {"policy": cfg.pretrain, "prompts": cfg.prompt_data, "reward": cfg.remote_rm_url}


def sampled_accuracy(task, policy, out_dir) -> float:
    """Mean verifier reward of 8 samples per prompt over the 100 prompts (batch_inference generate, then rm)."""
    from jaxrlhf.batch_inference import BatchInferenceConfig, main

    main(BatchInferenceConfig(eval_task="generate", pretrain=policy, dataset=task["prompts"], label_key="label",
                              best_of_n=8, max_new_tokens=3, prompt_max_len=4, mesh="4x2",
                              output_path=str(out_dir / "gen.jsonl")))
    return main(BatchInferenceConfig(eval_task="rm", dataset=str(out_dir / "gen.jsonl"), remote_rm_url=task["reward"],
                                     output_path=str(out_dir / "scored.jsonl")))["reward_mean"]


def test_rejection_sampling_round_raises_accuracy(task, tmp_path):
    from jaxrlhf.batch_inference import BatchInferenceConfig
    from jaxrlhf.batch_inference import main as batch_inference
    from jaxrlhf.sft import SFTConfig
    from jaxrlhf.sft import main as sft

    (tmp_path / "before").mkdir()
    before = sampled_accuracy(task, task["policy"], tmp_path / "before")
    batch_inference(BatchInferenceConfig(eval_task="rm", dataset=str(tmp_path / "before" / "gen.jsonl"),
                                         remote_rm_url=task["reward"], post_processor="rs",
                                         output_path=str(tmp_path / "rs.jsonl")))
    rows = [json.loads(line) for line in open(tmp_path / "rs.jsonl")]
    assert len(rows) == 100 and sum(r["reward"] for r in rows) >= 80  # the best of 8 is mostly right
    sft(SFTConfig(pretrain=task["policy"], dataset=str(tmp_path / "rs.jsonl"), max_len=8,
                  train_batch_size=16, micro_train_batch_size=4, max_epochs=3, learning_rate=5e-4,
                  lr_warmup_ratio=0.0, mesh="4x2", save_path=str(tmp_path / "sft"),
                  ckpt_path=str(tmp_path / "sft" / "checkpoints")))
    (tmp_path / "after").mkdir()
    after = sampled_accuracy(task, str(tmp_path / "sft"), tmp_path / "after")
    print(f"rejection sampling round: sampled accuracy {before:.3f} -> {after:.3f}")
    assert before < 0.4 and after > before + 0.15


def test_iterative_dpo_three_iterations_raise_accuracy(task, tmp_path):
    from jaxrlhf.iterative_dpo import IterativeDPOConfig, main

    out = main(IterativeDPOConfig(
        pretrain=task["policy"], prompt_data=task["prompts"], label_key="label", remote_rm_url=task["reward"],
        best_of_n=8, rollout_batch_size=100, num_iterations=3, generate_max_len=3, prompt_max_len=4, max_len=8,
        train_batch_size=16, micro_train_batch_size=4, max_epochs=2, learning_rate=5e-4, lr_warmup_ratio=0.0,
        beta=0.1, nll_loss_coef=1.0, mesh="4x2", save_path=str(tmp_path / "run")))
    accuracy = [r["accuracy"] for r in out["iterations"]] + [out["final"]["accuracy"]]
    print("iterative DPO, sampled accuracy per iteration: " + " -> ".join(f"{a:.3f}" for a in accuracy))
    assert accuracy[0] < 0.4 and accuracy[-1] > accuracy[0] + 0.2
    assert all(r["pairs"] > 50 for r in out["iterations"])
