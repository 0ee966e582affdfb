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


# ------------------------------------------------------------------------------------------------ fused_moe_w8a8
from dlinfer.vendor.triton import quant as triton_quant  # noqa: E402

# Under the interpreter the int8 GEMMs are exact and the float32 epilogues are the reference's operations, so the
# outputs agree with the reference's to one unit in the last place of the output dtype: float32 (and, in rare ties,
# 16-bit) rounding of the combine's sum, taken in another order, or an activation one float32 ulp apart landing on
# the other side of a rounding step; in bfloat16 also the final rounding, which Triton's interpreter does by
# truncation (the GPU rounds to nearest). A row or expert block computed wrongly is off by the output's own size.
MOE_TOL = {torch.float32: (2e-6, 1e-8), torch.float16: (2 ** -10, 2 ** -24), torch.bfloat16: (2 ** -7, 1e-30)}


def _moe_inputs(t, h, i, e, k, dtype, seed, *, scale_dtype=torch.float32, flat_scales=False, ids=None):
    g = _g(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    gu = torch.randint(-127, 128, (e, 2 * i, h), generator=g).to(torch.int8)
    dw = torch.randint(-127, 128, (e, h, i), generator=g).to(torch.int8)
    gs = (torch.rand(e, 2 * i, 1, generator=g) + 0.5) * (0.5 / 127 * h ** -0.5)
    ds = (torch.rand(e, h, 1, generator=g) + 0.5) * (0.5 / 127 * i ** -0.5)
    if flat_scales:
        gs, ds = gs[..., 0], ds[..., 0]
    w = torch.rand(t, k, generator=g) + 0.05
    if ids is None:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)] or [torch.zeros(0, k).long()])
        ids = ids.reshape(t, k)
    return [x, gu, gs.to(scale_dtype), dw, ds.to(scale_dtype), w, ids, k]


def _moe_close(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rtol, atol = MOE_TOL[ref.dtype]
    diff = (out.double() - ref.double()).abs()
    bound = atol + rtol * ref.double().abs()
    assert bool((diff <= bound).all()), f"max diff {float(diff.max()):.3g} (max |ref| {float(ref.abs().max()):.3g})"
    assert torch.isfinite(out).all()
    if ref.dtype == torch.float16:  # nearly every value is the reference's to the bit
        assert float((diff == 0).double().mean()) >= 0.97


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,h,i,e,k,renormalize", [(1, 64, 32, 4, 1, False), (7, 72, 40, 6, 3, True),
                                                   (13, 40, 24, 9, 2, False), (33, 96, 56, 8, 8, True)])
def test_fused_moe_w8a8_matches_reference(dtype, t, h, i, e, k, renormalize):
    """Odd sizes (K not a multiple of the tile, N not a multiple of BLOCK_N), 1..8 experts per token, all experts."""
    args = _moe_inputs(t, h, i, e, k, dtype, seed=t + h)
    out, ref = _both(ops.fused_moe_w8a8, *args, renormalize)
    _moe_close(out, ref)


def test_fused_moe_w8a8_repeated_ids_bf16_scales_strided_inputs():
    """An expert picked twice by one token (counted twice, as the reference does), LMDeploy's bf16 scales (it keeps
    them in bf16 for bf16 models), [E, R] scales, int32 ids, and row-strided / transposed views of every input."""
    t, h, i, e, k = 11, 48, 24, 5, 3
    ids = torch.randint(0, e, (t, k), generator=_g(30))
    ids[:, 1] = ids[:, 0]  # every token repeats an expert
    x, gu, gs, dw, ds, w, ids, k = _moe_inputs(t, h, i, e, k, torch.bfloat16, 31, scale_dtype=torch.bfloat16,
                                               flat_scales=True, ids=ids)
    wide = torch.randn(t, h + 16, generator=_g(32)).to(torch.bfloat16)
    wide[:, 8:8 + h] = x
    x_view = wide[:, 8:8 + h]  # rows 64 apart
    gu_big = torch.zeros(e, 2 * i + 8, h, dtype=torch.int8)
    gu_big[:, 4:4 + 2 * i] = gu
    ids_t = ids.T.contiguous().T.to(torch.int32)  # column-major
    w_t = w.T.contiguous().T
    assert not x_view.is_contiguous() and not ids_t.is_contiguous() and not w_t.is_contiguous()
    out, ref = _both(ops.fused_moe_w8a8, x_view, gu_big[:, 4:4 + 2 * i], gs, dw, ds, w_t, ids_t, k, True)
    ref2 = _both(ops.fused_moe_w8a8, x, gu, gs, dw, ds, w, ids, k, True)[1]
    assert torch.equal(ref, ref2)
    _moe_close(out, ref)


_NARROW = dict(BLOCK_M=16, up=dict(BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2),
               down=dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2))
_WIDE = dict(BLOCK_M=32, up=dict(BLOCK_N=32, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=2),
             down=dict(BLOCK_N=64, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2))


def _skewed_ids(t, e, k, seed):
    ids = torch.stack([torch.randperm(e, generator=_g(seed + r))[:k] for r in range(t)])
    ids[:, 0] = 0  # expert 0 gets every token
    ids[::3, 1] = torch.where(ids[::3, 0] == 1, 2, 1)  # expert 1 a third of them
    return ids


@pytest.mark.parametrize("hot_rows", [20, 1, 10_000])  # some experts hot, every expert hot, none
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_moe_w8a8_hot_experts_get_their_own_tiles(dtype, hot_rows, monkeypatch):
    """Skewed routing: experts holding >= hot_rows rows run on the wide-tile GEMMs, the others on the narrow ones;
    every row is computed once either way."""
    t, h, i, e, k = 40, 64, 40, 6, 2
    args = _moe_inputs(t, h, i, e, k, dtype, 40, ids=_skewed_ids(t, e, k, 41))
    launched = []
    real = triton_quant._w8a8_gemm
    monkeypatch.setattr(triton_quant, "_w8a8_gemm",
                        lambda *a, **kw: (launched.append((kw["silu"], kw["hot"])), real(*a, **kw))[1])
    with registry.forced("reference"):
        ref = ops.fused_moe_w8a8(*args, True)
    out = triton_quant.fused_moe_w8a8(*args[:-1], True, config=dict(_NARROW, hot=_WIDE, hot_rows=hot_rows))
    _moe_close(out, ref)
    hot_launches = 0 if hot_rows > t else 2
    assert sorted(launched) == sorted([(True, False), (False, False)] + [(True, True), (False, True)][:hot_launches])


def test_fused_moe_w8a8_default_config_serves_hot_experts_on_wide_tiles(monkeypatch):
    """Without a config, a call with enough tokens for the hot class (the tiers' HOT_LOAD config, 128-row blocks)
    takes the two-class path and matches the reference."""
    t, h, i, e, k = 136, 32, 16, 8, 2
    args = _moe_inputs(t, h, i, e, k, torch.float16, 50, ids=_skewed_ids(t, e, k, 51))
    cfg = triton_quant.w8a8_launch_config(t, e, k)
    assert cfg["hot"]["BLOCK_M"] == 128 and cfg["BLOCK_M"] < 128
    launched = []
    real = triton_quant._w8a8_gemm
    monkeypatch.setattr(triton_quant, "_w8a8_gemm",
                        lambda *a, **kw: (launched.append((kw["hot"], kw["block_m"])), real(*a, **kw))[1])
    out, ref = _both(ops.fused_moe_w8a8, *args, False)
    _moe_close(out, ref)
    assert (True, 128) in launched and (False, cfg["BLOCK_M"]) in launched


def test_fused_moe_w8a8_writes_every_element_and_is_deterministic(monkeypatch):
    """The buffers the call allocates are poisoned (NaN floats, huge ints): an unwritten element would show."""
    args = _moe_inputs(9, 40, 24, 4, 2, torch.float16, 60)
    with registry.forced("reference"):
        ref = ops.fused_moe_w8a8(*args, True)
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(torch.iinfo(t.dtype).max // 2) if t.dtype in (torch.int32, torch.int64) else t

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
        m.setattr(torch, "empty_like", lambda *a, **kw: fill(real_like(*a, **kw)))
        first = triton_quant.fused_moe_w8a8(*args[:-1], True)
        second = triton_quant.fused_moe_w8a8(*args[:-1], True)
    _moe_close(first, ref)
    assert torch.equal(first, second)


def test_fused_moe_w8a8_degenerate_sizes():
    args = _moe_inputs(0, 32, 16, 4, 2, torch.float16, 70)
    out, ref = _both(ops.fused_moe_w8a8, *args, False)
    assert out.shape == ref.shape == (0, 32)
    x, gu, gs, dw, ds, w, ids, k = _moe_inputs(3, 32, 16, 4, 2, torch.float16, 71)
    out = triton_quant.fused_moe_w8a8(x, gu[:, :0], gs[:, :0], dw[:, :, :0], ds, w, ids, False)
    assert torch.equal(out, torch.zeros_like(x))  # no intermediate features: the experts add nothing
    with registry.REGISTRY.forced("reference"):
        ref = ops.fused_moe_w8a8(x, gu[:, :0], gs[:, :0], dw[:, :, :0], ds, w, ids, k, False)
    assert torch.equal(ref, torch.zeros_like(x))  # the reference agrees


def test_fused_moe_w8a8_precompiles_every_bucket_once(monkeypatch):
    """The first eager call of a shape on a GPU runs every token bucket up to moe.PRECOMPILE_MIN_TOKENS (or the
    call's own size) once, with that bucket's tier config; DLINFER_PRECOMPILE=0 turns it off."""
    args = _moe_inputs(3, 32, 16, 4, 2, torch.float16, 80)
    x, gu, gs, dw, ds, w, ids, k = args
    runs = []
    monkeypatch.setattr(triton_quant._moe, "PRECOMPILE_MIN_TOKENS", 8)
    monkeypatch.setattr(triton_quant, "fused_moe_w8a8",
                        lambda xx, *a, config=None: runs.append((xx.shape[0], config["BLOCK_M"])))
    monkeypatch.setattr(triton_quant, "_precompiled", set())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # a CPU build of torch raises
    triton_quant._precompile_on_first_use(x, gu, gs, dw, ds, k)
    assert [t for t, _ in runs] == [1, 2, 4, 8]
    assert all(bm == triton_quant.w8a8_launch_config(t, 4, k)["BLOCK_M"] for t, bm in runs)
    assert (x.device.index, x.dtype, gu.shape, k) in triton_quant._precompiled
    runs.clear()
    monkeypatch.setenv("DLINFER_PRECOMPILE", "0")
    triton_quant._precompile_on_first_use(x, gu, gs, dw, ds, k)
    assert runs == []


def test_triton_vendor_serves_fused_moe_w8a8():
    from dlinfer.vendor import get_vendor

    assert "fused_moe_w8a8" in get_vendor("triton").ops


_COMPILE_FOR_SM90 = r'''
import json
from sm90 import compile_sm90
from dlinfer.vendor.triton import quant

for cfg in [c for _, c in quant.W8A8_TIERS]:
    for gemm, out_types in (("up", ("*bf16", "*fp16", "*fp32")), ("down", ("*fp32",))):
        c = cfg[gemm]
        for out_t in out_types:
            for hot in (False, True):
                shared, ttgir = compile_sm90(
                    quant._moe_w8a8_gemm_kernel,
                    dict(a_ptr="*i8", a_scale_ptr="*fp32", w_ptr="*i8", out_ptr=out_t, sorted_ptr="*i32",
                         meta_ptr="*i32", w_scale_ptr="*bf16" if out_t == "*bf16" else "*fp32"),
                    dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=c["GROUP_M"],
                         EB=128, HOT=hot, SILU=gemm == "up", EVEN_K=True, WHILE_LOOP=False),
                    c["num_warps"], c["num_stages"], divisible=("n_out", "k_dim", "up_offset"))
                name = f"w8a8 {gemm} out={out_t} hot={hot} {json.dumps(cfg, sort_keys=True)}"
                assert shared <= 232448, f"{name}: {shared} bytes of shared memory (H100/H200 max 232448)"
                assert "async_copy_global_to_local" in ttgir, f"{name}: the K loop is not pipelined"
                assert "i8" in ttgir and "dot" in ttgir, f"{name}: no int8 MMA"
                if cfg["BLOCK_M"] >= 64:
                    assert "warp_group_dot" in ttgir, f"{name}: no wgmma"
for x_t in ("*bf16", "*fp16", "*fp32"):
    for block in (4096, 16384):
        for residual, norm in ((False, False), (False, True), (True, True)):
            compile_sm90(quant._row_quant_kernel, dict(x_ptr=x_t, res_ptr=x_t, w_ptr=x_t, q_ptr="*i8",
                                                      scale_ptr="*fp32", sum_ptr=x_t, eps="fp32"),
                         dict(HAS_RESIDUAL=residual, NORM=norm, BLOCK=block), max(1, min(16, block // 512)))
    compile_sm90(quant._static_quant_kernel, dict(x_ptr=x_t, q_ptr="*i8", scale_ptr=x_t, offset_ptr="*i8"),
                 dict(BLOCK=1024), 4)
print("compiled")
'''


def test_w8a8_kernels_compile_for_sm90():
    """Every W8A8 expert GEMM config of the tiers (both classes, each output dtype) and the row-quantization
    kernels compile for sm_90 with the triton wheel's ptxas: shared memory within the H100/H200 limit, a pipelined
    K loop, int8 MMAs (wgmma from 64-row blocks)."""
    from sm90 import compile_for_sm90

    compile_for_sm90(_COMPILE_FOR_SM90)
