"""Optimizer: global-norm clipping + AdamW under a linear-warmup / cosine-to-min-lr schedule.

This is OpenRLHF's default (DeepSpeed Adam with ``--max_norm``, ``--l2`` weight decay, ``--adam_betas``, and the
transformers scheduler ``"cosine_with_min_lr"`` with ``num_warmup_steps = ceil(total_steps * lr_warmup_ratio)`` and
``min_lr = 0.1 * learning_rate``).

Precision: the optimizer state (Adam moments) must be fp32. jaxrlhf keeps the *parameters* fp32 as master weights and
the train step casts them to bf16 for compute::

    def loss_fn(params_fp32, batch):
        logits = apply(cast_floating(params_fp32, jnp.bfloat16), batch)   # bf16 matmuls
        ...
    grads = jax.grad(loss_fn)(params_fp32, batch)     # fp32: the cast's transpose casts the cotangent back

so ``optax.adamw`` creates moments in the parameters' dtype (fp32) and updates are applied to the fp32 masters.
``make_optimizer`` enforces this: ``tx.init`` raises if a floating parameter is not fp32.

Weight decay mask: decay applies only to parameters with ``ndim >= 2`` (matrices: projections, embeddings, heads). 1-D
parameters (RMSNorm/LayerNorm scales, biases) and scalars are not decayed. This matches OpenRLHF's grouping, which
excludes names containing ``bias``/``norm.weight`` (embeddings are decayed in both).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], jax.Array]


def warmup_cosine_schedule(
    *, learning_rate: float, total_steps: int, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.1
) -> Schedule:
    """Learning rate at optimizer step ``s`` (``s = 0`` is the first update), transformers' "cosine_with_min_lr".

    W = ceil(total_steps * warmup_ratio)
    s < W:   lr(s) = learning_rate * s / W
    s >= W:  p = clip((s - W) / max(1, total_steps - W), 0, 1)
             lr(s) = learning_rate * (r + (1 - r) * 0.5 * (1 + cos(pi * p))),   r = min_lr_ratio

    One deliberate difference from transformers: ``p`` is clipped at 1, so steps past ``total_steps`` stay at
    ``min_lr`` instead of climbing the cosine back up.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if learning_rate < 0:
        raise ValueError(f"learning_rate must be >= 0, got {learning_rate}")
    warmup_steps = math.ceil(total_steps * warmup_ratio)
    decay_steps = max(1, total_steps - warmup_steps)

    def schedule(step: Any) -> jax.Array:
        s = jnp.asarray(step, jnp.float32)
        warm = s / max(1, warmup_steps)
        p = jnp.clip((s - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        return learning_rate * jnp.where(s < warmup_steps, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: leaves with ``ndim >= 2`` (no decay on norms, biases, scalars)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast every floating-point leaf of ``tree`` to ``dtype``; integer/bool leaves (token ids, step counters) stay."""

    def cast(x: Any) -> Any:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


def require_fp32_params() -> optax.GradientTransformation:
    """An identity transformation whose ``init`` refuses non-fp32 floating parameters (keeps Adam moments fp32)."""

    def init(params: Any) -> optax.EmptyState:
        bad = [
            (jax.tree_util.keystr(path), leaf.dtype)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != jnp.float32
        ]
        if bad:
            where = ", ".join(f"{k} ({d})" for k, d in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise ValueError(
                f"optimizer parameters must be fp32 master weights, found {where}. Keep parameters fp32 and cast "
                "them for compute inside the loss with cast_floating(params, jnp.bfloat16)."
            )
        return optax.EmptyState()

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        return updates, state

    return optax.GradientTransformation(init, update)


def make_optimizer(
    *,
    learning_rate: float,
    total_steps: int,
    warmup_ratio: float = 0.03,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    max_norm: float | None = 1.0,
) -> tuple[optax.GradientTransformation, Schedule]:
    """clip_by_global_norm(max_norm) -> AdamW(schedule, betas, eps, weight_decay on ndim >= 2 leaves).

    Clipping: g <- g * min(1, max_norm / ||g||_2) with ||g||_2 over all leaves; ``max_norm`` None or <= 0 disables it.
    AdamW (decoupled decay): m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;  m^ = m/(1-b1^t);  v^ = v/(1-b2^t);
    theta <- theta - lr(s) * (m^ / (sqrt(v^) + eps) + wd * mask * theta).

    Returns ``(tx, schedule)``; ``schedule(step)`` gives the learning rate for logging (``step`` = updates done).
    ``tx.init`` raises unless floating parameters are fp32 (see the module docstring).
    """
    schedule = warmup_cosine_schedule(
        learning_rate=learning_rate, total_steps=total_steps, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio
    )
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    parts = [require_fp32_params()]
    if max_norm is not None and max_norm > 0:
        parts.append(optax.clip_by_global_norm(max_norm))
    parts.append(
        optax.adamw(schedule, b1=betas[0], b2=betas[1], eps=eps, weight_decay=weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts), schedule
