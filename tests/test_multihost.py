"""Multi-host JAX on one machine: two processes (4 CPU devices each, gloo collectives, a free local port) form one
8-device mesh, as two 4-GPU hosts would.

- the start-up machinery itself: mesh layout checks, per-process batch slices vs. the mesh, host <-> global arrays,
  process-0-only work shared with the others, host offload of cross-host arrays (fast, default suite);
- PPO: two processes on a 4x2 mesh spanning both give the losses of one process with 8 devices (the logged
  metrics JSONL), only process 0 writes logs, plots and exports, and checkpoints move between process counts in
  both directions (slow: each run starts fresh processes and compiles on 2 shared cores).

The workers are this module run as a script (``python -m tests.test_multihost ROLE ...``), outside pytest.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOSS_KEYS = ("reward", "actor/loss", "critic/loss", "kl", "return", "advantage_abs", "response_length",
             "actor/grad_norm", "critic/grad_norm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAXRLHF_", "TPU_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return env


def run_processes(role: str, args_of: list[list[str]], *, devices: int = 4, timeout: float = 900) -> list[str]:
    """Start one worker per argument list (``--process_id`` i of N), wait for all; their output, or fail with logs."""
    codes, outs, timed_out = start_processes(role, args_of, devices=devices, timeout=timeout)
    if timed_out or any(codes):
        text = "\n".join(f"---- process {i} (exit {c}) ----\n{o[-6000:]}" for i, (c, o) in enumerate(zip(codes, outs)))
        pytest.fail(f"{role} workers {'timed out after %ds' % timeout if timed_out else 'failed'}:\n{text}")
    return outs


def start_processes(role: str, args_of: list[list[str]], *, devices: int = 4, timeout: float = 900):
    """``(exit codes, outputs, timed_out)`` of one worker per argument list; workers still running at the deadline
    are killed.

    Output goes to files, not pipes: a worker blocked on a full pipe stops joining collectives and hangs the rest.
    """
    import tempfile

    logs = [tempfile.TemporaryFile("w+") for _ in args_of]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.test_multihost", role, *args], cwd=ROOT,
                              env=worker_env(devices), stdout=log, stderr=subprocess.STDOUT, text=True)
             for args, log in zip(args_of, logs)]
    deadline, timed_out = time.monotonic() + timeout, False
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    return [p.returncode for p in procs], outs, timed_out


def results(outs: list[str]) -> list[dict]:
    """The ``RESULT {json}`` line each worker printed."""
    found = []
    for o in outs:
        lines = [ln for ln in o.splitlines() if ln.startswith("RESULT ")]
        assert lines, o[-3000:]
        found.append(json.loads(lines[-1][len("RESULT "):]))
    return found


# ---------------------------------------------------------------------------------------------------------------------
# The machinery
# ---------------------------------------------------------------------------------------------------------------------


SLURM_4_NODES = {"SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[003-006]", "SLURM_NTASKS": "4",
                 "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "4"}


@pytest.mark.parametrize("flags, env, want", [
    ({}, {}, ("single process", None, 1, 0, None)),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3), {},
     ("flags", "10.0.0.1:1234", 4, 3, None)),
    ({}, {"JAXRLHF_COORDINATOR_ADDRESS": "10.0.0.9:999", "JAXRLHF_NUM_PROCESSES": "2", "JAXRLHF_PROCESS_ID": "1"},
     ("environment (JAXRLHF_COORDINATOR_ADDRESS)", "10.0.0.9:999", 2, 1, None)),
    # jax's SLURM rule: first host of the step, port 65535 - 4095 + job id % 4096; one task per node sees all GPUs
    ({}, SLURM_4_NODES, ("SLURM (srun)", f"gpu003:{123456 % 4096 + 61440}", 4, 2, None)),
    ({}, {**SLURM_4_NODES, "JAX_COORDINATOR_PORT": "7777"}, ("SLURM (srun)", "gpu003:7777", 4, 2, None)),
    # 8 tasks on one node: one GPU each
    ({}, {**SLURM_4_NODES, "SLURM_NTASKS": "8", "SLURM_STEP_NUM_NODES": "1", "SLURM_LOCALID": "5",
          "SLURM_STEP_NODELIST": "node7"}, ("SLURM (srun)", f"node7:{123456 % 4096 + 61440}", 8, 2, (5,))),
    ({}, {**SLURM_4_NODES, "SLURM_NTASKS": "1"}, ("single process", None, 1, 0, None)),  # one task: no group
    (dict(dist_init="off"), SLURM_4_NODES, ("single process", None, 1, 0, None)),
    ({}, {"OMPI_COMM_WORLD_SIZE": "4"}, ("Open MPI (jax auto-detection)", None, None, None, None)),
    (dict(dist_init="jax"), {}, ("jax auto-detection", None, None, None, None)),
    ({}, {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, ("Cloud TPU VM (jax auto-detection)", None, None, None, None)),
])
def test_resolve_launch(flags, env, want):
    from sharding.distributed import DistributedConfig, resolve_launch

    got = resolve_launch(DistributedConfig(**flags), env)
    assert (got.source, got.coordinator_address, got.num_processes, got.process_id, got.local_device_ids) == want
    assert got.multi_process == (want[0] != "single process")


@pytest.mark.parametrize("flags, env, message", [
    (dict(num_processes=4), {}, "--num_processes 4 but no process group to join"),
    (dict(num_processes=2), SLURM_4_NODES, "--num_processes 2 but SLURM (srun) says 4 processes"),
    ({}, {"JAXRLHF_COORDINATOR_ADDRESS": "h:1", "JAXRLHF_NUM_PROCESSES": "2"}, "JAXRLHF_PROCESS_ID are missing"),
    ({}, {"JAXRLHF_COORDINATOR_ADDRESS": "h", "JAXRLHF_NUM_PROCESSES": "2", "JAXRLHF_PROCESS_ID": "0"},
     "is not host:port"),
])
def test_resolve_launch_errors(flags, env, message):
    from sharding.distributed import DistributedConfig, resolve_launch

    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_launch(DistributedConfig(**flags), env)


@pytest.mark.parametrize("argv, message", [
    (["--coordinator_address", "h:1"], "--coordinator_address needs --num_processes and --process_id"),
    (["--process_id", "1"], "--process_id without --coordinator_address"),
    (["--coordinator_address", "h:1", "--num_processes", "2", "--process_id", "2"], "--process_id must be in 0..1"),
    (["--coordinator_address", "h", "--num_processes", "2", "--process_id", "0"], "'h' is not host:port"),
    (["--dist_init", "off", "--num_processes", "2"], "--dist_init off (one process) contradicts"),
])
def test_distributed_flags_are_checked_at_parse_time(argv, message, capsys):
    from jaxrlhf.cli import parse_config
    from jaxrlhf.ppo import PPOConfig

    with pytest.raises(SystemExit):
        parse_config(PPOConfig, argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("nodelist, host", [("node001", "node001"), ("node001,host2", "node001"),
                                            ("node[001-016],host2", "node001"), ("gpu[7,9-12]", "gpu7")])
def test_first_slurm_host(nodelist, host):
    from sharding.distributed import first_slurm_host

    assert first_slurm_host(nodelist) == host



def test_two_processes_form_one_mesh():
    port = free_port()
    out = results(run_processes("mechanics", [[str(port), str(i)] for i in range(2)]))
    for i, r in enumerate(out):
        assert r["process"] == i and r["process_count"] == 2 and r["devices"] == 8 and r["local_devices"] == 4
        # mesh 4x2: devices of process 0 hold fsdp rows 0-1, process 1 rows 2-3; tensor pairs never cross hosts
        assert r["mesh_processes"] == [[0, 0], [0, 0], [1, 1], [1, 1]]
        assert "tensor axis must stay inside a host" in r["bad_tensor_error"]
        assert "unequal shares" in r["unequal_error"]
        # BatchIterator's per-process slice is exactly the rows the mesh gives this process's devices
        assert r["local_rows"] == r["global_rows"][4 * i:4 * (i + 1)]
        assert r["assembled_rows"] == r["global_rows"]
        # the global view: the same host batch on both processes -> one sharded array -> every host reads it back
        assert r["doubled_sum"] == 2 * sum(range(64))
        assert r["forward_rows"] == [2.0 * x0 for x0 in range(0, 64, 4)]  # 2 x column 0 of arange(64).reshape(16, 4)
        # process 0 computes, the other receives; a failure on process 0 is reported on both
        assert r["from0"] == [1.0, 2.0, 3.0]
        assert r["from0_error"] == ("ValueError: grader down" if i == 0 else "RuntimeError")
        # offload to host memory and back, for an array split across both processes
        assert r["offloaded_device_bytes"] == 0 and r["onloaded_sum"] == sum(range(64)) * 1.0
    assert out[0]["from0_local"] == "computed" and out[1]["from0_local"] == "received"


def mechanics(port: int, pid: int) -> dict:
    from sharding.distributed import DistributedConfig, start

    launch = start(DistributedConfig(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid),
                   lambda n: 8 // n)
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxrlhf.data.loader import BatchIterator
    from sharding import BATCH, make_mesh
    from sharding.distributed import check_mesh_hosts, from_process0, global_array, host_array
    from sharding.placement import offload, on_device_bytes, onload

    assert launch.source == "flags" and launch.num_processes == 2
    out = {"process": jax.process_index(), "process_count": jax.process_count(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count()}
    mesh = make_mesh("4x2")
    check_mesh_hosts(mesh)
    out["mesh_processes"] = [[d.process_index for d in row] for row in mesh.devices[0, :, 0, :]]  # [fsdp, tensor]
    try:
        check_mesh_hosts(make_mesh("1x8"))
    except ValueError as e:
        out["bad_tensor_error"] = str(e)
    devs = jax.devices()
    try:  # 3 fsdp rows on process 0 and 1 on process 1
        check_mesh_hosts(jax.sharding.Mesh(np.array([devs[0], devs[1], devs[2], devs[4]]).reshape(1, 4, 1),
                                           ("data", "fsdp", "tensor")))
    except ValueError as e:
        out["unequal_error"] = str(e)

    # per-process batch slices (BatchIterator) line up with the mesh's batch axis
    rows = NamedSharding(mesh, P(BATCH))
    local = BatchIterator(40, 8, seed=3, process_index=jax.process_index(), process_count=2).next_batch()
    whole = BatchIterator(40, 8, seed=3).next_batch()
    assembled = jax.make_array_from_process_local_data(rows, local.astype(np.int32))
    out.update(local_rows=local.tolist(), global_rows=whole.tolist(), assembled_rows=host_array(assembled).tolist())

    # the global view used by the trainers: identical host data -> each process places its own shards
    x = np.arange(64, dtype=np.float32).reshape(16, 4)
    gx = global_array(x, rows)
    assert not gx.is_fully_addressable
    out["doubled_sum"] = float(jax.jit(lambda a: (2 * a).sum())(gx))
    from flax import nnx

    from jaxrlhf.train.steps import make_forward

    class Lin(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.eye(4, dtype=np.float32)[:, :1] * 2)

        def __call__(self, b):
            return (b["x"] @ self.w[...])[:, 0]

    graphdef, state = nnx.split(Lin())
    params = jax.device_put(state.to_pure_dict(), NamedSharding(mesh, P()))
    fwd = make_forward(graphdef, lambda m, b: m(b), params=params, mesh=mesh)
    out["forward_rows"] = np.asarray(fwd(params, {"x": x})).tolist()  # replicated output: readable everywhere

    def compute():
        out["from0_local"] = "computed"
        return np.array([1.0, 2.0, 3.0], np.float32)

    out.setdefault("from0_local", "received")
    out["from0"] = from_process0(compute, ((3,), np.float32)).tolist()

    def failing():
        raise ValueError("grader down")

    try:
        from_process0(failing, ((3,), np.float32))
    except (ValueError, RuntimeError) as e:
        out["from0_error"] = f"{type(e).__name__}: {e}" if isinstance(e, ValueError) else type(e).__name__

    host = offload({"x": gx})
    out["offloaded_device_bytes"] = on_device_bytes(host)
    out["onloaded_sum"] = float(jax.jit(lambda a: a.sum())(onload(host)["x"]))
    return out


def env_mechanics() -> dict:
    """Join the group named by the environment (--dist_init auto) and sum a cross-host array."""
    from sharding.distributed import DistributedConfig, start

    launch = start(DistributedConfig(), lambda n: 8 // n)
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sharding import BATCH, make_mesh
    from sharding.distributed import global_array

    x = global_array(np.arange(16, dtype=np.float32), NamedSharding(make_mesh("4x2"), P(BATCH)))
    return {"source": launch.source, "process": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "sum": float(jax.jit(lambda a: a.sum())(x))}


# ---------------------------------------------------------------------------------------------------------------------
# PPO across processes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Llama (character tokenizer), a tiny reward model, 16 addition prompts, the demo's verifier."""
    from jaxrlhf.demo import REWARD_PY
    from tests.tiny import char_model, save_tiny, write_addition_prompts

    root = tmp_path_factory.mktemp("multihost")
    char_model(root / "model")
    save_tiny("llama3", root / "rm", kind="score", vocab_size=32, max_position_embeddings=64, seed=1)
    write_addition_prompts(root / "prompts.jsonl")
    (root / "reward.py").write_text(REWARD_PY)
    return root


def ppo_config(root: Path, run: str, **kw) -> dict:
    """A 2-step PPO run with every role (actor, critic from the RM, reference, Flax RM + reward function)."""
    cfg = dict(mesh="4x2", pretrain=str(root / "model"), reward_pretrain=str(root / "rm"),
               remote_rm_url=str(root / "reward.py"), prompt_data=str(root / "prompts.jsonl"), input_key="question",
               label_key="answer", prompt_max_len=4, generate_max_len=3, rollout_batch_size=8,
               n_samples_per_prompt=2, micro_rollout_batch_size=2, train_batch_size=8, micro_train_batch_size=1,
               max_epochs=1, max_steps=2, actor_learning_rate=1e-3, critic_learning_rate=1e-3, init_kl_coef=0.05,
               save_steps=1, save_path=str(root / run), ckpt_path=str(root / run / "ckpt"), seed=7)
    cfg.update(kw)
    return cfg


def run_ppo_two_processes(root: Path, cfg: dict) -> None:
    path = root / f"{Path(cfg['save_path']).name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    # Each process gets its own --save_path (logs, plot, exports: process 0 only); --ckpt_path is shared.
    run_processes("ppo", [["--config", str(path), "--coordinator_address", f"127.0.0.1:{port}",
                           "--num_processes", "2", "--process_id", str(i),
                           "--save_path", cfg["save_path"] + ("" if i == 0 else "-process1")] for i in range(2)])


def run_ppo_one_process(cfg: dict) -> None:
    from jaxrlhf.ppo import PPOConfig, main

    main(PPOConfig(**cfg))


def read_log(save_path) -> list[dict]:
    return [json.loads(line) for line in open(Path(save_path) / "logs" / "metrics.jsonl")]


def assert_same_losses(a: list[dict], b: list[dict], steps: list[int], what: str) -> None:
    a, b = {r["step"]: r for r in a}, {r["step"]: r for r in b}
    for s in steps:
        for k in LOSS_KEYS:
            # gloo vs. in-process reductions may order fp32 sums differently: 1e-4 relative, as the mesh tests
            assert math.isclose(a[s][k], b[s][k], rel_tol=1e-4, abs_tol=1e-6), (what, s, k, a[s][k], b[s][k])


@pytest.fixture(scope="module")
def runs(setup):
    """The same 2-step run in 2 processes x 4 devices and in this process with 8 devices (checkpoints 1 and 2)."""
    two, one = ppo_config(setup, "two"), ppo_config(setup, "one")
    run_ppo_two_processes(setup, two)
    run_ppo_one_process(one)
    return {"two": two, "one": one}


def test_a_failure_on_process_0_stops_every_process(setup, tmp_path):
    """Process 0 fails where it works for everyone (here: creating the checkpoint directory, --ckpt_path names a
    file): both processes exit non-zero within the bound instead of process 1 waiting at a barrier forever."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    cfg = ppo_config(setup, "fail0", ckpt_path=str(blocker), max_steps=1)
    path = tmp_path / "fail0.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    t0 = time.monotonic()
    codes, outs, timed_out = start_processes("ppo", [
        ["--config", str(path), "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
         "--process_id", str(i), "--save_path", cfg["save_path"] + f"-{i}"] for i in range(2)], timeout=240)
    assert not timed_out, f"a process was still waiting after 240 s: {outs[1][-3000:]}"
    assert all(c != 0 for c in codes), (codes, outs[1][-3000:])
    assert "is a file: pass a directory as --ckpt_path" in outs[0], outs[0][-3000:]
    assert "process 0 failed" in outs[1], outs[1][-3000:]
    print(f"both processes stopped {time.monotonic() - t0:.0f} s after start (exit codes {codes})")


@pytest.mark.slow
def test_ppo_two_processes_match_one(setup, runs):
    two, one = read_log(runs["two"]["save_path"]), read_log(runs["one"]["save_path"])
    assert [r["step"] for r in two] == [1, 2] == [r["step"] for r in one]
    assert_same_losses(two, one, [1, 2], "2 processes vs 1")
    # process 0 wrote logs, plot and HF exports; process 1 wrote none of them
    p0, p1 = Path(runs["two"]["save_path"]), Path(runs["two"]["save_path"] + "-process1")
    assert (p0 / "actor" / "model.safetensors").is_file() and (p0 / "critic" / "config.json").is_file()
    assert (p0 / "ppo_metrics.png").stat().st_size > 1000
    assert not (p1 / "logs" / "metrics.jsonl").exists() and not (p1 / "actor").exists()
    assert not (p1 / "ppo_metrics.png").exists()
    # the export gathered across hosts equals the single-process export
    from safetensors.numpy import load_file

    w2, w1 = load_file(p0 / "actor" / "model.safetensors"), load_file(Path(runs["one"]["save_path"]) / "actor" /
                                                                        "model.safetensors")
    assert w2.keys() == w1.keys()
    for k in w1:
        assert abs(w2[k] - w1[k]).max() <= 1e-5 * max(1.0, abs(w1[k]).max()), k


@pytest.mark.slow
def test_checkpoint_from_two_processes_resumes_in_one(setup, runs):
    src = Path(runs["two"]["ckpt_path"])
    cfg = ppo_config(setup, "resume2to1", load_checkpoint=True)
    shutil.copytree(src, cfg["ckpt_path"])
    shutil.rmtree(Path(cfg["ckpt_path"]) / "2")  # keep step 1: the resumed run does step 2 again
    run_ppo_one_process(cfg)
    resumed = read_log(cfg["save_path"])
    assert [r["step"] for r in resumed] == [2]
    assert_same_losses(resumed, read_log(runs["one"]["save_path"]), [2], "2-process checkpoint resumed in 1")


@pytest.mark.slow
def test_checkpoint_from_one_process_resumes_in_two(setup, runs):
    src = Path(runs["one"]["ckpt_path"])
    cfg = ppo_config(setup, "resume1to2", load_checkpoint=True)
    shutil.copytree(src, cfg["ckpt_path"])
    shutil.rmtree(Path(cfg["ckpt_path"]) / "2")
    run_ppo_two_processes(setup, cfg)
    resumed = read_log(cfg["save_path"])
    assert [r["step"] for r in resumed] == [2]
    assert_same_losses(resumed, read_log(runs["two"]["save_path"]), [2], "1-process checkpoint resumed in 2")


# ---------------------------------------------------------------------------------------------------------------------
# SFT across processes (the offline trainers' shared loop, jaxrlhf/train/supervised.py)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sft_two_processes_match_one(setup):
    """Two SFT steps (and an eval) on 2 processes x 4 devices equal one process with 8 devices."""
    import yaml

    from tests.tiny import write_additions

    write_additions(setup / "add.jsonl")
    cfg = dict(mesh="4x2", pretrain=str(setup / "model"), dataset=str(setup / "add.jsonl"), input_key="input",
               output_key="output", max_len=16, train_batch_size=16, micro_train_batch_size=2, max_steps=2,
               eval_steps=2, learning_rate=3e-3, eval_holdout=0.2, seed=3)
    two = {**cfg, "save_path": str(setup / "sft-two"), "ckpt_path": str(setup / "sft-two" / "ckpt")}
    (setup / "sft-two.yaml").write_text(yaml.safe_dump(two))
    port = free_port()
    run_processes("sft", [["--config", str(setup / "sft-two.yaml"), "--coordinator_address", f"127.0.0.1:{port}",
                           "--num_processes", "2", "--process_id", str(i),
                           "--save_path", two["save_path"] + ("" if i == 0 else "-process1")] for i in range(2)])
    from jaxrlhf.sft import SFTConfig, main

    one = {**cfg, "save_path": str(setup / "sft-one"), "ckpt_path": str(setup / "sft-one" / "ckpt")}
    main(SFTConfig(**one))
    a, b = read_log(two["save_path"]), read_log(one["save_path"])
    assert [r["step"] for r in a] == [1, 2] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in ("loss", "grad_norm", "eval/loss"):
            if k in y:
                assert math.isclose(x[k], y[k], rel_tol=1e-4, abs_tol=1e-6), (k, x[k], y[k])
    assert (Path(two["save_path"]) / "model.safetensors").is_file()
    assert not (Path(two["save_path"] + "-process1") / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Role placement: sub-meshes and host offload give the experience of the default placement
# ---------------------------------------------------------------------------------------------------------------------

PLACED = dict(mesh="2x2", ref_mesh="2x2@4", reward_mesh="4@4", ref_offload=True, reward_offload=True)


@pytest.mark.slow
def test_placement_gives_the_default_experience(setup):
    """Actor and critic on devices 0-3, the reference (2x2) and the reward model (4-way fsdp) on devices 4-7, both
    kept in host memory between passes: the same rewards, KL, returns and losses as everything on one 4x2 mesh."""
    default = ppo_config(setup, "place-default", max_steps=1)
    placed = ppo_config(setup, "place-placed", max_steps=1, **PLACED)
    run_ppo_one_process(default)
    run_ppo_one_process(placed)
    assert_same_losses(read_log(placed["save_path"]), read_log(default["save_path"]), [1], "placed vs default")


@pytest.mark.slow
def test_placement_across_two_processes(setup, runs):
    """The same placement on 2 processes (each host: actor and critic on its devices 0-1, reference and reward on
    2-3: offsets count a host's own devices) gives the losses of the default single-process run."""
    cfg = ppo_config(setup, "place-two", **{**PLACED, "ref_mesh": "2x2@2", "reward_mesh": "4@2"})
    run_ppo_two_processes(setup, cfg)
    assert_same_losses(read_log(cfg["save_path"]), read_log(runs["one"]["save_path"]), [1, 2], "placed, 2 processes")


def test_offloaded_parameters_leave_the_devices():
    """--ref_offload keeps no device copy between uses; the copy brought back is exact and on the same shardings."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sharding import make_mesh
    from sharding.placement import offload, on_device_bytes, onload

    mesh = make_mesh("4x2")
    params = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("fsdp", "tensor"))),
              "b": jax.device_put(jnp.ones(8), NamedSharding(mesh, P()))}
    host = offload(params)
    assert on_device_bytes(params) == (64 + 8 * 8) * 4 and on_device_bytes(host) == 0
    back = onload(host)
    for k in params:
        assert back[k].sharding == params[k].sharding
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(params[k]))
    assert on_device_bytes(host) == 0  # the host copy stays where it is


# ---------------------------------------------------------------------------------------------------------------------
# Worker entry point
# ---------------------------------------------------------------------------------------------------------------------


def _worker(argv: list[str]) -> int:
    role, args = argv[0], argv[1:]
    if role == "mechanics":
        out = mechanics(int(args[0]), int(args[1]))
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    if role == "ppo":
        from jaxrlhf.ppo import cli

        return cli(args)
    if role == "sft":
        from jaxrlhf.sft import cli as sft_cli

        return sft_cli(args)
    if role == "env_mechanics":  # started by scripts/ray_launch_trainers.py: the process group from JAXRLHF_* env
        out = env_mechanics()
        Path(args[0] + f".{out['process']}").write_text(json.dumps(out))
        return 0
    raise SystemExit(f"unknown worker role {role!r}")


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
