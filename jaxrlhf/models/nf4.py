"""NF4 (4-bit NormalFloat, Dettmers et al. 2023, "QLoRA") storage for the frozen base linears of QLoRA.

A kernel ``W`` ``[D, K]`` (``[in, out]``) is cut into blocks of ``BLOCK`` = 64 consecutive input rows per output
column (the same blocks as bitsandbytes' flattened HF ``[out, in]`` weight); each block keeps its absmax ``s``
(fp32, ``[D/64, K]``) and every element the index of the nearest NF4 code of ``w / s`` (4 bits, two per byte:
``[D/2, K]`` uint8, the even row in the high nibble). Dequantized: ``w' = CODE[index] * s``. Storage per base
parameter: 0.5 byte of codes + 4/64 of scale = 0.5625 byte (no double quantization of the scales yet).

The rounding error of one element is at most half the widest gap between adjacent codes times its block's absmax:
``|w - w'| <= s * MAX_HALF_GAP`` (``MAX_HALF_GAP`` = (1 - 0.7229568) / 2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64
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


def quantize_base(model, *, mesh=None):
    """Replace the kernels of every decoder layer's linears (q/k/v/o, gate/up/down) by NF4 codes + absmax scales, in
    place (``Linear.kernel_nf4`` / ``kernel_absmax``; ``kernel`` becomes None); placed by the partition rules when
    ``mesh`` is given. Embeddings, norms and the LM / score head stay as they are. Returns ``model``."""
    from flax import nnx
    from jax.sharding import NamedSharding

    from jaxrlhf.models.lora import LINEAR_MODULES, targeted_linears
    from sharding.tables import RULES_BY_MODEL_TYPE

    rules = RULES_BY_MODEL_TYPE[model.cfg.model_type]
    for path, lin in targeted_linears(model, LINEAR_MODULES):
        check_shape(lin.kernel.shape, path)
        codes, absmax = jax.jit(quantize)(lin.kernel[...])
        if mesh is not None:
            codes = jax.device_put(codes, NamedSharding(mesh, rules.spec_for(f"{path}/kernel_nf4")))
            absmax = jax.device_put(absmax, NamedSharding(mesh, rules.spec_for(f"{path}/kernel_absmax")))
        lin.kernel = None
        lin.kernel_nf4, lin.kernel_absmax = nnx.Param(codes), nnx.Param(absmax)
    return model
