"""Rotary embedding fused with the KV-cache write: one launch rotates q and k in place and writes the rotated
k and the value into the paged cache.

It saves re-reading k after rotation (and one launch) on every layer: ``apply_rotary_pos_emb`` followed by
``fill_kv_cache`` reads k twice and writes it twice; this reads it once and writes it twice (in place and into
the cache). Serves the op ``apply_rotary_pos_emb_fill_kv_cache`` (``dlinfer.ops.fused``), which checks the arguments.

Grid: ``(T, q head groups + k head groups)``; q groups only rotate, k groups rotate, then write k and v to the
token's slot (slot ``-1``: padding, rotated in place but not cached).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlinfer.vendor.registry import Capabilities
from dlinfer.vendor.triton.host import cdiv, next_power_of_2
from dlinfer.vendor.triton.kv_cache import _copy_heads
from dlinfer.vendor.triton.rotary import _load_cos_sin, _rotate_heads, launch_config as rotary_launch_config


@triton.jit
def _rotary_fill_kv_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, slot_ptr,
                           n_q_heads, n_k_heads, half, head_dim_v, block_size,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
                           stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, q_groups,
                           HEADS_Q: tl.constexpr, HEADS_K: tl.constexpr, HALF: tl.constexpr, DV: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cos1, cos2, sin1, sin2 = _load_cos_sin(cos_ptr, sin_ptr, token, stride_cos, stride_sin, half, HALF)
    if group < q_groups:
        _rotate_heads(q_ptr, token, stride_qt, stride_qh, group * HEADS_Q, n_q_heads, half,
                      cos1, cos2, sin1, sin2, HEADS_Q, HALF)
    else:
        out1, out2, heads, mask = _rotate_heads(k_ptr, token, stride_kt, stride_kh, (group - q_groups) * HEADS_K,
                                                n_k_heads, half, cos1, cos2, sin1, sin2, HEADS_K, HALF)
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            block = slot // block_size
            offset = slot % block_size
            dims = tl.arange(0, HALF)
            dst = kc_ptr + block * stride_kcb + offset * stride_kcs + heads[:, None] * stride_kch + dims[None, :]
            tl.store(dst, out1.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + half, out2.to(kc_ptr.dtype.element_ty), mask=mask)
            _copy_heads(v_ptr, vc_ptr, token, stride_vt, stride_vh, block, offset, stride_vcb, stride_vcs,
                        stride_vch, heads, heads < n_k_heads, head_dim_v, DV)


def _launch(query, key, value, key_cache, value_cache, cos, sin, kv_start_indices) -> None:
    """The op implementation: arguments already checked by ``dlinfer.ops.apply_rotary_pos_emb_fill_kv_cache``."""
    tokens, n_q_heads, head_dim = query.shape
    n_k_heads, head_dim_v = key.shape[1], value.shape[2]
    if tokens == 0:
        return
    half_block, heads_q, heads_k, warps = rotary_launch_config(n_q_heads, n_k_heads, head_dim)
    q_groups = cdiv(n_q_heads, heads_q)
    k_groups = cdiv(n_k_heads, heads_k)
    sq, sk, sv, skc, svc = query.stride(), key.stride(), value.stride(), key_cache.stride(), value_cache.stride()
    _rotary_fill_kv_kernel[(tokens, q_groups + k_groups)](
        query, key, value, key_cache, value_cache, cos, sin, kv_start_indices,
        n_q_heads, n_k_heads, head_dim // 2, head_dim_v, key_cache.shape[1],
        sq[0], sq[1], sk[0], sk[1], sv[0], sv[1], cos.stride()[0], sin.stride()[0],
        skc[0], skc[1], skc[2], svc[0], svc[1], svc[2], q_groups,
        HEADS_Q=heads_q, HEADS_K=heads_k, HALF=half_block, DV=next_power_of_2(head_dim_v), num_warps=warps)


OPS = {"apply_rotary_pos_emb_fill_kv_cache": _launch}
# Strided (packed) caches are served; there is no quantized variant of this fusion.
CAPABILITIES = {"apply_rotary_pos_emb_fill_kv_cache": Capabilities(features=frozenset({"strided_cache"}))}
