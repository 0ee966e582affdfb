"""Inputs that used to slip through or fail with the wrong exception: each now gets a clear, typed error."""

from __future__ import annotations

import pytest
import torch

import dlinfer.ops as ops

g = torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


# ------------------------------------------------------------------------------------- exception types
def test_add_rms_norm_without_residual_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="^residual must be a torch.Tensor, got NoneType"):
        ops.add_rms_norm(r(2, 8), None, r(8))


@pytest.mark.parametrize("op", ["prefill", "decode"])
def test_head_size_zero_is_a_value_error_not_zero_division(op):
    with pytest.raises(ValueError, match="head size >= 1"):
        if op == "prefill":
            ops.prefill_attention(r(2, 2, 0), r(2, 2, 0), r(2, 2, 0), None, None, torch.tensor([2]),
                                  torch.tensor([2]), 2, 2, 2, [None])
        else:
            ops.paged_decode_attention(r(1, 2, 0), r(2, 4, 2, 0), r(2, 4, 2, 0), torch.zeros(1, 1, dtype=torch.int32),
                                       4, None, torch.tensor([1]), 4, 2, 2)


def test_a_2d_query_with_zero_tokens_works_like_the_3d_form():
    empty = torch.zeros(0, dtype=torch.int64)
    out2 = ops.prefill_attention(r(0, 16), r(0, 2, 8), r(0, 2, 8), None, None, empty, empty, 0, 2, 2, [None])
    out3 = ops.prefill_attention(r(0, 2, 8), r(0, 2, 8), r(0, 2, 8), None, None, empty, empty, 0, 2, 2, [None])
    assert out2.shape == out3.shape == (0, 2, 8)


def test_fill_kv_cache_with_quant_bits_names_quant_bits():
    kc, vc = r(2, 4, 1, 8), r(2, 4, 1, 8)  # float caches: a quantized cache is uint8
    with pytest.raises(ValueError, match="key_cache must be a uint8 tensor with quant_bits=8"):
        ops.fill_kv_cache(r(1, 1, 8), r(1, 1, 8), kc, vc, torch.tensor([0]), [], [], 8)
    with pytest.raises(ValueError, match="quant_bits must be 0 .*, 8 .* or 4"):
        ops.fill_kv_cache(r(1, 1, 8), r(1, 1, 8), kc, vc, torch.tensor([0]), [], [], 2)


# ------------------------------------------------------------------------------ coercions and aliasing
def test_non_integral_integer_arguments_are_refused_not_truncated():
    with pytest.raises(ValueError, match="topk must be an integer, got 2.9"):
        ops.moe_gating_topk_softmax(r(3, 6), torch.tensor(2.9))
    kc, vc = r(2, 4, 1, 8), r(2, 4, 1, 8)
    with pytest.raises(ValueError, match="max_kv_seq_len must be an integer, got 6.9"):
        ops.paged_decode_attention(r(1, 2, 8), kc, vc, torch.tensor([[0, 1]]), 4, None, torch.tensor([6]),
                                   torch.tensor(6.9), 2, 1)
    # an integral value held in a tensor is still accepted, as before
    weights, ids = ops.moe_gating_topk_softmax(r(3, 6), torch.tensor(2))
    assert weights.shape == ids.shape == (3, 2)


def test_the_same_tensor_as_query_and_key_is_refused_not_rotated_twice():
    x = r(3, 2, 8)
    before = x.clone()
    with pytest.raises(ValueError, match="query and key are the same memory"):
        ops.apply_rotary_pos_emb(x, x, r(3, 8), r(3, 8))
    assert torch.equal(x, before)


def test_the_same_tensor_as_key_and_value_cache_is_refused():
    cache = r(2, 4, 1, 8)
    before = cache.clone()
    with pytest.raises(ValueError, match="key_cache and value_cache are the same memory"):
        ops.fill_kv_cache(r(1, 1, 8), r(1, 1, 8), cache, cache, torch.tensor([3]))
    with pytest.raises(ValueError, match="key_cache and value_cache are the same memory"):
        ops.apply_rotary_pos_emb_fill_kv_cache(r(1, 2, 8), r(1, 1, 8), r(1, 1, 8), cache, cache, r(1, 8), r(1, 8),
                                               torch.tensor([3]))
    assert torch.equal(cache, before)


def test_packed_kv_views_of_one_buffer_are_not_aliasing():
    buf = torch.zeros(2, 4, 1, 16)
    ops.fill_kv_cache(r(1, 1, 8), r(1, 1, 8), buf[..., :8], buf[..., 8:], torch.tensor([5]))
    assert bool(buf[1, 1].abs().sum() > 0)


def test_duplicate_slots_are_refused_and_padding_may_repeat():
    kc, vc = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    with pytest.raises(ValueError, match="kv_start_indices holds a slot id twice"):
        ops.fill_kv_cache(r(3, 1, 8), r(3, 1, 8), kc, vc, torch.tensor([2, 5, 2]))
    assert not kc.any() and not vc.any()
    ops.fill_kv_cache(r(3, 1, 8), r(3, 1, 8), kc, vc, torch.tensor([-1, 5, -1]))


# ----------------------------------------------------------------------------------------- rms_norm
def test_rms_norm_float16_input_with_float32_weight_is_accepted_and_documented():
    x, w = r(4, 32, dtype=torch.float16), 1 + 0.1 * r(32)
    out = ops.rms_norm(x, w, 1e-6)
    assert out.dtype == torch.float16
    xd = x.double()
    want = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)
    assert "float32 weight with float16" in ops.rms_norm.__doc__
