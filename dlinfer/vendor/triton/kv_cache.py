"""Writing new keys and values into the paged KV cache: one launch for K and V, any cache strides.

Grid: ``(T, head groups)``. A program copies one token's group of heads of K (``[HEADS, D]``) and V
(``[HEADS, Dv]``) to the token's slot; slot ``-1`` (padding) writes nothing.

A quantized cache (``quant_bits`` 8 / 4) has its own kernel of the same grid: each head of the token is quantized
on the fly (min/max over its ``D`` values, scale and zero point, ``uint8`` values, 4 bits packed two to a byte)
and written with its scale and zero, by the rounding rules of ``dlinfer.ops.kv_quant`` (float32, IEEE division:
the bytes equal the reference vendor's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlinfer.ops.kv_quant import LEVELS, MIN_STEP_DIVISOR
from dlinfer.vendor.registry import Capabilities
from dlinfer.vendor.triton.host import cdiv, memo, next_power_of_2


@triton.jit
def _copy_heads(src_ptr, dst_ptr, token, stride_st, stride_sh, block, offset, stride_db, stride_ds, stride_dh,
                heads, head_mask, dim, DIM: tl.constexpr):
    dims = tl.arange(0, DIM)
    mask = head_mask[:, None] & (dims < dim)[None, :]
    src = src_ptr + token * stride_st + heads[:, None] * stride_sh + dims[None, :]
    dst = dst_ptr + block * stride_db + offset * stride_ds + heads[:, None] * stride_dh + dims[None, :]
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


@triton.jit
def _fill_kv_cache_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, n_heads, head_dim, head_dim_v, block_size,
                          stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                          HEADS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        offset = slot % block_size
        heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
        head_mask = heads < n_heads
        _copy_heads(k_ptr, kc_ptr, token, stride_kt, stride_kh, block, offset, stride_kcb, stride_kcs, stride_kch,
                    heads, head_mask, head_dim, D)
        _copy_heads(v_ptr, vc_ptr, token, stride_vt, stride_vh, block, offset, stride_vcb, stride_vcs, stride_vch,
                    heads, head_mask, head_dim_v, DV)


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (to nearest, ties to even), returned as fp32. bfloat16 by its bits: Triton's
    interpreter truncates fp32 -> bf16 casts, the GPU rounds them; both must give the reference's bytes."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _quant_heads(src_ptr, token, stride_st, stride_sh, dst_ptr, block, offset, stride_db, stride_ds, stride_dh,
                 sc_ptr, stride_cb, stride_cs, stride_ch, z_ptr, stride_zb, stride_zs, stride_zh,
                 heads, head_mask, dim, DIM: tl.constexpr, BITS: tl.constexpr, MIN_STEP_DIVISOR: tl.constexpr):
    """Quantize ``HEADS`` heads of one token (``dim`` values each) into the cache at (block, offset), with their
    scales and zeros (``dlinfer.ops.kv_quant``). 8 bits: ``DIM >= dim`` columns; 4 bits: ``DIM >= dim / 2``
    columns, element ``i`` and ``i + dim / 2`` packed into byte ``i``."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    cols = tl.arange(0, DIM)
    src = src_ptr + token * stride_st + heads[:, None] * stride_sh + cols[None, :]
    if BITS == 8:
        mask = head_mask[:, None] & (cols < dim)[None, :]
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        lo = tl.min(tl.where(mask, x, float("inf")), axis=1)
        hi = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        bad = tl.sum(tl.where(mask, x * 0.0, 0.0), axis=1)  # NaN when the head holds NaN or Inf
    else:
        half = dim // 2
        mask = head_mask[:, None] & (cols < half)[None, :]
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x_hi = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        lo = tl.minimum(tl.min(tl.where(mask, x, float("inf")), axis=1),
                        tl.min(tl.where(mask, x_hi, float("inf")), axis=1))
        hi = tl.maximum(tl.max(tl.where(mask, x, float("-inf")), axis=1),
                        tl.max(tl.where(mask, x_hi, float("-inf")), axis=1))
        bad = tl.sum(tl.where(mask, x * 0.0 + x_hi * 0.0, 0.0), axis=1)
    step = tl.maximum(tl.math.div_rn(hi - lo, LEVELS * 1.0),
                      tl.math.div_rn(tl.maximum(tl.abs(lo), tl.abs(hi)), MIN_STEP_DIVISOR * LEVELS * 1.0))
    scale = _round_to(step, sc_ptr.dtype.element_ty)
    scale = tl.where((scale == 0.0) | (hi == lo), 1.0, scale)
    zero = _round_to(tl.math.div_rn(-lo, scale), z_ptr.dtype.element_ty)
    finite = bad == 0.0
    q = tl.floor(tl.math.div_rn(x, scale[:, None]) + zero[:, None] + 0.5)
    q = tl.where(finite[:, None], tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0), 0.0).to(tl.uint8)
    if BITS == 4:
        q_hi = tl.floor(tl.math.div_rn(x_hi, scale[:, None]) + zero[:, None] + 0.5)
        q_hi = tl.where(finite[:, None], tl.minimum(tl.maximum(q_hi, 0.0), LEVELS * 1.0), 0.0).to(tl.uint8)
        q = q | (q_hi << 4)
    tl.store(dst_ptr + block * stride_db + offset * stride_ds + heads[:, None] * stride_dh + cols[None, :], q,
             mask=mask)
    tl.store(sc_ptr + block * stride_cb + offset * stride_cs + heads * stride_ch,
             tl.where(finite, scale, float("nan")), mask=head_mask)
    tl.store(z_ptr + block * stride_zb + offset * stride_zs + heads * stride_zh,
             tl.where(finite, zero, float("nan")), mask=head_mask)


@triton.jit
def _fill_kv_cache_quant_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
                                n_heads, head_dim, head_dim_v, block_size,
                                stride_kt, stride_kh, stride_vt, stride_vh,
                                stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                                stride_ksb, stride_kss, stride_ksh, stride_kzb, stride_kzs, stride_kzh,
                                stride_vsb, stride_vss, stride_vsh, stride_vzb, stride_vzs, stride_vzh,
                                HEADS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BITS: tl.constexpr,
                                MIN_STEP_DIVISOR: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        offset = slot % block_size
        heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
        head_mask = heads < n_heads
        _quant_heads(k_ptr, token, stride_kt, stride_kh, kc_ptr, block, offset, stride_kcb, stride_kcs, stride_kch,
                     ks_ptr, stride_ksb, stride_kss, stride_ksh, kz_ptr, stride_kzb, stride_kzs, stride_kzh,
                     heads, head_mask, head_dim, D, BITS, MIN_STEP_DIVISOR)
        _quant_heads(v_ptr, token, stride_vt, stride_vh, vc_ptr, block, offset, stride_vcb, stride_vcs, stride_vch,
                     vs_ptr, stride_vsb, stride_vss, stride_vsh, vz_ptr, stride_vzb, stride_vzs, stride_vzh,
                     heads, head_mask, head_dim_v, DV, BITS, MIN_STEP_DIVISOR)


# Launch parameters, in one place: a program copies up to KV_TILE elements of K per token (heads x D),
# one warp per KV_ELEMS_PER_WARP of them.
KV_TILE = 4096
KV_ELEMS_PER_WARP = 512
KV_MAX_WARPS = 8


@memo
def launch_config(n_heads: int, head_dim: int, head_dim_v: int) -> tuple[int, int, int, int]:
    """``(HEADS, D, DV, num_warps)``."""
    d_block = next_power_of_2(head_dim)
    dv_block = next_power_of_2(head_dim_v)
    heads = min(next_power_of_2(n_heads), max(1, KV_TILE // max(d_block, dv_block)))
    warps = max(1, min(KV_MAX_WARPS, heads * max(d_block, dv_block) // KV_ELEMS_PER_WARP))
    return heads, d_block, dv_block, warps


def fill_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  kv_start_indices: torch.Tensor, k_scales_zeros, v_scales_zeros, quant_bits: int) -> None:
    tokens, n_heads, head_dim = key.shape
    if tokens == 0:
        return
    head_dim_v = value.shape[2]
    sk, sv = key.stride(), value.stride()
    if sk[2] != 1 and head_dim != 1:
        key = key.contiguous()
        sk = key.stride()
    if sv[2] != 1 and head_dim_v != 1:
        value = value.contiguous()
        sv = value.stride()
    if quant_bits:
        _fill_quant(key, value, key_cache, value_cache, kv_start_indices, k_scales_zeros, v_scales_zeros, quant_bits)
        return
    heads, d_block, dv_block, warps = launch_config(n_heads, head_dim, head_dim_v)
    skc, svc = key_cache.stride(), value_cache.stride()
    _fill_kv_cache_kernel[(tokens, cdiv(n_heads, heads))](
        key, value, key_cache, value_cache, kv_start_indices, n_heads, head_dim, head_dim_v, key_cache.shape[1],
        sk[0], sk[1], sv[0], sv[1], skc[0], skc[1], skc[2], svc[0], svc[1], svc[2],
        HEADS=heads, D=d_block, DV=dv_block, num_warps=warps)


def _fill_quant(key, value, key_cache, value_cache, kv_start_indices, k_scales_zeros, v_scales_zeros,
                quant_bits: int) -> None:
    tokens, n_heads, head_dim = key.shape
    head_dim_v = value.shape[2]
    (ks, kz), (vs, vz) = k_scales_zeros, v_scales_zeros
    # columns per program: D (8 bits) or D / 2 (4 bits: both halves are loaded)
    heads, d_block, dv_block, warps = launch_config(n_heads, key_cache.shape[3], value_cache.shape[3])
    _fill_kv_cache_quant_kernel[(tokens, cdiv(n_heads, heads))](
        key, value, key_cache, value_cache, kv_start_indices, ks, kz, vs, vz,
        n_heads, head_dim, head_dim_v, key_cache.shape[1],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        *ks.stride(), *kz.stride(), *vs.stride(), *vz.stride(),
        HEADS=heads, D=d_block, DV=dv_block, BITS=quant_bits, MIN_STEP_DIVISOR=MIN_STEP_DIVISOR, num_warps=warps)


assert LEVELS == {4: 15, 8: 255}  # the kernel's (1 << BITS) - 1

OPS = {"fill_kv_cache": fill_kv_cache}
# Strided (packed) caches and quantized caches (8 and 4 bits) are served.
CAPABILITIES = {"fill_kv_cache": Capabilities(features=frozenset({"strided_cache", "kv_quant", "kv_quant4"}))}
