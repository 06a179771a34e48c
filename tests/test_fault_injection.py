"""Fault injection through the real command lines (slow tier): SIGKILL a conversion or a trainer mid-write.

- The converter CLI (``python -m converters``), both directions (HF safetensors export, Orbax converted checkpoint),
  over a directory holding an earlier good conversion: killed at each named step of the directory swap
  (``converters.atomic._at``) and at random instants of its ``main``.
- The SFT trainer: killed at random instants of its final export over a ``--save_path`` holding an earlier run's
  model, logs and checkpoints, and at random instants while it saves checkpoints every step.

Afterwards the output is exactly the previous good model or a complete new one (it loads; a model directory is
never a mixture or half-written), nothing incomplete looks complete (unfinished work sits only under hidden
``.NAME.partial-PID-*`` names, or as ``STEP.incomplete-*`` checkpoint steps), and the next run cleans up (no
sibling left) and succeeds. tests/test_atomic_export.py does the same on ``export_hf`` itself, step by step.
"""
from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.tiny import char_model, save_tiny, write_additions

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs a CLI in this process with optional kill hooks: KILL_AT=<atomic step> dies there; "started" is printed when
# the CLI's main begins and "exporting" when an export begins, so the parent can kill at a random instant after.
WRAPPER = r"""
import os, signal, sys
from converters import atomic, hf
kill = os.environ.get("KILL_AT")
if kill:
    atomic._at = lambda point: point == kill and os.kill(os.getpid(), signal.SIGKILL)
if os.environ.get("NO_EXCHANGE"):  # the two-rename fallback (no renameat2): old -> .old-*, new -> DST
    atomic.exchange = lambda a, b: False
for name in ("export_hf", "save_flax"):
    def traced(*a, _orig=getattr(hf, name), **k):
        print("exporting", flush=True)
        return _orig(*a, **k)
    setattr(hf, name, traced)
entry = sys.argv[1]
if entry == "converters":
    from converters.__main__ import main as cli
else:
    from jaxrlhf.sft import cli
print("started", flush=True)
sys.exit(cli(sys.argv[2:]))
"""
SWAP_STEPS = ("written", "before_swap", "between_renames", "swapped", "carrying", "trashed")


def launch(entry: str, argv: list[str], kill_at: str | None = None, no_exchange: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "NO_EXCHANGE": "1" if no_exchange else ""}
    if kill_at:
        env["KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, "-c", WRAPPER, entry, *argv], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(entry: str, argv: list[str], *, kill_at: str | None = None, kill_after: tuple[str, float] | None = None,
        no_exchange: bool = False):
    """Run to the end, or SIGKILL ``kill_after[1]`` seconds after the line ``kill_after[0]``; the exit code."""
    proc = launch(entry, argv, kill_at, no_exchange)
    if kill_after is not None:
        marker, delay = kill_after
        for line in proc.stdout:
            if line.strip() == marker:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode in (0, -signal.SIGKILL), (proc.returncode, err[-3000:])
    return proc.returncode


def siblings(path) -> list[str]:
    parent, name = os.path.split(str(path))
    return sorted(glob.glob(os.path.join(parent, f".{name}.*")))


def hf_tensors(path) -> dict:
    out = {}
    for fn in glob.glob(os.path.join(path, "*.safetensors")):
        out.update(load_file(fn))
    return out


def flax_params(path) -> dict:
    import jax
    from flax import nnx

    from converters import hf

    model, _, _ = hf.load(str(path))
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model).to_pure_dict())[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_models")
    for name, seed in (("a", 0), ("b", 1)):
        save_tiny("llama3", root / name, seed=seed)
    return root


@pytest.mark.parametrize("command, no_exchange", [("flax-to-hf", False), ("hf-to-flax", False), ("flax-to-hf", True)])
def test_converter_killed_anywhere_keeps_the_previous_conversion(two_models, tmp_path, command, no_exchange):
    """``no_exchange``: the swap is two renames; a kill between them leaves no DST, and the next run puts the
    previous conversion (moved aside as ``.out.old-*``) back before anything else."""
    read = hf_tensors if command == "flax-to-hf" else flax_params
    a, b = str(two_models / "a"), str(two_models / "b")
    dst = tmp_path / "out"
    extra = ["--max_shard_size", "40KB"] if command == "flax-to-hf" else []
    assert run("converters", ["--quiet", command, a, str(dst), *extra]) == 0
    want = {"a": read(a if command == "flax-to-hf" else dst), "b": None}
    rng = random.Random(16)
    kills = [("at", s) for s in SWAP_STEPS] + [("after", rng.uniform(0.0, 0.4)) for _ in range(4)]
    outcomes = set()
    for how, where in kills:
        args = ["--quiet", command, b, str(dst), "--overwrite", *extra]
        code = run("converters", args, kill_at=where, no_exchange=no_exchange) if how == "at" else \
            run("converters", args, kill_after=("exporting", where), no_exchange=no_exchange)
        if not dst.exists():  # killed between the fallback's two renames: recover() restores the previous one
            assert no_exchange and where == "between_renames", (how, where)
            from converters.atomic import recover

            assert any("restored the previous" in r for r in recover(str(dst))), siblings(dst)
        got = read(dst)  # loads: complete, whichever it is
        if want["b"] is None and not same(got, want["a"]):
            want["b"] = got
        assert same(got, want["a"]) or same(got, want["b"]), (how, where, code)
        outcomes.add((code, "a" if same(got, want["a"]) else "b"))
        assert all(".partial-" in s or ".old-" in s or ".trash-" in s for s in siblings(dst)), siblings(dst)
        # the next run cleans up and puts A back
        assert run("converters", ["--quiet", command, a, str(dst), "--overwrite", *extra]) == 0
        assert siblings(dst) == [] and same(read(dst), want["a"]), (how, where)
    assert {(-signal.SIGKILL, "a"), (-signal.SIGKILL, "b")} <= outcomes, outcomes  # killed before and after the swap


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_sft")
    char_model(root / "model")
    write_additions(root / "add.jsonl", n=8)
    return root


def sft_args(root, save, ckpt, *more) -> list[str]:
    return ["--pretrain", str(root / "model"), "--dataset", str(root / "add.jsonl"), "--input_key", "input",
            "--output_key", "output", "--max_len", "16", "--train_batch_size", "16", "--micro_train_batch_size", "2",
            "--mesh", "4x2", "--learning_rate", "1e-3", "--save_path", str(save), "--ckpt_path", str(ckpt), *more]


def test_sft_killed_during_its_final_export_keeps_the_previous_model(sft_setup, tmp_path):
    save = tmp_path / "save"
    assert run("sft", sft_args(sft_setup, save, tmp_path / "ck0", "--max_steps", "1")) == 0
    first = hf_tensors(save)
    extras = sorted(p for p in os.listdir(save) if not p.endswith((".safetensors", ".json")))
    rng = random.Random(7)
    kept = []
    for i, delay in enumerate([0.0, *(rng.uniform(0.0, 0.5) for _ in range(2))]):
        code = run("sft", sft_args(sft_setup, save, tmp_path / f"ck{i + 1}", "--max_steps", "2", "--seed", str(i)),
                   kill_after=("exporting", delay))
        got = hf_tensors(save)
        assert sorted(got) == sorted(first), (delay, code)  # a complete model: the first or the new one
        kept.append(code == -signal.SIGKILL and same(got, first))
        import transformers

        transformers.AutoModelForCausalLM.from_pretrained(str(save))  # loads
        assert set(extras) <= set(os.listdir(save)), (extras, os.listdir(save))  # logs/, the plot survive
    assert any(kept), "no kill landed before the swap: the test checked nothing"
    assert run("sft", sft_args(sft_setup, save, tmp_path / "ck_last", "--max_steps", "1")) == 0
    assert siblings(save) == []


def test_sft_killed_while_checkpointing_resumes_from_a_finished_step(sft_setup, tmp_path):
    from jaxrlhf.train.checkpoint import Checkpointer

    save, ckpt = tmp_path / "save", tmp_path / "ckpt"
    args = sft_args(sft_setup, save, ckpt, "--save_steps", "1", "--max_epochs", "3", "--load_checkpoint")
    rng = random.Random(3)
    killed = 0
    for _ in range(2):  # killed at a random instant once checkpoints are being written (one every step)
        proc = launch("sft", args)
        while not glob.glob(str(ckpt / "[0-9]*")) and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
        killed += proc.returncode == -signal.SIGKILL
        with Checkpointer(ckpt) as c:  # incomplete steps are set aside, never taken for finished ones
            last = c.latest_step()
            if last is not None:
                assert c.read_meta(last)["step"] == last
    assert killed, "every run finished before the kill: the test checked nothing"
    assert run("sft", args) == 0  # resumes from the last finished step and completes
    with Checkpointer(ckpt) as c:
        assert c.latest_step() == 12  # 64 rows * 3 epochs / 16
    assert not glob.glob(str(ckpt / "*tmp*")), os.listdir(ckpt)  # no half-written Orbax temporaries left
    assert siblings(save) == [] and glob.glob(str(save / "*.safetensors"))
