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
