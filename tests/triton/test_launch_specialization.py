"""Every Triton kernel of the vendor compiles for sm_90 with the specialization Triton's CUDA launcher gives the
arguments it is actually launched with.

The launcher turns an integer argument equal to 1 into a compile-time constant (a Python ``int`` inside the
kernel) and marks integers and pointers divisible by 16. The interpreter runs every kernel with plain values, so
code such as ``M.to(tl.int64)`` on an argument passes every CPU test and fails to compile on a GPU the first time
a launch passes ``M == 1`` (a one-token decode step through a split-K GEMM: it broke the W8A8 and AWQ GEMMs at
T=1 on an H200). Here every launch of each Triton op's quick conformance matrix (float16, the GPU loop form) and
of one-row calls of the dense quantized GEMMs with K split is recorded; each distinct launch in which some
argument is specialized to a constant is compiled for sm_90 as the launcher would compile it."""

from __future__ import annotations

import json

import pytest
import torch

from bounds import bounds_checked, gpu_loops
from dlinfer.testing.conformance.cases import SPECS
from dlinfer.testing.conformance.runner import ALL_OPS, run_case
from dlinfer.vendor import registry
from dlinfer.vendor.triton import quant as tq

CPU = torch.device("cpu")
TRITON_OPS = [op for op in ALL_OPS if registry.get_vendor("triton").provides(op)]


def _specialized(records) -> dict[str, dict]:
    """The distinct launches among ``records`` with an argument the launcher turns into a constant, keyed."""
    out = {}
    for rec in records:
        signature, constexprs, divisible = rec.signature()
        pinned = sorted(n for n in constexprs if n not in rec.constexprs)
        if not pinned:
            continue
        spec = dict(module=rec.module, kernel=rec.kernel, signature=signature, constexprs=constexprs,
                    divisible=sorted(divisible), options=rec.options, pinned=pinned)
        out.setdefault(json.dumps(spec, sort_keys=True, default=str), spec)
    return out


def _compile_all(specs: list[dict], tmp_path) -> None:
    from sm90 import compile_for_sm90

    (tmp_path / "spec.json").write_text(json.dumps(specs, default=str))
    compile_for_sm90(f"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
failed = []
for k in json.load(open({str(tmp_path / "spec.json")!r})):
    fn = getattr(importlib.import_module(k["module"]), k["kernel"])
    attrs = {{(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in k["divisible"]}}
    try:
        triton.compile(ASTSource(fn, k["signature"], constexprs=k["constexprs"], attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=k["options"])
    except Exception as e:
        failed.append(f"{{k['kernel']}} with {{k['pinned']}} pinned to 1: {{str(e).splitlines()[-1][:300]}}")
if failed:
    sys.exit("\\n".join(failed))
print("compiled")
""")


def _one_row_gemms() -> None:
    """One-row AWQ and int8 GEMMs whose K the CPU's split rule divides (2 tiles of 64 columns < 4 SMs)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1024, generator=g).half()
    qweight = torch.randint(-2**31, 2**31 - 1, (1024, 16), generator=g, dtype=torch.int32)
    scale = torch.rand(1024 // 128, 128, generator=g).half() / 8
    zeros = torch.randint(-2**31, 2**31 - 1, (1024 // 128, 16), generator=g, dtype=torch.int32)
    assert tq.awq_config("cpu", None, torch.float16, tq._bucket(1), 128, 1024, 128).split_k > 1
    tq.weight_quant_matmul(x, qweight, scale, zeros, None, 128)
    a = torch.randint(-127, 128, (1, 1024), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (128, 1024), generator=g, dtype=torch.int8)
    assert tq.int8_config("cpu", None, tq._bucket(1), 128, 1024).split_k > 1
    tq.linear_w8a8(a, b, torch.rand(1, 1, generator=g), torch.rand(128, generator=g), torch.float16, torch.int8,
                   None)


def test_every_launch_compiles_with_the_launchers_specialization(tmp_path):
    records = []
    for op in TRITON_OPS:
        for i, case in enumerate(SPECS[op].cases(True)):
            with gpu_loops(), bounds_checked(record=True) as log:
                result = run_case("triton", op, case, torch.float16, CPU, 500 + i)
            assert result.status in ("pass", "skipped"), (op, result.case, result.detail[:300])
            records += log.records
    with gpu_loops(), bounds_checked(record=True) as log:
        _one_row_gemms()
    assert "_split_k_reduce_kernel" in log.launches
    records += log.records
    specs = list(_specialized(records).values())
    pinned = {(s["kernel"], n) for s in specs for n in s["pinned"]}
    assert ("_split_k_reduce_kernel", "M") in pinned  # the one-row split GEMMs' reduce
    _compile_all(specs, tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zeros,bias", [(True, False), (False, True)])
def test_awq_dequantize_then_gemm_matches_the_reference(dtype, zeros, bias):
    """The large-M AWQ path (weights dequantized by a kernel, then torch's GEMM) against the reference vendor, and
    its dequantized weights equal to the ones the fused kernel forms (a one-row call of the identity-like input
    reads one row of W)."""
    from dlinfer.vendor.reference import quant as rq

    g = torch.Generator().manual_seed(11)
    m, k, n, group = 37, 256, 192, 64  # N: 3 tiles of 64 columns, one partial word tile at 128
    x = torch.randn(m, k, generator=g).to(dtype)
    qweight = torch.randint(-2**31, 2**31 - 1, (k, n // 8), generator=g, dtype=torch.int32)
    scale = (torch.rand(k // group, n, generator=g) / 8 + 0.01).to(dtype)
    offset = torch.randint(-2**31, 2**31 - 1, (k // group, n // 8), generator=g, dtype=torch.int32) if zeros else None
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    want = rq.weight_quant_matmul(x, qweight, scale, offset, b, group)
    cfg = tq.GemmConfig(block_m=32, block_n=64, block_k=32, num_warps=1, num_stages=1, dequant=1)
    got = tq.weight_quant_matmul(x, qweight, scale, offset, b, group, config=cfg)
    # W rounded once to the 16-bit dtype (as the fused kernel forms it), the output rounded: half an ulp of the
    # largest outputs
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * want.float().abs().max().item())
    w = tq.awq_dequantize(qweight, scale, offset, group, dtype)
    eye = torch.eye(k, dtype=dtype)[:5]
    fused = tq.weight_quant_matmul(eye, qweight, scale, offset, None, group,
                                   config=tq.GemmConfig(block_m=16, block_n=64, block_k=32, num_warps=1,
                                                        num_stages=1, split_k=1))
    assert torch.equal(w[:5], fused)


def test_dequant_field_is_checked():
    with pytest.raises(ValueError, match="dequant=2"):
        tq._checked(tq.GemmConfig(block_m=16, block_n=64, block_k=32, dequant=2), "config", 16)
