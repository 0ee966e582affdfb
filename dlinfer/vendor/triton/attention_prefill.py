"""Prefill attention in Triton: varlen flash attention over packed sequences, and its paged (chunked) form.

Design
------
One program computes one tile of ``BLOCK_M`` query rows of one sequence: ``BLOCK_M // PACK`` consecutive tokens
times ``PACK`` query heads that share one KV head, rows token-major. ``PACK`` is the whole GQA group when it is a
power of two that leaves a tile at least ``pack_min_tokens`` tokens (GQA packing: each K/V tile is loaded once for
the group, and the causal diagonal of a tile spans fewer tokens, so fewer masked tiles), else 1 (one head per
program). ``grid = (cdiv(max_q_seq_len, BLOCK_M // PACK), num_q_heads // PACK, batch)``: it depends only on
shapes and the ``max_q_seq_len`` bound; a program whose tile starts past its sequence's real query length exits
at once. Tiles are visited in reverse (the longest causal tiles start first); neighbouring programs share a KV
head, so its keys and values stay in L2.

The program keeps its ``[BLOCK_M, D]`` query tile on chip and streams the keys/values in tiles of ``BLOCK_N``:
``S = Q K^T`` and ``O += P V`` on tensor cores (``tl.dot``, fp32 accumulators), online softmax in fp32 with
base-2 exponentials (``log2(e) * softmax_scale`` is applied to the row max and fused into the exponent's FMA).
Causal attention aligns the ends: query ``i`` of a sequence with ``q_len`` queries and ``kv_len`` keys sees keys
``j <= i + kv_len - q_len``. The KV range is walked in two loops: tiles wholly below the diagonal and inside the
sequence need no mask at all; the few diagonal/tail tiles are masked; tiles wholly above the diagonal are never
visited. Non-causal attention (vision encoders) is the same kernel with only the length mask. A query row that
sees no key gives zeros. Head sizes are padded to powers of two with masks; ``Dv`` may differ from ``D``.

* Both ops take the contract's int32 ``[B + 1]`` start offsets (``starts[0] == 0``); the kernel reads
  ``starts[1:]``, a view, as cumulative ends (sequence ``b`` starts at ``ends[b - 1]``, 0 for ``b = 0``).
* ``prefill_attention``: keys/values are packed like the queries, partitioned by their own start offsets.
* ``paged_prefill_attention``: keys/values come from the paged cache through the block table (history and the new
  tokens, which are already in the cache), token ``t`` at page ``block_table[b, t // block_size]``, slot
  ``t % block_size``; caches are addressed through their strides. Queries past ``cu_seqlens_q[-1]`` are never
  touched.

Each program reads its query tile before it writes its output tile, and only its own rows and heads, so
``attn_output`` may alias the query buffer (LMDeploy passes ``query[..., :Dv]``).

A quantized cache (``paged_prefill_attention`` with ``quant_bits`` 8 / 4) is the compile-time branch ``QUANT`` of
the same kernel: K/V tiles are loaded as bytes with their tokens' scales and zeros and dequantized in registers
(``attention_decode.load_dequant``) before the dots; ``QUANT = 0`` compiles to the unquantized kernel.

Launch parameters
-----------------
All in :func:`_config` (and :func:`_pack`): on the GPU, 16-bit inputs with ``D <= 128`` use ``BLOCK_M=128,
BLOCK_N=64, num_warps=8, num_stages=3`` (Hopper: 128 KB of shared memory, ~186 registers, wgmma), ``D`` up to
256 uses ``BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2``; fp32 uses ``tf32x3`` dots (three tensor-core
passes, close to fp32 accuracy) on ``64 x 32`` tiles with 4 warps. Under ``TRITON_INTERPRET=1`` (CPU tensors) a
separate small config (``32 x 16``) keeps the interpreter fast. On the GPU,
``DLINFER_TRITON_PREFILL="block_n=128,pack_gqa=0"`` overrides fields (tuning sweeps).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from dlinfer.vendor.registry import Capabilities
from dlinfer.vendor.triton.attention_decode import (BLOCK_SIZES, HEAD_SIZES, LOG2E, env_overrides, load_dequant,
                                                    quant_scales)
from dlinfer.vendor.triton.host import cdiv, next_power_of_2

LONG_QUERIES = 1024  # max_q_seq_len from which the large-tile config is used


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pack_gqa: bool = True  # rows of a tile = tokens x the query heads of one KV head (see _pack)
    pack_min_tokens: int = 16  # pack only when a tile still holds this many tokens


@functools.lru_cache(maxsize=None)
def _config(device_type: str, dtype: torch.dtype, head_size: int, head_size_v: int,
            long_queries: bool = True) -> PrefillConfig:
    """Launch parameters of the prefill kernel (the one place to tune them).

    ``long_queries``: ``max_q_seq_len >= LONG_QUERIES`` (a host int, so the choice is CUDA-graph safe).
    Measured on the H100 (bf16, 32/8 heads, D 128; benchmarks/tune_attention.py, 2026-11-25): 128x128 tiles
    with 8 warps won at 4x2048 (383 vs 394 us) and 1x8192 tokens (1120 vs 1279 us); 64x64 tiles with 4 warps
    at 16x512 (167 vs 175 us).
    """
    if device_type == "cpu":  # TRITON_INTERPRET=1
        return PrefillConfig(block_m=32, block_n=16, num_warps=1, num_stages=1, pack_min_tokens=4)
    widest = max(next_power_of_2(head_size), next_power_of_2(head_size_v))
    if dtype == torch.float32 and widest > 128:
        # 64x32 fp32 tiles with 2 stages need 256 KB of shared memory at D=256 (over the H100's 227 KB).
        cfg = PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
    elif dtype == torch.float32:
        cfg = PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    elif widest <= 64:
        cfg = PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    elif widest <= 128 and long_queries:
        cfg = PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    elif widest <= 128:
        cfg = PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    else:
        cfg = PrefillConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)
    return env_overrides(cfg, "DLINFER_TRITON_PREFILL")


def _dot_precision(query: torch.Tensor) -> str:
    """fp32 inputs: ``tf32x3`` (three tensor-core passes, close to fp32 accuracy); 16-bit inputs ignore it."""
    return "tf32x3" if query.dtype == torch.float32 else "tf32"


@triton.jit
def _prefill_tile(acc, l_i, m_i, q, n0, offs_m, kv_len, diag, kv_base, k_head, v_head, pages,
                  stride_kb, stride_kt, stride_vb, stride_vt, qk_scale, offs_d, d_mask, offs_dv, dv_mask,
                  ks_head, kz_head, vs_head, vz_head, stride_sb, stride_st,
                  PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, QUANT: tl.constexpr,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr):
    """Fold keys ``[n0, n0 + BLOCK_N)`` into the online softmax of the query tile (``pages``: their cache pages).

    ``MASKED=False`` tiles lie wholly inside the sequence and below the diagonal. ``diag = kv_len - q_len``:
    row ``i`` sees key ``j`` when ``j <= i + diag`` (causal).
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < kv_len
    if PAGED:
        page = pages.to(tl.int64)
        slot = (offs_n % PAGE_SIZE).to(tl.int64)
        k_rows = page * stride_kb + slot * stride_kt
        v_rows = page * stride_vb + slot * stride_vt
    else:
        token = kv_base + offs_n.to(tl.int64)
        k_rows = token * stride_kt
        v_rows = token * stride_vt
    if QUANT:  # paged only; every tile masked by length (the unmasked tiles' mask is all true)
        s_rows = page * stride_sb + slot * stride_st
        k = load_dequant(k_head, k_rows, offs_d, n_mask, d_mask, ks_head, kz_head, s_rows, HEAD_DIM,
                         QUANT).to(q.dtype)
    elif MASKED:
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    else:
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=d_mask[None, :], other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row that has seen nothing yet stays empty
        p = tl.math.exp2(qk - m_use[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)  # qk_scale > 0: scale the max, not the tile
        m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # one FMA per score
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if QUANT:
        v = load_dequant(v_head, v_rows, offs_dv, n_mask, dv_mask, vs_head, vz_head, s_rows, HEAD_DIM_V,
                         QUANT).to(q.dtype)
    elif MASKED:
        v = tl.load(v_head + v_rows[:, None] + offs_dv[None, :], mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
    else:
        v = tl.load(v_head + v_rows[:, None] + offs_dv[None, :], mask=dv_mask[None, :], other=0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _tile_pages(table_row, n0, kv_len, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Cache page of each key of the tile at ``n0`` (paged only). The loops load them one tile ahead, in registers:
    an address that depends on a load made in the same iteration would make the pipeliner wait for every
    outstanding K/V copy before it can issue the next ones."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if PAGED:
        return tl.load(table_row + offs_n // PAGE_SIZE, mask=offs_n < kv_len, other=0)
    else:
        return offs_n


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, q_ends_ptr, kv_ptr_lens, block_table_ptr,
    ks_ptr, kz_ptr, vs_ptr, vz_ptr, stride_sb, stride_st, stride_sh,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb,
    stride_ot, stride_oh,
    qk_scale, num_m_tiles,
    GROUP: tl.constexpr, PACK: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr, QUANT: tl.constexpr,
):
    """One ``BLOCK_M``-row tile: ``BLOCK_M // PACK`` tokens x ``PACK`` query heads (of one KV head).

    ``kv_ptr_lens``: cumulative KV ends (packed keys, ``PAGED=False``) or KV lengths (``PAGED=True``).
    """
    TOKENS: tl.constexpr = BLOCK_M // PACK
    tile = num_m_tiles - 1 - tl.program_id(0)
    head0 = tl.program_id(1) * PACK
    b = tl.program_id(2)
    kvh = head0 // GROUP

    q_start = tl.load(q_ends_ptr + b - 1, mask=b > 0, other=0).to(tl.int32)
    q_len = tl.load(q_ends_ptr + b).to(tl.int32) - q_start
    m0 = tile * TOKENS  # first token of the tile
    if m0 >= q_len:
        return
    if PAGED:
        kv_base = 0
        kv_len = tl.load(kv_ptr_lens + b).to(tl.int32)
    else:
        kv_base = tl.load(kv_ptr_lens + b - 1, mask=b > 0, other=0).to(tl.int64)
        kv_len = (tl.load(kv_ptr_lens + b) - kv_base).to(tl.int32)
    diag = kv_len - q_len

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_r // PACK  # each row's token (rows are token-major, heads minor)
    heads = head0 + offs_r % PACK
    m_mask = offs_m < q_len
    if TOKENS * PACK != BLOCK_M:
        m_mask = m_mask & (offs_r < TOKENS * PACK)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < HEAD_DIM_V
    rows = (q_start + offs_m).to(tl.int64)

    q = tl.load(q_ptr + rows[:, None] * stride_qt + (heads * stride_qh)[:, None] + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    if CAUSAL:
        hi = tl.minimum(kv_len, m0 + TOKENS + diag)  # keys past the tile's last token are never seen
        full = tl.minimum(tl.maximum(m0 + diag + 1, 0), kv_len)  # keys every row of the tile sees
    else:
        hi = kv_len
        full = kv_len
    full = (full // BLOCK_N) * BLOCK_N

    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    s_head = kvh.to(tl.int64) * stride_sh  # scales and zeros (a quantized cache)
    ks_head, kz_head, vs_head, vz_head = ks_ptr + s_head, kz_ptr + s_head, vs_ptr + s_head, vz_ptr + s_head
    table_row = block_table_ptr + b.to(tl.int64) * stride_tb
    if WHILE_LOOP:  # the interpreter (numpy 2 refuses range() over its 1-element scalars)
        n0 = full * 0
        pages = _tile_pages(table_row, n0, kv_len, PAGED, PAGE_SIZE, BLOCK_N)
        while n0 < full:
            next_pages = _tile_pages(table_row, n0 + BLOCK_N, kv_len, PAGED, PAGE_SIZE, BLOCK_N)
            acc, l_i, m_i = _prefill_tile(acc, l_i, m_i, q, n0, offs_m, kv_len, diag, kv_base, k_head, v_head,
                                          pages, stride_kb, stride_kt, stride_vb, stride_vt, qk_scale, offs_d,
                                          d_mask, offs_dv, dv_mask, ks_head, kz_head, vs_head, vz_head, stride_sb,
                                          stride_st, PAGED, PAGE_SIZE, BLOCK_N, False, CAUSAL, DOT_PRECISION,
                                          QUANT, HEAD_DIM, HEAD_DIM_V)
            pages = next_pages
            n0 += BLOCK_N
        n0 = full
        pages = _tile_pages(table_row, n0, kv_len, PAGED, PAGE_SIZE, BLOCK_N)
        while n0 < hi:
            next_pages = _tile_pages(table_row, n0 + BLOCK_N, kv_len, PAGED, PAGE_SIZE, BLOCK_N)
            acc, l_i, m_i = _prefill_tile(acc, l_i, m_i, q, n0, offs_m, kv_len, diag, kv_base, k_head, v_head,
                                          pages, stride_kb, stride_kt, stride_vb, stride_vt, qk_scale, offs_d,
                                          d_mask, offs_dv, dv_mask, ks_head, kz_head, vs_head, vz_head, stride_sb,
                                          stride_st, PAGED, PAGE_SIZE, BLOCK_N, True, CAUSAL, DOT_PRECISION,
                                          QUANT, HEAD_DIM, HEAD_DIM_V)
            pages = next_pages
            n0 += BLOCK_N
    else:
        pages = _tile_pages(table_row, 0, kv_len, PAGED, PAGE_SIZE, BLOCK_N)
        for n0 in range(0, full, BLOCK_N):
            next_pages = _tile_pages(table_row, n0 + BLOCK_N, kv_len, PAGED, PAGE_SIZE, BLOCK_N)
            acc, l_i, m_i = _prefill_tile(acc, l_i, m_i, q, n0, offs_m, kv_len, diag, kv_base, k_head, v_head,
                                          pages, stride_kb, stride_kt, stride_vb, stride_vt, qk_scale, offs_d,
                                          d_mask, offs_dv, dv_mask, ks_head, kz_head, vs_head, vz_head, stride_sb,
                                          stride_st, PAGED, PAGE_SIZE, BLOCK_N, False, CAUSAL, DOT_PRECISION,
                                          QUANT, HEAD_DIM, HEAD_DIM_V)
            pages = next_pages
        pages = _tile_pages(table_row, full, kv_len, PAGED, PAGE_SIZE, BLOCK_N)
        for n0 in range(full, hi, BLOCK_N):
            next_pages = _tile_pages(table_row, n0 + BLOCK_N, kv_len, PAGED, PAGE_SIZE, BLOCK_N)
            acc, l_i, m_i = _prefill_tile(acc, l_i, m_i, q, n0, offs_m, kv_len, diag, kv_base, k_head, v_head,
                                          pages, stride_kb, stride_kt, stride_vb, stride_vt, qk_scale, offs_d,
                                          d_mask, offs_dv, dv_mask, ks_head, kz_head, vs_head, vz_head, stride_sb,
                                          stride_st, PAGED, PAGE_SIZE, BLOCK_N, True, CAUSAL, DOT_PRECISION,
                                          QUANT, HEAD_DIM, HEAD_DIM_V)
            pages = next_pages

    res = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + (heads * stride_oh)[:, None] + offs_dv[None, :],
             res.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])


def _pack(cfg: PrefillConfig, group: int) -> int:
    """Query heads per program: the whole GQA group, when it is a power of two that leaves a tile enough tokens."""
    if cfg.pack_gqa and group > 1 and group & (group - 1) == 0 and cfg.block_m // group >= cfg.pack_min_tokens:
        return group
    return 1


def _launch(query, key, value, out, q_ends, kv_arg, block_table, paged: bool, page_size: int, max_q_seq_len: int,
            softmax_scale: float, causal: bool, kv_strides, quant=(0, (), ())) -> None:
    tokens, num_q_heads, head_size = query.shape
    quant_bits, kv_scales, kv_zeros = quant
    num_kv_heads, head_size_v = key.shape[-2], value.shape[-1] * (2 if quant_bits == 4 else 1)
    batch = q_ends.shape[0]
    if tokens == 0 or batch == 0 or max_q_seq_len == 0 or num_q_heads == 0:
        return
    device_type = query.device.type
    cfg = _config(device_type, query.dtype, head_size, head_size_v, max_q_seq_len >= LONG_QUERIES)
    group = num_q_heads // num_kv_heads
    pack = _pack(cfg, group)
    num_m_tiles = cdiv(max_q_seq_len, cfg.block_m // pack)
    ks, kz, vs, vz, s_strides = quant_scales(key, kv_scales, kv_zeros, quant_bits)
    _prefill_kernel[(num_m_tiles, num_q_heads // pack, batch)](
        query, key, value, out, q_ends, kv_arg, block_table,
        ks, kz, vs, vz, *s_strides,
        *query.stride()[:2], *kv_strides, block_table.stride()[0] if paged else 0, *out.stride()[:2],
        softmax_scale * LOG2E, num_m_tiles,
        GROUP=group, PACK=pack,
        HEAD_DIM=head_size, BLOCK_D=next_power_of_2(head_size),
        HEAD_DIM_V=head_size_v, BLOCK_DV=next_power_of_2(head_size_v),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        PAGED=paged, PAGE_SIZE=page_size, CAUSAL=causal, DOT_PRECISION=_dot_precision(query),
        WHILE_LOOP=device_type == "cpu", QUANT=quant_bits,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def prefill_attention(query, key, value, cu_seqlens_q, cu_seqlens_kv, max_q_seq_len, softmax_scale, causal,
                      attn_output) -> None:
    # [B + 1] starts with starts[0] == 0: starts[1:] (a view, no launch) are the kernel's cumulative ends.
    q_ends = cu_seqlens_q[1:]
    sk, sv = key.stride(), value.stride()
    kv_strides = (0, sk[0], sk[1], 0, sv[0], sv[1])
    kv_ends = q_ends if cu_seqlens_kv is cu_seqlens_q else cu_seqlens_kv[1:]  # one view when they are one tensor
    _launch(query, key, value, attn_output, q_ends, kv_ends, q_ends, False, 1, max_q_seq_len, softmax_scale, causal,
            kv_strides)


def paged_prefill_attention(query, key_cache, value_cache, block_table, cu_seqlens_q, kv_seqlens, max_q_seq_len,
                            max_kv_seq_len, softmax_scale, causal, attn_output, kv_scales=(), kv_zeros=(),
                            quant_bits=0) -> None:
    kv_strides = (*key_cache.stride()[:3], *value_cache.stride()[:3])
    _launch(query, key_cache, value_cache, attn_output, cu_seqlens_q[1:], kv_seqlens, block_table, True,
            key_cache.shape[1], max_q_seq_len, softmax_scale, causal, kv_strides, (quant_bits, kv_scales, kv_zeros))


OPS = {"prefill_attention": prefill_attention, "paged_prefill_attention": paged_prefill_attention}

_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

CAPABILITIES = {
    "prefill_attention": Capabilities(dtypes=_DTYPES, head_sizes=HEAD_SIZES, features=frozenset({"non_causal"})),
    "paged_prefill_attention": Capabilities(
        dtypes=_DTYPES, head_sizes=HEAD_SIZES, block_sizes=BLOCK_SIZES,
        features=frozenset({"strided_cache", "non_causal", "kv_quant"})),
}

__all__ = ["OPS", "CAPABILITIES", "prefill_attention", "paged_prefill_attention", "PrefillConfig"]
