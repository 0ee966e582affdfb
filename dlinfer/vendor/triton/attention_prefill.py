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

* Both ops take the contract's int32 ``[B + 1]`` start offsets (``starts[0] == 0``) and the kernels read them
  as they are: sequence ``b`` owns rows ``starts[b]:starts[b + 1]`` (no ``[1:]`` view is made per call: on a
  serving host a view costs microseconds of the eager prefill's time to first token).
* ``prefill_attention``: keys/values are packed like the queries, partitioned by their own start offsets.
* ``paged_prefill_attention``: keys/values come from the paged cache through the block table (history and the new
  tokens, which are already in the cache), token ``t`` at page ``block_table[b, t // block_size]``, slot
  ``t % block_size``; caches are addressed through their strides. Queries past ``cu_seqlens_q[-1]`` are never
  touched.

Split-KV
--------
A small grid over long keys (chunked prefill: a few hundred new tokens over a long history, batch 1) would leave
most SMs idle while each program walks the whole history. Then each tile's key range is cut into ``num_splits``
slices, a fourth grid dimension folded into the first (``program_id(0) = split * num_m_tiles + tile``). The
slices are computed ON THE DEVICE from the real lengths: the keys tile ``t`` sees, ``[0, hi)``, in
``cdiv(cdiv(hi, num_splits), BLOCK_N) * BLOCK_N``-key slices, so a CUDA graph captured at a large
``max_kv_seq_len`` still spreads a short sequence over its splits, the causal no-history case gives every split
of a tile an equal share, and a slice past ``hi`` (wholly above every row's diagonal) does no work. Inside a slice
the same two loops run (unmasked tiles below the diagonal, masked diagonal/tail tiles). Each program writes its
normalized partial output (fp32) and each row's base-2 log-sum-exp (``-inf`` for a row that saw no key of the
slice) to a scratch ``[splits, T, Hq, Dv]`` / ``[splits, T, Hq]``; then ``_prefill_combine_kernel``, one program per
``combine_rows`` (token, head) rows, merges the splits with weights ``2^(lse - max)``: empty partials weigh 0,
a row no split saw gives zeros, and rows of tokens past ``cu_seqlens_q[-1]`` are never touched. On sm90+ the
combine is a programmatic dependent launch (it waits with ``griddepcontrol.wait`` for the split grid), as in
``attention_decode``. ``prefill_attention`` uses the same kernels (its KV bound: ``max_q_seq_len`` when keys
and queries share their offsets, else the packed key count).

Each program reads its query tile before it writes its output tile, and only its own rows and heads, so
``attn_output`` may alias the query buffer (LMDeploy passes ``query[..., :Dv]``); split programs read queries
and write only the scratch, and the combine kernel writes the output after them.

A quantized cache (``paged_prefill_attention`` with ``quant_bits`` 8 / 4) is the compile-time branch ``QUANT`` of
the same kernel: K/V tiles are loaded as bytes with their tokens' scales and zeros and dequantized in registers
(``attention_decode.load_dequant``) before the dots; ``QUANT = 0`` compiles to the unquantized kernel.

Hopper variant (TMA), on by default at head size 128 on sm_90
--------------------------------------------------------------
``PrefillConfig.tma`` (default :data:`HOPPER_TMA` for 16-bit head size 128 on sm_90 (Hopper) where a
``prefill_attention`` call qualifies and has at least :data:`TMA_MIN_TOKENS` query rows, and
:data:`HOPPER_TMA_PAGED` where a ``paged_prefill_attention`` call qualifies and has at least :data:`TMA_MIN_PAIRS`
query-key pairs: calls whose GPU time repays the TMA launch's host time; ``DLINFER_TRITON_PREFILL="tma=1"`` asks
for it elsewhere, ``tma=0`` restores the pointer kernel and its tiles) runs the grid through ``_prefill_tma_kernel``
(``_prefill_tma_split_kernel`` when split and ``tma_split`` asks for it, then the same combine kernel; else a split
grid runs the pointer split kernel): the same tiles, packing, reverse tile
order, slices, causal split into unmasked and masked diagonal tiles and online softmax (shared helpers), but the
query tile is one TMA box ``[BLOCK_M // PACK, PACK, D]`` of the ``[T, Hq, D]`` query (token-major rows, as packed)
and each key/value tile a ``[BLOCK_N, D]`` box of a 2-D view at column ``kv_head * D``: ``[T, Hkv * D]`` of packed
keys, or ``[blocks * page_size, Hkv * D]`` of a paged cache whose pages follow each other row by row (LMDeploy's
and vLLM's ``[blocks, page_size, Hkv, D]``), the tile at key ``n0`` from row ``page * page_size + n0 % page_size``
(its page from the block table, loaded one tile ahead): paged calls need ``page_size`` a multiple of ``BLOCK_N``,
so a tile never crosses a page (else the pointer kernel runs). A box is not clipped to its sequence: rows past it
are the next sequence's tokens, the rest of the sequence's last page, or zeros past the tensor; the masked tiles
hide their scores and zero their values, and query rows past the sequence are never stored. Descriptors
are built on the host per call
(``triton.tools.tensor_descriptor.TensorDescriptor``; the launcher encodes each with ``cuTensorMapEncodeTiled``
and passes it by value, so a CUDA graph captures it like any argument; building the three, without
``TensorDescriptor``'s per-call validation (:func:`_descriptor`), takes ~5 us of host time per call on a 2-core
CPU, the encodes are unmeasured). The TMA kernel applies to 16-bit inputs with head
sizes 64 / 128 whose K/V heads are contiguous, on sm_90+; anything else (D 256, fp32, a quantized cache, pages
holding part of a tile) runs the pointer kernels. On sm_90: 128x128 tiles, 8 warps, 3 stages take 192 KB of
shared memory and 227 registers (pointer kernel: 224 KB, 246). Measured on an H100 (bf16, 32/8 heads, D 128), the
64x64 tiles with 4 warps and 3 stages were the fastest TMA tiles at 16x512, 4x2048 and 1x8192 tokens and 1.08-1.19x
the pointer kernel's tiles in force (:data:`HOPPER_TMA`); the warp-specialized form was slower (and is off).

``warp_specialize=1`` (with ``tma=1``) is the form Triton 3.6's Hopper warp specialization accepts, found by
compiling for sm_90: ``num_warps=4`` (it adds a producer warp group issuing the TMA copies and splits the tile's
rows between two consumer warp groups: 12 warps, ``setmaxnreg``), descriptors made on the device
(``tl.make_tensor_descriptor``; host-side descriptors are not partitioned), one branch-free KV loop (no early
return, no second loop after it, no branch inside it: each crashes the pass), the query tile a 2-D box, so no GQA
packing. So its tile is ``BLOCK_M`` tokens of one head, every key tile it sees goes through the masked softmax
step, and its descriptors are made per sequence, clipped to it (TMA brings zeros past its end: nothing to zero
by hand). On-device descriptors need a global scratch from Triton's allocator, set (a ContextVar) for that
launch only: a ``torch.empty`` on the device, from the graph's pool while a CUDA graph is being captured. With
``num_warps=8`` Triton does not specialize the loop; refused with a ValueError. 128x128 tiles, 2 stages: 176 KB
of shared memory; 128x64, 2 / 3 stages: 112 / 144 KB; no spills.

Library route (cuDNN SDPA), off by default
------------------------------------------
``PrefillConfig.sdpa`` (``DLINFER_TRITON_PREFILL="sdpa=1"``) serves a ``prefill_attention`` call from torch's
``scaled_dot_product_attention`` restricted to its cuDNN backend (as the vendor's ``linear`` is served by cuBLAS)
when the batch is one ``[B, S]`` block, proven from host ints and tensor identity alone (no sync, no tensor value
read): keys partitioned like the queries (``cu_seqlens_kv is cu_seqlens_q``: one offsets tensor, as the engine
adapters pass without history) and ``T == Tk == B * max_q_seq_len`` with ``T`` the query rows. Every length is at
most ``max_q_seq_len``, so when the lengths sum to ``T`` they all equal it. The op contract also lets a caller
pad rows after ``cu_seqlens_q[-1]``; the host cannot see that, so with ``sdpa=1`` such a call whose padded ``T``
happens to equal ``B * max_q_seq_len`` would be served as ``B`` full sequences (wrong): the route assumes no
padding there (with ``DLINFER_CHECK=1`` it reads the offsets, a sync, and sends such a batch to the Triton
kernel). The engine adapters pass no padding rows to ``prefill_attention`` (vLLM slices to
``num_actual_tokens``; LMDeploy's no-history prefill holds exactly the new tokens). Further conditions: a CUDA
device, fp16/bf16, ``D == Dv`` in (64, 128) (torch's cuDNN rule is a multiple of 8 up to 128, 256 on sm_90 with
recent cuDNN: kept to the two sizes measured), ``S >= 2`` (cuDNN SDPA refuses one key) and no CUDA graph being
captured (cuDNN builds an execution plan per new shape). The packed ``[T, H, D]`` tensors (strided views of a
fused QKV too) are viewed as ``[B, H, S, D]`` without a copy, GQA through ``enable_gqa``, causal with
``is_causal`` (equal query and key lengths: both alignments agree), and SDPA's result is copied into
``attn_output`` in one ``copy_`` (``F.scaled_dot_product_attention`` has no ``out=``; the query is read before,
so ``attn_output`` may alias it). A call SDPA raises on (no cuDNN kernel for it) runs the Triton kernel; its
``(dtype, Hq, Hk, D, causal)`` is remembered, never tried again, and logged once. Measured through the op on an
H100 (bf16, 32/8 heads, D 128, eager): 1.21x / 1.19x the Triton kernel at 4x2048 / 1x8192 tokens (0.85x / 0.95x
torch's cuDNN SDPA on K/V expanded to the query heads) but 0.65x at 16x512, and the first call at each new length
took 50-657 ms (cuDNN builds a plan per shape): in serving nearly every prefill is a new length, so it stays off.

Launch parameters
-----------------
All in :func:`_config` (and :func:`_pack`, :func:`num_splits`): on sm_90, a ``prefill_attention`` call the TMA
kernel takes with 16-bit head size 128 uses :data:`HOPPER_TMA` (a paged call: :data:`HOPPER_TMA_PAGED`);
otherwise on the GPU, 16-bit inputs with ``D <= 64`` use ``BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3``;
``D <= 128`` uses ``128 x 128`` tiles with 8 warps and 3 stages when ``max_q_seq_len >= LONG_QUERIES`` (paged
prefill also for a chunk of :data:`CHUNK_MIN_QUERIES` tokens over :data:`LONG_HISTORY` keys; 224 KB of shared
memory on sm_90, 247 registers, wgmma) and
``64 x 64`` tiles with 4 warps and 3 stages below it (112 KB, 200 registers); ``D`` up to 256 uses ``BLOCK_M=64,
BLOCK_N=64, num_warps=8, num_stages=2``; fp32 uses ``tf32x3`` dots (three tensor-core
passes, close to fp32 accuracy) on ``64 x 32`` tiles with 4 warps. Under ``TRITON_INTERPRET=1`` (CPU tensors) a
separate small config (``32 x 16``) keeps the interpreter fast. On the GPU,
``DLINFER_TRITON_PREFILL="block_n=128,pack_gqa=0"`` overrides fields (tuning sweeps).

``num_splits`` (host ints only: batch, heads, ``max_q_seq_len``, ``max_kv_seq_len``, the SM count) =
``min(target_programs // programs, max_kv_seq_len // min_split_tokens, MAX_SPLITS)``, at least 1, where
``programs = cdiv(max_q_seq_len, BLOCK_M // PACK) * (Hq // PACK) * B`` is the un-split grid and, on a GPU,
``target_programs`` = :func:`resident_programs`: the programs of this config the card runs at once (SM count x
programs per SM by shared memory and threads; 64x64 tiles with 3 stages at D 128 take 112 KB, two per SM: 264 on
a 132-SM H100/H200). Safe by construction: a grid of more than half a wave of resident programs (each SM already
has its share) or a KV bound under two ``min_split_tokens`` (512-key) slices is never split, and a split grid never
exceeds one wave (no second, partly filled wave whose tail would cost what the split saved). Chunked prefill of
256 tokens over a 16k history with 32/8 heads: batch 1 = 128 programs -> 2 splits (256 programs), batch 8 ->
1. The interpreter's config (16 target programs, 32-key slices) splits small cases too, so the CPU tests run the
split path. Sweeps: ``DLINFER_TRITON_PREFILL="splits=0"`` (never split), ``"splits=4"`` (always 4),
``"target_programs=528,min_split_tokens=1024"`` (the rule's target and slice floor), ``"pdl=0"``; the library
route: ``"sdpa=1"``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.runtime import _allocation
from triton.tools.tensor_descriptor import TensorDescriptor

from dlinfer import settings
from dlinfer.vendor.registry import Capabilities
from dlinfer.vendor.triton.attention_decode import (BLOCK_SIZES, HEAD_SIZES, LOG2E, MAX_SPLITS, env_overrides,
                                                    load_dequant, quant_scales)
from dlinfer.vendor.triton import host
from dlinfer.vendor.triton.host import capability, card, cdiv, has_pdl, memo, next_power_of_2

try:  # Triton's block-shape rule, as TensorDescriptor applies it (3.4-3.7 import it there)
    from triton.tools.tensor_descriptor import validate_block_shape
except ImportError:  # pragma: no cover - a Triton without it: descriptors validate themselves (_descriptor)
    validate_block_shape = None

logger = logging.getLogger("dlinfer")

LONG_QUERIES = 1024  # max_q_seq_len from which the large-tile config is used


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pack_gqa: bool = True  # rows of a tile = tokens x the query heads of one KV head (see _pack)
    pack_min_tokens: int = 16  # pack only when a tile still holds this many tokens
    # Split-KV (see num_splits): -1 = the rule; 0 or 1 = never split; N > 1 = exactly N slices (sweeps, tests).
    splits: int = -1
    # The rule splits sequences until the grid reaches this many programs; -1 on a GPU = one wave of resident
    # programs (resident_programs), -1 elsewhere and 0 = never split.
    target_programs: int = -1
    min_split_tokens: int = 512  # ... and never into slices shorter than this many keys
    combine_rows: int = 32  # (token, head) rows per program of the combine kernel
    combine_warps: int = 4
    pdl: bool = True  # programmatic dependent launch of the combine kernel where the card has it (sm90+)
    # Hopper variant of prefill_attention's un-split kernel (_prefill_tma_kernel): Q/K/V tiles by TMA; with
    # warp_specialize (tma only, num_warps=4, no GQA packing) its warp-specialized form. Off until measured
    # (benchmarks/tune_attention.py sweeps them).
    tma: bool = False
    warp_specialize: bool = False
    # split grids on the TMA split kernel (with tma; else the pointer split kernel): paged prefill's Hopper default
    # (HOPPER_TMA_PAGED); prefill_attention's split grids (rare: its keys are its queries) not measured with it
    tma_split: bool = False
    # Library route of prefill_attention (_sdpa): a uniform batch (one offsets tensor for queries and keys,
    # T == B * max_q_seq_len, no padding rows) on CUDA, fp16/bf16, D == Dv in (64, 128), outside CUDA-graph
    # capture, served by torch's cuDNN SDPA. Off: a cuDNN plan build (50-657 ms on an H100) per new length.
    sdpa: bool = False


# prefill_attention's default on sm_90 where the TMA kernel takes the call (16-bit, head size 128; _config):
# measured on an H100 (bf16, 32/8 heads, benchmarks/tune_attention.py --parts prefill, CUDA-graph replay, L2
# flushed), against the pointer kernel's tiles in force: 16x512 136 vs 160 us, 4x2048 319 vs 380 us, 1x8192
# 1026 vs 1111 us (1.08-1.19x; LMDeploy's kernel 205 / 430 / 1250 us); of the TMA tiles swept (128x128 and
# 128x64 with 8 warps, 64x128, warp-specialized 128-row tiles) the fastest at all three shapes.
HOPPER_TMA = PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, tma=True)
# ... for calls of at least this many query rows (``query.shape[0]``, a host int). A TMA launch costs more host time
# than a pointer launch: three descriptors built (~5 us on a 2-core CPU) plus Triton's launcher expanding and
# encoding each (``cuTensorMapEncodeTiled``; its Python part ~3 us on that CPU), while the GPU time it saves is
# 8-19 % of the kernel's (24 us at 8192 tokens on the H100, so ~6 us at 2048). Eager prefill is host-bound at a few
# hundred tokens (the engines run prefill outside CUDA graphs), so smaller calls keep the pointer kernel.
TMA_MIN_TOKENS = 2048
# paged_prefill_attention's default on sm_90 where the TMA kernels take the call (16-bit, head size 128, pages of
# whole 64-key tiles, _tma_applies): HOPPER_TMA's tiles, split grids on the TMA split kernel too. Measured on an H100
# (bf16, 32/8 heads, block 64, benchmarks/tune_attention.py --parts paged_prefill, CUDA-graph replay, L2 flushed,
# 2026-12-07) against the pointer kernel's tiles in force and LMDeploy's kernel in the same run: chunked prefill of
# 256 tokens over a 16k history, batch 1: 143 vs 207 us (peer 318), batch 8: 1124 vs 1658 us (peer 1450); whole
# prompts 16x512: 134 vs 203 (peer 233), 4x2048: 324 vs 448 (peer 437), 1x8192: 1162 vs 1330 (peer 1260). The TMA
# kernel without split grids (split rule in force, pointer split kernel) was 211 / 1203 us on the chunked cases.
HOPPER_TMA_PAGED = dataclasses.replace(HOPPER_TMA, tma_split=True)
# ... for calls of at least this many query-key pairs (query rows x max_kv_seq_len, host ints): 2048 rows over 1024
# keys, or 128 rows over a 16k history. Below it the kernel's GPU time (~40 us at 1M pairs with 32 heads of 128)
# saves about what the TMA launch's host time costs (see TMA_MIN_TOKENS).
TMA_MIN_PAIRS = 1 << 21
# Paged (chunked) prefill on the pointer kernel: a short query over a long history takes the large tiles of long
# queries too, from these bounds (max_q_seq_len, max_kv_seq_len). H100, same run as HOPPER_TMA_PAGED, 256 tokens over
# a 16k history: 128 x 128 tiles with 8 warps 173 / 1235 us at batch 1 / 8 with pages of 16 (64 x 64 tiles: 202 /
# 1628; the peer 320 / 1432), 172 / 1313 us with pages of 64 (207 / 1658). Whole 512-token prompts (16x512) keep the
# 64 x 64 tiles (203 us; 128 x 128: 220).
CHUNK_MIN_QUERIES, LONG_HISTORY = 128, 4096


def shared_memory(config: PrefillConfig, head_size: int, head_size_v: int, itemsize: int) -> int:
    """Shared memory of a prefill / split program on sm_90, an upper bound: ``num_stages`` K/V tiles and the query
    tile (exact for the 16-bit configs); fp32 counts the query tile twice (its ``tf32x3`` dots take more: 128 KB
    for 64x32 tiles with 2 stages at D 128). A quantized cache takes less (byte tiles)."""
    d, dv = next_power_of_2(head_size), next_power_of_2(head_size_v)
    q_tiles = 2 if itemsize == 4 else 1
    return (config.num_stages * config.block_n * (d + dv) + q_tiles * config.block_m * d) * itemsize


def resident_programs(config: PrefillConfig, head_size: int, head_size_v: int, itemsize: int, sm_count: int,
                      smem_per_sm: int, threads_per_sm: int) -> int:
    """Programs of ``config`` a card runs at once: SM count x programs per SM, bounded by shared memory
    (:func:`shared_memory` plus the 1 KB the driver reserves per block) and by threads."""
    return host.resident_programs(shared_memory(config, head_size, head_size_v, itemsize) + 1024, config.num_warps,
                                  sm_count, smem_per_sm, threads_per_sm)


# Cards with less shared memory per block than this (sm_86 / sm_89 / sm_120: 99 KB) get the tiles of
# _small_smem: the sm_90 configs above take 104-160 KB there (compiled for sm_89; Triton keeps one K/V buffer
# fewer below sm_90). The A100's 163 KB fits them all (128x128 tiles with 3 stages: 160 KB).
SMALL_SMEM = 160 * 1024


def _small_smem(cfg: PrefillConfig, dtype: torch.dtype, widest: int) -> PrefillConfig:
    """The tiles of ``cfg`` on a 99 KB card (shared memory of each on sm_89, compiled with Triton 3.6)."""
    if dtype == torch.float32:  # 64x32 x 2 stages: 112 KB at D 128; 32x32 (D 128): 72 KB; 16x16 (D 256): 66 KB
        return dataclasses.replace(cfg, block_m=32 if widest <= 128 else 16, block_n=32 if widest <= 128 else 16)
    if widest > 128:  # 64x64 x 2 stages: 104 KB at D 256; 64x32: 68 KB
        return dataclasses.replace(cfg, block_n=32)
    if cfg.block_n == 128:  # 128x128 x 3 stages: 160 KB at D 128; 128x64 x 2 stages: 64 KB
        return dataclasses.replace(cfg, block_n=64, num_stages=2)
    return cfg  # 64x64 x 3 stages (D 128): 88 KB; 128x64 x 3 stages (D 64): 64 KB


@functools.lru_cache(maxsize=None)
def _config(device_type: str, dtype: torch.dtype, head_size: int, head_size_v: int,
            long_queries: bool = True, device_index: int = 0, tma_call: bool = False,
            paged: bool = False) -> PrefillConfig:
    """Launch parameters of the prefill kernels (the one place to tune them).

    ``long_queries``: ``max_q_seq_len >= LONG_QUERIES`` (a host int, so the choice is CUDA-graph safe).
    Measured on the H100 (bf16, 32/8 heads, D 128; benchmarks/tune_attention.py, 2026-11-25): 128x128 tiles
    with 8 warps won at 4x2048 (383 vs 394 us) and 1x8192 tokens (1120 vs 1279 us); 64x64 tiles with 4 warps
    at 16x512 (167 vs 175 us).

    ``tma_call``: a ``prefill_attention`` call the TMA kernel can take (un-paged, unquantized, :func:`_tma_applies`)
    of at least :data:`TMA_MIN_TOKENS` query rows, or (``paged``) a ``paged_prefill_attention`` call the TMA kernels
    can take of at least :data:`TMA_MIN_PAIRS` query-key pairs.
    On sm_90 (Hopper) such a call with 16-bit head size 128 runs the TMA kernel on 64x64 tiles, 4 warps, 3
    stages (:data:`HOPPER_TMA`; paged: :data:`HOPPER_TMA_PAGED`, split grids too); other calls and cards (Blackwell
    included: not measured) keep the pointer tiles.
    """
    if device_type == "cpu":  # TRITON_INTERPRET=1 (small tiles; splits from 16 target programs, to test them)
        return PrefillConfig(block_m=32, block_n=16, num_warps=1, num_stages=1, pack_min_tokens=4, target_programs=16,
                             min_split_tokens=32, combine_rows=16, combine_warps=1, pdl=False)
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
    if (tma_call and device_type == "cuda" and dtype != torch.float32 and 64 < widest <= 128
            and card(device_index).capability == 9 and env_overrides(HOPPER_TMA, "DLINFER_TRITON_PREFILL").tma):
        cfg = HOPPER_TMA_PAGED if paged else HOPPER_TMA  # overrides apply to its tiles; with tma=0 the pointer
        # kernel keeps its own tiles
    base, cfg = cfg, env_overrides(cfg, "DLINFER_TRITON_PREFILL")
    if device_type == "cuda" and cfg.tma and cfg.warp_specialize and cfg.num_warps != 4:
        raise ValueError("DLINFER_TRITON_PREFILL: warp_specialize=1 needs num_warps=4 (Triton 3.6 on sm_90 adds a "
                         f"producer warp group and splits the tile between two consumer groups), got {cfg.num_warps}")
    if device_type == "cuda":
        facts = card(device_index)
        if facts.smem_per_block < SMALL_SMEM:  # the card's tiles, then the overrides again (they win)
            cfg = env_overrides(_small_smem(base, dtype, widest), "DLINFER_TRITON_PREFILL")
        if cfg.target_programs < 0:  # after the overrides: the tiles they chose
            cfg = dataclasses.replace(cfg, target_programs=resident_programs(
                cfg, head_size, head_size_v, dtype.itemsize, facts.sm_count, facts.smem_per_sm,
                facts.threads_per_sm))
    return cfg


def num_splits(programs: int, max_kv_seq_len: int, config: PrefillConfig) -> int:
    """KV slices per sequence for an un-split grid of ``programs``; host ints only (shapes and length bounds).

    ``min(target_programs // programs, max_kv_seq_len // min_split_tokens, MAX_SPLITS)``, at least 1: a grid of
    more than half the target, or a KV bound under two slices, is never split."""
    if config.splits >= 0:
        return max(1, min(config.splits, MAX_SPLITS))
    if config.target_programs <= 0:
        return 1
    return max(1, min(config.target_programs // max(programs, 1), max_kv_seq_len // max(config.min_split_tokens, 1),
                      MAX_SPLITS))


def _dot_precision(query: torch.Tensor) -> str:
    """fp32 inputs: ``tf32x3`` (three tensor-core passes, close to fp32 accuracy); 16-bit inputs ignore it."""
    return "tf32x3" if query.dtype == torch.float32 else "tf32"


@triton.jit
def _softmax_step(qk, m_i, l_i, offs_m, offs_n, n_mask, diag, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """The online-softmax step of one score tile ``qk`` (unscaled): its probabilities ``p`` (base 2, against the new
    row maxima), the factor ``alpha`` that rescales what the rows accumulated so far, the new row sums and maxima.
    ``MASKED`` tiles hide keys past ``kv_len`` (``n_mask``) and, causal, keys past each row's diagonal."""
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
    return p, alpha, l_i * alpha + tl.sum(p, axis=1), m_new


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
    p, alpha, l_i, m_new = _softmax_step(qk, m_i, l_i, offs_m, offs_n, n_mask, diag, qk_scale, MASKED, CAUSAL)
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
def _tile_rows(m0, head0, q_len, BLOCK_M: tl.constexpr, PACK: tl.constexpr):
    """The tile's rows: ``BLOCK_M // PACK`` tokens from ``m0`` times ``PACK`` heads from ``head0``, token-major;
    each row's token (within its sequence), head, and whether it is a real query row."""
    TOKENS: tl.constexpr = BLOCK_M // PACK
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_r // PACK  # each row's token (rows are token-major, heads minor)
    heads = head0 + offs_r % PACK
    m_mask = offs_m < q_len
    if TOKENS * PACK != BLOCK_M:
        m_mask = m_mask & (offs_r < TOKENS * PACK)
    return offs_m, heads, m_mask


@triton.jit
def _key_bounds(m0, kv_len, diag, TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys the tile of ``TOKENS`` tokens from ``m0`` sees, ``[0, hi)``, and the end of the whole ``BLOCK_N`` tiles
    every row of it sees (``full``: no mask needed below it)."""
    if CAUSAL:
        hi = tl.minimum(kv_len, m0 + TOKENS + diag)  # keys past the tile's last token are never seen
        full = tl.minimum(tl.maximum(m0 + diag + 1, 0), kv_len)  # keys every row of the tile sees
    else:
        hi = kv_len
        full = kv_len
    return hi, (full // BLOCK_N) * BLOCK_N


@triton.jit
def _slice(hi, full, split, n_splits, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """``(lo, full, hi)``: with ``SPLIT``, slice ``split`` of ``n_splits`` of the keys ``[0, hi)`` a tile sees (whole
    tiles, sized from the real length; unmasked ``[lo, full)``, masked ``[full, hi)``, empty if ``hi <= lo``);
    else all of them from 0."""
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(tl.maximum(hi, 0), n_splits), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(hi, lo + chunk)
        return lo, tl.maximum(tl.minimum(full, hi), lo), hi
    else:
        return 0, full, hi


@triton.jit
def _attend(q_ptr, k_ptr, v_ptr, kv_ptr_lens, block_table_ptr,
            ks_ptr, kz_ptr, vs_ptr, vz_ptr, stride_sb, stride_st, stride_sh,
            stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_tb,
            qk_scale, b, m0, head0, q_start, q_len, split, n_splits,
            GROUP: tl.constexpr, PACK: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
            WHILE_LOOP: tl.constexpr, QUANT: tl.constexpr, SPLIT: tl.constexpr):
    """The online softmax of one query tile (tokens from ``m0`` of sequence ``b``, heads from ``head0``) over the
    keys it sees; with ``SPLIT``, only over slice ``split`` of ``n_splits`` of them. Returns the unnormalized
    output, the row sums and row maxima (base 2), and the rows' token indices, heads and mask."""
    TOKENS: tl.constexpr = BLOCK_M // PACK
    kvh = head0 // GROUP
    if PAGED:
        kv_base = 0
        kv_len = tl.load(kv_ptr_lens + b).to(tl.int32)
    else:
        kv_base = tl.load(kv_ptr_lens + b).to(tl.int64)
        kv_len = (tl.load(kv_ptr_lens + b + 1) - kv_base).to(tl.int32)
    diag = kv_len - q_len

    offs_m, heads, m_mask = _tile_rows(m0, head0, q_len, BLOCK_M, PACK)
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

    hi, full = _key_bounds(m0, kv_len, diag, TOKENS, BLOCK_N, CAUSAL)
    lo, full, hi = _slice(hi, full, split, n_splits, BLOCK_N, SPLIT)

    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    s_head = kvh.to(tl.int64) * stride_sh  # scales and zeros (a quantized cache)
    ks_head, kz_head, vs_head, vz_head = ks_ptr + s_head, kz_ptr + s_head, vs_ptr + s_head, vz_ptr + s_head
    table_row = block_table_ptr + b.to(tl.int64) * stride_tb
    if WHILE_LOOP:  # the interpreter (numpy 2 refuses range() over its 1-element scalars)
        n0 = full * 0 + lo
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
        pages = _tile_pages(table_row, lo, kv_len, PAGED, PAGE_SIZE, BLOCK_N)
        for n0 in range(lo, full, BLOCK_N):
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
    return acc, l_i, m_i, rows, heads, m_mask


@triton.jit
def _store_rows(out_ptr, acc, l_i, rows, heads, m_mask, stride_ot, stride_oh, HEAD_DIM_V: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """The normalized output of the tile's real rows (a row that saw no key: zeros) to ``attn_output``."""
    offs_dv = tl.arange(0, BLOCK_DV)
    res = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + (heads * stride_oh)[:, None] + offs_dv[None, :],
             res.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_dv < HEAD_DIM_V)[None, :])


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, q_starts_ptr, kv_ptr_lens, block_table_ptr,
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
    """One ``BLOCK_M``-row tile: ``BLOCK_M // PACK`` tokens x ``PACK`` query heads (of one KV head), all its keys,
    written to ``attn_output``.

    ``kv_ptr_lens``: ``[B + 1]`` KV start offsets (packed keys, ``PAGED=False``) or ``[B]`` KV lengths
    (``PAGED=True``).
    """
    tile = num_m_tiles - 1 - tl.program_id(0)
    head0 = tl.program_id(1) * PACK
    b = tl.program_id(2)
    q_start = tl.load(q_starts_ptr + b).to(tl.int32)
    q_len = tl.load(q_starts_ptr + b + 1).to(tl.int32) - q_start
    m0 = tile * (BLOCK_M // PACK)  # first token of the tile
    if m0 >= q_len:
        return
    acc, l_i, m_i, rows, heads, m_mask = _attend(
        q_ptr, k_ptr, v_ptr, kv_ptr_lens, block_table_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, stride_sb, stride_st,
        stride_sh, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_tb,
        qk_scale, b, m0, head0, q_start, q_len, 0, 1,
        GROUP, PACK, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_M, BLOCK_N, PAGED, PAGE_SIZE, CAUSAL,
        DOT_PRECISION, WHILE_LOOP, QUANT, False)
    _store_rows(out_ptr, acc, l_i, rows, heads, m_mask, stride_ot, stride_oh, HEAD_DIM_V, BLOCK_DV)


@triton.jit
def _prefill_split_kernel(
    q_ptr, k_ptr, v_ptr, mid_o_ptr, mid_lse_ptr, q_starts_ptr, kv_ptr_lens, block_table_ptr,
    ks_ptr, kz_ptr, vs_ptr, vz_ptr, stride_sb, stride_st, stride_sh,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb,
    stride_ms, stride_mt, stride_ls, stride_lt,
    qk_scale, num_m_tiles, n_splits,
    GROUP: tl.constexpr, PACK: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr, QUANT: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One tile over one slice of its keys (``program_id(0) = split * num_m_tiles + reversed tile``): the
    normalized partial output ``[split, token, head, :]`` (fp32) and its base-2 log-sum-exp ``[split, token, head]``
    (``-inf`` for a row that sees no key of the slice) go to the scratch buffers, never to ``attn_output``."""
    pid = tl.program_id(0)
    split = pid // num_m_tiles
    tile = num_m_tiles - 1 - pid % num_m_tiles
    head0 = tl.program_id(1) * PACK
    b = tl.program_id(2)
    q_start = tl.load(q_starts_ptr + b).to(tl.int32)
    q_len = tl.load(q_starts_ptr + b + 1).to(tl.int32) - q_start
    m0 = tile * (BLOCK_M // PACK)
    if m0 >= q_len:
        return
    acc, l_i, m_i, rows, heads, m_mask = _attend(
        q_ptr, k_ptr, v_ptr, kv_ptr_lens, block_table_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, stride_sb, stride_st,
        stride_sh, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_tb,
        qk_scale, b, m0, head0, q_start, q_len, split, n_splits,
        GROUP, PACK, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_M, BLOCK_N, PAGED, PAGE_SIZE, CAUSAL,
        DOT_PRECISION, WHILE_LOOP, QUANT, True)
    _store_partials(mid_o_ptr, mid_lse_ptr, acc, l_i, m_i, rows, heads, m_mask, split, stride_ms, stride_mt,
                    stride_ls, stride_lt, HEAD_DIM_V, BLOCK_DV, USE_PDL)


@triton.jit
def _store_partials(mid_o_ptr, mid_lse_ptr, acc, l_i, m_i, rows, heads, m_mask, split, stride_ms, stride_mt,
                    stride_ls, stride_lt, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, USE_PDL: tl.constexpr):
    """A split program's normalized partial output ``[split, token, head, :]`` (fp32) and base-2 log-sum-exp
    ``[split, token, head]`` (``-inf`` for a row that saw no key of the slice) to the scratch buffers."""
    if USE_PDL:  # the combine kernel may launch now; it waits for this grid's stores before reading them
        tl.extra.cuda.gdc_launch_dependents()
    # A row that saw no key of the slice has l_i == 0 (a NaN l_i is not empty: its partial stays NaN).
    has = l_i != 0.0
    res = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    offs_dv = tl.arange(0, BLOCK_DV)
    split_o = split.to(tl.int64) * stride_ms
    row_o = rows * stride_mt + heads * HEAD_DIM_V  # scratch rows are contiguous [token, head, Dv]
    tl.store(mid_o_ptr + split_o + row_o[:, None] + offs_dv[None, :], res,
             mask=m_mask[:, None] & (offs_dv < HEAD_DIM_V)[None, :])
    tl.store(mid_lse_ptr + split.to(tl.int64) * stride_ls + rows * stride_lt + heads, lse, mask=m_mask)


@triton.jit
def _tma_tile(acc, l_i, m_i, q, n0, offs_m, kv_len, diag, row, k_desc, v_desc, k_col, v_col, qk_scale,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
              CLIPPED: tl.constexpr):
    """:func:`_prefill_tile` with the key and value tiles (keys ``[n0, n0 + BLOCK_N)``) brought in by TMA: rows
    from ``row`` of the 2-D ``[tokens, kv_heads * D]`` views, columns from ``k_col`` / ``v_col`` (the KV head). Rows
    past the sequence belong to the next one, to the rest of its cache page, or are zeros past the tensor: a masked
    tile hides their scores and zeroes their values (so a NaN or Inf there never reaches the accumulator), unless
    the descriptors are ``CLIPPED`` to the sequence (TMA then brings zeros there)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < kv_len
    k = k_desc.load([row, k_col])
    qk = tl.dot(q, k.T, input_precision=DOT_PRECISION)
    p, alpha, l_i, m_new = _softmax_step(qk, m_i, l_i, offs_m, offs_n, n_mask, diag, qk_scale, MASKED, CAUSAL)
    v = v_desc.load([row, v_col])
    if MASKED and not CLIPPED:
        v = tl.where(n_mask[:, None], v, 0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _tma_page(table_row, n0, kv_len, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """The cache page of the key tile at ``n0`` (paged; 0 past the sequence), else 0. The loops load it one tile
    ahead (see :func:`_tile_pages`)."""
    if PAGED:
        return tl.load(table_row + n0 // PAGE_SIZE, mask=n0 < kv_len, other=0).to(tl.int32)
    else:
        return tl.full([], 0, tl.int32)


@triton.jit
def _tma_attend(q_desc, k_desc, v_desc, kv_ptr_lens, block_table_ptr, stride_tb, qk_scale, b, m0, head0, q_start,
                q_len, split, n_splits, GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr,
                PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                WHILE_LOOP: tl.constexpr, SPLIT: tl.constexpr):
    """:func:`_attend` with TMA loads (host-side descriptors): the query tile as a ``[BLOCK_M // PACK, PACK, D]``
    box of the ``[T, Hq, D]`` query; key/value tiles as ``[BLOCK_N, D]`` boxes of the 2-D ``[T, Hkv * D]`` views of
    packed keys, or (``PAGED``) of the ``[blocks * PAGE_SIZE, Hkv * D]`` views of the caches, the tile at key
    ``n0`` from row ``page * PAGE_SIZE + n0 % PAGE_SIZE`` (a tile never crosses a page: ``PAGE_SIZE`` is a
    multiple of ``BLOCK_N``). Rows past the query sequence are the next sequence's tokens (or zeros past the
    tensor): never stored."""
    TOKENS: tl.constexpr = BLOCK_M // PACK
    if PAGED:
        kv_start = 0
        kv_len = tl.load(kv_ptr_lens + b).to(tl.int32)
    else:
        kv_start = tl.load(kv_ptr_lens + b).to(tl.int32)
        kv_len = tl.load(kv_ptr_lens + b + 1).to(tl.int32) - kv_start
    diag = kv_len - q_len
    offs_m, heads, m_mask = _tile_rows(m0, head0, q_len, BLOCK_M, PACK)
    rows = (q_start + offs_m).to(tl.int64)
    q = q_desc.load([q_start + m0, head0, 0]).reshape(BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], tl.float32)
    hi, full = _key_bounds(m0, kv_len, diag, TOKENS, BLOCK_N, CAUSAL)
    lo, full, hi = _slice(hi, full, split, n_splits, BLOCK_N, SPLIT)
    kvh = head0 // GROUP
    k_col = kvh * HEAD_DIM
    v_col = kvh * HEAD_DIM_V
    table_row = block_table_ptr + b.to(tl.int64) * stride_tb
    if WHILE_LOOP:  # the interpreter (numpy 2 refuses range() over its 1-element scalars)
        n0 = full * 0 + lo
        page = _tma_page(table_row, n0, kv_len, PAGED, PAGE_SIZE)
        while n0 < full:
            next_page = _tma_page(table_row, n0 + BLOCK_N, kv_len, PAGED, PAGE_SIZE)
            row = page * PAGE_SIZE + n0 % PAGE_SIZE if PAGED else kv_start + n0
            acc, l_i, m_i = _tma_tile(acc, l_i, m_i, q, n0, offs_m, kv_len, diag, row, k_desc, v_desc, k_col, v_col,
                                      qk_scale, BLOCK_N, False, CAUSAL, DOT_PRECISION, False)
            page = next_page
            n0 += BLOCK_N
        page = _tma_page(table_row, n0, kv_len, PAGED, PAGE_SIZE)
        while n0 < hi:
            next_page = _tma_page(table_row, n0 + BLOCK_N, kv_len, PAGED, PAGE_SIZE)
            row = page * PAGE_SIZE + n0 % PAGE_SIZE if PAGED else kv_start + n0
            acc, l_i, m_i = _tma_tile(acc, l_i, m_i, q, n0, offs_m, kv_len, diag, row, k_desc, v_desc, k_col, v_col,
                                      qk_scale, BLOCK_N, True, CAUSAL, DOT_PRECISION, False)
            page = next_page
            n0 += BLOCK_N
    else:
        page = _tma_page(table_row, lo, kv_len, PAGED, PAGE_SIZE)
        for n0 in tl.range(lo, full, BLOCK_N):
            next_page = _tma_page(table_row, n0 + BLOCK_N, kv_len, PAGED, PAGE_SIZE)
            row = page * PAGE_SIZE + n0 % PAGE_SIZE if PAGED else kv_start + n0
            acc, l_i, m_i = _tma_tile(acc, l_i, m_i, q, n0, offs_m, kv_len, diag, row, k_desc, v_desc, k_col, v_col,
                                      qk_scale, BLOCK_N, False, CAUSAL, DOT_PRECISION, False)
            page = next_page
        page = _tma_page(table_row, full, kv_len, PAGED, PAGE_SIZE)
        for n0 in tl.range(full, hi, BLOCK_N):
            next_page = _tma_page(table_row, n0 + BLOCK_N, kv_len, PAGED, PAGE_SIZE)
            row = page * PAGE_SIZE + n0 % PAGE_SIZE if PAGED else kv_start + n0
            acc, l_i, m_i = _tma_tile(acc, l_i, m_i, q, n0, offs_m, kv_len, diag, row, k_desc, v_desc, k_col, v_col,
                                      qk_scale, BLOCK_N, True, CAUSAL, DOT_PRECISION, False)
            page = next_page
    return acc, l_i, m_i, rows, heads, m_mask


@triton.jit
def _prefill_tma_kernel(
    q_desc, k_desc, v_desc, out_ptr, q_starts_ptr, kv_ptr_lens, block_table_ptr, stride_qt, stride_qh, stride_kt,
    stride_vt, stride_tb, stride_ot, stride_oh, qk_scale, num_m_tiles,
    GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """:func:`_prefill_kernel` (un-split) with tensor-descriptor (TMA) loads (:func:`_tma_attend`); power-of-two
    head sizes only.

    ``WARP_SPECIALIZE`` (packed keys only): the form Triton 3.6 warp-specializes on sm_90 (a producer warp group
    issuing the TMA copies, the tile's rows split between two consumer groups): ``q_desc``, ``k_desc``, ``v_desc``
    are the tensors' pointers, the key/value descriptors are made on the device per sequence (clipped to it: TMA
    brings zeros past its end), the query tile is a pointer load, and one branch-free loop walks every key tile the
    tile sees with the mask applied to each (its pass cannot take an early return, a second loop after the
    specialized one, or a branch inside it)."""
    tile = num_m_tiles - 1 - tl.program_id(0)
    head0 = tl.program_id(1) * PACK
    b = tl.program_id(2)
    q_start = tl.load(q_starts_ptr + b).to(tl.int32)
    q_len = tl.load(q_starts_ptr + b + 1).to(tl.int32) - q_start
    m0 = tile * (BLOCK_M // PACK)
    if WARP_SPECIALIZE:  # PACK == 1: the tile is BLOCK_M tokens of one head
        kv_start = tl.load(kv_ptr_lens + b).to(tl.int32)
        kv_len = tl.load(kv_ptr_lens + b + 1).to(tl.int32) - kv_start
        diag = kv_len - q_len
        offs_m, heads, m_mask = _tile_rows(m0, head0, q_len, BLOCK_M, PACK)
        rows = (q_start + offs_m).to(tl.int64)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_V], tl.float32)
        hi, full = _key_bounds(m0, kv_len, diag, BLOCK_M // PACK, BLOCK_N, CAUSAL)
        k_col = head0 // GROUP * HEAD_DIM
        v_col = head0 // GROUP * HEAD_DIM_V
        q_seq = tl.make_tensor_descriptor(q_desc + q_start.to(tl.int64) * stride_qt,
                                          [tl.maximum(q_len, 1), NUM_KV_HEADS * GROUP * HEAD_DIM], [stride_qt, 1],
                                          [BLOCK_M, HEAD_DIM])
        q = q_seq.load([m0, head0 * HEAD_DIM])
        hi = tl.where(m0 < q_len, hi, 0)  # a tile past its sequence visits no key (and stores nothing)
        seq_rows = tl.maximum(kv_len, 1)
        k_seq = tl.make_tensor_descriptor(k_desc + kv_start.to(tl.int64) * stride_kt,
                                          [seq_rows, NUM_KV_HEADS * HEAD_DIM], [stride_kt, 1], [BLOCK_N, HEAD_DIM])
        v_seq = tl.make_tensor_descriptor(v_desc + kv_start.to(tl.int64) * stride_vt,
                                          [seq_rows, NUM_KV_HEADS * HEAD_DIM_V], [stride_vt, 1],
                                          [BLOCK_N, HEAD_DIM_V])
        if WHILE_LOOP:
            n0 = hi * 0
            while n0 < hi:
                acc, l_i, m_i = _tma_tile(acc, l_i, m_i, q, n0, offs_m, kv_len, diag, n0, k_seq, v_seq, k_col, v_col,
                                          qk_scale, BLOCK_N, True, CAUSAL, DOT_PRECISION, True)
                n0 += BLOCK_N
        else:
            for n0 in tl.range(0, hi, BLOCK_N, warp_specialize=True):
                acc, l_i, m_i = _tma_tile(acc, l_i, m_i, q, n0, offs_m, kv_len, diag, n0, k_seq, v_seq, k_col, v_col,
                                          qk_scale, BLOCK_N, True, CAUSAL, DOT_PRECISION, True)
    else:
        if m0 >= q_len:
            return
        acc, l_i, m_i, rows, heads, m_mask = _tma_attend(
            q_desc, k_desc, v_desc, kv_ptr_lens, block_table_ptr, stride_tb, qk_scale, b, m0, head0, q_start, q_len,
            0, 1, GROUP, PACK, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, PAGED, PAGE_SIZE, CAUSAL, DOT_PRECISION,
            WHILE_LOOP, False)
    _store_rows(out_ptr, acc, l_i, rows, heads, m_mask, stride_ot, stride_oh, HEAD_DIM_V, HEAD_DIM_V)


@triton.jit
def _prefill_tma_split_kernel(
    q_desc, k_desc, v_desc, mid_o_ptr, mid_lse_ptr, q_starts_ptr, kv_ptr_lens, block_table_ptr, stride_tb,
    stride_ms, stride_mt, stride_ls, stride_lt, qk_scale, num_m_tiles, n_splits,
    GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr, USE_PDL: tl.constexpr,
):
    """:func:`_prefill_split_kernel` with TMA loads (:func:`_tma_attend`): one tile over one slice of its keys, its
    partials to the scratch buffers (``program_id(0) = split * num_m_tiles + reversed tile``)."""
    pid = tl.program_id(0)
    split = pid // num_m_tiles
    tile = num_m_tiles - 1 - pid % num_m_tiles
    head0 = tl.program_id(1) * PACK
    b = tl.program_id(2)
    q_start = tl.load(q_starts_ptr + b).to(tl.int32)
    q_len = tl.load(q_starts_ptr + b + 1).to(tl.int32) - q_start
    m0 = tile * (BLOCK_M // PACK)
    if m0 >= q_len:
        return
    acc, l_i, m_i, rows, heads, m_mask = _tma_attend(
        q_desc, k_desc, v_desc, kv_ptr_lens, block_table_ptr, stride_tb, qk_scale, b, m0, head0, q_start, q_len,
        split, n_splits, GROUP, PACK, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, PAGED, PAGE_SIZE, CAUSAL,
        DOT_PRECISION, WHILE_LOOP, True)
    _store_partials(mid_o_ptr, mid_lse_ptr, acc, l_i, m_i, rows, heads, m_mask, split, stride_ms, stride_mt,
                    stride_ls, stride_lt, HEAD_DIM_V, HEAD_DIM_V, USE_PDL)


@triton.jit
def _combine_split(acc, l_i, m_i, mid_o_ptr, mid_lse_ptr, s, stride_ms, stride_ls, offs_r, r_mask, offs_dv, dv_mask,
                   HEAD_DIM_V: tl.constexpr):
    """Fold split ``s``'s partials of the rows into a running log-sum-exp merge."""
    lse = tl.load(mid_lse_ptr + s.to(tl.int64) * stride_ls + offs_r, mask=r_mask, other=float("-inf"))
    live = lse != float("-inf")  # a NaN partial is live: the merged row is NaN, never the other splits'
    part = tl.load(mid_o_ptr + s.to(tl.int64) * stride_ms + offs_r[:, None] * HEAD_DIM_V + offs_dv[None, :],
                   mask=live[:, None] & dv_mask[None, :], other=0.0)
    m_new = tl.maximum(m_i, lse)
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows with no live split yet stay empty
    alpha = tl.math.exp2(m_i - m_use)
    weight = tl.where(live, tl.math.exp2(lse - m_use), 0.0)
    return acc * alpha[:, None] + weight[:, None] * part, l_i * alpha + weight, m_new


@triton.jit
def _prefill_combine_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr, q_starts_ptr, batch, n_splits,
    stride_ms, stride_ls, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr,
    WHILE_LOOP: tl.constexpr, USE_PDL: tl.constexpr,
):
    """``BLOCK_R`` consecutive (token, head) rows: the splits' partials merged with weights
    ``2^(lse_s - max lse)``; empty partials (``-inf``) weigh 0 and a row no split saw gives zeros. Rows of tokens
    past ``cu_seqlens_q[-1]`` are never read or written."""
    if USE_PDL:  # launched early (programmatic dependent launch): wait for the split kernel's partials
        tl.extra.cuda.gdc_wait()
    total = tl.load(q_starts_ptr + batch).to(tl.int64) * NUM_HEADS
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < total
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < HEAD_DIM_V
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    if WHILE_LOOP:  # the interpreter
        s = n_splits * 0
        while s < n_splits:
            acc, l_i, m_i = _combine_split(acc, l_i, m_i, mid_o_ptr, mid_lse_ptr, s, stride_ms, stride_ls, offs_r,
                                           r_mask, offs_dv, dv_mask, HEAD_DIM_V)
            s += 1
    else:
        for s in range(0, n_splits):
            acc, l_i, m_i = _combine_split(acc, l_i, m_i, mid_o_ptr, mid_lse_ptr, s, stride_ms, stride_ls, offs_r,
                                           r_mask, offs_dv, dv_mask, HEAD_DIM_V)
    res = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    token = offs_r // NUM_HEADS
    head = offs_r % NUM_HEADS
    tl.store(out_ptr + (token * stride_ot + head * stride_oh)[:, None] + offs_dv[None, :],
             res.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & dv_mask[None, :])


def _pack(cfg: PrefillConfig, group: int) -> int:
    """Query heads per program: the whole GQA group, when it is a power of two that leaves a tile enough tokens
    (never in the warp-specialized TMA kernel: its tile is one head's tokens)."""
    if (cfg.pack_gqa and not (cfg.tma and cfg.warp_specialize) and group > 1 and group & (group - 1) == 0
            and cfg.block_m // group >= cfg.pack_min_tokens):
        return group
    return 1


# Value tiles are at least this wide where the key tiles are (16-wide values under 16-wide keys keep theirs: they
# pass). 16-wide value tiles under 32-wide key tiles (head size 24 or 32, value size 16) gave wrong outputs and
# illegal memory accesses on an H100 with Triton 3.6 wherever a tile had 64+ query rows and 64+ keys (paged prefill
# over 8-bit, 4-bit and unquantized caches, split or not, with or without pipelining, 4 or 8 warps), while the same
# cases with 32-wide values passed under every tile config: masked 32-wide tiles serve them. The interpreter runs
# the same tiles, so the CPU tests check the masked columns.
MIN_BLOCK_DV = 32


@memo
def _meta(group: int, pack: int, head_size: int, head_size_v: int, block_m: int, block_n: int, num_warps: int,
          num_stages: int, paged: bool, page_size: int, causal: bool, dot_precision: str, while_loop: bool,
          quant_bits: int) -> dict:
    """The compile-time arguments of the prefill and split kernels, built once per shape (a shared dict: read it,
    never change it); building it on every call cost ~1-2 us of host time."""
    block_d = next_power_of_2(head_size)
    block_dv = max(next_power_of_2(head_size_v), min(block_d, MIN_BLOCK_DV))  # see MIN_BLOCK_DV
    return dict(GROUP=group, PACK=pack, HEAD_DIM=head_size, BLOCK_D=block_d,
                HEAD_DIM_V=head_size_v, BLOCK_DV=block_dv, BLOCK_M=block_m, BLOCK_N=block_n,
                PAGED=paged, PAGE_SIZE=page_size, CAUSAL=causal, DOT_PRECISION=dot_precision, WHILE_LOOP=while_loop,
                QUANT=quant_bits, num_warps=num_warps, num_stages=num_stages)


@memo
def _tma_meta(group: int, pack: int, head_size: int, head_size_v: int, num_kv_heads: int, block_m: int, block_n: int,
              num_warps: int, num_stages: int, paged: bool, page_size: int, causal: bool, dot_precision: str,
              while_loop: bool, warp_specialize: bool, split: bool) -> dict:
    """The compile-time arguments of :func:`_prefill_tma_kernel` (``split``: of :func:`_prefill_tma_split_kernel`,
    which has no ``NUM_KV_HEADS`` / ``WARP_SPECIALIZE``); a shared dict: read it, never change it."""
    meta = dict(GROUP=group, PACK=pack, HEAD_DIM=head_size, HEAD_DIM_V=head_size_v, BLOCK_M=block_m, BLOCK_N=block_n,
                PAGED=paged, PAGE_SIZE=page_size, CAUSAL=causal, DOT_PRECISION=dot_precision, WHILE_LOOP=while_loop,
                num_warps=num_warps, num_stages=num_stages)
    if not split:
        meta.update(NUM_KV_HEADS=num_kv_heads, WARP_SPECIALIZE=warp_specialize)
    return meta


def _device_scratch(device: torch.device):
    """An allocator for the global scratch of on-device tensor descriptors (Triton calls it at launch; a CUDA graph
    being captured takes it from its own pool)."""
    return lambda size, alignment, stream: torch.empty(size, dtype=torch.uint8, device=device)


def _tma_applies(query, key, value, page_size: int = 0) -> bool:
    """Whether the TMA kernels take these tensors (else the pointer kernels run): 16-bit inputs (fp32's tf32x3 dots
    spill registers with TMA tiles on sm_90), head sizes 64 / 128 (256 stays on the pointer path), K/V heads
    contiguous, sm_90+, layouts TMA can address: packed ``[T, Hkv, D]`` keys/values as 2-D ``[T, Hkv * D]`` views,
    or (``page_size``, paged prefill) ``[blocks, page_size, Hkv, D]`` caches whose pages follow each other row by
    row, as 2-D ``[blocks * page_size, Hkv * D]`` views. Asked on every call (its host cost counts): plain int and
    tuple tests, the cheapest first."""
    d, dv = query.shape[2], value.shape[-1]
    if d not in (64, 128) or dv not in (64, 128) or key.shape[-1] != d or query.dtype is torch.float32:
        return False
    if query.is_cuda and capability(query.get_device()) < 9:
        return False
    # TMA: 16-byte aligned bases, the last dimension contiguous, the other strides multiples of 16 bytes, a row.
    sq0, sq1, sq2 = query.stride()
    if page_size:
        (sk0, sk1, sk2, sk3), (sv0, sv1, sv2, sv3) = key.stride(), value.stride()
        if sk0 != page_size * sk1 or sv0 != page_size * sv1 or sk2 != d or sv2 != dv or sk3 != 1 or sv3 != 1:
            return False
        sk0, sv0 = sk1, sv1  # the row strides of the 2-D views
    else:
        (sk0, sk1, sk2), (sv0, sv1, sv2) = key.stride(), value.stride()
        if sk1 != d or sv1 != dv or sk2 != 1 or sv2 != 1:
            return False
    align = 16 // query.element_size()
    return not (sq2 != 1 or not key.shape[0] or not value.shape[0] or (sq0 | sq1 | sk0 | sv0) % align
                or (query.data_ptr() | key.data_ptr() | value.data_ptr()) % 16)


# A TensorDescriptor's fields with defaults (padding, ...), set on the descriptors _descriptor builds.
_DESCRIPTOR_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TensorDescriptor)
                        if f.default is not dataclasses.MISSING}


@functools.lru_cache(maxsize=64)
def _valid_boxes(*boxes: tuple) -> bool:
    """Triton's own block-shape rule (raises where a box is not one TMA can copy), once per set of box shapes."""
    for box in boxes:
        validate_block_shape(list(box))
    return True


def _descriptor(base, shape, strides, block_shape) -> TensorDescriptor:
    """A ``TensorDescriptor`` without its per-call validation (~1 us each on a 2-core CPU): :func:`_tma_applies`
    has checked the base alignment, unit last stride and 16-byte strides, and :func:`_valid_boxes` the box (a
    Triton without ``validate_block_shape``: the descriptor validates itself)."""
    if validate_block_shape is None:
        return TensorDescriptor(base, shape, strides, block_shape)
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(_DESCRIPTOR_DEFAULTS, base=base, shape=shape, strides=strides, block_shape=block_shape)
    return desc


def _tma_descriptors(query, key, value, tokens: int, pack: int, block_n: int):
    """Host-side tensor descriptors of the query (``[T, Hq, D]``, box ``[tokens, pack, D]``) and of the keys and
    values as 2-D views (box ``[block_n, D]``): ``[T, Hkv * D]`` of packed ones, ``[blocks * page_size, Hkv * D]``
    of paged caches (``[blocks, page_size, Hkv, D]``, pages row after row: :func:`_tma_applies`). The launcher
    encodes each (``cuTensorMapEncodeTiled``) on every call and passes it by value, so a CUDA graph captures it with
    the launch."""
    (t, hq, d), hk, dv = query.shape, key.shape[-2], value.shape[-1]
    if key.dim() == 3:
        k_rows, v_rows = key.shape[0], value.shape[0]
    else:  # paged: blocks * page_size
        k_rows, v_rows = key.shape[0] * key.shape[1], value.shape[0] * value.shape[1]
    if validate_block_shape is not None:
        _valid_boxes((tokens, pack, d), (block_n, d), (block_n, dv))
    return (_descriptor(query, [t, hq, d], [query.stride(0), query.stride(1), 1], [tokens, pack, d]),
            _descriptor(key, [k_rows, hk * d], [key.stride(-3), 1], [block_n, d]),
            _descriptor(value, [v_rows, hk * dv], [value.stride(-3), 1], [block_n, dv]))


# The library route (see the module docstring). The devices and SDPA backends it asks torch for: CUDA and cuDNN;
# the CPU tests add "cpu" and swap in the math backend to run the route's own logic on CPU tensors.
_SDPA_DEVICES = ("cuda",)
_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION]  # a list: what sdpa_kernel takes
_SDPA_HEAD_SIZES = (64, 128)  # measured; torch's cuDNN rule: a multiple of 8 up to 128 (256 on sm_90, cuDNN 9.10+)
_SDPA_DTYPES = (torch.float16, torch.bfloat16)
_SDPA_REFUSED: set = set()  # (dtype, Hq, Hk, D, causal) SDPA raised on: never tried again


def _sdpa(query, key, value, out, q_starts, batch: int, seq_len: int, softmax_scale: float, causal: bool) -> bool:
    """Serve a uniform batch (``batch`` sequences of ``seq_len`` queries and keys, packed with no padding) from
    torch's SDPA on ``_SDPA_BACKENDS``; False (nothing written) where the route does not apply or SDPA raised.
    Host checks only (shapes, dtype, device, the capture state), except with value checks on
    (``DLINFER_CHECK=1``): then the start offsets ``q_starts`` are read (a sync) and a batch whose offsets are
    not ``0, seq_len, 2 seq_len, ...`` (padding rows after the last sequence) goes to the Triton kernel."""
    num_q_heads, head_size = query.shape[1], query.shape[2]
    num_kv_heads = key.shape[1]
    refused = (query.dtype, num_q_heads, num_kv_heads, head_size, causal)
    if (query.device.type not in _SDPA_DEVICES or query.dtype not in _SDPA_DTYPES or head_size not in _SDPA_HEAD_SIZES
            or value.shape[2] != head_size or seq_len < 2 or refused in _SDPA_REFUSED
            or torch.cuda.is_current_stream_capturing()):
        return False
    if settings.check_values():
        starts = torch.arange(0, batch + 1, device=q_starts.device, dtype=torch.int64) * seq_len
        if not torch.equal(q_starts.to(torch.int64), starts):
            return False
    # [T, H, D] -> [B, S, H, D] -> [B, H, S, D]: views (splitting the token dimension works for any stride)
    q, k, v = (t.unflatten(0, (batch, seq_len)).transpose(1, 2) for t in (query, key, value))
    try:
        with sdpa_kernel(_SDPA_BACKENDS):
            res = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale,
                                                 enable_gqa=num_q_heads != num_kv_heads)
    except RuntimeError as exc:
        _SDPA_REFUSED.add(refused)
        backends = ", ".join(b.name for b in _SDPA_BACKENDS)
        logger.warning("triton prefill_attention: torch SDPA (%s) refused %s, %d/%d heads, head size %d, causal %s "
                       "(%s: %s); the Triton kernel serves these calls", backends, query.dtype, num_q_heads,
                       num_kv_heads, head_size, causal, type(exc).__name__, str(exc)[:200])
        return False
    out.unflatten(0, (batch, seq_len)).copy_(res.transpose(1, 2))
    return True


def _launch(query, key, value, out, q_starts, kv_arg, block_table, paged: bool, page_size: int, max_q_seq_len: int,
            max_kv_seq_len: int, softmax_scale: float, causal: bool, quant=(0, (), ()),
            same_offsets: bool = False) -> None:
    """``same_offsets``: ``prefill_attention`` with one offsets tensor for queries and keys; with ``T == Tk == batch
    * max_q_seq_len`` too (every sequence ``max_q_seq_len`` long) the library route may serve it (``cfg.sdpa``).
    Host cost counts here (eager prefill): device facts from ``is_cuda`` / ``get_device()`` (``device.type`` costs
    more), strides read only by the kernel that needs them."""
    tokens, num_q_heads, head_size = query.shape
    quant_bits, kv_scales, kv_zeros = quant
    num_kv_heads, head_size_v = key.shape[-2], value.shape[-1] * (2 if quant_bits == 4 else 1)
    batch = q_starts.shape[0] - 1
    if tokens == 0 or batch == 0 or max_q_seq_len == 0 or num_q_heads == 0:
        return
    device_type = "cuda" if query.is_cuda else query.device.type
    interpret = device_type == "cpu"
    index = max(query.get_device(), 0)
    long_queries = max_q_seq_len >= LONG_QUERIES
    if paged:  # a key tile of the TMA kernels never crosses a cache page
        # the TMA default where its GPU time repays its host time; the layout test (~2 us) only there
        tma_ok = (not quant_bits and tokens * max_kv_seq_len >= TMA_MIN_PAIRS and not page_size % HOPPER_TMA.block_n
                  and _tma_applies(query, key, value, page_size))
        large = long_queries or (max_q_seq_len >= CHUNK_MIN_QUERIES and max_kv_seq_len >= LONG_HISTORY)
        cfg = _config(device_type, query.dtype, head_size, head_size_v, large, index, tma_ok, True)
        if cfg.tma:  # the default's tiles, or an override's (tma=1 asks for the TMA kernel on any call)
            tma_ok = (not quant_bits and not page_size % cfg.block_n
                      and (tma_ok or _tma_applies(query, key, value, page_size)))
    else:  # a call the TMA kernel takes, large enough to repay its host time, gets the Hopper default tiles
        big = tokens >= TMA_MIN_TOKENS
        tma_ok = big and _tma_applies(query, key, value)  # the layout test (~2 us) only where it can matter
        cfg = _config(device_type, query.dtype, head_size, head_size_v, long_queries, index, tma_ok)
        if cfg.tma and not big:  # an override (tma=1) asks for the TMA kernel on a smaller call
            tma_ok = _tma_applies(query, key, value)
    if (same_offsets and cfg.sdpa and tokens == key.shape[0] == batch * max_q_seq_len
            and _sdpa(query, key, value, out, q_starts, batch, max_q_seq_len, softmax_scale, causal)):
        return
    group = num_q_heads // num_kv_heads
    pack = _pack(cfg, group)
    num_m_tiles = cdiv(max_q_seq_len, cfg.block_m // pack)
    grid_heads = num_q_heads // pack
    splits = num_splits(num_m_tiles * grid_heads * batch, max_kv_seq_len, cfg)
    ws = cfg.warp_specialize
    # split grids: only with tma_split; warp specialization: un-split packed keys only
    tma = cfg.tma and tma_ok and (splits == 1 or (cfg.tma_split and not ws)) and not (ws and paged)
    grid = (num_m_tiles * splits, grid_heads, batch)
    table_stride = block_table.stride()[0] if paged else 0
    if tma:
        descs = (query, key, value) if ws else _tma_descriptors(query, key, value, cfg.block_m // pack, pack,
                                                                 cfg.block_n)
        meta = _tma_meta(group, pack, head_size, head_size_v, num_kv_heads, cfg.block_m, cfg.block_n, cfg.num_warps,
                         cfg.num_stages, paged, page_size, causal, _dot_precision(query), interpret, ws, splits > 1)
    else:
        ks, kz, vs, vz, s_strides = quant_scales(key, kv_scales, kv_zeros, quant_bits)
        sk, sv = key.stride(), value.stride()
        # (block, token, head) strides of the caches; packed keys have no block stride
        kv_strides = (*sk[:3], *sv[:3]) if paged else (0, sk[0], sk[1], 0, sv[0], sv[1])
        inputs = (ks, kz, vs, vz, *s_strides, *query.stride()[:2], *kv_strides, table_stride)
        meta = _meta(group, pack, head_size, head_size_v, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
                     paged, page_size, causal, _dot_precision(query), interpret, quant_bits)
    scale = softmax_scale * LOG2E
    if splits == 1 and tma:
        launch = _prefill_tma_kernel[grid]
        args = (*descs, out, q_starts, kv_arg, block_table, *query.stride()[:2], key.stride(-3), value.stride(-3),
                table_stride, *out.stride()[:2], scale, num_m_tiles)
        if not ws or device_type != "cuda":
            launch(*args, **meta)
            return
        # On-device descriptors need a global scratch: Triton's allocator, set for this launch only (a ContextVar)
        token = _allocation._allocator.set(_device_scratch(query.device))
        try:
            launch(*args, **meta)
        finally:
            _allocation._allocator.reset(token)
        return
    if splits == 1:
        _prefill_kernel[grid](query, key, value, out, q_starts, kv_arg, block_table, *inputs, *out.stride()[:2], scale,
                              num_m_tiles, **meta)
        return
    # fp32 partial outputs [splits, T, Hq, Dv] and log-sum-exps [splits, T, Hq], contiguous; from shapes only.
    device = query.device
    mid_o = torch.empty((splits, tokens, num_q_heads, head_size_v), dtype=torch.float32, device=device)
    mid_lse = torch.empty((splits, tokens, num_q_heads), dtype=torch.float32, device=device)
    pdl = cfg.pdl and has_pdl(device_type, device.index)
    mid_strides = (mid_o.stride(0), mid_o.stride(1), mid_lse.stride(0), mid_lse.stride(1))
    if tma:
        _prefill_tma_split_kernel[grid](*descs, mid_o, mid_lse, q_starts, kv_arg, block_table, table_stride,
                                        *mid_strides, scale, num_m_tiles, splits, USE_PDL=pdl, **meta)
    else:
        _prefill_split_kernel[grid](query, key, value, mid_o, mid_lse, q_starts, kv_arg, block_table, *inputs,
                                    *mid_strides, scale, num_m_tiles, splits, USE_PDL=pdl, **meta)
    _prefill_combine_kernel[(cdiv(tokens * num_q_heads, cfg.combine_rows),)](
        mid_o, mid_lse, out, q_starts, batch, splits, mid_o.stride(0), mid_lse.stride(0), *out.stride()[:2],
        NUM_HEADS=num_q_heads, HEAD_DIM_V=head_size_v, BLOCK_DV=next_power_of_2(head_size_v),
        BLOCK_R=cfg.combine_rows, WHILE_LOOP=interpret, USE_PDL=pdl, num_warps=cfg.combine_warps,
        num_stages=2, **({"launch_pdl": True} if pdl else {}))


def prefill_attention(query, key, value, cu_seqlens_q, cu_seqlens_kv, max_q_seq_len, softmax_scale, causal,
                      attn_output) -> None:
    same = cu_seqlens_kv is cu_seqlens_q
    # The KV length bound (host int) for the split rule: max_q_seq_len when keys are partitioned like the queries,
    # else the packed key count (this op's signature has no KV bound).
    _launch(query, key, value, attn_output, cu_seqlens_q, cu_seqlens_kv, cu_seqlens_q, False, 1, max_q_seq_len,
            max_q_seq_len if same else key.shape[0], softmax_scale, causal, same_offsets=same)


def paged_prefill_attention(query, key_cache, value_cache, block_table, cu_seqlens_q, kv_seqlens, max_q_seq_len,
                            max_kv_seq_len, softmax_scale, causal, attn_output, kv_scales=(), kv_zeros=(),
                            quant_bits=0) -> None:
    _launch(query, key_cache, value_cache, attn_output, cu_seqlens_q, kv_seqlens, block_table, True,
            key_cache.shape[1], max_q_seq_len, max_kv_seq_len, softmax_scale, causal, (quant_bits, kv_scales, kv_zeros))


OPS = {"prefill_attention": prefill_attention, "paged_prefill_attention": paged_prefill_attention}

_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

CAPABILITIES = {
    "prefill_attention": Capabilities(dtypes=_DTYPES, head_sizes=HEAD_SIZES, features=frozenset({"non_causal"})),
    "paged_prefill_attention": Capabilities(
        dtypes=_DTYPES, head_sizes=HEAD_SIZES, block_sizes=BLOCK_SIZES,
        features=frozenset({"strided_cache", "non_causal", "kv_quant", "kv_quant4"})),
}


__all__ = ["OPS", "CAPABILITIES", "prefill_attention", "paged_prefill_attention", "PrefillConfig", "num_splits",
           "resident_programs", "shared_memory"]
