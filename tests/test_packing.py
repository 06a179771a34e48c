"""--packing_samples: packed rows give every sample the logits it has alone, and the same loss and gradients.

References: transformers' PyTorch Llama run on each sample by itself (logits), NumPy log-softmax over those logits
(the SFT loss), the padded layout through the same JAX code (loss and gradients), hand-written expected arrays.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxrlhf.data.loader import right_pad
from jaxrlhf.data.packing import PackedDataset, pack_lengths
from jaxrlhf.models import from_pretrained
from jaxrlhf.models.decoder import segment_positions
from jaxrlhf.sft import sft_loss
from tests.tiny import save_tiny

LENGTHS = [5, 9, 3, 7, 12, 4, 6, 2]
ROW_LEN = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("packing")
    hf = save_tiny("llama3", path)  # llama3 RoPE scaling: wrong positions would show
    rng = np.random.RandomState(0)
    seqs = [list(rng.randint(3, 96, n)) for n in LENGTHS]
    masks = []
    for n in LENGTHS:
        m = (rng.rand(n) < 0.7).astype(int)
        m[0] = 0
        m[-1] = 1
        masks.append(list(m))
    return {"path": str(path), "hf": hf, "seqs": seqs, "masks": masks}


def padded_batch(seqs, masks):
    ids, attn = right_pad(seqs, 0, length=ROW_LEN)
    lm, _ = right_pad(masks, 0, length=ROW_LEN)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": lm.astype(np.float32),
            "num_tokens": np.float32(lm.sum())}


def test_pack_lengths_hand_example_and_invariants():
    # best-fit decreasing by hand: 9 -> row0 (7 left); 7 -> row0 (0 left); 6 -> row1 (10); 5 -> row1 (5);
    # 4 -> row1 (1); 3 -> row2 (13); 2 -> row2 (11)
    assert pack_lengths([5, 9, 3, 7, 6, 4, 2], 16) == [[1, 3], [4, 0, 5], [2, 6]]
    rng = np.random.RandomState(1)
    for _ in range(20):
        lengths = list(rng.randint(1, 33, rng.randint(1, 60)))
        rows = pack_lengths(lengths, 32)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in r) <= 32 for r in rows)
        # best fit never leaves two rows that could have been one
        fills = sorted(sum(lengths[i] for i in r) for r in rows)
        assert len(fills) < 2 or fills[0] + fills[1] > 32
    with pytest.raises(ValueError, match="sample 1 has 40 tokens, more than the row length 32"):
        pack_lengths([3, 40], 32)


def test_packed_arrays_by_hand():
    ds = PackedDataset([[5, 6, 7], [8, 9], [4]], [[0, 1, 1], [1, 1], [1]], row_len=8, pad_id=0)
    assert ds.rows == [[0, 1, 2]]
    b = ds.batch([0])
    np.testing.assert_array_equal(b["input_ids"], [[5, 6, 7, 8, 9, 4, 0, 0]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 1, 1, 1, 0, 0]])
    # a segment's first token is never a target, whatever the given mask says (no loss across a boundary)
    np.testing.assert_array_equal(b["loss_mask"], [[0, 1, 1, 0, 1, 0, 0, 0]])
    assert b["num_tokens"] == 3
    # the decoder's own positions for a packed row agree
    np.testing.assert_array_equal(np.asarray(segment_positions(jnp.asarray(b["segment_ids"]))), b["positions"])
    with pytest.raises(ValueError, match="sample 0: 3 tokens but a loss mask of 2"):
        PackedDataset([[1, 2, 3]], [[0, 1]], row_len=8, pad_id=0)


def test_each_segment_gets_the_logits_it_has_alone_in_transformers(setup):
    model = from_pretrained(setup["path"])
    packed = PackedDataset(setup["seqs"], setup["masks"], row_len=ROW_LEN, pad_id=0)
    b = packed.batch(np.arange(len(packed)))
    logits = np.asarray(model(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]),
                              jnp.asarray(b["positions"]), segment_ids=jnp.asarray(b["segment_ids"])))
    # positions left to the decoder (derived from the segment ids) give the same logits
    derived = np.asarray(model(jnp.asarray(b["input_ids"]), segment_ids=jnp.asarray(b["segment_ids"])))
    np.testing.assert_array_equal(derived, logits)
    checked = 0
    for r, row in enumerate(packed.rows):
        t = 0
        for i in row:
            n = len(setup["seqs"][i])
            with torch.no_grad():
                ref = setup["hf"](torch.tensor([setup["seqs"][i]])).logits[0].numpy()
            np.testing.assert_allclose(logits[r, t:t + n], ref, atol=1e-4, rtol=1e-4)
            t += n
            checked += 1
    assert checked == len(LENGTHS) and len(packed) < len(LENGTHS)  # several samples did share rows


def test_attention_never_crosses_a_segment(setup):
    model = from_pretrained(setup["path"])
    packed = PackedDataset(setup["seqs"], setup["masks"], row_len=ROW_LEN, pad_id=0)
    b = packed.batch(np.arange(len(packed)))
    r = next(k for k, row in enumerate(packed.rows) if len(row) >= 2)
    seg = b["segment_ids"][r]
    ids = b["input_ids"].copy()
    ids[r, seg == 1] = (ids[r, seg == 1] + 17) % 93 + 3  # change every token of the first segment
    args = dict(attention_mask=jnp.asarray(b["attention_mask"]), positions=jnp.asarray(b["positions"]),
                segment_ids=jnp.asarray(b["segment_ids"]))
    before = np.asarray(model(jnp.asarray(b["input_ids"]), **args))[r]
    after = np.asarray(model(jnp.asarray(ids), **args))[r]
    assert np.abs(before[seg == 1] - after[seg == 1]).max() > 1e-3  # the edit matters where it is...
    np.testing.assert_array_equal(before[seg > 1], after[seg > 1])  # ...and nowhere else (masked keys weigh 0)


def test_packed_loss_and_gradients_equal_padded_and_numpy(setup):
    model = from_pretrained(setup["path"])
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    packed = PackedDataset(setup["seqs"], setup["masks"], row_len=ROW_LEN, pad_id=0)
    pk = packed.batch(np.arange(len(packed)))
    pd = padded_batch(setup["seqs"], setup["masks"])
    assert pk["num_tokens"] == pd["num_tokens"] == sum(sum(m) for m in setup["masks"])

    def loss_of(p, b):
        return sft_loss(nnx.merge(graphdef, p), {k: jnp.asarray(v) for k, v in b.items()})[0]

    loss_pk, g_pk = jax.value_and_grad(loss_of)(params, pk)
    loss_pd, g_pd = jax.value_and_grad(loss_of)(params, pd)

    # NumPy reference: -sum(mask * log_softmax(torch logits)[next token]) / sum(mask), sample by sample
    total, count = 0.0, 0
    for s, m in zip(setup["seqs"], setup["masks"]):
        with torch.no_grad():
            z = setup["hf"](torch.tensor([s])).logits[0].numpy().astype(np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(1, len(s)):
            total -= m[t] * logp[t - 1, s[t]]
            count += m[t]
    ref = total / count
    assert abs(float(loss_pk) - ref) < 1e-5 * abs(ref), (float(loss_pk), ref)
    assert abs(float(loss_pd) - ref) < 1e-5 * abs(ref), (float(loss_pd), ref)
    leaves_pk, leaves_pd = jax.tree_util.tree_leaves(g_pk), jax.tree_util.tree_leaves(g_pd)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in leaves_pd)
    for a, b in zip(leaves_pk, leaves_pd):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=1e-4)
