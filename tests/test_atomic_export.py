"""Atomic replacement of an exported model (converters/atomic.py), checked by killing real exports.

An export of model B over a directory holding model A plus a trainer's extras (logs, checkpoints, a plot) is killed
with SIGKILL at each named step of ``replace_dir`` and at random instants. Every time, the directory's safetensors are
exactly A's or exactly B's (tensor for tensor, never a mixture), transformers loads them, ``recover`` leaves no
sibling behind, and the extras survive unchanged.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from converters import atomic
from tests.tiny import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Exports SRC over DST (--max_shard_size 40KB: several shard files); with KILL, dies by SIGKILL at that step; with
# LOOP, alternates SRC and ALT forever (killed from outside at a random instant).
EXPORTER = r"""
import os, signal, sys
from flax import nnx
from converters import atomic, hf
dst, kill, fallback, srcs = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4:]
if kill != "-":
    atomic._at = lambda point: point == kill and os.kill(os.getpid(), signal.SIGKILL)
if fallback:
    atomic.exchange = lambda a, b: False
models = [hf.load(s)[0] for s in srcs]
print("ready", flush=True)
k = 0
while True:
    m = models[k % len(models)]
    hf.export_hf(nnx.state(m).to_pure_dict(), m.cfg, dst, head="lm", max_shard_size="40KB", overwrite=True)
    k += 1
    if len(models) == 1:
        break
"""

EXTRAS = {"logs/metrics.jsonl": b'{"step": 1}\n', "checkpoints/3/state": b"\x01\x02", "sft_metrics.png": b"png"}


def tensors(path) -> dict:
    out = {}
    for fn in glob.glob(os.path.join(path, "*.safetensors")):
        out.update(load_file(fn))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("a", 0), ("b", 1)):
        save_tiny("llama3", root / name, seed=seed)
    return str(root / "a"), str(root / "b")


def start(dst, *srcs, kill="-", fallback=False):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-c", EXPORTER, str(dst), kill, "1" if fallback else "0", *srcs],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def export(dst, *srcs, kill="-", fallback=False) -> int:
    proc = start(dst, *srcs, kill=kill, fallback=fallback)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode in (0, -signal.SIGKILL), err
    return proc.returncode


def which(path, models) -> str | None:
    """"a" or "b" when ``path`` holds exactly that model's tensors, None when it holds no model."""
    if not os.path.isdir(path) or not glob.glob(os.path.join(path, "*.safetensors")):
        return None
    got = tensors(path)
    for name, src in zip("ab", models):
        want = tensors(src)
        if sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want):
            return name
    raise AssertionError(f"{path} holds a mixture of models or a broken one: {sorted(os.listdir(path))}")


def siblings(dst) -> list[str]:
    parent, name = os.path.split(str(dst))
    return glob.glob(os.path.join(parent, f".{name}.*"))


def seed_with_a(dst, models):
    assert export(dst, models[0]) == 0
    for rel, data in EXTRAS.items():
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        with open(os.path.join(dst, rel), "wb") as f:
            f.write(data)


def assert_extras(dst):
    for rel, data in EXTRAS.items():
        with open(os.path.join(dst, rel), "rb") as f:
            assert f.read() == data, rel


@pytest.mark.parametrize("point, fallback, before, after", [
    ("written", False, "a", "a"),          # the new model is complete but not swapped in: A stays
    ("before_swap", False, "a", "a"),
    ("swapped", False, "b", "b"),          # swapped, extras not carried yet: recover carries them
    ("carrying", False, "b", "b"),         # one extra carried
    ("trashed", False, "b", "b"),          # the old model renamed to trash, not deleted
    ("between_renames", True, None, "a"),  # fallback: dst moved aside; recover restores it
    ("swapped", True, "b", "b"),
])
def test_a_kill_at_each_step_leaves_the_old_or_the_new_model(models, tmp_path, point, fallback, before, after):
    dst = str(tmp_path / "out")
    seed_with_a(dst, models)
    assert export(dst, models[1], kill=point, fallback=fallback) == -signal.SIGKILL
    assert which(dst, models) == before
    assert siblings(dst), "the killed export left nothing to recover"
    assert atomic.recover(dst)
    assert siblings(dst) == []
    assert which(dst, models) == after
    assert_extras(dst)
    assert atomic.recover(dst) == []
    transformers.AutoModelForCausalLM.from_pretrained(dst)
    # The next export over the recovered directory works and keeps the extras.
    assert export(dst, models[1]) == 0 and which(dst, models) == "b" and siblings(dst) == []
    assert_extras(dst)


def test_kills_at_random_instants(models, tmp_path):
    dst = str(tmp_path / "out")
    seed_with_a(dst, models)
    rng = random.Random(0)
    interrupted = 0
    for trial in range(5):
        proc = start(dst, models[1], models[0], fallback=trial % 2 == 1)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.2, 1.5))
        proc.kill()
        proc.wait()
        state = which(dst, models)  # checks "exactly A or exactly B" (None: the fallback's window)
        interrupted += bool(atomic.recover(dst))
        assert siblings(dst) == []
        assert which(dst, models) in ("a", "b"), state
        assert_extras(dst)
    assert interrupted >= 2, "the kills did not land inside exports: the test checked nothing"
    transformers.AutoModelForCausalLM.from_pretrained(dst)


def test_refusals_and_failures_keep_the_old_directory(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    with atomic.replace_dir(str(dst)) as tmp:  # a first export: a plain rename
        (tmp_path / tmp / "model.safetensors").write_bytes(b"old")
    assert sorted(os.listdir(dst)) == [atomic.MANIFEST, "model.safetensors"]
    with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
        with atomic.replace_dir(str(dst)):
            pass
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.replace_dir(str(dst), overwrite=True) as tmp:
            (tmp_path / tmp / "model.safetensors").write_bytes(b"new")
            raise RuntimeError("disk full")
    assert (dst / "model.safetensors").read_bytes() == b"old" and siblings(dst) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        with atomic.replace_dir(str(tmp_path / "file"), overwrite=True):
            pass
    monkeypatch.chdir(dst)
    with pytest.raises(ValueError, match="working directory"):
        with atomic.replace_dir(".", overwrite=True):
            pass
    with pytest.raises(ValueError, match="mount point"):
        with atomic.replace_dir("/", overwrite=True):
            pass


def test_a_directory_without_manifest_keeps_its_extras_and_loses_its_old_shards(tmp_path):
    dst = tmp_path / "out"
    (dst / "logs").mkdir(parents=True)
    (dst / "logs" / "metrics.jsonl").write_text("{}\n")
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "config.json", "notes.txt"):
        (dst / name).write_text(name)
    with atomic.replace_dir(str(dst), overwrite=True) as tmp:
        for name in ("model.safetensors", "config.json"):
            (tmp_path / tmp / name).write_text("new " + name)
    assert sorted(os.listdir(dst)) == [atomic.MANIFEST, "config.json", "logs", "model.safetensors", "notes.txt"]
    assert (dst / "config.json").read_text() == "new config.json"


def test_recover_leaves_a_running_export_alone(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    live = tmp_path / f".out.partial-{os.getppid()}-abc123"  # the parent (pytest's launcher) is alive
    dead = tmp_path / ".out.partial-999999999-abc124"
    live.mkdir()
    dead.mkdir()
    (tmp_path / ".other.partial-999999999-abc125").mkdir()  # another directory's sibling
    assert atomic.recover(str(dst)) == [f"deleted the unfinished {dead}"]
    assert live.is_dir() and not dead.exists() and (tmp_path / ".other.partial-999999999-abc125").is_dir()
    assert atomic.recover(str(tmp_path / "missing" / "out")) == []
