"""Forward-pass parity with transformers' PyTorch models, sharded and unsharded, and cached decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxrlhf.models import default_positions, from_pretrained, init_cache, last_token_values
from sharding import make_mesh
from tests.tiny import FAMILIES, left_padded_batch, positions, save_tiny

TOL = 1e-4  # fp32 max abs logit difference vs transformers


def torch_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions(mask)))
    return out.logits.float().numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
    hf = save_tiny(family, tmp_path)
    ids, mask = left_padded_batch()
    ref = torch_logits(hf, ids, mask)
    for mesh in (None, make_mesh("4x2")):
        model = from_pretrained(str(tmp_path), mesh=mesh)
        # the documented call, Hugging Face's argument names (positions default to the mask's cumulative count)
        out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        diff = np.abs(out - ref)[mask.astype(bool)].max()  # pad positions are undefined in both
        assert diff <= TOL, f"{family} mesh={mesh and dict(mesh.shape)}: max |dlogit| {diff:.2e} > {TOL}"
        if mesh is not None:
            kernel = model.model.layers[0].self_attn.q_proj.kernel[...]
            assert len(kernel.sharding.device_set) == 8
            assert kernel.addressable_shards[0].data.shape == (64 // 4, kernel.shape[1] // 2)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_score_head_matches_sequence_classification(family, tmp_path):
    hf = save_tiny(family, tmp_path, kind="score")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions(mask))).logits[:, 0].numpy()
    model = from_pretrained(str(tmp_path), mesh=make_mesh("4x2"))
    assert model.head == "score"
    values = model(jnp.asarray(ids), jnp.asarray(mask))
    got = np.asarray(last_token_values(values, jnp.asarray(mask)))
    np.testing.assert_allclose(got, ref, atol=TOL)


@pytest.mark.parametrize("family", ["llama3", "mistral-window", "qwen3"])
def test_cached_decode_matches_full_forward(family, tmp_path):
    save_tiny(family, tmp_path)
    model = from_pretrained(str(tmp_path))
    ids, mask = left_padded_batch(length=14, seed=1)
    prompt_len = 8  # prefill 8 tokens (left-padded), then decode 6 one at a time
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    pos = default_positions(jnp.asarray(mask))
    cache = init_cache(model.cfg, ids.shape[0], ids.shape[1])
    decode = jax.jit(lambda c, i, m, p: model.decode(i, m, p, c))
    logits, cache = decode(cache, ids[:, :prompt_len], mask[:, :prompt_len], pos[:, :prompt_len])
    steps = [np.asarray(logits)]
    for t in range(prompt_len, ids.shape[1]):
        logits, cache = decode(cache, ids[:, t:t + 1], mask[:, t:t + 1], pos[:, t:t + 1])
        steps.append(np.asarray(logits))
    cached = np.concatenate(steps, axis=1)
    diff = np.abs(cached - full)[mask.astype(bool)].max()
    assert diff <= 1e-5, f"cached vs full forward: {diff:.2e}"


def test_bf16_params_and_remat(tmp_path):
    save_tiny("llama3", tmp_path)
    ids, mask = left_padded_batch()
    ref = from_pretrained(str(tmp_path))
    m16 = from_pretrained(str(tmp_path), dtype=jnp.bfloat16, remat=True)
    assert m16.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    a = np.asarray(ref(jnp.asarray(ids), jnp.asarray(mask)))
    b = np.asarray(m16(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(a - b)[mask.astype(bool)].max() < 0.1  # bf16 rounding only
    # remat changes memory, not values: gradients of a remat model equal the plain one's.
    from flax import nnx

    def loss(model):
        return model(jnp.asarray(ids), jnp.asarray(mask)).mean()

    plain = from_pretrained(str(tmp_path))
    rem = from_pretrained(str(tmp_path), remat=True)
    g1 = nnx.grad(loss)(plain)
    g2 = nnx.grad(loss)(rem)
    for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def _bf16(a):
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("out_dtype", [None, jnp.float32])
def test_dense_bf16_values_and_gradients_match_fp32_math(transpose_w, out_dtype):
    """``dense`` on bf16 operands (the CPU's custom-VJP path): the value is the fp32 product of the bf16 inputs
    rounded to the output dtype, and the gradients are the fp32 products of the bf16 inputs and the bf16-rounded
    cotangent, rounded to bf16 (NumPy float64 reference; tolerance = bf16 rounding, 2^-8 relative)."""
    from jaxrlhf.models.decoder import dense

    rng = np.random.default_rng(0)
    x = _bf16(rng.normal(size=(3, 5, 16)))
    w = _bf16(rng.normal(size=(8, 16) if transpose_w else (16, 8)))
    g = rng.normal(size=(3, 5, 8))
    wm = w.T if transpose_w else w

    def f(x, w):
        y = dense(x, w, out_dtype=out_dtype, transpose_w=transpose_w)
        return jnp.sum(y.astype(jnp.float32) * g), y

    (_, y), (dx, dw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(x, jnp.bfloat16),
                                                                          jnp.asarray(w, jnp.bfloat16))
    assert y.dtype == (out_dtype or jnp.bfloat16) and dx.dtype == dw.dtype == jnp.bfloat16
    ref_y = x.astype(np.float64) @ wm
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, rtol=2**-8, atol=1e-6)
    gb = _bf16(g).astype(np.float64)
    ref_dx = gb @ wm.T
    ref_dw = x.reshape(-1, 16).T.astype(np.float64) @ gb.reshape(-1, 8)
    np.testing.assert_allclose(np.asarray(dx, np.float64), ref_dx, rtol=2**-7, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float64), ref_dw.T if transpose_w else ref_dw, rtol=2**-7,
                               atol=1e-2)


def test_bf16_cast_parameters_compute_in_bf16_with_bf16_gemms(tmp_path):
    """fp32 parameters cast to bf16 (what ``--bf16`` train steps and rollouts do) run the forward in bf16 (the
    embedding lookup once promoted it back to fp32, silently), and on the CPU every Linear's three GEMMs (forward,
    input and weight gradients) keep 16-bit operands in the compiled program: XLA:CPU upcasts a dot it cannot hand
    to its bf16 kernels to fp32 (4-6x slower), which this test would see."""
    import re

    from flax import nnx

    from jaxrlhf.models.decoder import Linear
    from jaxrlhf.train.optim import cast_floating

    save_tiny("llama3", tmp_path)
    ids, mask = left_padded_batch()
    model = from_pretrained(str(tmp_path))
    graphdef, state = nnx.split(model)
    params = cast_floating(nnx.to_pure_dict(state), jnp.bfloat16)
    h, _ = nnx.merge(graphdef, params).hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    assert h.dtype == jnp.bfloat16

    def loss(p):
        return nnx.merge(graphdef, p)(jnp.asarray(ids), jnp.asarray(mask)).mean()

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    sigs = {m.group(1): m.group(2) for m in re.finditer(r"^(%[\w.\-]+) \((.*?)\) ->", hlo, re.M)}
    bf16_dots = 0
    for line in hlo.splitlines():
        m = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
        if m:
            comp = next((c for c, sig in sigs.items() if f"{m.group(1)}: " in sig), None)
            bf16_dots += comp is not None and all(f"{p}: bf16" in sigs[comp] for p in m.groups())
    linears = sum(isinstance(x, Linear) for _, x in nnx.iter_graph(model))
    assert bf16_dots >= 3 * linears, f"{bf16_dots} bf16 GEMMs for {linears} Linear layers (3 each expected)"


def test_attention_bf16_custom_backward_matches_fp32_autodiff():
    """``_attend_lowp`` (bf16 training attention on the CPU, a hand-written backward) against autodiff of the fp32
    attention on the same bf16-rounded inputs: values and q/k/v gradients within bf16 rounding (2^-6 of the
    largest entry), grouped queries (K=2, G=3), a causal mask with left padding (fully masked rows included)."""
    from jaxrlhf.models.decoder import _attend, _attend_lowp

    rng = np.random.default_rng(1)
    B, T, K, G, E = 2, 7, 2, 3, 16
    q, k, v = (_bf16(rng.normal(size=s)) for s in ((B, T, K, G, E), (B, T, K, E), (B, T, K, E)))
    mask = np.ones((B, T), bool)
    mask[1, :3] = False
    allowed = jnp.asarray(np.tril(np.ones((T, T), bool))[None] & mask[:, None, :])
    g = rng.normal(size=(B, T, K, G, E))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, allowed).astype(jnp.float32) * g)

    want = jax.value_and_grad(lambda *a: loss(lambda *b: _attend(*b)[0], *a), argnums=(0, 1, 2))(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    got = jax.value_and_grad(lambda *a: loss(_attend_lowp, *a), argnums=(0, 1, 2))(
        *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    assert all(x.dtype == jnp.bfloat16 for x in got[1])
    for w, o in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        w, o = np.asarray(w, np.float64), np.asarray(o, np.float64)
        assert np.abs(w - o).max() <= 2**-6 * max(np.abs(w).max(), 1.0), (np.abs(w - o).max(), np.abs(w).max())
