"""Rotate-half rotary embedding, in place on strided query/key views, query and key in one launch.

Grid: ``(Hq + Hk, token blocks)``. A program rotates one head of ``BLOCK_T`` consecutive tokens as a pair of
``[BLOCK_T, D/2]`` tiles, sized so that each thread moves 16 bytes per half (``ROTARY_WARPS`` warps): it reads
each element of q/k once and the tokens' cos/sin rows in the tile's own layout (no layout conversion). Heads
vary fastest in the grid, so programs running together share the same cos/sin rows (L2 hits) and the same
token rows of q/k. One decode token still spreads over ``Hq + Hk`` programs.

The ``[HEADS, D/2]`` helpers (one token, a group of heads) serve the rotary + KV-cache fusion.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlinfer.vendor.triton.host import cdiv, memo, next_power_of_2


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
def _rotary_tokens_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, tokens, n_q_heads, half,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
                          BLOCK_T: tl.constexpr, HALF: tl.constexpr):
    head = tl.program_id(0)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, HALF)
    mask = (rows < tokens)[:, None] & (dims < half)[None, :]
    cs = rows[:, None] * stride_cos + dims[None, :]
    cos1 = tl.load(cos_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + cs + half, mask=mask, other=0.0).to(tl.float32)
    sn = rows[:, None] * stride_sin + dims[None, :]
    sin1 = tl.load(sin_ptr + sn, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + sn + half, mask=mask, other=0.0).to(tl.float32)
    if head < n_q_heads:
        ptr = q_ptr + rows[:, None] * stride_qt + head * stride_qh + dims[None, :]
    else:
        ptr = k_ptr + rows[:, None] * stride_kt + (head - n_q_heads) * stride_kh + dims[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x1 * cos1 - x2 * sin1).to(ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + half, (x2 * cos2 + x1 * sin2).to(ptr.dtype.element_ty), mask=mask)


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


# Launch parameters, in one place. The token-block kernel (apply_rotary_pos_emb): ROTARY_WARPS warps per
# program, each thread moving 16 bytes of each half. Measured on the H200 against LMDeploy's kernel in the same
# run (benchmarks/tune_elementwise.py, 2026-12-04; q/k views of a fused [T, 48 x 128] bf16 qkv): at 8192 tokens
# 43.9 us (2, 4 or 8 warps; 1 warp 51.5 us) vs the peer's 43.9 us and 46.2 us for the one-token kernel;
# at 256 tokens 3.32-3.39 us vs 3.28 us; one token 1.85-1.91 us for any warp count.
ROTARY_WARPS = 2
ROTARY_TOKEN_BLOCKS = True  # False: the [heads, D/2] kernel below for apply_rotary_pos_emb too (tuning sweeps)
# The one-token kernel (the rotary + KV-cache fusion): a program handles up to ROTARY_TILE elements of each
# half (heads x D/2), with one warp per ROTARY_ELEMS_PER_WARP of them.
# Measured on the H100 (benchmarks/tune_elementwise.py, 2026-11-25): 64.6 vs 67.2 us at 8192 tokens
# against 2048/256, equal at 1 and 256 tokens.
ROTARY_TILE = 512
ROTARY_ELEMS_PER_WARP = 128
ROTARY_MAX_WARPS = 8


@memo
def launch_config(n_q_heads: int, n_k_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """``(HALF, HEADS_Q, HEADS_K, num_warps)`` for a head layout."""
    half_block = next_power_of_2(head_dim // 2)
    cap = max(1, ROTARY_TILE // half_block)
    heads_q = min(next_power_of_2(n_q_heads), cap)
    heads_k = min(next_power_of_2(n_k_heads), cap)
    warps = max(1, min(ROTARY_MAX_WARPS, heads_q * half_block // ROTARY_ELEMS_PER_WARP))
    return half_block, heads_q, heads_k, warps


@memo
def token_block(head_dim: int, itemsize: int, warps: int) -> tuple[int, int]:
    """``(HALF, BLOCK_T)`` of the token-block kernel: 16 bytes per thread per half."""
    half_block = next_power_of_2(head_dim // 2)
    return half_block, max(1, warps * 32 * max(1, 16 // itemsize) // half_block)


def apply_rotary_pos_emb(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    tokens, n_q_heads, head_dim = query.shape
    n_k_heads = key.shape[1]
    if tokens == 0:
        return
    sq, sk = query.stride(), key.stride()
    if ROTARY_TOKEN_BLOCKS:
        warps = ROTARY_WARPS if query.is_cuda else 1
        half_block, block_t = token_block(head_dim, query.element_size(), warps)
        _rotary_tokens_kernel[(n_q_heads + n_k_heads, cdiv(tokens, block_t))](
            query, key, cos, sin, tokens, n_q_heads, head_dim // 2,
            sq[0], sq[1], sk[0], sk[1], cos.stride()[0], sin.stride()[0],
            BLOCK_T=block_t, HALF=half_block, num_warps=warps)
        return
    half_block, heads_q, heads_k, warps = launch_config(n_q_heads, n_k_heads, head_dim)
    q_groups = cdiv(n_q_heads, heads_q)
    k_groups = cdiv(n_k_heads, heads_k)
    _rotary_kernel[(tokens, q_groups + k_groups)](
        query, key, cos, sin, n_q_heads, n_k_heads, head_dim // 2,
        sq[0], sq[1], sk[0], sk[1], cos.stride()[0], sin.stride()[0], q_groups,
        HEADS_Q=heads_q, HEADS_K=heads_k, HALF=half_block, num_warps=warps)


OPS = {"apply_rotary_pos_emb": apply_rotary_pos_emb}
