"""jaxrlhf.train: optimizer + schedule, metrics sinks, Orbax checkpoints (8 fake CPU devices from conftest)."""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf.train.checkpoint import Checkpointer, abstract_like, to_jsonable
from jaxrlhf.train.metrics import MetricsLogger, PhaseTimer, plot_metrics, read_metrics, to_float
from jaxrlhf.train.optim import cast_floating, make_optimizer, warmup_cosine_schedule

AUTO2 = (jax.sharding.AxisType.Auto,) * 2


# ---------------------------------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------------------------------


def test_schedule_hand_computed() -> None:
    # total 100, warmup ratio 0.05 -> W = ceil(5.0) = 5; peak 1e-3; min 1e-4.
    sched = warmup_cosine_schedule(learning_rate=1e-3, total_steps=100, warmup_ratio=0.05, min_lr_ratio=0.1)
    expected = {
        0: 0.0,
        2: 4e-4,  # 1e-3 * 2/5
        5: 1e-3,  # end of warmup: p = 0
        # p = 47.5/95 = 0.5 is not an integer step; step 52: p = 47/95
        52: 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 47 / 95)),
        100: 1e-4,  # p = 1 -> min lr
        250: 1e-4,  # past the end: stays at min lr (clipped, unlike transformers)
    }
    for step, lr in expected.items():
        assert float(sched(step)) == pytest.approx(lr, rel=1e-5, abs=1e-12), step
    # at the exact mid-point of a decay (W = 0, total 10, step 5) the cosine factor is 0.5: lr = 0.1 + 0.9 * 0.5
    sched2 = warmup_cosine_schedule(learning_rate=1.0, total_steps=10, warmup_ratio=0.0, min_lr_ratio=0.1)
    assert float(sched2(5)) == pytest.approx(0.55, rel=1e-6)
    assert float(sched2(0)) == pytest.approx(1.0, rel=1e-6)
    # ceil: ratio 0.03 of 10 steps still gives one warmup step
    sched3 = warmup_cosine_schedule(learning_rate=1.0, total_steps=10, warmup_ratio=0.03)
    assert float(sched3(0)) == 0.0 and float(sched3(1)) == pytest.approx(1.0)


def test_schedule_matches_transformers_cosine_with_min_lr() -> None:
    torch = pytest.importorskip("torch")
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    total, ratio, lr, min_ratio = 37, 0.1, 3e-4, 0.1
    warmup = math.ceil(total * ratio)  # how OpenRLHF calls it
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ref = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_ratio)
    ours = warmup_cosine_schedule(learning_rate=lr, total_steps=total, warmup_ratio=ratio, min_lr_ratio=min_ratio)
    for step in range(total + 1):
        assert float(ours(step)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-5, abs=1e-12), step
        opt.step()
        ref.step()


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "norm": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        "scalar": jnp.asarray(1.5, jnp.float32),
    }


def test_no_weight_decay_on_1d_params() -> None:
    params = _params()
    lr, wd = 0.1, 0.5
    tx, _ = make_optimizer(learning_rate=lr, total_steps=10, warmup_ratio=0.0, weight_decay=wd)
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)  # Adam term is 0/(0+eps) = 0: only decay moves anything
    updates, _ = tx.update(zero, state, params)
    np.testing.assert_allclose(updates["w"], -lr * wd * np.asarray(params["w"]), rtol=1e-6)
    for k in ("norm", "b", "scalar"):
        np.testing.assert_array_equal(updates[k], 0.0)


def _numpy_adamw(params, grads_seq, *, lr_fn, b1, b2, eps, wd, max_norm):
    """Reference AdamW with global-norm clipping and a 2-D-only decay mask, in float64 NumPy."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads_seq):
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
        scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
        lr = lr_fn(t)
        for k in p:
            gk = g[k] * scale
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk**2
            mh = m[k] / (1 - b1 ** (t + 1))
            vh = v[k] / (1 - b2 ** (t + 1))
            decay = wd * p[k] if p[k].ndim >= 2 else 0.0
            p[k] = p[k] - lr * (mh / (np.sqrt(vh) + eps) + decay)
    return p, m


def test_adamw_steps_match_numpy_reference() -> None:
    params = _params()
    rng = np.random.default_rng(1)
    grads_seq = [{k: rng.normal(size=np.shape(v)) * (20.0 if t == 0 else 0.1) for k, v in params.items()}
                 for t in range(4)]  # step 0 is clipped (norm >> 1), later ones are not
    kw = dict(learning_rate=1e-2, total_steps=8, warmup_ratio=0.25, min_lr_ratio=0.1)
    tx, sched = make_optimizer(**kw, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_norm=1.0)
    state = tx.init(params)
    p = params
    for g in grads_seq:
        updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    ref_lr = lambda t: float(sched(t))  # schedule itself is checked above
    ref, _ = _numpy_adamw(params, grads_seq, lr_fn=ref_lr, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, max_norm=1.0)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_grad_clipping_scales_first_moment() -> None:
    params = _params()
    g = {k: jnp.full(np.shape(v), 2.0, jnp.float32) for k, v in params.items()}
    norm = math.sqrt(4.0 * sum(np.size(v) for v in params.values()))  # 2 * sqrt(#elements) = 2 * sqrt(19)
    for max_norm, scale in [(1.0, 1.0 / norm), (100.0, 1.0), (None, 1.0)]:
        tx, _ = make_optimizer(learning_rate=1e-3, total_steps=10, max_norm=max_norm)
        _, state = tx.update(g, tx.init(params), params)
        adam = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
        assert len(adam) == 1
        # mu after one step = (1 - b1) * clipped g = 0.1 * 2 * scale
        np.testing.assert_allclose(adam[0].mu["w"], 0.1 * 2.0 * scale, rtol=1e-6)


def test_optimizer_state_fp32_and_bf16_params_rejected() -> None:
    params = _params()
    tx, _ = make_optimizer(learning_rate=1e-3, total_steps=10)
    state = tx.init(params)
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    bf16 = cast_floating(params, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"fp32 master weights, found \['b'\] \(bfloat16\).*and 1 more.*cast_floating"):
        tx.init(bf16)


def test_cast_floating_keeps_integers() -> None:
    tree = {"x": jnp.ones(3, jnp.float32), "ids": jnp.arange(3), "flag": jnp.array(True), "py": 3}
    out = cast_floating(tree, jnp.bfloat16)
    assert out["x"].dtype == jnp.bfloat16 and out["ids"].dtype == tree["ids"].dtype
    assert out["flag"].dtype == jnp.bool_ and out["py"] == 3


def test_optimizer_argument_errors() -> None:
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        make_optimizer(learning_rate=1e-3, total_steps=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        make_optimizer(learning_rate=1e-3, total_steps=5, warmup_ratio=1.5)
    with pytest.raises(ValueError, match="betas"):
        make_optimizer(learning_rate=1e-3, total_steps=5, betas=(0.9, 1.0))


# ---------------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------------


def _tfrecord_scalars(path) -> dict[str, list[tuple[int, float]]]:
    """Parse a TensorBoard event file (TFRecord framing: u64 len, u32 crc, data, u32 crc) -> {tag: [(step, v)]}."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
        pos += 12 + n + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_metrics_jsonl_tensorboard_and_plot(tmp_path) -> None:
    tb_dir = tmp_path / "tb"
    with MetricsLogger(tmp_path, use_tensorboard=str(tb_dir), total_steps=3, enabled=True, config={"a": 1}) as ml:
        ml.log(1, {"reward": jnp.float32(0.5), "kl": np.float32(0.25), "loss": 2})
        ml.log(2, {"reward": jnp.asarray([0.75]), "kl": 0.125, "loss": jnp.asarray(1.5, jnp.bfloat16)})
        ml.log(3, {"reward": 1.0, "kl": float("nan"), "extra/step_time": 0.3})
        # flushed line by line: readable before close
        assert len(read_metrics(tmp_path / "metrics.jsonl")) == 3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    recs = [json.loads(line) for line in lines]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[0]["reward"] == 0.5 and recs[0]["kl"] == 0.25 and recs[0]["loss"] == 2.0
    assert recs[1]["reward"] == 0.75 and recs[1]["loss"] == 1.5
    assert math.isnan(recs[2]["kl"]) and recs[2]["extra/step_time"] == 0.3 and "loss" not in recs[2]
    assert all(isinstance(r["time"], float) for r in recs)

    events = [f for f in os.listdir(tb_dir) if f.startswith("events.out.tfevents")]
    assert len(events) == 1
    scalars = _tfrecord_scalars(tb_dir / events[0])
    assert scalars["reward"] == [(1, 0.5), (2, 0.75), (3, 1.0)]
    assert [s for s, _ in scalars["kl"]] == [1, 2, 3]

    png = plot_metrics(tmp_path / "metrics.jsonl", ["reward", "kl", "missing"], tmp_path / "plots" / "m.png")
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])  # IHDR
    assert width == 700 and height == 720  # figsize (7, 2.4 * 3) at 100 dpi
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[:2] == (720, 700)
    assert os.listdir(png.parent) == ["m.png"]  # the temporary file was renamed, none left behind


def test_metrics_disabled_and_errors(tmp_path, monkeypatch) -> None:
    off = MetricsLogger(tmp_path / "off", enabled=False)
    off.log(1, {"reward": 1.0})
    off.close()
    assert not (tmp_path / "off").exists()
    with MetricsLogger(tmp_path, enabled=True, show_progress=False) as ml:
        with pytest.raises(TypeError, match=r"metric 'v' must be a scalar.*shape \(3,\)"):
            ml.log(1, {"v": jnp.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            ml.log(1, {"step": 1})
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing was logged: no empty log is left behind
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metric records"):
        plot_metrics(tmp_path / "metrics.jsonl", ["v"], tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RuntimeError, match="pip install wandb"):
        MetricsLogger(tmp_path, use_wandb=True, enabled=True, show_progress=False)
    assert to_float("x", np.int64(3)) == 3.0


def test_metrics_wandb_calls(tmp_path, monkeypatch) -> None:
    """W&B wiring against a stand-in module (wandb is not installed here): login with a key, init, log, finish."""
    import types

    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(
        login=lambda key: calls.append(("login", key)),
        init=lambda **kw: (calls.append(("init", kw)), Run())[1],
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(tmp_path, use_wandb="KEY123", wandb_project="p", wandb_run_name="r", config={"lr": 1.0},
                       enabled=True, show_progress=False) as ml:
        ml.log(5, {"reward": np.float32(0.5)})
    assert calls[0] == ("login", "KEY123")
    assert calls[1][0] == "init" and calls[1][1]["project"] == "p" and calls[1][1]["name"] == "r"
    assert calls[1][1]["config"] == {"lr": 1.0}
    assert calls[2] == ("log", {"reward": 0.5}, 5) and calls[3] == ("finish",)
    calls.clear()
    MetricsLogger(tmp_path, use_wandb=True, enabled=True, show_progress=False).close()  # True: no login
    assert [c[0] for c in calls] == ["init", "finish"]


def test_phase_timer() -> None:
    timer = PhaseTimer()
    with timer("generate"):
        time.sleep(0.02)
    with timer("train"):
        time.sleep(0.01)
    with timer("generate"):
        time.sleep(0.02)
    assert set(timer.seconds) == {"generate", "train"}
    assert 0.04 <= timer.seconds["generate"] < 0.5 and 0.01 <= timer.seconds["train"] < 0.5
    assert set(timer.metrics()) == {"time/generate", "time/train"}
    timer.reset()
    assert timer.seconds == {}


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------------

SPECS = {"w": P("fsdp", "tensor"), "emb": P("tensor", "fsdp"), "norm": P("tensor"), "step": P()}


def _mesh(shape):
    return jax.make_mesh(shape, ("fsdp", "tensor"), axis_types=AUTO2)


def _host_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(16, 8)).astype(np.float32),
        "emb": rng.normal(size=(8, 24)).astype(np.float32),
        "norm": rng.normal(size=(8,)).astype(np.float32),
        "step": np.asarray(7, np.int32),
    }


def _sharded(host, mesh):
    return {"params": {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in host.items() if k != "step"},
            "step": jax.device_put(host["step"], NamedSharding(mesh, P()))}


def _target(mesh):
    host = _host_state()
    return abstract_like(
        {"params": {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items() if k != "step"},
         "step": jax.ShapeDtypeStruct((), np.int32)},
        {"params": {k: NamedSharding(mesh, SPECS[k]) for k in host if k != "step"}, "step": NamedSharding(mesh, P())},
    )


def test_checkpoint_resharded_restore_and_meta(tmp_path, monkeypatch) -> None:
    host = _host_state()
    state = _sharded(host, _mesh((4, 2)))
    assert len(state["params"]["w"].sharding.device_set) == 8
    meta = {
        "data_position": 12,
        "kl_coef": np.float32(0.05),
        "rng": jax.random.key_data(jax.random.key(3)),
        "reward_stats": {"mean": 0.1, "var": 2.0, "count": 5},
        "config": {"mesh": "4x2", "probs": (0.5, 0.5), "pretrain": None, "bf16": True},
    }
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((str(a), str(b))), real_rename(a, b))[1])
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=3)
    ckpt.save(10, state, meta)
    for leaf in jax.tree_util.tree_leaves(state):  # async save copied to host already: buffers may be reused now
        leaf.delete()
    assert ckpt.latest_step() == 10
    # atomic: the step was written under a temporary name and renamed into place
    step_dir = str(tmp_path / "ckpt" / "10")
    assert any(b == step_dir and ".orbax-checkpoint-tmp" in a for a, b in renames), renames

    for shape in [(1, 8), (8, 1), (4, 2)]:
        mesh = _mesh(shape)
        restored, meta_back = ckpt.restore(10, _target(mesh))
        for k, v in restored["params"].items():
            np.testing.assert_array_equal(np.asarray(v), host[k], err_msg=f"{shape} {k}")
            assert v.sharding == NamedSharding(mesh, SPECS[k]), (shape, k, v.sharding)
        assert int(restored["step"]) == 7 and restored["step"].dtype == jnp.int32
    assert meta_back == to_jsonable(meta)
    assert meta_back["kl_coef"] == pytest.approx(0.05) and meta_back["config"]["probs"] == [0.5, 0.5]
    assert np.array_equal(np.asarray(meta_back["rng"], np.uint32), np.asarray(jax.random.key_data(jax.random.key(3))))
    ckpt.close()


def test_checkpoint_max_to_keep_and_half_written_steps(tmp_path) -> None:
    mesh = _mesh((4, 2))
    root = tmp_path / "ckpt"
    ckpt = Checkpointer(root, max_to_keep=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step, _sharded(_host_state(step), mesh), {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    assert sorted(p.name for p in root.iterdir() if p.name.isdigit()) == ["3", "4"]
    ckpt.close()

    # A killed save leaves either Orbax's temporary directory or (non-atomic filesystems, copies cut short) a step
    # directory without the commit marker. Neither may become "latest".
    (root / "9.orbax-checkpoint-tmp-1700000000").mkdir()
    (root / "9.orbax-checkpoint-tmp-1700000000" / "state").mkdir()
    (root / "7" / "state").mkdir(parents=True)
    (root / "7" / "state" / "partial").write_bytes(b"\0" * 10)
    ckpt = Checkpointer(root, max_to_keep=2)
    assert ckpt.latest_step() == 4
    assert not (root / "9.orbax-checkpoint-tmp-1700000000").exists()  # a killed save's temporary is deleted
    assert not (root / "7").exists() and any(p.name.startswith("7.incomplete-") for p in root.iterdir())
    # one appearing after start-up is ignored too, and saving that step number still works
    (root / "8" / "state").mkdir(parents=True)
    assert ckpt.latest_step() == 4
    ckpt.save(8, _sharded(_host_state(8), mesh), {"step": 8})
    assert ckpt.latest_step() == 8 and ckpt.all_steps() == [4, 8]
    restored, meta = ckpt.restore(8, _target(_mesh((2, 4))))
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), _host_state(8)["w"])
    assert meta == {"step": 8}
    with pytest.raises(ValueError, match="step 8 already exists"):
        ckpt.save(8, _sharded(_host_state(8), mesh), {})
    with pytest.raises(FileNotFoundError, match=r"no finished checkpoint step 3 .*finished steps: \[4, 8\]"):
        ckpt.restore(3, _target(mesh))
    ckpt.close()
    assert Checkpointer(tmp_path / "empty", max_to_keep=1).latest_step() is None


def test_checkpoint_restore_mismatch_errors(tmp_path) -> None:
    mesh = _mesh((4, 2))
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=1)
    ckpt.save(1, _sharded(_host_state(), mesh), {})
    target = _target(mesh)

    bad_shape = dict(target, params=dict(target["params"]))
    bad_shape["params"]["w"] = jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=NamedSharding(mesh, SPECS["w"]))
    with pytest.raises(ValueError, match=r"key params/w: checkpoint shape \(16, 8\) != target shape \(16, 4\)"):
        ckpt.restore(1, bad_shape)

    extra = dict(target, params=dict(target["params"]))
    extra["params"]["bias"] = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=NamedSharding(mesh, P()))
    with pytest.raises(ValueError, match="keys in the target but not in the checkpoint: params/bias"):
        ckpt.restore(1, extra)

    missing = dict(target, params={k: v for k, v in target["params"].items() if k != "emb"})
    with pytest.raises(ValueError, match="keys in the checkpoint but not in the target: params/emb"):
        ckpt.restore(1, missing)

    no_sharding = dict(target, step=jax.ShapeDtypeStruct((), jnp.int32))
    with pytest.raises(ValueError, match=r"\['step'\] has no sharding"):
        ckpt.restore(1, no_sharding)

    with pytest.raises(TypeError, match=r"meta\['obj'\]: object is not JSON-able"):
        ckpt.save(2, _sharded(_host_state(), mesh), {"obj": object()})
    ckpt.close()


_WORKER = textwrap.dedent(
    """
    import os, sys
    pid, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxrlhf.train.checkpoint import Checkpointer, abstract_like

    AUTO = (jax.sharding.AxisType.Auto,) * 2
    full = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    m42 = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=AUTO)
    w = jax.make_array_from_callback(full.shape, NamedSharding(m42, P("fsdp", "tensor")), lambda idx: full[idx])
    assert not w.is_fully_addressable
    ck = Checkpointer(root, max_to_keep=2)
    assert ck.latest_step() is None, ck.latest_step()  # the half-written step 9 does not count
    for step in (1, 2, 3):
        ck.save(step, {"w": w}, {"step": step})
    assert ck.all_steps() == [2, 3], ck.all_steps()
    for shape in [(8, 1), (1, 8), (2, 4)]:
        sharding = NamedSharding(jax.make_mesh(shape, ("fsdp", "tensor"), axis_types=AUTO), P("fsdp", "tensor"))
        target = abstract_like({"w": jax.ShapeDtypeStruct(full.shape, full.dtype)}, {"w": sharding})
        out, meta = ck.restore(3, target)
        assert out["w"].sharding == sharding and meta == {"step": 3}, (out["w"].sharding, meta)
        for shard in out["w"].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
    ck.close()
    print(f"process {pid} OK", flush=True)
    """
)


def test_checkpoint_two_processes(tmp_path) -> None:
    """Two jax processes (4 CPU devices each) save a 4x2-sharded array and restore it onto 8x1, 1x8 and 2x4."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    root = tmp_path / "ckpt"
    (root / "9" / "state").mkdir(parents=True)  # a half-written step left by an earlier crash
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    repo = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(i), port, str(root)], env=env, cwd=repo,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"process {i} OK" in out, out[-3000:]
    assert sorted(p.name for p in root.iterdir() if p.name.isdigit()) == ["2", "3"]
    assert any(p.name.startswith("9.incomplete-") for p in root.iterdir())


def test_demo_run_paths_move_a_previous_demo_run_aside(tmp_path):
    """Running a built-in demo again starts a new run (the previous one moved to run.prev, replacing an older one)
    instead of refusing its checkpoints; --load_checkpoint keeps it to resume."""
    import os

    from jaxrlhf.demo import run_paths

    paths = run_paths(str(tmp_path), load_checkpoint=False)
    assert paths == {"save_path": str(tmp_path / "run"), "ckpt_path": str(tmp_path / "run" / "checkpoints")}
    for n in (1, 2):
        os.makedirs(tmp_path / "run" / "checkpoints" / str(n))
        run_paths(str(tmp_path), load_checkpoint=False)
        assert not (tmp_path / "run").exists() and os.listdir(tmp_path / "run.prev" / "checkpoints") == [str(n)]
    os.makedirs(tmp_path / "run" / "checkpoints" / "3")
    assert run_paths(str(tmp_path), load_checkpoint=True) == paths
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["3"]
