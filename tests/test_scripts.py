"""The job files under scripts/: every one parses (bash -n, python compile), the trainer command lines of the cluster
jobs dry-run through ``--dry_run`` against real Llama-3 configs, the conversion job's command converts a tiny model,
and the Ray launcher forms a real 2-process JAX group on a local Ray cluster."""
from __future__ import annotations

import json
import os
import py_compile
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_plan import llama3_dirs

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
SHELL = sorted(p for p in SCRIPTS.iterdir() if p.suffix in (".sh", ".sbatch"))
PYTHON = sorted(SCRIPTS.glob("*.py"))


def test_gpu_benchmark_runs(tmp_path):
    """scripts/bench_gpu.py runs on a GPU machine without this project installed; here its 2-layer smoke run."""
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(SCRIPTS / "bench_gpu.py"), "--tiny", "--batch", "2", "--prompt", "16",
                        "--response", "16", "--steps", "1", "--sample_batch", "2", "--sample_tokens", "4",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""})  # one CPU device
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["train_remat_off"]["s_per_step"] > 0 and res["train_remat_on"]["s_per_step"] > 0
    assert res["sampler_tokens_per_s"] > 0 and 0 <= res["drift"]["logp_absdiff_max"] < 1.0
    bad = subprocess.run([sys.executable, str(SCRIPTS / "bench_gpu.py"), "--tiny", "--batch", "3", "--out",
                          str(tmp_path / "bad.json")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT),
                              "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert bad.returncode == 2 and "must be multiples of the mesh's data-parallel size 2" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad.json").exists()


def test_there_are_cluster_jobs():
    names = {p.name for p in SHELL}
    assert {"slurm_ppo.sbatch", "ray_cluster.sh", "ray_ppo_job.sh", "tpu_pod_ppo.sh", "convert_70b.sbatch"} <= names


@pytest.mark.parametrize("path", SHELL, ids=lambda p: p.name)
def test_shell_syntax(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path", PYTHON, ids=lambda p: p.name)
def test_python_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)


def printed_args(script: str, **env) -> list[str]:
    """The flags a job file runs its Python command with (its JAXRLHF_PRINT_ARGS=1 mode)."""
    r = subprocess.run(["bash", str(SCRIPTS / script)], capture_output=True, text=True,
                       env={**os.environ, "JAXRLHF_PRINT_ARGS": "1", **env})
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return llama3_dirs(tmp_path_factory.mktemp("llama3"))


# job file -> (its models, device memory of the machines it targets)
JOBS = {
    "slurm_ppo.sbatch": ("70b", 80),  # A100/H100 80GB nodes
    "ray_ppo_job.sh": ("8b", 80),
    "tpu_pod_ppo.sh": ("8b", 32),  # TPU v4: 32 GiB HBM per chip
}


@pytest.mark.parametrize("script", sorted(JOBS))
def test_job_dry_runs(script, configs, capsys):
    """The job's own trainer flags, with its models replaced by weightless Llama-3 configs, plan and fit."""
    from jaxrlhf.ppo import cli

    size, memory = JOBS[script]
    args = printed_args(script, MODEL=str(configs[size]), REWARD_MODEL=str(configs[f"{size}-rm"]))
    assert "--mesh" in args and "--num_processes" in args
    assert cli(args + ["--dry_run", "--device_memory_gb", str(memory)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    n = int(args[args.index("--num_processes") + 1])
    assert f"on {n} hosts" in out and "verdict: fits" in out, out


def test_slurm_job_resources_add_up():
    """The sbatch header has room for the trainer nodes plus the vLLM engines the trainer asks for."""
    text = (SCRIPTS / "slurm_ppo.sbatch").read_text()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
    train_nodes = int(re.search(r"TRAIN_NODES=\$\{TRAIN_NODES:-(\d+)\}", text).group(1))
    args = printed_args("slurm_ppo.sbatch")
    engines = int(args[args.index("--vllm_num_engines") + 1])
    tp = int(args[args.index("--vllm_tensor_parallel_size") + 1])
    mesh = [int(x) for x in args[args.index("--mesh") + 1].split("x")]
    assert mesh[0] * mesh[1] == train_nodes * gpus, "the trainer mesh uses every GPU of the trainer nodes"
    assert engines * tp <= (nodes - train_nodes) * gpus, "the vLLM engines fit on the remaining nodes"


def test_conversion_job_command_converts(tmp_path):
    """The conversion job's exact converter arguments, run on a tiny model on this machine's 8 devices."""
    from converters.__main__ import main
    from tests.tiny import save_tiny

    save_tiny("llama3", tmp_path / "hf")
    args = printed_args("convert_70b.sbatch", SRC=str(tmp_path / "hf"), DST=str(tmp_path / "flax"))
    assert args[0] == "hf-to-flax" and "--mesh" in args
    assert main(["--quiet"] + args) == 0
    cfg = json.loads((tmp_path / "flax" / "config.json").read_text())
    assert cfg["jaxrlhf"]["dtype"] == "bfloat16" and (tmp_path / "flax" / "params").is_dir()
    back = printed_args("convert_70b.sbatch", DIRECTION="flax-to-hf", SRC=str(tmp_path / "flax"),
                        DST=str(tmp_path / "hf-again"))
    assert main(["--quiet"] + back) == 0
    assert (tmp_path / "hf-again" / "model.safetensors").is_file()


def test_ray_launcher_arguments():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import ray_launch_trainers as launcher
    finally:
        sys.path.remove(str(SCRIPTS))
    args, cmd = launcher.parse_args(["--num_trainers", "4", "--env", "A=1", "--", "python", "-m", "jaxrlhf.ppo"])
    assert args.num_trainers == 4 and args.gpus_per_trainer == 8 and cmd == ["python", "-m", "jaxrlhf.ppo"]
    assert launcher.trainer_env("10.0.0.1:1234", 4, 3, {"A": "1"}) == {
        "A": "1", "JAXRLHF_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAXRLHF_NUM_PROCESSES": "4",
        "JAXRLHF_PROCESS_ID": "3"}
    with pytest.raises(SystemExit):
        launcher.parse_args(["--num_trainers", "2"])  # no command


def test_ray_launcher_forms_a_jax_group(tmp_path):
    """A real local Ray cluster: two trainer actors start two processes that join one 8-device JAX group."""
    pytest.importorskip("ray")
    out = tmp_path / "result"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXRLHF_", "SLURM_"))}
    cmd = [sys.executable, str(SCRIPTS / "ray_launch_trainers.py"), "--num_trainers", "2", "--gpus_per_trainer", "0",
           "--cpus_per_trainer", "0.5", "--strategy", "PACK", "--ray_address", "local",
           "--env", "XLA_FLAGS=--xla_force_host_platform_device_count=4", "--env", "JAX_PLATFORMS=cpu",
           "--env", f"PYTHONPATH={ROOT}", "--",
           sys.executable, "-m", "tests.test_multihost", "env_mechanics", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = [json.loads(Path(f"{out}.{i}").read_text()) for i in range(2)]
    for i, g in enumerate(got):
        assert g["source"].startswith("environment (JAXRLHF_COORDINATOR_ADDRESS)")
        assert g["process"] == i and g["process_count"] == 2 and g["devices"] == 8 and g["sum"] == 120.0
