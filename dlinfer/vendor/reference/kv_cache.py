"""Cache writes, float or quantized (``quant_bits`` 8 / 4: the layout and rounding of ``dlinfer.ops.kv_quant``)."""

import torch

from dlinfer.ops.kv_quant import LEVELS, MIN_STEP_DIVISOR
from dlinfer.vendor.reference.quant import divide


def quantize(x: torch.Tensor, quant_bits: int, scale_dtype: torch.dtype, zero_dtype: torch.dtype):
    """``x [..., D]`` -> ``(q uint8 [..., D or D / 2], scale [...], zero [...])`` (float32 scale and zero, already
    rounded to their storage dtypes), one scale and zero per row of ``D`` values, in float32 as the contract
    defines it."""
    levels = LEVELS[quant_bits]
    x = x.float()
    lo, hi = x.amin(-1), x.amax(-1)
    step = torch.maximum(divide(hi - lo, levels), divide(torch.maximum(lo.abs(), hi.abs()),
                                                          MIN_STEP_DIVISOR * levels))
    scale = step.to(scale_dtype).float()
    scale = torch.where((scale == 0) | (hi == lo), torch.ones_like(scale), scale)
    zero = (-lo / scale).to(zero_dtype).float()
    q = torch.floor(x / scale[..., None] + zero[..., None] + 0.5).clamp(0, levels)
    finite = torch.isfinite(x).all(-1)  # NaN in, NaN out: the row's scale and zero are NaN, q is 0
    scale = torch.where(finite, scale, float("nan"))
    zero = torch.where(finite, zero, float("nan"))
    q = torch.where(finite[..., None], q, 0.0).to(torch.uint8)
    if quant_bits == 4:
        half = q.shape[-1] // 2
        q = q[..., :half] | (q[..., half:] << 4)
    return q, scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, quant_bits: int) -> torch.Tensor:
    """``(q - zero) * scale`` in float32: ``q [..., Dc]`` uint8, ``scale``/``zero`` ``[...]``."""
    if quant_bits == 4:
        q = torch.cat((q & 15, q >> 4), dim=-1)
    return (q.float() - zero.float()[..., None]) * scale.float()[..., None]


def fill_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  kv_start_indices: torch.Tensor, k_scales_zeros, v_scales_zeros, quant_bits: int) -> None:
    block_size = key_cache.shape[1]
    slots = kv_start_indices.long()
    keep = slots >= 0
    slots = slots[keep]
    blocks, offsets = slots // block_size, slots % block_size
    # Advanced indexing on the (possibly strided) cache views writes through to the packed buffer.
    for new, cache, scales_zeros in ((key, key_cache, k_scales_zeros), (value, value_cache, v_scales_zeros)):
        if not quant_bits:
            cache[blocks, offsets] = new[keep]
            continue
        scales, zeros = scales_zeros
        q, scale, zero = quantize(new[keep], quant_bits, scales.dtype, zeros.dtype)
        cache[blocks, offsets] = q
        scales[blocks, offsets] = scale.to(scales.dtype)
        zeros[blocks, offsets] = zero.to(zeros.dtype)
