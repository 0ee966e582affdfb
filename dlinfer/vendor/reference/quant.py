"""Quantized linear-family ops in plain PyTorch: AWQ W4A16 and SmoothQuant-style W8A8 (int8 weights and
activations, per-channel weight scales, per-token dynamic activation scales).

Layouts are the ones LMDeploy 0.18's dlinfer backend passes (documented on the public ops in
``dlinfer.ops.quant``). Everything is computed in float32 (int8 products accumulate exactly in int32 first) and
rounded once at the end.
"""

from __future__ import annotations

import torch

# AWQ's GEMM checkpoints pack 8 4-bit values per int32 along the output dim: nibble i (bits 4i..4i+3) of a word
# holds column AWQ_ORDER[i] of its group of 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.tensor([4 * AWQ_ORDER.index(j) for j in range(8)], dtype=torch.int32)


def divide(a: torch.Tensor, b: float) -> torch.Tensor:
    """``a / b`` correctly rounded on every device, as the contracts' scales are defined. torch computes
    ``tensor / number`` on CUDA as a multiplication by the float32 reciprocal (one bit off in the last place for
    many ``a``: the GPU's float32 scales would then differ from the CPU's and from the kernels', which divide); a
    divisor tensor on ``a``'s device is a real division everywhere."""
    return a / torch.full_like(a, b)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """``[R, C/8]`` int32 in AWQ's nibble order -> ``[R, C]`` int32 values in 0..15, columns in natural order."""
    shifts = _SHIFTS.to(packed.device)
    vals = (packed.unsqueeze(-1) >> shifts) & 0xF
    return vals.reshape(packed.shape[0], packed.shape[1] * 8)


def awq_dequantize(qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                   group_size: int) -> torch.Tensor:
    """The float32 ``[K, N]`` weight: ``(q - zero) * scale`` per group of ``group_size`` input rows."""
    q = unpack_awq(qweight).float()
    k = q.shape[0]
    zeros = unpack_awq(offset).float() if offset is not None else torch.full_like(scale, 8, dtype=torch.float32)
    zeros = zeros.repeat_interleave(group_size, dim=0)[:k]
    scales = scale.float().repeat_interleave(group_size, dim=0)[:k]
    return (q - zeros) * scales


def weight_quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                        bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    w = awq_dequantize(qweight, scale, offset, group_size)
    out = x.float() @ w
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _qrange(quant_dtype: torch.dtype) -> float:
    return float(torch.iinfo(quant_dtype).max)


def quantize_per_token(x: torch.Tensor, quant_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token (last dim) quantization of a float32 tensor: ``(q, scale)``, ``x ~= q * scale``; an
    all-zero row gets scale ``1 / qmax`` (never 0, never NaN)."""
    qmax = _qrange(quant_dtype)
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, divide(absmax, qmax), torch.full_like(absmax, 1.0 / qmax))
    q = torch.round(x / scale).clamp(-qmax, qmax).to(quant_dtype)
    return q, scale.to(torch.float32)


def dynamic_quant(x: torch.Tensor, quant_dtype: torch.dtype, quant_granularity: str):
    return quantize_per_token(x.float(), quant_dtype)


def linear_w8a8(a: torch.Tensor, b: torch.Tensor, rms_scale: torch.Tensor, linear_scale: torch.Tensor,
                out_dtype: torch.dtype, quant_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    n = b.shape[0]
    a2 = a.reshape(-1, a.shape[-1])
    acc = a2.double() @ b.double().T  # exact: int8 products summed stay far below 2**53
    out = acc.float() * rms_scale.reshape(-1, 1).float() * linear_scale.reshape(1, n).float()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).reshape(*a.shape[:-1], n)


def linear_w8a8_static(x: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor,
                       deq_scale: torch.Tensor, out_dtype: torch.dtype, quant_dtype: torch.dtype,
                       quant_bias: torch.Tensor | None) -> torch.Tensor:
    qmax = _qrange(quant_dtype)
    xq = torch.round(x.float() / input_scale.float().reshape(())) + input_offset.float().reshape(())
    xq = xq.clamp(-qmax - 1, qmax).double()
    n = weight.shape[0]
    acc = xq.reshape(-1, x.shape[-1]) @ weight.double().T  # exact integer sums in float64
    if quant_bias is not None:
        acc = acc + quant_bias.double()
    out = acc.float() * deq_scale.float().reshape(1, n)
    return out.to(out_dtype).reshape(*x.shape[:-1], n)


def _rms(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon) * weight.float()


def rms_norm_w8a8(hidden_states: torch.Tensor, weight: torch.Tensor, epsilon: float, quant_dtype: torch.dtype):
    return quantize_per_token(_rms(hidden_states, weight, epsilon), quant_dtype)


def add_rms_norm_w8a8(hidden_states: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float,
                      quant_dtype: torch.dtype):
    total = (hidden_states.float() + residual.float()).to(hidden_states.dtype)
    q, scale = quantize_per_token(_rms(total, weight, epsilon), quant_dtype)
    return q, scale, total


def fused_moe_w8a8(hidden_states: torch.Tensor, gate_up_weights: torch.Tensor, gate_up_scales: torch.Tensor,
                   down_weights: torch.Tensor, down_scales: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, renormalize: bool) -> torch.Tensor:
    weights = topk_weights.float()
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    if gate_up_weights.shape[1] == 0 or hidden_states.shape[0] == 0:  # no intermediate features / no tokens
        return out.to(hidden_states.dtype)
    xq, xs = quantize_per_token(hidden_states.float(), torch.int8)
    ids = topk_ids.long()
    for expert in torch.unique(ids).tolist():
        token_idx, slot_idx = torch.nonzero(ids == expert, as_tuple=True)
        gate_up = (xq[token_idx].double() @ gate_up_weights[expert].double().T).float()
        gate_up = gate_up * xs[token_idx] * gate_up_scales[expert].float().reshape(1, -1)
        gate, up = gate_up.chunk(2, dim=-1)
        act = (torch.nn.functional.silu(gate) * up).to(hidden_states.dtype)  # as a separate op would round it
        aq, as_ = quantize_per_token(act.float(), torch.int8)
        y = (aq.double() @ down_weights[expert].double().T).float() * as_ * down_scales[expert].float().reshape(1, -1)
        out.index_add_(0, token_idx, y * weights[token_idx, slot_idx, None])
    return out.to(hidden_states.dtype)
