"""The bad-input suite: every kind of wrong input a new user gives the command lines, run through the real CLIs.

One table of (case id, entry point, argv, expected message fragment). Each call must exit with code 2, print
exactly one error line that names the bad input (the fragment), print no traceback, and leave nothing behind
where its outputs would go (every case writes under its own ``out/<id>``, or at an existing path that must stay
as it was). The calls run as forked children of one process that imported the entry points once
(``tests.cli_runner.run_clis_forked``): a subprocess per call would pay the 3-5 s jax/transformers import ~100
times. ``test_table_counts`` prints the tally (tried / clear / traceback / silent) for the record.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import struct

import pytest

from tests.cli_runner import run_clis_forked
from tests.tiny import save_tiny

ENTRIES = {
    "sft": "jaxrlhf.sft:cli", "rm": "jaxrlhf.rm:cli", "dpo": "jaxrlhf.dpo:cli", "kto": "jaxrlhf.kto:cli",
    "ppo": "jaxrlhf.ppo:cli", "conv": "converters.__main__:main", "server": "scripts.reward_server_example:main",
}
SMALL = "--max_len 16 --train_batch_size 16 --micro_train_batch_size 2"
GOOD = {  # a valid command line per trainer (what each bad case then spoils)
    "sft": f"--pretrain {{M}} --dataset {{ADD}} --input_key input --output_key output {SMALL}",
    "rm": f"--pretrain {{M}} --dataset {{PREF}} {SMALL}",
    "dpo": f"--pretrain {{M}} --dataset {{PREF}} {SMALL}",
    "kto": f"--pretrain {{M}} --dataset {{KTO}} --input_key input --output_key output {SMALL}",
    "ppo": "--pretrain {M} --prompt_data {PROMPTS} --input_key question --label_key answer --remote_rm_url {REWARD} "
           "--prompt_max_len 4 --generate_max_len 3 --rollout_batch_size 8 --n_samples_per_prompt 2 "
           "--micro_rollout_batch_size 2 --train_batch_size 8 --micro_train_batch_size 1 --max_steps 1",
    "conv": "", "server": "",
}
TRAINERS = ("sft", "rm", "dpo", "kto", "ppo")
PRELOAD = ("jax", "flax.nnx", "optax", "orbax.checkpoint", "transformers", "datasets", "converters.hf",
           "jaxrlhf.data.tokenizer", "jaxrlhf.data.sources", "jaxrlhf.train.run", "jaxrlhf.train.checkpoint",
           "jaxrlhf.train.metrics", "jaxrlhf.ppo_setup", "jaxrlhf.rewards", "sharding.distributed")

# (id, entry, argv added to GOOD[entry], fragment of the one error line). {X} are the paths of `files` below;
# {OUT} is this case's own output location.
CASES = [
    # ---- flags and YAML: the shared parser (jaxrlhf/cli.py), every trainer
    *[(f"{t}-unknown-flag", t, "--learning_rat 1e-3", "unrecognized argument --learning_rat") for t in TRAINERS],
    *[(f"{t}-yaml-not-utf8", t, "--config {YAML_LATIN1}", "--config {YAML_LATIN1}: line 2 is not UTF-8")
      for t in TRAINERS],
    ("sft-abbreviated-flag", "sft", "--pretra {M}", "unrecognized argument --pretra"),
    ("sft-bad-int", "sft", "--train_batch_size abc", "argument --train_batch_size: invalid int value: 'abc'"),
    ("sft-bad-float", "sft", "--learning_rate fast", "argument --learning_rate: invalid float value: 'fast'"),
    ("sft-bad-bool", "sft", "--bf16 maybe", "argument --bf16: invalid bool value: 'maybe'"),
    ("sft-bad-choice", "ppo", "--advantage_estimator nope", "argument --advantage_estimator: invalid choice: 'nope'"),
    ("sft-stray-value", "sft", "stray", "unexpected value(s) 'stray'"),
    ("sft-yaml-missing", "sft", "--config {NOPE}/c.yaml", "--config {NOPE}/c.yaml: no such file"),
    ("sft-yaml-invalid", "sft", "--config {YAML_BROKEN}", "--config {YAML_BROKEN}: not valid YAML"),
    ("sft-yaml-list", "sft", "--config {YAML_LIST}", "expected a mapping of field names to values, got list"),
    ("sft-yaml-unknown-key", "sft", "--config {YAML_UNKNOWN}",
     "unknown key 'learnin_rate'; did you mean 'learning_rate'?"),
    ("sft-yaml-wrong-type", "sft", "--config {YAML_TYPE}", "key 'train_batch_size': invalid int value: 'many'"),
    ("sft-yaml-null", "sft", "--config {YAML_NULL}", "key 'max_epochs': null is not allowed"),
    ("sft-zero-batch", "sft", "--train_batch_size 0", "--train_batch_size must be >= 1, got 0"),
    ("sft-zero-micro", "sft", "--micro_train_batch_size 0", "--micro_train_batch_size must be >= 1, got 0"),
    ("sft-save-steps-0", "sft", "--save_steps 0", "--save_steps must be a positive number of steps or -1"),
    ("sft-one-beta", "sft", "--adam_betas 0.9", "--adam_betas takes two numbers"),
    ("sft-template", "sft", "--input_template Q:", "--input_template 'Q:' has no '{{}}' placeholder"),
    ("ppo-zero-train-batch", "ppo", "--train_batch_size 0", "--train_batch_size must be >= 1, got 0"),
    ("ppo-zero-micro-rollout", "ppo", "--micro_rollout_batch_size 0", "--micro_rollout_batch_size must be >= 1"),
    ("ppo-negative-rollout", "ppo", "--rollout_batch_size -4 --dry_run", "--rollout_batch_size must be >= 1"),
    ("ppo-zero-samples", "ppo", "--n_samples_per_prompt 0", "--n_samples_per_prompt must be >= 1"),
    ("ppo-bad-rollout-dtype", "ppo", "--vllm_dtype fp8", "argument --vllm_dtype: invalid choice: 'fp8'"),
    # ---- impossible meshes, indivisible batches
    ("sft-mesh-words", "sft", "--mesh foo", "mesh 'foo' is not understood"),
    ("sft-mesh-zero", "sft", "--mesh 0x2", "mesh '0x2'"),
    ("sft-mesh-axis-twice", "sft", "--mesh fsdp=2,fsdp=2", "axis 'fsdp' given twice"),
    ("ppo-mesh-words", "ppo", "--mesh 4y2", "mesh '4y2' is not understood"),
    ("sft-mesh-too-big", "sft", "--mesh 4x3", "mesh 4x3 needs 12 devices, 8 available"),  # conftest: 8 devices
    ("ppo-mesh-too-big", "ppo", "--mesh 2x2x4", "mesh 2x2x4 needs 16 devices, 8 available"),
    ("sft-indivisible", "sft", "--train_batch_size 20", "--train_batch_size 20"),
    ("rm-indivisible", "rm", "--train_batch_size 10 --micro_train_batch_size 1", "--train_batch_size 10"),
    ("ppo-indivisible", "ppo", "--rollout_batch_size 3", "--rollout_batch_size"),
    # ---- --pretrain: missing, path-like (never tried on the hub), broken model directories
    *[(f"{t}-pretrain-missing", t, "--pretrain {NOPE}/model", "{NOPE}/model' does not exist") for t in TRAINERS],
    ("sft-pretrain-slashes", "sft", "--pretrain no/such/model", "'no/such/model' does not exist"),
    ("ppo-pretrain-relative", "ppo", "--pretrain ./no_such_model", "'./no_such_model' does not exist"),
    ("sft-pretrain-file", "sft", "--pretrain {ADD}", "{ADD}"),
    ("sft-pretrain-empty-dir", "sft", "--pretrain {EMPTY_DIR}", "{EMPTY_DIR} has no config.json"),
    *[(f"{t}-config-missing-key", t, "--pretrain {NO_HIDDEN}",
       "{NO_HIDDEN}/config.json has no 'hidden_size' key") for t in ("sft", "rm", "dpo", "kto", "ppo")],
    ("sft-config-bad-json", "sft", "--pretrain {BAD_JSON}", "{BAD_JSON}/config.json is not valid JSON"),
    ("ppo-config-bad-json", "ppo", "--pretrain {BAD_JSON}", "{BAD_JSON}/config.json"),
    ("sft-config-wrong-type", "sft", "--pretrain {STR_LAYERS}", "'num_hidden_layers' must be a positive integer"),
    ("ppo-config-wrong-type", "ppo", "--pretrain {STR_LAYERS}", "num_hidden_layers"),
    ("sft-unknown-model-type", "sft", "--pretrain {GPT2}", "unsupported model_type 'gpt2'"),
    ("sft-pickle-only", "sft", "--pretrain {PICKLE}", "{PICKLE} holds only pickle checkpoint files"),
    ("sft-truncated-safetensors", "sft", "--pretrain {TRUNCATED}", "{TRUNCATED}/model.safetensors"),
    # ---- datasets
    ("sft-data-missing", "sft", "--dataset {NOPE}/d.jsonl", "dataset path '{NOPE}/d.jsonl' does not exist"),
    ("sft-data-empty", "sft", "--dataset {EMPTY_JSONL}", "dataset '{EMPTY_JSONL}' is empty"),
    ("sft-data-malformed", "sft", "--dataset {MALFORMED}", "dataset '{MALFORMED}': line 2 is not valid JSON"),
    ("sft-data-not-objects", "sft", "--dataset {NOT_OBJECTS}", "dataset '{NOT_OBJECTS}': record 0 is a str"),
    ("sft-data-not-utf8", "sft", "--dataset {DATA_LATIN1}", "dataset '{DATA_LATIN1}': line 2 is not UTF-8"),
    ("sft-data-suffix", "sft", "--dataset {YAML_LIST}", "has suffix '.yaml'"),
    ("sft-data-wrong-key", "sft", "--input_key question", "question"),
    ("rm-data-wrong-key", "rm", "--chosen_key better", "better"),
    ("kto-data-wrong-key", "kto", "--input_key prompt", "prompt"),
    ("ppo-data-not-utf8", "ppo", "--prompt_data {DATA_LATIN1}", "dataset '{DATA_LATIN1}': line 2 is not UTF-8"),
    ("ppo-data-wrong-key", "ppo", "--input_key prompt", "prompt"),
    ("ppo-no-reward", "ppo", "--remote_rm_url none", "no reward: pass --reward_pretrain"),
    ("ppo-reward-bad-url", "ppo", "--remote_rm_url ftp://host/x", "'ftp://host/x' is neither a .py reward file"),
    ("ppo-reward-file-missing", "ppo", "--remote_rm_url {NOPE}/reward.py", "{NOPE}/reward.py"),
    # ---- outputs: files in the way, existing, unwritable
    *[(f"{t}-save-path-is-file", t, "--save_path {A_FILE}", "{A_FILE} is a file: pass a directory as --save_path")
      for t in TRAINERS],
    ("sft-ckpt-path-is-file", "sft", "--ckpt_path {A_FILE}", "{A_FILE} is a file: pass a directory as --ckpt_path"),
    ("ppo-ckpt-path-is-file", "ppo", "--ckpt_path {A_FILE}", "{A_FILE} is a file: pass a directory as --ckpt_path"),
    ("sft-save-path-under-file", "sft", "--save_path {A_FILE}/out",
     "--save_path {A_FILE}/out: {A_FILE} is a file, so no directory can be made under it"),
    ("ppo-save-path-under-file", "ppo", "--save_path {A_FILE}/out", "{A_FILE} is a file, so no directory can be made"),
    ("sft-save-path-unwritable", "sft", "--save_path {UNWRITABLE}/out", "--save_path {UNWRITABLE}/out: cannot write"),
    ("sft-ckpt-path-unwritable", "sft", "--ckpt_path {UNWRITABLE}/ckpt", "--ckpt_path {UNWRITABLE}/ckpt: cannot write"),
    # ---- the converter CLI
    ("conv-no-args", "conv", "", "the following arguments are required: command"),
    ("conv-bad-command", "conv", "hf-to-jax {M} {OUT}", "invalid choice: 'hf-to-jax'"),
    ("conv-abbreviated", "conv", "flax-to-hf {M} {OUT} --dtyp bf16", "unrecognized arguments: --dtyp"),
    ("conv-abbreviated-overwrite", "conv", "hf-to-flax {M} {OUT} --over", "unrecognized arguments: --over"),
    ("conv-bad-dtype", "conv", "flax-to-hf {M} {OUT} --dtype int8", "unknown dtype 'int8'"),
    ("conv-bad-head", "conv", "hf-to-flax {M} {OUT} --head value", "argument --head: invalid choice: 'value'"),
    ("conv-mesh-words", "conv", "hf-to-flax {M} {OUT} --mesh foo", "mesh 'foo' is not understood"),
    ("conv-shard-size-0", "conv", "flax-to-hf {M} {OUT} --max_shard_size 0", "max_shard_size '0' is below one byte"),
    ("conv-shard-size-unit", "conv", "flax-to-hf {M} {OUT} --max_shard_size 5XB",
     "max_shard_size '5XB' is not a size: write a number and a unit, e.g. 5GB or 500MB (units: GB, MB, KB, GiB"),
    ("conv-src-missing", "conv", "hf-to-flax {NOPE}/m {OUT}", "{NOPE}/m does not exist"),
    ("conv-src-empty-dir", "conv", "hf-to-flax {EMPTY_DIR} {OUT}", "{EMPTY_DIR} has no config.json"),
    ("conv-config-missing-key", "conv", "hf-to-flax {NO_HIDDEN} {OUT}",
     "{NO_HIDDEN}/config.json has no 'hidden_size' key"),
    ("conv-config-bad-json", "conv", "flax-to-hf {BAD_JSON} {OUT}", "{BAD_JSON}/config.json is not valid JSON"),
    ("conv-config-not-object", "conv", "flax-to-hf {JSON_LIST} {OUT}", "{JSON_LIST}/config.json holds a JSON list"),
    ("conv-config-wrong-type", "conv", "hf-to-flax {STR_LAYERS} {OUT}", "'num_hidden_layers' must be a positive"),
    ("conv-unknown-model-type", "conv", "hf-to-flax {GPT2} {OUT}", "unsupported model_type 'gpt2'"),
    ("conv-pickle-only", "conv", "hf-to-flax {PICKLE} {OUT}", "{PICKLE} holds only pickle checkpoint files"),
    ("conv-truncated", "conv", "hf-to-flax {TRUNCATED} {OUT}", "{TRUNCATED}/model.safetensors"),
    ("conv-bad-offsets", "conv", "hf-to-flax {BAD_OFFSETS} {OUT}", "{BAD_OFFSETS}/model.safetensors"),
    ("conv-index-outside", "conv", "hf-to-flax {INDEX_OUTSIDE} {OUT}", "outside {INDEX_OUTSIDE}: refused"),
    ("conv-index-bad-json", "conv", "hf-to-flax {INDEX_BAD} {OUT}", "is not a valid safetensors index"),
    ("conv-dst-exists", "conv", "flax-to-hf {M} {EXISTING}", "{EXISTING} already exists: choose a new path or pass "
                                                             "--overwrite"),
    ("conv-dst-is-file", "conv", "flax-to-hf {M} {A_FILE} --overwrite", "{A_FILE} is a file, not a directory"),
    ("conv-dst-under-file", "conv", "hf-to-flax {M} {A_FILE}/out", "{A_FILE} is a file, so no directory can be made"),
    ("conv-dst-unwritable", "conv", "flax-to-hf {M} {UNWRITABLE}/out", "{UNWRITABLE}/out: cannot write in"),
    ("conv-gguf-missing", "conv", "gguf-to-hf {NOPE}/m.gguf {OUT}", "{NOPE}/m.gguf"),
    ("conv-gguf-not-gguf", "conv", "gguf-to-hf {ADD} {OUT}", "{ADD}"),
    # ---- the example reward server
    ("server-file-missing", "server", "--reward_file {NOPE}/reward.py --port 0", "{NOPE}/reward.py"),
    ("server-no-reward-func", "server", "--reward_file {NO_FUNC} --port 0", "must define `def reward_func"),
    ("server-bad-port", "server", "--reward_file {REWARD} --port http", "argument --port: invalid int value"),
    ("server-abbreviated", "server", "--reward_file {REWARD} --tok x", "unrecognized arguments: --tok"),
    ("server-bad-host", "server", "--reward_file {REWARD} --host 192.0.2.1 --port 0", "cannot listen on 192.0.2.1:0"),
    ("server-bad-limits", "server", "--reward_file {REWARD} --port 0 --max_workers 0", "max_workers >= 1"),
]


def _write(path, data: bytes | str) -> str:
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode) as f:
        f.write(data)
    return str(path)


def _model_variant(root, model, name: str, *, config=None, weights: str | None = "keep") -> str:
    """A copy of the tiny model directory with its config.json replaced (dict, or raw text) and/or weights spoiled."""
    path = root / name
    shutil.copytree(model, path)
    if config is not None:
        _write(path / "config.json", config if isinstance(config, str) else json.dumps(config))
    if weights == "pickle":
        os.replace(path / "model.safetensors", path / "pytorch_model.bin")
    elif weights == "truncated":
        data = (path / "model.safetensors").read_bytes()
        _write(path / "model.safetensors", data[: len(data) // 2])
    elif weights == "bad_offsets":  # a header promising a 4 GiB tensor in a 16-byte file
        header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [1 << 15, 1 << 15],
                                                           "data_offsets": [0, 1 << 32]}}).encode()
        _write(path / "model.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 16)
    elif weights in ("index_outside", "index_bad"):
        os.replace(path / "model.safetensors", path / "model-00001-of-00001.safetensors")
        index = ({"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}} if weights == "index_outside"
                 else "{not json")
        _write(path / "model.safetensors.index.json", index if isinstance(index, str) else json.dumps(index))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from jaxrlhf.data.tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("bad_input")
    model = root / "model"
    save_tiny("llama3", model, vocab_size=32, max_position_embeddings=64)
    build_tiny_tokenizer(str(model), list("0123456789+=abcdevwxyz:"))
    cfg = json.loads((model / "config.json").read_text())
    rows = [{"input": f"{a}+{b}=", "output": str(a + b)} for a in range(8) for b in range(8)]
    pref = [{"chosen": "a" * (1 + i % 4), "rejected": "v" * (1 + i % 3)} for i in range(64)]
    kto = [{"input": "a:", "output": "b" * (1 + i % 3), "label": i % 2 == 0} for i in range(64)]
    prompts = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(4)]
    jsonl = lambda rs: "".join(json.dumps(r) + "\n" for r in rs)  # noqa: E731
    f = {
        "M": str(model),
        "ADD": _write(root / "add.jsonl", jsonl(rows)),
        "PREF": _write(root / "pref.jsonl", jsonl(pref)),
        "KTO": _write(root / "kto.jsonl", jsonl(kto)),
        "PROMPTS": _write(root / "prompts.jsonl", jsonl(prompts)),
        "REWARD": _write(root / "reward.py", "def reward_func(queries, prompts, labels):\n"
                                             "    return [0.0] * len(queries)\n"),
        "NO_FUNC": _write(root / "no_func.py", "x = 1\n"),
        "NOPE": str(root / "does_not_exist"),
        "EMPTY_DIR": str(root / "empty_dir"),
        "A_FILE": _write(root / "a_file", "not a directory\n"),
        "EXISTING": str(root / "existing_model"),
        "UNWRITABLE": str(root / "read_only") if os.geteuid() != 0 else "/sys/jaxrlhf_bad_input",
        "YAML_LATIN1": _write(root / "latin1.yaml", "seed: 1\nwandb_run_name: caf\xe9\n".encode("latin-1")),
        "YAML_BROKEN": _write(root / "broken.yaml", "seed: [1\nmax_epochs: 2\n"),
        "YAML_LIST": _write(root / "list.yaml", "- seed\n- 1\n"),
        "YAML_UNKNOWN": _write(root / "unknown.yaml", "learnin_rate: 0.1\n"),
        "YAML_TYPE": _write(root / "type.yaml", "train_batch_size: many\n"),
        "YAML_NULL": _write(root / "null.yaml", "max_epochs: null\n"),
        "EMPTY_JSONL": _write(root / "empty.jsonl", ""),
        "MALFORMED": _write(root / "malformed.jsonl", '{"input": "1+1=", "output": "2"}\n{"input": \n'),
        "NOT_OBJECTS": _write(root / "lists.jsonl", '["1+1=", "2"]\n'),
        "DATA_LATIN1": _write(root / "latin1.jsonl", (jsonl(rows[:1]) + '{"input": "caf\xe9", "question": "caf\xe9", '
                                                      '"output": "1"}\n').encode("latin-1")),
        "NO_HIDDEN": _model_variant(root, model, "no_hidden", config={k: v for k, v in cfg.items()
                                                                       if k != "hidden_size"}),
        "BAD_JSON": _model_variant(root, model, "bad_json", config='{"model_type": "llama",'),
        "JSON_LIST": _model_variant(root, model, "json_list", config="[1, 2]"),
        "STR_LAYERS": _model_variant(root, model, "str_layers", config={**cfg, "num_hidden_layers": "2"}),
        "GPT2": _model_variant(root, model, "gpt2", config={**cfg, "model_type": "gpt2"}),
        "PICKLE": _model_variant(root, model, "pickle_only", weights="pickle"),
        "TRUNCATED": _model_variant(root, model, "truncated", weights="truncated"),
        "BAD_OFFSETS": _model_variant(root, model, "bad_offsets", weights="bad_offsets"),
        "INDEX_OUTSIDE": _model_variant(root, model, "index_outside", weights="index_outside"),
        "INDEX_BAD": _model_variant(root, model, "index_bad", weights="index_bad"),
    }
    os.makedirs(f["EMPTY_DIR"])
    _write(root / "outside.safetensors", b"")
    shutil.copytree(model, f["EXISTING"])
    if os.geteuid() != 0:
        os.makedirs(f["UNWRITABLE"])
        os.chmod(f["UNWRITABLE"], 0o555)
    os.makedirs(root / "out")
    return root, f


def _argv(entry: str, extra: str, paths: dict) -> list[str]:
    argv = shlex.split(GOOD[entry].format(**paths)) + shlex.split(extra.format(**paths))
    if entry in TRAINERS and "--save_path" not in extra:
        argv += ["--save_path", paths["OUT"]]
    if entry in TRAINERS and "--ckpt_path" not in extra:
        argv += ["--ckpt_path", os.path.join(paths["OUT"], "ckpt")]
    return argv


def _snapshot(root) -> dict[str, int]:
    """Every path under the fixture directory with its size (directories: -1), minus the call logs."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = -1
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            out[os.path.relpath(p, root)] = os.path.getsize(p)
    return {k: v for k, v in out.items() if not k.startswith("calls")}


@pytest.fixture(scope="module")
def results(files):
    root, paths = files
    calls_dir = root / "calls"
    calls_dir.mkdir()
    before = _snapshot(root)
    calls = []
    for case_id, entry, extra, _ in CASES:
        p = {**paths, "OUT": str(root / "out" / case_id)}
        calls.append({"entry": ENTRIES[entry], "argv": _argv(entry, extra, p), "cwd": str(root),
                      "env": {"HF_HUB_OFFLINE": "0"}})  # a path must fail by itself, not because the hub is off
    got = run_clis_forked(calls, str(calls_dir), preload=PRELOAD)
    return dict(zip([c[0] for c in CASES], got)), before, _snapshot(root)


def _verdict(code: int, out: str, err: str, fragment: str) -> str:
    """clear / traceback / silent (exit 0) / unclear (anything else: wrong code, no or several error lines)."""
    text = out + err
    if "Traceback (most recent call last)" in text:
        return "traceback"
    if code == 0:
        return "silent"
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    return "clear" if code == 2 and len(lines) == 1 and fragment in lines[0] else "unclear"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, results, files):
    root, paths = files
    case_id, entry, _, fragment = case
    code, out, err = results[0][case_id]
    fragment = fragment.format(**{**paths, "OUT": str(root / "out" / case_id)})
    verdict = _verdict(code, out, err, fragment)
    assert verdict == "clear", f"{case_id}: {verdict} (exit {code}); want one error line with {fragment!r}:\n{err}"
    left = sorted(k for k in set(results[2]) - set(results[1]) if case_id in k or k.startswith("out"))
    assert not left, f"{case_id} left {left}"


def test_nothing_left_behind_and_inputs_unchanged(results):
    """No case created, removed or changed anything in the fixture directory (outputs, temporaries, inputs)."""
    _, before, after = results
    assert after == before


def test_table_counts(results, files, capsys):
    root, paths = files
    tally = {"clear": 0, "traceback": 0, "silent": 0, "unclear": 0}
    for case_id, _, _, fragment in CASES:
        code, out, err = results[0][case_id]
        tally[_verdict(code, out, err, fragment.format(**{**paths, "OUT": str(root / "out" / case_id)}))] += 1
    with capsys.disabled():
        print(f"\nbad-input table: tried {len(CASES)} / clear {tally['clear']} / traceback {tally['traceback']} / "
              f"silent {tally['silent']} / unclear {tally['unclear']}")
    assert tally["clear"] == len(CASES)


@pytest.mark.slow
def test_ppo_against_a_reward_server_that_wants_a_token(files, tmp_path):
    """A real PPO start (slow tier): without the token the run stops at the first reward request with one line naming
    the URL, HTTP 401 and JAXRLHF_RM_TOKEN; with --remote_rm_token it trains; no empty outputs either way."""
    import threading

    from tests.test_rewards_remote import server_module

    root, paths = files
    server = server_module.RewardServer(server_module.load_reward_func(paths["REWARD"]), quiet=True, token="tok")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        p = {**paths, "REWARD": server.url}
        calls = [{"entry": ENTRIES["ppo"], "argv": _argv("ppo", extra, {**p, "OUT": str(tmp_path / name)}),
                  "env": {"JAXRLHF_RM_TOKEN": ""}} for name, extra in (("no_token", ""),
                                                                         ("token", "--remote_rm_token tok"))]
        (no_token, ok) = run_clis_forked(calls, str(tmp_path), preload=PRELOAD, timeout_s=300)
    finally:
        server.shutdown()
        server.server_close()
    assert _verdict(*no_token, f"reward server {server.url} rejected the request with HTTP 401") == "clear", no_token
    assert "JAXRLHF_RM_TOKEN" in no_token[2]
    assert not (tmp_path / "no_token").exists()  # the failed run left no empty checkpoint directory or log
    assert ok[0] == 0, ok[2][-3000:]
    assert (tmp_path / "token" / "logs" / "metrics.jsonl").exists()
