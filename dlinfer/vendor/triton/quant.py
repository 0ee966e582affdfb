"""Quantized linear family in Triton: AWQ W4A16 GEMM (4-bit weights dequantized in the kernel, tile by tile), int8
GEMM (``tl.dot`` on int8 with int32 accumulation, the per-token/per-channel scales and biases in the epilogue), both
with per-M-bucket launch configs and a split of K for grids too small to fill the GPU (see "dense GEMMs" below),
one row kernel for per-token quantization with optional residual add and RMS norm fused in front, and the W8A8
experts (``fused_moe_w8a8``: fused_moe's expert-sorted grouped GEMM on int8 operands; see its section below).

The reduction length ``K`` is a compile-time constant of the dense GEMMs (a model has a few: hidden and
intermediate sizes), which also keeps Triton's interpreter, where ``range()`` over a runtime scalar fails under
numpy 2, working; the expert GEMMs loop with ``while`` under the interpreter instead, as fused_moe's do.

Rounding is to nearest, ties to even (as ``torch.round``), of correctly rounded float32 quotients (``div_rn``), so
the quantized values equal the reference's whenever both quantize the same float32 values.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from dlinfer.vendor.triton import moe as _moe
from dlinfer.vendor.triton import tuning
from dlinfer.vendor.triton.attention_decode import env_overrides
from dlinfer.vendor.triton.host import card, cdiv, has_pdl, memo, next_power_of_2, resident_programs, sm_count


@triton.jit
def _round_half_even(y):
    r = tl.floor(y + 0.5)
    tie_odd = ((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
    return tl.where(tie_odd, r - 1.0, r)


@triton.jit
def _quantize_rows(y, amax):
    """Symmetric int8 quantization of the float32 rows ``y`` with their absolute maxima ``amax``: ``(q, scale)``,
    as the reference's ``quantize_per_token`` (``scale = amax / 127``, ``1 / 127`` for an all-zero row,
    ``q = round(y / scale)``). Both quotients are correctly rounded (``div_rn``: Triton's ``/`` on float32 is an
    approximate division on the GPU), so ``q`` equals the reference's for the same ``y``."""
    scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32)), 1.0 / 127.0)
    q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(y, scale)), -127.0), 127.0)
    return q, scale


@triton.jit
def _round_to_bf16(x):
    """``x`` (float32) rounded to the nearest bfloat16 value, ties to even, still float32, so that a cast to
    bfloat16 after it is exact (Triton's interpreter would truncate); finite values only (NaN/Inf keep their
    class)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


# ----------------------------------------------------------------------------------------------- dense GEMMs
# Launch configs of the two dense GEMMs (AWQ W4A16 and int8 W8A8), chosen per M bucket in one function each
# (:func:`awq_config`, :func:`int8_config`: the one place to tune them) and overridable for sweeps:
# ``DLINFER_TRITON_AWQ="block_n=256,split_k=4"`` / ``DLINFER_TRITON_W8A8="..."`` (fields of :class:`GemmConfig`),
# read when a config is first built (once per shape bucket per process); benchmarks/tune_quant.py passes
# configs directly. Chosen from first principles (below), then timed against LMDeploy's kernels on an H200
# (benchmarks/tune_quant.py, Llama-3-8B's linears): AWQ on Hopper takes the swept tiles noted in awq_config; from
# DEQUANT_MIN_M rows every card dequantizes for torch's GEMM; other cards' tiles stay first-principles (untimed).
# Every default config compiles for sm_90 within its shared memory (tests/triton/test_quant.py).
#
# * Decode (M <= 64): the weights are streamed once (int4: N * K / 2 bytes; int8: N * K), 128 columns a program
#   (64-byte AWQ rows / 128-byte int8 rows per K step). A grid of fewer programs than SMs leaves SMs (and their
#   share of the memory bandwidth) idle, so then K is split (:func:`split_k_for`) until the grid holds about two
#   programs per SM, each split at least MIN_SPLIT_K long, and the float32/int32 partials (split x M x N) never
#   more bytes than the weights, and never past the programs the card runs at once (a second wave of a few
#   programs costs a whole program's time: H200, AWQ down_proj at T=256, 256 x 64 tiles: 5 splits = 1.2 waves
#   106 us, 3 splits 91 us); a second launch sums the partials in a fixed order (deterministic, no atomics,
#   no host sync: the workspace is sized from shapes, so CUDA graphs capture it) and applies the epilogue (on
#   sm_90+ launched early by programmatic dependent launch, as the split decode attention's reduce). A grid
#   already >= one wave is never split (except where an H200 sweep measured better: the wide-N Hopper configs in
#   awq_config). int8: BLOCK_M = M rounded up to a power of two (>= 16, the smallest MMA),
#   so one program reads each weight tile once. AWQ: the dequantization's instruction count, not the MMAs, bounds
#   a decode step (SASS of the loop, ptxas for sm_90a, per weight element: 4.3 instructions with 64-row wgmma
#   tiles, 5.3 with 16 rows, 6.7 with 32; at 4 warps, 128 x 128 x 128 tiles; the old kernel's 16 x 64 x 32: 28.6):
#   64-row tiles for every M <= 64, rows past M masked (no traffic).
# * Prefill (M > 64): 128-row tiles (wgmma, 8 warps), grouped program order (GROUP_M row tiles sweep the columns
#   together: the weight tiles they share stay in L2). AWQ: 128 x 128 tiles, BLOCK_K 64 (74 KB of shared memory
#   and 128 registers a thread: two programs per SM, one dequantizing while the other's MMAs run); int8:
#   128 x 256 x 128 (3 stages, 144 KB) when that grid is at least one wave, else 128 x 128 x 128 (4 stages);
#   on Hopper at 257-1024 rows the swept tiles of int8_config, with ``tma=1`` (operands by TMA instead of
#   cp.async: 10-13 % faster on the same tiles in an H100 sweep; elsewhere off).
# Against the old 64 x 64 (16 x 64 decode) tiles: wider tiles only where the grid stays >= one wave or is split
# back up to >= 2 programs per SM, so no default has fewer active SMs than before.
@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int  # AWQ: capped at the group size (a K tile lies inside one quantization group)
    split_k: int = 0  # 0: by the rule (split_k_for); 1: no split
    group_m: int = 8  # grouped program order (row tiles per group)
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 0  # the split rule's target grid; 0: 2 x SM count
    tma: int = 0  # int8 GEMM: 1 reads both operands by TMA (Hopper tensor descriptors; default at 257-1024 rows)
    pdl: int = 1  # split K on sm_90+: the reduce kernel launched early (programmatic dependent launch)
    dequant: int = 0  # AWQ: 1 dequantizes the weights into a [K, N] workspace and runs torch's GEMM (cuBLAS)
    gemv: int = 0  # AWQ: 1 serves calls of <= GEMV_MAX_ROWS rows by the FMA kernel (no MMA; untimed: sweeps only)


MIN_SPLIT_K = 512  # K elements per split at least (4 K tiles of 128: the pipeline has something to overlap)
MAX_SPLIT_K = 16
CPU_SM_COUNT = 4  # the interpreter's stand-in SM count (small grids split, as they would on a GPU)


def _sm_count(device_type: str, device_index) -> int:
    return sm_count(device_index) if device_type == "cuda" else CPU_SM_COUNT


def _use_pdl(cfg: GemmConfig, device: torch.device) -> bool:
    return bool(cfg.pdl) and cfg.split_k > 1 and has_pdl(device.type, device.index)


def split_k_for(tiles: int, k: int, block_k: int, m: int, weight_bytes_per_k: float, sm_count: int,
                target_programs: int = 0, resident: int = 0) -> int:
    """Splits of K for a grid of ``tiles`` output tiles: 1 when the grid is at least one wave; else enough for
    ``target_programs`` (default 2 x ``sm_count``) programs, each >= MIN_SPLIT_K of K (whole ``block_k`` tiles),
    with partials (4 bytes x ``m`` rows per split and column) no larger than the weights (``weight_bytes_per_k``
    x ``k`` per column), at most MAX_SPLIT_K; every split non-empty. ``resident`` > 0 (the programs the card
    runs at once, :func:`_resident`) and the default target: never more programs than that, so no second,
    mostly idle wave follows the first (its programs would cost a whole program's time for a sliver of the work)."""
    k_tiles = cdiv(k, block_k)
    if tiles >= sm_count or k_tiles < 2:
        return 1
    want = cdiv(target_programs or 2 * sm_count, tiles)
    if resident > 0 and not target_programs:
        want = min(want, max(1, resident // tiles))
    by_length = k_tiles // max(1, MIN_SPLIT_K // block_k)
    by_traffic = int(weight_bytes_per_k * k) // (4 * max(m, 1))
    split = max(1, min(want, by_length, by_traffic, MAX_SPLIT_K, k_tiles))
    return cdiv(k_tiles, cdiv(k_tiles, split))  # no empty split


def awq_shared_memory(cfg: GemmConfig, itemsize: int = 2) -> int:
    """Shared memory of an AWQ GEMM program on sm_90, an upper bound (within 35 % of what Triton 3.6 allocates
    for the default tiles: tests/triton/test_quant.py): ``num_stages`` activation tiles and packed-word tiles
    and the dequantized weight tile the MMA reads, or the float32 accumulator tile the epilogue passes through
    shared memory, whichever is larger (the two are not live at once)."""
    loop = (cfg.num_stages * (cfg.block_m * cfg.block_k * itemsize + cfg.block_k * cfg.block_n // 2)
            + cfg.block_k * cfg.block_n * itemsize)
    return max(loop, cfg.block_m * cfg.block_n * 4)


def int8_shared_memory(cfg: GemmConfig) -> int:
    """Shared memory of an int8 GEMM program on sm_90, an upper bound (within 35 % of what Triton 3.6 allocates
    for the default tiles: tests/triton/test_quant.py): ``num_stages`` tiles of both operands (one byte per
    element) or the int32 accumulator tile the epilogue passes through shared memory, whichever is larger, plus
    the TMA path's barriers (8 bytes a stage)."""
    loop = cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k
    return max(loop, cfg.block_m * cfg.block_n * 4) + 8 * cfg.num_stages


def _checked(cfg: GemmConfig, source: str, min_block_k: int) -> GemmConfig:
    def pow2(v):
        return v > 0 and v & (v - 1) == 0

    bad = [f"{f}={getattr(cfg, f)}" for f, lo in (("block_m", 16), ("block_n", 16), ("block_k", min_block_k))
           if not (pow2(getattr(cfg, f)) and getattr(cfg, f) >= lo)]
    if not (pow2(cfg.num_warps) and cfg.num_warps <= 16):
        bad.append(f"num_warps={cfg.num_warps}")
    bad += [f"{f}={getattr(cfg, f)}" for f in ("split_k", "target_programs") if getattr(cfg, f) < 0]
    bad += [f"{f}={getattr(cfg, f)}" for f in ("group_m", "num_stages") if getattr(cfg, f) < 1]
    bad += [f"{f}={getattr(cfg, f)}" for f in ("tma", "pdl", "dequant", "gemv") if getattr(cfg, f) not in (0, 1)]
    if bad:
        raise ValueError(f"{source}: invalid launch config ({', '.join(bad)}): block sizes are powers of two "
                         f"(block_m, block_n >= 16, block_k >= {min_block_k}), num_warps a power of two <= 16, "
                         "split_k and target_programs >= 0, group_m and num_stages >= 1, tma, pdl, dequant and "
                         "gemv 0 or 1")
    return cfg


def _resolve(cfg: GemmConfig, m: int, n: int, k: int, weight_bytes_per_k: float, sm_count: int,
             resident: int = 0) -> GemmConfig:
    if cfg.split_k:  # as asked, but no empty split
        k_tiles = max(1, cdiv(k, cfg.block_k))
        return dataclasses.replace(cfg, split_k=cdiv(k_tiles, cdiv(k_tiles, min(cfg.split_k, k_tiles))))
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    return dataclasses.replace(cfg, split_k=split_k_for(tiles, k, cfg.block_k, m, weight_bytes_per_k, sm_count,
                                                        cfg.target_programs, resident))


def _resident(shared: int, cfg: GemmConfig, device_type: str, device_index) -> int:
    """Programs of ``cfg`` (``shared`` bytes each, plus the 1 KB the driver reserves per block) this card runs at
    once (0 under the interpreter: no cap)."""
    if device_type != "cuda":
        return 0
    facts = card(device_index)
    return resident_programs(shared + 1024, cfg.num_warps, facts.sm_count, facts.smem_per_sm, facts.threads_per_sm)


def _awq_resident(cfg: GemmConfig, device_type: str, device_index, itemsize: int) -> int:
    """The fused AWQ kernel's :func:`_resident` (0 for the dequantize + GEMM path: not split)."""
    return 0 if cfg.dequant else _resident(awq_shared_memory(cfg, itemsize), cfg, device_type, device_index)


def _int8_resident(cfg: GemmConfig, device_type: str, device_index) -> int:
    return _resident(int8_shared_memory(cfg), cfg, device_type, device_index)


def _bucket(m: int) -> int:
    return max(16, next_power_of_2(m))


# From this many rows (M rounded up to a power of two) the AWQ GEMM dequantizes the weights into a [K, N]
# workspace (one streaming kernel: 2.5 bytes per weight moved) and runs torch's GEMM on it: the fused kernel
# reached 40-47 % of the bf16 matmul bound at T=4096 on the H200 (the dequantization's instructions share the SM
# with the MMAs; the peer's fused kernel 55-60 %), the dequantize + GEMM path 84-90 % (1.07-1.68x the peer from
# 512 rows). The workspace costs K * N * 2 bytes once per call, small against a GEMM of >= 512 rows. Taken on
# every card: the GEMM is the vendor library's, tuned for that card, where a fused tile config would be one
# card's (unmeasured elsewhere). 16-bit activations only (float32 runs the exact fused kernel).
DEQUANT_MIN_M = 512


_dense_precompiled: set[tuple] = set()


def _precompiles(device: torch.device) -> bool:
    """Whether calls on ``device`` precompile their buckets (a GPU; not the interpreter, where it costs runs)."""
    return device.type == "cuda"


def _precompile_dense(key: tuple, m: int, run, what: str) -> None:
    """At the first eager call of a dense quantized GEMM shape (``key``: kind, device, dtype, N, K and the
    epilogue's features), run it once per M bucket up to ``max(m, PRECOMPILE_MIN_TOKENS)`` rows (``run(rows)``:
    zero activations, the call's own weights) so that every kernel variant later calls need is compiled before a
    serving engine's timed work or CUDA-graph capture (M is not specialized: one variant per bucket's config)."""
    if key in _dense_precompiled or not _moe.precompile_gate(_dense_precompiled, key):
        return
    # buckets below 16 rows share the 16-row config (their runs after the first find it compiled)
    _moe.run_buckets(lambda rows: run(_bucket(rows)), max(m, _moe.PRECOMPILE_MIN_TOKENS), what, DENSE_KERNELS)


def _hopper(device_type: str, device_index) -> bool:
    """An NVIDIA Hopper GPU (sm_90: the cards the swept tiles were measured on)."""
    return device_type == "cuda" and card(device_index).capability == 9


@memo
def awq_config(device_type: str, device_index, dtype: torch.dtype, m_bucket: int, n: int, k: int,
               group_size: int) -> GemmConfig:
    """The AWQ GEMM's launch config for ``M`` rows rounded up to ``m_bucket`` (a power of two >= 16), split
    resolved (see the section comment)."""
    hopper = _hopper(device_type, device_index)
    sms = _sm_count(device_type, device_index)
    wide_n = hopper and group_size >= 128 and cdiv(n, 128) >= sms  # a wave of 128-column tiles (gate_up)
    if device_type != "cuda":  # the interpreter: small tiles (speed), the same rule
        cfg = GemmConfig(block_m=16 if m_bucket <= 16 else 32, block_n=64, block_k=32, num_warps=1, num_stages=1)
    elif m_bucket >= DEQUANT_MIN_M and dtype != torch.float32:  # any card: its own cuBLAS tuning
        cfg = GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, dequant=1)
    elif wide_n and m_bucket <= 16:
        # the 128-column grid is already a wave: 16 x 64 tiles (H200, gate_up 14336 x 2 at T=1: 57.8 us
        # against 74.9 us for 64 x 128 and the peer's 66.9 us), K split in two although the grid is already
        # more than a wave (the same card, T=1/16: 52.9/53.3 us against 57.7/57.6 unsplit; 3, 4 or 8 splits slower)
        cfg = GemmConfig(block_m=16, block_n=64, block_k=128, split_k=2, num_warps=4, num_stages=3)
    elif wide_n and m_bucket <= 64:
        # the same wide-N shapes at 17-64 rows: 64 x 64 tiles, K split in two (H200, gate_up at T=64: 64.4 us
        # against 73.8 us for the 64 x 128 tiles unsplit and the peer's 61.3 us; 64 x 64 unsplit 67.6 us. H100,
        # T=32: 62.8 us against 75.1 us for 64 x 128 unsplit and the peer's 74.3 us; T=64: 64.8 us, peer 61.1 us)
        cfg = GemmConfig(block_m=64, block_n=64, block_k=128, split_k=2, num_warps=4, num_stages=3)
    elif m_bucket <= 64:  # 64-row tiles whatever M (see the section comment)
        cfg = GemmConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3)
    elif hopper and m_bucket == 256 and group_size >= 64:
        # H200 sweep at T=256 (qkv/o/gate_up/down: 1.14/1.22/0.96/0.96x the peer against 0.81/0.93/0.69/0.67x
        # with 128 x 128 tiles; group 128; a smaller group caps BLOCK_K: unmeasured, so not taken)
        cfg = GemmConfig(block_m=256, block_n=64, block_k=64, num_warps=4, num_stages=3)
    else:
        cfg = GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    if dtype == torch.float32 and device_type == "cuda":
        # exact float32 dots run on the FMA units with both operands in registers: 64 x 64 x 32 tiles at most
        # (ptxas: ~200 registers, no spills, 8 warps for 64 rows; 128-wide or 64-deep float32 tiles spill)
        block_m = min(cfg.block_m, 64)
        cfg = GemmConfig(block_m=block_m, block_n=64, block_k=32, num_warps=8 if block_m == 64 else 4, num_stages=3)
    cfg = _checked(env_overrides(cfg, "DLINFER_TRITON_AWQ"), "DLINFER_TRITON_AWQ", 16)
    cfg = dataclasses.replace(cfg, block_k=min(cfg.block_k, group_size))
    return _resolve(cfg, m_bucket, n, k, 0.5, sms, _awq_resident(cfg, device_type, device_index, dtype.itemsize))


@memo
def int8_config(device_type: str, device_index, m_bucket: int, n: int, k: int) -> GemmConfig:
    """The int8 GEMM's launch config for ``M`` rows rounded up to ``m_bucket``, split resolved."""
    sms = _sm_count(device_type, device_index)
    wide_tiles = cdiv(m_bucket, 128) * cdiv(n, 256)  # the grid of 128 x 256 tiles
    mid_rows = _hopper(device_type, device_index) and 256 < m_bucket <= 1024  # the swept rows (257-1024)
    if device_type != "cuda":
        cfg = GemmConfig(block_m=16 if m_bucket <= 16 else 32, block_n=64, block_k=32, num_warps=1, num_stages=1)
    elif m_bucket <= 64:  # 64 rows: two warp groups (69 registers a thread; 4 warps: 122-153)
        cfg = GemmConfig(block_m=m_bucket, block_n=128, block_k=128, num_warps=8 if m_bucket == 64 else 4,
                         num_stages=4)
    elif mid_rows and sms < 2 * wide_tiles <= 2 * sms:
        # 257-1024 rows where 128 x 256 tiles make one wave that 128 x 128 tiles would overflow: the wide tiles,
        # 4 stages, operands by TMA (H100 sweep, Llama-3-8B linears: qkv T=512 29.3 us against 39.4 us for
        # 128 x 128 x 128 and the peer's 33.8 us; o T=1024 29.8 / 39.2 / 33.9 us; down T=1024 88.2 / 116.9 /
        # 103.0 us; TMA alone 10-13 % of it: 128 x 256 with cp.async 32.6 / 32.9 / 101.1 us)
        cfg = GemmConfig(block_m=128, block_n=256, block_k=128, split_k=1, num_warps=8, num_stages=4, tma=1)
    elif mid_rows and sms < wide_tiles <= 2 * sms:
        # the same rows where 128 x 256 tiles would need a second, partly filled wave: 128 x 128 tiles, 3 stages
        # (two programs per SM), by TMA (H100 sweep, qkv T=1024: 50.5 us against 64.0 us for 128 x 256 x 128 with
        # 3 stages and the peer's 65.2 us)
        cfg = GemmConfig(block_m=128, block_n=128, block_k=128, split_k=1, num_warps=8, num_stages=3, tma=1)
    elif wide_tiles >= sms:
        cfg = GemmConfig(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3)
    else:
        cfg = GemmConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4)
    cfg = _checked(env_overrides(cfg, "DLINFER_TRITON_W8A8"), "DLINFER_TRITON_W8A8", 32)
    return _resolve(cfg, m_bucket, n, k, 1.0, sms, _int8_resident(cfg, device_type, device_index))


@triton.jit
def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: GROUP_M row tiles sweep the columns together."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def _epilogue(acc, rm, rn, out_ptrs, row_scale_ptr, col_scale_ptr, qbias_ptr, bias_ptr, M, N,
              HAS_QBIAS: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """``out[rm, rn] = ((acc [+ qbias]) [* row_scale] [* col_scale] [+ bias])`` in float32, rounded once to the
    output dtype, stored at ``out_ptrs``; ``rm``/``rn`` are broadcast-shaped row/column indices (a tile, or one
    flat run of elements)."""
    m_mask = rm < M
    n_mask = rn < N
    if HAS_QBIAS:
        acc += tl.load(qbias_ptr + rn, mask=n_mask, other=0)
    out = acc.to(tl.float32)
    if HAS_ROW_SCALE:
        out = out * tl.load(row_scale_ptr + rm, mask=m_mask, other=0.0)
    if HAS_COL_SCALE:
        out = out * tl.load(col_scale_ptr + rn, mask=n_mask, other=0.0)
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=m_mask & n_mask)


@triton.jit
def _finish_tile(acc, pid_m, rm, rn, split, out_ptr, ws_ptr, stride_om, row_scale_ptr, col_scale_ptr, qbias_ptr,
                 bias_ptr, M, N, HAS_QBIAS: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, USE_PDL: tl.constexpr):
    """A GEMM tile's end: the epilogue into ``out`` without a split, else the raw sums into the ``[SPLIT_K, M, N]``
    workspace. 64-bit offsets only for the tile's origin (32-bit ones inside it: fewer registers); ``pid_m`` may
    be a constant (tl.cast, not .to)."""
    local = tl.arange(0, BLOCK_M)[:, None]
    if SPLIT_K == 1:
        ptrs = out_ptr + tl.cast(pid_m * BLOCK_M, tl.int64) * stride_om + (local * stride_om + rn[None, :])
        _epilogue(acc, rm[:, None], rn[None, :], ptrs, row_scale_ptr, col_scale_ptr, qbias_ptr, bias_ptr, M, N,
                  HAS_QBIAS, HAS_ROW_SCALE, HAS_COL_SCALE, HAS_BIAS)
    else:
        if USE_PDL:  # the reduce kernel may start launching; its gdc_wait still waits for these stores
            tl.extra.cuda.gdc_launch_dependents()
        ptrs = ws_ptr + tl.cast(split * M + pid_m * BLOCK_M, tl.int64) * N + (local * N + rn[None, :])
        tl.store(ptrs, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit(do_not_specialize=["M"])  # one variant per M bucket (see _precompile_dense)
def _split_k_reduce_kernel(ws_ptr, out_ptr, row_scale_ptr, col_scale_ptr, qbias_ptr, bias_ptr, M, N, stride_om,
                           SPLIT_K: tl.constexpr, HAS_QBIAS: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                           HAS_COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                           USE_PDL: tl.constexpr):
    """Sums the ``[SPLIT_K, M, N]`` partials (float32 or int32) in split order, then the epilogue."""
    if USE_PDL:  # launched early: wait until the GEMM's grid has finished and its partials are visible
        tl.extra.cuda.gdc_wait()
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    size = tl.cast(M, tl.int64) * N  # tl.cast: M == 1 arrives as a compile-time constant (the launcher's
    # specialization of 1), which has no .to()
    mask = idx < size
    acc = tl.load(ws_ptr + idx, mask=mask, other=0)
    for s in range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * size + idx, mask=mask, other=0)
    rm = tl.where(mask, idx // N, M)  # past the end: a row that masks itself out
    rn = idx % N
    _epilogue(acc, rm, rn, out_ptr + rm.to(tl.int64) * stride_om + rn, row_scale_ptr, col_scale_ptr, qbias_ptr,
              bias_ptr, M, N, HAS_QBIAS, HAS_ROW_SCALE, HAS_COL_SCALE, HAS_BIAS)


def _finish(acc_or_ws, out, split_k, row_scale, col_scale, qbias, bias, pdl):
    """The second launch of a split GEMM (nothing without a split: the GEMM kernel ran the epilogue itself)."""
    if split_k == 1:
        return
    m, n = out.shape
    block = 1024
    dummy = acc_or_ws
    _split_k_reduce_kernel[(cdiv(m * n, block),)](
        acc_or_ws, out, row_scale if row_scale is not None else dummy, col_scale if col_scale is not None else dummy,
        qbias if qbias is not None else dummy, bias if bias is not None else dummy, m, n, out.stride(0),
        SPLIT_K=split_k, HAS_QBIAS=qbias is not None, HAS_ROW_SCALE=row_scale is not None,
        HAS_COL_SCALE=col_scale is not None, HAS_BIAS=bias is not None, BLOCK=block, USE_PDL=pdl, num_warps=4,
        **({"launch_pdl": True} if pdl else {}))


# ----------------------------------------------------------------------------------------------- AWQ W4A16
@triton.jit
def _awq_unpack(words, MAGIC: tl.constexpr, dtype: tl.constexpr):
    """``[R, C]`` int32 words of 8 nibbles -> ``[R, 8 C]``: column ``8 c + j`` from nibble ``(j % 2) * 4 + j // 2``
    of word ``c`` (AWQ's order 0 2 4 6 1 3 5 7), unpacked in the words' own layout (each word read once, its 8
    values built in the registers of the thread that holds it) and joined: columns ``2 i`` and ``2 i + 1`` are
    nibbles ``i`` and ``i + 4``, the two 16-bit halves of ``(word >> 4 i) & 0x000F000F``.

    ``MAGIC`` 0: the int32 values. Else ``MAGIC`` is a 16-bit float's bits with a unit last mantissa bit at 1
    (0x6400 = 1024.0 in float16, 0x4300 = 128.0 in bfloat16): the ``dtype`` values ``MAGIC + q``, two per 32-bit
    operation and without an int-to-float conversion (the halves of ``pair | MAGIC * 0x10001``)."""
    if MAGIC != 0:
        p0 = ((words >> 0) & 0x000F000F) | (MAGIC * 0x10001)
        p1 = ((words >> 4) & 0x000F000F) | (MAGIC * 0x10001)
        p2 = ((words >> 8) & 0x000F000F) | (MAGIC * 0x10001)
        p3 = ((words >> 12) & 0x000F000F) | (MAGIC * 0x10001)
        lo0, hi0 = p0.to(tl.int16).to(dtype, bitcast=True), (p0 >> 16).to(tl.int16).to(dtype, bitcast=True)
        lo1, hi1 = p1.to(tl.int16).to(dtype, bitcast=True), (p1 >> 16).to(tl.int16).to(dtype, bitcast=True)
        lo2, hi2 = p2.to(tl.int16).to(dtype, bitcast=True), (p2 >> 16).to(tl.int16).to(dtype, bitcast=True)
        lo3, hi3 = p3.to(tl.int16).to(dtype, bitcast=True), (p3 >> 16).to(tl.int16).to(dtype, bitcast=True)
    else:
        lo0, hi0 = words & 0xF, (words >> 16) & 0xF
        lo1, hi1 = (words >> 4) & 0xF, (words >> 20) & 0xF
        lo2, hi2 = (words >> 8) & 0xF, (words >> 24) & 0xF
        lo3, hi3 = (words >> 12) & 0xF, (words >> 28) & 0xF
    # [R, C, a, b, h] -> column (2 a + b) * 2 + h: nibble pair i = 2 a + b, half h
    lo = tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3))
    hi = tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3))
    return tl.reshape(tl.join(lo, hi), [words.shape[0], words.shape[1] * 8])


@triton.jit
def _awq_zero_points(z_ptrs, mask, MASKED: tl.constexpr, HAS_ZEROS: tl.constexpr, MAGIC: tl.constexpr,
                     dtype: tl.constexpr):
    """The unpacked zero points of the words at ``z_ptrs`` (``[R, WORDS]`` pointers; ``mask`` read only when
    ``MASKED``): the checkpoint's, or the symmetric zero point 8 without them (``HAS_ZEROS`` False: nothing is
    read)."""
    if HAS_ZEROS and MASKED:
        words = tl.load(z_ptrs, mask=mask, other=0)
    elif HAS_ZEROS:
        words = tl.load(z_ptrs)
    else:
        words = tl.full(z_ptrs.shape, 0x88888888, dtype=tl.uint32).to(tl.int32, bitcast=True)
    return _awq_unpack(words, MAGIC, dtype)


@triton.jit
def _awq_k_tile(x_rows, row_ok, w_cols, s_cols, z_cols, k0, rk, K: tl.constexpr, GROUP: tl.constexpr, stride_qk,
                stride_sg, stride_zg, EVEN: tl.constexpr, HAS_ZEROS: tl.constexpr, MAGIC: tl.constexpr):
    """One K tile of the AWQ GEMMs: the activations ``x`` (``[R, BLOCK_K]``, rows past M and K past the end 0)
    and the dequantized weights ``W`` (``[BLOCK_K, BLOCK_N]`` in x's dtype) of K rows ``k0 + rk``. 16-bit
    activations (``MAGIC`` the dtype's magic bits, see :func:`_awq_unpack`): ``(q - zero) * scale`` computed as
    ``((MAGIC | q) - (MAGIC | zero)) * scale`` in the activation dtype: the difference is exact, the product
    rounded once, so W equals the float32 computation rounded to that dtype; float32: in float32."""
    ks = k0 + rk
    g = tl.minimum(k0, K - 1) // GROUP  # a K tile past the end (uneven split): any valid group, x is 0
    if EVEN:
        x = tl.load(x_rows + ks[None, :], mask=row_ok, other=0.0)
        packed = tl.load(w_cols + ks.to(tl.int64)[:, None] * stride_qk)
    else:
        x = tl.load(x_rows + ks[None, :], mask=row_ok & (ks < K)[None, :], other=0.0)
        packed = tl.load(w_cols + ks.to(tl.int64)[:, None] * stride_qk, mask=(ks < K)[:, None], other=0)
    s = tl.load(s_cols + g * stride_sg)[None, :]
    q = _awq_unpack(packed, MAGIC, x.dtype)
    z = _awq_zero_points((z_cols + g * stride_zg)[None, :], row_ok, False, HAS_ZEROS, MAGIC, x.dtype)
    if MAGIC != 0:
        w = (q - z) * s  # (MAGIC + q) - (MAGIC + z): exact; one rounding of the product
    else:
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x.dtype)
    return x, w


@triton.jit
def _awq_columns(qw_ptr, s_ptr, z_ptr, pid_n, N, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):
    """Column tile ``pid_n``'s offsets ``rn`` and its pointers into the words, scales and zero points; columns
    past N (N not a multiple of BLOCK_N only) wrap onto valid ones (the stores are masked). EVEN_N: plain
    offsets, so the compiler sees the runs of contiguous words (vector loads)."""
    WORDS: tl.constexpr = BLOCK_N // 8
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = pid_n * WORDS + tl.arange(0, WORDS)
    if EVEN_N:
        w_cols = qw_ptr + rw[None, :]
        s_cols = s_ptr + rn
        z_cols = z_ptr + rw
    else:
        w_cols = qw_ptr + (rw % (N // 8))[None, :]
        s_cols = s_ptr + rn % N
        z_cols = z_ptr + rw % (N // 8)
    return rn, w_cols, s_cols, z_cols


@triton.jit(do_not_specialize=["M"])  # one variant per M bucket (see _precompile_dense)
def _awq_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, M, N, K: tl.constexpr, GROUP: tl.constexpr,
                     stride_xm, stride_qk, stride_sg, stride_zg, stride_om,
                     HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, MAGIC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     SPLIT_K: tl.constexpr, ITERS: tl.constexpr, EVEN_N: tl.constexpr, USE_PDL: tl.constexpr):
    """``x @ W (+ bias)`` with ``W = (q - zero) * scale`` dequantized tile by tile. Program (tile, split) covers K
    tiles ``split * ITERS ..`` (ITERS of BLOCK_K, which divides GROUP: one group's scales and zeros per tile);
    without a split it runs the epilogue, else it stores float32 partials to ``ws`` (``[SPLIT_K, M, N]``). The
    tiles' W: :func:`_awq_k_tile`."""
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn, w_cols, s_cols, z_cols = _awq_columns(qw_ptr, s_ptr, z_ptr, pid_n, N, BLOCK_N, EVEN_N)
    rk = tl.arange(0, BLOCK_K)
    # rows past M are masked (no traffic: a 1-row call reads one row)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    row_ok = (rm < M)[:, None]
    EVEN: tl.constexpr = SPLIT_K * ITERS * BLOCK_K == K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(ITERS):
        x, w = _awq_k_tile(x_rows, row_ok, w_cols, s_cols, z_cols, (split * ITERS + i) * BLOCK_K, rk, K, GROUP,
                           stride_qk, stride_sg, stride_zg, EVEN, HAS_ZEROS, MAGIC)
        if IEEE:  # float32 activations: full float32 products, not TF32
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    _finish_tile(acc, pid_m, rm, rn, split, out_ptr, ws_ptr, stride_om, b_ptr, b_ptr, b_ptr, b_ptr, M, N,
                 False, False, False, HAS_BIAS, SPLIT_K, BLOCK_M, USE_PDL)


_AWQ_MAGIC = {torch.float16: 0x6400, torch.bfloat16: 0x4300, torch.float32: 0}
GEMV_MAX_ROWS = 4  # the FMA kernel's rows at most (its float32 accumulator holds ROWS x BLOCK_K x BLOCK_N values)


@triton.jit(do_not_specialize=["M"])
def _awq_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, M, N, K: tl.constexpr, GROUP: tl.constexpr,
                     stride_xm, stride_qk, stride_sg, stride_zg, stride_om,
                     HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, MAGIC: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, ITERS: tl.constexpr,
                     EVEN_N: tl.constexpr, USE_PDL: tl.constexpr, STAGES: tl.constexpr):
    """``x @ W (+ bias)`` for a few rows (``M <= ROWS``) on the FMA units: the weights a ``[BLOCK_K, BLOCK_N]`` tile
    at a time, dequantized as the fused GEMM does (:func:`_awq_unpack`; the same W), multiplied by each row's
    ``BLOCK_K`` activations and accumulated elementwise in float32; the sum over K happens once, after the loop
    (no reduction across threads per tile). Program (column tile, split) as in :func:`_awq_gemm_kernel`; 16-bit
    activations only."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rm = tl.arange(0, ROWS)
    rn, w_cols, s_cols, z_cols = _awq_columns(qw_ptr, s_ptr, z_ptr, pid_n, N, BLOCK_N, EVEN_N)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    row_ok = (rm < M)[:, None]
    EVEN: tl.constexpr = SPLIT_K * ITERS * BLOCK_K == K
    acc = tl.zeros((ROWS, BLOCK_K, BLOCK_N), dtype=tl.float32)
    for i in tl.range(ITERS, num_stages=STAGES):
        x, w = _awq_k_tile(x_rows, row_ok, w_cols, s_cols, z_cols, (split * ITERS + i) * BLOCK_K, rk, K, GROUP,
                           stride_qk, stride_sg, stride_zg, EVEN, HAS_ZEROS, MAGIC)
        acc += x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
    _finish_tile(tl.sum(acc, axis=1), 0, rm, rn, split, out_ptr, ws_ptr, stride_om, b_ptr, b_ptr, b_ptr, b_ptr, M,
                 N, False, False, False, HAS_BIAS, SPLIT_K, ROWS, USE_PDL)


@triton.jit
def _awq_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, K, N, GROUP: tl.constexpr, stride_qk, stride_sg, stride_zg,
                        stride_wk, HAS_ZEROS: tl.constexpr, MAGIC: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """``W[k, n] = (q - zero) * scale`` for one ``[BLOCK_K, BLOCK_N]`` tile, computed exactly as the fused GEMM
    computes it (:func:`_awq_unpack`, one rounding of the product), stored in ``w_ptr``'s dtype."""
    WORDS: tl.constexpr = BLOCK_N // 8
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rw = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = (rk < K)[:, None]
    words_ok = k_ok & (rw < N // 8)[None, :]
    cols_ok = k_ok & (rn < N)[None, :]
    rk64 = rk.to(tl.int64)[:, None]
    g = (rk // GROUP).to(tl.int64)[:, None]
    dtype = w_ptr.dtype.element_ty
    packed = tl.load(qw_ptr + rk64 * stride_qk + rw[None, :], mask=words_ok, other=0)
    s = tl.load(s_ptr + g * stride_sg + rn[None, :], mask=cols_ok, other=0)
    q = _awq_unpack(packed, MAGIC, dtype)
    z = _awq_zero_points(z_ptr + g * stride_zg + rw[None, :], words_ok, True, HAS_ZEROS, MAGIC, dtype)
    w = (q - z) * s
    tl.store(w_ptr + rk64 * stride_wk + rn[None, :], w.to(dtype), mask=cols_ok)


def awq_dequantize(qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The ``[K, N]`` weights an AWQ checkpoint stands for, in ``dtype`` (16-bit), as the fused GEMM forms them."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    w = torch.empty(k, n, dtype=dtype, device=qweight.device)
    block_k, block_n = (64, 128) if qweight.device.type == "cuda" else (16, 64)
    _awq_dequant_kernel[(cdiv(k, block_k), cdiv(n, block_n))](
        qweight, scale, offset if offset is not None else qweight, w, k, n, group_size, qweight.stride(0),
        scale.stride(0), offset.stride(0) if offset is not None else 0, w.stride(0),
        HAS_ZEROS=offset is not None, MAGIC=_AWQ_MAGIC[dtype], BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4)
    return w


def weight_quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                        bias: torch.Tensor | None, group_size: int, config: GemmConfig | None = None) -> torch.Tensor:
    """See ``dlinfer.ops.weight_quant_matmul``. ``config`` replaces :func:`awq_config`'s (``split_k`` 0: by the
    rule; ``block_k`` capped at ``group_size``)."""
    x = x.contiguous()
    qweight, scale = qweight.contiguous(), scale.contiguous()
    offset = offset.contiguous() if offset is not None else None
    m, k = x.shape
    n = qweight.shape[1] * 8
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    dev = x.device
    if config is None:
        if _precompiles(dev):
            _precompile_dense(("awq", dev.index, x.dtype, n, k, group_size, offset is not None, bias is not None), m,
                              lambda rows: weight_quant_matmul(x.new_zeros(rows, k), qweight, scale, offset, bias,
                                                               group_size), f"weight_quant_matmul {x.dtype} {k}x{n}")
        cfg = awq_config(dev.type, dev.index, x.dtype, _bucket(m), n, k, group_size)
    else:
        cfg = _checked(config, "config", 16)
        cfg = dataclasses.replace(cfg, block_k=min(cfg.block_k, group_size))
        cfg = _resolve(cfg, m, n, k, 0.5, _sm_count(dev.type, dev.index),
                       _awq_resident(cfg, dev.type, dev.index, x.dtype.itemsize))
    if cfg.dequant and x.dtype != torch.float32:
        w = awq_dequantize(qweight, scale, offset, group_size, x.dtype)
        return torch.addmm(bias, x, w, out=out) if bias is not None else torch.mm(x, w, out=out)
    split, pdl = cfg.split_k, _use_pdl(cfg, dev)
    iters = cdiv(cdiv(k, cfg.block_k), split)
    ws = torch.empty(split, m, n, dtype=torch.float32, device=dev) if split > 1 else out
    if cfg.gemv and m <= GEMV_MAX_ROWS and x.dtype != torch.float32:
        _awq_gemv_kernel[(cdiv(n, cfg.block_n), split)](
            x, qweight, scale, offset if offset is not None else qweight, bias if bias is not None else scale, out,
            ws, m, n, k, group_size, x.stride(0), qweight.stride(0), scale.stride(0),
            offset.stride(0) if offset is not None else 0, out.stride(0), HAS_ZEROS=offset is not None,
            HAS_BIAS=bias is not None, MAGIC=_AWQ_MAGIC[x.dtype], ROWS=next_power_of_2(m), BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, SPLIT_K=split, ITERS=iters, EVEN_N=n % cfg.block_n == 0, USE_PDL=pdl,
            STAGES=cfg.num_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _finish(ws, out, split, None, None, None, bias, pdl)
        return out
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), split)
    _awq_gemm_kernel[grid](x, qweight, scale, offset if offset is not None else qweight,
                           bias if bias is not None else scale, out, ws, m, n, k, group_size,
                           x.stride(0), qweight.stride(0), scale.stride(0),
                           offset.stride(0) if offset is not None else 0, out.stride(0),
                           HAS_ZEROS=offset is not None, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                           MAGIC=_AWQ_MAGIC[x.dtype], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                           BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=split, ITERS=iters,
                           EVEN_N=n % cfg.block_n == 0, USE_PDL=pdl, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages)
    _finish(ws, out, split, None, None, None, bias, pdl)
    return out


# ----------------------------------------------------------------------------------------------- int8 GEMM
@triton.jit(do_not_specialize=["M"])  # one variant per M bucket (see _precompile_dense)
def _int8_gemm_kernel(a_ptr, b_ptr, a_desc, b_desc, out_ptr, ws_ptr, row_scale_ptr, col_scale_ptr, qbias_ptr,
                      bias_ptr, M, N, K: tl.constexpr, stride_am, stride_bn, stride_om,
                      HAS_ROW_SCALE: tl.constexpr, HAS_QBIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      SPLIT_K: tl.constexpr, ITERS: tl.constexpr, TMA: tl.constexpr, USE_PDL: tl.constexpr):
    """``out = ((a @ b.T) [+ qbias]) [* row_scale[m]] * col_scale[n] [+ bias]``, int32 accumulation; with a split
    of K, each (tile, split) program stores its int32 partial sums to ``ws`` (``[SPLIT_K, M, N]``, exact) and the
    reduce kernel runs the epilogue. ``TMA``: both operands read through the tensor descriptors ``a_desc``
    (``[M, K]``, box ``[BLOCK_M, BLOCK_K]``) and ``b_desc`` (``[N, K]``, box ``[BLOCK_N, BLOCK_K]``); boxes past
    the edges read as zero."""
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    row_ok = (rm < M)[:, None]  # rows past M: masked (no traffic); columns past N wrap onto valid ones
    b_cols = b_ptr + (rn % N).to(tl.int64)[None, :] * stride_bn
    EVEN: tl.constexpr = SPLIT_K * ITERS * BLOCK_K == K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for i in range(ITERS):
        k0 = (split * ITERS + i) * BLOCK_K
        ks = k0 + rk
        if TMA:
            a = a_desc.load([pid_m * BLOCK_M, k0])
            b = b_desc.load([pid_n * BLOCK_N, k0]).T
        elif EVEN:
            a = tl.load(a_rows + ks[None, :], mask=row_ok, other=0)
            b = tl.load(b_cols + ks[:, None])
        else:
            a = tl.load(a_rows + ks[None, :], mask=row_ok & (ks < K)[None, :], other=0)
            b = tl.load(b_cols + ks[:, None], mask=(ks < K)[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    _finish_tile(acc, pid_m, rm, rn, split, out_ptr, ws_ptr, stride_om, row_scale_ptr, col_scale_ptr, qbias_ptr,
                 bias_ptr, M, N, HAS_QBIAS, HAS_ROW_SCALE, True, HAS_BIAS, SPLIT_K, BLOCK_M, USE_PDL)


def _int8_gemm(a2: torch.Tensor, b: torch.Tensor, row_scale, col_scale, qbias, bias, out_dtype,
               config: GemmConfig | None = None) -> torch.Tensor:
    m, k = a2.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a2.device)
    if m == 0 or n == 0:
        return out
    dev = a2.device
    if config is None:
        if _precompiles(dev):
            def run(rows):
                _int8_gemm(a2.new_zeros(rows, k), b, None if row_scale is None else row_scale.new_ones(rows),
                           col_scale, qbias, bias, out_dtype)
            _precompile_dense(("int8", dev.index, out_dtype, n, k, row_scale is not None, qbias is not None,
                               bias is not None), m, run, f"int8 GEMM {out_dtype} {k}x{n}")
        cfg = int8_config(dev.type, dev.index, _bucket(m), n, k)
    else:
        cfg = _checked(config, "config", 32)
        cfg = _resolve(cfg, m, n, k, 1.0, _sm_count(dev.type, dev.index), _int8_resident(cfg, dev.type, dev.index))
    split, pdl = cfg.split_k, _use_pdl(cfg, dev)
    iters = cdiv(cdiv(k, cfg.block_k), split)
    ws = torch.empty(split, m, n, dtype=torch.int32, device=dev) if split > 1 else out
    dummy = col_scale
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), split)
    # TMA: rows 16-byte aligned (K % 16, aligned bases: a contiguous tensor's are); else the pointer path
    tma = bool(cfg.tma) and k % 16 == 0 and a2.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
    a_desc = TensorDescriptor.from_tensor(a2, [cfg.block_m, cfg.block_k]) if tma else None
    b_desc = TensorDescriptor.from_tensor(b, [cfg.block_n, cfg.block_k]) if tma else None
    _int8_gemm_kernel[grid](a2, b, a_desc, b_desc, out, ws, row_scale if row_scale is not None else dummy, col_scale,
                            qbias if qbias is not None else dummy, bias if bias is not None else dummy,
                            m, n, k, a2.stride(0), b.stride(0), out.stride(0),
                            HAS_ROW_SCALE=row_scale is not None, HAS_QBIAS=qbias is not None,
                            HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                            BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=split, ITERS=iters, TMA=tma,
                            USE_PDL=pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _finish(ws, out, split, row_scale, col_scale, qbias, bias, pdl)
    return out


# the kernels a dense quantized GEMM launches (whose new variants the precompile log line counts)
DENSE_KERNELS = (_awq_gemm_kernel, _awq_gemv_kernel, _awq_dequant_kernel, _int8_gemm_kernel,
                 _split_k_reduce_kernel)


def linear_w8a8(a: torch.Tensor, b: torch.Tensor, rms_scale: torch.Tensor, linear_scale: torch.Tensor,
                out_dtype: torch.dtype, quant_dtype: torch.dtype, bias: torch.Tensor | None,
                config: GemmConfig | None = None) -> torch.Tensor:
    a2 = a.reshape(-1, a.shape[-1]).contiguous()
    out = _int8_gemm(a2, b.contiguous(), rms_scale.reshape(-1).float().contiguous(),
                     linear_scale.reshape(-1).float().contiguous(), None, bias, out_dtype, config)
    return out.reshape(*a.shape[:-1], b.shape[0])


@triton.jit(do_not_specialize=["numel"])
def _static_quant_kernel(x_ptr, q_ptr, scale_ptr, offset_ptr, numel, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr).to(tl.float32)
    offset = tl.load(offset_ptr).to(tl.float32)
    q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, scale)) + offset, -128.0), 127.0)
    tl.store(q_ptr + i, q.to(tl.int8), mask=mask)


def linear_w8a8_static(x: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor,
                       deq_scale: torch.Tensor, out_dtype: torch.dtype, quant_dtype: torch.dtype,
                       quant_bias: torch.Tensor | None, config: GemmConfig | None = None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    xq = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    if x2.numel():
        block = 1024
        _static_quant_kernel[(cdiv(x2.numel(), block),)](x2, xq, input_scale.reshape(1),
                                                                  input_offset.reshape(1), x2.numel(), BLOCK=block)
    out = _int8_gemm(xq, weight.contiguous(), None, deq_scale.reshape(-1).float().contiguous(),
                     quant_bias.contiguous() if quant_bias is not None else None, None, out_dtype, config)
    return out.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------- per-token quant
@triton.jit
def _row_quant_kernel(x_ptr, res_ptr, w_ptr, q_ptr, scale_ptr, sum_ptr, hidden, eps,
                      stride_x, stride_res, stride_q, stride_sum,
                      HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        total = x.to(tl.float32) + res.to(tl.float32)
        if x_ptr.dtype.element_ty == tl.bfloat16:
            total = _round_to_bf16(total)
        x = total.to(x_ptr.dtype.element_ty)  # the new residual stream, rounded to the input dtype
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    y = x.to(tl.float32)
    if NORM:
        inv = tl.rsqrt(tl.sum(y * y, axis=0) / hidden + eps)
        y = y * inv * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    q, scale = _quantize_rows(y, tl.max(tl.abs(y), axis=0))
    tl.store(q_ptr + row * stride_q + cols, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)


def _row_quant(x: torch.Tensor, residual, weight, epsilon: float):
    hidden = x.shape[-1]
    flat = x.dim() != 2  # 2-D rows (the common call) need no views in or out
    x2 = (x.reshape(-1, hidden) if flat else x).contiguous()
    rows = x2.shape[0]
    q = torch.empty_like(x2, dtype=torch.int8)
    scale = x2.new_empty((rows, 1), dtype=torch.float32)
    total = torch.empty_like(x2) if residual is not None else None
    r2 = (residual.reshape(-1, hidden) if flat else residual).contiguous() if residual is not None else None
    if rows and hidden:
        block = next_power_of_2(hidden)
        _row_quant_kernel[(rows,)](x2, r2 if r2 is not None else x2, weight if weight is not None else x2, q, scale,
                                   total if total is not None else x2, hidden, float(epsilon),
                                   x2.stride()[0], r2.stride()[0] if r2 is not None else 0, q.stride()[0],
                                   total.stride()[0] if total is not None else 0,
                                   HAS_RESIDUAL=residual is not None, NORM=weight is not None, BLOCK=block,
                                   num_warps=max(1, min(16, block // 512)))
    elif rows:  # hidden == 0: nothing to quantize, the scale of an all-zero row
        scale.fill_(1.0 / 127.0)
    if flat:
        q, scale = q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)
        total = total.reshape(x.shape) if total is not None else None
    return (q, scale) if total is None else (q, scale, total)


def dynamic_quant(x: torch.Tensor, quant_dtype: torch.dtype, quant_granularity: str):
    return _row_quant(x, None, None, 0.0)


def rms_norm_w8a8(hidden_states: torch.Tensor, weight: torch.Tensor, epsilon: float, quant_dtype: torch.dtype):
    return _row_quant(hidden_states, None, weight, epsilon)


def add_rms_norm_w8a8(hidden_states: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float,
                      quant_dtype: torch.dtype):
    return _row_quant(hidden_states, residual, weight, epsilon)


# ----------------------------------------------------------------------------------------------- W8A8 experts
# ``fused_moe_w8a8``: the expert-sorted grouped GEMM of ``fused_moe`` (moe.py: its sorting and combine kernels, the
# same block table and hot-expert classes) on int8 operands. Launches, all sized from shapes (no host sync,
# CUDA-graph capturable), deterministic (no atomics):
# 1. the hidden states quantized per token (the row kernel above: int8 + one float32 scale per token);
# 2. (histogram +) scatter: the (token, slot) pairs in expert order (moe.py);
# 3. gate_up GEMM: int8 ``tl.dot`` into int32 over the gathered token rows, the gate and up weight rows of a tile
#    interleaved in one B tile; epilogue ``acc * x_scale[token] * w_scale[e, n]`` in float32, then
#    ``silu(gate) * up`` rounded to the input dtype (as the reference rounds it), one row per pair;
# 4. those rows quantized per row again (the row kernel: the reference's ``quantize_per_token``, same rounding);
# 5. down GEMM: int8 ``tl.dot`` on them, epilogue ``acc * a_scale[pair] * w_scale[e, h]`` kept in float32;
# 6. combine: ``out[t] = sum_k w[t, k] * y[t, k]`` in float32 in a fixed order (moe.py's kernel).
# Experts that hold at least ``hot_rows`` rows run on a second pair of GEMM launches with wide tiles (moe.py).


@triton.jit
def _w8a8_gemm_step(acc, a_ptrs, b_ptrs, k0, k_dim, row_mask, offs_k, EVEN_K: tl.constexpr):
    if EVEN_K:
        a = tl.load(a_ptrs + k0, mask=row_mask[:, None], other=0)
        b = tl.load(b_ptrs + k0)
    else:
        k_mask = offs_k < k_dim - k0
        a = tl.load(a_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(b_ptrs + k0, mask=k_mask[:, None], other=0)
    return tl.dot(a, b, acc, out_dtype=tl.int32)


@triton.jit(do_not_specialize=["max_blocks"])
def _moe_w8a8_gemm_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr, sorted_ptr, meta_ptr, n_out, k_dim,
                          a_row_div, up_offset, max_blocks, n_experts, stride_am, stride_we, stride_wn, stride_se,
                          stride_om,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          EB: tl.constexpr, HOT: tl.constexpr, SILU: tl.constexpr, EVEN_K: tl.constexpr,
                          WHILE_LOOP: tl.constexpr):
    """``out[r, n] = (sum_k a[r // a_row_div, k] * w[e, n, k]) * a_scale[r // a_row_div] * w_scale[e, n]`` (int8
    operands, int32 sums, float32 scaling) for the rows ``r`` of one expert-sorted block of ``BLOCK_M`` rows: the
    blocks of the hot experts (``HOT``) or of the others (moe.py's ``_moe_scatter_kernel`` block table).

    With ``SILU``: ``out[r, n] = silu(g) * u`` of the scaled sums ``g``/``u`` of weight rows ``n`` and
    ``n + up_offset`` (interleaved in one ``2 * BLOCK_N`` wide B tile, split in the epilogue), rounded to the
    output dtype; without, the scaled sums are stored as they are (a float32 output)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_out, BLOCK_N)
    per_group = GROUP_M * n_tiles  # grouped order: GROUP_M row blocks sweep the columns together (L2 reuse)
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(max_blocks - first_m, GROUP_M)
    m_block = first_m + (pid % per_group) % group_rows
    n_tile = (pid % per_group) // group_rows

    experts = tl.arange(0, EB)
    ends_ptr = meta_ptr + 3 * EB if HOT else meta_ptr
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

        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
        if SILU:
            # B column c is weight row n_tile * BLOCK_N + c // 2 (+ up_offset for odd c): gate, up, gate, ...
            cols = tl.arange(0, 2 * BLOCK_N)
            w_rows = (n_tile * BLOCK_N + cols // 2) % n_out + (cols % 2) * up_offset
            acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.int32)
        else:
            w_rows = (n_tile * BLOCK_N + tl.arange(0, BLOCK_N)) % n_out
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        b_ptrs = w_ptr + expert.to(tl.int64) * stride_we + w_rows[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        if WHILE_LOOP:  # the interpreter (numpy 2 refuses range() over its 1-element scalars)
            k0 = 0
            while k0 < k_dim:
                acc = _w8a8_gemm_step(acc, a_ptrs, b_ptrs, k0, k_dim, row_mask, offs_k, EVEN_K)
                k0 += BLOCK_K
        else:
            for k0 in range(0, k_dim, BLOCK_K):
                acc = _w8a8_gemm_step(acc, a_ptrs, b_ptrs, k0, k_dim, row_mask, offs_k, EVEN_K)
        a_scale = tl.load(a_scale_ptr + a_rows, mask=row_mask, other=0.0)
        w_scale = tl.load(w_scale_ptr + expert.to(tl.int64) * stride_se + w_rows).to(tl.float32)
        val = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
        out_dtype = out_ptr.dtype.element_ty
        if SILU:
            gate, up = tl.split(tl.reshape(val, [BLOCK_M, BLOCK_N, 2]))
            result = gate / (1.0 + tl.exp(-gate)) * up
            if out_dtype == tl.bfloat16:
                result = _round_to_bf16(result)
            result = result.to(out_dtype)
        else:
            result = val.to(out_dtype)
        offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, result, mask=row_mask[:, None] & (offs_n < n_out)[None, :])


# Launch configs of the two W8A8 GEMMs, as tuning.py's tiers: by expected rows per expert (T * topk / E), smallest
# first, (upper bound, config); "up" = gate_up GEMM + SiLU (BLOCK_N gate and BLOCK_N up rows in one tile), "down"
# = down GEMM, each (BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). UNTUNED: derived from the 16-bit H100
# tiers with BLOCK_K doubled (128 int8 bytes, the same bytes per K step), never timed on a GPU; every config
# compiles for sm_90 within its shared memory (tests/triton/test_quant.py). The hot experts' GEMMs use the config
# of HOT_LOAD rows per expert (tuning.HOT_LOAD), as fused_moe does.
W8A8_TIERS: list[tuple[float, dict]] = [
    (8, tuning._cfg(16, (32, 128, 1, 4, 4), (32, 128, 1, 4, 4))),
    (24, tuning._cfg(32, (64, 128, 4, 4, 4), (64, 128, 4, 4, 4))),
    (96, tuning._cfg(64, (64, 128, 4, 4, 3), (64, 128, 4, 4, 3))),
    (192, tuning._cfg(64, (64, 128, 8, 4, 4), (128, 128, 8, 4, 4))),
    (math.inf, tuning._cfg(128, (128, 128, 8, 8, 3), (256, 128, 8, 8, 3))),
]


def w8a8_launch_config(tokens: int, experts: int, topk: int, device=None) -> dict:
    """The tile config of a ``fused_moe_w8a8`` call (``BLOCK_M``, ``up``, ``down``) and, under ``hot``, the hot
    experts' config (see :data:`W8A8_TIERS`), fitted to CUDA device ``device``'s shared memory when given
    (``tuning.fit``; it changes none of the tiers on the cards of ``host.CARDS``: the widest takes 144 KB on sm_90
    and 96 KB on sm_8x, where Triton keeps one pipeline buffer fewer)."""
    cfg = tuning._tier(W8A8_TIERS, tokens * topk / experts)
    hot = tuning._tier(W8A8_TIERS, tuning.HOT_LOAD)
    if device is None or device.type != "cuda":
        return dict(cfg, hot=hot)
    # per call: a lookup (fitting is ~3 us of Python); keyed by the card's facts, not the device index
    key = (id(cfg), id(hot), card(device.index))
    hit = _W8A8_FITTED.get(key)
    if hit is None:
        hit = _W8A8_FITTED[key] = tuning.fit(dict(cfg, hot=hot), torch.int8, key[2])
    return hit


_W8A8_FITTED: dict[tuple, dict] = {}  # (tier config id, hot tier config id, host.Card) -> the fitted config


def _w8a8_gemm(a, a_scale, weight, w_scale, out, sorted_rows, meta, *, n_out, k_dim, a_row_div, up_offset,
               max_blocks, experts, eb, block_m, hot, silu, cfg):
    block_n, block_k = cfg["BLOCK_N"], cfg["BLOCK_K"]
    _moe_w8a8_gemm_kernel[(max_blocks * cdiv(n_out, block_n),)](
        a, a_scale, weight, w_scale, out, sorted_rows, meta, n_out, k_dim, a_row_div, up_offset, max_blocks,
        experts, a.stride(0), weight.stride(0), weight.stride(1), w_scale.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"], EB=eb, HOT=hot, SILU=silu,
        EVEN_K=k_dim % block_k == 0, WHILE_LOOP=a.device.type == "cpu",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _channel_scales(scales: torch.Tensor, experts: int, rows: int) -> torch.Tensor:
    """``[E, R, 1]`` or ``[E, R]`` per-channel scales as ``[E, R]`` with unit stride along R (a view when it can
    be)."""
    flat = scales.reshape(experts, rows)
    return flat if flat.stride(1) == 1 else flat.contiguous()


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def fused_moe_w8a8(hidden_states: torch.Tensor, gate_up_weights: torch.Tensor, gate_up_scales: torch.Tensor,
                   down_weights: torch.Tensor, down_scales: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, renormalize: bool, config: dict | None = None) -> torch.Tensor:
    """See ``dlinfer.ops.fused_moe_w8a8``. ``config`` overrides :func:`w8a8_launch_config` (its ``hot`` entry the
    hot experts' config and ``hot_rows`` their threshold; without ``hot`` no expert is hot)."""
    tokens, hidden = hidden_states.shape
    experts, two_inter, _ = gate_up_weights.shape
    inter = two_inter // 2
    topk = topk_ids.shape[1]
    device = hidden_states.device
    out = torch.empty_like(hidden_states, memory_format=torch.contiguous_format)
    if tokens == 0 or hidden == 0:
        return out
    if inter == 0:
        return out.zero_()
    if config is None:
        key = (device.index, hidden_states.dtype, gate_up_weights.shape, topk)
        if device.type == "cuda" and key not in _precompiled:
            _precompile_on_first_use(hidden_states, gate_up_weights, gate_up_scales, down_weights, down_scales, topk)
        config = w8a8_launch_config(tokens, experts, topk, device)
    block_m = config["BLOCK_M"]
    hot_cfg, hot_rows = tuning.hot_class(config, config.get("hot"), tokens)
    hot_m = hot_cfg["BLOCK_M"] if hot_cfg is not None else block_m

    xq, x_scale = _row_quant(hidden_states, None, None, 0.0)
    w_up, w_down = _unit_stride(gate_up_weights), _unit_stride(down_weights)
    s_up, s_down = _channel_scales(gate_up_scales, experts, two_inter), _channel_scales(down_scales, experts, hidden)
    ids = topk_ids.reshape(-1)
    ids = ids if ids.is_contiguous() else ids.contiguous()

    pairs = tokens * topk
    eb = next_power_of_2(experts)
    chunk = max(16, min(_moe.SORT_MAX_CHUNK, _moe.SORT_TILE // eb, next_power_of_2(pairs)))
    n_chunks = cdiv(pairs, chunk)
    # every non-empty expert pads to a multiple of its block; hot experts hold >= hot_rows rows each
    max_blocks = cdiv(pairs, block_m) + min(experts, pairs)
    max_hot_blocks = cdiv(pairs, hot_m) + min(experts, pairs // hot_rows) if hot_cfg is not None else 0
    i32 = dict(dtype=torch.int32, device=device)
    rank = torch.empty(pairs, **i32)
    hist = torch.empty(n_chunks, eb, **i32)
    meta = torch.empty(4, eb, **i32)
    sorted_rows = torch.empty((cdiv(pairs, hot_m) + min(experts, pairs)) * hot_m, **i32)
    act = torch.empty(pairs, inter, dtype=hidden_states.dtype, device=device)
    y = torch.empty(pairs, hidden, dtype=torch.float32, device=device)  # the reference keeps y in float32

    single = n_chunks == 1
    if not single:
        _moe._moe_histogram_kernel[(n_chunks,)](ids, rank, hist, pairs, experts, CHUNK=chunk, EB=eb,
                                                num_warps=_moe.SORT_NUM_WARPS)
    _moe._moe_scatter_kernel[(n_chunks,)](ids, rank, hist, sorted_rows, meta, pairs, experts, n_chunks,
                                          hot_rows if hot_cfg is not None else pairs + 1, CHUNK=chunk, EB=eb,
                                          CB=min(_moe.SORT_CHUNKS_PER_STEP, next_power_of_2(n_chunks)),
                                          BLOCK_M=block_m, HOT_BLOCK_M=hot_m, SINGLE_CHUNK=single,
                                          WHILE_LOOP=device.type == "cpu", num_warps=_moe.SORT_NUM_WARPS)
    classes = [(False, block_m, max_blocks, config)]
    if hot_cfg is not None:
        classes.append((True, hot_m, max_hot_blocks, hot_cfg))
    for hot, bm, blocks, c in classes:
        _w8a8_gemm(xq, x_scale, w_up, s_up, act, sorted_rows, meta, n_out=inter, k_dim=hidden, a_row_div=topk,
                   up_offset=inter, max_blocks=blocks, experts=experts, eb=eb, block_m=bm, hot=hot, silu=True,
                   cfg=c["up"])
    aq, a_scale = _row_quant(act, None, None, 0.0)
    for hot, bm, blocks, c in classes:
        _w8a8_gemm(aq, a_scale, w_down, s_down, y, sorted_rows, meta, n_out=hidden, k_dim=inter, a_row_div=1,
                   up_offset=0, max_blocks=blocks, experts=experts, eb=eb, block_m=bm, hot=hot, silu=False,
                   cfg=c["down"])
    weights = _unit_stride(topk_weights)
    block_h = min(_moe.COMBINE_BLOCK_H, next_power_of_2(hidden))
    _moe._moe_combine_kernel[(tokens, cdiv(hidden, block_h))](
        y, weights, out, hidden, topk, y.stride(0), weights.stride(0), out.stride(0),
        RENORMALIZE=renormalize, KB=next_power_of_2(topk), BLOCK_H=block_h, num_warps=_moe.COMBINE_NUM_WARPS)
    return out


# Every token bucket may have its own tiles and sorting chunk: the first eager call of a problem shape on a GPU
# compiles the kernel variants of every bucket up to moe.PRECOMPILE_MIN_TOKENS (as fused_moe does, through
# moe.run_buckets: smallest bucket first, within moe.PRECOMPILE_MAX_S, one log line with the variants compiled), so
# that serving never stops for a compile; DLINFER_PRECOMPILE=0 turns it off.
_precompiled: set[tuple] = set()
# the kernels a fused_moe_w8a8 call launches (whose new variants the precompile log line counts)
MOE_KERNELS = (_moe._moe_histogram_kernel, _moe._moe_scatter_kernel, _row_quant_kernel, _moe_w8a8_gemm_kernel,
               _moe._moe_combine_kernel)


def _precompile_on_first_use(hidden_states, gate_up_weights, gate_up_scales, down_weights, down_scales, topk):
    device, dtype = hidden_states.device, hidden_states.dtype
    if not _moe.precompile_gate(_precompiled, (device.index, dtype, gate_up_weights.shape, topk)):
        return
    experts, two_inter, hidden = gate_up_weights.shape

    def run_bucket(tokens):
        x, weights, ids = _moe.dummy_routing(tokens, hidden_states.shape[1], topk, experts, dtype, device)
        fused_moe_w8a8(x, gate_up_weights, gate_up_scales, down_weights, down_scales, weights, ids, False,
                       config=w8a8_launch_config(tokens, experts, topk, device))

    what = _moe.shape_label("fused_moe_w8a8", dtype, experts, topk, hidden, two_inter // 2)
    _moe.run_buckets(run_bucket, max(hidden_states.shape[0], _moe.PRECOMPILE_MIN_TOKENS), what, MOE_KERNELS)


def _fused_moe_w8a8_op(hidden_states, gate_up_weights, gate_up_scales, down_weights, down_scales, topk_weights,
                       topk_ids, renormalize):
    return fused_moe_w8a8(hidden_states, gate_up_weights, gate_up_scales, down_weights, down_scales, topk_weights,
                          topk_ids, renormalize)


OPS = {
    "weight_quant_matmul": weight_quant_matmul,
    "dynamic_quant": dynamic_quant,
    "linear_w8a8": linear_w8a8,
    "linear_w8a8_static": linear_w8a8_static,
    "rms_norm_w8a8": rms_norm_w8a8,
    "add_rms_norm_w8a8": add_rms_norm_w8a8,
    "fused_moe_w8a8": _fused_moe_w8a8_op,
}
