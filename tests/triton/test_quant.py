"""The triton vendor's quantized linear family against the reference vendor, under Triton's interpreter (CPU).

bfloat16 AWQ is left to the GPU (the interpreter's bf16 ``tl.dot`` is wrong); int8 ``tl.dot`` is exact here.
"""

from __future__ import annotations

import pytest
import torch

import dlinfer.ops as ops
from dlinfer.testing import quantize
from dlinfer.vendor import registry


def _both(fn, *args, **kwargs):
    with registry.forced("reference"):
        ref = fn(*args, **kwargs)
    with registry.forced("triton"):
        out = fn(*args, **kwargs)
    return out, ref


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,k,n,group,zeros", [(1, 128, 72, 32, True), (20, 256, 136, 64, False),
                                               (70, 128, 64, 128, True)])
def test_awq_gemm_matches_reference(dtype, m, k, n, group, zeros):
    w = torch.randn(n, k, generator=_g(1)) * 0.05
    qweight, qzeros, scales, _ = quantize.quantize_awq_weight(w, group)
    x = torch.randn(m, k, generator=_g(2)).to(dtype)
    bias = torch.randn(n, generator=_g(3)).to(dtype)
    out, ref = _both(ops.weight_quant_matmul, x, qweight, scales.to(dtype), qzeros if zeros else None, bias,
                     group_size=group)
    assert out.dtype == dtype and out.shape == (m, n)
    rel = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert rel < (1e-5 if dtype == torch.float32 else 2e-3), rel


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_gemm_is_exact_and_scales_in_the_epilogue(out_dtype):
    a = torch.randint(-127, 128, (3, 7, 96), generator=_g(4)).to(torch.int8)  # 21 rows: two row tiles of 16
    b = torch.randint(-127, 128, (80, 96), generator=_g(5)).to(torch.int8)
    ones_m, ones_n = torch.ones(21, 1), torch.ones(80, 1)
    exact, _ = _both(ops.linear_w8a8, a, b, ones_m, ones_n, torch.float32)
    assert torch.equal(exact.reshape(21, 80).double(), (a.reshape(21, 96).long() @ b.long().T).double())
    rs, ls = torch.rand(3, 7, 1, generator=_g(6)) * 1e-2, torch.rand(80, generator=_g(7)) * 1e-2
    bias = torch.randn(80, generator=_g(8)).to(out_dtype)
    out, ref = _both(ops.linear_w8a8, a, b, rs, ls, out_dtype, torch.int8, bias)
    assert out.dtype == out_dtype and out.shape == (3, 7, 80)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    assert torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol)


def test_static_w8a8_matches_reference_exactly_in_float32():
    x = torch.randn(9, 64, generator=_g(9))
    w = torch.randint(-127, 128, (40, 64), generator=_g(10)).to(torch.int8)
    qb = torch.randint(-3000, 3000, (40,), generator=_g(11)).to(torch.int32)
    deq = torch.rand(40, generator=_g(12)) * 1e-3
    out, ref = _both(ops.linear_w8a8_static, x, w, torch.tensor([0.02]), torch.tensor([-5], dtype=torch.int8), deq,
                     torch.float32, torch.int8, qb)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_quant_kernels_match_reference(dtype):
    h = torch.randn(2, 5, 200, generator=_g(13)).to(dtype)
    h[0, 3].zero_()
    r = torch.randn(2, 5, 200, generator=_g(14)).to(dtype)
    w = (torch.rand(200, generator=_g(15)) + 0.5).to(dtype)
    for name, args in (("dynamic_quant", (h, torch.int8)), ("rms_norm_w8a8", (h, w, 1e-6)),
                       ("add_rms_norm_w8a8", (h, r, w, 1e-6))):
        out, ref = _both(getattr(ops, name), *args)
        assert out[0].dtype == torch.int8 and out[1].shape == (2, 5, 1), name
        assert torch.allclose(out[1], ref[1], rtol=1e-6), name
        diff = (out[0].int() - ref[0].int()).abs()
        assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 2, (name, int((diff > 0).sum()))
        if name == "add_rms_norm_w8a8":
            assert torch.equal(out[2], ref[2])  # the new residual, rounded to nearest (bf16 included)
    q, s = _both(ops.dynamic_quant, h, torch.int8)[0]
    assert torch.all(q[0, 3] == 0) and float(s[0, 3]) == pytest.approx(1 / 127)


def test_empty_batches():
    a = torch.zeros(0, 32, dtype=torch.int8)
    out = _both(ops.linear_w8a8, a, torch.zeros(8, 32, dtype=torch.int8), torch.ones(0, 1), torch.ones(8, 1),
                torch.float16)[0]
    assert out.shape == (0, 8)
    q, s = _both(ops.dynamic_quant, torch.zeros(0, 16), torch.int8)[0]
    assert q.shape == (0, 16) and s.shape == (0, 1)
