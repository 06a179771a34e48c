"""The PPO update: trainer state, the policy and value losses, and the epochs over train batches.

Losses are built from explicit keyword arguments (never a whole config) and read a train batch of
``Experience.batch`` (train/experience.py): ``sequences`` / ``attention_mask`` [b, P + R], ``action_mask`` [b, R],
``num_tokens`` (the step's token count: micro-batch losses sum to the step mean, train/steps.py) and the fields
each loss names. The math is ``losses.py``'s (OpenRLHF's ``PolicyLoss`` / ``ValueLoss``)::

    policy:  L = token_mean(ppo_policy_loss(logp, old_logp, A; eps_low, eps_high, dual_clip))
                 - entropy_coef * token_mean(H)  [+ kl_coef * token_mean(kl(logp, ref_logp))  with use_kl_loss]
    value:   L = token_mean(ppo_value_loss(V, old_V, returns; value_clip))
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np


def response_hidden(model, b: dict):
    """Final hidden states at the columns that predict the response tokens, ``[b, R, D]``, and the response tokens
    ``[b, R]``. P and R come from the batch's shapes (``action_mask`` is [b, R]), so one loss serves every bucket
    of prompt and response lengths (one compiled program per shape)."""
    R = b["action_mask"].shape[1]
    P = b["sequences"].shape[1] - R
    h, _ = model.hidden_states(b["sequences"], b["attention_mask"])
    return h[:, P - 1:P + R - 1], b["sequences"][:, P:]


def response_logprobs(model, b: dict, *, temperature: float, chunk: int, with_entropy: bool = False):
    """``(logp [b, R], entropy [b, R] or None)`` of the response tokens: the LM head on response positions only,
    ``chunk`` positions at a time (``losses.logprobs_from_hidden``: never [b, T, V] logits)."""
    from jaxrlhf import losses

    h, tokens = response_hidden(model, b)
    w, transposed = model.head_weight()
    return losses.logprobs_from_hidden(h, w, tokens, temperature, chunk=chunk, with_entropy=with_entropy,
                                       transpose_w=transposed)


def logprob_fn(*, temperature: float, chunk: int) -> Callable:
    """``(model, rows) -> [b, R]`` log-probs of the response tokens at ``temperature`` (old / reference)."""
    return lambda model, b: response_logprobs(model, b, temperature=temperature, chunk=chunk)[0]


def value_fn() -> Callable:
    """``(critic, rows) -> [b, R]`` values at the columns that predict the response tokens."""
    return lambda model, b: model.scores(response_hidden(model, b)[0])


def probe_fn() -> Callable:
    """``(model, rows) -> (logp, best)`` [b, R] each: temperature-1 log-probs of the response tokens and the
    largest log-prob per position (the sync check's trainer side, rollout/sync_check.py; a few probe rows, so the
    full logits are fine here)."""
    import jax
    import jax.numpy as jnp

    def fn(model, b):
        h, tokens = response_hidden(model, b)
        logp_btv = jax.nn.log_softmax(model.logits(h), -1)
        return jnp.take_along_axis(logp_btv, tokens[..., None], -1)[..., 0], logp_btv.max(-1)

    return fn


@dataclass(frozen=True)
class ISCorrection:
    """The rollout/trainer importance-sampling correction (``losses.is_correction``): ``level`` "off" disables it."""

    level: str = "off"
    mode: str = "mask"
    gating: str = "ratio"
    low: float = 0.5
    high: float = 5.0

    @property
    def on(self) -> bool:
        return self.level != "off"


def policy_loss_fn(*, temperature: float, eps_clip_low: float, eps_clip_high: float, dual_clip: Optional[float],
                   entropy_coef: float, use_kl_loss: bool, kl_estimator: str, chunk: int = 128,
                   on_policy: bool = False, policy_loss_type: str = "ppo", loss_agg_mode: str = "token-mean",
                   is_correction: ISCorrection = ISCorrection(), kl_unbiased_gradient: bool = False) -> Callable:
    """The actor's ``loss_fn(model, b) -> (loss, metrics)``; ``b`` has ``old_logp``, ``advantages``, the step's
    ``num_tokens`` / ``num_sequences``, ``rollout_logp`` with the IS correction, and with ``use_kl_loss``
    ``ref_logp`` and ``kl_coef``. ``chunk``: response positions per chunk of the LM head.

        pg_bt = ppo_policy_loss | gspo_policy_loss (policy_loss_type)
        pg_bt = is_correction(old_logp, rollout_logp).coef * pg_bt      (PPO with the IS correction on; GSPO takes
                                                                          its ratio against rollout_logp instead)
        L = aggregate(pg_bt, loss_agg_mode) - entropy_coef * token_mean(H)
            + kl_coef * aggregate(kl_bt, loss_agg_mode)                  (use_kl_loss; kl_loss_unbiased_gradient's
                                                                          gradient with kl_unbiased_gradient)

    ``on_policy``: the rollout trains exactly one optimizer update, so the policy that made the experience is the
    one being differentiated and ``old_logp`` equals this forward's own log-probs: it is taken from them
    (stop-gradient; ratio 1, the same gradient as a separate forward gives, as TRL does with one iteration) and the
    experience pass skips the actor. ``b`` then has ``rollout_logp`` too, for the engine-vs-trainer drift metrics
    ``rollout/logprob_diff_mean`` / ``_max``.
    """
    import jax
    import jax.numpy as jnp

    from jaxrlhf import losses

    def fn(model, b):
        logp, entropy = response_logprobs(model, b, temperature=temperature, chunk=chunk,
                                          with_entropy=bool(entropy_coef))
        mask, n = b["action_mask"], b["num_tokens"]

        def agg(x_bt):
            return losses.aggregate_loss(x_bt, mask, loss_agg_mode, num_tokens_total=n,
                                         num_sequences_total=b.get("num_sequences"))

        old_logp = jax.lax.stop_gradient(logp) if on_policy else b["old_logp"]
        metrics = {}
        clips = dict(eps_clip_low=eps_clip_low, eps_clip_high=eps_clip_high, dual_clip=dual_clip)
        if policy_loss_type == "gspo":
            ratio_base = b["rollout_logp"] if is_correction.on else old_logp
            pg_bt, clipped_bt = losses.gspo_policy_loss(logp, ratio_base, b["advantages"], mask, **clips)
        else:
            pg_bt, clipped_bt = losses.ppo_policy_loss(logp, old_logp, b["advantages"], **clips)
        if is_correction.on:
            c = is_correction
            coef, filtered, w = losses.is_correction(old_logp, b["rollout_logp"], mask, level=c.level, mode=c.mode,
                                                     gating=c.gating, low=c.low, high=c.high)
            if policy_loss_type == "ppo":
                pg_bt = coef * pg_bt
            metrics.update({
                "is/filtered_frac": losses.token_mean_over_batch(filtered, mask, n),
                "is/ratio_mean": losses.token_mean_over_batch(w, mask, n),
                "is/ratio_max": jnp.max(jnp.where(mask > 0, w, 0.0)),
                "is/ratio_min": jnp.min(jnp.where(mask > 0, w, jnp.inf)),
                "is/rollout_kl": losses.token_mean_over_batch(b["rollout_logp"] - old_logp, mask, n)})
        loss = agg(pg_bt)
        metrics.update({"policy_loss": loss, "clip_frac": losses.token_mean_over_batch(clipped_bt, mask, n),
                        "approx_kl": losses.token_mean_over_batch(old_logp - logp, mask, n)})
        if on_policy:
            drift_bt = jnp.abs(b["rollout_logp"] - jax.lax.stop_gradient(logp))
            metrics["rollout/logprob_diff_mean"] = losses.token_mean_over_batch(drift_bt, mask, n)
            metrics["rollout/logprob_diff_max"] = jnp.max(jnp.where(mask > 0, drift_bt, 0.0))
        if entropy_coef:
            ent = losses.token_mean_over_batch(entropy, mask, n)
            loss = loss - entropy_coef * ent
            metrics["entropy"] = ent
        if use_kl_loss:
            if kl_unbiased_gradient:
                kl_bt = losses.kl_loss_unbiased_gradient(logp, b["ref_logp"], old_logp, kl_estimator)
            else:
                kl_bt = losses.kl_estimate(logp, b["ref_logp"], kl_estimator)
            kl = agg(kl_bt)
            loss = loss + b["kl_coef"] * kl
            metrics["kl_loss"] = kl
        return loss, metrics

    return fn


def value_loss_fn(*, value_clip: Optional[float]) -> Callable:
    """The critic's ``loss_fn(model, b) -> (loss, metrics)``; ``b`` has ``values`` (old) and ``returns``."""
    from jaxrlhf import losses

    def fn(model, b):
        values = model.scores(response_hidden(model, b)[0])
        loss = losses.token_mean_over_batch(
            losses.ppo_value_loss(values, b["values"], b["returns"], value_clip=value_clip), b["action_mask"],
            b["num_tokens"])
        return loss, {"value_loss": loss}

    return fn


@dataclass
class PPOState:
    """Everything a PPO run carries from step to step (and checkpoints).

    actor / critic: parameter pytrees (critic None without one); *_opt: their optimizer states. step: PPO steps
    done. kl_coef: the (adaptive) KL coefficient. reward_stats: running moments of ``--normalize_reward``.
    """

    actor: Any
    actor_opt: Any
    critic: Any = None
    critic_opt: Any = None
    step: int = 0
    kl_coef: float = 0.0
    reward_stats: dict = field(default_factory=lambda: {"count": 0.0, "mean": 0.0, "m2": 0.0})

    def arrays(self) -> dict:
        """The array pytree a checkpoint stores."""
        out = {"actor": self.actor, "actor_opt": self.actor_opt}
        if self.critic is not None:
            out.update(critic=self.critic, critic_opt=self.critic_opt)
        return out

    def meta(self) -> dict:
        """The JSON part a checkpoint stores."""
        return {"step": self.step, "kl_coef": self.kl_coef, "reward_stats": dict(self.reward_stats)}

    def restored(self, arrays: dict, meta: dict) -> "PPOState":
        """This state with a checkpoint's ``arrays()`` / ``meta()`` put back."""
        return replace(self, actor=arrays["actor"], actor_opt=arrays["actor_opt"], critic=arrays.get("critic"),
                       critic_opt=arrays.get("critic_opt"), step=int(meta["step"]), kl_coef=float(meta["kl_coef"]),
                       reward_stats=dict(meta["reward_stats"]))


def ppo_update(state: PPOState, exp, *, actor_step: Callable | None, critic_step: Callable | None,
               train_batch_size: int, micro_batch: int, max_epochs: int, seed: int, use_kl_loss: bool,
               on_policy: bool = False, rollout_logp: bool = False, timer=None,
               dropout_key=None) -> tuple[PPOState, dict[str, float]]:
    """``max_epochs`` passes over ``exp`` (an ``Experience``) in shuffled ``train_batch_size`` batches, each one
    optimizer update of the actor (``actor_step``; None while the actor is frozen) and of the critic (``critic_step``;
    None without one), accumulated over ``micro_batch``-row micro-batches.

    ``on_policy``: the actor's loss takes its old log-probs from its own forward (``policy_loss_fn``), so the
    batch carries the rollout's log-probs instead; ``rollout_logp``: the batch carries them anyway (the IS
    correction). The order is seeded by ``(seed, state.step)``: a resumed run
    repeats it. Returns the new state (``step`` not advanced: the loop does that) and each loss metric over the
    updates (``actor/...``, ``critic/...``: the mean; ``*_max`` / ``*_min``: the max / min).
    ``timer`` (a ``metrics.PhaseTimer``): each update is waited for inside its phase, ``update_actor`` /
    ``update_critic``, so the seconds are the compute's, not the dispatch's.
    ``dropout_key`` (LoRA adapter dropout; None: off): update k of the actor (critic) uses
    ``fold_in(fold_in(dropout_key, 0 (1)), k)``.
    """
    import contextlib

    import jax

    from jaxrlhf.train.steps import stack_micro_batches

    def phase(name):
        return timer(name) if timer is not None else contextlib.nullcontext()

    rng = np.random.default_rng([seed, state.step])
    collected: dict[str, list] = {}
    actor, actor_opt, critic, critic_opt = state.actor, state.actor_opt, state.critic, state.critic_opt
    actor_keys = (() if on_policy else ("old_logp",)) + (("rollout_logp",) if on_policy or rollout_logp else ()) + \
        ("advantages",) + (("ref_logp",) if use_kl_loss else ())
    def key(role: int, k: int):
        return None if dropout_key is None else jax.random.fold_in(jax.random.fold_in(dropout_key, role), k)

    k = -1
    for _ in range(max_epochs):
        order = rng.permutation(len(exp))
        for a in range(0, len(exp), train_batch_size):
            k += 1
            rows = order[a:a + train_batch_size]
            if actor_step is not None:
                b = exp.batch(rows, *actor_keys)
                if use_kl_loss:
                    b["kl_coef"] = np.float32(state.kl_coef)
                with phase("update_actor"):
                    actor, actor_opt, m = jax.block_until_ready(
                        actor_step(actor, actor_opt, stack_micro_batches(b, micro_batch), key(0, k)))
                _collect(collected, m, "actor/")
            if critic_step is not None:
                b = exp.batch(rows, "values", "returns")
                with phase("update_critic"):
                    critic, critic_opt, m = jax.block_until_ready(
                        critic_step(critic, critic_opt, stack_micro_batches(b, micro_batch), key(1, k)))
                _collect(collected, m, "critic/")
    means = {k: float((np.max if k.endswith("_max") else np.min if k.endswith("_min") else np.mean)(
        [float(x) for x in v])) for k, v in collected.items()}
    return replace(state, actor=actor, actor_opt=actor_opt, critic=critic, critic_opt=critic_opt), means


def _collect(into: dict, metrics: dict, prefix: str) -> None:
    for k, v in metrics.items():  # rollout/*, is/* metrics keep their names (the experience pass logs rollout/*
        into.setdefault(k if "/" in k else prefix + k, []).append(v)  # otherwise)
