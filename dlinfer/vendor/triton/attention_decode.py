"""Paged decode attention in Triton: split-KV flash-decoding.

Design
------
One query token per sequence attends to its whole sequence in the paged KV cache. The work is cut three ways:
``grid = (batch, num_kv_heads, num_splits)``. A program owns

* one sequence ``b`` and one KV head: every query head of that KV head's group (``Hq // Hk`` heads, GQA/MQA of
  any ratio) is packed into one ``[BLOCK_H, D]`` query tile, so each K/V tile is read from memory once for the
  whole group;
* one contiguous slice of the sequence (a *split*). The slice length is computed ON THE DEVICE from the real
  ``kv_seqlens[b]``: ``cdiv(cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N`` tokens, so a CUDA graph captured at a
  large ``max_kv_seq_len`` still spreads a short sequence over its splits. Splits past the real length do no
  work and write an empty partial (log-sum-exp ``-inf``).

Inside a program, the slice is read in tiles of ``BLOCK_N`` tokens. Each token's cache page comes from the block
table (``page = block_table[b, t // block_size]``, slot ``t % block_size``), so any block size works, pages may be
shuffled, and tiles may span several pages or part of one. When the page size is a multiple of ``BLOCK_N``, a tile lies inside one page and
takes one page id (a scalar) instead of one per token. The page ids of the next tile are loaded one
iteration ahead into registers, so the K/V loads do not depend on a load of their own iteration and the
pipeliner keeps a tile of K/V in flight (cp.async, double-buffered) while the current one is computed. Caches are
addressed through their strides (a vLLM packed ``kv[NB, Hk, BS, D+Dv]`` buffer viewed as ``[NB, BS, Hk, D]`` is
read in place). Scores use the online softmax in fp32 with base-2 exponentials. The group is multiplied with
``tl.dot`` on tensor cores, padded to ``BLOCK_H >= 16`` rows (free in a memory-bound kernel, and dot operands
stream through shared memory); a single head in fp32 uses elementwise products and row sums instead (exact fp32
dots run on CUDA cores, where padding is not free). Head sizes are padded to powers of two with masks
(``D != Dv`` is fine).

With one split the program writes ``attn_output`` directly. With several, each writes its normalized partial
output and base-2 log-sum-exp to an fp32 scratch buffer and a second kernel, ``grid = (batch, num_q_heads)``,
combines the splits with their log-sum-exp weights; empty partials get weight 0, and a sequence with
``kv_seqlens == 0`` gets a zero row. On sm90+ the reduce kernel is a programmatic dependent launch: it is
scheduled while the split kernel's programs finish and waits (``griddepcontrol.wait``) for their stores, which
hides most of the second launch's latency when the whole decode takes a few microseconds.

Fused reduce (``fused_reduce=1``, off by default until measured): one launch instead of two. Each split program,
after storing its partial and log-sum-exp, increments an arrival counter of its (sequence, KV head) with an
``acq_rel`` atomic at gpu scope (after a CTA barrier: see the kernel for why that orders every thread's stores);
the program that arrives last combines the partials of its group's query heads with the reduce kernel's own
code (:func:`_combine_splits`), writes ``attn_output`` and sets the counter back to 0. The counters are an
``int32`` buffer per device (:func:`arrival_counters`), zeroed once when allocated and left zeroed by every
launch, so calls and CUDA-graph replays need no memset. Limitation: two decode calls running at the same time
on different streams of one device would share counters (the engines run one decode per step per device).

Launch parameters
-----------------
All in :func:`_config` (per device type / dtype / head sizes / group) and :func:`num_splits`:

* GPU: ``BLOCK_N`` 64 tokens per tile (32 when a head size exceeds 128, halved again for fp32), ``num_warps`` 4
  (8 for groups above 32 heads or fp32 groups), ``num_stages`` per card (:data:`CARD_STAGES`), deeper where
  sequences are split (small grids) than for a large batch;
* ``num_splits = min(cdiv(target_programs, B * Hk), resident_programs // (B * Hk),
  cdiv(max_kv_seq_len, min_split_tokens), MAX_SPLITS)`` (at least 1) with ``target_programs = 2 * SM count``,
  ``resident_programs`` = split programs the card runs at once (SM count x programs per SM
  by shared memory for ``split_stages`` K/V tiles and by threads) and ``min_split_tokens = BLOCK_N``: small
  batches and short contexts still fill the GPU in one wave (no second, partly filled wave: on the H200,
  B=16 block 64 went from 0.95-0.99x to 0.99x the peer's time, block 16 B=16 from 1.21-1.52x to 1.26-1.54x);
  a large batch uses one split and skips the reduce kernel. ``one_wave=0`` drops the ``resident_programs`` term
  (the older rule);
* the interpreter (CPU tensors) uses 32-token tiles, 16 target programs and elementwise math for one head;
* ``DLINFER_TRITON_DECODE="num_stages=2,target_programs=528,fused_reduce=1,..."`` overrides fields (tuning
  sweeps; tests use it on the interpreter's config too).

No host syncs: the grid depends only on shapes and ``max_kv_seq_len``; lengths are read on the device.

Quantized caches
----------------
``quant_bits`` 8 / 4 (a ``uint8`` cache with a scale and zero point per token and KV head beside it,
``dlinfer.ops.kv_quant``) is a compile-time branch (``QUANT``) of the same kernel: each K/V tile is loaded as bytes
(4 bits: the byte of column ``d % (D / 2)``, shifted by 4 for the upper half), its tokens' scales and zeros
with it, and dequantized in registers (``(q - zero) * scale`` in fp32, then the query's dtype) before the same
dots; no dequantized copy of the cache is ever written. ``QUANT = 0`` compiles to the unquantized kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from dlinfer.vendor.registry import Capabilities
from dlinfer.vendor.triton.host import card, cdiv, has_pdl, next_power_of_2, resident_programs

LOG2E = 1.4426950408889634
MAX_SPLITS = 64


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # tokens per tile
    block_h: int  # query rows per program: the group, padded to >= 16 for tl.dot (1 without it)
    use_dot: bool  # tensor cores (group padded to block_h rows) or elementwise products (one head)
    num_warps: int
    num_stages: int
    target_programs: int  # split sequences until batch x kv heads x splits reaches this
    min_split_tokens: int  # ... but never into slices shorter than this
    split_stages: int = 2  # num_stages when sequences are split (a small grid: deeper prefetch per program)
    page_tiles: bool = True  # a tile inside one page (page size a multiple of block_n): one page id per tile
    pdl: bool = False  # programmatic dependent launch of the reduce kernel (sm90+): it starts while splits finish
    reduce_warps: int = 4  # warps of the reduce kernel (one program per sequence and query head)
    # ... and from this many reduce programs (B x Hq) on, reduce_warps_many: several programs per SM, so smaller
    # ones pack better (H100, block 64/16: 2 warps 0.3-2.6 % faster at batch 16, 4 warps 3.6 % faster at batch 1
    # ctx 1k).
    # 0: never.
    reduce_many_programs: int = 0
    reduce_warps_many: int = 2
    # one_wave: never more slices than fit in ONE wave of resident programs (floor of resident_programs /
    # (B x Hk)), even where reaching target_programs (ceil) would need a second, partly filled wave.
    one_wave: bool = True
    resident_programs: int = 0  # split programs the card runs at once (shared memory and threads per SM)
    # fused_reduce: split sequences are combined by the last split program of each (sequence, KV head) to finish
    # (an arrival counter), not by a second kernel: one launch instead of two. Off until measured on a GPU.
    fused_reduce: bool = False
    # pow2_splits: round the split count down to a power of two (LMDeploy's decode does): with target_programs
    # 3 x SMs and one_wave=0 that is 16/32/32 splits at batch 1 (ctx 1k/4k/16k, block 64) and 4 at batch 16,
    # where 33 and 3 leave an empty split (33 -> BLOCK_S 64 in the reduce) or 6-tile slices. Off until measured.
    pow2_splits: bool = False
    # hoist_addr: tiles inside one page (page_tiles), unquantized, power-of-two head sizes: each tile's K/V
    # addresses are one scalar page base plus per-row offsets computed once before the loop (int32), and K is
    # loaded without a mask (its rows past the end are in the same allocated page and are masked out of the
    # scores); V keeps its row mask. Without it every address is built per tile in int64 with a row and column
    # mask (~470 vs ~270 SASS instructions a tile in the sm_90 build). Same results; on the H100 at least as fast
    # at every block-16/64 shape swept and 0.7-4 % faster with block 64 at batch 1 and 16.
    hoist_addr: bool = True


def env_overrides(config, env_name: str):
    """``config`` with fields replaced from ``$env_name`` (``"field=int,field=int"``; 0/1 for booleans): lets a
    tuning run sweep launch parameters without editing code. Read when a config is first built."""
    spec = os.environ.get(env_name, "").strip()
    if not spec:
        return config
    fields = {f.name: f.type for f in dataclasses.fields(config)}
    changes = {}
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise ValueError(f"{env_name}={spec!r}: expected comma-separated field=value with fields from "
                             f"{sorted(fields)}, got {item!r}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{env_name}: {name} must be an integer, got {value!r}") from None
        changes[name] = bool(number) if fields[name] in (bool, "bool") else number
    return dataclasses.replace(config, **changes)


# Per card (matched against the device name), measured with benchmarks/tune_attention.py against LMDeploy's
# kernel in the same run (bf16, 32/8 heads, D 128, block 16 and 64):
# * H100 (2026-11-25): num_stages 2 (366 vs 410 us at B=64 ctx 4k, equal within noise at B=1 and B=16).
# * H200 (2026-12-04): 3 stages where sequences are split (block 64 B=1 ctx 16k 1.01x the peer vs 0.96x with 2;
#   block 16 B=1 ctx 16k 1.78x vs 1.59x), 2 stages for a large batch (3 stages: B=64 ctx 4k 0.84x vs 1.03x).
# Other cards: 2 and 2 (the H100's values; a deeper pipeline costs occupancy on a card with less shared memory).
CARD_STAGES = {"H100": (2, 2), "H200": (2, 3)}


@functools.lru_cache(maxsize=None)
def _card_stages(device_index: int) -> tuple[int, int]:
    """``(num_stages, split_stages)`` for this card from :data:`CARD_STAGES`, else the defaults."""
    name = card(device_index).name
    for model, stages in CARD_STAGES.items():
        if model in name:
            return stages
    return 2, 2


@functools.lru_cache(maxsize=None)
def _config(device_type: str, device_index: int, dtype: torch.dtype, head_size: int, head_size_v: int,
            group: int) -> DecodeConfig:
    """Launch parameters of the split kernel (the one place to tune them)."""
    if device_type == "cpu":  # TRITON_INTERPRET=1: small tiles, many splits (to test them); MHA elementwise
        use_dot = group > 1
        cfg = DecodeConfig(block_n=32, block_h=max(16, next_power_of_2(group)) if use_dot else 1,
                           use_dot=use_dot, num_warps=1, num_stages=1, split_stages=1, target_programs=16,
                           min_split_tokens=32)
        return _overridden(cfg, group)
    widest = max(next_power_of_2(head_size), next_power_of_2(head_size_v))
    block_n = 64 if widest <= 128 else 32
    # 16-bit: always tensor cores, even for one head (16x padded rows are free in a memory-bound kernel, and
    # tl.dot operands stream through shared memory, which the pipeliner double-buffers with cp.async).
    # fp32 (exact ieee dots run on CUDA cores): elementwise for one head, half tiles and 8 warps for a group.
    use_dot = group > 1 or dtype != torch.float32
    block_h = max(16, next_power_of_2(group)) if use_dot else 1
    num_warps = 4 if block_h <= 32 else 8
    if dtype == torch.float32:
        block_n, num_warps = block_n // 2, (8 if use_dot else 4)
    num_stages, split_stages = _card_stages(device_index)
    facts = card(device_index)
    stage_bytes = block_n * (next_power_of_2(head_size) + next_power_of_2(head_size_v)) * dtype.itemsize
    cfg = DecodeConfig(block_n=block_n, block_h=block_h, use_dot=use_dot, num_warps=num_warps, num_stages=num_stages,
                       split_stages=split_stages,
                       target_programs=2 * facts.sm_count, min_split_tokens=block_n,
                       reduce_many_programs=2 * facts.sm_count,
                       pdl=has_pdl(device_type, device_index),
                       resident_programs=resident_programs(split_stages * stage_bytes, num_warps, facts.sm_count,
                                                           facts.smem_per_sm, facts.threads_per_sm))
    return _overridden(cfg, group)


def _overridden(cfg: DecodeConfig, group: int) -> DecodeConfig:
    """``cfg`` with the ``DLINFER_TRITON_DECODE`` overrides (the interpreter's too: tests force splits or the
    fused reduce through it), ``block_h`` kept consistent with ``use_dot``."""
    cfg = env_overrides(cfg, "DLINFER_TRITON_DECODE")
    if not cfg.use_dot and group > 1:
        raise ValueError(f"DLINFER_TRITON_DECODE: use_dot=0 serves one query head per KV head, not {group}")
    return dataclasses.replace(cfg, block_h=max(16, next_power_of_2(group)) if cfg.use_dot else 1)


def num_splits(batch: int, num_kv_heads: int, max_kv_seq_len: int, config: DecodeConfig) -> int:
    """How many slices each sequence is cut into; depends only on shapes and the length bound."""
    programs = max(1, batch * num_kv_heads)
    want = cdiv(config.target_programs, programs)
    if config.one_wave and config.resident_programs:
        want = min(want, config.resident_programs // programs)
    by_length = cdiv(max(max_kv_seq_len, 1), config.min_split_tokens)
    splits = max(1, min(want, by_length, MAX_SPLITS))
    return 1 << (splits.bit_length() - 1) if config.pow2_splits else splits


def _dot_precision(query: torch.Tensor) -> str:
    """fp32 inputs: exact ``ieee`` dots (decode is memory-bound; no spills); 16-bit inputs ignore it."""
    return "ieee" if query.dtype == torch.float32 else "tf32"


@triton.jit
def _tile_pages(table_row, n0, end, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_TILES: tl.constexpr):
    """Cache page of each token of the tile at ``n0`` (``PAGE_TILES``: the tile lies in one page, so one scalar
    page id). The loop loads them one tile ahead, in registers: an address that depends on a load made in the
    same iteration would make the pipeliner wait for every outstanding K/V copy before it can issue the next
    ones."""
    if PAGE_TILES:
        return tl.load(table_row + n0 // PAGE_SIZE, mask=n0 < end, other=0)
    else:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        return tl.load(table_row + offs_n // PAGE_SIZE, mask=offs_n < end, other=0)


@triton.jit
def load_dequant(head_ptr, rows, offs, row_mask, col_mask, s_ptr, z_ptr, s_rows, DIM: tl.constexpr,
                 QUANT: tl.constexpr):
    """A ``[rows, offs]`` tile of a quantized cache head as fp32 ``(q - zero) * scale`` (``rows``: element offsets
    of the tokens, ``s_rows``: their offsets in the scales/zeros). 4 bits: column ``d`` is in the byte of column
    ``d % (DIM / 2)``, low nibble for the first half, high nibble for the second."""
    if QUANT == 4:
        cols = offs % (DIM // 2)
    else:
        cols = offs
    raw = tl.load(head_ptr + rows[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0)
    if QUANT == 4:
        raw = (raw >> ((offs >= DIM // 2).to(tl.uint8) * 4)[None, :]) & 15
    scale = tl.load(s_ptr + s_rows, mask=row_mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + s_rows, mask=row_mask, other=0.0).to(tl.float32)
    return (raw.to(tl.float32) - zero[:, None]) * scale[:, None]


@triton.jit
def _decode_tile(acc, l_i, m_i, q, n0, end, pages, k_head, v_head, stride_kb, stride_kt, stride_vb, stride_vt,
                 qk_scale, offs_d, d_mask, offs_dv, dv_mask, ks_head, kz_head, vs_head, vz_head, stride_sb, stride_st,
                 PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 QUANT: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, k_rows, v_rows,
                 HOIST: tl.constexpr):
    """One tile of ``BLOCK_N`` tokens starting at ``n0`` (tokens ``>= end`` masked) folded into the online softmax.
    ``HOIST``: the tile lies in one page; ``k_rows`` / ``v_rows`` are its rows' element offsets from the tile's first
    token (made once by the caller), so a tile's address is one scalar base plus them."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < end
    page = pages.to(tl.int64)  # a scalar when the tile lies in one page, else one per token
    slot = (offs_n % PAGE_SIZE).to(tl.int64)
    if HOIST:
        first = (n0 % PAGE_SIZE).to(tl.int64)
        # unmasked: every row is in this tile's page (allocated); rows past `end` leave the scores below as -inf
        k = tl.load(k_head + (page * stride_kb + first * stride_kt) + k_rows)
    elif QUANT:
        s_rows = page * stride_sb + slot * stride_st
        k = load_dequant(k_head, page * stride_kb + slot * stride_kt, offs_d, n_mask, d_mask, ks_head, kz_head,
                         s_rows, HEAD_DIM, QUANT).to(q.dtype)
    else:
        k = tl.load(k_head + (page * stride_kb + slot * stride_kt)[:, None] + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    if USE_DOT:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    else:  # one query head (BLOCK_H == 1): a row of scores on CUDA cores
        qk = tl.sum(tl.sum(q.to(tl.float32), axis=0)[None, :] * k.to(tl.float32), axis=1)[None, :]
    qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # finite: every tile holds a valid token
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if HOIST:  # masked rows: a garbage (NaN) value times p == 0 would still be NaN
        v = tl.load(v_head + (page * stride_vb + first * stride_vt) + v_rows, mask=n_mask[:, None], other=0.0)
    elif QUANT:
        v = load_dequant(v_head, page * stride_vb + slot * stride_vt, offs_dv, n_mask, dv_mask, vs_head, vz_head,
                         s_rows, HEAD_DIM_V, QUANT).to(q.dtype)
    else:
        v = tl.load(v_head + (page * stride_vb + slot * stride_vt)[:, None] + offs_dv[None, :],
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
    acc = acc * alpha[:, None]
    if USE_DOT:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    else:
        acc += tl.sum(tl.sum(p, axis=0)[:, None] * v.to(tl.float32), axis=0)[None, :]
    return acc, l_i, m_new


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, kv_lens_ptr, out_ptr, mid_o_ptr, mid_lse_ptr, counter_ptr,
    ks_ptr, kz_ptr, vs_ptr, vz_ptr, stride_sb, stride_st, stride_sh,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb,
    stride_ob, stride_oh,
    stride_mb, stride_mh, stride_ms,
    stride_lb, stride_lh,
    qk_scale, n_splits,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr, DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
    PAGE_TILES: tl.constexpr, USE_PDL: tl.constexpr, QUANT: tl.constexpr,
    FUSED_REDUCE: tl.constexpr, BLOCK_S: tl.constexpr, HOIST: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    kv_len = tl.load(kv_lens_ptr + b).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(kv_len, n_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)

    offs_h = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < HEAD_DIM_V

    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)

    table_row = block_table_ptr + b.to(tl.int64) * stride_tb
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    s_head = kvh.to(tl.int64) * stride_sh  # scales and zeros (a quantized cache)
    ks_head, kz_head, vs_head, vz_head = ks_ptr + s_head, kz_ptr + s_head, vs_ptr + s_head, vz_ptr + s_head
    if HOIST:  # rows' offsets within a tile, once (int32: the host checks they fit)
        offs_t = tl.arange(0, BLOCK_N)
        k_rows = (offs_t * stride_kt)[:, None] + offs_d[None, :]
        v_rows = (offs_t * stride_vt)[:, None] + offs_dv[None, :]
    else:
        k_rows = 0
        v_rows = 0
    pages = _tile_pages(table_row, start, end, PAGE_SIZE, BLOCK_N, PAGE_TILES)
    if WHILE_LOOP:  # the interpreter (numpy 2 refuses range() over its 1-element scalars)
        n0 = start
        while n0 < end:
            next_pages = _tile_pages(table_row, n0 + BLOCK_N, end, PAGE_SIZE, BLOCK_N, PAGE_TILES)
            acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, n0, end, pages, k_head, v_head, stride_kb, stride_kt,
                                         stride_vb, stride_vt, qk_scale, offs_d, d_mask, offs_dv, dv_mask,
                                         ks_head, kz_head, vs_head, vz_head, stride_sb, stride_st,
                                         PAGE_SIZE, BLOCK_N, USE_DOT, DOT_PRECISION, QUANT, HEAD_DIM, HEAD_DIM_V,
                                         k_rows, v_rows, HOIST)
            pages = next_pages
            n0 += BLOCK_N
    else:
        for n0 in range(start, end, BLOCK_N):
            next_pages = _tile_pages(table_row, n0 + BLOCK_N, end, PAGE_SIZE, BLOCK_N, PAGE_TILES)
            acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, n0, end, pages, k_head, v_head, stride_kb, stride_kt,
                                         stride_vb, stride_vt, qk_scale, offs_d, d_mask, offs_dv, dv_mask,
                                         ks_head, kz_head, vs_head, vz_head, stride_sb, stride_st,
                                         PAGE_SIZE, BLOCK_N, USE_DOT, DOT_PRECISION, QUANT, HEAD_DIM, HEAD_DIM_V,
                                         k_rows, v_rows, HOIST)
            pages = next_pages

    if USE_PDL:  # the reduce kernel may launch now; it waits for this grid's stores before reading them
        tl.extra.cuda.gdc_launch_dependents()
    # Empty = no token in this slice (l_i == 0). NaN in, NaN out: a NaN l_i is not empty, its partial stays NaN.
    has = l_i != 0.0
    res = acc / tl.where(has, l_i, 1.0)[:, None]
    store_mask = h_mask[:, None] & dv_mask[None, :]
    if DIRECT:
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :],
                 res.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(mid_o_ptr + b.to(tl.int64) * stride_mb + heads[:, None] * stride_mh + split * stride_ms
                 + offs_dv[None, :], res, mask=store_mask)
        tl.store(mid_lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=h_mask)
        if FUSED_REDUCE:
            # Arrive on this (sequence, KV head)'s counter. Triton issues a scalar atomic from one thread, so the
            # CTA barrier first orders every thread's partial stores above before it; the atomic's release at gpu
            # scope (cumulative: it covers what the barrier ordered before it) publishes them to the other SMs.
            # The last arriver's acquire is shared with all its threads by the barrier after the atomic (Triton
            # broadcasts the old value through shared memory), so its loads below see every group member's
            # partials. It then resets the counter; stream order makes that visible to the next launch, so the
            # buffer is never zeroed between calls or graph replays.
            tl.debug_barrier()
            counter = counter_ptr + b * tl.num_programs(1) + kvh
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == n_splits - 1:
                row = b.to(tl.int64)
                for i in range(GROUP):
                    head = kvh * GROUP + i
                    _combine_splits(mid_o_ptr + row * stride_mb + head * stride_mh,
                                    mid_lse_ptr + row * stride_lb + head * stride_lh,
                                    out_ptr + row * stride_ob + head * stride_oh, stride_ms, n_splits,
                                    HEAD_DIM_V, BLOCK_DV, BLOCK_S)
                tl.store(counter, 0)


@triton.jit
def _combine_splits(mid_o_row, mid_lse_row, out_row, stride_ms, n_splits, HEAD_DIM_V: tl.constexpr,
                    BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr):
    """One query head's output from its ``n_splits`` partials (``mid_o_row``: ``[splits, Dv]`` with split stride
    ``stride_ms``; ``mid_lse_row``: ``[splits]``, contiguous) weighted by their base-2 log-sum-exps. Empty partials
    (``-inf``) weigh 0 (they hold zeros, read with the rest); all empty (``kv_seqlens == 0``) gives a zero row."""
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < n_splits
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < HEAD_DIM_V
    # Both loads are issued together: the partials' mask does not depend on the log-sum-exps (one memory latency,
    # not two, on the critical path of a short decode). Every split program stores its partial, an empty one
    # zeros, so reading it is safe; its weight is 0.
    lse = tl.load(mid_lse_row + offs_s, mask=s_mask, other=float("-inf"))
    part = tl.load(mid_o_row + offs_s[:, None] * stride_ms + offs_dv[None, :], mask=s_mask[:, None] & dv_mask[None, :],
                   other=0.0)
    live = lse != float("-inf")  # a NaN partial is live: the combined row is NaN, never the other splits
    top = tl.max(lse, axis=0)
    top = tl.where(top > float("-inf"), top, 0.0)
    weight = tl.where(live, tl.math.exp2(lse - top), 0.0)
    total = tl.sum(weight, axis=0)
    res = tl.sum(weight[:, None] * part, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_row + offs_dv, res.to(out_row.dtype.element_ty), mask=dv_mask)


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr,
    stride_mb, stride_mh, stride_ms,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    n_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    if USE_PDL:  # launched early (programmatic dependent launch): wait for the split kernel's partials
        tl.extra.cuda.gdc_wait()
    _combine_splits(mid_o_ptr + b * stride_mb + h * stride_mh, mid_lse_ptr + b * stride_lb + h * stride_lh,
                    out_ptr + b * stride_ob + h * stride_oh, stride_ms, n_splits, HEAD_DIM_V, BLOCK_DV, BLOCK_S)


def quant_scales(key_cache, kv_scales, kv_zeros, quant_bits):
    """``(k_scales, k_zeros, v_scales, v_zeros, (block, token, head) strides)`` for the kernels: the four share
    strides (copies if they do not, which LMDeploy's layout never needs); stand-ins when not quantized."""
    if not quant_bits:
        return key_cache, key_cache, key_cache, key_cache, (0, 0, 0)
    tensors = (kv_scales[0], kv_zeros[0], kv_scales[1], kv_zeros[1])
    if len({t.stride() for t in tensors}) > 1:
        tensors = tuple(t.contiguous() for t in tensors)
    return (*tensors, tensors[0].stride())


def reduce_warps(cfg: DecodeConfig, batch: int, num_q_heads: int) -> int:
    """Warps of the reduce kernel's ``batch x num_q_heads`` programs (see ``DecodeConfig.reduce_many_programs``)."""
    many = cfg.reduce_many_programs and batch * num_q_heads >= cfg.reduce_many_programs
    return cfg.reduce_warps_many if many else cfg.reduce_warps


def hoisted(cfg: DecodeConfig, page_tiles: bool, quant_bits: int, head_size: int, head_size_v: int) -> bool:
    """Whether ``hoist_addr`` applies to a launch (its int32 row offsets are checked apart: ``_rows_fit_int32``)."""
    return (cfg.hoist_addr and page_tiles and not quant_bits and head_size == next_power_of_2(head_size)
            and head_size_v == next_power_of_2(head_size_v))


def _rows_fit_int32(k_row: int, v_row: int, block_n: int, width: int) -> bool:
    """``hoist_addr``'s int32 row offsets: non-negative K/V row strides whose ``block_n``-row tile (plus ``width``
    columns) stays below 2**31 elements. Read only where the variant applies (``hoisted``)."""
    return min(k_row, v_row) >= 0 and block_n * max(k_row, v_row) + width < 2 ** 31


# Arrival counters of the fused reduce, per device: every buffer ever allocated stays alive (a captured CUDA graph
# keeps the address of the one it used); calls use the last, the largest.
_COUNTERS: dict[tuple[str, int], list[torch.Tensor]] = {}
MIN_COUNTERS = 4096  # (sequence, KV head) pairs: more than a split launch has (< target_programs, 2 x SMs)


def arrival_counters(device: torch.device, needed: int) -> torch.Tensor:
    """A zeroed ``int32`` buffer of at least ``needed`` arrival counters on ``device``, left zeroed by every launch
    that uses it. Grown in powers of two (at least :data:`MIN_COUNTERS`) outside CUDA-graph capture and kept. A
    capture that needs more than any earlier call allocates a fresh one from the capture's pool and does not keep
    it: its zero fill is a memset node of the graph, run at each replay before the kernel, so the graph is correct,
    at the cost of one more node per such call (an eager call at that batch before capturing avoids it)."""
    key = (device.type, device.index or 0)
    kept = _COUNTERS.get(key)
    if kept and kept[-1].numel() >= needed:
        return kept[-1]
    fresh = torch.zeros(max(MIN_COUNTERS, next_power_of_2(needed)), dtype=torch.int32, device=device)
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        _COUNTERS.setdefault(key, []).append(fresh)
    return fresh


def paged_decode_attention(query, key_cache, value_cache, block_table, kv_seqlens, max_kv_seq_len, softmax_scale,
                           attn_output, kv_scales=(), kv_zeros=(), quant_bits=0) -> None:
    batch, num_q_heads, head_size = query.shape
    num_kv_heads = key_cache.shape[2]
    head_size_v = value_cache.shape[3] * (2 if quant_bits == 4 else 1)
    page_size = key_cache.shape[1]
    if batch == 0 or num_q_heads == 0:
        return
    group = num_q_heads // num_kv_heads
    device = query.device
    device_type = device.type
    cfg = _config(device_type, device.index or 0, query.dtype, head_size, head_size_v, group)
    splits = num_splits(batch, num_kv_heads, max_kv_seq_len, cfg)
    direct = splits == 1
    if direct:
        mid_o = mid_lse = attn_output  # unused
        mid_strides = (0, 0, 0, 0, 0)
    else:  # fp32 partial outputs [B, Hq, splits, Dv] and log-sum-exps [B, Hq, splits], contiguous
        mid_o = query.new_empty((batch, num_q_heads, splits, head_size_v), dtype=torch.float32)
        mid_lse = query.new_empty((batch, num_q_heads, splits), dtype=torch.float32)
        mid_strides = (num_q_heads * splits * head_size_v, splits * head_size_v, head_size_v,
                       num_q_heads * splits, splits)
    block_d = next_power_of_2(head_size)
    block_dv = next_power_of_2(head_size_v)
    page_tiles = cfg.page_tiles and page_size % cfg.block_n == 0
    hoist = (hoisted(cfg, page_tiles, quant_bits, head_size, head_size_v)
             and _rows_fit_int32(key_cache.stride(1), value_cache.stride(1), cfg.block_n, max(block_d, block_dv)))
    fused = cfg.fused_reduce and not direct
    pdl = cfg.pdl and not direct and not fused
    counters = arrival_counters(device, batch * num_kv_heads) if fused else kv_seqlens  # unused unless fused
    ks, kz, vs, vz, s_strides = quant_scales(key_cache, kv_scales, kv_zeros, quant_bits)
    out_strides = attn_output.stride()[:2]
    _decode_split_kernel[(batch, num_kv_heads, splits)](
        query, key_cache, value_cache, block_table, kv_seqlens, attn_output, mid_o, mid_lse, counters,
        ks, kz, vs, vz, *s_strides,
        *query.stride()[:2], *key_cache.stride()[:3], *value_cache.stride()[:3], block_table.stride()[0],
        *out_strides, *mid_strides,
        softmax_scale * LOG2E, splits,
        GROUP=group, BLOCK_H=cfg.block_h,
        HEAD_DIM=head_size, BLOCK_D=block_d, HEAD_DIM_V=head_size_v, BLOCK_DV=block_dv,
        PAGE_SIZE=page_size, BLOCK_N=cfg.block_n,
        USE_DOT=cfg.use_dot, DIRECT=direct, DOT_PRECISION=_dot_precision(query), WHILE_LOOP=device_type == "cpu",
        PAGE_TILES=page_tiles, USE_PDL=pdl, QUANT=quant_bits,
        FUSED_REDUCE=fused, BLOCK_S=next_power_of_2(splits) if fused else 1, HOIST=hoist,
        num_warps=cfg.num_warps, num_stages=cfg.split_stages if splits > 1 else cfg.num_stages,
    )
    if not direct and not fused:
        _decode_reduce_kernel[(batch, num_q_heads)](
            mid_o, mid_lse, attn_output,
            *mid_strides, *out_strides, splits,
            HEAD_DIM_V=head_size_v, BLOCK_DV=block_dv, BLOCK_S=next_power_of_2(splits), USE_PDL=pdl,
            num_warps=reduce_warps(cfg, batch, num_q_heads) if device_type == "cuda" else 1,
            **({"launch_pdl": True} if pdl else {}),
        )


OPS = {"paged_decode_attention": paged_decode_attention}

HEAD_SIZES = frozenset(range(16, 257, 8))  # padded to a power of two inside; >= 16 for tl.dot
BLOCK_SIZES = frozenset({8, 16, 32, 64, 128, 256})

CAPABILITIES = {
    "paged_decode_attention": Capabilities(
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        head_sizes=HEAD_SIZES,
        block_sizes=BLOCK_SIZES,
        features=frozenset({"strided_cache", "kv_quant", "kv_quant4"}),
    ),
}

__all__ = ["OPS", "CAPABILITIES", "paged_decode_attention", "num_splits", "DecodeConfig", "load_dequant",
           "quant_scales", "arrival_counters"]
