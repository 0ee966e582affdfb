"""Writing new keys and values into the paged KV cache: one launch for K and V, any cache strides.

Grid: ``(T, head groups)``. A program copies one token's group of heads of K (``[HEADS, D]``) and V
(``[HEADS, Dv]``) to the token's slot; slot ``-1`` (padding) writes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlinfer.errors import NotSupportedError
from dlinfer.vendor.registry import Capabilities


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


# Launch parameters, in one place: a program copies up to KV_TILE elements of K per token (heads x D),
# one warp per KV_ELEMS_PER_WARP of them.
KV_TILE = 4096
KV_ELEMS_PER_WARP = 512
KV_MAX_WARPS = 8


def launch_config(n_heads: int, head_dim: int, head_dim_v: int) -> tuple[int, int, int, int]:
    """``(HEADS, D, DV, num_warps)``."""
    d_block = triton.next_power_of_2(head_dim)
    dv_block = triton.next_power_of_2(head_dim_v)
    heads = min(triton.next_power_of_2(n_heads), max(1, KV_TILE // max(d_block, dv_block)))
    warps = max(1, min(KV_MAX_WARPS, heads * max(d_block, dv_block) // KV_ELEMS_PER_WARP))
    return heads, d_block, dv_block, warps


def fill_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  kv_start_indices: torch.Tensor, k_scales_zeros, v_scales_zeros, quant_bits: int) -> None:
    if quant_bits:
        raise NotSupportedError(f"triton fill_kv_cache: quant_bits={quant_bits} (KV-cache quantization) is not "
                                "supported")
    tokens, n_heads, head_dim = key.shape
    if tokens == 0:
        return
    head_dim_v = value.shape[2]
    key = key if key.stride(2) == 1 or head_dim == 1 else key.contiguous()
    value = value if value.stride(2) == 1 or head_dim_v == 1 else value.contiguous()
    heads, d_block, dv_block, warps = launch_config(n_heads, head_dim, head_dim_v)
    _fill_kv_cache_kernel[(tokens, triton.cdiv(n_heads, heads))](
        key, value, key_cache, value_cache, kv_start_indices, n_heads, head_dim, head_dim_v, key_cache.shape[1],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        HEADS=heads, D=d_block, DV=dv_block, num_warps=warps)


OPS = {"fill_kv_cache": fill_kv_cache}
# Strided (packed) caches are served; KV-cache quantization ("kv_quant") is not.
CAPABILITIES = {"fill_kv_cache": Capabilities(features=frozenset({"strided_cache"}))}
