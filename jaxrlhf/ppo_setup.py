"""The PPO entry point's wiring: ``PPOConfig`` -> the parts its loop uses (jaxrlhf/ppo.py is the only caller).

``build`` loads the prompts, the models of each role (actor, reference, critic, reward models / reward function),
compiles the jitted forwards and steps from explicit arguments (train/ppo_step.py), starts the rollout engine behind
a ``RolloutClient``, and resumes (or refuses) from ``--ckpt_path`` through the shared run infrastructure
(train/run.py). The library modules it calls never see the config.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from jaxrlhf.advantages import ESTIMATORS


@dataclass
class Parts:
    """What ``build`` returns: everything the loop reads, built once."""

    data: Any  # PromptDataset
    batches: Any  # BatchIterator over prompt indices (its position is checkpointed)
    total_steps: int
    updates_per_step: int
    on_policy: bool  # the update computes the old log-probs itself (ppo_step.policy_loss_fn): no actor forward
    dp: int
    mesh: Any  # the main mesh
    model_cfg: Any
    tokenizer: Any
    state: Any  # the (resumed) PPOState
    actor_step: Callable
    critic_step: Callable | None
    forwards: list  # (names, jitted ({name: params}, rows) -> {name: [b, R]}): old_logp, ref_logp, values
    ref_params: Any
    ref_zero_b: Any  # with LoRA: the zero lora_b leaves that turn the actor into the reference (else None)
    lora: dict  # role -> its LoraSpec (actor / critic with LoRA), for the export
    reward_models: Any
    remote_reward: Any
    client: Any  # RolloutClient
    pipeline: Any  # rollout.pipeline.AsyncRollouts with --async_train, else None
    actor_lr: Callable
    ckpt: Any
    logger: Any
    fingerprint: dict

    def compile_count(self) -> int:
        """Programs compiled so far by the train steps, the forwards and the JAX sampler (one per distinct shape)."""
        fns = [self.actor_step, self.critic_step, *(f for _, f in self.forwards)]
        return sum(len(f.compiled) for f in fns if f is not None) + self.client.compile_count()


def _split(model):
    from flax import nnx

    graphdef, state = nnx.split(model)
    return graphdef, state.to_pure_dict()


def _critic_source(cfg) -> str:
    return cfg.critic_pretrain or (cfg.reward_pretrain.split(",")[0] if cfg.reward_pretrain else cfg.pretrain)


def _critic(cfg, mesh, actor_lora):
    """The critic (value head on ``_critic_source``); with a LoRA actor, fresh adapters of the actor's shape on it
    (OpenRLHF: the same LoRA flags for both), on an NF4 base too with --load_in_4bit."""
    import jax.numpy as jnp

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.train.lora import add_lora

    critic = from_pretrained(_critic_source(cfg), mesh=mesh, dtype=jnp.float32, head="score",
                             value_head_prefix=cfg.value_head_prefix, remat=cfg.gradient_checkpointing, seed=cfg.seed)
    if actor_lora is None:
        return critic
    return add_lora(critic, lora_rank=actor_lora.rank, lora_alpha=actor_lora.alpha,
                    target_modules=list(actor_lora.targets), lora_path=None, seed=cfg.seed + 1, mesh=mesh,
                    load_in_4bit=cfg.load_in_4bit, lora_dropout=cfg.lora_dropout,
                    double_quant=cfg.bnb_4bit_use_double_quant)


def build(cfg, meshes: dict, run: contextlib.ExitStack) -> Parts:
    """Every part of a PPO run (module docstring); engines, checkpointer and logger are closed by ``run``."""
    import jax
    import jax.numpy as jnp

    from jaxrlhf.data.loader import BatchIterator
    from jaxrlhf.data.tokenizer import load_tokenizer
    from jaxrlhf.models import ModelConfig, from_pretrained
    from jaxrlhf.rewards import load_rewards, require_reward
    from jaxrlhf.rollout.setup import load_prompts
    from jaxrlhf.train.ppo_step import PPOState
    from jaxrlhf.train.run import prepare_outputs, total_steps_of
    from sharding import batch_ways, placement

    mesh = meshes["main"]
    dp = batch_ways(mesh)
    require_reward(cfg)
    if cfg.prompt_data is None:
        raise ValueError("--prompt_data is required with --pretrain")
    prepare_outputs(cfg.save_path, "actor", "critic")
    compute_dtype = jnp.bfloat16 if cfg.bf16 else None
    if os.path.isdir(cfg.pretrain):
        ModelConfig.from_dir(cfg.pretrain)  # a broken config.json is named as such, not as a tokenizer failure
    tokenizer = load_tokenizer(cfg.pretrain)
    data = load_prompts(cfg, tokenizer, apply_chat_template=cfg.apply_chat_template, input_template=cfg.input_template,
                        max_samples=cfg.max_samples, seed=cfg.seed, rollout_batch_size=cfg.rollout_batch_size)
    batches = BatchIterator(len(data), cfg.rollout_batch_size, seed=cfg.seed)
    total_steps = total_steps_of(batches.batches_per_epoch, cfg.num_episodes, cfg.max_steps)
    updates_per_step = cfg.max_epochs * cfg.rollout_batch_size * cfg.n_samples_per_prompt // cfg.train_batch_size
    # One update per rollout and no reference (no KL term needs them): the old log-probs are the update's own.
    on_policy = updates_per_step == 1 and not cfg.needs_reference
    if on_policy:
        print("[ppo] on-policy: one optimizer update per rollout and no reference model, so the old log-probs are "
              "taken from the update's own forward (stop-gradient; same gradient) and the experience pass skips "
              "the actor", file=sys.stderr)

    actor = cfg.attach_lora(from_pretrained(cfg.pretrain, mesh=mesh, dtype=jnp.float32, head="lm",
                                            remat=cfg.gradient_checkpointing), mesh=mesh)
    model_cfg, lora = actor.cfg, {"actor": actor.lora}
    actor_def, actor_params = _split(actor)
    ref_def = ref_params = ref_zero_b = None
    if cfg.needs_reference and actor.lora is not None:  # the actor's own base: its arrays with B = 0 (no 2nd copy)
        from jaxrlhf.models.lora import zero_adapters

        ref_zero_b = zero_adapters(actor_params)
        print("[ppo] LoRA: the reference model is the actor's base (its adapters off), no second copy",
              file=sys.stderr)
    elif cfg.needs_reference:  # a separate frozen copy (the actor's buffers are donated on update), in the compute
        # dtype; on its own devices with --ref_mesh, in host memory between experience passes with --ref_offload
        ref_def, ref_params = _split(from_pretrained(cfg.pretrain, mesh=meshes.get("ref", mesh), head="lm",
                                                     dtype=compute_dtype or jnp.float32))
    critic_def = critic_params = None
    if ESTIMATORS[cfg.advantage_estimator].critic:
        critic = _critic(cfg, mesh, actor.lora)
        lora["critic"] = critic.lora
        critic_def, critic_params = _split(critic)
        del critic
    rewards = load_rewards(cfg, mesh=meshes.get("reward", mesh), compute_dtype=compute_dtype)
    reward_models, remote_reward = rewards["reward_models"], rewards["remote_reward"]
    if reward_models is not None and cfg.reward_offload:
        reward_models.offload()

    steps = _compile(cfg, mesh=mesh, ref_mesh=meshes.get("ref"), actor=(actor_def, actor_params),
                     ref=(ref_def, ref_params), critic=(critic_def, critic_params), compute_dtype=compute_dtype,
                     total_updates=max(1, total_steps * updates_per_step), on_policy=on_policy,
                     lora=lora, ref_from_actor=ref_zero_b is not None)
    if ref_params is not None and cfg.ref_offload:
        ref_params = placement.offload(ref_params)
    if not cfg.vllm_num_engines:  # the JAX sampler takes HF-named weights: a plain model (LoRA merged)
        from jaxrlhf.train.lora import plain_model

        actor = plain_model(actor, mesh)
    client = _client(cfg, actor, tokenizer, mesh, data, probe_forward=steps.pop("probe"), chunk=(
        cfg.micro_rollout_batch_size * dp), model_cfg=model_cfg, run=run, lora=lora["actor"])
    del actor  # the engine and actor_params hold what is needed
    pipeline = _pipeline(cfg, client, run)

    state = PPOState(actor=actor_params, actor_opt=steps.pop("actor_opt"), critic=critic_params,
                     critic_opt=steps.pop("critic_opt"), kl_coef=cfg.init_kl_coef)
    ckpt, logger, state, fingerprint = _resume(cfg, run, state, batches, data, total_steps, pipeline, mesh)
    return Parts(data=data, batches=batches, total_steps=total_steps, updates_per_step=updates_per_step,
                 on_policy=on_policy, dp=dp, mesh=mesh, pipeline=pipeline, ref_zero_b=ref_zero_b, lora=lora,
                 model_cfg=model_cfg, tokenizer=tokenizer, state=state, ref_params=ref_params,
                 reward_models=reward_models, remote_reward=remote_reward, client=client, ckpt=ckpt, logger=logger,
                 fingerprint=fingerprint, **steps)


def _compile(cfg, *, mesh, ref_mesh, actor, ref, critic, compute_dtype, total_updates: int, on_policy: bool,
             lora: dict, ref_from_actor: bool) -> dict:
    """The jitted pieces: actor/critic train steps and their optimizer states, the frozen forwards, the probe.
    A role in ``lora`` trains its adapters only (+ the critic's value head): the frozen base has no gradient and no
    optimizer state. ``ref_from_actor``: the reference log-probs come from the actor's program and parameters (with
    its adapters zeroed, ``Parts.ref_zero_b``)."""
    from jaxrlhf.train import ppo_step
    from jaxrlhf.train.lora import trainable_with_lora
    from jaxrlhf.train.optim import make_optimizer
    from jaxrlhf.train.steps import init_optimizer, make_forward, make_train_step

    eps_low, eps_high = cfg.eps_clip_low_high or (cfg.eps_clip, cfg.eps_clip)
    policy_loss = ppo_step.policy_loss_fn(temperature=cfg.temperature, eps_clip_low=eps_low,
                                          eps_clip_high=eps_high, dual_clip=cfg.dual_clip,
                                          entropy_coef=cfg.entropy_coef, use_kl_loss=cfg.use_kl_loss,
                                          kl_estimator=cfg.kl_estimator, chunk=cfg.logits_chunk_size,
                                          on_policy=on_policy, policy_loss_type=cfg.policy_loss_type,
                                          loss_agg_mode=cfg.agg_mode, is_correction=cfg.is_correction,
                                          kl_unbiased_gradient=cfg.kl_unbiased_gradient)
    logprobs = ppo_step.logprob_fn(temperature=cfg.temperature, chunk=cfg.logits_chunk_size)

    def trainer(graphdef, params, loss_fn, lr, role, head):
        tx, schedule = make_optimizer(learning_rate=lr, total_steps=total_updates, warmup_ratio=cfg.lr_warmup_ratio,
                                      min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.l2,
                                      betas=tuple(cfg.adam_betas), max_norm=cfg.max_norm)
        trainable = trainable_with_lora(head) if lora.get(role) is not None else None
        opt = init_optimizer(tx, params, mesh, trainable)
        return make_train_step(graphdef, loss_fn, tx, params=params, opt_state=opt, mesh=mesh,
                               compute_dtype=compute_dtype, trainable=trainable, aux_loss_coef=cfg.aux_loss_coef,
                               router_z_loss_coef=cfg.router_z_loss_coef), opt, schedule

    (actor_def, actor_params), (ref_def, ref_params), (critic_def, critic_params) = actor, ref, critic
    out: dict = {"critic_step": None, "critic_opt": None}
    out["actor_step"], out["actor_opt"], out["actor_lr"] = trainer(actor_def, actor_params, policy_loss,
                                                                   cfg.actor_learning_rate, "actor", "lm")
    # The experience pass: the roles on the main mesh in ONE program per micro-batch (one dispatch, one transfer
    # of the results); a reference on its own --ref_mesh in a second one. Only shapes/shardings are kept here.
    defs, fns, shapes = ({}, {}, {}) if on_policy else ({"old_logp": actor_def}, {"old_logp": logprobs},
                                                        {"old_logp": actor_params})
    if ref_from_actor:
        defs["ref_logp"], fns["ref_logp"], shapes["ref_logp"] = actor_def, logprobs, _abstract(actor_params)
    elif ref_params is not None and ref_mesh is None:
        defs["ref_logp"], fns["ref_logp"], shapes["ref_logp"] = ref_def, logprobs, _abstract(ref_params)
    if critic_params is not None:
        out["critic_step"], out["critic_opt"], _ = trainer(
            critic_def, critic_params, ppo_step.value_loss_fn(value_clip=cfg.value_clip),
            cfg.critic_learning_rate, "critic", "score")
        defs["values"], fns["values"], shapes["values"] = critic_def, ppo_step.value_fn(), _abstract(critic_params)
    out["forwards"] = [(tuple(defs), make_forward(defs, _each(fns), params=shapes, mesh=mesh,
                                                  compute_dtype=compute_dtype))] if defs else []
    if ref_params is not None and ref_mesh is not None:  # --ref_mesh: compiled for its own mesh
        out["forwards"].append((("ref_logp",), make_forward(
            {"ref_logp": ref_def}, _each({"ref_logp": logprobs}), params={"ref_logp": _abstract(ref_params)},
            mesh=ref_mesh, compute_dtype=compute_dtype)))
    out["probe"] = make_forward(actor_def, ppo_step.probe_fn(), params=actor_params, mesh=mesh,
                                compute_dtype=compute_dtype)
    return out


def _each(fns: dict) -> Callable:
    """``(models, batch) -> {name: fns[name](models[name], batch)}``: several roles' forwards as one function."""
    return lambda models, batch: {name: fn(models[name], batch) for name, fn in fns.items()}


def _abstract(tree):
    import jax

    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _client(cfg, actor, tokenizer, mesh, data, *, probe_forward, chunk: int, model_cfg, run, lora=None):
    """The rollout engine (JAX sampler or vLLM pool, closed by ``run``) behind a ``RolloutClient``."""
    from jaxrlhf.rollout.client import RolloutClient
    from jaxrlhf.rollout.setup import engine_dtype, lora_sync_mode, make_engine
    from jaxrlhf.rollout.sync_check import default_tolerance

    engine = make_engine(cfg, model=actor, pretrain=cfg.pretrain, tokenizer=tokenizer, mesh=mesh,
                         prompt_max_len=cfg.prompt_max_len, generate_max_len=cfg.generate_max_len, bf16=cfg.bf16,
                         seed=cfg.seed, prompt_buckets=cfg.buckets, lora=lora)
    if engine is not None:
        run.callback(engine.close)
    return RolloutClient(
        engine, collective=not cfg.vllm_num_engines, num_engines=cfg.vllm_num_engines, model_cfg=model_cfg,
        pad_id=tokenizer.pad_token_id, prompt_len=cfg.prompt_max_len, response_len=cfg.generate_max_len,
        sync_check=cfg.vllm_sync_check, probe_prompts=data.batch(list(range(min(4, len(data)))))[1],
        probe_forward=probe_forward, chunk=chunk, tolerance=default_tolerance(engine_dtype(cfg, cfg.bf16)),
        length_buckets=cfg.buckets, lora=lora, lora_sync=lora_sync_mode(cfg, engine, lora))


def _pipeline(cfg, client, run):
    """--async_train's ``AsyncRollouts`` over the vLLM pool (its engine proxied so that syncs take their turn)."""
    from jaxrlhf.rollout.pipeline import AsyncRollouts

    if not cfg.async_train:
        return None
    if not cfg.vllm_num_engines:
        raise ValueError("--async_train overlaps the engines' generation with the update: it needs the vLLM pool "
                         "(--vllm_num_engines >= 1); the JAX sampler runs on the training devices themselves")
    pipeline = AsyncRollouts(client.engine, queue_size=cfg.async_queue_size, partial=cfg.partial_rollout,
                             segment_tokens=cfg.partial_rollout_tokens)
    if client.engine is not None:
        client.engine = pipeline.guard(client.engine)
    run.callback(pipeline.close)
    print(f"[ppo] async training: {cfg.async_queue_size} batch(es) generated ahead of the update"
          + (f", weight syncs every {cfg.partial_rollout_tokens} generated tokens (partial rollout)"
             if cfg.partial_rollout else ""), file=sys.stderr)
    return pipeline


def _replicated(tree, mesh):
    """Host arrays -> jax arrays replicated over ``mesh`` (what a checkpoint's array tree holds)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.tree_util.tree_map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec())), tree)


def checkpoint_trees(state, batches, pipeline, client, mesh, seed: int, fingerprint: dict) -> tuple[dict, dict]:
    """``(arrays, meta)`` of a PPO checkpoint: the state, the data position and, with --async_train, the batches
    generated but not trained on yet (waited for first)."""
    arrays = state.arrays()
    meta = {**state.meta(), "data": batches.state(), "seed": seed, "fingerprint": fingerprint}
    if pipeline is not None:
        pipeline.ready(client)
        arrays["async"], meta["async"] = _replicated(pipeline.arrays(), mesh), pipeline.meta()
    return arrays, meta


def _resume(cfg, run, state, batches, data, total_steps: int, pipeline, mesh):
    """``(checkpointer, logger, state, fingerprint)``: ``state`` restored from ``--ckpt_path`` when resuming (with
    --async_train, the batches in flight too)."""
    from jaxrlhf.train.checkpoint import Checkpointer, abstract_like
    from jaxrlhf.train.run import data_fingerprint, open_logger, resume_step

    ckpt = run.enter_context(Checkpointer(cfg.ckpt_path, max_to_keep=cfg.max_ckpt_num))
    fingerprint = {"trainer": "ppo", "--seed": cfg.seed, "--rollout_batch_size": cfg.rollout_batch_size,
                   "--n_samples_per_prompt": cfg.n_samples_per_prompt, "--train_batch_size": cfg.train_batch_size,
                   "--max_epochs": cfg.max_epochs, "LoRA": cfg.lora_fingerprint(),
                   "--prompt_data": data_fingerprint(data.batch(list(range(min(64, len(data)))))[1], len(data))}
    last = resume_step(ckpt, ckpt_path=cfg.ckpt_path, load_checkpoint=cfg.load_checkpoint, fingerprint=fingerprint,
                       allow_config_change=cfg.allow_config_change)
    if last is not None:
        target = state.arrays()
        saved_async = ckpt.read_meta(last).get("async")
        if pipeline is not None and saved_async:
            import jax

            target["async"] = jax.tree_util.tree_map(
                lambda sd: jax.ShapeDtypeStruct(*sd, sharding=jax.sharding.NamedSharding(
                    mesh, jax.sharding.PartitionSpec())), pipeline.abstract(saved_async),
                is_leaf=lambda x: isinstance(x, tuple))
        elif pipeline is not None or saved_async:
            raise ValueError(f"{cfg.ckpt_path} was written {'without' if pipeline is not None else 'with'} "
                             "--async_train: resume it the same way")
        arrays, meta = ckpt.restore(last, abstract_like(target))
        state = state.restored(arrays, meta)
        batches.load_state(meta["data"])
        if pipeline is not None:
            pipeline.restore(arrays["async"], meta["async"], lambda idx: data.batch(idx)[1])
        print(f"[ckpt] resumed from step {state.step} of {cfg.ckpt_path}", file=sys.stderr)
    logger = run.enter_context(open_logger(cfg, os.path.join(cfg.save_path, "logs"), total_steps=total_steps,
                                           progress_keys=("reward", "kl", "step_time"), resumed=last is not None))
    return ckpt, logger, state, fingerprint


def sampling_params(cfg, step: int, round_index: int = 0):
    """Step ``step``'s sampling (its ``round_index``-th generation round with --dynamic_filtering): the flags, seeded
    from ``--seed``, the step and the round (a resumed run repeats it)."""
    import jax

    from jaxrlhf.rollout import SamplingParams

    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    if round_index:
        key = jax.random.fold_in(key, round_index)
    return SamplingParams(n=cfg.n_samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                          max_tokens=cfg.generate_max_len, seed=int(jax.random.randint(key, (), 0, 2**31 - 1)))


@dataclass
class Batch:
    """Generated samples with their prompts: ``prompts`` / ``labels`` per prompt, ``rollout`` prompt-major (``n``
    rows per prompt), ``version`` [B] the policy version (PPO steps done) that generated each row."""

    prompts: list[str]
    labels: list
    rollout: Any  # rollout.client.Rollout
    version: Any  # np.ndarray [B] int

    def select_groups(self, keep_g, n: int) -> "Batch":
        import numpy as np

        keep_g = np.asarray(keep_g, bool)
        rows = np.repeat(keep_g, n)
        return Batch([x for x, k in zip(self.prompts, keep_g) if k], [x for x, k in zip(self.labels, keep_g) if k],
                     self.rollout.select(rows), self.version[rows])

    @staticmethod
    def concat(parts: list["Batch"], pad_id: int) -> "Batch":
        import numpy as np

        from jaxrlhf.rollout.client import Rollout

        return Batch([x for b in parts for x in b.prompts], [x for b in parts for x in b.labels],
                     Rollout.concat([b.rollout for b in parts], pad_id), np.concatenate([b.version for b in parts]))


def generate_batch(cfg, p: Parts, step: int, round_index: int, version: int, timer) -> Batch:
    """The next ``--rollout_batch_size`` prompts of the data order and the engine's samples of them."""
    import numpy as np

    with timer("data"):
        prompts, prompt_ids, labels = p.data.batch(p.batches.next_batch())
    with timer("generate"):
        rollout = p.client.generate(prompt_ids, sampling_params(cfg, step, round_index))
    return Batch(prompts, labels, rollout, np.full(len(rollout.sequences), version))


def async_batch(cfg, p: Parts, version: int, timer) -> Batch:
    """--async_train's next batch: the oldest in flight (``rollout.pipeline``), after which batches generated by the
    engines' current weights (policy ``version``) are submitted until --async_queue_size are in flight."""
    import numpy as np

    pipe = p.pipeline

    def submit():
        with timer("data"):
            indices = p.batches.next_batch()
            prompt_ids = p.data.batch(indices)[1]
        pipe.submit(indices, prompt_ids, sampling_params(cfg, pipe.submitted), version)

    if not pipe.pending:
        submit()
    with timer("generate"):
        item, rollout = pipe.take(p.client)
    while len(pipe.pending) < pipe.queue_size:
        submit()
    prompts, _, labels = p.data.batch(item.indices)
    return Batch(prompts, labels, rollout, np.full(len(rollout.sequences), item.version))


def score_batch(cfg, p: Parts, batch: Batch, chunk: int):
    """``(reward [B], extra logs)`` of a batch's samples (``experience.score``: reward models and/or function)."""
    from jaxrlhf.train.experience import score

    r = batch.rollout
    return score(r.sequences, r.attention_mask, response_ids=r.response_ids(), chunk=chunk,
                 reward_models=p.reward_models, remote_reward=p.remote_reward, tokenizer=p.tokenizer,
                 prompts=batch.prompts, labels=batch.labels, n_samples=cfg.n_samples_per_prompt,
                 normalize=cfg.normalize_reward)


def collect_batch(next_batch: Callable[[int], Batch], score: Callable[[Batch], tuple], *, n: int, groups: int,
                  dynamic_range: tuple[float, float] | None, max_rounds: int, pad_id: int, timer):
    """``(batch, raw reward [B], extra logs, metrics)``: ``next_batch(round_index)`` generated and ``score``d (phase
    ``reward``). With ``dynamic_range`` (DAPO's dynamic filtering) the prompt groups ``advantages.
    dynamic_filter_groups`` drops are replaced by groups of further rounds, at most ``max_rounds`` more, until
    ``groups`` are kept; a batch still short then is filled with dropped groups (zero advantage under a group
    baseline: no gradient) so that its shape stays fixed."""
    import numpy as np

    from jaxrlhf.advantages import dynamic_filter_groups

    kept, dropped, extras = [], [], []
    num_kept = num_dropped = 0
    for round_index in range(1 + (max_rounds if dynamic_range else 0)):
        batch = next_batch(round_index)
        with timer("reward"):
            reward, info = score(batch)
        if not dynamic_range:
            return batch, reward, info, {}
        extras.append(info)
        keep_g = dynamic_filter_groups(reward, n, *dynamic_range)
        kept.append((batch.select_groups(keep_g, n), reward[np.repeat(keep_g, n)]))
        dropped.append((batch.select_groups(~keep_g, n), reward[np.repeat(~keep_g, n)]))
        num_kept, num_dropped = num_kept + int(keep_g.sum()), num_dropped + int((~keep_g).sum())
        if num_kept >= groups:
            break
    parts = [x for x in kept + dropped if x[0].prompts]
    batch = Batch.concat([b for b, _ in parts], pad_id).select_groups(
        np.arange(sum(len(b.prompts) for b, _ in parts)) < groups, n)
    reward = np.concatenate([r for _, r in parts])[:groups * n]
    info = {k: float(np.mean([e[k] for e in extras if k in e])) for e in extras for k in e}
    metrics = {"dynamic_filtering/rounds": round_index + 1, "dynamic_filtering/dropped_groups": num_dropped,
               "dynamic_filtering/pass_rate": num_kept / max(num_kept + num_dropped, 1),
               "dynamic_filtering/refilled_groups": max(groups - num_kept, 0)}
    return batch, reward, info, metrics


def length_penalties(cfg, reward, rollout) -> tuple:
    """``(reward, metrics)``: the raw rewards with DAPO's overlong penalty (--overlong_buffer_len) and ProRL's
    truncation penalty (--stop_properly_penalty_coef) applied (``advantages.overlong_penalty`` /
    ``stop_properly_penalty``), as OpenRLHF applies them after the rewards and before the advantages."""
    from jaxrlhf.advantages import overlong_penalty, stop_properly_penalty

    metrics = {}
    if cfg.overlong_buffer_len is not None:
        penalty = overlong_penalty(rollout.action_mask.sum(1), max_new_tokens=cfg.generate_max_len,
                                   buffer_len=cfg.overlong_buffer_len, factor=cfg.overlong_penalty_factor)
        reward = reward + penalty
        metrics["penalty/overlong_frac"] = float((penalty < 0).mean())
    if cfg.stop_properly_penalty_coef is not None:
        reward = stop_properly_penalty(reward, rollout.truncated, cfg.stop_properly_penalty_coef)
        metrics["penalty/truncated_frac"] = float(rollout.truncated.mean())
    return reward, metrics


def make_experience_step(cfg, p: Parts, state, batch: Batch, raw, info: dict, timer):
    """``(Experience, reward_stats, metrics)`` of one scored batch: the forwards (reference back on its devices for the
    pass with --ref_offload) in the phase ``experience_forward``, the length penalties, the rewards
    (running-normalised with --normalize_reward and no reward model), the advantages."""
    from jaxrlhf.train.experience import forward_in_chunks, make_experience, running_normalize
    from sharding import placement

    rollout = batch.rollout
    chunk = cfg.micro_rollout_batch_size * p.dp
    ref = placement.onload(p.ref_params) if cfg.ref_offload and p.ref_params is not None else p.ref_params
    if p.ref_zero_b is not None:  # LoRA: the actor's current arrays, adapters off
        from jaxrlhf.models.lora import adapters_off

        ref = adapters_off(state.actor, p.ref_zero_b)
    params = {"old_logp": state.actor, "ref_logp": ref, "values": state.critic}
    with timer("experience_forward"):
        outs = forward_in_chunks([lambda rows, f=f, names=names: f({k: params[k] for k in names}, rows)
                                  for names, f in p.forwards],
                                 rollout.sequences, rollout.attention_mask, chunk, prompt_len=rollout.prompt_len)
    del ref
    penalised, metrics = length_penalties(cfg, raw, rollout)
    reward, stats = penalised, state.reward_stats
    if cfg.normalize_reward and p.reward_models is None:
        reward, stats = running_normalize(penalised, stats)
    exp = make_experience(
        rollout.sequences, rollout.attention_mask, rollout.rollout_logp, prompt_len=rollout.prompt_len,
        old_logp=outs.get("old_logp"), ref_logp=outs.get("ref_logp"), values=outs.get("values"),
        raw_reward=penalised, reward=reward, estimator=cfg.advantage_estimator, n_samples=cfg.n_samples_per_prompt,
        kl_coef=state.kl_coef, kl_estimator=cfg.kl_estimator, use_kl_loss=cfg.use_kl_loss,
        reward_clip_range=cfg.reward_clip_range, gamma=cfg.gamma, lambd=cfg.lambd,
        std_norm=not cfg.no_advantage_std_norm, info=info)
    if metrics:
        metrics["reward/raw"] = float(raw.mean())
    if cfg.async_train:  # policy versions between the samples' and the one they update
        metrics["rollout/staleness_max"] = float(state.step - batch.version.min())
        metrics["rollout/staleness_mean"] = float(state.step - batch.version.mean())
    return exp, stats, metrics


def adapt_kl(cfg, kl_coef: float, mean_kl: float, n_samples: int) -> float:
    """The next KL coefficient: fixed, or adaptive towards ``--kl_target`` over ``--kl_horizon`` samples."""
    from jaxrlhf import losses

    if cfg.kl_target is None:
        return kl_coef
    return float(losses.adaptive_kl_coef(kl_coef, mean_kl, n_samples, kl_target=cfg.kl_target,
                                         kl_horizon=cfg.kl_horizon))


def throughput(exp, seconds: dict, *, epochs: int, train_actor: bool) -> dict:
    """Tokens per second of the step's phases: generated tokens / ``generate``; the rows' real tokens /
    ``experience_forward``; the rows' real tokens x ``epochs`` / ``train``."""
    response, rows = float(exp.action_mask.sum()), float(exp.attention_mask.sum())
    out = {}
    for key, tokens, phase in (("generate", response, "generate"), ("experience", rows, "experience_forward"),
                               ("train", rows * epochs, "train")):
        if seconds.get(phase, 0.0) > 1e-3:  # a phase with no work (on-policy: no experience forward)
            out[f"{key}_tokens_per_s"] = tokens / seconds[phase]
    return out
