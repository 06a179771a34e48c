"""PPO with LoRA on tiny models: only the adapters (and the critic's value head) train, the reference is the actor's
own base with its adapters off, mesh 4x2 == 1x8, resume == uninterrupted (with adapter dropout), the merged export
and the PEFT adapter agree with the untouched base, bad input."""
import contextlib
import math
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxrlhf.ppo import main
from tests.test_ppo import make_cfg, read_log, setup  # noqa: F401 - the module fixture

LORA = dict(lora_rank=4, lora_alpha=8.0, target_modules=["all-linear"], actor_learning_rate=5e-3)
KEYS = ("reward", "actor/loss", "kl", "response_length")


def test_only_adapters_train_and_the_reference_is_the_base(setup):  # noqa: F811
    from jaxrlhf.ppo_setup import build
    from jaxrlhf.train.run import start_meshes
    from sharding import path_str
    import jax

    cfg = make_cfg(setup, "parts", **LORA)
    _, meshes = start_meshes(cfg, cfg.role_meshes)
    with contextlib.ExitStack() as run:
        p = build(cfg, meshes, run)
        for role, opt, trained in (("actor", p.state.actor_opt, ("lora_a", "lora_b")),
                                   ("critic", p.state.critic_opt, ("lora_a", "lora_b", "score"))):
            paths = {path_str(kp) for kp, x in jax.tree_util.tree_flatten_with_path(opt)[0] if np.ndim(x) > 0}
            assert paths and all(any(t in q for t in trained) for q in paths), (role, sorted(paths)[:5])
            assert any("lora_b" in q for q in paths)
        assert p.ref_params is None and p.ref_zero_b  # no second copy of the base
        n_opt = sum(x.size for x in jax.tree_util.tree_leaves(p.state.actor_opt))
        n_params = sum(x.size for x in jax.tree_util.tree_leaves(p.state.actor))
        assert n_opt < 0.5 * n_params  # Adam's two moments of the adapters only


def test_export_is_base_plus_adapters_and_resume_equals_uninterrupted(setup):  # noqa: F811
    """Adapter dropout on (seeded: a resumed run repeats it). The reference is the actor's base: KL exactly 0 at the
    first step (B = 0), not after. The merged export minus scale * B A (the PEFT adapter's) is the untouched base."""
    kw = dict(save_steps=1, lora_dropout=0.2, lora_save_adapter=True, advantage_estimator="group_norm", **LORA)
    full = read_log(main(make_cfg(setup, "lora_full", **kw))["log"])
    assert full[0]["kl"] == 0.0 and full[1]["kl"] != 0.0
    shutil.copytree(setup / "lora_full" / "ckpt", setup / "lora_crashed" / "ckpt")  # crashed after step 1
    shutil.rmtree(setup / "lora_crashed" / "ckpt" / "2")
    resumed = read_log(main(make_cfg(setup, "lora_crashed", load_checkpoint=True, **kw))["log"])
    assert [r["step"] for r in resumed] == [2]
    for k in KEYS:
        assert full[1][k] == pytest.approx(resumed[0][k], rel=1e-5, abs=1e-7), k
    base = load_file(str(setup / "model" / "model.safetensors"))
    merged = load_file(str(setup / "lora_full" / "actor" / "model.safetensors"))
    adapter = load_file(str(setup / "lora_full" / "actor" / "lora_adapter" / "adapter_model.safetensors"))
    scale = LORA["lora_alpha"] / LORA["lora_rank"]
    moved = 0.0
    for name, w in base.items():
        prefix = "base_model.model." + name[:-len(".weight")]
        if prefix + ".lora_A.weight" in adapter:
            delta = scale * adapter[prefix + ".lora_B.weight"] @ adapter[prefix + ".lora_A.weight"]
            moved = max(moved, float(np.abs(delta).max()))
            np.testing.assert_allclose(merged[name] - delta, w, atol=1e-6, rtol=0)
        else:
            np.testing.assert_array_equal(merged[name], w)
    assert moved > 1e-4


@pytest.mark.slow
def test_mesh_4x2_equals_1x8_with_lora(setup):  # noqa: F811
    runs = [read_log(main(make_cfg(setup, f"lora{mesh}", mesh=mesh, **LORA))["log"]) for mesh in ("4x2", "1x8")]
    for a, b in zip(*runs):
        for k in KEYS + ("critic/loss",):  # the critic has adapters too
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (k, a[k], b[k])


@pytest.mark.parametrize("flags, message", [
    (["--load_in_4bit"], "--load_in_4bit (QLoRA) needs --lora_rank"),
    (["--lora_rank", "4", "--target_modules", "q_proj,qkv_proj"], "--target_modules qkv_proj: no such module in "
                                                                  "this model; the linear modules are q_proj"),
    (["--lora_rank", "4", "--target_modules", "q_proj,router"], "--target_modules router: the mixture-of-experts "
                                                                "router and experts are not LoRA targets"),
    (["--lora_rank", "4", "--ref_offload"], "with LoRA the reference model is the actor's own base"),
    (["--lora_rank", "4", "--vllm_sync_lora", "adapter"], "--vllm_sync_lora adapter: the JAX sampler takes merged "
                                                          "weights"),
])
def test_bad_lora_flags_on_ppo(setup, flags, message, capsys):  # noqa: F811
    from jaxrlhf.ppo import cli

    cfg = make_cfg(setup, "bad")
    argv = ["--pretrain", cfg.pretrain, "--prompt_data", cfg.prompt_data, "--input_key", "question",
            "--remote_rm_url", cfg.remote_rm_url, "--save_path", str(setup / "bad"), "--ckpt_path",
            str(setup / "bad" / "ckpt"), "--rollout_batch_size", "8", "--train_batch_size", "8",
            "--micro_train_batch_size", "1", "--micro_rollout_batch_size", "1", *flags]
    with (pytest.raises(SystemExit) if "--vllm_sync_lora" not in flags else contextlib.nullcontext()) as e:
        code = cli(argv)
    code = e.value.code if e is not None and hasattr(e, "value") else code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err[-3:]


@pytest.mark.slow
def test_qlora_ppo_with_double_quant_trains_resumes_and_exports(setup):  # noqa: F811
    """--load_in_4bit --bnb_4bit_use_double_quant on PPO: the NF4 base (int8 scales) is the reference too (KL 0 at
    the first step), the checkpoint holds the 4-bit leaves (resume == uninterrupted), the export is a plain fp32
    model near the base (NF4 error + the adapters)."""
    kw = dict(save_steps=1, load_in_4bit=True, bnb_4bit_use_double_quant=True, advantage_estimator="group_norm",
              **LORA)
    full = read_log(main(make_cfg(setup, "qlora_full", **kw))["log"])
    assert full[0]["kl"] == 0.0 and full[1]["kl"] != 0.0
    shutil.copytree(setup / "qlora_full" / "ckpt", setup / "qlora_crashed" / "ckpt")
    shutil.rmtree(setup / "qlora_crashed" / "ckpt" / "2")
    resumed = read_log(main(make_cfg(setup, "qlora_crashed", load_checkpoint=True, **kw))["log"])
    for k in KEYS:
        assert full[1][k] == pytest.approx(resumed[0][k], rel=1e-5, abs=1e-7), k
    base = load_file(str(setup / "model" / "model.safetensors"))
    merged = load_file(str(setup / "qlora_full" / "actor" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert merged[name].dtype == np.float32 and 0 < np.abs(merged[name] - base[name]).max() < 0.2 * np.abs(
        base[name]).max()
