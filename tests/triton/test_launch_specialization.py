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


def _random_awq(m: int, k: int, n: int, group: int, dtype, zeros: bool, bias: bool, seed: int):
    """Random AWQ operands (any int32 words: every nibble value) and the reference vendor's result."""
    from dlinfer.vendor.reference import quant as rq

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    qweight = torch.randint(-2**31, 2**31 - 1, (k, n // 8), generator=g, dtype=torch.int32)
    scale = (torch.rand(k // group, n, generator=g) / 8 + 0.01).to(dtype)
    offset = torch.randint(-2**31, 2**31 - 1, (k // group, n // 8), generator=g, dtype=torch.int32) if zeros else None
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return (x, qweight, scale, offset, b), rq.weight_quant_matmul(x, qweight, scale, offset, b, group)


def _close_to(got, want):
    """W rounded once to the 16-bit dtype (as the kernels form it), the output rounded: half an ulp of the
    largest outputs."""
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * want.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zeros,bias", [(True, False), (False, True)])
def test_awq_dequantize_then_gemm_matches_the_reference(dtype, zeros, bias):
    """The large-M AWQ path (weights dequantized by a kernel, then torch's GEMM) against the reference vendor, and
    its dequantized weights equal to the ones the fused kernel forms (a one-row call of the identity-like input
    reads one row of W)."""
    m, k, n, group = 37, 256, 192, 64  # N: 3 tiles of 64 columns, one partial word tile at 128
    (x, qweight, scale, offset, b), want = _random_awq(m, k, n, group, dtype, zeros, bias, 11)
    cfg = tq.GemmConfig(block_m=32, block_n=64, block_k=32, num_warps=1, num_stages=1, dequant=1)
    _close_to(tq.weight_quant_matmul(x, qweight, scale, offset, b, group, config=cfg), want)
    w = tq.awq_dequantize(qweight, scale, offset, group, dtype)
    eye = torch.eye(k, dtype=dtype)[:5]
    fused = tq.weight_quant_matmul(eye, qweight, scale, offset, None, group,
                                   config=tq.GemmConfig(block_m=16, block_n=64, block_k=32, num_warps=1,
                                                        num_stages=1, split_k=1))
    assert torch.equal(w[:5], fused)


def test_dequant_field_is_checked():
    with pytest.raises(ValueError, match="dequant=2"):
        tq._checked(tq.GemmConfig(block_m=16, block_n=64, block_k=32, dequant=2), "config", 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,split,zeros,bias", [(1, 192, 1, True, False), (3, 200, 3, False, True),
                                                  (4, 256, 2, True, True), (2, 64, 1, True, True)])
def test_awq_gemv_matches_the_reference(dtype, m, n, split, zeros, bias):
    """The few-row FMA kernel (``gemv=1``: a sweep candidate) against the reference vendor: rows 1-4 (padded to a
    power of two), N a multiple of the 64-column tile or not (200: a partial word tile), K split or not, zero
    points or symmetric, bias; and on one K tile within rounding of the fused kernel (the same W, another sum order)."""
    k, group = 384, 64
    (x, qweight, scale, offset, b), want = _random_awq(m, k, n, group, dtype, zeros, bias, m * 1000 + n)
    cfg = tq.GemmConfig(block_m=16, block_n=64, block_k=32, split_k=split, num_warps=1, num_stages=1, gemv=1)
    with bounds_checked() as log:
        got = tq.weight_quant_matmul(x, qweight, scale, offset, b, group, config=cfg)
    assert "_awq_gemv_kernel" in log.launches and ("_split_k_reduce_kernel" in log.launches) == (split > 1)
    _close_to(got, want)
    one = dict(block_m=16, block_n=64, block_k=32, num_warps=1, num_stages=1, split_k=1)
    x1 = x[:, :32].contiguous()
    w1, s1 = qweight[:32], scale[:1]
    o1 = offset[:1] if zeros else None
    gemv = tq.weight_quant_matmul(x1, w1, s1, o1, None, group, config=tq.GemmConfig(**one, gemv=1))
    fused = tq.weight_quant_matmul(x1, w1, s1, o1, None, group, config=tq.GemmConfig(**one))
    torch.testing.assert_close(gemv.float(), fused.float(), rtol=1e-2, atol=1e-3 * fused.float().abs().max().item())


def test_awq_gemv_starts_compile_pipelined_without_spills():
    """The sweep's starting points of the few-row FMA kernel (benchmarks/tune_quant.py's GEMV_STARTS), 1 and 2
    rows, Llama-3-8B's down_proj K, compile for sm_90 with the K loop's loads pipelined (cp.async) and no register
    spills (ptxas -v)."""
    from sm90 import compile_for_sm90

    compile_for_sm90(r'''
import os, re, subprocess, tempfile
import triton
from sm90 import compile_for
from benchmarks.tune_quant import GEMV_STARTS
from dlinfer.vendor.triton import quant
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
types = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*bf16", z_ptr="*i32", b_ptr="*bf16", out_ptr="*bf16",
             ws_ptr="*fp32")
for start in GEMV_STARTS:
    for rows in (1, 2):
        bk, stages = start["block_k"], start["num_stages"]
        consts = dict(K=14336, GROUP=128, HAS_ZEROS=True, HAS_BIAS=False, MAGIC=0x4300, ROWS=rows,
                      BLOCK_N=start["block_n"], BLOCK_K=bk, SPLIT_K=8, ITERS=14336 // 8 // bk, EVEN_N=True,
                      USE_PDL=True, STAGES=stages)
        k = compile_for(quant._awq_gemv_kernel, types, consts, start["num_warps"], stages)
        name = f"{start} rows {rows}"
        assert "async_copy_global_to_local" in k.asm["ttgir"], f"{name}: the K loop is not pipelined"
        assert k.metadata.shared <= 232448, name
        folder = tempfile.mkdtemp()
        with open(os.path.join(folder, "k.ptx"), "w") as f:
            f.write(k.asm["ptx"])
        log = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f"{folder}/k.ptx", "-o", os.devnull],
                             capture_output=True, text=True).stderr
        spilled = int(re.search(r"(\d+) bytes spill stores", log).group(1))
        assert spilled == 0, f"{name}: {spilled} bytes of register spills"
print("compiled")
''')
