"""The quantized linear family (AWQ W4A16, W8A8) on the CPU: semantics against hand-written math, argument errors,
the offline quantizer's packing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import dlinfer.ops as ops
from dlinfer.testing import quantize
from dlinfer.testing.conformance.cases.quant import _q_check
from dlinfer.vendor import registry


@pytest.fixture(autouse=True)
def _reference_only():
    with registry.pinned("reference"):
        yield


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- AWQ packing
def test_awq_nibble_order_is_awqs():
    """Column j of a group of 8 sits in nibble position (0, 4, 1, 5, 2, 6, 3, 7)[j] (AWQ order 0 2 4 6 1 3 5 7)."""
    values = torch.arange(8, dtype=torch.int32)[None]  # column j holds value j
    word = int(quantize.pack_awq(values)[0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 15 for i in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]


def test_pack_unpack_round_trip_and_sign_bit():
    v = torch.randint(0, 16, (6, 32), generator=_g(), dtype=torch.int32)
    v[0, :8] = 15  # a word with the top bit set is a negative int32
    packed = quantize.pack_awq(v)
    assert packed.dtype == torch.int32 and packed.shape == (6, 4) and int(packed[0, 0]) == -1
    assert torch.equal(quantize.unpack_awq(packed), v)
    with pytest.raises(ValueError, match="0..15"):
        quantize.pack_awq(torch.full((1, 8), 16))


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_weight_quant_matmul_is_x_times_the_dequantized_weight(group, dtype):
    k, n = 256, 40
    w = torch.randn(n, k, generator=_g(1)) * 0.1
    qweight, qzeros, scales, deq = quantize.quantize_awq_weight(w, group)
    assert (deq - w).abs().max() <= scales.float().max() * 0.5 + 1e-6  # round to nearest within half a step
    x = torch.randn(5, k, generator=_g(2)).to(dtype)
    bias = torch.randn(n, generator=_g(3)).to(dtype)
    out = ops.weight_quant_matmul(x, qweight, scales.to(dtype), offset=qzeros, bias=bias, group_size=group)
    want = x.double() @ deq.T.double() + bias.double()
    assert out.dtype == dtype and out.shape == (5, n)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert float((out.double() - want).norm() / want.norm()) < tol
    # group_size=0 infers it from the shapes; offset=None is zero point 8
    assert torch.equal(ops.weight_quant_matmul(x, qweight, scales.to(dtype), qzeros, bias, group_size=0), out)
    sym = ops.weight_quant_matmul(x, qweight, scales.to(dtype), group_size=group)
    q = quantize.unpack_awq(qweight).double()
    want_sym = x.double() @ ((q - 8) * scales.double().repeat_interleave(group, 0))
    assert float((sym.double() - want_sym).norm() / want_sym.norm()) < tol


def test_weight_quant_matmul_bad_inputs_name_the_argument():
    x = torch.randn(2, 64, dtype=torch.float16)
    qw = torch.zeros(64, 2, dtype=torch.int32)
    s = torch.ones(2, 16, dtype=torch.float16)
    z = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="qweight must have dtype in \\(int32\\)"):
        ops.weight_quant_matmul(x, qw.to(torch.int64), s, z, group_size=32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        ops.weight_quant_matmul(x, qw, torch.ones(4, 16, dtype=torch.float16), torch.zeros(4, 2, dtype=torch.int32),
                                group_size=16)
    with pytest.raises(ValueError, match="scale must have dtype"):
        ops.weight_quant_matmul(x, qw, s.float(), z, group_size=32)
    with pytest.raises(ValueError, match="offset must have shape"):
        ops.weight_quant_matmul(x, qw, s, torch.zeros(2, 3, dtype=torch.int32), group_size=32)
    with pytest.raises(ValueError, match="qweight"):
        ops.weight_quant_matmul(torch.randn(2, 32, dtype=torch.float16), qw, s, z, group_size=32)
    with pytest.raises(ValueError, match="bias"):
        ops.weight_quant_matmul(x, qw, s, z, torch.zeros(8, dtype=torch.float16), group_size=32)
    with pytest.raises(TypeError, match="group_size must be an int"):
        ops.weight_quant_matmul(x, qw, s, z, group_size=32.0)


# ------------------------------------------------------------------------------------------- W8A8
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dynamic_quant_per_token(dtype):
    x = torch.randn(4, 3, 48, generator=_g(4)).to(dtype)
    x[1, 2].zero_()
    q, scale = ops.dynamic_quant(x, torch.int8)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (4, 3, 1) and scale.dtype == torch.float32
    amax = x.float().abs().amax(-1, keepdim=True)
    nonzero = amax > 0
    assert torch.allclose(scale[nonzero], (amax / 127)[nonzero], rtol=1e-6)
    assert bool((q.abs().amax(-1)[nonzero.squeeze(-1)] == 127).all())  # each row's largest value maps to 127
    assert torch.all(q[1, 2] == 0) and float(scale[1, 2]) > 0  # an all-zero row: zeros, a finite non-zero scale
    assert float(((q.float() * scale) - x.float()).abs().max()) <= float(scale.max()) * 0.5 + 1e-6


def test_linear_w8a8_is_the_integer_product_scaled():
    a = torch.randint(-127, 128, (2, 3, 64), generator=_g(5)).to(torch.int8)
    b = torch.randint(-127, 128, (24, 64), generator=_g(6)).to(torch.int8)
    rs = torch.rand(2, 3, 1, generator=_g(7)) * 0.01
    ls = torch.rand(24, 1, generator=_g(8)) * 0.01
    bias = torch.randn(24, generator=_g(9)).half()
    out = ops.linear_w8a8(a, b, rs, ls, torch.float16, torch.int8, bias)
    exact = (a.long().reshape(6, 64) @ b.long().T).double()
    want = exact * rs.double().reshape(6, 1) * ls.double().reshape(1, 24) + bias.double()
    assert out.dtype == torch.float16 and out.shape == (2, 3, 24)
    assert torch.allclose(out.double().reshape(6, 24), want, rtol=2e-3, atol=1e-3)
    # [M] scales are the same scales
    assert torch.equal(ops.linear_w8a8(a, b, rs.reshape(-1), ls.reshape(-1), torch.float16, torch.int8, bias), out)


def test_linear_w8a8_static_applies_offset_and_integer_bias():
    x = torch.randn(5, 32, generator=_g(10))
    w = torch.randint(-127, 128, (8, 32), generator=_g(11)).to(torch.int8)
    scale, offset = torch.tensor([0.02]), torch.tensor([3], dtype=torch.int8)
    qb = torch.randint(-100, 100, (8,), generator=_g(12)).to(torch.int32)
    deq = torch.rand(8, generator=_g(13)) * 1e-3
    out = ops.linear_w8a8_static(x, w, scale, offset, deq, torch.float32, torch.int8, qb)
    xq = (torch.round(x / 0.02) + 3).clamp(-128, 127)
    want = (xq.double() @ w.double().T + qb.double()) * deq.double()
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-6)


def test_norm_quant_ops_are_norm_then_per_token_quant():
    h = torch.randn(6, 64, generator=_g(14)).half()
    r = torch.randn(6, 64, generator=_g(15)).half()
    w = torch.rand(64, generator=_g(16)).half() + 0.5
    q, s = ops.rms_norm_w8a8(h, w, 1e-6)
    normed = ops.rms_norm(h.float(), w.float(), 1e-6)
    assert float((q.float() * s - normed).abs().max()) <= float(s.max()) * 0.5 + 1e-5
    q2, s2, total = ops.add_rms_norm_w8a8(h, r, w, 1e-6)
    assert torch.equal(total, h + r) and total.dtype == torch.float16
    normed2 = ops.rms_norm(total.float(), w.float(), 1e-6)
    assert float((q2.float() * s2 - normed2).abs().max()) <= float(s2.max()) * 0.5 + 1e-5


@pytest.mark.parametrize("call", [
    lambda: ops.dynamic_quant(torch.randn(2, 8), torch.float8_e4m3fn),
    lambda: ops.rms_norm_w8a8(torch.randn(2, 8), torch.ones(8), 1e-6, torch.float8_e4m3fn),
    lambda: ops.add_rms_norm_w8a8(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), 1e-6, torch.float8_e4m3fn),
    lambda: ops.linear_w8a8(torch.zeros(2, 8, dtype=torch.int8), torch.zeros(4, 8, dtype=torch.int8),
                            torch.ones(2, 1), torch.ones(4, 1), torch.float16, torch.float8_e4m3fn),
    lambda: ops.linear_w8a8_static(torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.tensor([0.1]),
                                   torch.tensor([0]), torch.ones(4), torch.float16, torch.float8_e4m3fn),
], ids=["dynamic_quant", "rms_norm_w8a8", "add_rms_norm_w8a8", "linear_w8a8", "linear_w8a8_static"])
def test_fp8_quant_dtype_is_refused_naming_it(call):
    with pytest.raises(ValueError, match="quant_dtype must be torch.int8"):
        call()


def test_w8a8_bad_inputs_name_the_argument():
    a = torch.zeros(3, 16, dtype=torch.int8)
    b = torch.zeros(8, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="rms_scale must hold 3 values"):
        ops.linear_w8a8(a, b, torch.ones(2, 1), torch.ones(8, 1), torch.float16)
    with pytest.raises(ValueError, match="linear_scale must have dtype"):
        ops.linear_w8a8(a, b, torch.ones(3, 1), torch.ones(8, 1, dtype=torch.float16), torch.float16)
    with pytest.raises(ValueError, match="a must have dtype in \\(int8\\)"):
        ops.linear_w8a8(a.half(), b, torch.ones(3, 1), torch.ones(8, 1), torch.float16)
    with pytest.raises(ValueError, match="out_dtype must be"):
        ops.linear_w8a8(a, b, torch.ones(3, 1), torch.ones(8, 1), torch.int32)
    with pytest.raises(ValueError, match="b must have 16 at dim 1|b.*a.shape\\[-1\\]"):
        ops.linear_w8a8(a, torch.zeros(8, 15, dtype=torch.int8), torch.ones(3, 1), torch.ones(8, 1), torch.float16)
    with pytest.raises(ValueError, match="quant_granularity"):
        ops.dynamic_quant(torch.randn(2, 8), torch.int8, "PER_TENSOR")
    with pytest.raises(TypeError, match="quant_dtype must be a torch.dtype"):
        ops.dynamic_quant(torch.randn(2, 8), "int8")
    with pytest.raises(ValueError, match="input_scale must hold one value"):
        ops.linear_w8a8_static(torch.randn(2, 16), b, torch.ones(2), torch.tensor([0]), torch.ones(8), torch.float16)
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        ops.add_rms_norm_w8a8(torch.randn(2, 8), None, torch.ones(8))


def test_custom_ops_trace_with_fake_tensors():
    """The fake implementations give the declared shapes/dtypes (what torch.compile and CUDA graphs see)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, s, tot = torch.ops.dlinfer.add_rms_norm_w8a8(torch.empty(2, 3, 8, dtype=torch.bfloat16),
                                                        torch.empty(2, 3, 8, dtype=torch.bfloat16),
                                                        torch.empty(8), 1e-6, torch.int8)
        assert (q.dtype, tuple(s.shape), tot.dtype) == (torch.int8, (2, 3, 1), torch.bfloat16)
        out = torch.ops.dlinfer.weight_quant_matmul(torch.empty(4, 64, dtype=torch.float16),
                                                    torch.empty(64, 3, dtype=torch.int32),
                                                    torch.empty(2, 24, dtype=torch.float16), None, None, 32)
        assert tuple(out.shape) == (4, 24)


def test_conformance_q_check_flags_more_than_rounding():
    ref = {"q": torch.arange(-100, 100, dtype=torch.int32)}
    assert _q_check({"q": ref["q"].clone()}, ref, None, torch.float16) == []
    one = ref["q"].clone()
    one[5] += 1
    assert _q_check({"q": one}, ref, None, torch.float16) == []
    two = ref["q"].clone()
    two[5] += 2
    assert _q_check({"q": two}, ref, None, torch.float16)
    many = ref["q"] + 1
    assert _q_check({"q": many}, ref, None, torch.float16)


# ------------------------------------------------------------------------------------------- the tool
def test_quantize_tool_cli_help_and_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "dlinfer.testing.quantize", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    helped = run("--help")
    assert helped.returncode == 0 and "--format" in helped.stdout and "awq" in helped.stdout
    bad = run(str(tmp_path), str(tmp_path / "out"), "--format", "awq")
    assert bad.returncode == 2 and "no config.json" in bad.stderr
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize.quantize_model(tmp_path, tmp_path / "o", "awq", group_size=48)
    with pytest.raises(ValueError, match="fmt must be one of"):
        quantize.quantize_model(tmp_path, tmp_path / "o", "gptq")


def test_w8a8_weight_quantization_is_per_output_channel():
    w = torch.randn(16, 32, generator=_g(17))
    w[3] *= 100  # one large channel does not coarsen the others
    q, scale, deq = quantize.quantize_w8a8_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (16, 1) and scale.dtype == torch.float32
    assert torch.allclose(scale.squeeze(1), w.abs().amax(1) / 127)
    assert bool(((deq - w).abs() <= scale * 0.5 + 1e-6).all())


@pytest.mark.parametrize("arch,expert,router", [("mixtral", "block_sparse_moe.experts.3.w2", "block_sparse_moe.gate"),
                                                ("qwen3_moe", "mlp.experts.5.up_proj", "mlp.gate")])
def test_w8a8_packs_moe_experts_and_keeps_the_router_float(arch, expert, router, tmp_path):
    """The W8A8 packer quantizes every expert's linears (the names LMDeploy maps onto its W8A8 experts) and leaves
    the router float, named in modules_to_not_convert as ``lmdeploy lite`` writes it; AWQ leaves experts alone."""
    import json

    from safetensors.torch import load_file

    from dlinfer.testing.tiny_models import build_tiny_model

    src = build_tiny_model(tmp_path / "src", arch, num_hidden_layers=1)
    quantize.quantize_model(src, tmp_path / "q", "w8a8", dequantized_dir=tmp_path / "deq")
    q, deq, orig = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("q", "deq", "src"))
    name = f"model.layers.0.{expert}"
    assert q[f"{name}.weight"].dtype == torch.int8 and q[f"{name}.scale"].shape == (q[f"{name}.weight"].shape[0], 1)
    assert torch.equal(deq[f"{name}.weight"], q[f"{name}.weight"].float() * q[f"{name}.scale"])
    assert not torch.equal(deq[f"{name}.weight"], orig[f"{name}.weight"])
    experts = [k for k in q if ".experts." in k and k.endswith(".weight")]
    assert experts and all(q[k].dtype == torch.int8 for k in experts)
    assert torch.equal(q[f"model.layers.0.{router}.weight"], orig[f"model.layers.0.{router}.weight"])
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "smooth_quant", "quant_dtype": "int8",
                                             "modules_to_not_convert": [router]}
    quantize.quantize_model(src, tmp_path / "awq", "awq", group_size=32)
    awq = load_file(str(tmp_path / "awq" / "model.safetensors"))
    assert f"{name}.weight" in awq and f"{name}.qweight" not in awq  # LMDeploy builds no AWQ experts
