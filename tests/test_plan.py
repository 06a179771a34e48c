"""Memory planning (jaxrlhf/plan.py, ``--dry_run``): parameter counts and shards against real sharded arrays and
published model sizes, a Llama-3-70B PPO plan on 4 hosts x 8 GPUs against a hand computation, refusals that name
the knob to turn, and the placement flags. Everything here runs from config.json files alone (no weights)."""
from __future__ import annotations

from pathlib import Path

import pytest

from jaxrlhf.plan import GiB, hf_config_dir, param_stats, plan_supervised
from sharding import MeshSpec

# Meta's published hyper-parameters (config.json of Meta-Llama-3-8B / -70B).
LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_act="silu",
              max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
              bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16", num_key_value_heads=8)
SIZES = {"8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
         "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)}


def llama3_dirs(root: Path) -> dict[str, Path]:
    """Weightless model directories: Llama-3-8B/70B causal LMs and reward models (sequence classification)."""
    out = {}
    for size, dims in SIZES.items():
        out[size] = Path(hf_config_dir(str(root / size), {**LLAMA3, **dims}))
        out[f"{size}-rm"] = Path(hf_config_dir(str(root / f"{size}-rm"), {
            **LLAMA3, **dims, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1}))
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return llama3_dirs(tmp_path_factory.mktemp("llama3"))


def model(path):
    from jaxrlhf.models import ModelConfig

    return ModelConfig.from_dir(str(path))


# ---------------------------------------------------------------------------------------------------------------------
# Parameter counts and shards
# ---------------------------------------------------------------------------------------------------------------------


def test_param_counts_are_the_published_sizes(dirs):
    # Llama-3-8B: 8,030,261,248 parameters; Llama-3-70B: 70,553,706,496 (Meta's model cards: 8.03B / 70.6B).
    assert param_stats(model(dirs["8b"]), "lm", MeshSpec(fsdp=8)).total == 8_030_261_248
    assert param_stats(model(dirs["70b"]), "lm", MeshSpec(fsdp=8, tensor=4)).total == 70_553_706_496
    # a score head replaces the LM head [D, V] by [D, 1]
    assert param_stats(model(dirs["70b-rm"]), "score", MeshSpec(fsdp=8)).total == \
        70_553_706_496 - 8192 * 128256 + 8192


def test_per_device_counts_match_real_sharded_arrays(tmp_path):
    """The plan's N (elements per device) and optimizer bytes equal what device 0 really holds on a 4x2 mesh."""
    import jax
    import optax

    from jaxrlhf.models import ModelConfig, from_pretrained
    from jaxrlhf.train.steps import init_optimizer
    from sharding import make_mesh
    from tests.tiny import save_tiny

    save_tiny("llama3", tmp_path / "m")
    mesh = make_mesh("4x2")
    dev0 = mesh.devices.flat[0]
    for head in ("lm", "score"):
        params = jax.tree_util.tree_leaves(from_pretrained(str(tmp_path / "m"), mesh=mesh, head=head))
        on_dev0 = sum(s.data.size for x in params for s in x.addressable_shards if s.device == dev0)
        n = param_stats(ModelConfig.from_dir(str(tmp_path / "m")), head, MeshSpec(fsdp=4, tensor=2)).per_device
        assert n == on_dev0, head
    from flax import nnx

    # Adam's two fp32 moments per parameter, sharded like the parameters (the LM model's N)
    state = nnx.split(from_pretrained(str(tmp_path / "m"), mesh=mesh, head="lm"))[1].to_pure_dict()
    opt = init_optimizer(optax.adamw(1e-3), state, mesh)
    moments = [x for x in jax.tree_util.tree_leaves(opt) if x.ndim > 0]
    n_lm = param_stats(ModelConfig.from_dir(str(tmp_path / "m")), "lm", MeshSpec(fsdp=4, tensor=2)).per_device
    assert sum(s.data.nbytes for x in moments for s in x.addressable_shards if s.device == dev0) == n_lm * 8


def test_indivisible_mesh_names_the_parameter_and_flag(dirs):
    with pytest.raises(ValueError, match=r"--ref_mesh 1x3: parameter .* cannot be split 3 ways over mesh axis tensor"):
        param_stats(model(dirs["8b"]), "lm", MeshSpec(tensor=3), what="--ref_mesh")


# ---------------------------------------------------------------------------------------------------------------------
# The Llama-3-70B plan on 4 hosts x 8 GPUs, by hand
# ---------------------------------------------------------------------------------------------------------------------

FLAGS_70B = ["--mesh", "8x4", "--num_processes", "4", "--bf16", "--gradient_checkpointing",
             "--advantage_estimator", "group_norm", "--n_samples_per_prompt", "4", "--rollout_batch_size", "128",
             "--train_batch_size", "128", "--micro_train_batch_size", "1", "--micro_rollout_batch_size", "2",
             "--prompt_max_len", "1024", "--generate_max_len", "1024", "--vllm_num_engines", "4",
             "--vllm_tensor_parallel_size", "8", "--ref_offload", "--reward_offload", "--device_memory_gb", "80"]


def hand_70b() -> dict[str, int]:
    """Bytes per device of the FLAGS_70B run, following the formulas of jaxrlhf/plan.py step by step."""
    V, D, F, L, H, K, E = 128256, 8192, 28672, 80, 64, 8, 128
    fsdp, t, c, T = 8, 4, 2, 1024 + 1024
    chunk = 128  # --logits_chunk_size: the LM head and log-softmax run over 128 response positions at a time
    # one layer: q [D, H*E], k and v [D, K*E], o [H*E, D], gate/up [D, F], down [F, D]; 2 RMSNorm scales [D]
    layer_matrices = D * H * E + 2 * D * K * E + H * E * D + 3 * D * F
    layer_norms = 2 * D
    layer = layer_matrices + layer_norms
    embed = lm_head = V * D
    # every matrix splits over fsdp x tensor = 32 devices (rules: sharding/tables.py); norm scales are replicated
    n_actor = (embed + lm_head + L * layer_matrices) // (fsdp * t) + L * layer_norms + D
    # the reward model: no LM head; its score head [D, 1] splits over fsdp only
    n_reward = (embed + L * layer_matrices) // (fsdp * t) + D // fsdp + L * layer_norms + D
    # activations per layer and token: a elements (4D + (2HE + 2KE)/t + 4F/t) and s bytes of scores + probabilities
    a = 4 * D + (2 * H * E + 2 * K * E) // t + 4 * F // t
    s = (H // t) * T * (4 + c)
    h = {}
    h["actor params"] = n_actor * 4  # fp32 master weights
    h["actor optimizer"] = n_actor * 8  # Adam mu + nu, fp32
    h["actor grads"] = n_actor * 4 * 2  # accumulated + one micro-batch's
    gathered = (2 * layer + lm_head) // t * c  # two layers and the LM head all-gathered over fsdp, bf16
    h["actor work"] = n_actor * c + gathered + layer // t * 4  # bf16 copy + gathers + one layer's fp32 gradient
    b = 1  # --micro_train_batch_size
    h["actor activations"] = (L * b * T * D * c  # remat: every layer's input
                              + b * T * (a * c + s)  # one layer recomputed
                              + b * chunk * (V // t) * 4 * 3)  # fp32 logits, log-softmax, gradient of a chunk
    b = 2  # --micro_rollout_batch_size
    forward_act_lm = b * T * (a * c + s) + b * chunk * (V // t) * 4 * 2
    h["ref params"] = n_actor * c  # the reference is stored in the compute dtype
    h["ref work"] = gathered
    h["ref activations"] = forward_act_lm
    h["reward params"] = n_reward * 2  # the checkpoint's bf16
    h["reward work"] = (2 * layer + D * 1) // t * c
    h["reward activations"] = b * T * (a * c + s) + b * T * 4
    resident = h["actor params"] + h["actor optimizer"]  # reference and reward offloaded
    h["experience"] = (resident + h["ref params"] + h["reward params"]  # both brought back for the pass
                       + (n_actor * c + gathered) + forward_act_lm)  # the largest forward: the actor's
    h["train actor"] = resident + h["actor grads"] + h["actor work"] + h["actor activations"]
    h["weight sync"] = resident + embed * 4  # the largest tensor (embedding) gathered in fp32
    h["budget"] = int(80 * GiB * 0.9)
    return h


def test_dry_run_70b_on_4x8_matches_hand_computation(dirs, capsys):
    from jaxrlhf.ppo import PPOConfig, main
    from jaxrlhf.cli import parse_config

    cfg = parse_config(PPOConfig, FLAGS_70B + ["--dry_run", "--pretrain", str(dirs["70b"]),
                                               "--reward_pretrain", str(dirs["70b-rm"])])
    out = main(cfg)
    printed = capsys.readouterr().out
    plan, h = out["plan"], hand_70b()
    roles = {m.role.name: m for m in plan.roles}
    assert set(roles) == {"actor", "ref", "reward"}  # GRPO: no critic
    assert roles["actor"].params == h["actor params"] == 8_824_324_096  # 8.22 GiB
    assert roles["actor"].optimizer == h["actor optimizer"]
    assert roles["actor"].grads == h["actor grads"]
    assert roles["actor"].work_train == h["actor work"]
    assert roles["actor"].act_train == h["actor activations"]
    for r in ("ref", "reward"):
        assert roles[r].params == h[f"{r} params"] and roles[r].work_forward == h[f"{r} work"]
        assert roles[r].act_forward == h[f"{r} activations"]
    [group] = plan.groups
    assert group["slots"] == (0, 7) and group["phases"] == {k: h[k] for k in ("experience", "train actor",
                                                                               "weight sync")}
    assert plan.budget == h["budget"] and plan.peak[:2] == (h["train actor"], "train actor")
    # the printed table carries the same numbers (GiB, 2 decimals)
    g = lambda n: f"{n / GiB:.2f}"  # noqa: E731
    actor_row = next(line for line in printed.splitlines() if line.strip().startswith("actor "))
    for k in ("params", "grads", "optimizer", "work", "activations"):
        assert g(h[f"actor {k}"]) in actor_row.split(), (k, actor_row)
    for phase in ("experience", "train actor", "weight sync"):
        assert f"{phase:<14} {g(h[phase]):>8}" in printed, phase
    assert "data x fsdp = 8 positions = 2 per host" in printed and "tensor 4 inside each host" in printed
    assert "512 samples per step" in printed and "16 micro-batches of 1 x 8 = 8 rows" in printed
    assert f"verdict: fits (peak {g(h['train actor'])} of 72.00 GiB in 'train actor')" in printed


def test_70b_ppo_with_critic_is_refused_naming_the_knob(dirs, capsys):
    """The same run with a 70B critic (GAE) needs more than 72 GiB per device: refused before anything loads."""
    from jaxrlhf.ppo import cli

    flags = [f for f in FLAGS_70B]
    i = flags.index("--advantage_estimator")
    flags[i + 1] = "gae"
    rc = cli(flags + ["--dry_run", "--pretrain", str(dirs["70b"]), "--reward_pretrain", str(dirs["70b-rm"])])
    captured = capsys.readouterr()
    assert rc == 2
    assert "train actor       74.74  DOES NOT FIT  <- peak" in captured.out
    assert "error: the plan does not fit: 'train actor' needs 74.74 GiB" in captured.err
    assert "a larger fsdp axis in --mesh" in captured.err and "drop the critic" in captured.err


@pytest.mark.parametrize("flags, knob", [
    # activations of 16 rows x 2048 tokens without recomputation
    (["--micro_train_batch_size", "16"], "Turn this knob: --gradient_checkpointing"),
    # with recomputation, 64 rows still do not fit
    (["--micro_train_batch_size", "64", "--gradient_checkpointing", "--rollout_batch_size", "512",
      "--train_batch_size", "512"], "lower --micro_train_batch_size (now 64)"),
    # the JAX sampler's KV cache for 4096 x 8 samples of 2048 tokens
    (["--gradient_checkpointing", "--rollout_batch_size", "4096", "--n_samples_per_prompt", "8",
      "--train_batch_size", "256"], "generate on vLLM engines (--vllm_num_engines N)"),
    # the experience forward of 128 rows per rank (on vLLM engines: the JAX sampler's KV cache would come first)
    (["--gradient_checkpointing", "--micro_rollout_batch_size", "128", "--rollout_batch_size", "1024",
      "--vllm_num_engines", "1"],
     "lower --micro_rollout_batch_size"),
])
def test_refusals_name_the_knob(dirs, flags, knob, capsys):
    from jaxrlhf.ppo import cli

    base = ["--dry_run", "--mesh", "8x1", "--pretrain", str(dirs["8b"]), "--reward_pretrain", str(dirs["8b-rm"]),
            "--bf16", "--device_memory_gb", "80", "--prompt_max_len", "1024", "--generate_max_len", "1024",
            "--rollout_batch_size", "128", "--train_batch_size", "128", "--micro_rollout_batch_size", "2"]
    assert cli(base + flags) == 2
    err = capsys.readouterr().err
    assert "the plan does not fit" in err and knob in err, err


def test_tensor_axis_across_hosts_is_refused(dirs, capsys):
    from jaxrlhf.ppo import cli

    rc = cli(["--dry_run", "--mesh", "4x8", "--num_processes", "8", "--pretrain", str(dirs["8b"]),
              "--remote_rm_url", "reward.py", "--rollout_batch_size", "64", "--train_batch_size", "64",
              "--micro_train_batch_size", "1", "--micro_rollout_batch_size", "1"])
    assert rc == 2
    assert "the tensor axis (8) must stay inside a host (4 devices per host)" in capsys.readouterr().err


def test_role_meshes_in_the_plan(dirs, capsys):
    """Reference and reward on their own devices (4-7 of each host): the actor's devices (0-3) no longer hold them."""
    from jaxrlhf.cli import parse_config
    from jaxrlhf.ppo import PPOConfig, main

    flags = ["--dry_run", "--mesh", "4x4", "--num_processes", "4", "--ref_mesh", "8x2@4", "--reward_mesh", "8x2@4",
             "--pretrain", str(dirs["8b"]), "--reward_pretrain", str(dirs["8b-rm"]), "--bf16",
             "--gradient_checkpointing", "--advantage_estimator", "group_norm", "--n_samples_per_prompt", "4",
             "--rollout_batch_size", "64", "--train_batch_size", "64", "--micro_train_batch_size", "1",
             "--micro_rollout_batch_size", "1", "--vllm_num_engines", "2", "--device_memory_gb", "80"]
    plan = main(parse_config(PPOConfig, flags))["plan"]
    printed = capsys.readouterr().out
    assert [g["slots"] for g in plan.groups] == [(0, 3), (4, 7)]
    assert plan.groups[0]["roles"] == ["actor"] and plan.groups[1]["roles"] == ["ref", "reward"]
    assert set(plan.groups[1]["phases"]) == {"experience"}  # nothing but their forwards runs there
    ref = next(m for m in plan.roles if m.role.name == "ref")
    assert ref.stats.per_device == param_stats(model(dirs["8b"]), "lm", MeshSpec(fsdp=8, tensor=2)).per_device
    assert "ref on --ref_mesh 8x2 (devices 4-7 of each host)" in printed


@pytest.mark.parametrize("flags, message", [
    (["--ref_mesh", "2x2@"], "--ref_mesh '2x2@' is not understood"),
    (["--ref_mesh", "3x3"], "--ref_mesh 3x3 has 9 devices, which do not split over 4 processes"),
    (["--reward_mesh", "pipe=2"], "--reward_mesh: mesh 'pipe=2': unknown axis 'pipe'"),
])
def test_bad_placement_flags(dirs, flags, message, capsys):
    from jaxrlhf.ppo import cli

    base = ["--dry_run", "--mesh", "8x4", "--num_processes", "4", "--pretrain", str(dirs["8b"]),
            "--reward_pretrain", str(dirs["8b-rm"]), "--rollout_batch_size", "64", "--train_batch_size", "64",
            "--micro_train_batch_size", "1", "--micro_rollout_batch_size", "1"]
    assert cli(base + flags) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Offline trainers
# ---------------------------------------------------------------------------------------------------------------------


def test_plan_supervised(dirs):
    kw = dict(model_path=str(dirs["8b"]), mesh="8x1", max_len=4096, bf16=True, gradient_checkpointing=True,
              device_memory_gb=80)
    ok = plan_supervised(micro_train_batch_size=2, **kw)
    assert ok.fits() and [m.role.name for m in ok.roles] == ["policy"]
    n = param_stats(model(dirs["8b"]), "lm", MeshSpec(fsdp=8)).per_device
    norms = 32 * 2 * 4096 + 4096  # replicated RMSNorm scales; everything else splits 8 ways
    assert n == (8_030_261_248 - norms) // 8 + norms
    assert ok.groups[0]["phases"]["train policy"] >= n * (4 + 8 + 8)  # params + Adam + 2 gradient buffers
    dpo = plan_supervised(micro_train_batch_size=2, ref_path=str(dirs["8b"]), **kw)
    assert "experience" in dpo.groups[0]["phases"]
    with pytest.raises(ValueError, match=r"lower --micro_train_batch_size \(now 64\)"):
        from jaxrlhf.plan import dry_run_supervised

        dry_run_supervised(micro_train_batch_size=64, **kw)


@pytest.mark.parametrize("trainer", ["sft", "rm", "dpo", "kto"])
def test_offline_trainers_dry_run_from_the_command_line(dirs, trainer, capsys):
    """``--dry_run`` plans the right roles (a frozen reference for DPO/KTO) and computes nothing."""
    import importlib

    cli = importlib.import_module(f"jaxrlhf.{trainer}").cli
    argv = ["--pretrain", str(dirs["8b"]), "--dataset", "unused.jsonl", "--mesh", "8x1", "--max_len", "2048",
            "--train_batch_size", "64", "--micro_train_batch_size", "2", "--bf16", "--gradient_checkpointing",
            "--dry_run", "--device_memory_gb", "80"]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "policy" in printed
    assert ("ref" in printed) == (trainer in ("dpo", "kto"))
    assert cli([*argv[:-1], "8", "--micro_train_batch_size", "64"]) == 2  # refused: names the knob
    assert "--micro_train_batch_size" in capsys.readouterr().err


def test_lora_plan_matches_the_real_adapter_optimizer_state(tmp_path):
    """With LoRA the plan's optimizer bytes per device are the real adapter-only Adam state on device 0 (4x2), and
    its parameter bytes what device 0 holds (also with QLoRA's NF4 base)."""
    import jax
    import optax
    from flax import nnx

    from jaxrlhf.models import ModelConfig, from_pretrained
    from jaxrlhf.models.lora import LoraSpec, apply_lora
    from jaxrlhf.models.nf4 import quantize_base
    from jaxrlhf.plan import Role, role_memory
    from jaxrlhf.train.steps import init_optimizer
    from jaxrlhf.train.lora import trainable_with_lora
    from sharding import make_mesh
    from tests.tiny import save_tiny

    save_tiny("llama3", tmp_path / "m")
    mesh = make_mesh("4x2")
    dev0 = mesh.devices.flat[0]
    targets = ("q_proj", "v_proj", "down_proj")
    cfg = ModelConfig.from_dir(str(tmp_path / "m"))
    for head, four_bit, dq in (("lm", False, False), ("score", False, False), ("lm", True, False), ("lm", True, True)):
        model = from_pretrained(str(tmp_path / "m"), mesh=mesh, head=head)
        if four_bit:
            quantize_base(model, mesh=mesh, double_quant=dq)
        apply_lora(model, LoraSpec(rank=4, alpha=8.0, targets=targets), seed=0, mesh=mesh)
        params = nnx.split(model)[1].to_pure_dict()
        opt = init_optimizer(optax.adam(1e-3), params, mesh, trainable_with_lora(head))
        real = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(opt) if x.ndim > 0
                   for s in x.addressable_shards if s.device == dev0)
        planned = role_memory(Role("policy", cfg, head, MeshSpec(fsdp=4, tensor=2), trained=True, lora_rank=4,
                                   lora_targets=targets, load_in_4bit=four_bit, double_quant=dq))
        assert planned.optimizer == real, head
        on_dev0 = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(params) for s in x.addressable_shards
                      if s.device == dev0)
        assert planned.params == on_dev0, head


def test_ppo_dry_run_with_lora(dirs, capsys):
    """PPO --lora_rank: the actor's optimizer state is the adapters' (as in the offline trainers' LoRA plan, checked
    against real arrays above) and the reference holds no parameters of its own (the actor's base)."""
    from jaxrlhf.cli import parse_config
    from jaxrlhf.ppo import PPOConfig, main

    argv = [f for f in FLAGS_70B if f != "--ref_offload"] + ["--dry_run", "--pretrain", str(dirs["70b"]),
                                                             "--reward_pretrain", str(dirs["70b-rm"])]
    full = {m.role.name: m for m in main(parse_config(PPOConfig, argv))["plan"].roles}
    lora = {m.role.name: m for m in main(parse_config(PPOConfig, argv + ["--lora_rank", "16"]))["plan"].roles}
    printed = capsys.readouterr().out
    assert "LoRA r=16 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (actor and critic); the reference " \
        "is the actor's base" in printed
    assert lora["ref"].params == 0 < full["ref"].params
    assert lora["actor"].params > full["actor"].params  # + the adapters
    assert 0 < lora["actor"].optimizer < full["actor"].optimizer / 50


def test_dry_run_shows_the_lora_saving(dirs, capsys):
    from jaxrlhf.sft import cli

    argv = ["--pretrain", str(dirs["8b"]), "--dataset", "unused.jsonl", "--mesh", "8x1", "--max_len", "2048",
            "--train_batch_size", "64", "--micro_train_batch_size", "2", "--bf16", "--gradient_checkpointing",
            "--dry_run", "--device_memory_gb", "80"]
    assert cli([*argv, "--lora_rank", "16"]) == 0
    printed = capsys.readouterr().out
    # Llama-3-8B, r=16 on every linear: 16 * sum(in + out) per layer x 32 = 41,943,040 adapter parameters
    assert "LoRA r=16 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj: 41,943,040 adapter parameters" \
        in printed, printed
    assert "optimizer state per device 0.04 (full fine-tuning: 7.48)" in printed, printed
    assert cli([*argv, "--lora_rank", "16", "--load_in_4bit"]) == 0
    printed = capsys.readouterr().out
    # embedding + untied head stay fp32: 2 x 128256 x 4096 x 4 B / 8 = 0.49 GiB; 6.98e9 linear elements x 0.5625 B / 8
    # = 0.46 GiB; the fp32 adapters 0.02 GiB
    assert "QLoRA: NF4 base, parameters per device 0.97 (fp32 base: 3.76)" in printed, printed
    assert cli([*argv, "--lora_rank", "16", "--load_in_4bit", "--bnb_4bit_use_double_quant"]) == 0
    printed = capsys.readouterr().out
    # 6.98e9 x (0.5 + 1/64 + ~4/(64*256)) B / 8 = 0.42 GiB instead of 0.46
    assert "QLoRA: NF4 base (double-quantized scales), parameters per device 0.93 (fp32 base: 3.76)" in printed, \
        printed
