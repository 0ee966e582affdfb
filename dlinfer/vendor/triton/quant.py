"""Quantized linear family in Triton: AWQ W4A16 GEMM (4-bit weights dequantized in the kernel, tile by tile), int8
GEMM (``tl.dot`` on int8 with int32 accumulation, the per-token/per-channel scales and biases in the epilogue),
one row kernel for per-token quantization with optional residual add and RMS norm fused in front, and the W8A8
experts (``fused_moe_w8a8``: fused_moe's expert-sorted grouped GEMM on int8 operands; see its section below).

The reduction length ``K`` is a compile-time constant of the dense GEMMs (a model has a few: hidden and
intermediate sizes), which also keeps Triton's interpreter, where ``range()`` over a runtime scalar fails under
numpy 2, working; the expert GEMMs loop with ``while`` under the interpreter instead, as fused_moe's do.

Rounding is to nearest, ties to even (as ``torch.round``), of correctly rounded float32 quotients (``div_rn``), so
the quantized values equal the reference's whenever both quantize the same float32 values.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import triton
import triton.language as tl

from dlinfer.vendor.triton import moe as _moe
from dlinfer.vendor.triton import tuning
from dlinfer.vendor.triton.host import cdiv, next_power_of_2

logger = logging.getLogger("dlinfer")


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


# ----------------------------------------------------------------------------------------------- AWQ W4A16
@triton.jit
def _awq_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K: tl.constexpr, group_size,
                     stride_xm, stride_qk, stride_sg, stride_zg, stride_om,
                     HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    word = rn // 8
    j = rn % 8
    shift = ((j % 2) * 4 + j // 2) * 4  # AWQ order 0 2 4 6 1 3 5 7: column j sits in nibble (j%2)*4 + j//2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        k_mask = ks < K
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wmask = k_mask[:, None] & n_mask[None, :]
        packed = tl.load(qw_ptr + ks[:, None].to(tl.int64) * stride_qk + word[None, :], mask=wmask, other=0)
        q = (packed >> shift[None, :]) & 0xF
        g = ks // group_size
        s = tl.load(s_ptr + g[:, None].to(tl.int64) * stride_sg + rn[None, :], mask=wmask, other=0.0)
        if HAS_ZEROS:
            zp = tl.load(z_ptr + g[:, None].to(tl.int64) * stride_zg + word[None, :], mask=wmask, other=0)
            z = (zp >> shift[None, :]) & 0xF
        else:
            z = tl.full((BLOCK_K, BLOCK_N), 8, dtype=tl.int32)
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x.dtype)
        if IEEE:  # float32 activations: full float32 products, not TF32
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _blocks(m: int) -> tuple[int, int]:
    return (16 if m <= 16 else 64), 64


def weight_quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                        bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    x = x.contiguous()
    qweight, scale = qweight.contiguous(), scale.contiguous()
    offset = offset.contiguous() if offset is not None else None
    m, k = x.shape
    n = qweight.shape[1] * 8
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    block_m, block_n = _blocks(m)
    block_k = min(32, group_size)  # a K tile never straddles two groups' rows in one load of scales
    grid = (cdiv(m, block_m), cdiv(n, block_n))
    _awq_gemm_kernel[grid](x, qweight, scale, offset if offset is not None else qweight,
                           bias if bias is not None else scale, out, m, n, k, group_size,
                           x.stride(0), qweight.stride(0), scale.stride(0),
                           offset.stride(0) if offset is not None else 0, out.stride(0),
                           HAS_ZEROS=offset is not None, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


# ----------------------------------------------------------------------------------------------- int8 GEMM
@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, out_ptr, row_scale_ptr, col_scale_ptr, qbias_ptr, bias_ptr, M, N, K: tl.constexpr,
                      stride_am, stride_bn, stride_om,
                      HAS_ROW_SCALE: tl.constexpr, HAS_QBIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out = ((a @ b.T) [+ qbias]) [* row_scale[m]] * col_scale[n] [+ bias]``, int32 accumulation."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        k_mask = ks < K
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + ks[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(b_ptr + rn[None, :].to(tl.int64) * stride_bn + ks[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc += tl.dot(a, b)
    if HAS_QBIAS:
        acc += tl.load(qbias_ptr + rn, mask=n_mask, other=0)[None, :]
    out = acc.to(tl.float32)
    if HAS_ROW_SCALE:
        out = out * tl.load(row_scale_ptr + rm, mask=m_mask, other=0.0)[:, None]
    out = out * tl.load(col_scale_ptr + rn, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _int8_gemm(a2: torch.Tensor, b: torch.Tensor, row_scale, col_scale, qbias, bias, out_dtype) -> torch.Tensor:
    m, k = a2.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a2.device)
    if m == 0 or n == 0:
        return out
    block_m, block_n = _blocks(m)
    grid = (cdiv(m, block_m), cdiv(n, block_n))
    dummy = col_scale
    _int8_gemm_kernel[grid](a2, b, out, row_scale if row_scale is not None else dummy, col_scale,
                            qbias if qbias is not None else dummy, bias if bias is not None else dummy,
                            m, n, k, a2.stride(0), b.stride(0), out.stride(0),
                            HAS_ROW_SCALE=row_scale is not None, HAS_QBIAS=qbias is not None,
                            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32)
    return out


def linear_w8a8(a: torch.Tensor, b: torch.Tensor, rms_scale: torch.Tensor, linear_scale: torch.Tensor,
                out_dtype: torch.dtype, quant_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    a2 = a.reshape(-1, a.shape[-1]).contiguous()
    out = _int8_gemm(a2, b.contiguous(), rms_scale.reshape(-1).float().contiguous(),
                     linear_scale.reshape(-1).float().contiguous(), None, bias, out_dtype)
    return out.reshape(*a.shape[:-1], b.shape[0])


@triton.jit
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
                       quant_bias: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    xq = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    if x2.numel():
        block = 1024
        _static_quant_kernel[(cdiv(x2.numel(), block),)](x2, xq, input_scale.reshape(1),
                                                                  input_offset.reshape(1), x2.numel(), BLOCK=block)
    out = _int8_gemm(xq, weight.contiguous(), None, deq_scale.reshape(-1).float().contiguous(),
                     quant_bias.contiguous() if quant_bias is not None else None, None, out_dtype)
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


def w8a8_launch_config(tokens: int, experts: int, topk: int) -> dict:
    """The tile config of a ``fused_moe_w8a8`` call (``BLOCK_M``, ``up``, ``down``) and, under ``hot``, the hot
    experts' config (see :data:`W8A8_TIERS`)."""
    cfg = tuning._tier(W8A8_TIERS, tokens * topk / experts)
    return dict(cfg, hot=tuning._tier(W8A8_TIERS, tuning.HOT_LOAD))


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
        config = w8a8_launch_config(tokens, experts, topk)
    block_m = config["BLOCK_M"]
    hot_cfg, hot_rows = config.get("hot"), 0
    if hot_cfg is not None and hot_cfg["BLOCK_M"] > block_m and hot_cfg["BLOCK_M"] % block_m == 0:
        hot_rows = config.get("hot_rows", hot_cfg["BLOCK_M"])
        if tokens < hot_rows:  # an expert holds at most ``tokens`` rows
            hot_cfg, hot_rows = None, 0
    else:
        hot_cfg = None
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
# compiles the kernel variants of every bucket up to moe.PRECOMPILE_MIN_TOKENS (as fused_moe does), so that
# serving never stops for a compile; DLINFER_PRECOMPILE=0 turns it off.
_precompiled: set[tuple] = set()


def _precompile_on_first_use(hidden_states, gate_up_weights, gate_up_scales, down_weights, down_scales, topk):
    device, dtype = hidden_states.device, hidden_states.dtype
    if not _moe.precompile_gate(_precompiled, (device.index, dtype, gate_up_weights.shape, topk)):
        return
    t0, experts = time.perf_counter(), gate_up_weights.shape[0]
    max_tokens = max(hidden_states.shape[0], _moe.PRECOMPILE_MIN_TOKENS)
    for tokens in _moe.buckets(max_tokens):
        x, weights, ids = _moe.dummy_routing(tokens, hidden_states.shape[1], topk, experts, dtype, device)
        fused_moe_w8a8(x, gate_up_weights, gate_up_scales, down_weights, down_scales, weights, ids, False,
                       config=w8a8_launch_config(tokens, experts, topk))
    logger.info("dlinfer: fused_moe_w8a8 kernels for E=%d top-%d hidden %d intermediate %d compiled up to %d "
                "tokens in %.1f s", experts, topk, gate_up_weights.shape[2], gate_up_weights.shape[1] // 2,
                max_tokens, time.perf_counter() - t0)


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
