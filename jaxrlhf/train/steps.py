"""Jitted, sharded step builders shared by every trainer: one jit boundary per train step.

A train step takes ``(params, opt_state, micro_batches)`` where every leaf of ``micro_batches`` has a leading
micro-batch axis ``[K, mb, ...]``. It scans over the K micro-batches summing gradients (gradient accumulation),
then applies one optimizer update. Loss functions must normalise by counts of the WHOLE step batch (see
``losses.token_mean_over_batch``), so the summed gradient is independent of K and of the mesh.

Parameters are fp32 master weights; ``compute_dtype=bfloat16`` runs the micro-batches on a bf16 copy made once per
step (every GEMM accumulates in fp32, ``models.decoder.dense``); each micro-batch's bf16 gradient is added into fp32
sums, so the accumulated gradient and the optimizer state stay fp32. Parameters and optimizer state are donated.

Mixture-of-experts models: every train step adds the router's auxiliary losses (``--aux_loss_coef``,
``--router_z_loss_coef``) of the forwards its loss function ran, for every trainer alike (``make_train_step``).

Multi-host: batches are host NumPy values that are the same on every process (the global batch); each process
places only its own shards (``sharding.distributed.global_array``). Forward outputs are replicated, so every process
can read them: return per-sample / per-token values from a forward, not logits.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrlhf.train.optim import cast_floating
from sharding import BATCH
from sharding.distributed import global_array

LossFn = Callable[[Any, dict], tuple[jax.Array, dict]]  # (model, micro_batch) -> (loss, metrics)


def batch_shardings(batch: dict, mesh, *, stacked: bool):
    """Shard the batch axis of every leaf over (data, fsdp); with ``stacked`` the leading axis is micro-batches."""
    def one(x):
        ndim = np.ndim(x)
        lead = 1 if stacked else 0
        if ndim <= lead:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(*([None] * lead), BATCH))
    return jax.tree_util.tree_map(one, batch)


def shardings_of(tree):
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def init_optimizer(tx: optax.GradientTransformation, params, mesh, trainable: Callable[[str], bool] | None = None):
    """Optimizer state created on the devices: moments sharded like their parameters, scalars replicated; with
    ``trainable`` (``make_train_step``'s), the state of the trained leaves only (``split_params``).

    The shardings are given to the jit explicitly (``optax.tree_map_params`` finds the parameter-shaped leaves):
    left to propagation, ``zeros_like`` moments come out replicated, i.e. a full copy of Adam's state per device.
    """
    params = split_params(params, trainable)[0]
    replicated = NamedSharding(mesh, P())
    shardings = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, params), shardings_of(params),
                                      transform_non_params=lambda _: replicated)
    return jax.jit(tx.init, out_shardings=shardings)(params)


def split_params(params: dict, trainable: Callable[[str], bool] | None) -> tuple[dict, dict]:
    """``(trained, frozen)``: the nested params dict split by ``trainable(path)`` (``/``-joined path) into two
    nested dicts holding disjoint leaves (empty branches dropped). ``trainable`` None: everything is trained."""
    if trainable is None:
        return params, {}

    def walk(d, prefix):
        t, f = {}, {}
        for k, v in d.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict):
                vt, vf = walk(v, path)
                if vt:
                    t[k] = vt
                if vf:
                    f[k] = vf
            elif trainable(path):
                t[k] = v
            else:
                f[k] = v
        return t, f

    return walk(params, "")


def join_params(a: dict, b: dict) -> dict:
    """Inverse of ``split_params``: the deep union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for k, v in b.items():
        out[k] = join_params(out[k], v) if k in out else v
    return out


def make_train_step(graphdef, loss_fn: LossFn, tx: optax.GradientTransformation, *, params, opt_state, mesh,
                    compute_dtype=None, trainable: Callable[[str], bool] | None = None, aux_loss_coef: float = 0.0,
                    router_z_loss_coef: float = 0.0):
    """Build ``step(params, opt_state, micro_batches) -> (params, opt_state, metrics)`` (jitted, donated).

    ``params`` / ``opt_state`` are examples whose shardings fix the step's in/out shardings. Metrics are the
    micro-batch sums of what ``loss_fn`` returns (already globally normalised; names ending in ``_max`` / ``_min``:
    the maximum / minimum) plus ``grad_norm``. ``trainable(path)`` (e.g. LoRA adapters only): gradients are taken
    and ``tx`` applied only for those leaves (``opt_state`` = ``init_optimizer`` of ``split_params(...)[0]``); the
    rest pass through unchanged, with no gradient buffers and no optimizer state.

    Mixture-of-experts models: the router logits of every forward ``loss_fn`` runs are collected and
    ``aux_loss_coef * load_balancing_loss + router_z_loss_coef * router_z_loss`` (``losses.moe_aux_losses``, per
    micro-batch, averaged over the step's micro-batches) is added to the loss; ``aux_loss`` and ``router_z_loss``
    are logged as metrics.

    ``step(..., rng)``: a PRNG key turns on the model's training-only randomness (LoRA adapter dropout,
    ``models.lora.set_dropout_key``) with key ``fold_in(rng, k)`` for micro-batch k; None (default): none.
    """
    p_sh, o_sh = shardings_of(params), shardings_of(opt_state)

    def loss_of(trained, frozen, mb, key, num_micro: int):
        model = nnx.merge(graphdef, join_params(trained, frozen))
        if key is not None:
            from jaxrlhf.models.lora import set_dropout_key

            set_dropout_key(model, key)
        if not getattr(getattr(model, "cfg", None), "is_moe", False):
            return loss_fn(model, mb)
        from jaxrlhf.losses import moe_aux_losses
        from jaxrlhf.models.decoder import RouterLog

        model.router_log = RouterLog()
        loss, metrics = loss_fn(model, mb)
        if not model.router_log.entries:
            return loss, metrics
        aux, aux_metrics = moe_aux_losses(model.router_log.entries, top_k=model.cfg.num_experts_per_tok,
                                          aux_loss_coef=aux_loss_coef, z_loss_coef=router_z_loss_coef)
        return loss + aux / num_micro, {**metrics, **{k: v / num_micro for k, v in aux_metrics.items()}}

    def step(params, opt_state, micro_batches, rng):
        trained, frozen = split_params(params, trainable)
        num_micro = jax.tree_util.tree_leaves(micro_batches)[0].shape[0]
        # compute-dtype copies made once per step, not per micro-batch; the gradients w.r.t. them are what the
        # cast's own transpose would give, accumulated in the masters' fp32
        t_c, f_c = (trained, frozen) if compute_dtype is None else cast_floating((trained, frozen), compute_dtype)

        def micro(grads, xs):
            mb, k = xs
            key = None if rng is None else jax.random.fold_in(jax.random.wrap_key_data(rng), k)
            (loss, metrics), g = jax.value_and_grad(loss_of, has_aux=True)(t_c, f_c, mb, key, num_micro)
            return jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), grads, g), {"loss": loss, **metrics}

        zeros = jax.tree_util.tree_map(jnp.zeros_like, trained)
        grads, metrics = jax.lax.scan(micro, zeros, (micro_batches, jnp.arange(num_micro)))
        metrics = {k: m.max(0) if k.endswith("_max") else m.min(0) if k.endswith("_min") else m.sum(0)
                   for k, m in metrics.items()}
        metrics["grad_norm"] = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, opt_state, trained)
        return join_params(optax.apply_updates(trained, updates), frozen), opt_state, metrics

    compiled: dict = {}

    def run(params, opt_state, micro_batches, rng=None):
        key = jax.tree_util.tree_structure(micro_batches), tuple(np.shape(x) for x in
                                                                  jax.tree_util.tree_leaves(micro_batches)), rng is None
        if key not in compiled:
            b_sh = batch_shardings(micro_batches, mesh, stacked=True)
            r_sh = None if rng is None else NamedSharding(mesh, P())
            compiled[key] = b_sh, jax.jit(step, in_shardings=(p_sh, o_sh, b_sh, r_sh),
                                          out_shardings=(p_sh, o_sh, None), donate_argnums=(0, 1))
        b_sh, fn = compiled[key]
        if rng is not None:  # raw key data (uint32), the same on every process
            rng = global_array(np.asarray(jax.random.key_data(rng)), NamedSharding(mesh, P()))
        return fn(params, opt_state, jax.tree_util.tree_map(global_array, micro_batches, b_sh), rng)  # multi-host

    run.compiled = compiled  # one program per distinct batch shape (logged as compile/count)
    return run


def make_forward(graphdef, fn: Callable[[Any, dict], Any], *, params, mesh, compute_dtype=None):
    """Build ``forward(params, batch)`` = ``fn(model, batch)`` jitted with the batch sharded over (data, fsdp).

    Several models in one program: ``graphdef`` and ``params`` dicts with the same keys, and ``fn(models, batch)``
    gets the dict of merged models (e.g. PPO's actor, reference and critic forwards of a micro-batch, fused).
    """
    p_sh = shardings_of(params)

    def f(params, batch):
        if compute_dtype is not None:
            params = cast_floating(params, compute_dtype)
        if isinstance(graphdef, dict):
            return fn({k: nnx.merge(g, params[k]) for k, g in graphdef.items()}, batch)
        return fn(nnx.merge(graphdef, params), batch)

    compiled: dict = {}

    def run(params, batch):
        key = tuple(np.shape(x) for x in jax.tree_util.tree_leaves(batch))
        if key not in compiled:
            b_sh = batch_shardings(batch, mesh, stacked=False)
            # outputs replicated: every process can read them (np.asarray) when the mesh spans several hosts
            compiled[key] = b_sh, jax.jit(f, in_shardings=(p_sh, b_sh), out_shardings=NamedSharding(mesh, P()))
        b_sh, fn = compiled[key]
        return fn(params, jax.tree_util.tree_map(global_array, batch, b_sh))  # multi-host

    run.compiled = compiled
    return run


def stack_micro_batches(batch: dict[str, np.ndarray], micro_size: int) -> dict[str, np.ndarray]:
    """``[N, ...]`` arrays -> ``[N // micro_size, micro_size, ...]``; scalars are repeated per micro-batch."""
    n = next(len(v) for v in batch.values() if np.ndim(v) > 0)
    if n % micro_size:
        raise ValueError(f"batch of {n} rows does not split into micro-batches of {micro_size}")
    k = n // micro_size
    return {key: (np.full((k,), v) if np.ndim(v) == 0 else v.reshape(k, micro_size, *v.shape[1:]))
            for key, v in batch.items()}
