"""Quantized KV caches (``quant_bits`` 8 / 4, LMDeploy's quant_policy): the layout and rounding rules of
``dlinfer.ops.kv_quant`` in the reference vendor, the arguments' checks, the custom ops' schemas, and the
vendor contract (the quantized-cache arguments reach only vendors that declare ``kv_quant``)."""

from __future__ import annotations

import pytest
import torch

import dlinfer.ops as ops
from dlinfer.errors import NotSupportedError
from dlinfer.ops import kv_quant
from dlinfer.vendor import Vendor, registry
from dlinfer.vendor.reference.kv_cache import dequantize, quantize


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _cache(bits, nb=4, bs=16, hk=2, d=16, dtype=torch.float16, seed=0):
    """A filled quantized cache (reference vendor): tokens 0..T-1 at slots 0..T-1."""
    g = _g(seed)
    t = nb * bs - 5
    k, v = torch.randn(t, hk, d, generator=g).to(dtype), torch.randn(t, hk, d, generator=g).to(dtype)
    dc = d if bits == 8 else d // 2
    kc, vc = torch.zeros(nb, bs, hk, dc, dtype=torch.uint8), torch.zeros(nb, bs, hk, dc, dtype=torch.uint8)
    ksz, vsz = torch.zeros(nb, bs, hk, 2, dtype=dtype), torch.zeros(nb, bs, hk, 2, dtype=dtype)
    with registry.pinned("reference"):
        ops.fill_kv_cache(k, v, kc, vc, torch.arange(t), [ksz], [vsz], bits)
    return k, v, kc, vc, ksz, vsz


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_each_value_comes_back_within_half_a_step(bits, dtype):
    x = torch.randn(64, 3, 32, generator=_g(1)).to(dtype) * 3
    x[5, 1] = 0.75  # a constant head: stored exactly (LMDeploy's scale would be 0 there)
    x[6, 0] = 0.0
    x[7, 2] = torch.linspace(100.0, 100.01, 32).to(dtype)  # a tiny range far from 0: the zero point still fits
    q, scale, zero = quantize(x, bits, dtype, dtype)
    assert q.dtype == torch.uint8 and q.shape == (64, 3, 32 if bits == 8 else 16)
    back = dequantize(q, scale, zero, bits)
    assert torch.equal(back[5, 1], torch.full((32,), 0.75)) and torch.equal(back[6, 0], torch.zeros(32))
    # half a step plus the rounding of the stored zero point (bfloat16: 8 bits, up to half a unit at 255)
    slack = {torch.bfloat16: 1.0, torch.float16: 0.51, torch.float32: 0.501}[dtype]
    err = ((back - x.float()).abs() / scale[..., None]).amax()
    assert err <= slack, err
    assert torch.isfinite(zero).all() and (zero.abs() <= 2 * kv_quant.MIN_STEP_DIVISOR * kv_quant.LEVELS[bits]).all()


def test_four_bit_packing_is_lmdeploys():
    """Byte i holds element i in its low nibble and element i + D/2 in its high nibble."""
    x = torch.arange(16, dtype=torch.float32)[None]  # min 0, max 15: scale 1, zero 0, q = x
    q, scale, zero = quantize(x, 4, torch.float32, torch.float32)
    assert float(scale) == 1.0 and float(zero) == 0.0
    assert q[0].tolist() == [i + 16 * (i + 8) for i in range(8)]


def test_a_row_with_nan_or_inf_dequantizes_to_nan():
    x = torch.randn(3, 2, 8)
    x[0, 1, 3] = float("nan")
    x[2, 0, 0] = float("inf")
    q, scale, zero = quantize(x, 8, torch.float16, torch.float16)
    assert scale[0, 1].isnan() and zero[0, 1].isnan() and (q[0, 1] == 0).all()
    assert scale[2, 0].isnan() and torch.isfinite(scale[1]).all()
    back = dequantize(q, scale, zero, 8)
    assert back[0, 1].isnan().all() and back[2, 0].isnan().all() and torch.isfinite(back[1]).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_attention_over_a_quantized_cache_is_attention_over_its_dequantized_values(bits):
    k, v, kc, vc, ksz, vsz = _cache(bits, dtype=torch.float32)
    nb, bs, hk = kc.shape[:3]
    kf = dequantize(kc, ksz[..., 0], ksz[..., 1], bits)  # [nb, bs, hk, d]
    vf = dequantize(vc, vsz[..., 0], vsz[..., 1], bits)
    table = torch.tensor([[2, 0, 3, 1]], dtype=torch.int32)
    lens = torch.tensor([50], dtype=torch.int32)
    q = torch.randn(1, 4, 16, generator=_g(3))
    qp = torch.randn(6, 4, 16, generator=_g(4))
    cu = torch.tensor([6], dtype=torch.int32)
    forms = {"lmdeploy views": dict(kv_scales=(ksz[..., 0], vsz[..., 0]), kv_zeros=(ksz[..., 1], vsz[..., 1])),
             "stacked": dict(kv_scales=torch.stack((ksz[..., 0], vsz[..., 0])),
                             kv_zeros=torch.stack((ksz[..., 1], vsz[..., 1])).unsqueeze(-1))}
    with registry.pinned("reference"):
        want_d = ops.paged_decode_attention(q, kf, vf, table, bs, None, lens, 64, 4, hk)
        want_p = ops.paged_prefill_attention(qp, None, None, kf, vf, table, bs, cu, lens, 6, 64, 4, hk, [None])
        for name, kv in forms.items():
            got_d = ops.paged_decode_attention(q, kc, vc, table, bs, None, lens, 64, 4, hk, quant_bits=bits, **kv)
            got_p = ops.paged_prefill_attention(qp, None, None, kc, vc, table, bs, cu, lens, 6, 64, 4, hk, [None],
                                                quant_bits=bits, **kv)
            torch.testing.assert_close(got_d, want_d, atol=1e-5, rtol=1e-5, msg=name)
            torch.testing.assert_close(got_p, want_p, atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------- bad inputs
def _fill_kwargs(bits=8):
    nb, bs, hk, d = 2, 16, 2, 8
    dc = d if bits == 8 else d // 2
    return dict(key=torch.randn(3, hk, d), value=torch.randn(3, hk, d),
                key_cache=torch.zeros(nb, bs, hk, dc, dtype=torch.uint8),
                value_cache=torch.zeros(nb, bs, hk, dc, dtype=torch.uint8), kv_start_indices=torch.tensor([0, 5, -1]),
                k_scales_zeros=[torch.zeros(nb, bs, hk, 2)], v_scales_zeros=[torch.zeros(nb, bs, hk, 2)],
                quant_bits=bits)


def _decode_kwargs(bits=8):
    nb, bs, hk, d = 3, 16, 2, 8
    dc = d if bits == 8 else d // 2
    return dict(query=torch.randn(2, 4, d), key_cache=torch.zeros(nb, bs, hk, dc, dtype=torch.uint8),
                value_cache=torch.zeros(nb, bs, hk, dc, dtype=torch.uint8),
                block_offsets=torch.tensor([[2, 0], [1, 2]]), block_size=bs, cu_seqlens_q=None,
                kv_seqlens=torch.tensor([20, 1]), max_kv_seq_len=32, num_q_heads=4, num_kv_heads=hk,
                kv_scales=torch.ones(2, nb, bs, hk), kv_zeros=torch.zeros(2, nb, bs, hk), quant_bits=bits)


F_CASES = [
    ({"quant_bits": 3}, ValueError, r"^quant_bits must be 0 \(no KV quantization\), 8"),
    ({"key_cache": torch.zeros(2, 16, 2, 8)}, ValueError, r"^key_cache must be a uint8 tensor with quant_bits=8"),
    ({"k_scales_zeros": []}, ValueError, r"^k_scales_zeros must be \[scales, zeros\]"),
    ({"k_scales_zeros": None}, TypeError, r"^k_scales_zeros must be a sequence of tensors"),
    ({"v_scales_zeros": [torch.zeros(2, 16, 2, 3)]}, ValueError, r"^v_scales_zeros must be \[scales, zeros\]"),
    ({"v_scales_zeros": [torch.zeros(2, 16, 2), torch.zeros(2, 16, 3)]}, ValueError, r"^v_scales_zeros\[1\] must be"),
    ({"k_scales_zeros": [torch.zeros(2, 16, 2, 2, dtype=torch.int32)]}, ValueError,
     r"^k_scales_zeros must have dtype"),
    ({"key": torch.randn(3, 2, 7), "value": torch.randn(3, 2, 7), "quant_bits": 4}, ValueError,
     r"quant_bits=4 packs two values per byte: the key head size must be even, got 7"),
    ({"key_cache": torch.zeros(2, 16, 2, 8, dtype=torch.uint8), "quant_bits": 4}, ValueError,
     r"^key_cache.shape\[3\] must equal the key head size \(4\)"),
]


@pytest.mark.parametrize("change,exc,match", F_CASES)
def test_fill_kv_cache_quantized_bad_inputs(change, exc, match):
    kwargs = _fill_kwargs()
    kwargs.update(change)
    before = kwargs["key_cache"].clone()
    with pytest.raises(exc, match=match):
        ops.fill_kv_cache(**kwargs)
    assert torch.equal(kwargs["key_cache"], before)


D_CASES = [
    ({"quant_bits": 2}, ValueError, r"^quant_bits must be 0"),
    ({"key_cache": torch.zeros(3, 16, 2, 8), "value_cache": torch.zeros(3, 16, 2, 8)}, ValueError,
     r"^key_cache must be a uint8 tensor with quant_bits=8"),
    ({"kv_scales": None}, ValueError, r"^kv_scales is required with a quantized KV cache"),
    ({"kv_zeros": torch.zeros(3, 3, 16, 2)}, ValueError, r"^kv_zeros must be \[k, v\]"),
    ({"kv_scales": [torch.ones(3, 16, 2)]}, ValueError, r"^kv_scales must be \[k, v\]"),
    ({"kv_scales": torch.ones(2, 3, 16, 4)}, ValueError, r"^kv_scales\[0\] must be \[num_blocks, block_size, "
                                                          r"num_kv_heads\] = \[3, 16, 2\]"),
    ({"kv_scales": torch.ones(2, 3, 16, 2, dtype=torch.int64)}, ValueError, r"^kv_scales must have dtype"),
    ({"kv_zeros": torch.zeros(2, 3, 16, 2, device="meta")}, ValueError, r"^kv_zeros\[0\] is on meta"),
    ({"quant_bits": 4}, ValueError, r"^key_cache.shape\[3\] must equal the key head size \(4\)"),
    ({"head_size_v": 8, "quant_bits": 4, "key_cache": torch.zeros(3, 16, 2, 4, dtype=torch.uint8)}, ValueError,
     r"^value_cache.shape\[3\] must equal the value head size / 2"),
]


@pytest.mark.parametrize("change,exc,match", D_CASES)
@pytest.mark.parametrize("op", ["paged_decode_attention", "paged_prefill_attention"])
def test_paged_attention_quantized_bad_inputs(op, change, exc, match):
    kwargs = _decode_kwargs()
    kwargs.update(change)
    if op == "paged_prefill_attention":
        kwargs = dict(kwargs, key=None, value=None, cu_seqlens_q=torch.tensor([1, 2]), max_q_seq_len=1,
                      attn_mask=[None])
        fn = ops.paged_prefill_attention
    else:
        fn = ops.paged_decode_attention
    with pytest.raises(exc, match=match):
        fn(**kwargs)


def test_unquantized_calls_ignore_the_scales():
    """quant_bits=0 (LMDeploy passes [] / None): float caches, the scale arguments are not read."""
    kwargs = _decode_kwargs()
    kwargs.update(key_cache=torch.randn(3, 16, 2, 8), value_cache=torch.randn(3, 16, 2, 8), quant_bits=0,
                  kv_scales="not read", kv_zeros=None)
    assert ops.paged_decode_attention(**kwargs).shape == (2, 4, 8)


# ------------------------------------------------------------------------------------ the vendor contract
def test_custom_ops_with_quantized_caches_pass_opcheck():
    f = _fill_kwargs(4)
    sz_k, sz_v = f["k_scales_zeros"][0], f["v_scales_zeros"][0]
    torch.library.opcheck(torch.ops.dlinfer.fill_kv_cache.default,
                          (f["key"], f["value"], f["key_cache"], f["value_cache"], f["kv_start_indices"],
                           [sz_k[..., 0], sz_k[..., 1]], [sz_v[..., 0], sz_v[..., 1]], 4))
    d = _decode_kwargs(8)
    kv_scales, kv_zeros = list(d["kv_scales"].unbind(0)), list(d["kv_zeros"].unbind(0))
    torch.library.opcheck(torch.ops.dlinfer.paged_decode_attention.default,
                          (d["query"], d["key_cache"], d["value_cache"], d["block_offsets"], d["kv_seqlens"], 32,
                           0.35, torch.empty(2, 4, 8), kv_scales, kv_zeros, 8))
    torch.library.opcheck(torch.ops.dlinfer.paged_prefill_attention.default,
                          (torch.randn(2, 4, 8), d["key_cache"], d["value_cache"], d["block_offsets"],
                           torch.tensor([0, 1, 2], dtype=torch.int32), d["kv_seqlens"], 1, 32, 0.35, True,
                           torch.empty(2, 4, 8), kv_scales, kv_zeros, 8))


def test_vendors_receive_the_quantized_arguments_only_when_they_declare_kv_quant(isolated_registry):
    """A vendor whose paged decode takes the unquantized arguments only (the contract before quantized caches)
    still registers and serves float caches; it is never handed a quantized cache, even without a capabilities
    record (kv_quant is opt-in), and a forced call names the feature."""
    calls = []

    def old_decode(query, key_cache, value_cache, block_table, kv_seqlens, max_kv_seq_len, softmax_scale,
                   attn_output):
        calls.append(key_cache.dtype)
        attn_output.zero_()

    isolated_registry.register_vendor(Vendor(name="legacy", priority=50, devices={"cpu"}, default_devices={"cpu"},
                                             ops={"paged_decode_attention": old_decode}))
    d = _decode_kwargs(8)
    float_call = dict(d, key_cache=torch.randn(3, 16, 2, 8), value_cache=torch.randn(3, 16, 2, 8), quant_bits=0)
    ops.paged_decode_attention(**float_call)
    assert calls == [torch.float32]
    d["key_cache"].random_(0, 256, generator=_g(7))
    d["value_cache"].random_(0, 256, generator=_g(8))
    out = ops.paged_decode_attention(**d)  # quantized: the reference serves it
    assert calls == [torch.float32] and out.abs().sum() > 0
    with isolated_registry.forced("legacy"):
        with pytest.raises(NotSupportedError, match="feature 'kv_quant'"):
            ops.paged_decode_attention(**d)


def test_info_lists_the_quantized_cache_calls_for_both_vendors(capsys):
    """``dlinfer info --device cuda`` (no GPU needed: selection reads metadata only): the Triton vendor serves the
    quantized-cache calls and the quantized linear family, fused_moe_w8a8 included."""
    from dlinfer import cli

    assert cli.main(["info", "--device", "cuda"]) == 0
    rows = {" ".join(line.split()[:2]) if "+kv_quant" in line else line.split()[0]: line.split()
            for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and len(line.split()) >= 4}
    for op in ("fill_kv_cache", "paged_prefill_attention", "paged_decode_attention"):
        row = rows[f"{op} +kv_quant"]
        assert row[2:5] == ["triton", "serves", "serves"], row
    for op in ("fill_kv_cache", "paged_prefill_attention", "paged_decode_attention"):
        assert rows[f"{op} +kv_quant4"][2:5] == ["triton", "serves", "serves"], rows[f"{op} +kv_quant4"]
    for op in ("weight_quant_matmul", "dynamic_quant", "linear_w8a8", "linear_w8a8_static", "rms_norm_w8a8",
               "add_rms_norm_w8a8", "fused_moe_w8a8"):
        assert rows[op][1:4] == ["triton", "serves", "serves"], rows[op]


def test_four_bit_cache_calls_on_cuda_go_to_triton(isolated_registry):
    """Selection only (metadata, no GPU): a 4-bit cache asks for kv_quant4 besides kv_quant; the Triton vendor
    serves every quantized-cache call on CUDA, the 4-bit paged prefill included (verified on an H100 after its
    16-wide value tiles were padded); the reference serves them on the CPU."""
    from dlinfer.ops.kv_cache import cache_call_features
    from dlinfer.vendor import Call

    pytest.importorskip("triton")
    cache = torch.zeros(4, 16, 2, 8, dtype=torch.uint8)
    assert cache_call_features(cache, 0) == frozenset()
    assert cache_call_features(cache, 8) == {"kv_quant"}
    assert cache_call_features(cache, 4) == {"kv_quant", "kv_quant4"}
    assert cache_call_features(cache[:, :, :1], 4) == {"kv_quant", "kv_quant4", "strided_cache"}

    def chosen(op, device_type, features):
        isolated_registry.clear_selection_cache()
        return isolated_registry.select(Call(op, device_type, torch.float16, 128, 128, 64, frozenset(features)))[0].name

    q4, q8 = {"kv_quant", "kv_quant4"}, {"kv_quant"}
    for op in ("fill_kv_cache", "paged_prefill_attention", "paged_decode_attention"):
        assert chosen(op, "cuda", q8) == "triton"
        assert chosen(op, "cuda", q4) == "triton"
        assert chosen(op, "cpu", q4) == "reference"
