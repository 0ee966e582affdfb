"""Mixture of experts: router gating (softmax + top-k in one kernel) and the fused SwiGLU experts.

``fused_moe`` runs five launches (four when the pairs fit one sorting chunk, as in decode; two more with the
hot experts' own GEMMs, one more with ``TMA_A``, both below) and no host sync (every buffer is sized from
``T * topk`` and ``E``; grids depend on shapes only, so it is CUDA-graph capturable), and is deterministic (no
atomics):

1. ``_moe_histogram_kernel``: per chunk of the ``N = T * topk`` routed (token, slot) pairs, a per-expert
   histogram and each pair's rank among the chunk's pairs of the same expert (skipped for one chunk: the
   scatter kernel then does it itself).
2. ``_moe_scatter_kernel``: per chunk, the expert's start (in expert order, each padded to the hot block size)
   plus the counts of earlier chunks plus the rank gives each pair's row in the expert-sorted order: a stable
   counting sort. Program 0 also writes the per-expert block table the GEMMs read.
3. ``_moe_gemm_kernel`` (gate_up, ``SILU=True``): a grouped GEMM over blocks of ``BLOCK_M`` sorted rows of one
   expert, gathering the hidden rows; the gate and up weight rows of the same output columns are interleaved in
   one B tile (one wide MMA per K step; two tiles for an N-fastest weight, read in place) and split in the
   epilogue, ``silu(gate) * up``, so only ``[N, I]`` activations are written.
4. ``_moe_gemm_kernel`` (down): the same grouped GEMM on the activations, into ``[N, H]`` per-pair outputs.
5. ``_moe_combine_kernel``: ``out[t] = sum_k w[t, k] * y[t, k]`` in fp32 (renormalized if asked), in a fixed
   order: deterministic, no atomics, and the routing weight is applied to the down output rounded to the
   input dtype, exactly as the reference computes it.

Row-count-aware tiles: the host picks tiles from the mean load, but under skewed routing a few experts hold many
rows. When an expert could (``T >= hot_rows``), the scatter kernel classes each expert on the device by its row
count, and the experts holding ``>= hot_rows`` rows run on a second pair of GEMM launches with the wide tiles of
a heavier load (``tuning.hot_config``); the others keep the narrow tiles. The grids are sized for the worst case,
so nothing waits on the host and the call stays capturable. The hot pair runs beside the others on a second,
higher-priority CUDA stream (forked after the sort, joined before the combine; two branches of a captured CUDA
graph), so that the few long hot tiles overlap the many short ones instead of running after them (on the H100, skewed
routing at 256-2048 tokens: never slower, up to 1.20x); ``DLINFER_MOE_HOT_STREAM=0`` runs them after the others on
the caller's stream, and a config's ``HOT_STREAM`` field (0/1) overrides the setting.

Hopper variants, per config (fields ``TMA_A``, ``TMA_ACT``, ``TMA_B``, ``PERSISTENT``, ``MERGE``, ``MERGE_GRID``,
``WS``, all 0 unless a config sets them; a config is a hint, so a field the card or tensors cannot serve is off):
``TMA_B`` reads the weight tiles through a host-built tensor descriptor (a K-fastest weight as ``[E * N, K]`` rows,
an N-fastest one as ``[1, BLOCK_K, BLOCK_N]`` boxes of its ``[E, K, N]`` view, so that a K step past an expert's
last row reads zeros, never the next expert's rows; Triton encodes it at launch and passes it by value as a kernel
argument, so a captured CUDA graph replays it with nothing to allocate; a device-built
descriptor would need ``triton.set_allocator``, a process-wide hook, and a global scratch per launch). The hidden
rows are gathered by token index (Hopper's TMA has no row gather), so ``TMA_A`` first copies them into the
expert-sorted order (``_moe_gather_kernel``, one more ``T * topk * H`` copy) and the gate_up GEMM keeps its
activations in that order, for the down GEMM's descriptor; ``TMA_ACT`` does the latter alone (no copy: the gate_up
GEMM gathers its rows by pointers and writes its activations in the sorted order, the down GEMM reads them by TMA).
``PERSISTENT`` runs a fixed grid (one program per SM) over the tiles the block table says exist; ``MERGE`` runs both
tile classes of a GEMM in one such launch (the hot experts' wide tiles first, then the narrow ones, each with its
own tile sizes: ``_moe_gemm_merged_kernel``), so that under skewed routing the narrow tiles fill the SMs the few
wide ones leave idle; ``MERGE_GRID`` does the same with one program per possible tile (hot ones first) instead of a
persistent loop, leaving the balancing to the hardware's block scheduler; ``WS`` adds Triton's warp specialization
to launches with both operands on TMA (``num_warps=4``, row blocks of 64+; not in a merged launch; on the GPU only
with ``DLINFER_MOE_WS=1``, see ``WS_COMPILES``).

Launch parameters (tile sizes, warps, stages) come from the card at hand (``tuning.launch_config``: a tuning
cache, a shipped per-card table or an autotune on first use), by the expected rows per expert (``T * topk /
E``): small (decode: memory-bound on weights) to large (prefill: compute-bound).
"""

from __future__ import annotations

import logging
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from dlinfer import settings
from dlinfer.utils.layout import is_n_fastest
from dlinfer.vendor.triton import tuning
from dlinfer.vendor.triton.activation import silu_and_mul
from dlinfer.vendor.triton.host import capability, cdiv, next_power_of_2, sm_count

logger = logging.getLogger("dlinfer")

# ---------------------------------------------------------------------------------------------- gating


# Arguments that change from call to call (token and pair counts, grid sizes) are not specialized on (Triton
# would otherwise compile a variant whenever one turns divisible by 16 or equal to 1, in the middle of serving).
@triton.jit(do_not_specialize=["n_tokens"])
def _gating_kernel(logits_ptr, weights_ptr, ids_ptr, n_tokens, n_experts, stride_logits, stride_w, stride_ids,
                   TOPK: tl.constexpr, ROWS: tl.constexpr, EB: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, EB)
    row_mask = rows < n_tokens
    col_mask = cols < n_experts
    rows64 = rows.to(tl.int64)
    x = tl.load(logits_ptr + rows64[:, None] * stride_logits + cols[None, :],
                mask=row_mask[:, None] & col_mask[None, :], other=float("-inf")).to(tl.float32)
    x_max = tl.max(x, axis=1)
    x_max = tl.where(row_mask, x_max, 0.0)  # rows past the end: keep the math finite
    e = tl.exp(x - x_max[:, None])
    e = tl.where(col_mask[None, :], e, 0.0)
    probs = e / tl.where(row_mask, tl.sum(e, axis=1), 1.0)[:, None]
    # Padded columns can never be picked: probabilities are >= 0.
    probs = tl.where(col_mask[None, :], probs, -1.0)
    for i in tl.static_range(TOPK):
        best = tl.max(probs, axis=1)
        # Ties go to the lower expert id.
        best_id = tl.min(tl.where(probs == best[:, None], cols[None, :], EB), axis=1)
        tl.store(weights_ptr + rows64 * stride_w + i, best, mask=row_mask)
        tl.store(ids_ptr + rows64 * stride_ids + i, best_id.to(tl.int64), mask=row_mask)
        probs = tl.where(cols[None, :] == best_id[:, None], -2.0, probs)


# Launch parameters, in one place: a gating program covers about GATING_TILE logits (ROWS tokens x all experts).
GATING_TILE = 2048
GATING_MAX_ROWS = 64


def moe_gating_topk_softmax(router_logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, experts = router_logits.shape
    weights = torch.empty(tokens, topk, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(tokens, topk, dtype=torch.int64, device=router_logits.device)
    if tokens == 0:
        return weights, ids
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    eb = next_power_of_2(experts)
    rows = max(1, min(GATING_MAX_ROWS, GATING_TILE // eb, next_power_of_2(tokens)))
    warps = 4 if rows * eb >= 1024 else 1
    _gating_kernel[(cdiv(tokens, rows),)](
        logits, weights, ids, tokens, experts, logits.stride(0), weights.stride(0), ids.stride(0),
        TOPK=topk, ROWS=rows, EB=eb, num_warps=warps)
    return weights, ids


# ---------------------------------------------------------------------------------------------- sorting


@triton.jit
def _chunk_histogram(ids_ptr, chunk, n_pairs, n_experts, CHUNK: tl.constexpr, EB: tl.constexpr):
    """A chunk's expert ids, per-expert counts and each pair's rank among the chunk's pairs of its expert."""
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n_pairs
    ids = tl.load(ids_ptr + offs, mask=mask, other=n_experts).to(tl.int32)
    experts = tl.arange(0, EB)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, EB]
    before = tl.cumsum(onehot, axis=0) - onehot
    rank = tl.sum(before * onehot, axis=1)
    return offs, mask, ids, rank, tl.sum(onehot, axis=0)


@triton.jit(do_not_specialize=["n_pairs"])
def _moe_histogram_kernel(ids_ptr, rank_ptr, hist_ptr, n_pairs, n_experts, CHUNK: tl.constexpr, EB: tl.constexpr):
    chunk = tl.program_id(0)
    offs, mask, _, rank, counts = _chunk_histogram(ids_ptr, chunk, n_pairs, n_experts, CHUNK, EB)
    tl.store(rank_ptr + offs, rank, mask=mask)
    tl.store(hist_ptr + chunk * EB + tl.arange(0, EB), counts)


@triton.jit
def _sum_histograms(hist_ptr, c0, chunk, n_chunks, experts, total, earlier, EB: tl.constexpr, CB: tl.constexpr):
    cs = c0 + tl.arange(0, CB)
    h = tl.load(hist_ptr + cs[:, None] * EB + experts[None, :], mask=(cs < n_chunks)[:, None], other=0)
    total += tl.sum(h, axis=0)
    earlier += tl.sum(tl.where((cs < chunk)[:, None], h, 0), axis=0)
    return total, earlier


@triton.jit(do_not_specialize=["n_pairs", "n_chunks", "hot_rows"])
def _moe_scatter_kernel(ids_ptr, rank_ptr, hist_ptr, sorted_ptr, meta_ptr, n_pairs, n_experts, n_chunks, hot_rows,
                        CHUNK: tl.constexpr, EB: tl.constexpr, CB: tl.constexpr, BLOCK_M: tl.constexpr,
                        HOT_BLOCK_M: tl.constexpr, SINGLE_CHUNK: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """Each pair's row in the expert-sorted order. ``SINGLE_CHUNK``: all pairs fit one chunk, and this one
    program also does the histogram pass (one launch fewer: the decode case).

    Every expert's rows start at a multiple of ``HOT_BLOCK_M`` (a multiple of ``BLOCK_M``). Experts with at least
    ``hot_rows`` rows are *hot*: the wide-tile GEMM serves them in blocks of ``HOT_BLOCK_M`` rows, the others are
    served in blocks of ``BLOCK_M`` (with one tile size, ``HOT_BLOCK_M == BLOCK_M`` and no expert is hot)."""
    chunk = tl.program_id(0)
    experts = tl.arange(0, EB)
    if SINGLE_CHUNK:
        offs, mask, ids, rank, total = _chunk_histogram(ids_ptr, 0, n_pairs, n_experts, CHUNK, EB)
        earlier = tl.zeros([EB], dtype=tl.int32)
    else:
        total = tl.zeros([EB], dtype=tl.int32)
        earlier = tl.zeros([EB], dtype=tl.int32)
        if WHILE_LOOP:  # the interpreter (numpy 2 refuses range() over its 1-element scalars)
            c0 = 0
            while c0 < n_chunks:
                total, earlier = _sum_histograms(hist_ptr, c0, chunk, n_chunks, experts, total, earlier, EB, CB)
                c0 += CB
        else:
            for c0 in range(0, n_chunks, CB):
                total, earlier = _sum_histograms(hist_ptr, c0, chunk, n_chunks, experts, total, earlier, EB, CB)
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        mask = offs < n_pairs
        ids = tl.load(ids_ptr + offs, mask=mask, other=n_experts).to(tl.int32)
        rank = tl.load(rank_ptr + offs, mask=mask, other=0)
    segments = (total + HOT_BLOCK_M - 1) // HOT_BLOCK_M
    row_start = (tl.cumsum(segments, axis=0) - segments) * HOT_BLOCK_M
    if chunk == 0:
        # The block tables the GEMMs read, per expert: meta[0] = end block (in BLOCK_M blocks of the experts that
        # are not hot), meta[1] = row count, meta[2] = first row, meta[3] = end block (HOT_BLOCK_M blocks of the
        # hot experts).
        hot = total >= hot_rows
        tl.store(meta_ptr + experts, tl.cumsum(tl.where(hot, 0, (total + BLOCK_M - 1) // BLOCK_M), axis=0))
        tl.store(meta_ptr + EB + experts, total)
        tl.store(meta_ptr + 2 * EB + experts, row_start)
        tl.store(meta_ptr + 3 * EB + experts, tl.cumsum(tl.where(hot, segments, 0), axis=0))
    base = tl.sum(tl.where(ids[:, None] == experts[None, :], (row_start + earlier)[None, :], 0), axis=1)
    # An id outside [0, E) (a contract violation) is dropped here rather than written over another row.
    tl.store(sorted_ptr + base + rank, offs, mask=mask & (ids >= 0) & (ids < n_experts))


# ---------------------------------------------------------------------------------------------- grouped GEMM


@triton.jit
def _gemm_step(acc, a_ptrs, b_ptrs, k0, k_dim, row_mask, offs_k, stride_wk, EVEN_K: tl.constexpr,
               PRECISION: tl.constexpr):
    """One BLOCK_K step: ``acc += a[:, k0:] @ b[k0:, :]``, the rows of ``b`` ``stride_wk`` elements apart (1 for a
    K-fastest weight, a constant once Triton specializes it). ``b`` needs no column mask: its column offsets are
    always inside the weight (wrapped; the store drops those columns)."""
    a = _load_a(a_ptrs, k0, k_dim, row_mask, offs_k, EVEN_K)
    return tl.dot(a, _load_b(b_ptrs, k0, k_dim, offs_k, stride_wk, EVEN_K), acc, input_precision=PRECISION)


@triton.jit
def _load_a(a_ptrs, k0, k_dim, row_mask, offs_k, EVEN_K: tl.constexpr):
    """An A tile read by pointers at the K step ``k0``: the block's rows (``row_mask``), zeros past ``k_dim``."""
    if EVEN_K:
        a = tl.load(a_ptrs + k0, mask=row_mask[:, None], other=0.0)
    else:
        a = tl.load(a_ptrs + k0, mask=row_mask[:, None] & (offs_k < k_dim - k0)[None, :], other=0.0)
    return a


@triton.jit
def _load_b(b_ptrs, k0, k_dim, offs_k, stride_wk, EVEN_K: tl.constexpr):
    """A B tile read by pointers at the K step ``k0`` (see ``_gemm_step``), zeros past ``k_dim``."""
    if EVEN_K:
        b = tl.load(b_ptrs + k0 * stride_wk)
    else:
        b = tl.load(b_ptrs + k0 * stride_wk, mask=(offs_k < k_dim - k0)[:, None], other=0.0)
    return b


@triton.jit
def _gemm_step_tma(acc, acc_up, a_ptrs, a_desc, a_row, b_ptrs, w_desc, w_row, w_col, up_offset, k0, k_dim, row_mask,
                   offs_k, stride_wn, stride_wk, SILU: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                   TMA_A: tl.constexpr, TMA_B: tl.constexpr, SPLIT_UP: tl.constexpr):
    """One BLOCK_K step with either operand read by TMA, or with the gate and up tiles of B apart: A (``TMA_A``)
    as rows ``a_row ...`` of the expert-sorted copy. B by TMA: ``TMA_B == 1`` (K-fastest weight) as the weight
    rows ``w_row ...`` (and ``w_row + up_offset ...``, the up rows, into ``acc_up`` with ``SILU``) of the flattened
    ``[E * N, K]`` weight; ``TMA_B == 2`` (N-fastest weight) as the ``[BLOCK_K, BLOCK_N]`` box at K step ``k0``,
    columns ``w_col ...`` (and ``w_col + up_offset ...``) of expert ``w_row`` in the ``[E, K, N]`` view, the MMA's
    B operand as loaded. Out-of-bounds K reads as zero either way (the N-fastest descriptor is 3-D, so a K step
    past the expert's last row never reads the next expert's). Without ``TMA_B``, B is read by pointers
    (``_load_b``), with ``SPLIT_UP`` (and ``SILU``) as two tiles: the gate rows at ``b_ptrs``, the up rows
    ``up_offset`` rows further into ``acc_up``."""
    if TMA_A:
        a = a_desc.load([a_row, k0])
    else:
        a = _load_a(a_ptrs, k0, k_dim, row_mask, offs_k, EVEN_K)
    if TMA_B == 2:
        gate = w_desc.load([w_row, k0, w_col])
        acc = tl.dot(a, gate.reshape(gate.shape[1], gate.shape[2]), acc, input_precision=PRECISION)
        if SILU:
            up = w_desc.load([w_row, k0, w_col + up_offset])
            acc_up = tl.dot(a, up.reshape(up.shape[1], up.shape[2]), acc_up, input_precision=PRECISION)
    elif TMA_B:
        acc = tl.dot(a, w_desc.load([w_row, k0]).T, acc, input_precision=PRECISION)
        if SILU:
            acc_up = tl.dot(a, w_desc.load([w_row + up_offset, k0]).T, acc_up, input_precision=PRECISION)
    else:
        acc = tl.dot(a, _load_b(b_ptrs, k0, k_dim, offs_k, stride_wk, EVEN_K), acc, input_precision=PRECISION)
        if SILU and SPLIT_UP:
            up = _load_b(b_ptrs + up_offset * stride_wn, k0, k_dim, offs_k, stride_wk, EVEN_K)
            acc_up = tl.dot(a, up, acc_up, input_precision=PRECISION)
    return acc, acc_up


@triton.jit
def _moe_gemm_tile(a_ptr, a_desc, w_ptr, w_desc, out_ptr, sorted_ptr, meta_ptr, tile, n_blocks, n_out, k_dim,
                   a_row_div, up_offset, n_experts, stride_am, stride_we, stride_wn, stride_wk, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   EB: tl.constexpr, HOT: tl.constexpr, SILU: tl.constexpr, EVEN_K: tl.constexpr,
                   PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr, TMA_A: tl.constexpr, TMA_B: tl.constexpr,
                   WS_K: tl.constexpr, WS_SEARCH: tl.constexpr, SORTED_OUT: tl.constexpr, SPLIT_UP: tl.constexpr):
    """Output tile number ``tile`` of the ``n_blocks`` row blocks of this class (see ``_moe_gemm_kernel``)."""
    n_tiles = tl.cdiv(n_out, BLOCK_N)
    # Grouped order: GROUP_M row blocks sweep the output columns together, so a weight tile is read from
    # HBM once per group and the group's input rows stay in L2.
    per_group = GROUP_M * n_tiles
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(n_blocks - first_m, GROUP_M)
    m_block = first_m + (tile % per_group) % group_rows
    n_tile = (tile % per_group) // group_rows

    ends_ptr = meta_ptr + 3 * EB if HOT else meta_ptr
    # The block's expert: how many experts' blocks end at or before it (the end blocks are non-decreasing).
    if WS_SEARCH:
        # A binary search by scalar loads: Triton 3.6's Hopper warp specialization fails an assertion on the
        # [EB]-wide load below from EB = 128 on.
        expert = 0
        for i in tl.static_range(16):
            if (EB >> i) >= 1:  # steps EB, EB / 2, ..., 1: any count in [0, EB]
                probe = expert + (EB >> i)
                end = tl.load(ends_ptr + probe - 1, mask=probe <= n_experts, other=2147483647)
                expert = tl.where(end <= m_block, probe, expert)
    else:
        experts = tl.arange(0, EB)
        block_ends = tl.load(ends_ptr + experts, mask=experts < n_experts, other=2147483647)
        expert = tl.sum((block_ends <= m_block).to(tl.int32), axis=0)
    if expert < n_experts:  # else: a block past this class's total, nothing to do
        block_end = tl.load(ends_ptr + expert)
        count = tl.load(meta_ptr + EB + expert)
        block_start = block_end - (count + BLOCK_M - 1) // BLOCK_M
        local = (m_block - block_start) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = local < count
        first_row = tl.load(meta_ptr + 2 * EB + expert)
        rows = tl.load(sorted_ptr + first_row + local, mask=row_mask, other=0)
        a_rows = (rows // a_row_div).to(tl.int64)
        # The block's first row in the expert-sorted order: of A's sorted copy (TMA_A; every row of the block,
        # padding rows included, is there) and of the output (SORTED_OUT).
        a_row = first_row + (m_block - block_start) * BLOCK_M

        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
        # TMA_B == 1: the weight as [E * N, K] rows; a tile past the expert's last row reads the next expert's rows
        # (or zeros past the end), columns the store drops. TMA_B == 2: expert, K step and columns of [E, K, N].
        if TMA_B == 2:
            w_row = expert
            w_col = n_tile * BLOCK_N
        else:
            w_row = expert * (stride_we // stride_wn) + n_tile * BLOCK_N
            w_col = 0
        if SILU and not (TMA_B or SPLIT_UP):
            # B column c is weight row n_tile * BLOCK_N + c // 2 (+ up_offset for odd c): gate, up, gate, ...
            cols = tl.arange(0, 2 * BLOCK_N)
            w_rows = (n_tile * BLOCK_N + cols // 2) % n_out + (cols % 2) * up_offset
            acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        else:
            w_rows = (n_tile * BLOCK_N + tl.arange(0, BLOCK_N)) % n_out
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # With TMA_B (two TMA boxes) or SPLIT_UP (two pointer tiles) the gate and up tiles are two MMAs, the up one
        # into acc_up.
        acc_up = tl.zeros([BLOCK_M, BLOCK_N] if SILU and (TMA_B or SPLIT_UP) else [1, 1], dtype=tl.float32)
        b_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + w_rows[None, :].to(tl.int64) * stride_wn
                  + offs_k[:, None] * stride_wk)
        if TMA_A or TMA_B or SPLIT_UP:
            if WHILE_LOOP:
                k0 = 0
                while k0 < k_dim:
                    acc, acc_up = _gemm_step_tma(acc, acc_up, a_ptrs, a_desc, a_row, b_ptrs, w_desc, w_row, w_col,
                                                 up_offset, k0, k_dim, row_mask, offs_k, stride_wn, stride_wk, SILU,
                                                 EVEN_K, PRECISION, TMA_A, TMA_B, SPLIT_UP)
                    k0 += BLOCK_K
            else:
                for k0 in tl.range(0, k_dim, BLOCK_K, warp_specialize=WS_K):
                    acc, acc_up = _gemm_step_tma(acc, acc_up, a_ptrs, a_desc, a_row, b_ptrs, w_desc, w_row, w_col,
                                                 up_offset, k0, k_dim, row_mask, offs_k, stride_wn, stride_wk, SILU,
                                                 EVEN_K, PRECISION, TMA_A, TMA_B, SPLIT_UP)
        elif WHILE_LOOP:  # the interpreter (numpy 2 refuses range() over its 1-element scalars)
            k0 = 0
            while k0 < k_dim:
                acc = _gemm_step(acc, a_ptrs, b_ptrs, k0, k_dim, row_mask, offs_k, stride_wk, EVEN_K, PRECISION)
                k0 += BLOCK_K
        else:
            for k0 in range(0, k_dim, BLOCK_K):
                acc = _gemm_step(acc, a_ptrs, b_ptrs, k0, k_dim, row_mask, offs_k, stride_wk, EVEN_K, PRECISION)
        out_dtype = out_ptr.dtype.element_ty
        if SILU:
            if TMA_B or SPLIT_UP:
                gate, up = acc, acc_up
            else:
                gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
            gate = gate.to(out_dtype).to(tl.float32)
            up = up.to(out_dtype).to(tl.float32)
            result = (gate * tl.sigmoid(gate) * up).to(out_dtype)
        else:
            result = acc.to(out_dtype)
        offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        if SORTED_OUT:
            # The activations in the expert-sorted order (the down GEMM reads them by TMA): the whole block,
            # padding rows too (zero inputs there), so the down GEMM's tiles read only written rows.
            out_ptrs = out_ptr + (a_row + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None] * stride_om + offs_n[None, :]
            tl.store(out_ptrs, result, mask=(offs_n < n_out)[None, :])
        else:
            out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
            tl.store(out_ptrs, result, mask=row_mask[:, None] & (offs_n < n_out)[None, :])


@triton.jit(do_not_specialize=["max_blocks"])
def _moe_gemm_kernel(a_ptr, a_desc, w_ptr, w_desc, out_ptr, sorted_ptr, meta_ptr, n_out, k_dim, a_row_div, up_offset,
                     max_blocks, n_experts, stride_am, stride_we, stride_wn, stride_wk, stride_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     EB: tl.constexpr, HOT: tl.constexpr, SILU: tl.constexpr, EVEN_K: tl.constexpr,
                     PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr, TMA_A: tl.constexpr = False,
                     TMA_B: tl.constexpr = False, PERSISTENT: tl.constexpr = False, WS: tl.constexpr = False,
                     SORTED_OUT: tl.constexpr = False, SPLIT_UP: tl.constexpr = False):
    """``out[r, n] = sum_k a[r // a_row_div, k] * w[e, n, k]`` for the rows ``r`` of one expert-sorted block of
    ``BLOCK_M`` rows: the blocks of the hot experts (``HOT``) or of the others (see ``_moe_scatter_kernel``).

    With ``SILU``: ``out[r, n] = silu(g) * u``, ``g``/``u`` that sum for weight rows ``n`` and ``n + up_offset``
    (each rounded to the output dtype first, like a separate GEMM would). The gate and up rows of a tile are
    interleaved into one ``2 * BLOCK_N`` wide B tile (one MMA per K step, the A tile read once), split apart in
    the epilogue.

    The weight is read by its strides: K-fastest (``stride_wk == 1``, a constant once Triton specializes it) or
    N-fastest (``stride_wn == 1``), in place. An N-fastest weight's interleaved tile would alternate between a
    gate and an up row along N, so its SiLU GEMM reads gate and up as two B tiles, each contiguous along N, into two
    MMAs (``SPLIT_UP``, as ``TMA_B`` does).

    Hopper variants (config fields, see ``_gemm``): ``TMA_B`` reads the weight tiles through a tensor descriptor
    ``w_desc`` (gate and up as two boxes and two MMAs); ``TMA_A`` reads A through ``a_desc`` from an
    expert-sorted copy (``_moe_gather_kernel`` for the hidden rows; the gate_up GEMM then writes the activations
    in that order too, for the down GEMM). ``PERSISTENT``: the grid is a fixed number of programs that loop over
    the tiles of the row blocks this class really holds (read from the block table). ``WS``: Triton's warp
    specialization (a producer warp group issues the TMA loads for the MMA warp group) of the persistent tile
    loop, else of the K loop."""
    pid = tl.program_id(0)
    if PERSISTENT:
        ends_ptr = meta_ptr + 3 * EB if HOT else meta_ptr
        n_blocks = tl.load(ends_ptr + n_experts - 1)  # the blocks this class holds (a cumulative count)
        n_tiles = n_blocks * tl.cdiv(n_out, BLOCK_N)
        if WHILE_LOOP:
            tile = pid
            while tile < n_tiles:
                _moe_gemm_tile(a_ptr, a_desc, w_ptr, w_desc, out_ptr, sorted_ptr, meta_ptr, tile, n_blocks, n_out,
                               k_dim, a_row_div, up_offset, n_experts, stride_am, stride_we, stride_wn, stride_wk,
                               stride_om, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EB, HOT, SILU, EVEN_K, PRECISION,
                               WHILE_LOOP, TMA_A, TMA_B, False, WS, SORTED_OUT, SPLIT_UP)
                tile += tl.num_programs(0)
        else:
            for tile in tl.range(pid, n_tiles, tl.num_programs(0), warp_specialize=WS):
                _moe_gemm_tile(a_ptr, a_desc, w_ptr, w_desc, out_ptr, sorted_ptr, meta_ptr, tile, n_blocks, n_out,
                               k_dim, a_row_div, up_offset, n_experts, stride_am, stride_we, stride_wn, stride_wk,
                               stride_om, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EB, HOT, SILU, EVEN_K, PRECISION,
                               WHILE_LOOP, TMA_A, TMA_B, False, WS, SORTED_OUT, SPLIT_UP)
    else:
        _moe_gemm_tile(a_ptr, a_desc, w_ptr, w_desc, out_ptr, sorted_ptr, meta_ptr, pid, max_blocks, n_out, k_dim,
                       a_row_div, up_offset, n_experts, stride_am, stride_we, stride_wn, stride_wk, stride_om, BLOCK_M,
                       BLOCK_N, BLOCK_K, GROUP_M, EB, HOT, SILU, EVEN_K, PRECISION, WHILE_LOOP, TMA_A, TMA_B, WS, WS,
                       SORTED_OUT, SPLIT_UP)


@triton.jit(do_not_specialize=["max_hot_blocks", "max_blocks"])
def _moe_gemm_merged_kernel(a_ptr, a_desc, hot_a_desc, w_ptr, w_desc, hot_w_desc, out_ptr, sorted_ptr, meta_ptr, n_out,
                            k_dim, a_row_div, up_offset, n_experts, stride_am, stride_we, stride_wn, stride_wk,
                            stride_om, max_hot_blocks, max_blocks,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, HOT_BLOCK_M: tl.constexpr,
                            HOT_BLOCK_N: tl.constexpr, HOT_BLOCK_K: tl.constexpr, HOT_GROUP_M: tl.constexpr,
                            HOT_EVEN_K: tl.constexpr, EB: tl.constexpr, SILU: tl.constexpr, PRECISION: tl.constexpr,
                            WHILE_LOOP: tl.constexpr, TMA_A: tl.constexpr, TMA_B: tl.constexpr,
                            SORTED_OUT: tl.constexpr, PERSISTENT: tl.constexpr = True,
                            SPLIT_UP: tl.constexpr = False):
    """``MERGE``: both tile classes of one GEMM in one persistent launch: the programs take the hot experts' wide
    tiles first, then the other experts' narrow ones (each class with its own tile sizes and descriptors), so the
    narrow tiles fill the SMs the few wide ones leave idle instead of waiting for a second launch.

    ``MERGE_GRID`` (``PERSISTENT=False``): one program per possible tile instead, the ``max_hot_blocks`` hot row
    blocks' tiles first (program ids the hardware dispatches first), then the ``max_blocks`` narrow ones'; a
    program whose block the call does not hold returns at once. The block scheduler hands each SM its next tile
    as it frees up, so the long hot tiles start first and the short ones fill around them (a persistent loop
    deals the tiles out in a fixed round-robin: the programs that drew a hot tile also get their share of the
    narrow ones, and finish last)."""
    pid = tl.program_id(0)
    if not PERSISTENT:
        _moe_merged_step(a_ptr, a_desc, hot_a_desc, w_ptr, w_desc, hot_w_desc, out_ptr, sorted_ptr, meta_ptr, pid,
                         max_hot_blocks * tl.cdiv(n_out, HOT_BLOCK_N), max_hot_blocks, max_blocks, n_out, k_dim,
                         a_row_div, up_offset, n_experts, stride_am, stride_we, stride_wn, stride_wk, stride_om,
                         BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, HOT_BLOCK_M, HOT_BLOCK_N, HOT_BLOCK_K,
                         HOT_GROUP_M, HOT_EVEN_K, EB, SILU, PRECISION, WHILE_LOOP, TMA_A, TMA_B, SORTED_OUT, SPLIT_UP)
        return
    hot_blocks = tl.load(meta_ptr + 3 * EB + n_experts - 1)
    blocks = tl.load(meta_ptr + n_experts - 1)
    hot_tiles = hot_blocks * tl.cdiv(n_out, HOT_BLOCK_N)
    n_tiles = hot_tiles + blocks * tl.cdiv(n_out, BLOCK_N)
    if WHILE_LOOP:
        tile = pid
        while tile < n_tiles:
            _moe_merged_step(a_ptr, a_desc, hot_a_desc, w_ptr, w_desc, hot_w_desc, out_ptr, sorted_ptr, meta_ptr,
                             tile, hot_tiles, hot_blocks, blocks, n_out, k_dim, a_row_div, up_offset, n_experts,
                             stride_am, stride_we, stride_wn, stride_wk, stride_om, BLOCK_M, BLOCK_N, BLOCK_K,
                             GROUP_M, EVEN_K, HOT_BLOCK_M, HOT_BLOCK_N, HOT_BLOCK_K, HOT_GROUP_M, HOT_EVEN_K, EB,
                             SILU, PRECISION, WHILE_LOOP, TMA_A, TMA_B, SORTED_OUT, SPLIT_UP)
            tile += tl.num_programs(0)
    else:
        for tile in tl.range(pid, n_tiles, tl.num_programs(0)):
            _moe_merged_step(a_ptr, a_desc, hot_a_desc, w_ptr, w_desc, hot_w_desc, out_ptr, sorted_ptr, meta_ptr,
                             tile, hot_tiles, hot_blocks, blocks, n_out, k_dim, a_row_div, up_offset, n_experts,
                             stride_am, stride_we, stride_wn, stride_wk, stride_om, BLOCK_M, BLOCK_N, BLOCK_K,
                             GROUP_M, EVEN_K, HOT_BLOCK_M, HOT_BLOCK_N, HOT_BLOCK_K, HOT_GROUP_M, HOT_EVEN_K, EB,
                             SILU, PRECISION, WHILE_LOOP, TMA_A, TMA_B, SORTED_OUT, SPLIT_UP)


@triton.jit
def _moe_merged_step(a_ptr, a_desc, hot_a_desc, w_ptr, w_desc, hot_w_desc, out_ptr, sorted_ptr, meta_ptr, tile,
                     hot_tiles, hot_blocks, blocks, n_out, k_dim, a_row_div, up_offset, n_experts, stride_am,
                     stride_we, stride_wn, stride_wk, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, HOT_BLOCK_M: tl.constexpr,
                     HOT_BLOCK_N: tl.constexpr, HOT_BLOCK_K: tl.constexpr, HOT_GROUP_M: tl.constexpr,
                     HOT_EVEN_K: tl.constexpr, EB: tl.constexpr, SILU: tl.constexpr, PRECISION: tl.constexpr,
                     WHILE_LOOP: tl.constexpr, TMA_A: tl.constexpr, TMA_B: tl.constexpr,
                     SORTED_OUT: tl.constexpr, SPLIT_UP: tl.constexpr):
    if tile < hot_tiles:
        _moe_gemm_tile(a_ptr, hot_a_desc, w_ptr, hot_w_desc, out_ptr, sorted_ptr, meta_ptr, tile, hot_blocks, n_out,
                       k_dim, a_row_div, up_offset, n_experts, stride_am, stride_we, stride_wn, stride_wk, stride_om,
                       HOT_BLOCK_M, HOT_BLOCK_N, HOT_BLOCK_K, HOT_GROUP_M, EB, True, SILU, HOT_EVEN_K, PRECISION,
                       WHILE_LOOP, TMA_A, TMA_B, False, False, SORTED_OUT, SPLIT_UP)
    else:
        _moe_gemm_tile(a_ptr, a_desc, w_ptr, w_desc, out_ptr, sorted_ptr, meta_ptr, tile - hot_tiles, blocks, n_out,
                       k_dim, a_row_div, up_offset, n_experts, stride_am, stride_we, stride_wn, stride_wk, stride_om,
                       BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EB, False, SILU, EVEN_K, PRECISION, WHILE_LOOP, TMA_A,
                       TMA_B, False, False, SORTED_OUT, SPLIT_UP)


@triton.jit
def _moe_gather_kernel(x_ptr, out_ptr, sorted_ptr, meta_ptr, hidden, a_row_div, n_experts, stride_x, stride_out,
                       EB: tl.constexpr, HOT_BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """The ``TMA_A`` copy of the hidden rows in the expert-sorted order: ``out[r] = x[sorted[r] // a_row_div]`` for
    the rows ``r`` the experts hold, zeros in their padding rows (up to each expert's multiple of
    ``HOT_BLOCK_M``); rows past the last expert's padding are not touched."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    experts = tl.arange(0, EB)
    e_mask = experts < n_experts
    starts = tl.load(meta_ptr + 2 * EB + experts, mask=e_mask, other=2147483647)
    counts = tl.load(meta_ptr + EB + experts, mask=e_mask, other=0)
    ends = starts + (counts + HOT_BLOCK_M - 1) // HOT_BLOCK_M * HOT_BLOCK_M
    used = tl.max(tl.where(e_mask, ends, 0), axis=0)
    if tl.program_id(0) * ROWS < used:
        # The expert of row r: the last one starting at or before r (empty experts start where the next one does).
        mine = experts[None, :] == (tl.sum((starts[None, :] <= r[:, None]).to(tl.int32), axis=1) - 1)[:, None]
        start = tl.sum(tl.where(mine, starts[None, :], 0), axis=1)
        count = tl.sum(tl.where(mine, counts[None, :], 0), axis=1)
        valid = r - start < count
        src = (tl.load(sorted_ptr + r, mask=valid, other=0) // a_row_div).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        col_mask = cols < hidden
        x = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=valid[:, None] & col_mask[None, :],
                    other=0.0)
        tl.store(out_ptr + r.to(tl.int64)[:, None] * stride_out + cols[None, :], x,
                 mask=(r < used)[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------------------------- combine


@triton.jit
def _moe_combine_kernel(y_ptr, w_ptr, out_ptr, hidden, topk, stride_y, stride_w, stride_out,
                        RENORMALIZE: tl.constexpr, KB: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    slots = tl.arange(0, KB)
    slot_mask = slots < topk
    w = tl.load(w_ptr + token * stride_w + slots, mask=slot_mask, other=0.0).to(tl.float32)
    if RENORMALIZE:
        w = w / tl.sum(w, axis=0)
    y = tl.load(y_ptr + (token * topk + slots)[:, None] * stride_y + cols[None, :],
                mask=slot_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    out = tl.sum(y * w[:, None], axis=0)
    tl.store(out_ptr + token * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------------- launch configs

# The GEMM tile configs come from the card at hand: per-card tables, a disk cache, an autotune on first use
# (dlinfer/vendor/triton/tuning.py).

# Sorting / combine launch parameters: a sorting chunk holds at most SORT_TILE one-hot entries (CHUNK x experts).
SORT_TILE = 16384
SORT_MAX_CHUNK = 4096
SORT_NUM_WARPS = 8
SORT_CHUNKS_PER_STEP = 64  # histogram rows the scatter kernel sums per loop step
COMBINE_BLOCK_H = 1024
COMBINE_NUM_WARPS = 4
GATHER_ROWS = 16  # TMA_A's copy of the hidden rows: rows x BLOCK_H per program
GATHER_BLOCK_H = 512
GATHER_NUM_WARPS = 4


def moe_launch_config(tokens: int, experts: int, topk: int, hidden: int, inter: int, device=None,
                      dtype=torch.bfloat16, n_fastest: bool = False) -> dict:
    """The tile configuration (a dict: ``BLOCK_M``, ``up``, ``down``) the cache or table gives this problem on
    ``device`` (default: the current CUDA device, else the generic tiers), without autotuning; ``n_fastest`` for
    N-fastest expert weights (``dlinfer.utils.layout.is_n_fastest``)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    return tuning.static_config(tuning.card_name(device), dtype, experts, topk, hidden, inter, tokens, device,
                                n_fastest=n_fastest)[0]



def _operands(a, weight, cfg, block_m, k_dim, a_sorted, tma_b):
    """One tile class's ``(a, a_desc, w_desc, BLOCK_K, precision)``: ``a_sorted`` is A's expert-sorted copy, read
    by TMA (``TMA_A``), ``tma_b`` reads the weight by TMA; a descriptor is None where its operand is not."""
    block_k = cfg["BLOCK_K"]
    precision = "tf32"  # the default; ignored for 16-bit operands
    if a.dtype == torch.float32:
        # fp32 is served exactly (no tf32), with half the K tile so the stages fit in shared memory.
        precision, block_k = "ieee", max(16, block_k // 2)
    a_desc = w_desc = None
    if a_sorted is not None:
        a = a_sorted
        a_desc = TensorDescriptor(a, [a.shape[0], k_dim], [a.stride(0), 1], [block_m, block_k])
    if tma_b and weight.stride(2) != 1:  # N-fastest: [E, K, N] boxes of [1, BLOCK_K, BLOCK_N]
        w_t = weight.transpose(1, 2)
        w_desc = TensorDescriptor(w_t, list(w_t.shape), list(w_t.stride()), [1, block_k, cfg["BLOCK_N"]])
    elif tma_b:
        w_desc = TensorDescriptor(weight, [weight.shape[0] * weight.shape[1], k_dim], [weight.stride(1), 1],
                                  [cfg["BLOCK_N"], block_k])
    return a, a_desc, w_desc, block_k, precision


def _tma_b_mode(weight: torch.Tensor, w_desc) -> int:
    """The kernels' ``TMA_B``: 0 (weight by pointers), 1 (by TMA, K-fastest), 2 (by TMA, N-fastest)."""
    return 0 if w_desc is None else 1 if weight.stride(2) == 1 else 2


def _split_up(weight: torch.Tensor, silu: bool, w_desc) -> bool:
    """``SPLIT_UP``: the gate_up GEMM reads an N-fastest weight (by pointers) as two B tiles, the gate rows' and
    the up rows', each contiguous along N, where the interleaved tile's columns would alternate between two rows
    (no vector loads along N)."""
    return silu and w_desc is None and weight.stride(1) == 1 and weight.stride(2) != 1


def _gemm(a, weight, out, sorted_rows, meta, *, n_out, k_dim, a_row_div, up_offset, max_blocks, experts, eb,
          block_m, hot, silu, cfg, a_sorted=None, sorted_out=False, tma_b=False, persistent=False, ws=False):
    """One grouped-GEMM launch. ``a_sorted``: A as its expert-sorted copy, read by TMA; ``sorted_out``: ``out``
    written in the expert-sorted order; ``tma_b``: the weight read by TMA; ``persistent``/``ws``: see
    ``_moe_gemm_kernel`` (the caller checked that the card and the tensors allow them: :func:`_hopper_flags`)."""
    block_n = cfg["BLOCK_N"]
    a, a_desc, w_desc, block_k, precision = _operands(a, weight, cfg, block_m, k_dim, a_sorted, tma_b)
    # Warp specialization needs both operands on TMA (Triton 3.6's fails to compile the pointer gather of A), and
    # of row blocks below 64 (no wgmma) it compiles an unpipelined loop: those run without.
    ws = ws and a_desc is not None and w_desc is not None and block_m >= WS_MIN_BLOCK_M
    tiles = max_blocks * cdiv(n_out, block_n)
    grid = (min(tiles, _num_sms(a.device)),) if persistent else (tiles,)
    _moe_gemm_kernel[grid](
        a, a_desc, weight, w_desc, out, sorted_rows, meta, n_out, k_dim, a_row_div, up_offset, max_blocks, experts,
        a.stride(0), *weight.stride(), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"], EB=eb, HOT=hot, SILU=silu,
        EVEN_K=k_dim % block_k == 0, PRECISION=precision, WHILE_LOOP=a.device.type == "cpu",
        TMA_A=a_desc is not None, TMA_B=_tma_b_mode(weight, w_desc), PERSISTENT=persistent, WS=ws,
        SORTED_OUT=sorted_out, SPLIT_UP=_split_up(weight, silu, w_desc), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])


def _gemm_merged(a, weight, out, sorted_rows, meta, *, n_out, k_dim, a_row_div, up_offset, max_blocks, max_hot_blocks,
                 experts, eb, block_m, hot_m, silu, cfg, hot_cfg, a_sorted=None, sorted_out=False, tma_b=False,
                 persistent=True):
    """Both tile classes of one GEMM in one launch (warps and stages of the hot class): persistent (``MERGE``) or
    one program per possible tile (``MERGE_GRID``)."""
    a_in = a
    a, a_desc, w_desc, block_k, precision = _operands(a_in, weight, cfg, block_m, k_dim, a_sorted, tma_b)
    _, hot_a_desc, hot_w_desc, hot_k, _ = _operands(a_in, weight, hot_cfg, hot_m, k_dim, a_sorted, tma_b)
    tiles = max_blocks * cdiv(n_out, cfg["BLOCK_N"]) + max_hot_blocks * cdiv(n_out, hot_cfg["BLOCK_N"])
    _moe_gemm_merged_kernel[(min(tiles, _num_sms(a.device)) if persistent else tiles,)](
        a, a_desc, hot_a_desc, weight, w_desc, hot_w_desc, out, sorted_rows, meta, n_out, k_dim, a_row_div,
        up_offset, experts, a.stride(0), *weight.stride(), out.stride(0), max_hot_blocks, max_blocks,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"],
        EVEN_K=k_dim % block_k == 0, HOT_BLOCK_M=hot_m, HOT_BLOCK_N=hot_cfg["BLOCK_N"], HOT_BLOCK_K=hot_k,
        HOT_GROUP_M=hot_cfg["GROUP_M"], HOT_EVEN_K=k_dim % hot_k == 0, EB=eb, SILU=silu, PRECISION=precision,
        WHILE_LOOP=a.device.type == "cpu", TMA_A=a_desc is not None, TMA_B=_tma_b_mode(weight, w_desc),
        SORTED_OUT=sorted_out, PERSISTENT=persistent, SPLIT_UP=_split_up(weight, silu, w_desc),
        num_warps=hot_cfg["num_warps"], num_stages=hot_cfg["num_stages"])


WS_MIN_BLOCK_M = 64
# Programs of a PERSISTENT launch where there is no GPU (the interpreter): a few, so that each loops over tiles.
INTERPRETER_PROGRAMS = 3
def _num_sms(device: torch.device) -> int:
    return sm_count(device.index) if device.type == "cuda" else INTERPRETER_PROGRAMS


def _tma_ok(t: torch.Tensor) -> bool:
    """A TMA descriptor over ``t`` as ``[rows, t.shape[-1]]``: dense rows, 16-byte aligned base and row pitch."""
    dense = t.stride(-1) == 1 and all(t.stride(i) == t.stride(i + 1) * t.shape[i + 1] for i in range(t.dim() - 1))
    return dense and t.data_ptr() % 16 == 0 and (t.shape[-1] * t.element_size()) % 16 == 0


def _tma_weight_ok(w: torch.Tensor) -> bool:
    """An expert weight ``[E, N, K]`` a descriptor can cover: K-fastest as ``[E * N, K]`` rows, N-fastest as its
    ``[E, K, N]`` view (:func:`_tma_ok` of either)."""
    return _tma_ok(w) if w.stride(2) == 1 else w.stride(1) == 1 and _tma_ok(w.transpose(1, 2))


# Triton's warp specialization of the grouped GEMM (WS) is verified to compile on sm_90 with Triton 3.6 only: 3.7's
# warp-specialization pass splits the 128-row tile between its two consumer groups and then rejects the TMA loads
# of the full-tile descriptor ("descriptor block and tensor must have the same number of elements"). Elsewhere WS
# is dropped (the same config runs on TMA + persistent without it); the interpreter ignores it either way.
# On the GPU it is also opt-in (``DLINFER_MOE_WS=1``): with Triton 3.6 on an H100 its persistent loop (128-row
# blocks, 64-wide gate_up tiles, both operands by TMA) never finished at E32 top-1 H2048 I3584, 1024 tokens with
# skewed routing (the GPU busy at 100 %, the next module load blocked for minutes), a hang no caller can recover
# from; a config asking for WS runs without it unless the setting is on.
WS_COMPILES = triton.__version__.startswith("3.6.")


def _hopper_flags(cfg: dict, x, w_up, w_down, inter: int) -> dict:
    """What config ``cfg``'s fields (default 0) turn on here: ``tma_a``, ``tma_act``, ``tma_b``, ``persistent``,
    ``ws``. A config is a hint: the TMA fields need an sm_90+ GPU (or the interpreter) and tensors a descriptor
    can cover, else they are off; TMA_A implies TMA_ACT (the activations in the sorted order); MERGE (both tile
    classes in one persistent launch, when there are two) means PERSISTENT for a single class, MERGE_GRID (the
    same without the persistent loop) plain launches; WS needs TMA_B on K-fastest weights (never compiled for
    N-fastest ones) and takes the launches whose A is on TMA too (and, on the GPU, takes effect only with
    ``num_warps=4``: one consumer warp group)."""
    on = {f: bool(cfg.get(f, 0)) for f in tuning.FLAGS}
    if not any(on.values()):
        return dict(tma_a=False, tma_act=False, tma_b=False, persistent=False, ws=False)  # the default path
    tma = x.device.type == "cpu" or capability(x.device.index) >= 9
    act_ok = tma and (inter * x.element_size()) % 16 == 0
    tma_a = on["TMA_A"] and act_ok and (x.shape[1] * x.element_size()) % 16 == 0
    tma_act = tma_a or (on["TMA_ACT"] and act_ok)
    tma_b = on["TMA_B"] and tma and _tma_weight_ok(w_up) and _tma_weight_ok(w_down)
    return dict(tma_a=tma_a, tma_act=tma_act, tma_b=tma_b, persistent=on["PERSISTENT"] or on["MERGE"],
                ws=on["WS"] and tma_b and tma_act and w_up.stride(2) == 1 and w_down.stride(2) == 1 and (
                    x.device.type == "cpu" or (WS_COMPILES and settings.flag("DLINFER_MOE_WS"))))


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _weight_operand(w: torch.Tensor) -> torch.Tensor:
    """An expert weight ``[E, N, K]`` as the GEMMs read it: as is where K or N is a unit-stride dimension (K-fastest,
    or N-fastest as ``w.transpose(1, 2).contiguous().transpose(1, 2)`` lays it out: the kernels take its strides, so
    no call copies the whole weight), else a K-fastest copy (at every call)."""
    return w if w.stride(2) == 1 or w.stride(1) == 1 else w.contiguous()


def fused_moe(hidden_states: torch.Tensor, gate_up_weights: torch.Tensor, down_weights: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, renormalize: bool,
              config: dict | None = None) -> torch.Tensor:
    """See ``dlinfer.ops.fused_moe``. ``config`` overrides :func:`moe_launch_config` (for tuning)."""
    tokens, hidden = hidden_states.shape
    experts, two_inter, _ = gate_up_weights.shape
    inter = two_inter // 2
    topk = topk_ids.shape[1]
    device = hidden_states.device
    out = torch.empty(tokens, hidden, dtype=hidden_states.dtype, device=device)
    if tokens == 0:
        return out
    if inter == 0:
        return out.zero_()
    config_given = config
    nf = is_n_fastest(gate_up_weights)  # N-fastest weights take their tables' own entries
    if config is None:
        if device.type == "cuda" and _precompile_key(hidden_states, gate_up_weights, down_weights) not in _precompiled:
            _precompile_on_first_use(hidden_states, gate_up_weights, down_weights, topk)

        def run(cand):
            return fused_moe(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, renormalize,
                             config=cand)

        config = tuning.launch_config(device, hidden_states.dtype, experts, topk, hidden, inter, tokens,
                                      autotune=lambda cands: tuning.pick_fastest(run, cands),
                                      n_fastest=nf)
    cfg = config
    if cfg.get("GROUPED_MM", 0) and grouped_mm_serves(hidden_states, gate_up_weights, down_weights):
        return _fused_moe_grouped_mm(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids,
                                     renormalize, out)
    block_m = cfg["BLOCK_M"]
    # Row-count-aware tiles: when the mean load picks narrow row blocks, experts that turn out (on the device) to
    # hold at least ``hot_rows`` rows get the wider tiles of a heavier load instead (``tuning.hot_loads``), in a
    # second pair of GEMM launches; an expert holds at most ``tokens`` rows, so small calls never need it.
    hot_cfg = cfg.get("hot") if "hot" in cfg else (
        tuning.hot_config(device, hidden_states.dtype, experts, topk, hidden, inter, tokens, above=block_m,
                          n_fastest=nf)
        if config_given is None else None)
    hot_cfg, hot_rows = tuning.hot_class(cfg, hot_cfg, tokens)
    hot_m = hot_cfg["BLOCK_M"] if hot_cfg is not None else block_m
    x = _rows_contiguous(hidden_states)
    w_up = _weight_operand(gate_up_weights)
    w_down = _weight_operand(down_weights)
    topk_weights = _rows_contiguous(topk_weights)
    ids = topk_ids.reshape(-1)
    ids = ids if ids.is_contiguous() else ids.contiguous()

    pairs = tokens * topk
    eb = next_power_of_2(experts)
    chunk = max(16, min(SORT_MAX_CHUNK, SORT_TILE // eb, next_power_of_2(pairs)))
    n_chunks = cdiv(pairs, chunk)
    # Every non-empty expert pads to a multiple of its block: at most pairs / BLOCK_M + min(E, pairs) blocks; hot
    # experts hold >= hot_rows rows each, so there are at most pairs // hot_rows of them.
    max_blocks = cdiv(pairs, block_m) + min(experts, pairs)
    max_hot_blocks = cdiv(pairs, hot_m) + min(experts, pairs // hot_rows) if hot_cfg is not None else 0

    i32 = dict(dtype=torch.int32, device=device)
    rank = torch.empty(pairs, **i32)
    hist = torch.empty(n_chunks, eb, **i32)
    meta = torch.empty(4, eb, **i32)
    sorted_rows = torch.empty((cdiv(pairs, hot_m) + min(experts, pairs)) * hot_m, **i32)
    hopper = _hopper_flags(cfg, x, w_up, w_down, inter)
    tma_a, tma_act, tma_b = hopper["tma_a"], hopper["tma_act"], hopper["tma_b"]
    # TMA_ACT (and TMA_A): the activations live in the expert-sorted order (padding rows included).
    act = torch.empty(sorted_rows.shape[0] if tma_act else pairs, inter, dtype=hidden_states.dtype, device=device)
    y = torch.empty(pairs, hidden, dtype=hidden_states.dtype, device=device)

    single = n_chunks == 1
    if not single:
        _moe_histogram_kernel[(n_chunks,)](ids, rank, hist, pairs, experts, CHUNK=chunk, EB=eb,
                                           num_warps=SORT_NUM_WARPS)
    _moe_scatter_kernel[(n_chunks,)](ids, rank, hist, sorted_rows, meta, pairs, experts, n_chunks,
                                     hot_rows if hot_cfg is not None else pairs + 1, CHUNK=chunk,
                                     EB=eb, CB=min(SORT_CHUNKS_PER_STEP, next_power_of_2(n_chunks)),
                                     BLOCK_M=block_m, HOT_BLOCK_M=hot_m, SINGLE_CHUNK=single,
                                     WHILE_LOOP=device.type == "cpu", num_warps=SORT_NUM_WARPS)
    classes = [(False, block_m, max_blocks, cfg)]
    if hot_cfg is not None:
        classes.append((True, hot_m, max_hot_blocks, hot_cfg))
    x_sorted = None
    if tma_a:
        x_sorted = torch.empty(sorted_rows.shape[0], hidden, dtype=x.dtype, device=device)
        block_h = min(GATHER_BLOCK_H, next_power_of_2(hidden))
        _moe_gather_kernel[(cdiv(x_sorted.shape[0], GATHER_ROWS), cdiv(hidden, block_h))](
            x, x_sorted, sorted_rows, meta, hidden, topk, experts, x.stride(0), x_sorted.stride(0), EB=eb,
            HOT_BLOCK_M=hot_m, ROWS=GATHER_ROWS, BLOCK_H=block_h, num_warps=GATHER_NUM_WARPS)
    if hot_cfg is not None and (cfg.get("MERGE", 0) or cfg.get("MERGE_GRID", 0)):
        for g, a, w, o, n_out, k_dim, div, up_offset, a_sorted in (
                ("up", x, w_up, act, inter, hidden, topk, inter, x_sorted),
                ("down", act, w_down, y, hidden, inter, 1, 0, act if tma_act else None)):
            _gemm_merged(a, w, o, sorted_rows, meta, n_out=n_out, k_dim=k_dim, a_row_div=div, up_offset=up_offset,
                         max_blocks=max_blocks, max_hot_blocks=max_hot_blocks, experts=experts, eb=eb,
                         block_m=block_m, hot_m=hot_m, silu=g == "up", cfg=cfg[g], hot_cfg=hot_cfg[g],
                         a_sorted=a_sorted, sorted_out=tma_act and g == "up", tma_b=tma_b,
                         persistent=bool(cfg.get("MERGE", 0)))
        classes = []  # served
    flags = dict(tma_b=tma_b, persistent=hopper["persistent"], ws=hopper["ws"])

    def up(hot, bm, blocks, c):
        _gemm(x, w_up, act, sorted_rows, meta, n_out=inter, k_dim=hidden, a_row_div=topk, up_offset=inter,
              max_blocks=blocks, experts=experts, eb=eb, block_m=bm, hot=hot, silu=True, cfg=c["up"],
              a_sorted=x_sorted, sorted_out=tma_act, **flags)

    def down(hot, bm, blocks, c):
        _gemm(act, w_down, y, sorted_rows, meta, n_out=hidden, k_dim=inter, a_row_div=1, up_offset=0,
              max_blocks=blocks, experts=experts, eb=eb, block_m=bm, hot=hot, silu=False, cfg=c["down"],
              a_sorted=act if tma_act else None, **flags)

    # asked at every call, so the stream exists from the first eager call on (an engine's warm-up) even where
    # that call has no hot class: a graph captured later can branch onto it
    side = _hot_stream(device, cfg.get("HOT_STREAM"))
    side = side if len(classes) == 2 else None
    if side is not None:
        # The two classes read and write disjoint rows: the hot experts' GEMMs run beside the others on a
        # higher-priority stream (forked after the sort, joined before the combine; inside a CUDA graph capture,
        # two branches), so the few long hot tiles start first and the narrow ones fill the SMs around them.
        main = torch.cuda.current_stream()  # the stream Triton launches on (the current device's)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            up(*classes[1])
            down(*classes[1])
        up(*classes[0])
        down(*classes[0])
        main.wait_stream(side)
    else:
        for cls in classes:
            up(*cls)
        for cls in classes:
            down(*cls)
    return _combine(y, topk_weights, out, renormalize)


def _combine(y: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """``out[t] = sum_k w[t, k] * y[t * topk + k]`` by ``_moe_combine_kernel`` (``y``: the per-pair down outputs in
    (token, slot) order; ``topk_weights`` with unit-stride rows); returns ``out``."""
    tokens, hidden = out.shape
    topk = topk_weights.shape[1]
    block_h = min(COMBINE_BLOCK_H, next_power_of_2(hidden))
    _moe_combine_kernel[(tokens, cdiv(hidden, block_h))](
        y, topk_weights, out, hidden, topk, y.stride(0), topk_weights.stride(0), out.stride(0),
        RENORMALIZE=renormalize, KB=next_power_of_2(topk), BLOCK_H=block_h, num_warps=COMBINE_NUM_WARPS)
    return out


def _grouped_mm_fn():
    """torch's grouped GEMM (``torch._grouped_mm``, public as ``torch.nn.functional.grouped_mm`` in newer torch),
    or None where this torch has neither."""
    return getattr(torch, "_grouped_mm", None) or getattr(torch.nn.functional, "grouped_mm", None)


def grouped_mm_serves(hidden_states: torch.Tensor, gate_up_weights: torch.Tensor,
                      down_weights: torch.Tensor) -> bool:
    """Whether a config's ``GROUPED_MM`` field can take this call: bf16 (torch's grouped GEMM takes no other
    16-bit type), a CUDA device of compute capability 9 (its CUTLASS kernels are built for Hopper; other cards get
    a slower path) or the CPU (tests), rows of 16-byte multiples, and a torch that has it. Otherwise the field is
    ignored (a config is a hint), as the Hopper fields are."""
    dev = hidden_states.device
    if _grouped_mm_fn() is None or hidden_states.dtype != torch.bfloat16:
        return False
    if dev.type not in ("cuda", "cpu") or (dev.type == "cuda" and capability(dev.index) != 9):
        return False
    hidden, inter = hidden_states.shape[1], down_weights.shape[2]
    return hidden % 8 == 0 and inter % 8 == 0 and gate_up_weights.dtype == down_weights.dtype == torch.bfloat16


def _fused_moe_grouped_mm(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, renormalize, out):
    """``fused_moe`` on torch's grouped GEMM (CUTLASS on Hopper: TMA, warp-specialized persistent tiles): the
    routed rows sorted by expert (a stable sort of the expert ids; each expert's end found by binary search, so no
    host sync and nothing sized from the data), gathered into one ``[T * topk, H]`` matrix, the gate_up grouped
    GEMM, ``silu_and_mul``, the down grouped GEMM, the rows put back in (token, slot) order and combined by the
    same kernel (and so the same fp32 sum, renormalization and rounding) as the Triton path. Unlike the fused
    kernels it writes the ``[T * topk, 2I]`` gate_up output and copies the rows twice. Measured on an H100 SXM
    (CUDA-graph replay, L2 flushed; Mixtral, Qwen3-30B-A3B, E16 top-2 and E256 top-8 shapes at 256, 2048 and 8192
    tokens): 0.64-1.01x the Triton kernels' speed (median 0.88x), so no table uses it; ``moe_bench.py
    --candidate-sets grouped`` times it on another card."""
    grouped_mm = _grouped_mm_fn()
    experts = gate_up_weights.shape[0]
    topk = topk_ids.shape[1]
    ids = topk_ids.reshape(-1)
    sorted_ids, order = torch.sort(ids, stable=True)
    ends = torch.arange(1, experts + 1, device=ids.device, dtype=sorted_ids.dtype)
    offs = torch.searchsorted(sorted_ids, ends, out_int32=True)  # the end of each expert's rows
    x = hidden_states.index_select(0, order // topk)
    h = grouped_mm(x, gate_up_weights.transpose(1, 2), offs=offs)
    act = silu_and_mul(h)
    del h
    y_sorted = grouped_mm(act, down_weights.transpose(1, 2), offs=offs)
    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)
    return _combine(y, _rows_contiguous(topk_weights), out, renormalize)


def weight_layout(op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """The vendor's ``weight_layout`` hook: for ``fused_moe`` on a CUDA device, the layout its card's table says
    the kernels serve faster (``tuning.preferred_layout``); None elsewhere."""
    if op != "fused_moe" or device.type != "cuda":
        return None
    return tuning.preferred_layout(tuning.card_name(device), dtype)


_hot_streams: dict[int, torch.cuda.Stream] = {}  # device index -> the hot experts' stream


def _hot_stream(device: torch.device, want: int | None = None) -> torch.cuda.Stream | None:
    """The stream the hot experts' GEMMs run on beside the others (``want``: the config's ``HOT_STREAM`` field;
    absent, ``DLINFER_MOE_HOT_STREAM``), or None: on the caller's stream after the others (off, not CUDA, or a CUDA
    graph being captured before the stream exists: the stream is made at an eager call, as creating one is not a
    capturable operation)."""
    on = settings.flag("DLINFER_MOE_HOT_STREAM") if want is None else bool(want)
    if device.type != "cuda" or not on:
        return None
    index = torch.cuda.current_device()  # Triton launches on the current device's stream, as the fork does
    stream = _hot_streams.get(index)
    if stream is None and not torch.cuda.is_current_stream_capturing():
        stream = _hot_streams[index] = torch.cuda.Stream(device=index, priority=-1)  # -1: higher than the default
    return stream


# ---------------------------------------------------------------------------------------------- precompile

# Every token bucket has its own tile config (and the sorting kernels their own chunk size), so a serving engine
# meets new kernel variants as batches change: each is a Triton compile of ~0.5-1 s in the middle of serving.
# The first eager call of a problem shape compiles them all instead (engines make that call in their warm-up,
# before they capture graphs or serve): every bucket up to the larger of that call's token count and
# PRECOMPILE_MIN_TOKENS (engines' usual largest prefill chunk: an engine's first call is not always its largest,
# LMDeploy's is not): tens of kernel variants per shape and dtype (counted for sm_90: Qwen3-30B-A3B's bf16 shape 28,
# Mixtral's 32), a log line per shape says how many and how long. Buckets not reached within PRECOMPILE_MAX_S
# compile when their token counts first appear, as all do with DLINFER_PRECOMPILE=0 (`dlinfer check` sets it).
PRECOMPILE_MIN_TOKENS = tuning.PRECOMPILE_MIN_TOKENS
PRECOMPILE_MAX_S = 120.0
_precompiled: set[tuple] = set()


def buckets(max_tokens: int):
    """The token buckets ``1, 2, 4, ...`` up to the first one ``>= max_tokens``."""
    tokens = 1
    while True:
        yield tokens
        if tokens >= max_tokens:
            return
        tokens *= 2


def dummy_routing(tokens: int, hidden: int, topk: int, experts: int, dtype: torch.dtype, device: torch.device):
    """Zero hidden states routed to consecutive experts (distinct within a token) with equal weights: the inputs a
    precompile run needs. Returns ``(hidden_states, topk_weights, topk_ids)``."""
    x = torch.zeros(tokens, hidden, dtype=dtype, device=device)
    ids = torch.arange(tokens * topk, device=device).view(tokens, topk) % experts
    return x, torch.full((tokens, topk), 1.0 / topk, device=device), ids


def precompile_gate(done: set, key: tuple) -> bool:
    """Whether the first eager call of problem ``key`` should precompile now: ``DLINFER_PRECOMPILE`` is on (read at
    each call while ``key`` is open, so turning it off for a while, as ``dlinfer check`` does, leaves later calls
    free to precompile) and no CUDA graph is being captured (the next eager call does it). When it answers True,
    ``key`` is marked done."""
    if not settings.flag("DLINFER_PRECOMPILE") or torch.cuda.is_current_stream_capturing():
        return False
    done.add(key)
    return True


def compiled_variants(kernels) -> int | None:
    """How many compiled variants Triton holds for the ``@triton.jit`` functions ``kernels`` (all devices), or None
    where its per-device kernel caches cannot be read (the interpreter)."""
    try:
        return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())
    except (AttributeError, TypeError, IndexError, KeyError):
        return None


def shape_label(op: str, dtype: torch.dtype, experts: int, topk: int, hidden: int, inter: int) -> str:
    """How the precompile log names a problem shape (``fused_moe bfloat16 E=128 top-8 hidden 2048 ...``)."""
    return f"{op} {str(dtype).replace('torch.', '')} E={experts} top-{topk} hidden {hidden} intermediate {inter}"


def run_buckets(run_bucket, max_tokens: int, what: str, kernels, max_s: float | None = None) -> int:
    """Call ``run_bucket(tokens)`` for the buckets ``1, 2, 4, ... >= max_tokens``, smallest first (decode's, which
    serving meets most), until ``max_s`` seconds (default :data:`PRECOMPILE_MAX_S`) have passed; log one line
    naming ``what``, the buckets run, the new variants of ``kernels`` and the seconds (a warning when the budget
    cut it short). Returns the number of buckets run."""
    max_s = PRECOMPILE_MAX_S if max_s is None else max_s
    before = compiled_variants(kernels)
    t0 = time.perf_counter()
    sizes = list(buckets(max_tokens))
    runs, todo = 0, len(sizes)
    for tokens in sizes:
        if runs and time.perf_counter() - t0 > max_s:
            break
        run_bucket(tokens)
        runs += 1
    after = compiled_variants(kernels)
    if torch.cuda.is_available():  # the dummy calls' buffers (up to the largest bucket's) back to the device: an
        # engine that sizes its KV cache from the free memory after its warm-up must not lose them
        torch.cuda.empty_cache()
    seconds = time.perf_counter() - t0
    variants = f"{after - before} kernel variants compiled" if before is not None and after is not None else \
        "kernel variants compiled"
    if runs < todo:
        logger.warning("dlinfer: %s: precompile stopped after %.1f s (PRECOMPILE_MAX_S) at %d of %d token buckets "
                       "(%s, up to %d tokens); the others compile when their token counts first appear",
                       what, seconds, runs, todo, variants, 1 << (runs - 1))
    else:
        logger.info("dlinfer: %s: %s for %d token buckets (up to %d tokens) in %.1f s", what, variants, runs,
                    max_tokens, seconds)
    return runs


KERNELS = (_moe_histogram_kernel, _moe_scatter_kernel, _moe_gemm_kernel, _moe_gemm_merged_kernel, _moe_gather_kernel,
           _moe_combine_kernel)


def precompile(gate_up_weights: torch.Tensor, down_weights: torch.Tensor, topk: int, max_tokens: int,
               dtype: torch.dtype | None = None, max_s: float | None = None) -> int:
    """Run ``fused_moe`` once per token bucket ``1, 2, 4, ... >= max_tokens`` on dummy inputs with the configs the
    card's table or cache gives those buckets (and the hot experts' GEMMs where a bucket can have them), so that
    every kernel variant those calls need is compiled; stops early after ``max_s`` seconds (default
    :data:`PRECOMPILE_MAX_S`; see :func:`run_buckets`). Returns the number of buckets run."""
    experts, two_inter, hidden = gate_up_weights.shape
    dtype = dtype or gate_up_weights.dtype
    device = gate_up_weights.device
    card = tuning.card_name(device)
    nf = is_n_fastest(gate_up_weights)

    def run_bucket(tokens):
        cfg = tuning.static_config(card, dtype, experts, topk, hidden, two_inter // 2, tokens, device, n_fastest=nf)[0]
        hot = tuning.hot_config(device, dtype, experts, topk, hidden, two_inter // 2, tokens, above=cfg["BLOCK_M"],
                                n_fastest=nf)
        x, weights, ids = dummy_routing(tokens, hidden, topk, experts, dtype, device)
        fused_moe(x, gate_up_weights, down_weights, weights, ids, False, config=dict(cfg, hot=hot))

    what = shape_label("fused_moe", dtype, experts, topk, hidden, two_inter // 2)
    return run_buckets(run_bucket, max_tokens, what, KERNELS, max_s)


def _precompile_key(hidden_states, gate_up_weights, down_weights) -> tuple:
    """What the first-use precompile runs once for: the device, dtype and weight shape, and the weights' strides
    (a K-fastest and an N-fastest weight compile their own kernel variants)."""
    return (hidden_states.device.index, hidden_states.dtype, gate_up_weights.shape, gate_up_weights.stride(),
            down_weights.stride())


def _precompile_on_first_use(hidden_states, gate_up_weights, down_weights, topk) -> None:
    if not precompile_gate(_precompiled, _precompile_key(hidden_states, gate_up_weights, down_weights)):
        return
    precompile(gate_up_weights, down_weights, topk, max(hidden_states.shape[0], PRECOMPILE_MIN_TOKENS),
               hidden_states.dtype)


def _fused_moe_op(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, renormalize):
    return fused_moe(hidden_states, gate_up_weights, down_weights, topk_weights, topk_ids, renormalize)


OPS = {"moe_gating_topk_softmax": moe_gating_topk_softmax, "fused_moe": _fused_moe_op}
