"""Every argument rule of dlinfer.ops: a ValueError/TypeError naming the argument, and nothing written.

Each case starts from a valid call (which must succeed), changes one argument, and expects the error to name
that argument. ``meta`` tensors stand in for "another device" on this CPU-only machine.
"""

from __future__ import annotations

import pytest
import torch

import dlinfer.ops as ops
from dlinfer.errors import NotSupportedError
from dlinfer.ops import _checks
from dlinfer.utils.type_annotation import MoeMetadata

F16 = torch.float16
META = torch.device("meta")


def g():
    return torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g()).to(dtype)


# ----------------------------------------------------------------------------------- valid base calls
def base_silu():
    return dict(x=r(3, 8))


def base_rms():
    return dict(hidden_states=r(3, 8), weight=r(8), epsilon=1e-6)


def base_add_rms():
    return dict(hidden_states=r(3, 8), residual=r(3, 8), weight=r(8), epsilon=1e-6)


def base_rotary():
    return dict(query=r(4, 4, 8), key=r(4, 2, 8), cos=r(4, 8), sin=r(4, 8))


def base_fill():
    return dict(key=r(3, 2, 8), value=r(3, 2, 6), key_cache=r(2, 16, 2, 8), value_cache=r(2, 16, 2, 6),
                kv_start_indices=torch.tensor([0, 17, -1]))


def base_prefill():
    return dict(query=r(5, 4, 8), key=r(5, 2, 8), value=r(5, 2, 8), key_cache=None, value_cache=None,
                q_seqlens=torch.tensor([2, 3]), kv_seqlens=torch.tensor([2, 3]), max_q_seq_len=3, num_q_heads=4,
                num_kv_heads=2, attn_mask=[True])


def base_paged_prefill():
    return dict(query=r(4, 4, 8), key=None, value=None, key_cache=r(3, 16, 2, 8), value_cache=r(3, 16, 2, 8),
                block_offsets=torch.tensor([[2, 0], [1, 2]], dtype=torch.int32), block_size=16,
                cu_seqlens_q=torch.tensor([3, 4]), kv_seqlens=torch.tensor([20, 1]), max_q_seq_len=3,
                max_kv_seq_len=20, num_q_heads=4, num_kv_heads=2, attn_mask=[True])


def base_decode():
    return dict(query=r(2, 4, 8), key_cache=r(3, 16, 2, 8), value_cache=r(3, 16, 2, 8),
                block_offsets=torch.tensor([[2, 0], [1, 2]], dtype=torch.int32), block_size=16, cu_seqlens_q=None,
                kv_seqlens=torch.tensor([20, 1]), max_kv_seq_len=32, num_q_heads=4, num_kv_heads=2)


def base_gating():
    return dict(router_logits=r(5, 6), topk=2, moe_metadata=None)


def base_moe():
    return dict(hidden_states=r(3, 8), gate_up_weights=r(4, 12, 8), down_weights=r(4, 8, 6),
                topk_weights=torch.rand(3, 2), topk_ids=torch.tensor([[0, 3], [1, 2], [3, 1]]), topk=2,
                renormalize=True, moe_metadata=None, chunked_moe_layout=None)


def base_linear():
    return dict(x=r(3, 8), weight=r(5, 8), bias=r(5))


def base_rotary_fill():
    return dict(query=r(3, 4, 8), key=r(3, 2, 8), value=r(3, 2, 8), key_cache=r(2, 16, 2, 8),
                value_cache=r(2, 16, 2, 8), cos=r(3, 8), sin=r(3, 8), kv_start_indices=torch.tensor([0, 17, -1]))


def i8(*shape):
    return torch.randint(-127, 128, shape, generator=g()).to(torch.int8)


def base_awq():
    return dict(x=r(3, 64, dtype=F16), qweight=torch.randint(-2 ** 31, 2 ** 31 - 1, (64, 2), dtype=torch.int32),
                scale=r(2, 16, dtype=F16).abs(), offset=torch.zeros(2, 2, dtype=torch.int32), bias=r(16, dtype=F16),
                group_size=32)


def base_dynamic_quant():
    return dict(x=r(3, 8), quant_dtype=torch.int8)


def base_w8a8():
    return dict(a=i8(3, 8), b=i8(5, 8), rms_scale=r(3, 1).abs(), linear_scale=r(5, 1).abs(), out_dtype=F16,
                quant_dtype=torch.int8, bias=r(5, dtype=F16))


def base_w8a8_static():
    return dict(x=r(3, 8), weight=i8(5, 8), input_scale=torch.tensor([0.05]),
                input_offset=torch.tensor([1], dtype=torch.int8), deq_scale=r(5).abs(), out_dtype=F16,
                quant_dtype=torch.int8, quant_bias=torch.zeros(5, dtype=torch.int32))


def base_rms_w8a8():
    return dict(hidden_states=r(3, 8), weight=r(8), epsilon=1e-6, quant_dtype=torch.int8)


def base_add_rms_w8a8():
    return dict(hidden_states=r(3, 8), residual=r(3, 8), weight=r(8), epsilon=1e-6, quant_dtype=torch.int8)


def base_moe_w8a8():
    return dict(hidden_states=r(3, 8), gate_up_weights=i8(4, 12, 8), gate_up_scales=r(4, 12, 1).abs(),
                down_weights=i8(4, 8, 6), down_scales=r(4, 8, 1).abs(), topk_weights=r(3, 2).abs(),
                topk_ids=torch.tensor([[0, 3], [1, 2], [3, 1]]), topk=2, renormalize=True)


OPS = {
    "silu_and_mul": (ops.silu_and_mul, base_silu),
    "rms_norm": (ops.rms_norm, base_rms),
    "add_rms_norm": (ops.add_rms_norm, base_add_rms),
    "apply_rotary_pos_emb": (ops.apply_rotary_pos_emb, base_rotary),
    "fill_kv_cache": (ops.fill_kv_cache, base_fill),
    "prefill_attention": (ops.prefill_attention, base_prefill),
    "paged_prefill_attention": (ops.paged_prefill_attention, base_paged_prefill),
    "paged_decode_attention": (ops.paged_decode_attention, base_decode),
    "moe_gating_topk_softmax": (ops.moe_gating_topk_softmax, base_gating),
    "fused_moe": (ops.fused_moe, base_moe),
    "linear": (ops.linear, base_linear),
    "weight_quant_matmul": (ops.weight_quant_matmul, base_awq),
    "dynamic_quant": (ops.dynamic_quant, base_dynamic_quant),
    "linear_w8a8": (ops.linear_w8a8, base_w8a8),
    "linear_w8a8_static": (ops.linear_w8a8_static, base_w8a8_static),
    "rms_norm_w8a8": (ops.rms_norm_w8a8, base_rms_w8a8),
    "add_rms_norm_w8a8": (ops.add_rms_norm_w8a8, base_add_rms_w8a8),
    "fused_moe_w8a8": (ops.fused_moe_w8a8, base_moe_w8a8),
    "apply_rotary_pos_emb_fill_kv_cache": (ops.apply_rotary_pos_emb_fill_kv_cache, base_rotary_fill),
}


def strided_last(t):
    """The same values with last-dim stride 2."""
    return torch.stack([t, t], dim=-1)[..., 0]


# (op, id, {argument: new value} or a callable(kwargs) -> None, exception, regex the message must match)
C = []


def case(op, cid, change, exc, match):
    C.append(pytest.param(op, change, exc, match, id=f"{op}-{cid}"))


# silu_and_mul
case("silu_and_mul", "not-tensor", {"x": [1.0, 2.0]}, TypeError, r"^x must be a torch.Tensor")
case("silu_and_mul", "int-dtype", {"x": torch.ones(2, 4, dtype=torch.int32)}, ValueError, r"^x must have dtype")
case("silu_and_mul", "scalar", {"x": torch.tensor(1.0)}, ValueError, r"^x must have at least 1 dimension")
case("silu_and_mul", "odd", {"x": r(3, 7)}, ValueError, r"^x.shape\[1\] must be even")
case("silu_and_mul", "dim-type", {"dim": 1.0}, TypeError, r"^dim must be an int")
case("silu_and_mul", "dim-range", {"dim": 2}, ValueError, r"^dim must be in \[-2, 2\)")
# rms_norm / add_rms_norm
case("rms_norm", "not-tensor", {"hidden_states": 3}, TypeError, r"^hidden_states must be a torch.Tensor")
case("rms_norm", "dtype", {"hidden_states": torch.ones(3, 8, dtype=torch.float64)}, ValueError, r"^hidden_states")
case("rms_norm", "scalar", {"hidden_states": torch.tensor(1.0), "weight": r(1)}, ValueError, r"^hidden_states")
case("rms_norm", "weight-ndim", {"weight": r(1, 8)}, ValueError, r"^weight must have 1 dimension,")
case("rms_norm", "weight-size", {"weight": r(7)}, ValueError, r"^weight.shape\[0\] must equal")
case("rms_norm", "eps-type", {"epsilon": "1e-6"}, TypeError, r"^epsilon must be a float")
case("rms_norm", "eps-negative", {"epsilon": -1e-6}, ValueError, r"^epsilon must be >= 0")
case("rms_norm", "eps-nan", {"epsilon": float("nan")}, ValueError, r"^epsilon must be finite")
case("rms_norm", "weight-device", {"weight": torch.empty(8, device=META)}, ValueError, r"^weight is on meta")
case("add_rms_norm", "residual-shape", {"residual": r(3, 9)}, ValueError, r"^residual must have hidden_states")
case("add_rms_norm", "residual-dtype", {"residual": r(3, 8, dtype=F16)}, ValueError, r"^residual has dtype")
case("add_rms_norm", "residual-type", {"residual": 1.0}, TypeError, r"^residual must be a torch.Tensor")
case("add_rms_norm", "residual-device", {"residual": torch.empty(3, 8, device=META)}, ValueError, r"^residual is on")
# rotary
case("apply_rotary_pos_emb", "query-ndim", {"query": r(4, 32)}, ValueError, r"^query must have 3 dimensions")
case("apply_rotary_pos_emb", "key-dtype", {"key": r(4, 2, 8, dtype=F16)}, ValueError, r"^key has dtype")
case("apply_rotary_pos_emb", "key-tokens", {"key": r(5, 2, 8)}, ValueError, r"^key.shape\[0\] must equal")
case("apply_rotary_pos_emb", "key-head-size", {"key": r(4, 2, 6)}, ValueError, r"^key.shape\[2\] must equal")
case("apply_rotary_pos_emb", "odd-head-size", {"query": r(4, 4, 7), "key": r(4, 2, 7), "cos": r(4, 7),
                                               "sin": r(4, 7)}, ValueError, r"^query's head size must be even")
case("apply_rotary_pos_emb", "query-stride", {"query": strided_last(r(4, 4, 8))}, ValueError,
     r"^query must have stride 1")
case("apply_rotary_pos_emb", "cos-shape", {"cos": r(4, 6)}, ValueError, r"^cos must hold one row")
case("apply_rotary_pos_emb", "sin-tokens", {"sin": r(3, 8)}, ValueError, r"^sin must hold one row")
case("apply_rotary_pos_emb", "cos-dtype", {"cos": torch.ones(4, 8, dtype=torch.int64)}, ValueError, r"^cos must have")
case("apply_rotary_pos_emb", "cos-device", {"cos": torch.empty(4, 8, device=META)}, ValueError, r"^cos is on meta")
# fill_kv_cache
case("fill_kv_cache", "key-ndim", {"key": r(3, 16)}, ValueError, r"^key must have 3 dimensions")
case("fill_kv_cache", "value-tokens", {"value": r(4, 2, 6)}, ValueError, r"^value.shape\[0\] must equal")
case("fill_kv_cache", "value-heads", {"value": r(3, 1, 6)}, ValueError, r"^value.shape\[1\] must equal")
case("fill_kv_cache", "slots-dtype", {"kv_start_indices": torch.tensor([0.0, 1.0, 2.0])}, ValueError,
     r"^kv_start_indices must have dtype")
case("fill_kv_cache", "slots-length", {"kv_start_indices": torch.tensor([0, 1])}, ValueError,
     r"^kv_start_indices.shape\[0\] must equal")
case("fill_kv_cache", "slots-ndim", {"kv_start_indices": torch.tensor([[0, 1, 2]])}, ValueError,
     r"^kv_start_indices must have 1 dimension,")
case("fill_kv_cache", "cache-ndim", {"key_cache": r(32, 2, 8)}, ValueError, r"^key_cache must have 4 dimensions")
case("fill_kv_cache", "cache-mismatch", {"value_cache": r(3, 16, 2, 6)}, ValueError,
     r"^value_cache must share key_cache")
case("fill_kv_cache", "cache-heads", {"key_cache": r(2, 16, 4, 8), "value_cache": r(2, 16, 4, 6)}, ValueError,
     r"^key_cache.shape\[2\] must equal num_kv_heads")
case("fill_kv_cache", "cache-head-size", {"key_cache": r(2, 16, 2, 4)}, ValueError,
     r"^key_cache.shape\[3\] must equal the key head size")
case("fill_kv_cache", "value-cache-head-size", {"value_cache": r(2, 16, 2, 8)}, ValueError,
     r"^value_cache.shape\[3\] must equal the value head size")
case("fill_kv_cache", "cache-dtype", {"key_cache": r(2, 16, 2, 8, dtype=F16)}, ValueError, r"^key_cache has dtype")
case("fill_kv_cache", "cache-stride", {"key_cache": strided_last(r(2, 16, 2, 8))}, ValueError,
     r"^key_cache must have stride 1")
case("fill_kv_cache", "slot-too-big", {"kv_start_indices": torch.tensor([0, 32, 1])}, ValueError,
     r"^kv_start_indices must hold values in \[0, 32\) or -1")
case("fill_kv_cache", "slot-below-minus-one", {"kv_start_indices": torch.tensor([0, -2, 1])}, ValueError,
     r"^kv_start_indices must hold values")
case("fill_kv_cache", "quant-bits-negative", {"quant_bits": -1}, ValueError, r"^quant_bits must be >= 0")
case("fill_kv_cache", "quant-bits-type", {"quant_bits": "8"}, TypeError, r"^quant_bits must be an int")
case("fill_kv_cache", "slots-device", {"kv_start_indices": torch.empty(3, dtype=torch.int64, device=META)},
     ValueError, r"^kv_start_indices is on meta")
# prefill_attention
case("prefill_attention", "heads-type", {"num_q_heads": 4.0}, TypeError, r"^num_q_heads must be an int")
case("prefill_attention", "kv-heads-zero", {"num_kv_heads": 0}, ValueError, r"^num_kv_heads must be >= 1")
case("prefill_attention", "heads-divisible", {"num_q_heads": 4, "num_kv_heads": 3}, ValueError,
     r"^num_q_heads \(4\) must be a multiple of num_kv_heads \(3\)")
case("prefill_attention", "query-heads", {"num_q_heads": 2}, ValueError, r"^query.shape\[1\] must equal num_q_heads")
case("prefill_attention", "query-2d-split", {"query": r(5, 30)}, ValueError, r"^query of shape \(5, 30\) cannot be")
case("prefill_attention", "query-dtype", {"query": torch.ones(5, 4, 8, dtype=torch.int32)}, ValueError, r"^query")
case("prefill_attention", "key-head-size", {"key": r(5, 2, 6)}, ValueError, r"^key.shape\[2\] must equal")
case("prefill_attention", "key-heads", {"key": r(5, 1, 8)}, ValueError, r"^key.shape\[1\] must equal num_q_heads")
case("prefill_attention", "value-tokens", {"value": r(4, 2, 8)}, ValueError, r"^value.shape\[0\] must equal")
case("prefill_attention", "key-dtype", {"key": r(5, 2, 8, dtype=F16)}, ValueError, r"^key has dtype")
case("prefill_attention", "q-seqlens-dtype", {"q_seqlens": torch.tensor([2.0, 3.0])}, ValueError, r"^q_seqlens")
case("prefill_attention", "kv-seqlens-batch", {"kv_seqlens": torch.tensor([5])}, ValueError,
     r"^kv_seqlens.shape\[0\] must equal the batch size")
case("prefill_attention", "max-q-negative", {"max_q_seq_len": -1}, ValueError, r"^max_q_seq_len must be >= 0")
case("prefill_attention", "mask-none", {"attn_mask": None}, TypeError, r"^attn_mask must be a sequence")
case("prefill_attention", "mask-tensor", {"attn_mask": torch.ones(2)}, TypeError, r"^attn_mask must be a sequence")
case("prefill_attention", "scale-zero", {"softmax_scale": 0.0}, ValueError, r"^softmax_scale must be in \(0, ")
case("prefill_attention", "scale-type", {"softmax_scale": "0.1"}, TypeError, r"^softmax_scale must be a float")
case("prefill_attention", "out-shape", {"attn_output": r(5, 4, 6)}, ValueError, r"^attn_output must have shape")
case("prefill_attention", "out-dtype", {"attn_output": r(5, 4, 8, dtype=F16)}, ValueError, r"^attn_output must have")
case("prefill_attention", "out-stride", {"attn_output": strided_last(r(5, 4, 8))}, ValueError,
     r"^attn_output must have stride 1")
case("prefill_attention", "out-device", {"attn_output": torch.empty(5, 4, 8, device=META)}, ValueError,
     r"^attn_output is on meta")
case("prefill_attention", "key-device", {"key": torch.empty(5, 2, 8, device=META)}, ValueError, r"^key is on meta")
case("prefill_attention", "lengths-device", {"q_seqlens": torch.tensor([2, 3], device=META)}, ValueError,
     r"^q_seqlens is on meta")
case("prefill_attention", "q-len-over-max", {"max_q_seq_len": 2}, ValueError, r"^q_seqlens must hold values")
case("prefill_attention", "q-sum-over-tokens", {"q_seqlens": torch.tensor([3, 3]), "kv_seqlens": torch.tensor([3, 2])},
     ValueError, r"q_seqlens sum to 6")
case("prefill_attention", "kv-sum-over-tokens", {"kv_seqlens": torch.tensor([2, 4])}, ValueError,
     r"kv_seqlens sum to 6")
case("prefill_attention", "causal-q-over-kv", {"kv_seqlens": torch.tensor([1, 3])}, ValueError,
     r"q_seqlens <= kv_seqlens")
# paged_prefill_attention
case("paged_prefill_attention", "block-size", {"block_size": 32}, ValueError,
     r"^block_size \(32\) must equal key_cache.shape\[1\]")
case("paged_prefill_attention", "block-size-type", {"block_size": "16"}, TypeError, r"^block_size must be an int")
case("paged_prefill_attention", "table-ndim", {"block_offsets": torch.tensor([2, 0])}, ValueError,
     r"^block_offsets must have 2 dimensions")
case("paged_prefill_attention", "table-batch", {"block_offsets": torch.tensor([[2, 0]])}, ValueError,
     r"^block_offsets.shape\[0\] must equal the batch size")
case("paged_prefill_attention", "table-dtype", {"block_offsets": torch.tensor([[2.0, 0], [1, 2]])}, ValueError,
     r"^block_offsets must have dtype")
case("paged_prefill_attention", "cu-dtype", {"cu_seqlens_q": torch.tensor([3.0, 4.0])}, ValueError, r"^cu_seqlens_q")
case("paged_prefill_attention", "kv-batch", {"kv_seqlens": torch.tensor([20])}, ValueError,
     r"^kv_seqlens.shape\[0\] must equal the batch size")
case("paged_prefill_attention", "cache-heads", {"num_q_heads": 4, "num_kv_heads": 1}, ValueError,
     r"^key_cache.shape\[2\] must equal num_kv_heads")
case("paged_prefill_attention", "head-size-v", {"head_size_v": 4}, ValueError, r"^value_cache.shape\[3\] must equal")
case("paged_prefill_attention", "head-size-v-type", {"head_size_v": 4.0}, TypeError, r"^head_size_v must be an int")
case("paged_prefill_attention", "cache-dtype", {"key_cache": r(3, 16, 2, 8, dtype=F16)}, ValueError,
     r"^key_cache has dtype")
case("paged_prefill_attention", "max-kv-negative", {"max_kv_seq_len": -3}, ValueError, r"^max_kv_seq_len must be")
case("paged_prefill_attention", "mask-none", {"attn_mask": None}, TypeError, r"^attn_mask must be a sequence")
case("paged_prefill_attention", "kv-over-capacity", {"kv_seqlens": torch.tensor([33, 1]), "max_kv_seq_len": 64},
     ValueError, r"^kv_seqlens must hold values in \[0, 33\)")
case("paged_prefill_attention", "kv-over-max", {"max_kv_seq_len": 10}, ValueError, r"^kv_seqlens must hold values")
case("paged_prefill_attention", "block-id-range", {"block_offsets": torch.tensor([[2, 3], [1, 2]])}, ValueError,
     r"^block_offsets must hold values in \[0, 3\)")
case("paged_prefill_attention", "cu-decreasing", {"cu_seqlens_q": torch.tensor([3, 2])}, ValueError,
     r"^cu_seqlens_q must be non-decreasing")
case("paged_prefill_attention", "cu-over-tokens", {"cu_seqlens_q": torch.tensor([3, 5])}, ValueError,
     r"^cu_seqlens_q ends at 5")
case("paged_prefill_attention", "q-over-max", {"max_q_seq_len": 2}, ValueError, r"max_q_seq_len \(2\)")
case("paged_prefill_attention", "q-over-kv", {"kv_seqlens": torch.tensor([2, 1])}, ValueError, r"q_len <= kv_seqlens")
case("paged_prefill_attention", "table-device", {"block_offsets": torch.empty(2, 2, dtype=torch.int32, device=META)},
     ValueError, r"^block_offsets is on meta")
case("paged_prefill_attention", "cache-device", {"key_cache": torch.empty(3, 16, 2, 8, device=META)}, ValueError,
     r"^key_cache is on meta")
# paged_decode_attention
case("paged_decode_attention", "kv-batch", {"kv_seqlens": torch.tensor([20, 1, 1])}, ValueError,
     r"^kv_seqlens.shape\[0\] must equal the batch size")
case("paged_decode_attention", "table-batch", {"block_offsets": torch.tensor([[2, 0]])}, ValueError,
     r"^block_offsets.shape\[0\] must equal the batch size")
case("paged_decode_attention", "query-ndim", {"query": r(2, 4, 8, 1)}, ValueError, r"^query must have 2 or 3 dim")
case("paged_decode_attention", "query-heads", {"query": r(2, 2, 8)}, ValueError, r"^query.shape\[1\] must equal")
case("paged_decode_attention", "heads-divisible", {"num_kv_heads": 3}, ValueError, r"^num_q_heads \(4\) must be a")
case("paged_decode_attention", "block-size", {"block_size": 64}, ValueError, r"^block_size \(64\) must equal")
case("paged_decode_attention", "cache-head-size", {"key_cache": r(3, 16, 2, 4), "value_cache": r(3, 16, 2, 4)},
     ValueError, r"^key_cache.shape\[3\] must equal the key head size")
case("paged_decode_attention", "value-cache-shape", {"value_cache": r(3, 32, 2, 8)}, ValueError,
     r"^value_cache must share key_cache")
case("paged_decode_attention", "kv-over-capacity", {"kv_seqlens": torch.tensor([33, 1]), "max_kv_seq_len": 64},
     ValueError, r"^kv_seqlens must hold values in \[0, 33\)")
case("paged_decode_attention", "kv-over-max", {"max_kv_seq_len": 19}, ValueError, r"^kv_seqlens must hold values")
case("paged_decode_attention", "kv-negative", {"kv_seqlens": torch.tensor([-1, 1])}, ValueError, r"^kv_seqlens")
case("paged_decode_attention", "block-id-range", {"block_offsets": torch.tensor([[2, -1], [1, 2]])}, ValueError,
     r"^block_offsets must hold values in \[0, 3\)")
case("paged_decode_attention", "out-shape", {"attn_output": r(2, 4, 4)}, ValueError, r"^attn_output must have shape")
case("paged_decode_attention", "scale-negative", {"softmax_scale": -1.0}, ValueError,
     r"^softmax_scale must be in \(0, ")
case("paged_decode_attention", "quant-bits-type", {"quant_bits": 1.5}, TypeError, r"^quant_bits must be an int")
case("paged_decode_attention", "lengths-device", {"kv_seqlens": torch.tensor([20, 1], device=META)}, ValueError,
     r"^kv_seqlens is on meta")
# moe_gating_topk_softmax
case("moe_gating_topk_softmax", "logits-ndim", {"router_logits": r(2, 5, 6)}, ValueError,
     r"^router_logits must have 2 dimensions")
case("moe_gating_topk_softmax", "logits-dtype", {"router_logits": torch.ones(5, 6, dtype=torch.int64)}, ValueError,
     r"^router_logits must have dtype")
case("moe_gating_topk_softmax", "topk-zero", {"topk": 0}, ValueError, r"^topk must be >= 1")
case("moe_gating_topk_softmax", "topk-over-experts", {"topk": 7}, ValueError,
     r"^topk \(7\) must be <= the number of experts \(6\)")
case("moe_gating_topk_softmax", "topk-type", {"topk": 2.0}, TypeError, r"^topk must be an int")
# fused_moe
case("fused_moe", "hidden-ndim", {"hidden_states": r(1, 3, 8)}, ValueError, r"^hidden_states must have 2 dim")
case("fused_moe", "gate-up-dtype", {"gate_up_weights": r(4, 12, 8, dtype=F16)}, ValueError,
     r"^gate_up_weights must have dtype")
case("fused_moe", "gate-up-hidden", {"gate_up_weights": r(4, 12, 9)}, ValueError,
     r"^gate_up_weights.shape\[2\] must equal the hidden size")
case("fused_moe", "gate-up-odd", {"gate_up_weights": r(4, 11, 8)}, ValueError,
     r"^gate_up_weights.shape\[1\] must be even")
case("fused_moe", "down-shape", {"down_weights": r(4, 8, 5)}, ValueError, r"^down_weights must have shape \[4, 8, 6\]")
case("fused_moe", "down-experts", {"down_weights": r(3, 8, 6)}, ValueError, r"^down_weights must have shape")
case("fused_moe", "ids-shape", {"topk_ids": torch.tensor([[0], [1], [3]])}, ValueError,
     r"^topk_ids must have shape \[3, 2\]")
case("fused_moe", "ids-dtype", {"topk_ids": torch.tensor([[0.0, 3], [1, 2], [3, 1]])}, ValueError,
     r"^topk_ids must have dtype")
case("fused_moe", "weights-shape", {"topk_weights": torch.rand(3, 3)}, ValueError,
     r"^topk_weights must have shape \[3, 2\]")
case("fused_moe", "weights-dtype", {"topk_weights": torch.ones(3, 2, dtype=torch.int64)}, ValueError,
     r"^topk_weights must have dtype")
case("fused_moe", "topk-over-experts", {"topk": 5, "topk_ids": torch.zeros(3, 5, dtype=torch.int64),
                                        "topk_weights": torch.rand(3, 5)}, ValueError, r"^topk \(5\) must be <=")
case("fused_moe", "topk-type", {"topk": "2"}, TypeError, r"^topk must be an int")
case("fused_moe", "renormalize-type", {"renormalize": 1}, TypeError, r"^renormalize must be a bool")
case("fused_moe", "expert-id-range", {"topk_ids": torch.tensor([[0, 4], [1, 2], [3, 1]])}, ValueError,
     r"^topk_ids must hold values in \[0, 4\)")
case("fused_moe", "expert-id-negative", {"topk_ids": torch.tensor([[0, -1], [1, 2], [3, 1]])}, ValueError,
     r"^topk_ids must hold values in \[0, 4\)")
case("fused_moe", "ids-device", {"topk_ids": torch.empty(3, 2, dtype=torch.int64, device=META)}, ValueError,
     r"^topk_ids is on meta")
# linear
case("linear", "x-dtype", {"x": torch.ones(3, 8, dtype=torch.int32)}, ValueError, r"^x must have dtype")
case("linear", "weight-dtype", {"weight": r(5, 8, dtype=F16)}, ValueError, r"^weight must have dtype")
case("linear", "weight-ndim", {"weight": r(5, 8, 1)}, ValueError, r"^weight must have 2 dimensions")
case("linear", "weight-k", {"weight": r(5, 7)}, ValueError, r"^weight.shape\[1\] must equal x.shape\[-1\]")
case("linear", "bias-shape", {"bias": r(4)}, ValueError, r"^bias.shape\[0\] must equal weight.shape\[0\]")
case("linear", "bias-dtype", {"bias": r(5, dtype=F16)}, ValueError, r"^bias must have dtype")
case("linear", "scalar", {"x": torch.tensor(1.0), "weight": r(5, 1)}, ValueError, r"^x must have at least 1")
case("linear", "all-reduce-no-group", {"all_reduce": True}, ValueError, r"^all_reduce=True needs an initialized")
case("linear", "weight-device", {"weight": torch.empty(5, 8, device=META)}, ValueError, r"^weight is on meta")
# apply_rotary_pos_emb_fill_kv_cache
case("apply_rotary_pos_emb_fill_kv_cache", "slot-too-big", {"kv_start_indices": torch.tensor([0, 32, -1])},
     ValueError, r"^kv_start_indices must hold values in \[0, 32\)")
case("apply_rotary_pos_emb_fill_kv_cache", "cos-shape", {"cos": r(3, 4)}, ValueError, r"^cos must hold one row")
case("apply_rotary_pos_emb_fill_kv_cache", "value-heads", {"value": r(3, 1, 8)}, ValueError, r"^value.shape\[1\]")
case("apply_rotary_pos_emb_fill_kv_cache", "cache-dtype", {"value_cache": r(2, 16, 2, 8, dtype=F16)}, ValueError,
     r"^value_cache has dtype")

# quantized linear family
FP8 = torch.float8_e4m3fn
case("weight_quant_matmul", "qweight-dtype", {"qweight": torch.zeros(64, 2, dtype=torch.int64)}, ValueError,
     r"^qweight must have dtype")
case("weight_quant_matmul", "group-size", {"group_size": 16, "scale": r(4, 16, dtype=F16),
                                           "offset": torch.zeros(4, 2, dtype=torch.int32)}, ValueError,
     r"^group_size must be one of")
case("weight_quant_matmul", "scale-dtype", {"scale": r(2, 16)}, ValueError, r"^scale must have dtype")
case("weight_quant_matmul", "offset-shape", {"offset": torch.zeros(2, 1, dtype=torch.int32)}, ValueError,
     r"^offset must have shape")
case("weight_quant_matmul", "x-3d", {"x": r(1, 3, 64, dtype=F16)}, ValueError, r"^x must have 2 dimensions")
case("weight_quant_matmul", "x-k", {"x": r(3, 32, dtype=F16)}, ValueError, r"^qweight.shape\[0\] must equal")
case("weight_quant_matmul", "bias-shape", {"bias": r(8, dtype=F16)}, ValueError, r"^bias.shape\[0\] must equal")
case("weight_quant_matmul", "all-reduce-no-group", {"all_reduce": True}, ValueError,
     r"^all_reduce=True needs an initialized")
case("weight_quant_matmul", "scale-device", {"scale": torch.empty(2, 16, dtype=F16, device=META)}, ValueError,
     r"^scale is on meta")
case("dynamic_quant", "fp8", {"quant_dtype": FP8}, ValueError, r"^quant_dtype must be torch.int8")
case("dynamic_quant", "granularity", {"quant_granularity": "PER_TENSOR"}, ValueError, r"^quant_granularity must be")
case("dynamic_quant", "x-int", {"x": torch.ones(3, 8, dtype=torch.int32)}, ValueError, r"^x must have dtype")
case("linear_w8a8", "fp8", {"quant_dtype": FP8}, ValueError, r"^quant_dtype must be torch.int8")
case("linear_w8a8", "a-float", {"a": r(3, 8)}, ValueError, r"^a must have dtype")
case("linear_w8a8", "rms-scale-count", {"rms_scale": r(2, 1)}, ValueError, r"^rms_scale must hold 3 values")
case("linear_w8a8", "linear-scale-dtype", {"linear_scale": r(5, 1, dtype=F16)}, ValueError,
     r"^linear_scale must have dtype")
case("linear_w8a8", "out-dtype", {"out_dtype": torch.int32}, ValueError, r"^out_dtype must be")
case("linear_w8a8", "bias-dtype", {"bias": r(5)}, ValueError, r"^bias must have dtype")
case("linear_w8a8", "b-k", {"b": i8(5, 7)}, ValueError, r"^b.shape\[1\] must equal a.shape\[-1\]")
case("linear_w8a8_static", "fp8", {"quant_dtype": FP8}, ValueError, r"^quant_dtype must be torch.int8")
case("linear_w8a8_static", "scale-count", {"input_scale": torch.ones(2)}, ValueError,
     r"^input_scale must hold one value")
case("linear_w8a8_static", "quant-bias-dtype", {"quant_bias": torch.zeros(5)}, ValueError,
     r"^quant_bias must have dtype")
case("linear_w8a8_static", "weight-float", {"weight": r(5, 8)}, ValueError, r"^weight must have dtype")
case("rms_norm_w8a8", "fp8", {"quant_dtype": FP8}, ValueError, r"^quant_dtype must be torch.int8")
case("rms_norm_w8a8", "weight-size", {"weight": r(7)}, ValueError, r"^weight.shape\[0\] must equal")
case("add_rms_norm_w8a8", "fp8", {"quant_dtype": FP8}, ValueError, r"^quant_dtype must be torch.int8")
case("add_rms_norm_w8a8", "residual-none", {"residual": None}, TypeError, r"^residual must be a torch.Tensor")
case("add_rms_norm_w8a8", "residual-shape", {"residual": r(2, 8)}, ValueError, r"^residual must have")
case("fused_moe_w8a8", "weights-float", {"gate_up_weights": r(4, 12, 8)}, ValueError, r"^gate_up_weights must have dtype")
case("fused_moe_w8a8", "scales-shape", {"down_scales": r(4, 6, 1)}, ValueError, r"^down_scales must have shape")
case("fused_moe_w8a8", "down-shape", {"down_weights": i8(4, 8, 5)}, ValueError, r"^down_weights must have shape")
case("fused_moe_w8a8", "expert-id-range", {"topk_ids": torch.tensor([[0, 4], [1, 2], [3, 1]])}, ValueError,
     r"^topk_ids must hold values in \[0, 4\)")
case("fused_moe_w8a8", "renormalize-type", {"renormalize": 1}, TypeError, r"^renormalize must be a bool")


@pytest.mark.parametrize("op", list(OPS))
def test_base_call_is_valid(op):
    fn, base = OPS[op]
    fn(**base())


# Tensors an op writes in place (caches, rotated q/k, outputs): a rejected call must leave them untouched.
WRITTEN = ("key_cache", "value_cache", "query", "key", "attn_output")


@pytest.mark.parametrize("op,change,exc,match", C)
def test_bad_input(op, change, exc, match):
    fn, base = OPS[op]
    kwargs = base()
    kwargs.update(change)
    before = {k: kwargs[k].clone() for k in WRITTEN
              if isinstance(kwargs.get(k), torch.Tensor) and kwargs[k].device.type == "cpu"}
    with pytest.raises(exc, match=match):
        fn(**kwargs)
    for name, value in before.items():
        assert torch.equal(kwargs[name], value, ) or (torch.isnan(value).all() and torch.isnan(kwargs[name]).all()), \
            f"a rejected {op} call wrote into {name}"


def test_every_op_has_bad_input_cases():
    covered = {p.values[0] for p in C}
    assert covered == set(OPS) == set(ops.CORE_OPS + ops.EXTRA_OPS)


# ---------------------------------------------------------------- valid calls dlinfer does not serve
@pytest.mark.parametrize("op,change,match", [
    ("moe_gating_topk_softmax", {"moe_metadata": MoeMetadata(router_n_groups=4)}, r"router_n_groups=4"),
    ("moe_gating_topk_softmax", {"moe_metadata": MoeMetadata(ep_size=2)}, r"ep_size=2"),
    ("fused_moe", {"moe_metadata": MoeMetadata(ep_size=8)}, r"ep_size=8: expert parallelism"),
    ("fused_moe", {"chunked_moe_layout": object()}, r"chunked_moe_layout is an Ascend-only"),
])
def test_unsupported_features_raise_not_supported(op, change, match):
    fn, base = OPS[op]
    kwargs = base()
    kwargs.update(change)
    with pytest.raises(NotSupportedError, match=match):
        fn(**kwargs)


def test_rejected_fill_writes_nothing_even_when_most_slots_are_valid():
    kwargs = base_fill()
    kwargs["kv_start_indices"] = torch.tensor([0, 1, 99])  # the first two are fine, the last is out of range
    k_before, v_before = kwargs["key_cache"].clone(), kwargs["value_cache"].clone()
    with pytest.raises(ValueError, match="kv_start_indices"):
        ops.fill_kv_cache(**kwargs)
    assert torch.equal(kwargs["key_cache"], k_before) and torch.equal(kwargs["value_cache"], v_before)


# ------------------------------------------------------------------------------------------ DLINFER_CHECK
def test_value_checks_always_run_on_cpu(monkeypatch):
    monkeypatch.setenv("DLINFER_CHECK", "0")
    assert _checks.values_checked(torch.zeros(1))
    kwargs = base_fill()
    kwargs["kv_start_indices"] = torch.tensor([0, 1, 99])
    with pytest.raises(ValueError, match="kv_start_indices"):
        ops.fill_kv_cache(**kwargs)


def test_value_checks_on_accelerators_follow_dlinfer_check(monkeypatch):
    device_tensor = torch.empty(3, device=META)  # any non-CPU device
    monkeypatch.delenv("DLINFER_CHECK", raising=False)
    assert not _checks.values_checked(device_tensor)
    assert not _checks.values_checked(torch.zeros(1), device_tensor)
    monkeypatch.setenv("DLINFER_CHECK", "0")
    assert not _checks.values_checked(device_tensor)
    monkeypatch.setenv("DLINFER_CHECK", "1")
    assert _checks.values_checked(device_tensor)
    assert _checks.values_checked(None, torch.zeros(1))


def test_value_checks_are_skipped_during_cuda_graph_capture(monkeypatch):
    monkeypatch.setenv("DLINFER_CHECK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not _checks.values_checked(torch.empty(3, device=META))
    assert _checks.values_checked(torch.zeros(3))  # CPU tensors: always


def test_wrapper_metadata_checks_never_read_values(monkeypatch):
    """On a non-CPU device without DLINFER_CHECK, no argument check reads tensor contents (on a GPU that would be
    a host sync, fatal under CUDA-graph capture). Meta tensors have no contents: reading one raises."""
    monkeypatch.delenv("DLINFER_CHECK", raising=False)
    m = lambda *s, dtype=torch.float32: torch.empty(*s, dtype=dtype, device=META)  # noqa: E731
    i32 = torch.int32
    kc = m(3, 16, 2, 8)
    out = ops.paged_decode_attention(m(2, 4, 8), kc, kc, m(2, 2, dtype=i32), 16, None, m(2, dtype=i32), 32, 4, 2)
    assert out.shape == (2, 4, 8) and out.device == META
    out = ops.paged_prefill_attention(m(5, 4, 8), None, None, kc, kc, m(2, 2, dtype=i32), 16, m(2, dtype=i32),
                                      m(2, dtype=i32), 4, 32, 4, 2, [True])
    assert out.shape == (5, 4, 8)
    out = ops.prefill_attention(m(5, 4, 8), m(5, 2, 8), m(5, 2, 8), None, None, m(2, dtype=i32), m(2, dtype=i32), 4,
                                4, 2, [])
    assert out.shape == (5, 4, 8)
    ops.fill_kv_cache(m(3, 2, 8), m(3, 2, 8), kc, kc, m(3, dtype=torch.int64))
    out = ops.fused_moe(m(3, 8), m(4, 12, 8), m(4, 8, 6), m(3, 2), m(3, 2, dtype=torch.int64), 2, True)
    assert out.shape == (3, 8)
    ops.apply_rotary_pos_emb_fill_kv_cache(m(3, 4, 8), m(3, 2, 8), m(3, 2, 8), kc, kc, m(3, 8), m(3, 8),
                                           m(3, dtype=torch.int64))
