"""LoRA: adapters as NNX params on the decoder's linears; only they are trained; PEFT's layout in and out.

References no one here wrote: transformers (merged export), PEFT (``PeftModel.from_pretrained`` of our adapter
directory, and an adapter PEFT itself wrote loaded into jaxrlhf)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from jaxrlhf.models import from_pretrained
from jaxrlhf.models.lora import LINEAR_MODULES, LoraSpec, apply_lora, merge, parse_targets
from jaxrlhf.train.steps import init_optimizer, make_train_step, split_params
from jaxrlhf.train.lora import trainable_with_lora
from sharding import make_mesh
from tests.tiny import left_padded_batch, positions, save_tiny

SPEC = LoraSpec(rank=4, alpha=8.0, targets=LINEAR_MODULES)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "base"
    save_tiny("llama3", path)
    return str(path)


def logits_of(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def randomize_b(model, seed=1):
    """Non-zero B everywhere (a fresh adapter is an exact no-op)."""
    state = nnx.state(model)
    params = state.to_pure_dict()
    key = jax.random.key(seed)

    def one(kp, x):
        name = str(kp[-1].key)
        return 0.05 * jax.random.normal(jax.random.fold_in(key, hash(str(kp)) % 2**31), x.shape, x.dtype).astype(
            x.dtype) if name == "lora_b" else x

    params = jax.tree_util.tree_map_with_path(one, params)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return params


def test_zero_b_gives_the_base_logits_exactly(base):
    ids, mask = left_padded_batch()
    model = from_pretrained(base)
    want = logits_of(model, ids, mask)
    apply_lora(model, SPEC, seed=0)
    np.testing.assert_array_equal(logits_of(model, ids, mask), want)
    randomize_b(model)
    assert np.abs(logits_of(model, ids, mask) - want).max() > 1e-3  # the adapters are in the forward


def test_merged_kernel_is_w_plus_scaled_ab(base):
    model = apply_lora(from_pretrained(base), SPEC, seed=0)
    params = randomize_b(model)
    merged = merge(params, SPEC.scale)
    q = params["model"]["layers"][1]["self_attn"]["q_proj"]
    w = np.asarray(q["kernel"]) + SPEC.scale * np.asarray(q["lora_a"]) @ np.asarray(q["lora_b"])
    np.testing.assert_allclose(np.asarray(merged["model"]["layers"][1]["self_attn"]["q_proj"]["kernel"]), w,
                               rtol=1e-6, atol=1e-6)
    assert "lora_a" not in merged["model"]["layers"][1]["self_attn"]["q_proj"]
    # and the merged plain model computes what the adapted one does
    ids, mask = left_padded_batch()
    plain = from_pretrained(base)
    state = nnx.state(plain)
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(plain, state)
    np.testing.assert_allclose(logits_of(plain, ids, mask), logits_of(model, ids, mask), rtol=1e-4, atol=1e-4)


def test_bad_target_module_names_the_existing_ones():
    with pytest.raises(ValueError, match="no such module.*q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                         "down_proj"):
        parse_targets(["q_proj", "query_key_value"])
    assert parse_targets("all-linear") == LINEAR_MODULES
    assert parse_targets(["v_proj,q_proj"]) == ("q_proj", "v_proj")


def _lm_loss(model, b):
    logits = model(b["ids"], b["mask"])
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, b["ids"][:, 1:, None], -1)[..., 0]
    return (nll * b["mask"][:, 1:]).sum() / b["n"], {}


def _train(base, mesh_spec: str, steps: int = 3):
    mesh = make_mesh(mesh_spec)
    model = apply_lora(from_pretrained(base, mesh=mesh), SPEC, seed=0, mesh=mesh)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    trainable = trainable_with_lora("lm")
    tx = optax.adam(1e-2)
    opt = init_optimizer(tx, split_params(params, trainable)[0], mesh)
    step = make_train_step(graphdef, _lm_loss, tx, params=params, opt_state=opt, mesh=mesh, trainable=trainable)
    ids, mask = left_padded_batch(batch=8, length=12)
    batch = {"ids": ids[None].astype(np.int32), "mask": mask[None].astype(np.int32),
             "n": np.full((1,), mask[:, 1:].sum(), np.float32)}
    before = jax.tree_util.tree_map(np.asarray, params)
    losses = []
    for _ in range(steps):
        params, opt, m = step(params, opt, batch)
        losses.append(float(m["loss"]))
    return before, jax.tree_util.tree_map(np.asarray, params), opt, losses


def test_only_adapters_train_and_have_optimizer_state(base):
    before, after, opt, losses = _train(base, "4x2")
    assert losses[-1] < losses[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    for kp, leaf in jax.tree_util.tree_flatten_with_path(after)[0]:
        name = str(kp[-1].key)
        changed = not np.array_equal(leaf, flat_b[kp])
        assert changed == (name in ("lora_a", "lora_b")), (kp, changed)  # A moves from step 2 on (B = 0 at step 1)
    n_adapter = sum(x.size for kp, x in jax.tree_util.tree_flatten_with_path(after)[0]
                    if str(kp[-1].key) in ("lora_a", "lora_b"))
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(opt) if np.ndim(x) > 0)
    assert n_opt == 2 * n_adapter  # Adam's two moments, adapters only: the frozen base has none


def test_mesh_4x2_equals_1x8_with_lora(base):
    _, a, _, la = _train(base, "4x2", steps=2)
    _, b, _, lb = _train(base, "1x8", steps=2)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_adapter_shardings_follow_the_base(base):
    mesh = make_mesh("4x2")
    model = apply_lora(from_pretrained(base, mesh=mesh), SPEC, seed=0, mesh=mesh)
    q, o = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.o_proj
    P = jax.sharding.PartitionSpec
    assert q.lora_a[...].sharding.spec == P(("fsdp", "tensor"), None)  # q's kernel: P("fsdp", "tensor")
    assert q.lora_b[...].sharding.spec == P(None, ("tensor", "fsdp"))
    assert o.lora_a[...].sharding.spec == P(("tensor", "fsdp"), None)  # o's kernel: P("tensor", "fsdp")
    assert o.lora_b[...].sharding.spec == P(None, ("fsdp", "tensor"))


# ------------------------------------------------------------------------------------------------ PEFT layout
def _peft_logits(base, adapter_dir, ids, mask):
    import peft
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions(mask)))
    return out.logits.numpy()


def test_peft_loads_our_adapter_with_our_logits(base, tmp_path):
    from converters.peft import save_adapter

    model = apply_lora(from_pretrained(base), LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")),
                       seed=0)
    params = randomize_b(model)
    save_adapter(params, model.cfg, model.lora, str(tmp_path / "adapter"), base_model=base)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["target_modules"] == ["q_proj", "v_proj",
                                                                                            "down_proj"]
    ids, mask = left_padded_batch()
    ours = logits_of(model, ids, mask)
    theirs = _peft_logits(base, str(tmp_path / "adapter"), ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-5, rtol=0)


def test_an_adapter_peft_wrote_loads_with_equal_logits(base, tmp_path):
    import peft
    import transformers

    from jaxrlhf.train.lora import add_lora

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():  # PEFT starts B at zero: make the adapter matter
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "peft"))
    ids, mask = left_padded_batch()
    theirs = _peft_logits(base, str(tmp_path / "peft"), ids, mask)

    model = add_lora(from_pretrained(base), lora_rank=0, lora_alpha=0.0, target_modules=["all-linear"],
                     lora_path=str(tmp_path / "peft"), seed=0)
    assert model.lora == LoraSpec(rank=8, alpha=16.0, targets=LINEAR_MODULES)
    ours = logits_of(model, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="--lora_rank 4 but the adapter .* has r=8"):
        add_lora(from_pretrained(base), lora_rank=4, lora_alpha=8.0, target_modules=["all-linear"],
                 lora_path=str(tmp_path / "peft"), seed=0)


@pytest.mark.parametrize("flags, message", [
    (["--target_modules", "q_proj,qkv"], "--target_modules qkv: no such module in this model; the linear modules "
                                         "are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
    (["--lora_dropout", "1.0"], "--lora_dropout must be in [0, 1), got 1.0"),
    (["--bnb_4bit_use_double_quant", "--lora_rank", "4"], "--bnb_4bit_use_double_quant quantizes the scales of the "
                                                          "4-bit base: add --load_in_4bit"),
    (["--lora_save_adapter"], "--lora_save_adapter needs LoRA: set --lora_rank"),
    (["--lora_rank", "-1"], "--lora_rank must be >= 0"),
])
def test_bad_lora_flags_are_one_line_and_exit_2(flags, message, capsys):
    from jaxrlhf.sft import cli

    with pytest.raises(SystemExit) as e:
        cli(["--pretrain", "x", *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_unmerged_adapters_are_not_exported_as_a_plain_model(base, tmp_path):
    from converters.hf import export_hf

    model = apply_lora(from_pretrained(base), SPEC, seed=0)
    with pytest.raises(ValueError, match="hold LoRA adapters: merge them first"):
        export_hf(nnx.state(model).to_pure_dict(), model.cfg, str(tmp_path / "out"), head="lm")
    assert not (tmp_path / "out").exists()


def test_adapter_dropout_zero_is_exact_and_positive_changes_the_gradient_reproducibly(base):
    """--lora_dropout: a step with a key but rate 0 equals the key-less step bit for bit; rate 0.5 changes the
    adapters' update, the same key repeats it, another key does not."""
    import dataclasses

    from jaxrlhf.train.lora import trainable_with_lora

    mesh = make_mesh("4x2")
    ids, mask = left_padded_batch()
    batch = {"ids": np.stack([ids, ids]), "mask": np.stack([mask, mask])}  # 2 micro-batches

    def loss_fn(model, mb):
        logits = model(mb["ids"], mb["mask"])
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * mb["mask"]), {}

    def stepper(rate):
        model = from_pretrained(base, mesh=mesh)
        apply_lora(model, dataclasses.replace(SPEC, dropout=rate), seed=0, mesh=mesh)
        graphdef, state = nnx.split(model)
        params = state.to_pure_dict()
        trainable = trainable_with_lora("lm")
        tx = optax.sgd(1.0)
        opt = init_optimizer(tx, split_params(params, trainable)[0], mesh)
        step = make_train_step(graphdef, loss_fn, tx, params=params, opt_state=opt, mesh=mesh, trainable=trainable)
        host = jax.tree_util.tree_map(np.asarray, (params, opt))
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, (params, opt))

        def run(rng):  # from the same start every time (the step donates its inputs)
            p, o = jax.tree_util.tree_map(jax.device_put, host, shardings)
            new, _, _ = step(p, o, batch, rng)
            return np.asarray(new["model"]["layers"][0]["mlp"]["up_proj"]["lora_b"])  # B's gradient sees dropout(x) A
        return run

    off, on = stepper(0.0), stepper(0.5)
    plain = off(None)
    np.testing.assert_array_equal(off(jax.random.key(3)), plain)
    dropped = on(jax.random.key(3))
    assert np.abs(dropped - plain).max() > 1e-6
    np.testing.assert_array_equal(on(jax.random.key(3)), dropped)
    assert np.abs(on(jax.random.key(4)) - dropped).max() > 1e-6
