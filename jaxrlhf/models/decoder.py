"""Flax NNX decoder for the Llama family (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3) and its mixture-of-experts
relatives (Mixtral, Qwen3-MoE: the sparse layers' MLP is ``models/moe.py``'s ``MoE``).

Parameter names mirror Hugging Face's module tree (``model/layers/{i}/self_attn/q_proj/kernel`` ...) so the
converter table stays a plain rename + transpose. Kernels are stored ``[in, out]`` (HF Linear weights are
``[out, in]``).

Shapes: B batch, T query length, S key length (cache slots), D hidden, H query heads, K kv heads, G = H / K,
E head_dim, V vocab.

Computation follows the parameters' dtype (cast parameters to bf16 for bf16 compute); RMSNorm statistics, RoPE
tables, attention softmax and the final logits are fp32.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrlhf.models.config import ModelConfig
from sharding import BATCH, constrain

Cache = dict[str, Any]  # {"k": [L x [B,S,K,E]], "v": [...], "mask": [B,S] int32, "index": int32 scalar}
_NEG = -1e30


def dense(x_nd, w, *, out_dtype=None, transpose_w: bool = False):
    """``x[..., D] @ w[D, K]`` (``transpose_w``: ``x @ w[K, D]^T``, e.g. a tied LM head reading the ``[V, D]``
    embedding without a transpose op) as ONE 2-D GEMM over all leading dims. XLA:CPU runs the backward of a 3-D
    dot_general (the weight gradient contracts batch and time) at about half the GEMM rate: a Llama MLP's
    fwd+bwd took 67 ms as 3-D, 35 ms as 2-D (SmolLM2 shapes, 8 x 80 tokens, 2 cores). The reshape is free on every
    backend and keeps the batch sharding (batch is the leading dim). ``out_dtype``: accumulate/return in it.

    bf16 / fp16 operands on the CPU go through ``_dense_lowp`` (the same values as on GPUs and TPUs, whose
    GEMMs accumulate 16-bit operands in fp32 anyway)."""
    k = w.shape[0] if transpose_w else w.shape[1]
    if x_nd.dtype == w.dtype and x_nd.dtype in _LOWP and jax.default_backend() == "cpu":
        return _dense_lowp(x_nd, w, jnp.dtype(out_dtype or x_nd.dtype), transpose_w)
    y = jax.lax.dot_general(x_nd.reshape(-1, x_nd.shape[-1]), w, (((1,), (1 if transpose_w else 0,)), ((), ())),
                            preferred_element_type=out_dtype)
    return y.reshape(*x_nd.shape[:-1], k)


_LOWP = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _mm32(a, b, a_dim: int, b_dim: int):
    """``a`` [M, C] x ``b`` contracted over ``a_dim`` / ``b_dim``, fp32 accumulation and result."""
    return jax.lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())), preferred_element_type=jnp.float32)


def _features_first(x_nd):
    """``[..., C] -> [C, prod(...)]`` as a copy XLA cannot fold into a dot: the feature axis of an (at least) 3-D
    view moved to the front, then flattened."""
    c = x_nd.shape[-1]
    x3 = x_nd if x_nd.ndim > 2 else x_nd.reshape(-1, 1, c)
    return jnp.moveaxis(x3, -1, 0).reshape(c, -1)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_lowp(x_nd, w, out_dtype, transpose_w):
    """``dense`` for 16-bit ``x`` and ``w`` on XLA:CPU: every GEMM of the forward and the backward takes 16-bit
    operands in a layout XLA:CPU hands to its AMX / YNNPACK kernels, and accumulates in fp32.

    XLA:CPU runs a bf16 dot at 4-6x the fp32 rate only when it accumulates in fp32 and no operand is a transpose
    it folds into the dot (768 x 576 x 1536: bf16 -> bf16 223, bf16 -> fp32 1477, fp32 263 GFLOP/s); otherwise
    it silently upcasts the dot to fp32. Autodiff's weight gradient ``x^T g`` contracts the token dims of both
    operands, so ``_dense_lowp_bwd`` builds ``x^T`` with ``_features_first``: 6.0 -> 1.9 ms for that GEMM here."""
    d = x_nd.shape[-1]
    y = _mm32(x_nd.reshape(-1, d), w, 1, 1 if transpose_w else 0).astype(out_dtype)
    return y.reshape(*x_nd.shape[:-1], y.shape[-1])


def _dense_lowp_fwd(x_nd, w, out_dtype, transpose_w):
    return _dense_lowp(x_nd, w, out_dtype, transpose_w), (x_nd, w)


def _dense_lowp_bwd(out_dtype, transpose_w, res, g_nk):
    """``dx = g w^T``, ``dw = x^T g`` (``transpose_w``: ``dx = g w``, ``dw = g^T x``), the cotangent cast to the
    operands' dtype, fp32 accumulation."""
    x, w = res
    g_nk = g_nk.astype(x.dtype)
    g = g_nk.reshape(-1, g_nk.shape[-1])
    dx = _mm32(g, w, 1, 0 if transpose_w else 1).astype(x.dtype).reshape(x.shape)
    if transpose_w:
        dw = _mm32(_features_first(g_nk), x.reshape(-1, x.shape[-1]), 1, 0)
    else:
        dw = _mm32(_features_first(x), g, 1, 0)
    return dx, dw.astype(w.dtype)


_dense_lowp.defvjp(_dense_lowp_fwd, _dense_lowp_bwd)


class Linear(nnx.Module):
    """``y = x W (+ b)``, and with a LoRA adapter (``models/lora.py`` attaches ``lora_a`` ``[D, r]`` and ``lora_b``
    ``[r, K]``): ``y = x W + scale * (x A) B``, ``scale = alpha / r``, each product a 2-D GEMM. QLoRA
    (``models/nf4.py``): ``kernel`` is None and ``W`` is dequantized from ``kernel_nf4`` / ``kernel_absmax`` in the
    input's dtype inside the call."""

    def __init__(self, din: int, dout: int, *, bias: bool, dtype, rngs: nnx.Rngs, std: float = 0.02):
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (din, dout), dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None
        # data attributes: models/lora.py and models/nf4.py may attach Params
        self.lora_a = self.lora_b = self.kernel_nf4 = self.kernel_absmax = nnx.data(None)
        self.kernel_absmax_scale = self.kernel_absmax_offset = nnx.data(None)  # NF4 double quantization
        self.lora_scale = self.lora_dropout = 0.0
        self.lora_key = nnx.data(None)  # a PRNG key only inside a train step with adapter dropout (set_dropout_key)

    def weight(self, dtype):
        """``W [D, K]`` (dequantized from NF4 in ``dtype`` when the base is 4-bit)."""
        if self.kernel is None:
            from jaxrlhf.models.nf4 import NF4_LEAVES, dequantize_stored

            return dequantize_stored({n: getattr(self, n)[...] for n in NF4_LEAVES if getattr(self, n) is not None},
                                     dtype)
        return self.kernel[...]

    def __call__(self, x):
        y = dense(x, self.weight(x.dtype))
        if self.lora_a is not None:
            xa = x
            if self.lora_key is not None:  # dropout on the adapter's input: keep with 1 - p, rescale by 1 / (1 - p)
                keep = jax.random.bernoulli(self.lora_key, 1.0 - self.lora_dropout, x.shape)
                xa = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(x.dtype)
            y = y + self.lora_scale * dense(dense(xa, self.lora_a[...].astype(x.dtype)),
                                            self.lora_b[...].astype(x.dtype))
        return y + self.bias[...] if self.bias is not None else y


class RMSNorm(nnx.Module):
    """``y = w * x / sqrt(mean(x^2) + eps)``, statistics in fp32, result cast back to the input dtype."""

    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


def rope_tables(cfg: ModelConfig, positions_bt):
    """cos/sin ``[B, T, E]`` for rotate-half RoPE at integer ``positions_bt`` (fp32)."""
    inv = jnp.asarray(cfg.inv_freq(), jnp.float32)  # [E/2]
    freqs = positions_bt.astype(jnp.float32)[..., None] * inv  # [B, T, E/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_btne, cos_bte, sin_bte):
    """``x*cos + rotate_half(x)*sin`` with ``rotate_half([a, b]) = [-b, a]`` (HF's non-interleaved layout)."""
    half = x_btne.shape[-1] // 2
    rot = jnp.concatenate([-x_btne[..., half:], x_btne[..., :half]], axis=-1)
    cos, sin = cos_bte[:, :, None, :].astype(x_btne.dtype), sin_bte[:, :, None, :].astype(x_btne.dtype)
    return x_btne * cos + rot * sin


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, window: int | None, *, dtype, rngs: nnx.Rngs):
        D, H, K, E = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(D, H * E, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(D, K * E, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(D, K * E, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(H * E, D, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(E, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(E, cfg.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.cfg, self.window = cfg, window

    def __call__(self, x_btd, cos, sin, q_slots_t, kv, kv_mask_bs, kv_slots_s, segment_ids_bt=None):
        """Attend from the T new tokens (at cache slots ``q_slots_t``) to S keys.

        ``kv`` is None (keys are the new tokens themselves) or a ``(k_bske, v_bske, index)`` cache to write into.
        ``kv_mask_bs`` marks real keys; attention is causal in slot order and, with a window, local.
        ``segment_ids_bt`` (packed rows, no cache: S == T) also confines it to keys of the query's own segment.
        Returns the output and the updated (k, v) cache entry (or None).
        """
        cfg = self.cfg
        B, T, _ = x_btd.shape
        H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = self.q_proj(x_btd).reshape(B, T, H, E)
        k = self.k_proj(x_btd).reshape(B, T, K, E)
        v = self.v_proj(x_btd).reshape(B, T, K, E)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = None
        if kv is not None:
            k_cache, v_cache, index = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            new_kv = (k, v)
        q = q.reshape(B, T, K, H // K, E)
        allowed = kv_slots_s[None, :] <= q_slots_t[:, None]  # [T, S] causal
        if self.window is not None:
            allowed = allowed & (q_slots_t[:, None] - kv_slots_s[None, :] < self.window)
        allowed = allowed[None] & (kv_mask_bs[:, None, :] > 0)  # [B, T, S]
        if segment_ids_bt is not None:  # packed samples: never attend across a segment boundary
            allowed = allowed & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
        k = k.astype(q.dtype)
        if kv is None and q.dtype in _LOWP and q.dtype == v.dtype and jax.default_backend() == "cpu":
            out = _attend_lowp(q, k, v, allowed)
        else:
            out = _attend(q, k, v, allowed)[0]
        return self.o_proj(out.reshape(B, T, H * E)), new_kv


def _einsum32(eq, a, b):
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def _attend(q_btkge, k_bske, v_bske, allowed_bts):
    """``(softmax(q k^T / sqrt(E), masked to allowed) v`` [B, T, K, G, E] in v's dtype, the probabilities fp32
    [B, K, G, T, S])``: grouped-query attention, scores and softmax in fp32."""
    E = q_btkge.shape[-1]
    scores = _einsum32("btkge,bske->bkgts", q_btkge, k_bske) * (E**-0.5)
    probs = jax.nn.softmax(jnp.where(allowed_bts[:, None, None], scores, _NEG), axis=-1)
    return jnp.einsum("bkgts,bske->btkge", probs.astype(v_bske.dtype), v_bske), probs


@jax.custom_vjp
def _attend_lowp(q_btkge, k_bske, v_bske, allowed_bts):
    """``_attend`` for 16-bit q, k, v on XLA:CPU (training forwards): the four backward products take 16-bit
    operands with fp32 accumulation, like ``_dense_lowp`` (autodiff of ``_attend`` mixes the fp32 softmax
    cotangent with 16-bit operands, which XLA:CPU runs as fp32 GEMMs: 8.1 -> 4.4 ms per SmolLM2 layer, 8 x 96
    tokens). Backward: ``dP = dO V^T``, ``dV = P^T dO``, ``dS = P * (dP - rowsum(P * dP)) / sqrt(E)`` where
    allowed (0 where masked: a fully masked row's uniform P has no gradient), ``dQ = dS K``, ``dK = dS^T Q``."""
    return _attend_lowp_fwd(q_btkge, k_bske, v_bske, allowed_bts)[0]


def _attend_lowp_fwd(q, k, v, allowed):
    p16 = _attend(q, k, v, allowed)[1].astype(v.dtype)
    return _einsum32("bkgts,bske->btkge", p16, v).astype(v.dtype), (q, k, v, p16, allowed)


def _attend_lowp_bwd(res, do_btkge):
    q, k, v, p16, allowed = res
    do = do_btkge.astype(v.dtype)
    dp = _einsum32("btkge,bske->bkgts", do, v)
    dv = _einsum32("bkgts,btkge->bske", p16, do).astype(v.dtype)
    p = p16.astype(jnp.float32)
    ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * (q.shape[-1] ** -0.5)
    ds = jnp.where(allowed[:, None, None], ds, 0.0).astype(q.dtype)  # masked scores are constants
    dq = _einsum32("bkgts,bske->btkge", ds, k).astype(q.dtype)
    dk = _einsum32("bkgts,btkge->bske", ds, q).astype(k.dtype)
    return dq, dk, dv, None


_attend_lowp.defvjp(_attend_lowp_fwd, _attend_lowp_bwd)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D, F, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(D, F, bias=b, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(D, F, bias=b, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(F, D, bias=b, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs, moe_dispatch: str = "ragged"):
        window = cfg.sliding_windows[layer] if cfg.sliding_windows else None
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, window, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.sparse = bool(cfg.moe_layers and cfg.moe_layers[layer])
        if self.sparse:
            from jaxrlhf.models.moe import MoE

            self.mlp = MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                           normalize=cfg.norm_topk_prob, dtype=dtype, rngs=rngs, dispatch=moe_dispatch)
        else:
            self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, q_slots, kv, kv_mask, kv_slots, segment_ids=None):
        """``(x, new kv entry, router logits [B, T, E] fp32 or None on a dense layer)``."""
        h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, q_slots, kv, kv_mask, kv_slots, segment_ids)
        x = x + h
        if self.sparse:
            y, router_logits = self.mlp(self.post_attention_layernorm(x))
            return x + y, new_kv, router_logits
        return x + self.mlp(self.post_attention_layernorm(x)), new_kv, None


class RouterLog:
    """Collects each forward's router logits while attached to a model (``Decoder.router_log``): the train step
    attaches one to compute the load-balancing loss (``losses.moe_aux_losses``) of what the loss function ran.
    ``entries``: one ``(router_logits [L_moe, B, T, E] fp32, attention_mask [B, T])`` per ``hidden_states`` call."""

    def __init__(self):
        self.entries: list = []


class Backbone(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, moe_dispatch: str = "ragged"):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Block(cfg, i, dtype=dtype, rngs=rngs, moe_dispatch=moe_dispatch)
                                for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class Decoder(nnx.Module):
    """Causal LM (``head="lm"``) or scalar-score model (``head="score"``: critic / reward model).

    ``mesh`` (optional) is used only to constrain activations: batch over ``sharding.BATCH`` (data, fsdp, expert).
    ``remat`` recomputes each layer's activations in the backward pass (gradient checkpointing).
    ``moe_dispatch`` (MoE models): "ragged" grouped matmuls, or "dense" (every expert on every token; tests).
    """

    def __init__(self, cfg: ModelConfig, *, head: str = "lm", dtype=jnp.float32, rngs: nnx.Rngs,
                 mesh=None, remat: bool = False, moe_dispatch: str = "ragged"):
        if head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {head!r}")
        self.cfg, self.head, self.mesh, self.remat = cfg, head, mesh, remat
        self.lora = None  # a models.lora.LoraSpec once adapters are attached (models/lora.py apply_lora)
        self.router_log = None  # a RouterLog while the train step collects router logits (MoE aux losses)
        self.model = Backbone(cfg, dtype=dtype, rngs=rngs, moe_dispatch=moe_dispatch)
        has_lm_head = head == "lm" and not cfg.tie_word_embeddings
        self.lm_head = (Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)
                        if has_lm_head else None)
        # OpenRLHF initialises the value head with std 1/(D+1).
        self.score = (Linear(cfg.hidden_size, 1, bias=False, dtype=dtype, rngs=rngs, std=1.0 / (cfg.hidden_size + 1))
                      if head == "score" else None)

    # ------------------------------------------------------------------ trunk
    def hidden_states(self, input_ids_bt, attention_mask_bt=None, positions_bt=None, cache: Cache | None = None,
                      segment_ids_bt=None):
        """Final-norm hidden states ``[B, T, D]`` and the updated cache (None without a cache).

        ``segment_ids_bt`` (packed samples, see ``data/packing.py``): tokens attend only within their segment
        (id > 0; 0 is padding); without explicit positions/mask they default to ``segment_positions`` / ``id > 0``.
        """
        B, T = input_ids_bt.shape
        if segment_ids_bt is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed samples) are for training forwards; not with a KV cache")
            segment_ids_bt = segment_ids_bt.astype(jnp.int32)
            if attention_mask_bt is None:
                attention_mask_bt = (segment_ids_bt > 0).astype(jnp.int32)
            if positions_bt is None:
                positions_bt = segment_positions(segment_ids_bt)
        if attention_mask_bt is None:
            attention_mask_bt = jnp.ones((B, T), jnp.int32)
        attention_mask_bt = attention_mask_bt.astype(jnp.int32)
        if positions_bt is None:
            positions_bt = default_positions(attention_mask_bt)
            if cache is not None:
                raise ValueError("pass explicit positions when decoding with a cache")
        cos, sin = rope_tables(self.cfg, positions_bt)
        if cache is None:
            q_slots = kv_slots = jnp.arange(T)
            kv_mask = attention_mask_bt
        else:
            index = cache["index"]
            q_slots = index + jnp.arange(T)
            kv_slots = jnp.arange(cache["mask"].shape[1])
            kv_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask_bt, (0, index))
        # the table's own dtype (nnx.Embed's call would promote to the dtype fixed at construction: fp32 compute
        # even with bf16-cast parameters)
        x = jnp.take(self.model.embed_tokens.embedding[...], input_ids_bt, axis=0)
        x = constrain(x, self.mesh, P(BATCH, None, None))
        new_k, new_v, router = [], [], []
        for i, layer in enumerate(self.model.layers):
            kv = None if cache is None else (cache["k"][i], cache["v"][i], cache["index"])
            call = nnx.remat(Block.__call__) if self.remat else Block.__call__
            x, upd, router_logits = call(layer, x, cos, sin, q_slots, kv, kv_mask, kv_slots, segment_ids_bt)
            x = constrain(x, self.mesh, P(BATCH, None, None))
            if upd is not None:
                new_k.append(upd[0])
                new_v.append(upd[1])
            if router_logits is not None:
                router.append(router_logits)
        if self.router_log is not None and router:
            self.router_log.entries.append((jnp.stack(router), attention_mask_bt))
        x = self.model.norm(x)
        new_cache = None
        if cache is not None:
            new_cache = {"k": new_k, "v": new_v, "mask": kv_mask, "index": cache["index"] + T}
        return x, new_cache

    def head_weight(self):
        """``(w, transposed)``: the LM head's ``[D, V]`` kernel and False, or with tied embeddings the ``[V, D]``
        embedding and True (``dense(h, w, transpose_w=True)`` reads it without a transpose op)."""
        if self.lm_head is not None:
            return self.lm_head.kernel[...], False
        return self.model.embed_tokens.embedding[...], True

    def logits(self, h_btd):
        """Vocabulary logits ``[B, T, V]`` in fp32 from hidden states."""
        w, transposed = self.head_weight()
        return dense(h_btd, w.astype(h_btd.dtype), out_dtype=jnp.float32, transpose_w=transposed)

    def scores(self, h_btd):
        """Per-token scalar scores ``[B, T]`` in fp32 from hidden states (head "score")."""
        return (h_btd @ self.score.kernel[...].astype(h_btd.dtype))[..., 0].astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        """Logits ``[B, T, V]`` (head "lm") or per-token scores ``[B, T]`` (head "score"), fp32.

        The public call, with Hugging Face's argument names: ``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]``
        (1 = real token; default all ones), ``positions`` ``[B, T]`` (default: counted over the mask, so left padding
        works), ``segment_ids`` ``[B, T]`` for packed rows (several samples per row), see ``hidden_states``.
        """
        h, _ = self.hidden_states(input_ids, attention_mask, positions, segment_ids_bt=segment_ids)
        return self.scores(h) if self.head == "score" else self.logits(h)

    def decode(self, input_ids_bt, attention_mask_bt, positions_bt, cache: Cache):
        """Cached forward: write the T new tokens into ``cache`` and return (logits ``[B, T, V]``, new cache)."""
        h, cache = self.hidden_states(input_ids_bt, attention_mask_bt, positions_bt, cache)
        return self.logits(h), cache


def default_positions(attention_mask_bt):
    """Positions that skip left padding: ``cumsum(mask) - 1`` clipped at 0 (pads get position 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask_bt, axis=-1) - 1, 0).astype(jnp.int32)


def segment_positions(segment_ids_bt):
    """Positions that restart at 0 at every segment start of a packed row: ``t - first_t(segment of t)``; padding
    (segment id 0) gets 0."""
    T = segment_ids_bt.shape[-1]
    t = jnp.arange(T, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids_bt[..., :1], bool),
                              segment_ids_bt[..., 1:] != segment_ids_bt[..., :-1]], axis=-1)
    first = jax.lax.cummax(jnp.where(starts, t, 0), axis=segment_ids_bt.ndim - 1)
    return jnp.where(segment_ids_bt > 0, t - first, 0).astype(jnp.int32)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    """An empty KV cache with ``max_len`` slots per row."""
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {
        "k": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        "v": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        "mask": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def last_token_values(values_bt, mask_bt):
    """Score at each row's last real token (works for left and right padding): ``values[b, max{t: mask=1}]``."""
    T = mask_bt.shape[-1]
    idx = T - 1 - jnp.argmax(jnp.flip(mask_bt, axis=-1) > 0, axis=-1)
    return jnp.take_along_axis(values_bt, idx[:, None], axis=-1)[:, 0]
