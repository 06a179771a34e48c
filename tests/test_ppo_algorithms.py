"""Issue 12 end to end: the new algorithm flags in a PPO run on the mesh, DAPO's batch refill, and OpenRLHF 0.11's
dotted flag spellings (command line and YAML) with its DeepSpeed-only flags accepted and reported."""
import json
import math

import numpy as np
import pytest

from jaxrlhf.cli import parse_config
from jaxrlhf.ppo import PPOConfig, main
from jaxrlhf.ppo_setup import Batch, collect_batch
from jaxrlhf.rollout.client import Rollout
from jaxrlhf.train.metrics import PhaseTimer
from tests.test_ppo import make_cfg, read_log, setup  # noqa: F401 (the module fixture)

ALGORITHM_FLAGS = dict(
    advantage_estimator="group_norm", policy_loss_type="gspo", is_correction_level="token", is_correction_mode="clip",
    is_correction_threshold=(0.5, 2.0), use_kl_loss=True, kl_unbiased_gradient=True, kl_estimator="k3",
    dynamic_filtering=True, dynamic_filtering_max_rounds=1, overlong_buffer_len=1.0, stop_properly_penalty_coef=0.5,
    critic_learning_rate=1e-3)


def test_new_algorithms_on_two_meshes(setup):  # noqa: F811
    """GSPO + TIS + the unbiased-gradient KL loss + dynamic filtering + both length penalties, sequence-mean
    aggregation: the run logs what each part did, and 4x2 and 8x1 meshes give the same losses."""
    runs = {}
    for mesh in ("4x2", "8x1"):
        out = main(make_cfg(setup, f"algo{mesh}", mesh=mesh, **ALGORITHM_FLAGS))
        runs[mesh] = read_log(out["log"])
    first = runs["4x2"][0]
    for key in ("is/filtered_frac", "is/ratio_max", "is/ratio_min", "is/rollout_kl", "dynamic_filtering/pass_rate",
                "dynamic_filtering/rounds", "penalty/overlong_frac", "penalty/truncated_frac", "reward/raw",
                "actor/kl_loss"):
        assert key in first and math.isfinite(first[key]), key
    assert 0 <= first["is/filtered_frac"] <= 1 and first["is/ratio_min"] <= 1.0 + 1e-6 <= first["is/ratio_max"] + 2e-6
    # generate_max_len 3, buffer 1: every 3-token answer is penalised, the truncated ones (3 tokens) among them
    assert first["penalty/overlong_frac"] >= first["penalty/truncated_frac"] and first["reward"] <= first["reward/raw"]
    for a, b in zip(runs["4x2"], runs["8x1"]):
        for key in ("reward", "actor/loss", "actor/kl_loss", "is/filtered_frac"):
            assert a[key] == pytest.approx(b[key], rel=2e-3, abs=2e-4), key


def _batch(rewards_per_group, n, round_index):
    """A fake generated batch: one prompt per group, rows of ones, the rewards as given."""
    g = len(rewards_per_group)
    seqs = np.ones((g * n, 3), np.int32)
    rollout = Rollout(seqs, seqs.copy(), np.zeros((g * n, 2), np.float32), np.zeros(g * n, np.int32), prompt_len=1)
    return Batch([f"r{round_index}p{i}" for i in range(g)], [None] * g, rollout, np.full(g * n, round_index))


def test_dynamic_filtering_refills_the_batch_hand_counted():
    rounds = [[[0, 0], [1, 0], [1, 1], [0, 0]],  # round 0 keeps group 1 only
              [[0, 1], [1, 1], [0, 1], [1, 0]]]  # round 1 keeps groups 0, 2, 3
    scores = {}

    def next_batch(r):
        b = _batch(rounds[r], 2, r)
        scores[id(b)] = np.array(rounds[r], np.float32).reshape(-1)
        return b

    batch, reward, _, m = collect_batch(next_batch, lambda b: (scores[id(b)], {}), n=2, groups=4,
                                        dynamic_range=(0.0, 1.0), max_rounds=3, pad_id=0, timer=PhaseTimer())
    assert batch.prompts == ["r0p1", "r1p0", "r1p2", "r1p3"]
    np.testing.assert_array_equal(reward, [1, 0, 0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(batch.version, [0, 0, 1, 1, 1, 1, 1, 1])
    assert m == {"dynamic_filtering/rounds": 2, "dynamic_filtering/dropped_groups": 4,
                 "dynamic_filtering/pass_rate": 0.5, "dynamic_filtering/refilled_groups": 0}
    # out of rounds: the kept groups first, then dropped ones fill the batch
    batch, reward, _, m = collect_batch(next_batch, lambda b: (scores[id(b)], {}), n=2, groups=4,
                                        dynamic_range=(0.0, 1.0), max_rounds=0, pad_id=0, timer=PhaseTimer())
    assert batch.prompts == ["r0p1", "r0p0", "r0p2", "r0p3"] and m["dynamic_filtering/refilled_groups"] == 3


OPENRLHF_LINE = (
    "--actor.model_name_or_path {model} --reward.remote_url {reward} --data.prompt_dataset {data} "
    "--data.input_key question --data.label_key answer --rollout.batch_size 8 --rollout.n_samples_per_prompt 2 "
    "--rollout.micro_batch_size 2 --train.batch_size 16 --train.micro_batch_size 1 --rollout.max_new_tokens 3 "
    "--algo.advantage.estimator group_norm --algo.kl.init_coef 0 --actor.policy_loss_type gspo "
    "--actor.adam.lr 5e-7 --algo.advantage.is_correction_enable --algo.advantage.is_correction_type icepop "
    "--algo.dynamic_filtering_enable --algo.dynamic_filtering_range 0 1 --ds.param_dtype bf16 "
    "--ds.zero_stage 3 --ds.adam_offload --ds.attn_implementation flash_attention_2 --actor.num_nodes 1 "
    "--vllm.sync_with_ray --ckpt.output_dir {out} --ckpt.path {out}/ckpt --dry_run")


def test_openrlhf_launch_line_parses_and_dry_runs(setup, capsys, tmp_path):  # noqa: F811
    argv = OPENRLHF_LINE.format(model=setup / "model", reward=setup / "reward.py", data=setup / "prompts.jsonl",
                                out=tmp_path).split()
    cfg = parse_config(PPOConfig, argv)
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if "ignored" in line]
    assert len(notices) == 1 and "--ds.zero_stage" in notices[0] and "--vllm.sync_with_ray" in notices[0]
    assert (cfg.pretrain, cfg.rollout_batch_size, cfg.train_batch_size, cfg.policy_loss_type) == (
        str(setup / "model"), 8, 16, "gspo")
    assert cfg.bf16 and cfg.actor_learning_rate == 5e-7 and cfg.dynamic_filtering
    assert (cfg.is_correction_level, cfg.is_correction_mode, cfg.is_correction_gating) == ("token", "mask", "ratio")
    assert cfg.agg_mode == "seq-mean-token-mean"
    out = main(cfg)
    assert out.get("dry_run")


def test_dotted_names_in_yaml_nested_and_flat(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({"actor": {"policy_loss_type": "gspo", "eps_clip": 0.3},
                                "algo.advantage.is_correction_level": "seq", "ds": {"zero_stage": 3},
                                "rollout": {"batch_size": 4}}))
    cfg = parse_config(PPOConfig, ["--config", str(path), "--rollout.batch_size", "2"])
    assert (cfg.policy_loss_type, cfg.eps_clip, cfg.is_correction_level, cfg.rollout_batch_size) == (
        "gspo", 0.3, "seq", 2)
    assert "--ds.zero_stage" in capsys.readouterr().err
    path.write_text(json.dumps({"actor": {"policy_loss_typo": "gspo"}}))
    with pytest.raises(SystemExit):
        parse_config(PPOConfig, ["--config", str(path)])
    assert "actor.policy_loss_typo" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--is_correction_level", "seq", "--is_correction_mode", "clip"], "needs --is_correction_level token"),
    (["--is_correction_threshold", "2", "1"], "LOW <= HIGH"),
    (["--kl_unbiased_gradient"], "add --use_kl_loss"),
    (["--dynamic_filtering"], "--n_samples_per_prompt >= 2"),
    (["--overlong_buffer_len", "5000"], "--overlong_buffer_len must be in"),
    (["--partial_rollout"], "add --async_train"),
    (["--ds.param_dtype", "fp16"], "invalid bool value"),
])
def test_bad_algorithm_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(PPOConfig, flags)
    assert e.value.code == 2 and message in capsys.readouterr().err
