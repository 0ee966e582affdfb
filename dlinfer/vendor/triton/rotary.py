"""Rotate-half rotary embedding, in place on strided query/key views, query and key in one launch.

Grid: ``(T, q head groups + k head groups)``. A program rotates one token's group of heads as a
``[HEADS, D/2]`` pair of tiles: it reads the token's cos/sin row once and each element of q/k once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_cos_sin(cos_ptr, sin_ptr, token, stride_cos, stride_sin, half, HALF: tl.constexpr):
    dims = tl.arange(0, HALF)
    dmask = dims < half
    cos_row = cos_ptr + token * stride_cos + dims
    sin_row = sin_ptr + token * stride_sin + dims
    cos1 = tl.load(cos_row, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_row + half, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_row, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_row + half, mask=dmask, other=0.0).to(tl.float32)
    return cos1, cos2, sin1, sin2


@triton.jit
def _rotate_heads(x_ptr, token, stride_t, stride_h, first_head, n_heads, half, cos1, cos2, sin1, sin2,
                  HEADS: tl.constexpr, HALF: tl.constexpr):
    """Rotate heads ``[first_head, first_head + HEADS)`` of one token in place; returns the rotated halves
    (in the tensor's dtype), the head indices and the mask, for callers that write them elsewhere too."""
    heads = first_head + tl.arange(0, HEADS)
    dims = tl.arange(0, HALF)
    mask = (heads < n_heads)[:, None] & (dims < half)[None, :]
    ptr = x_ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + half, mask=mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos1[None, :] - x2 * sin1[None, :]).to(x_ptr.dtype.element_ty)
    out2 = (x2 * cos2[None, :] + x1 * sin2[None, :]).to(x_ptr.dtype.element_ty)
    tl.store(ptr, out1, mask=mask)
    tl.store(ptr + half, out2, mask=mask)
    return out1, out2, heads, mask


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, n_q_heads, n_k_heads, half,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin, q_groups,
                   HEADS_Q: tl.constexpr, HEADS_K: tl.constexpr, HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cos1, cos2, sin1, sin2 = _load_cos_sin(cos_ptr, sin_ptr, token, stride_cos, stride_sin, half, HALF)
    if group < q_groups:
        _rotate_heads(q_ptr, token, stride_qt, stride_qh, group * HEADS_Q, n_q_heads, half,
                      cos1, cos2, sin1, sin2, HEADS_Q, HALF)
    else:
        _rotate_heads(k_ptr, token, stride_kt, stride_kh, (group - q_groups) * HEADS_K, n_k_heads, half,
                      cos1, cos2, sin1, sin2, HEADS_K, HALF)


# Launch parameters, in one place: a program handles up to ROTARY_TILE elements of each half (heads x D/2),
# with one warp per ROTARY_ELEMS_PER_WARP of them.
# Measured on the H100 (benchmarks/tune_elementwise.py, 2026-11-25): 64.6 vs 67.2 us at 8192 tokens
# against 2048/256, equal at 1 and 256 tokens.
ROTARY_TILE = 512
ROTARY_ELEMS_PER_WARP = 128
ROTARY_MAX_WARPS = 8


def launch_config(n_q_heads: int, n_k_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """``(HALF, HEADS_Q, HEADS_K, num_warps)`` for a head layout."""
    half_block = triton.next_power_of_2(head_dim // 2)
    cap = max(1, ROTARY_TILE // half_block)
    heads_q = min(triton.next_power_of_2(n_q_heads), cap)
    heads_k = min(triton.next_power_of_2(n_k_heads), cap)
    warps = max(1, min(ROTARY_MAX_WARPS, heads_q * half_block // ROTARY_ELEMS_PER_WARP))
    return half_block, heads_q, heads_k, warps


def apply_rotary_pos_emb(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    tokens, n_q_heads, head_dim = query.shape
    n_k_heads = key.shape[1]
    if tokens == 0:
        return
    half_block, heads_q, heads_k, warps = launch_config(n_q_heads, n_k_heads, head_dim)
    q_groups = triton.cdiv(n_q_heads, heads_q)
    k_groups = triton.cdiv(n_k_heads, heads_k)
    _rotary_kernel[(tokens, q_groups + k_groups)](
        query, key, cos, sin, n_q_heads, n_k_heads, head_dim // 2,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos.stride(0), sin.stride(0), q_groups,
        HEADS_Q=heads_q, HEADS_K=heads_k, HALF=half_block, num_warps=warps)


OPS = {"apply_rotary_pos_emb": apply_rotary_pos_emb}
