"""Quantized linear family in Triton: AWQ W4A16 GEMM (4-bit weights dequantized in the kernel, tile by tile), int8
GEMM (``tl.dot`` on int8 with int32 accumulation, the per-token/per-channel scales and biases in the epilogue), and
one row kernel for per-token quantization with optional residual add and RMS norm fused in front.

The reduction length ``K`` is a compile-time constant of the GEMMs (a model has a few: hidden and intermediate
sizes), which also keeps Triton's interpreter, where ``range()`` over a runtime scalar fails under numpy 2, working.

Rounding is to nearest, ties to even (as ``torch.round``), so the quantized values equal the reference's whenever
both compute the same float32 quotient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlinfer.vendor.triton.host import cdiv, next_power_of_2


@triton.jit
def _round_half_even(y):
    r = tl.floor(y + 0.5)
    tie_odd = ((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
    return tl.where(tie_odd, r - 1.0, r)


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
    q = tl.minimum(tl.maximum(_round_half_even(x / scale) + offset, -128.0), 127.0)
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
            # round to nearest even on the float32 bits, so the cast below is exact (Triton's interpreter would
            # truncate); finite sums only (a NaN/Inf sum keeps its class)
            bits = total.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            total = bits.to(tl.float32, bitcast=True)
        x = total.to(x_ptr.dtype.element_ty)  # the new residual stream, rounded to the input dtype
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    y = x.to(tl.float32)
    if NORM:
        inv = tl.rsqrt(tl.sum(y * y, axis=0) / hidden + eps)
        y = y * inv * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(y), axis=0)
    scale = tl.where(amax > 0, amax / 127.0, 1.0 / 127.0)
    q = tl.minimum(tl.maximum(_round_half_even(y / scale), -127.0), 127.0)
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


OPS = {
    "weight_quant_matmul": weight_quant_matmul,
    "dynamic_quant": dynamic_quant,
    "linear_w8a8": linear_w8a8,
    "linear_w8a8_static": linear_w8a8_static,
    "rms_norm_w8a8": rms_norm_w8a8,
    "add_rms_norm_w8a8": add_rms_norm_w8a8,
}
