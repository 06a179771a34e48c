"""Mixture-of-experts feed-forward block (Mixtral, Qwen3-MoE): a router picks ``k`` of ``E`` SwiGLU experts per token.

Shapes: N tokens (batch x time flattened), D hidden, F expert width, E experts, k experts per token.

Routing (router logits in fp32, whatever the compute dtype)::

    logits = x W_r                      # [N, E], W_r [D, E]
    p      = softmax(logits)            # [N, E]
    w, idx = top_k(p, k)                # [N, k]
    w      = w / sum(w)   (Mixtral always; Qwen3-MoE with norm_topk_prob)

Mixtral's "softmax over the top-k logits" is the renormalised case: ``softmax(top_k(logits))`` equals
``top_k(softmax(logits))`` divided by its sum. The output is ``y_n = sum_j w_nj * expert_{idx_nj}(x_n)`` with
``expert_e(x) = (silu(x G_e) * (x U_e)) D_e``.

Experts are stored stacked: ``gate_proj`` / ``up_proj`` ``[E, D, F]``, ``down_proj`` ``[E, F, D]`` (kernels ``[in, out]``
like every Linear here), so a mesh axis ``expert`` can split them over E.

Dispatch is exact (no token is dropped, no capacity limit): the ``N k`` (token, expert) assignments are sorted by
expert, each expert's contiguous group goes through one grouped matmul (``jax.lax.ragged_dot``), and the results
are unsorted and summed with their weights. ``dense_experts`` (every expert on every token, combined with one-hot
weights) computes the same thing at ``E / k`` times the cost; it is the test reference.

On a mesh with an ``expert`` axis (sharding/tables.py) XLA's partitioner (GSPMD) keeps each device's experts where
they are (the weights are never all-gathered over ``expert``): the sorted assignments are replicated over the batch
axes, each device runs the groups of its own experts, and the ``[N k, F]`` / ``[N k, D]`` partial results are
all-reduced (checked in the compiled HLO of the tiny Mixtral on 1x2x2x2). An all-to-all token exchange
(``shard_map``) would move less data at scale; it is not written yet.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DISPATCH = ("ragged", "dense")


def route(logits_ne, k: int, normalize: bool):
    """Top-``k`` routing weights ``[N, k]`` (fp32) and expert indices ``[N, k]`` from router logits ``[N, E]``:
    ``w, idx = top_k(softmax(logits), k)``, then ``w / sum_j w_j`` when ``normalize``."""
    probs = jax.nn.softmax(logits_ne.astype(jnp.float32), axis=-1)
    w_nk, idx_nk = jax.lax.top_k(probs, k)
    if normalize:
        w_nk = w_nk / jnp.sum(w_nk, axis=-1, keepdims=True)
    return w_nk, idx_nk


def ragged_experts(x_nd, w_nk, idx_nk, gate_edf, up_edf, down_efd):
    """``y_n = sum_j w_nj * expert_{idx_nj}(x_n)`` by sort-based grouped matmuls (exact, no token dropping).

    The ``N k`` assignments are sorted by expert (stable), gathered ``[N k, D]``, run through
    ``ragged_dot`` with per-expert group sizes, then put back in assignment order and summed over ``k``."""
    N, D = x_nd.shape
    E, k = gate_edf.shape[0], idx_nk.shape[1]
    flat = idx_nk.reshape(-1)  # [N k] expert of each assignment
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # [E]
    xs = jnp.take(x_nd, order // k, axis=0)  # [N k, D]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate_edf, group_sizes)) * jax.lax.ragged_dot(xs, up_edf, group_sizes)
    ys = jax.lax.ragged_dot(h, down_efd, group_sizes)  # [N k, D], sorted order
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    y_nkd = jnp.take(ys, inverse, axis=0).reshape(N, k, D)
    return jnp.einsum("nkd,nk->nd", y_nkd, w_nk.astype(y_nkd.dtype))


def dense_experts(x_nd, w_nk, idx_nk, gate_edf, up_edf, down_efd):
    """The same sum with every expert applied to every token and one-hot combine weights ``c [N, E]``:
    ``y_n = sum_e c_ne expert_e(x_n)``, ``c_ne = sum_j w_nj [idx_nj = e]`` (the test reference)."""
    E = gate_edf.shape[0]
    c_ne = jnp.einsum("nk,nke->ne", w_nk, jax.nn.one_hot(idx_nk, E, dtype=w_nk.dtype))
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x_nd, gate_edf)) * jnp.einsum("nd,edf->enf", x_nd, up_edf)
    y_end = jnp.einsum("enf,efd->end", h, down_efd)
    return jnp.einsum("end,ne->nd", y_end, c_ne.astype(y_end.dtype))


class Router(nnx.Module):
    """``logits = x W_r`` in fp32; ``kernel`` ``[D, E]`` (HF's ``gate.weight`` ``[E, D]`` transposed)."""

    def __init__(self, dim: int, num_experts: int, *, dtype, rngs: nnx.Rngs, std: float = 0.02):
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (dim, num_experts), dtype))

    def __call__(self, x_nd):
        return jnp.dot(x_nd.astype(jnp.float32), self.kernel[...].astype(jnp.float32))


class Experts(nnx.Module):
    """``E`` SwiGLU experts stacked: ``gate_proj`` / ``up_proj`` ``[E, D, F]``, ``down_proj`` ``[E, F, D]``."""

    def __init__(self, num_experts: int, dim: int, ff: int, *, dtype, rngs: nnx.Rngs, std: float = 0.02):
        def init(shape):
            return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))

        self.gate_proj = init((num_experts, dim, ff))
        self.up_proj = init((num_experts, dim, ff))
        self.down_proj = init((num_experts, ff, dim))


class MoE(nnx.Module):
    """The sparse layers' MLP: ``(y [B, T, D], router logits [B, T, E] fp32)``.

    ``dispatch``: "ragged" (grouped matmuls, the default) or "dense" (every expert on every token: the reference).
    """

    def __init__(self, dim: int, ff: int, num_experts: int, top_k: int, *, normalize: bool, dtype, rngs: nnx.Rngs,
                 dispatch: str = "ragged"):
        if dispatch not in DISPATCH:
            raise ValueError(f"MoE dispatch {dispatch!r} is not one of {DISPATCH}")
        self.gate = Router(dim, num_experts, dtype=dtype, rngs=rngs)
        self.experts = Experts(num_experts, dim, ff, dtype=dtype, rngs=rngs)
        self.top_k, self.normalize, self.dispatch = top_k, normalize, dispatch

    def __call__(self, x_btd):
        B, T, D = x_btd.shape
        x_nd = x_btd.reshape(B * T, D)
        logits_ne = self.gate(x_nd)
        w_nk, idx_nk = route(logits_ne, self.top_k, self.normalize)
        ex = self.experts
        fn = ragged_experts if self.dispatch == "ragged" else dense_experts
        dt = x_nd.dtype
        y_nd = fn(x_nd, w_nk, idx_nk, ex.gate_proj[...].astype(dt), ex.up_proj[...].astype(dt),
                  ex.down_proj[...].astype(dt))
        return y_nd.reshape(B, T, D), logits_ne.reshape(B, T, -1)
