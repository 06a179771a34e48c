"""iterative_dpo: the per-iteration files and statistics, a run killed in its second iteration and resumed equals
the uninterrupted run, and bad flags (exit 2, one line)."""
import json
import os

import numpy as np
import pytest

from jaxrlhf.iterative_dpo import IterativeDPOConfig, cli, main

# A reward with spread on a random model's samples: the count of '1's in the response, plus a little for length.
REWARD = '''
def reward_func(queries, prompts, labels):
    responses = [q[len(p):] for q, p in zip(queries, prompts)]
    return {"rewards": [r.count("1") + 0.1 * len(r) for r in responses],
            "extra_logs": {"accuracy": [float(r.strip() == l) for r, l in zip(responses, labels)]}}
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from jaxrlhf.data.tokenizer import build_tiny_tokenizer
    from jaxrlhf.demo import CHARS, save_tiny_llama

    root = tmp_path_factory.mktemp("idpo")
    model = str(root / "model")
    save_tiny_llama(model, build_tiny_tokenizer(model, CHARS), seed=0)
    with open(root / "prompts.jsonl", "w") as f:
        for a in range(6):
            f.write(json.dumps({"input": f"{a}+{a}=", "label": str(2 * a)}) + "\n")
    (root / "reward.py").write_text(REWARD)
    return root


def config(root, save, **kw):
    base = dict(pretrain=str(root / "model"), prompt_data=str(root / "prompts.jsonl"), label_key="label",
                remote_rm_url=str(root / "reward.py"), best_of_n=4, rollout_batch_size=4, num_iterations=2,
                generate_max_len=4, prompt_max_len=8, max_len=16, train_batch_size=4, micro_train_batch_size=1,
                max_epochs=2, learning_rate=1e-3, lr_warmup_ratio=0.0, beta=0.5, final_eval=False,
                save_path=str(save), mesh="4x2", seed=1)
    return IterativeDPOConfig(**{**base, **kw})


def weights(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_killed_in_the_second_iteration_and_resumed_equals_uninterrupted(setup, monkeypatch):
    full = main(config(setup, setup / "full"))
    rows = full["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1]
    for k, r in enumerate(rows):
        samples = [json.loads(x) for x in open(setup / "full" / f"iter_{k}" / "samples.jsonl")]
        pairs = [json.loads(x) for x in open(setup / "full" / f"iter_{k}" / "pairs.jsonl")]
        assert len(samples) == 16 and r["num_samples"] == 16 and r["pairs"] == len(pairs)
        assert r["pairs"] + r["dropped_equal"] == 4 and "accuracy" in r and "dpo/loss" in r
        assert {s["prompt_index"] for s in samples} == {(4 * k + j) % 6 for j in range(4)}  # the next prompts
        assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    # the policy moved: iteration 1's model differs from the start
    start, end = weights(str(setup / "model")), weights(full["policy"])
    assert any(not np.array_equal(start[k], end[k]) for k in start)

    import jaxrlhf.train.supervised as supervised

    real, calls = supervised.fit, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after iteration 1 sampled and scored
        return real(*a, **k)

    monkeypatch.setattr(supervised, "fit", dying)
    with pytest.raises(KeyboardInterrupt):
        main(config(setup, setup / "resumed"))
    monkeypatch.setattr(supervised, "fit", real)
    with pytest.raises(ValueError, match="--load_checkpoint"):
        main(config(setup, setup / "resumed"))
    resumed = main(config(setup, setup / "resumed", load_checkpoint=True))
    strip = [{k: v for k, v in r.items() if k not in ("policy", "settings")} for r in resumed["iterations"]]
    assert strip == [{k: v for k, v in r.items() if k not in ("policy", "settings")} for r in rows]
    a, b = weights(full["policy"]), weights(resumed["policy"])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="--best_of_n: then 4, now 3"):  # finished iterations are not mixed
        main(config(setup, setup / "resumed", load_checkpoint=True, best_of_n=3, num_iterations=3))


def test_bad_flags_exit_2_with_one_line(setup, tmp_path, capsys):
    base = ["--pretrain", str(setup / "model"), "--prompt_data", str(setup / "prompts.jsonl"),
            "--save_path", str(tmp_path / "x")]
    for extra, message in ((["--remote_rm_url", "r.py", "--best_of_n", "1"], "needs --best_of_n >= 2"),
                           ([], "no reward")):
        with pytest.raises(SystemExit) as e:
            cli(base + extra)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert cli(base + ["--remote_rm_url", str(setup / "reward.py"), "--label_key", "answer", "--mesh", "4x2"]) == 2
    err = capsys.readouterr().err
    assert "error: key 'answer' not in dataset" in err and "Traceback" not in err


def test_on_a_vllm_engine_synced_by_broadcast_after_each_update(setup, monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    pytest.importorskip("ray", reason="Ray is not installed")
    from jaxrlhf.rollout.vllm_pool import VLLMPool

    real, synced = VLLMPool.update_weights, []

    def spy(self, named):
        synced.append(1)
        return real(self, named)

    monkeypatch.setattr(VLLMPool, "update_weights", spy)
    out = main(config(setup, setup / "vllm", vllm_num_engines=1, vllm_kv_cache_mb=64, final_eval=True))
    assert [r["iteration"] for r in out["iterations"]] == [0, 1] and len(synced) == 2  # after each update
    assert out["final"]["num_samples"] == 16 and os.path.exists(setup / "vllm" / "iter_2" / "samples.jsonl")


def test_lora_policy_syncs_merged_weights_to_the_sampler(setup):
    """--lora_rank: each iteration trains adapters on the previous (merged) policy; the sampler gets the merged
    weights after every update (hf_entries refuses unmerged adapters), and each iteration's export is a plain model
    that moved."""
    out = main(config(setup, setup / "lora", lora_rank=4, lora_alpha=8.0, learning_rate=5e-3, max_epochs=1))
    assert [r["iteration"] for r in out["iterations"]] == [0, 1]
    first, second = (weights(setup / "lora" / f"iter_{k}" / "model") for k in (0, 1))
    base = weights(setup / "model")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not any("lora" in n for n in first) and np.abs(first[name] - base[name]).max() > 1e-6
    assert np.abs(second[name] - first[name]).max() > 1e-6
