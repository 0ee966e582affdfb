"""bfloat16 under Triton's interpreter (tests/triton/interp_bf16.py): the patched arithmetic is a GPU's (float32
math, one round-to-nearest-even per operation), and with it the Triton vendor's matmul ops pass the conformance
matrix in bf16 on this CPU, the dtype models are served in (the conformance runner skips them under the interpreter
otherwise)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from dlinfer.testing.conformance import runner


@triton.jit
def _arith(a_ptr, b_ptr, h_ptr, out_ptr, dot_ptr, cast_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i)
    b = tl.load(b_ptr + i)
    tl.store(out_ptr + i, a * b - a)
    tl.store(out_ptr + N + i, tl.maximum(a, b))
    tl.store(out_ptr + 2 * N + i, tl.where(a < b, a, b))
    tl.store(cast_ptr + i, (a.to(tl.float32) / 3.0).to(tl.bfloat16))
    tl.store(cast_ptr + N + i, tl.load(h_ptr + i).to(tl.bfloat16))
    r = tl.arange(0, 16)
    x = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
    y = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
    tl.store(dot_ptr + r[:, None] * 16 + r[None, :], tl.dot(x, y))


def test_bf16_arithmetic_is_a_gpus():
    g = torch.Generator().manual_seed(0)
    n = 256
    a = torch.randn(n, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    h = torch.randn(n, generator=g).to(torch.float16)
    out = torch.empty(3 * n, dtype=torch.bfloat16)
    dot = torch.empty(16, 16, dtype=torch.float32)
    cast = torch.empty(2 * n, dtype=torch.bfloat16)
    _arith[(1,)](a, b, h, out, dot, cast, N=n)
    # each op exact in float32, rounded once to bf16 (torch's bf16 ops do the same)
    assert torch.equal(out[:n], a * b - a)
    assert torch.equal(out[n:2 * n], torch.maximum(a, b))
    assert torch.equal(out[2 * n:], torch.where(a < b, a, b))
    assert torch.equal(cast[:n], (a.float() / 3.0).to(torch.bfloat16))  # round to nearest even, not truncation
    assert torch.equal(cast[n:], h.to(torch.bfloat16))
    ref = a.float().view(16, 16) @ b.float().view(16, 16)
    assert torch.allclose(dot, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", sorted(runner.MATMUL_OPS))
def test_matmul_ops_pass_the_conformance_matrix_in_bf16(op, monkeypatch):
    monkeypatch.setattr(runner, "interpreter_skip", lambda vendor, op, dtype: None)
    report = runner.run_conformance("triton", device="cpu", quick=True, ops=[op], dtypes=[torch.bfloat16], seed=0)
    ran = [r for r in report.results if r.op == op and r.status != "skipped"]
    failed = [r for r in ran if r.status in ("fail", "error")]
    assert any(r.status == "pass" for r in ran) and not failed, [(r.case, r.status, r.detail) for r in failed]
