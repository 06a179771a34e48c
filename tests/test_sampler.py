"""JaxSampler against independent references: step-by-step argmax / log-softmax of the FULL forward pass (no KV
cache, no left padding), chi-square tests of the sampling distribution, and the weight-update round trip.

Every distinct (batch, settings) compiles a program (~3 s here), so the tests share module-scoped samplers and
reuse the same few settings.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from converters.hf import hf_entries, hf_tensors
from jaxrlhf.models import from_pretrained
from jaxrlhf.rollout import Completion, Engine, JaxSampler, SamplingParams
from sharding import make_mesh
from tests.tiny import save_tiny

PROMPT_LEN = 8  # max_prompt_len
MAX_TOKENS = 8
PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14], [33]]  # ragged; 3 rows -> padded to 4 on the 4x2 mesh
LOGPROB_TOL = 1e-5
TINY_EOS = 2


# ------------------------------------------------------------------ references (full forward, no cache)
class FullForward:
    """Logits of unpadded sequences from the full forward pass: rows right-padded to one fixed shape (causal
    attention makes right padding invisible to earlier positions), so one compile serves every call."""

    def __init__(self, model, rows: int = 8, length: int = PROMPT_LEN + MAX_TOKENS):
        self.rows, self.length = rows, length
        self.fn = jax.jit(lambda ids: model(ids))

    def last_logits(self, seqs: list[list[int]]) -> np.ndarray:
        """fp32 logits ``[len(seqs), V]`` at each sequence's last token."""
        assert len(seqs) <= self.rows
        ids = np.zeros((self.rows, self.length), np.int32)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = s
        logits = np.asarray(self.fn(jnp.asarray(ids)))
        return np.stack([logits[r, len(s) - 1] for r, s in enumerate(seqs)])

    def all_logits(self, seq: list[int]) -> np.ndarray:
        ids = np.zeros((self.rows, self.length), np.int32)
        ids[0, :len(seq)] = seq
        return np.asarray(self.fn(jnp.asarray(ids)))[0, :len(seq)]


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reference_greedy(ref: FullForward, prompts, steps: int) -> list[list[int]]:
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        for s, z in zip(seqs, ref.last_logits(seqs)):
            s.append(int(np.argmax(z)))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def truncate_at(tokens: list[int], stop: set[int]) -> tuple[list[int], str]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i + 1], "stop"
    return tokens, "length"


def reference_logprobs(ref: FullForward, prompt, tokens, temperature: float) -> np.ndarray:
    z = ref.all_logits(list(prompt) + list(tokens))[len(prompt) - 1:-1]  # logits that produced each token
    return log_softmax(z / temperature)[np.arange(len(tokens)), tokens]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-llama3"))
    save_tiny("llama3", path)
    plain = from_pretrained(path)
    ref = FullForward(plain)
    greedy = reference_greedy(ref, PROMPTS, MAX_TOKENS)
    # A stop id the greedy path emits: prompt 0's first token (after step 0) not seen before in its continuation.
    g0 = greedy[0]
    eos = next((t for j, t in enumerate(g0) if j >= 1 and t not in g0[:j]), g0[0])
    mesh = make_mesh("4x2")
    sharded = from_pretrained(path, mesh=mesh)
    sampler = JaxSampler(sharded, mesh=mesh, pad_token_id=0, eos_token_ids=[TINY_EOS], max_prompt_len=PROMPT_LEN)
    unsharded = JaxSampler(plain, pad_token_id=0, eos_token_ids=[eos], max_prompt_len=PROMPT_LEN)
    return dict(path=path, plain=plain, ref=ref, greedy=greedy, eos=eos, mesh=mesh, sharded=sharded,
                sampler=sampler, unsharded=unsharded)


def greedy_params(eos: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=(eos,))


def check_greedy(out: list[Completion], setup, stop: set[int]):
    assert [c.prompt_index for c in out] == [0, 1, 2]
    for i, c in enumerate(out):
        want, reason = truncate_at(setup["greedy"][i], stop)
        assert c.token_ids == want, f"prompt {i}: sampler {c.token_ids} != full-forward argmax {want}"
        assert c.finish_reason == reason
        lp = reference_logprobs(setup["ref"], PROMPTS[i], c.token_ids, 1.0)
        np.testing.assert_allclose(c.logprobs, lp, atol=LOGPROB_TOL, rtol=0)
    assert any(c.finish_reason == "stop" for c in out)  # the chosen eos ends prompt 0


# ------------------------------------------------------------------ (a) greedy == full-forward argmax
def test_greedy_matches_full_forward_sharded(setup):
    sampler = setup["sampler"]
    assert isinstance(sampler, Engine)
    out = sampler.generate(PROMPTS, greedy_params(setup["eos"]))
    check_greedy(out, setup, {TINY_EOS, setup["eos"]})
    stats_ = sampler.last_stats
    assert stats_["tokens_generated"] == sum(len(c.token_ids) for c in out) and stats_["tokens_per_s"] > 0


def test_greedy_matches_full_forward_unsharded(setup):
    out = setup["unsharded"].generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    check_greedy(out, setup, {setup["eos"]})  # the eos comes from eos_token_ids here, not stop_token_ids


def test_prompt_buckets_pad_less_and_change_nothing(setup):
    """Prompts of at most 3 tokens padded to bucket 4 (not max_prompt_len 8): the same greedy tokens and
    log-probs; a call with an 8-token prompt falls back to 8 (the cap); one program per prompt length."""
    from jaxrlhf.rollout import JaxSampler

    sampler = JaxSampler(setup["plain"], pad_token_id=0, eos_token_ids=[setup["eos"]], max_prompt_len=PROMPT_LEN,
                         prompt_buckets=(4,))
    short = [PROMPTS[0], PROMPTS[2]]
    out = sampler.generate(short, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    full = setup["unsharded"].generate(short, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    assert [c.token_ids for c in out] == [c.token_ids for c in full]
    np.testing.assert_allclose(np.concatenate([c.logprobs for c in out]),
                               np.concatenate([c.logprobs for c in full]), atol=LOGPROB_TOL, rtol=0)
    sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    assert sorted(shape[1] for shape, _ in sampler._programs) == [4, 8]


# ------------------------------------------------------------------ (b) + (c) sampling: logprobs, n, seeds
def sample(sampler, seed: int, temperature: float = 1.0, n: int = 2):
    return sampler.generate(PROMPTS, SamplingParams(n=n, temperature=temperature, max_tokens=MAX_TOKENS, seed=seed))


def test_sampled_logprobs_match_full_forward(setup):
    for temperature in (0.7, 1.0):
        out = sample(setup["sampler"], seed=3, temperature=temperature)
        for c in out:
            lp = reference_logprobs(setup["ref"], PROMPTS[c.prompt_index], c.token_ids, temperature)
            np.testing.assert_allclose(c.logprobs, lp, atol=LOGPROB_TOL, rtol=0,
                                       err_msg=f"T={temperature} prompt {c.prompt_index}")
            assert all(isinstance(x, float) for x in c.logprobs)


def test_n_samples_prompt_major_and_seeded(setup):
    sampler = setup["sampler"]
    a = sample(sampler, seed=0)
    assert len(a) == len(PROMPTS) * 2
    assert [c.prompt_index for c in a] == [0, 0, 1, 1, 2, 2]
    for c in a:
        assert len(c.token_ids) == len(c.logprobs) <= MAX_TOKENS
        assert (c.finish_reason == "stop") == (c.token_ids[-1] == TINY_EOS)
        assert c.finish_reason == "stop" or len(c.token_ids) == MAX_TOKENS
    assert sum(a[2 * i].token_ids != a[2 * i + 1].token_ids for i in range(3)) >= 2, "samples of a prompt agree"
    b = sample(sampler, seed=0)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]
    c = sample(sampler, seed=1)
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # Chunked execution (4 rows per program, padded) gives the same samples: keys depend on the row, not the batch.
    chunked = JaxSampler(setup["sharded"], mesh=setup["mesh"], pad_token_id=0, eos_token_ids=[TINY_EOS],
                         max_prompt_len=PROMPT_LEN, max_batch_size=4)
    d = sample(chunked, seed=0)
    # a prefilled each prompt once for its 2 rows (group 2); chunked batches of 4 rows on 4 data shards cannot
    # split into whole groups, so d prefilled every row: the two paths give the same samples
    assert {key[0][2] for key in sampler._programs} >= {2} and {key[0][2] for key in chunked._programs} == {1}
    assert [x.token_ids for x in a] == [x.token_ids for x in d]
    for x, y in zip(a, d):  # rows may differ in length (a stop token)
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=LOGPROB_TOL)


# ------------------------------------------------------------------ (d) top_k=1 / tiny top_p == greedy
def test_top_k_1_and_tiny_top_p_equal_greedy(setup):
    sampler = setup["unsharded"]  # (unsharded programs compile faster; sampling on the mesh is tested above)
    greedy = sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    for extra in (dict(top_k=1), dict(top_p=1e-6)):
        out = sampler.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=5, **extra))
        assert [c.token_ids for c in out] == [c.token_ids for c in greedy], extra
        # logprobs are of the T=1 distribution before truncation, i.e. the greedy ones (T=1)
        np.testing.assert_allclose([c.logprobs for c in out][0], greedy[0].logprobs, atol=LOGPROB_TOL)


# ------------------------------------------------------------------ (e) sampling statistics
def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit; bins with expected count < 5 are merged into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(stats.chi2.sf(stat, keep.sum() - 1))


def filtered_probs(z: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Reference top-k then top-p on the renormalised distribution, written as a plain sort/loop."""
    p = np.exp(log_softmax(z / temperature))
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    keep[order[:top_k]] = True
    q = np.where(keep, p, 0.0) / p[keep].sum()
    mass = 0.0
    nucleus = np.zeros_like(keep)
    for i in order:
        if not keep[i] or mass >= top_p:
            break
        nucleus[i] = True
        mass += q[i]
    out = np.where(nucleus, q, 0.0)
    return out / out.sum()


def test_one_step_frequencies_match_softmax(setup):
    sampler, rows = setup["sampler"], 4000
    prompt = PROMPTS[0]
    z = setup["ref"].last_logits([prompt])[0]
    V = z.shape[0]

    def counts(**kw):
        out = sampler.generate([prompt], SamplingParams(n=rows, max_tokens=1, seed=11, **kw))
        assert len(out) == rows and all(len(c.token_ids) == 1 for c in out)
        return np.bincount([c.token_ids[0] for c in out], minlength=V)

    for temperature in (1.0, 0.25):
        c = counts(temperature=temperature)
        p = np.exp(log_softmax(z / temperature))
        assert chi2_pvalue(c, p) > 1e-3, f"T={temperature}: frequencies do not match softmax(z/T)"
    # The test has power: the T=0.25 samples are rejected against the T=1 distribution.
    assert chi2_pvalue(c, np.exp(log_softmax(z))) < 1e-6

    c = counts(temperature=0.5, top_k=10, top_p=0.6)
    p = filtered_probs(z, 0.5, 10, 0.6)
    assert c[p == 0].sum() == 0, "sampled a token outside the top-k/top-p support"
    assert 2 <= (p > 0).sum() < 10, "pick settings where top_p actually truncates the top-k set"
    assert chi2_pvalue(c, p) > 1e-3


# ------------------------------------------------------------------ (f) update_weights
def test_update_weights_round_trip(setup):
    sampler, eos, model = setup["sampler"], setup["eos"], setup["sharded"]
    params = nnx.to_pure_dict(nnx.split(model)[1])
    before = sampler.generate(PROMPTS, greedy_params(eos))
    original = list(hf_tensors(params, model.cfg))
    rng = np.random.default_rng(0)
    perturbed = [(name, (x + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)) for name, x in original]
    sampler.update_weights(iter(perturbed))  # numpy arrays, from a generator
    changed = sampler.generate(PROMPTS, greedy_params(eos))
    assert [c.token_ids for c in changed] != [c.token_ids for c in before]
    q = sampler._params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding == params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].sharding
    sampler.update_weights((name, jnp.asarray(x)) for name, x in original)  # jax arrays on one device
    restored = sampler.generate(PROMPTS, greedy_params(eos))
    assert [c.token_ids for c in restored] == [c.token_ids for c in before]
    assert [c.logprobs for c in restored] == [c.logprobs for c in before]
    sampler.update_weights(iter(perturbed))
    sampler.update_weights(hf_entries(params, model.cfg, gather=False))  # as PPO syncs: Flax layout, sharded
    assert [c.token_ids for c in sampler.generate(PROMPTS, greedy_params(eos))] == [c.token_ids for c in before]

    with pytest.raises(ValueError, match="unknown tensor 'model.layers.9.mlp.up_proj.weight'"):
        sampler.update_weights([("model.layers.9.mlp.up_proj.weight", original[0][1])])
    with pytest.raises(ValueError, match="unknown tensor 'score.weight'"):
        sampler.update_weights([("score.weight", np.zeros((1, 64), np.float32))])
    name, x = next((n, a) for n, a in original if n.endswith("q_proj.weight"))
    with pytest.raises(ValueError, match=r"has shape \(32, 64\), the sampler's model expects \(64, 64\)"):
        sampler.update_weights([(name, x[:32])])


# ------------------------------------------------------------------ input errors (no compile)
def test_bad_inputs(setup):
    sampler = setup["sampler"]
    with pytest.raises(ValueError, match="more than max_prompt_len=8"):
        sampler.generate([[5] * 9], SamplingParams())
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate([[5], []], SamplingParams())
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_donated_params_and_close_are_reported(setup):
    model = from_pretrained(setup["path"])
    sampler = JaxSampler(model, pad_token_id=0, eos_token_ids=[TINY_EOS], max_prompt_len=PROMPT_LEN)
    original = list(hf_tensors(nnx.to_pure_dict(nnx.split(model)[1]), model.cfg))
    model.model.norm.scale[...].delete()  # what a donating train step does to the shared buffer
    with pytest.raises(RuntimeError, match="model/norm/scale' was deleted.*call update_weights"):
        sampler.generate(PROMPTS, SamplingParams())
    sampler.update_weights(original)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(sampler._params))
    sampler.close()
    with pytest.raises(RuntimeError, match="closed"):
        sampler.generate(PROMPTS, SamplingParams())


# ------------------------------------------------------------------ sampling primitives and bf16 rollouts
def test_inverse_cdf_sample_and_first_argmax_match_numpy():
    """``inverse_cdf_sample`` picks the first index whose cumulative probability exceeds ``u * total`` (a float64
    NumPy loop; ``u`` values within 1e-4 of a boundary are skipped as rounding-dependent), never a zero-probability
    entry, over a vocabulary that is not a multiple of the block; ``first_argmax`` equals ``np.argmax`` (ties:
    the first)."""
    from jaxrlhf.rollout.jax_sampler import first_argmax, inverse_cdf_sample

    rng = np.random.default_rng(0)
    V, rows = 1000, 64
    probs = rng.random((rows, V)) * (rng.random((rows, V)) < 0.3)  # unnormalised, 70% zeros
    probs[:, 5] = 0.0
    u = rng.random(rows)
    got = np.asarray(inverse_cdf_sample(jnp.asarray(probs, jnp.float32), jnp.asarray(u, jnp.float32), block=64))
    p32 = probs.astype(np.float32).astype(np.float64)
    checked = 0
    for r in range(rows):
        cum = np.cumsum(p32[r])
        target = u[r] * cum[-1]
        assert p32[r, got[r]] > 0
        if np.min(np.abs(cum - target)) < 1e-4 * cum[-1]:
            continue
        assert got[r] == int(np.argmax(cum > target)), r
        checked += 1
    assert checked >= rows - 4
    x = rng.integers(0, 5, (rows, 37)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_bf16_compute_dtype_equals_a_bf16_model(setup):
    """``compute_dtype=bf16`` over fp32 parameters (``--bf16`` rollouts; the parameters stay fp32) samples exactly
    what a sampler over the bf16-cast model samples, with a bf16 KV cache."""
    plain = setup["plain"]
    mixed = JaxSampler(plain, pad_token_id=0, eos_token_ids=[TINY_EOS], max_prompt_len=PROMPT_LEN,
                       compute_dtype=jnp.bfloat16)
    params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), nnx.to_pure_dict(nnx.split(plain)[1]))
    model16 = from_pretrained(setup["path"], dtype=jnp.bfloat16)
    nnx.update(model16, params16)
    pure16 = JaxSampler(model16, pad_token_id=0, eos_token_ids=[TINY_EOS], max_prompt_len=PROMPT_LEN)
    assert mixed.cache_dtype == pure16.cache_dtype == jnp.bfloat16
    assert jax.tree_util.tree_leaves(mixed._params)[0].dtype == jnp.float32
    a, b = (s.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_tokens=MAX_TOKENS, seed=4))
            for s in (mixed, pure16))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-6)
