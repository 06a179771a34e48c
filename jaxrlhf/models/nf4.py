"""NF4 (4-bit NormalFloat, Dettmers et al. 2023, "QLoRA") storage for the frozen base linears of QLoRA.

A kernel ``W`` ``[D, K]`` (``[in, out]``) is cut into blocks of ``BLOCK`` = 64 consecutive input rows per output
column (the same blocks as bitsandbytes' flattened HF ``[out, in]`` weight); each block keeps its absmax ``s``
(fp32, ``[D/64, K]``) and every element the index of the nearest NF4 code of ``w / s`` (4 bits, two per byte:
``[D/2, K]`` uint8, the even row in the high nibble). Dequantized: ``w' = CODE[index] * s``. Storage per base
parameter: 0.5 byte of codes + 4/64 of scale = 0.5625 byte.

The rounding error of one element is at most half the widest gap between adjacent codes times its block's absmax:
``|w - w'| <= s * MAX_HALF_GAP`` (``MAX_HALF_GAP`` = (1 - 0.7229568) / 2).

Double quantization (QLoRA's, ``bitsandbytes``' ``bnb_4bit_use_double_quant``): the scales themselves are stored in
8 bits. With ``c`` the mean of all scales of the kernel (the offset), each run of ``BLOCK2`` = 256 consecutive
scales along the output axis (row ``b`` of ``[D/64, K]``, the last run zero-padded) keeps its own fp32 absmax
``m = max |s - c|`` and every scale ``q = round(127 (s - c) / m)`` (int8): ``s' = q m / 127 + c``. Storage per base
parameter: 0.5 + (1 + 4/256) / 64 = 0.5159 byte (QLoRA: 0.127 bits of constants per parameter instead of 0.5).
The scale error is ``|s - s'| <= m / 254``, so an element's error is at most ``s * MAX_HALF_GAP + m / 254`` (its
code is in [-1, 1]). bitsandbytes stores ``q`` in its dynamic 8-bit float code; a linear int8 code is used here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64
BLOCK2 = 256  # scales per second-level block (double quantization)
# The 16 NF4 values, as published with QLoRA (bitsandbytes' NF4 code book; the QLoRA paper, appendix E).
CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
MAX_HALF_GAP = float(np.max(np.diff(CODE)) / 2)
_MIDPOINTS = (CODE[1:] + CODE[:-1]) / 2  # nearest code = number of midpoints below the value


def check_shape(shape, what: str) -> None:
    if len(shape) != 2 or shape[0] % BLOCK:
        raise ValueError(f"{what}: NF4 needs a 2-D kernel whose input dimension is a multiple of {BLOCK}, got "
                         f"{tuple(shape)}")


def quantize(w_dk) -> tuple[jax.Array, jax.Array]:
    """``W [D, K]`` -> (codes ``[D/2, K]`` uint8, absmax ``[D/64, K]`` fp32); see the module docstring."""
    D, K = w_dk.shape
    check_shape(w_dk.shape, "quantize")
    blocks = w_dk.astype(jnp.float32).reshape(D // BLOCK, BLOCK, K)
    absmax = jnp.max(jnp.abs(blocks), axis=1)  # [D/64, K]
    normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[:, None, :]
    index = jnp.searchsorted(jnp.asarray(_MIDPOINTS), normed.reshape(D, K)).astype(jnp.uint8)  # [D, K] in 0..15
    codes = (index[0::2] << 4) | index[1::2]
    return codes, absmax


def dequantize(codes_hk, absmax_bk, dtype=jnp.float32) -> jax.Array:
    """(codes ``[D/2, K]``, absmax ``[D/64, K]``) -> ``W' [D, K]`` in ``dtype``."""
    H, K = codes_hk.shape
    index = jnp.stack([codes_hk >> 4, codes_hk & 15], axis=1).reshape(2 * H, K)
    values = jnp.asarray(CODE, dtype)[index.astype(jnp.int32)].reshape(2 * H // BLOCK, BLOCK, K)
    return (values * absmax_bk.astype(dtype)[:, None, :]).reshape(2 * H, K)


def quantize_scales(absmax_bk) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Double quantization: scales ``[R, K]`` fp32 -> (``q`` ``[R, K]`` int8, ``m`` ``[R, ceil(K/256)]`` fp32,
    offset ``c`` ``[]`` fp32); see the module docstring."""
    R, K = absmax_bk.shape
    nb = -(-K // BLOCK2)
    c = jnp.mean(absmax_bk)
    centered = jnp.pad(absmax_bk - c, ((0, 0), (0, nb * BLOCK2 - K))).reshape(R, nb, BLOCK2)
    m = jnp.max(jnp.abs(centered), axis=2)  # [R, nb]
    q = jnp.round(127.0 * centered / jnp.where(m == 0, 1.0, m)[..., None])
    return q.reshape(R, nb * BLOCK2)[:, :K].astype(jnp.int8), m, c


def dequantize_scales(q_bk, m_bn, c) -> jax.Array:
    """(``q`` ``[R, K]`` int8, ``m`` ``[R, ceil(K/256)]``, ``c``) -> the scales ``s' = q m / 127 + c`` ``[R, K]`` fp32."""
    per_col = jnp.repeat(m_bn, BLOCK2, axis=1)[:, :q_bk.shape[1]]  # [R, K]: each scale's block absmax
    return q_bk.astype(jnp.float32) * (per_col / 127.0) + c


def dequantize_stored(stored: dict, dtype=jnp.float32) -> jax.Array:
    """The kernel ``W' [D, K]`` from a linear's stored leaves: ``kernel_nf4``, ``kernel_absmax`` (fp32, or int8
    with ``kernel_absmax_scale`` / ``kernel_absmax_offset`` when double-quantized)."""
    absmax = stored["kernel_absmax"]
    if stored.get("kernel_absmax_scale") is not None:
        absmax = dequantize_scales(absmax, stored["kernel_absmax_scale"], stored["kernel_absmax_offset"])
    return dequantize(stored["kernel_nf4"], absmax, dtype)


NF4_LEAVES = ("kernel_nf4", "kernel_absmax", "kernel_absmax_scale", "kernel_absmax_offset")


def quantize_base(model, *, mesh=None, double_quant: bool = False):
    """Replace the kernels of every decoder layer's linears (q/k/v/o, gate/up/down) by NF4 codes + absmax scales, in
    place (``Linear.kernel_nf4`` / ``kernel_absmax``; ``kernel`` becomes None); placed by the partition rules when
    ``mesh`` is given. ``double_quant``: the scales are stored in 8 bits (``kernel_absmax`` int8 with
    ``kernel_absmax_scale`` / ``kernel_absmax_offset``, ``quantize_scales``). Embeddings, norms and the LM / score
    head stay as they are. Returns ``model``."""
    from flax import nnx
    from jax.sharding import NamedSharding

    from jaxrlhf.models.lora import LINEAR_MODULES, targeted_linears
    from sharding.tables import RULES_BY_MODEL_TYPE

    rules = RULES_BY_MODEL_TYPE[model.cfg.model_type]
    for path, lin in targeted_linears(model, LINEAR_MODULES):
        check_shape(lin.kernel.shape, path)
        codes, absmax = jax.jit(quantize)(lin.kernel[...])
        leaves = {"kernel_nf4": codes, "kernel_absmax": absmax}
        if double_quant:
            leaves["kernel_absmax"], leaves["kernel_absmax_scale"], leaves["kernel_absmax_offset"] = jax.jit(
                quantize_scales)(absmax)
        lin.kernel = None
        for name, value in leaves.items():
            if mesh is not None:
                value = jax.device_put(value, NamedSharding(mesh, rules.spec_for(f"{path}/{name}")))
            setattr(lin, name, nnx.Param(value))
    return model
