"""The triton vendor's MoE kernels (gating, fused experts) against the reference vendor, under Triton's interpreter.

fused_moe uses ``tl.dot``, which Triton 3.6's interpreter computes wrongly for bf16: it is tested here in fp32
and fp16 only (bf16 on the GPU). Buffers the kernels allocate are poisoned during the triton call (NaN floats,
huge ints): an unwritten output element shows up as NaN, an unwritten index as an out-of-bounds access.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import triton

import dlinfer.ops as ops
import dlinfer.vendor
from dlinfer.utils.layout import is_n_fastest, n_fastest
from dlinfer.vendor.triton import host
from dlinfer.vendor.triton import moe as triton_moe
from dlinfer.vendor.triton import tuning

GEMM_TOL = {torch.float32: (2e-5, 2e-4), torch.float16: (3e-3, 5e-3)}


@pytest.fixture
def poison(monkeypatch):
    """Call ``poison(fn, *args)`` to run ``fn`` with ``torch.empty``/``empty_like`` returning poisoned tensors."""

    def fill(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        if t.dtype in (torch.int32, torch.int64):
            return t.fill_(torch.iinfo(t.dtype).max // 2)
        return t

    real_empty, real_like = torch.empty, torch.empty_like

    def call(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
            m.setattr(torch, "empty_like", lambda *a, **k: fill(real_like(*a, **k)))
            return fn(*args, **kwargs)

    return call


def with_vendor(vendor, fn, *args, **kwargs):
    dlinfer.vendor.set_override(vendor)
    try:
        return fn(*args, **kwargs)
    finally:
        dlinfer.vendor.clear_overrides()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_triton_vendor_provides_moe_ops():
    vendor = dlinfer.vendor.get_vendor("triton")
    assert vendor.ops["moe_gating_topk_softmax"] is triton_moe.moe_gating_topk_softmax
    assert "fused_moe" in vendor.ops


# ---------------------------------------------------------------- gating

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,topk", [(1, 8, 2), (7, 5, 3), (33, 60, 8), (3, 128, 8), (4, 6, 6)])
def test_gating(poison, dtype, tokens, experts, topk):
    logits = (torch.randn(tokens, experts) * 3).to(dtype)
    weights, ids = poison(with_vendor, "triton", ops.moe_gating_topk_softmax, logits, topk)
    ref_weights, ref_ids = with_vendor("reference", ops.moe_gating_topk_softmax, logits, topk)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (tokens, topk)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    assert torch.equal(ids, ref_ids)


def test_gating_ties_go_to_lower_expert_id(poison):
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0],
                           [1.0, 3.0, 3.0, 0.0, 3.0],
                           [2.0, -1.0, 2.0, 2.0, 5.0],
                           [-4.0, -4.0, -4.0, 9.0, -4.0]])
    weights, ids = poison(with_vendor, "triton", ops.moe_gating_topk_softmax, logits, 3)
    assert ids.tolist() == [[0, 1, 2], [1, 2, 4], [4, 0, 2], [3, 0, 1]]
    ref_weights, ref_ids = with_vendor("reference", ops.moe_gating_topk_softmax, logits, 3)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)


def test_gating_strided_logits(poison):
    buf = torch.randn(9, 20)
    logits = buf[::2, 3:3 + 12]
    weights, ids = poison(with_vendor, "triton", ops.moe_gating_topk_softmax, logits, 4)
    ref_weights, ref_ids = with_vendor("reference", ops.moe_gating_topk_softmax, logits, 4)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- fused_moe

def _moe_inputs(tokens, hidden, inter, experts, topk, dtype, id_dtype=torch.int64):
    x = torch.randn(tokens, hidden).to(dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden) / hidden ** 0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter) / inter ** 0.5).to(dtype)
    logits = torch.randn(tokens, experts)
    weights, ids = torch.softmax(logits, -1).topk(topk, dim=-1)
    return x, gate_up, down, weights, ids.to(id_dtype)


def _check_moe(out, ref, dtype):
    atol, rtol = GEMM_TOL[dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not torch.isnan(out).any(), "NaN in fused_moe output (unwritten element?)"
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,hidden,inter,experts,topk,renormalize,id_dtype", [
    (1, 32, 16, 8, 2, False, torch.int64),   # most experts empty
    (5, 40, 24, 4, 1, True, torch.int32),    # odd H and I: masked K tails
    (17, 48, 36, 6, 3, True, torch.int64),
    (37, 33, 20, 4, 2, False, torch.int32),  # several BLOCK_M blocks per expert
])
def test_fused_moe(poison, dtype, tokens, hidden, inter, experts, topk, renormalize, id_dtype):
    x, gate_up, down, weights, ids = _moe_inputs(tokens, hidden, inter, experts, topk, dtype, id_dtype)
    out = poison(with_vendor, "triton", ops.fused_moe, x, gate_up, down, weights, ids, topk, renormalize)
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, topk, renormalize)
    _check_moe(out, ref, dtype)


@pytest.mark.parametrize("config", [
    # many small tiles: several K steps, N tiles, row blocks per expert and a GROUP_M swizzle over them
    dict(BLOCK_M=16, up=dict(BLOCK_N=16, BLOCK_K=16, GROUP_M=3, num_warps=4, num_stages=2),
         down=dict(BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)),
    # BLOCK_M larger than most experts' row counts (heavy padding), K in one step
    dict(BLOCK_M=64, up=dict(BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=2),
         down=dict(BLOCK_N=64, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2)),
])
def test_fused_moe_tile_configs(poison, config):
    dtype = torch.float16
    x, gate_up, down, weights, ids = _moe_inputs(29, 48, 40, 5, 2, dtype)
    out = poison(triton_moe.fused_moe, x, gate_up, down, weights, ids, True, config=config)
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, 2, True)
    _check_moe(out, ref, dtype)


_NARROW = dict(BLOCK_M=16, up=dict(BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2),
               down=dict(BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2))
_WIDE = dict(BLOCK_M=32, up=dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2),
             down=dict(BLOCK_N=16, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=2))


@pytest.mark.parametrize("hot_rows", [20, 1, 10_000])  # some experts hot, every expert hot, none
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_moe_hot_experts_get_their_own_tiles(poison, dtype, hot_rows):
    """Skewed routing: experts holding >= hot_rows rows run on the wide-tile GEMMs, the others on the narrow
    ones; every (token, slot) pair is computed exactly once (NaN poison shows a row no GEMM wrote)."""
    x, gate_up, down, weights, ids = _moe_inputs(70, 48, 40, 6, 2, dtype)
    ids[:, 0] = 0  # expert 0 is in every token's top-2 (70 rows), the others share the second slot
    ids[:, 1] = 1 + ids[:, 1] % 5
    ids[::3, 1] = 1  # expert 1 hot too (>= 24 rows)
    config = dict(_NARROW, hot=_WIDE, hot_rows=hot_rows)
    out = poison(triton_moe.fused_moe, x, gate_up, down, weights, ids, True, config=config)
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, 2, True)
    _check_moe(out, ref, dtype)


def test_fused_moe_default_config_serves_hot_experts_on_wide_tiles(poison, monkeypatch):
    """Without a config, a call with enough tokens takes the two-class path (the hot experts' config from
    tuning.hot_config) and matches the reference."""
    asked = []
    monkeypatch.setattr(tuning, "hot_config", lambda *a, **k: (asked.append((a, k)), dict(_WIDE))[1])
    monkeypatch.setattr(tuning, "launch_config", lambda *a, **k: dict(_NARROW))
    launched = []
    real = triton_moe._gemm
    monkeypatch.setattr(triton_moe, "_gemm", lambda *a, **k: (launched.append((k["hot"], k["block_m"])),
                                                                 real(*a, **k))[1])
    x, gate_up, down, weights, ids = _moe_inputs(40, 32, 24, 4, 2, torch.float32)
    ids[:, 0] = 0
    ids[:, 1] = 1 + ids[:, 1] % 3
    out = poison(triton_moe.fused_moe, x, gate_up, down, weights, ids, False)
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, 2, False)
    _check_moe(out, ref, torch.float32)
    assert sorted(set(launched)) == [(False, 16), (True, 32)]
    # the hot tiles are chosen for this call's token count, above its own row block
    assert asked and all(a[-1] == 40 and k == {"above": 16, "n_fastest": False} for a, k in asked)


def test_the_hot_stream_is_asked_for_at_calls_without_a_hot_class(poison, monkeypatch):
    """The hot experts' stream is asked for at every call, not only where there is a hot class: made at an
    engine's first eager call, it exists when a graph is captured later (it cannot be made during a capture)."""
    asked = []
    monkeypatch.setattr(triton_moe, "_hot_stream", lambda device, want=None: asked.append((device, want)))
    x, gate_up, down, weights, ids = _moe_inputs(8, 32, 24, 4, 2, torch.float32)
    out = poison(triton_moe.fused_moe, x, gate_up, down, weights, ids, True, config=dict(_NARROW))
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, 2, True)
    _check_moe(out, ref, torch.float32)
    assert asked == [(x.device, None)]


# ---------------------------------------------------------------- Hopper variants (config fields)

_HOPPER_FLAGS = [dict(TMA_B=1), dict(TMA_A=1), dict(TMA_ACT=1), dict(TMA_A=1, TMA_B=1), dict(PERSISTENT=1),
                 dict(TMA_B=1, PERSISTENT=1), dict(TMA_A=1, TMA_B=1, WS=1), dict(TMA_ACT=1, TMA_B=1, WS=1),
                 dict(TMA_A=1, TMA_B=1, PERSISTENT=1, WS=1)]


def _expected(flags: dict, gemm: str, block_m: int, merged: bool = False, n_fastest: bool = False) -> tuple:
    """The launch a GEMM should get from ``flags`` (interpreter: TMA always possible): (TMA_A, TMA_B, PERSISTENT,
    WS), or ("merged", TMA_A, TMA_B); TMA_B 2 for ``n_fastest`` weights."""
    tma_a = bool(flags.get("TMA_A")) or (gemm == "down" and bool(flags.get("TMA_ACT")))
    tma_b = bool(flags.get("TMA_B")) * (2 if n_fastest else 1)
    if merged:  # persistent (MERGE) or one program per possible tile (MERGE_GRID alone)
        return ("merged", tma_a, tma_b, bool(flags.get("MERGE")))
    ws = bool(flags.get("WS")) and tma_a and tma_b and block_m >= 64
    return (tma_a, tma_b, bool(flags.get("PERSISTENT") or flags.get("MERGE")), ws)


def _spy_gemms(monkeypatch, weights: list | None = None):
    """Record, per GEMM kernel launch, what ``_expected`` describes, checking that a descriptor came with each TMA
    field and that the gate_up GEMM writes its activations in the sorted order exactly when the down GEMM reads
    them by TMA. ``weights`` (a list) also gets, per launch, the weight the kernel reads: ``(SILU, data_ptr,
    (stride_we, stride_wn, stride_wk), SPLIT_UP)``."""
    launched, sorted_writes = [], []
    real, real_merged = triton_moe._moe_gemm_kernel, triton_moe._moe_gemm_merged_kernel

    def check(kw, arg):
        assert (arg["a_desc"] is not None, arg["w_desc"] is not None) == (kw["TMA_A"], bool(kw["TMA_B"]))
        # TMA_B: 1 reads a K-fastest weight's [E * N, K] rows, 2 an N-fastest one's [E, K, N] boxes
        assert kw["TMA_B"] in (0, 1 if arg["stride_wk"] == 1 else 2), kw["TMA_B"]
        if kw["SILU"]:
            sorted_writes.append(kw["SORTED_OUT"])
        else:  # every gate_up launch wrote the activations the way this down GEMM reads them
            assert not kw["SORTED_OUT"] and sorted_writes and set(sorted_writes) == {kw["TMA_A"]}
        if weights is not None:
            strides = tuple(arg[f"stride_w{d}"] for d in "enk")
            weights.append((kw["SILU"], arg["w_ptr"].data_ptr(), strides, kw["SPLIT_UP"]))

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                check(kw, dict(zip(real.arg_names, args)))
                launched.append((kw["TMA_A"], kw["TMA_B"], kw["PERSISTENT"], kw["WS"]))
                return real[grid](*args, **kw)
            return launch

    class MergedSpy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                arg = dict(zip(real_merged.arg_names, args))
                check(kw, arg)
                launched.append(("merged", kw["TMA_A"], kw["TMA_B"], kw["PERSISTENT"]))
                # one program per possible tile of both classes (hot ones first), or at most one per SM
                n_out, max_hot_blocks, max_blocks = arg["n_out"], arg["max_hot_blocks"], arg["max_blocks"]
                tiles = (max_blocks * triton.cdiv(n_out, kw["BLOCK_N"])
                         + max_hot_blocks * triton.cdiv(n_out, kw["HOT_BLOCK_N"]))
                assert grid[0] == (min(tiles, triton_moe._num_sms(args[0].device)) if kw["PERSISTENT"] else tiles)
                return real_merged[grid](*args, **kw)
            return launch

    monkeypatch.setattr(triton_moe, "_moe_gemm_kernel", Spy())
    monkeypatch.setattr(triton_moe, "_moe_gemm_merged_kernel", MergedSpy())
    return launched


@pytest.mark.parametrize("flags", _HOPPER_FLAGS, ids=lambda f: "+".join(f))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tokens,experts,topk", [(1, 8, 2), (45, 3, 2)])  # T=1: most experts empty; 2 blocks each
def test_fused_moe_hopper_variants(poison, monkeypatch, flags, dtype, tokens, experts, topk):
    """TMA reads of the weight (B), of the expert-sorted copy of A or only of the sorted activations, the
    persistent tile loop and warp specialization: the same results as the reference, every row written (NaN
    poison), the variant really run. K = 48 is not a multiple of BLOCK_K = 32 (the descriptors' zero fill) and
    the last N tile is partial."""
    launched = _spy_gemms(monkeypatch)
    x, gate_up, down, weights, ids = _moe_inputs(tokens, 48, 40, experts, topk, dtype)
    block_m = 64 if flags.get("WS") else 16  # WS only serves row blocks of 64 and more (wgmma's)
    config = dict(BLOCK_M=block_m, up=dict(BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2),
                  down=dict(BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2), **flags)
    out = poison(triton_moe.fused_moe, x, gate_up, down, weights, ids, True, config=config)
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, topk, True)
    _check_moe(out, ref, dtype)
    assert launched == [_expected(flags, "up", block_m), _expected(flags, "down", block_m)]


_HOT_VARIANTS = [dict(TMA_A=1, TMA_B=1, PERSISTENT=1), dict(TMA_A=1, TMA_B=1, PERSISTENT=1, WS=1),
                 dict(TMA_ACT=1, TMA_B=1, PERSISTENT=1, WS=1), dict(MERGE=1), dict(TMA_A=1, TMA_B=1, MERGE=1),
                 dict(TMA_ACT=1, MERGE=1), dict(MERGE_GRID=1), dict(TMA_A=1, TMA_B=1, MERGE_GRID=1),
                 dict(TMA_ACT=1, TMA_B=1, MERGE_GRID=1)]


@pytest.mark.parametrize("flags", _HOT_VARIANTS, ids=lambda f: "+".join(f))
@pytest.mark.parametrize("hot_rows", [20, 1, 10_000])  # some experts hot, every expert hot, none
def test_fused_moe_hopper_variants_with_hot_experts(poison, monkeypatch, hot_rows, flags):
    """Both tile classes on the TMA + persistent path (WS: with the binary search for a block's expert), or in one
    merged launch (MERGE persistent, MERGE_GRID one program per possible tile; the same tiles as two launches:
    the same bits): the hidden rows' sorted copy and the activations hold each class's blocks at the rows its
    GEMMs read."""
    dtype = torch.float16
    x, gate_up, down, weights, ids = _moe_inputs(70, 48, 40, 6, 2, dtype)
    ids[:, 0] = 0
    ids[:, 1] = 1 + ids[:, 1] % 5
    ids[::3, 1] = 1
    hot = dict(_WIDE, BLOCK_M=64)  # WS takes the hot experts' tiles (64 rows: expert 0 holds two blocks)
    config = dict(_NARROW, hot=hot, hot_rows=hot_rows, **flags)
    launched = _spy_gemms(monkeypatch)
    out = poison(triton_moe.fused_moe, x, gate_up, down, weights, ids, True, config=config)
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, 2, True)
    _check_moe(out, ref, dtype)
    if hot_rows > 70:  # T < hot_rows: no hot class, one (persistent) launch per GEMM
        assert launched == [_expected(flags, g, 16) for g in ("up", "down")]
    elif flags.get("MERGE") or flags.get("MERGE_GRID"):
        assert launched == [_expected(flags, g, 0, merged=True) for g in ("up", "down")]
        launched.clear()
        apart = dict(config, MERGE=0, MERGE_GRID=0, PERSISTENT=1)
        assert torch.equal(out, poison(triton_moe.fused_moe, x, gate_up, down, weights, ids, True, config=apart))
        assert launched == [_expected(apart, g, bm) for g in ("up", "down") for bm in (16, 64)]
    else:  # the narrow-tile class (BLOCK_M 16), then the hot one (64), per GEMM
        assert launched == [_expected(flags, g, bm) for g in ("up", "down") for bm in (16, 64)]


# ---------------------------------------------------------------- weight layouts


def _skewed_inputs(dtype, hidden=40, inter=24):
    """70 tokens, top-2 of 6 experts, experts 0 and 1 hot (70 and >= 24 rows); H = 40, I = 24: K of both GEMMs
    not a multiple of BLOCK_K = 16 and partial last N tiles, with 16-byte rows (TMA_A and TMA_ACT can run)."""
    x, gate_up, down, weights, ids = _moe_inputs(70, hidden, inter, 6, 2, dtype)
    ids[:, 0] = 0
    ids[:, 1] = 1 + ids[:, 1] % 5
    ids[::3, 1] = 1
    return x, gate_up, down, weights, ids


_HOT = dict(hot=_WIDE, hot_rows=20)
_LAYOUT_CONFIGS = [dict(_NARROW), dict(_NARROW, PERSISTENT=1), dict(_NARROW, TMA_A=1, TMA_B=1),
                   dict(_NARROW, TMA_ACT=1, PERSISTENT=1), dict(_NARROW, **_HOT, HOT_STREAM=1, TMA_B=1),
                   dict(_NARROW, **_HOT, TMA_A=1, TMA_B=1, MERGE=1), dict(_NARROW, **_HOT, MERGE_GRID=1)]


def _layout_id(cfg: dict) -> str:
    return "+".join(["hot"] * ("hot" in cfg) + [f for f in tuning.FLAGS + ("HOT_STREAM",) if cfg.get(f)]) or "plain"


@pytest.mark.parametrize("config", _LAYOUT_CONFIGS, ids=_layout_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_reads_n_fastest_weights_in_place(poison, monkeypatch, dtype, config):
    """Weights stored N-fastest give the reference's result on every path: the kernels read them in place (the
    caller's pointer and strides, no copy), by pointers with the gate_up GEMM's gate and up tiles apart
    (SPLIT_UP), or with TMA_B through a 3-D descriptor of their [E, K, N] view (TMA_B=2; gate and up as two
    boxes). H = 40, I = 24: K steps past an expert's last K row, whose zeros come from the descriptor's bounds."""
    x, gate_up, down, weights, ids = _skewed_inputs(dtype)
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, 2, True)
    up_n, down_n = n_fastest(gate_up), n_fastest(down)
    reads = []
    launched = _spy_gemms(monkeypatch, reads)
    out = poison(triton_moe.fused_moe, x, up_n, down_n, weights, ids, True, config=config)
    _check_moe(out, ref, dtype)
    tma_b = bool(config.get("TMA_B"))
    if config.get("MERGE") or config.get("MERGE_GRID"):
        assert launched == [_expected(config, g, 0, merged=True, n_fastest=True) for g in ("up", "down")]
    else:  # with a hot class, the narrow-tile launch, then the hot one (_WIDE: 32 rows), per GEMM
        assert launched == [_expected(config, g, bm, n_fastest=True)
                            for g in ("up", "down") for bm in (16, 32)[:1 + ("hot" in config)]]
    assert len(reads) == len(launched)
    for silu, ptr, strides, split in reads:
        w = up_n if silu else down_n
        assert (ptr, strides, split) == (w.data_ptr(), w.stride(), silu and not tma_b) and strides[1] == 1


@pytest.mark.parametrize("config", [dict(_NARROW), dict(_NARROW, **_HOT, MERGE=1)], ids=_layout_id)
def test_fused_moe_n_fastest_weights_with_whole_k_steps(poison, monkeypatch, config):
    """H = 64, I = 32: every K step (EVEN_K: no K mask) and N tile whole."""
    dtype = torch.float16
    x, gate_up, down, weights, ids = _skewed_inputs(dtype, 64, 32)
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, 2, True)
    up_n, down_n = n_fastest(gate_up), n_fastest(down)
    reads = []
    _spy_gemms(monkeypatch, reads)
    out = poison(triton_moe.fused_moe, x, up_n, down_n, weights, ids, True, config=config)
    _check_moe(out, ref, dtype)
    assert reads == [(True, up_n.data_ptr(), up_n.stride(), True), (False, down_n.data_ptr(), down_n.stride(), False)]


@pytest.mark.parametrize("which", ["gate_up", "down"])
def test_fused_moe_one_n_fastest_weight(poison, monkeypatch, which):
    """One weight of each layout: each GEMM reads its own in place, by TMA (asked), each through the descriptor of
    its layout (TMA_B 2 for the N-fastest one, 1 for the other), and TMA_A stays on."""
    dtype = torch.float16
    x, gate_up, down, weights, ids = _skewed_inputs(dtype)
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, 2, True)
    if which == "gate_up":
        gate_up = n_fastest(gate_up)
    else:
        down = n_fastest(down)
    reads = []
    launched = _spy_gemms(monkeypatch, reads)
    out = poison(triton_moe.fused_moe, x, gate_up, down, weights, ids, True, config=dict(_NARROW, TMA_A=1, TMA_B=1))
    _check_moe(out, ref, dtype)
    assert launched == [(True, 2 if which == "gate_up" else 1, False, False),
                        (True, 2 if which == "down" else 1, False, False)]
    assert reads == [(True, gate_up.data_ptr(), gate_up.stride(), False),
                     (False, down.data_ptr(), down.stride(), False)]


@pytest.mark.parametrize("config", [dict(_NARROW, TMA_B=1), dict(_NARROW, TMA_A=1, TMA_B=1, PERSISTENT=1)],
                         ids=_layout_id)
def test_fused_moe_n_fastest_tma_never_reads_the_next_experts_k_rows(poison, monkeypatch, config):
    """N-fastest weights by TMA, K (40 and 24) not a multiple of BLOCK_K (16): the last K step of expert e runs past
    its K rows, where a flat [E * K, N] view would hold expert e + 1's first rows (0 x inf = NaN had they been read
    against A's zero columns). With expert 1 all inf and no token routed to it, the result is finite and the
    reference's (computed before expert 1 was set to inf)."""
    dtype = torch.float16
    x, gate_up, down, weights, ids = _skewed_inputs(dtype)
    ids[ids == 1] = 2
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, 2, True)
    gate_up[1], down[1] = float("inf"), float("inf")
    launched = _spy_gemms(monkeypatch)
    out = poison(triton_moe.fused_moe, x, n_fastest(gate_up), n_fastest(down), weights, ids, True, config=config)
    assert [launch[1] for launch in launched] == [2, 2]
    assert torch.isfinite(out).all()
    _check_moe(out, ref, dtype)


def test_weight_operand_copies_only_a_weight_without_a_unit_stride_dimension():
    """K-fastest (also with padded rows or experts in any order) and N-fastest weights are the GEMMs' operands as
    they are; a weight with neither K nor N unit-stride is copied K-fastest."""
    w = torch.randn(3, 10, 8)
    k_fastest = (w, torch.randn(3, 10, 12)[:, :, :8], w.transpose(0, 1).contiguous().transpose(0, 1))
    n_fastest_ones = (n_fastest(w), torch.randn(3, 8, 12).transpose(1, 2)[:, :10])  # (the latter: K rows 12 apart)
    for same in k_fastest + n_fastest_ones:
        got = triton_moe._weight_operand(same)
        assert got.data_ptr() == same.data_ptr() and got.stride() == same.stride() and got is same
    assert [t.stride(2) for t in k_fastest] == [1, 1, 1] and [t.stride(1) for t in n_fastest_ones] == [1, 1]
    for neither in (torch.randn(3, 10, 16)[:, :, ::2], n_fastest(torch.randn(3, 20, 8))[:, ::2]):
        assert neither.stride(1) != 1 and neither.stride(2) != 1
        got = triton_moe._weight_operand(neither)
        assert got.data_ptr() != neither.data_ptr() and got.is_contiguous() and torch.equal(got, neither)


def test_fused_moe_weights_without_a_unit_stride_dimension_are_copied(poison, monkeypatch):
    """Weights with neither K nor N unit-stride (every other element of a wider one) still give the reference's
    result: the GEMMs read a K-fastest copy."""
    dtype = torch.float32
    x, gate_up, down, weights, ids = _skewed_inputs(dtype)
    gate_up = torch.stack([gate_up, gate_up + 1], dim=-1).flatten(2)[:, :, ::2]
    down = torch.stack([down, down - 1], dim=-1).flatten(2)[:, :, ::2]
    assert gate_up.stride(1) != 1 and gate_up.stride(2) == 2 and down.stride(2) == 2
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, 2, True)
    reads = []
    _spy_gemms(monkeypatch, reads)
    out = poison(triton_moe.fused_moe, x, gate_up, down, weights, ids, True, config=dict(_NARROW, **_HOT))
    _check_moe(out, ref, dtype)
    assert len(reads) == 4
    for silu, ptr, strides, split in reads:
        w = gate_up if silu else down
        assert ptr != w.data_ptr() and strides == w.contiguous().stride() and not split


def test_warp_specialization_is_opt_in_on_the_gpu(monkeypatch):
    """No shipped table, rule or autotune candidate asks for WS, and on a GPU a config that does runs without it
    unless DLINFER_MOE_WS=1 (its persistent loop hung an H100 at one shape)."""
    shipped = _all_configs()
    assert any(c.get("TMA_A") for c in shipped) and not any(c.get("WS") for c in shipped)  # the rules are in
    _, gate_up, down, _, _ = _moe_inputs(4, 48, 40, 4, 2, torch.float16)

    class OnTheGpu:  # the hidden states as _hopper_flags sees them: a CUDA tensor's device, shape and element size
        device, shape = torch.device("cuda", 0), (4, 48)

        @staticmethod
        def element_size():
            return 2

    monkeypatch.setattr(triton_moe, "capability", lambda index: 9)
    monkeypatch.setattr(triton_moe, "WS_COMPILES", True)
    every = dict(TMA_A=1, TMA_B=1, PERSISTENT=1, WS=1)
    monkeypatch.delenv("DLINFER_MOE_WS", raising=False)
    off = triton_moe._hopper_flags(every, OnTheGpu(), gate_up, down, 40)
    assert off == dict(tma_a=True, tma_act=True, tma_b=True, persistent=True, ws=False)
    monkeypatch.setenv("DLINFER_MOE_WS", "1")
    assert triton_moe._hopper_flags(every, OnTheGpu(), gate_up, down, 40)["ws"] is True
    monkeypatch.setattr(triton_moe, "WS_COMPILES", False)  # a Triton whose WS pass fails these kernels
    assert triton_moe._hopper_flags(every, OnTheGpu(), gate_up, down, 40)["ws"] is False


def test_hopper_flags_are_hints():
    """A field the tensors cannot serve is off (not an error): rows whose pitch is not a multiple of 16 bytes
    (TMA_A, TMA_ACT), weights a descriptor cannot cover as [E * N, K] (TMA_B), WS without TMA_B and A on TMA."""
    x, gate_up, down, _, _ = _moe_inputs(4, 48, 40, 4, 2, torch.float16)

    def flags(cfg, x=x, gate_up=gate_up, inter=40):
        f = triton_moe._hopper_flags(cfg, x, gate_up, down, inter)
        return tuple(k for k in ("tma_a", "tma_act", "tma_b", "persistent", "ws") if f[k])

    every = dict(TMA_A=1, TMA_B=1, PERSISTENT=1, WS=1)
    assert flags(every) == ("tma_a", "tma_act", "tma_b", "persistent", "ws")
    assert flags({}) == () and flags(dict(TMA_A=0, MERGE=0)) == ()
    assert flags(every, inter=36) == ("tma_b", "persistent")  # 72-byte activation rows
    assert flags(dict(TMA_ACT=1, TMA_B=1, WS=1)) == ("tma_act", "tma_b", "ws")
    assert flags(every, x=torch.randn(4, 33).half()) == ("tma_b", "persistent")  # 66-byte hidden rows
    strided = torch.randn(4, 2 * 40, 64).half()[:, :, :48]
    assert flags(every, gate_up=strided) == ("tma_a", "tma_act", "persistent")
    assert flags(dict(TMA_B=1, MERGE=1, WS=1)) == ("tma_b", "persistent")
    assert flags(dict(MERGE_GRID=1)) == () and flags(dict(TMA_B=1, MERGE_GRID=1)) == ("tma_b",)


def test_config_fields_are_checked():
    assert tuning._cfg(16, (32, 64, 1, 4, 2), (32, 64, 1, 4, 2), TMA_B=1)["TMA_B"] == 1
    with pytest.raises(ValueError, match="TMA_C"):
        tuning._cfg(16, (32, 64, 1, 4, 2), (32, 64, 1, 4, 2), TMA_C=1)
    good = tuning._cfg(16, (32, 64, 1, 4, 2), (32, 64, 1, 4, 2), PERSISTENT=1)
    assert tuning._valid(good) and not tuning._valid(dict(good, PERSISTENT=2))
    assert tuning._valid(dict(good, HOT_STREAM=1)) and not tuning._valid(dict(good, HOT_STREAM=2))
    assert triton_moe._hot_stream(torch.device("cpu"), 1) is None  # streams are CUDA's: one stream elsewhere


@pytest.mark.parametrize("max_chunk,chunks_per_step", [(16, 2), (32, 64)])
def test_fused_moe_sort_in_several_chunks(poison, monkeypatch, max_chunk, chunks_per_step):
    """Small sorting chunks: each pair's row must count the same-expert pairs of all earlier chunks."""
    monkeypatch.setattr(triton_moe, "SORT_MAX_CHUNK", max_chunk)
    monkeypatch.setattr(triton_moe, "SORT_CHUNKS_PER_STEP", chunks_per_step)
    dtype = torch.float32
    x, gate_up, down, weights, ids = _moe_inputs(45, 24, 16, 3, 2, dtype, torch.int32)
    out = poison(with_vendor, "triton", ops.fused_moe, x, gate_up, down, weights, ids, 2, False)
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, 2, False)
    _check_moe(out, ref, dtype)


def test_fused_moe_strided_inputs_and_repeated_ids(poison):
    dtype = torch.float32
    tokens, hidden, inter, experts, topk = 6, 24, 16, 4, 3
    x = torch.randn(tokens, hidden + 8)[:, 4:4 + hidden]  # rows with a stride
    _, gate_up, down, _, _ = _moe_inputs(tokens, hidden, inter, experts, topk, dtype)
    weights = torch.rand(topk, tokens).t()  # non-contiguous, not normalized
    ids = torch.randint(0, experts, (tokens, topk), dtype=torch.int32)
    ids[0] = 2  # one token routed to the same expert three times
    out = poison(with_vendor, "triton", ops.fused_moe, x, gate_up, down, weights, ids, topk, False)
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, topk, False)
    _check_moe(out, ref, dtype)


def test_fused_moe_after_triton_gating(poison):
    """The two ops chained as an engine calls them (gating ids are int64, weights fp32, renormalized)."""
    dtype = torch.float16
    tokens, hidden, inter, experts, topk = 11, 32, 32, 8, 2
    x, gate_up, down, _, _ = _moe_inputs(tokens, hidden, inter, experts, topk, dtype)
    logits = torch.randn(tokens, experts).to(dtype)
    weights, ids = poison(with_vendor, "triton", ops.moe_gating_topk_softmax, logits, topk)
    out = poison(with_vendor, "triton", ops.fused_moe, x, gate_up, down, weights, ids, topk, True)
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, topk, True)
    _check_moe(out, ref, dtype)


def test_launch_config_tiers():
    # Decode-sized calls get the smallest row block, big prefill the largest, and it never shrinks as T grows.
    for tiers in [t["tiers"] for t in tuning.TABLES.values()] + [tuning.GENERIC_TIERS]:
        block_ms = [cfg["BLOCK_M"] for _, cfg in tiers]
        for experts, topk in ((8, 2), (128, 8)):
            chosen = [tuning._tier(tiers, t * topk / experts)["BLOCK_M"] for t in (1, 8, 64, 512, 4096, 65536)]
            assert chosen[0] == min(block_ms) and chosen[-1] == max(block_ms)
            assert chosen == sorted(chosen)
    for cfg in _all_configs():
        assert tuning._valid(cfg), cfg  # BLOCK_M >= 16 (tl.dot), every GEMM key present


def _all_configs():
    """Every shipped config, once: the tables' tiers, shape entries and load rules, the generic tiers and the
    autotune candidates."""
    out = []
    for table in tuning.TABLES.values():
        out += [c for _, c in table["tiers"]] + list(table["shapes"].values())
        out += [c for _, _, _, c in table.get("rules", ())]
    out += [c for _, c in tuning.GENERIC_TIERS] + tuning.CANDIDATES
    return [c for i, c in enumerate(out) if c not in out[:i]]


# ---------------------------------------------------------------- where configs come from (tuning.py)


@pytest.fixture
def fake_card(monkeypatch, tmp_path):
    """Tuning state isolated in tmp_path; ``fake_card(name, capturing=False)`` makes CUDA calls see that card."""
    monkeypatch.setenv("DLINFER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DLINFER_AUTOTUNE", raising=False)
    monkeypatch.setattr(tuning, "_memo", {})
    monkeypatch.setattr(tuning, "_disk", {})

    def use(name, capturing=False):
        monkeypatch.setattr(tuning, "card_name", lambda device: name if device.type == "cuda" else device.type)
        # the card's facts (shared memory: configs are fitted to it), an H100's under that name
        monkeypatch.setattr(host, "_simulated", dataclasses.replace(host.CARDS["H100"], name=name))
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)

    return use


_SHAPE = (torch.bfloat16, 8, 2, 4096, 14336)


def _config(tokens, calls, card_device=torch.device("cuda")):
    def autotune(cands):
        calls.append(cands)
        return cands[-1], 12.5  # "the fastest": any candidate but the first, to see it take effect
    return tuning.launch_config(card_device, *_SHAPE, tokens, autotune=autotune)


def test_unknown_card_autotunes_once_per_bucket_and_caches_on_disk(fake_card, tmp_path):
    fake_card("Some Future GPU")
    calls = []
    cfg = _config(300, calls)
    assert len(calls) == 1 and cfg == calls[0][-1] and calls[0][0] == tuning._tier(tuning.GENERIC_TIERS, 75)
    assert _config(500, calls) == cfg and len(calls) == 1  # same bucket (512): no second tune
    _config(1000, calls)
    assert len(calls) == 2  # a new bucket tunes
    path = tmp_path / "tuning" / "moe-some-future-gpu.json"
    data = json.loads(path.read_text())
    assert data["configs"][tuning.shape_key(*_SHAPE, 300)] == cfg
    assert data["us"][tuning.shape_key(*_SHAPE, 300)] == 12.5
    # A new process reads the cache instead of tuning again.
    tuning._memo.clear()
    tuning._disk.clear()
    assert _config(400, calls) == cfg and len(calls) == 2
    assert any("tuning cache" in line and "T512" in line for line in tuning.describe("cuda"))
    assert [p.name for p in tuning.clear("Some Future GPU")] == [path.name] and not path.exists()


def test_no_autotune_inside_graph_capture_or_when_off(fake_card, monkeypatch):
    fake_card("Some Future GPU", capturing=True)
    calls = []
    assert _config(64, calls) == tuning._tier(tuning.GENERIC_TIERS, 16) and not calls
    fake_card("Some Future GPU", capturing=False)
    _config(64, calls)
    assert len(calls) == 1  # the capture-time fallback was not memoized: the first eager call tunes
    monkeypatch.setenv("DLINFER_AUTOTUNE", "0")
    assert _config(4096, calls) == tuning._tier(tuning.GENERIC_TIERS, 1024) and len(calls) == 1
    assert _config(4096, calls) == tuning._tier(tuning.GENERIC_TIERS, 1024) and len(calls) == 1
    # a bucket served while autotune was off (e.g. by `dlinfer check`) still tunes once it is on again
    monkeypatch.delenv("DLINFER_AUTOTUNE")
    _config(4096, calls)
    _config(4096, calls)
    assert len(calls) == 2


def test_card_with_a_table_never_autotunes(fake_card):
    card = next(iter(tuning.TABLES))
    fake_card(card)
    calls = []
    for tokens in (1, 64, 512, 8192):
        table = tuning.TABLES[card]
        key = tuning.shape_key(*_SHAPE, tokens)
        rows = tokens * 2 / 8
        want = table["shapes"].get(key) or tuning.rule_config(table, rows, _SHAPE[-1], _SHAPE[1]) \
            or tuning._tier(table["tiers"], rows)
        assert _config(tokens, calls) == want
    assert not calls
    assert any(card in line and "shipped table" in line for line in tuning.describe("cuda"))
    assert any("precompile: every token bucket up to 8192" in line for line in tuning.describe("cuda"))


def test_the_h100_rules_follow_load_and_shape(fake_card):
    """The H100's table: from 256 rows per expert 128-row 4-stage tiles with both GEMM operands by TMA on wide
    intermediates and the weights alone on narrow ones; the same tiles from 64 rows on narrow intermediates of many
    experts; the tiers elsewhere; never for the hot experts' tiles; other tables have no rules."""
    card = "NVIDIA H100 80GB HBM3"
    fake_card(card)
    cuda = torch.device("cuda")
    fields = lambda cfg: {f: cfg[f] for f in tuning.FLAGS if cfg.get(f)}  # noqa: E731
    wide = dict(BLOCK_M=128, up=dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
                down=dict(BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4))
    mixtral = (torch.bfloat16, 8, 2, 4096, 14336)
    for tokens in (1024, 8192):  # 256 and 2048 rows per expert
        assert tuning.launch_config(cuda, *mixtral, tokens) == dict(wide, TMA_A=1, TMA_B=1)
    assert tuning.launch_config(cuda, *mixtral, 512) == tuning._tier(tuning.H100_TIERS, 128)  # E8: no mid rule
    qwen3 = (torch.bfloat16, 128, 8, 2048, 768)
    assert tuning.launch_config(cuda, *qwen3, 4096) == dict(wide, TMA_B=1)
    assert tuning.launch_config(cuda, *qwen3, 1024) == wide  # 64 rows, 128 experts, intermediate 768
    assert tuning.launch_config(cuda, *qwen3, 512) == tuning._tier(tuning.H100_TIERS, 32)  # 32 rows
    e64 = (torch.bfloat16, 64, 6, 2048, 1408)  # intermediate over 1024: the tiers below 256 rows
    assert tuning.launch_config(cuda, *e64, 2048) == tuning._tier(tuning.H100_TIERS, 192)
    assert fields(tuning.launch_config(cuda, *e64, 4096)) == dict(TMA_B=1)
    e8 = (torch.bfloat16, 8, 1, 1024, 512)  # narrow but few experts: the tiers below 256 rows
    assert tuning.launch_config(cuda, *e8, 1024) == tuning._tier(tuning.H100_TIERS, 128)
    assert "rule by rows per expert and shape" in tuning.static_config(card, *mixtral, 4096)[1]
    # the hot experts' tiles stay the tiers' (also for the small load of calls of 64-512 tokens)
    assert tuning.hot_config(cuda, *mixtral) == tuning._tier(tuning.H100_TIERS, tuning.HOT_LOAD)
    assert tuning.hot_config(cuda, *qwen3, 256, above=16) == tuning._tier(tuning.H100_TIERS, 128)
    for name, table in tuning.TABLES.items():
        if name != card:
            assert tuning.rule_config(table, 4096, 14336, 8) is None, name
    assert tuning.rule_config(dict(tiers=[]), 4096, 14336, 8) is None


def test_n_fastest_weights_take_their_own_table_entries_and_cache_keys(fake_card, tmp_path):
    """The H100's table: N-fastest expert weights take 16-row decode tiles up to a quarter row per expert, the
    peer-footprint tiles up to 96 rows per expert and the K-fastest tiers and rules above; a card without N-fastest
    entries serves both layouts alike; an autotune's result for one layout is cached under its own key and never
    serves the other."""
    card = "NVIDIA H100 80GB HBM3"
    fake_card(card)
    cuda = torch.device("cuda")
    mixtral = (torch.bfloat16, 8, 2, 4096, 14336)
    assert tuning.launch_config(cuda, *mixtral, 1, n_fastest=True) == tuning._N_DECODE  # a quarter row
    for tokens in (2, 16, 256):  # 0.5, 4 and 64 rows
        assert tuning.launch_config(cuda, *mixtral, tokens, n_fastest=True) == tuning._PEER_FOOTPRINT
    assert tuning.launch_config(cuda, *mixtral, 256) == tuning._tier(tuning.H100_TIERS, 64)
    assert tuning.launch_config(cuda, *mixtral, 256) != tuning._PEER_FOOTPRINT
    for tokens in (1024, 8192):  # 256 and 2048 rows: same as K-fastest (tier or rule)
        assert tuning.launch_config(cuda, *mixtral, tokens, n_fastest=True) == tuning.launch_config(cuda, *mixtral,
                                                                                                  tokens)
    assert "N-fastest weights" in tuning.static_config(card, *mixtral, 256, n_fastest=True)[1]
    assert tuning.shape_key(*mixtral, 256, n_fastest=True) == tuning.shape_key(*mixtral, 256) + ":N"
    for other in tuning.TABLES:
        if "n_fastest" not in tuning.TABLES[other]:
            for tokens in (64, 256, 4096):
                assert tuning.static_config(other, *mixtral, tokens, n_fastest=True)[0] == \
                    tuning.static_config(other, *mixtral, tokens)[0], (other, tokens)
    fake_card("Some Future GPU")
    calls = []

    def autotune(cands):
        calls.append(cands)
        return cands[-1], 10.0

    nf = tuning.launch_config(cuda, *_SHAPE, 300, autotune=autotune, n_fastest=True)
    assert len(calls) == 1 and nf == calls[0][-1]
    data = json.loads((tmp_path / "tuning" / "moe-some-future-gpu.json").read_text())
    assert list(data["configs"]) == [tuning.shape_key(*_SHAPE, 300) + ":N"]
    tuning.launch_config(cuda, *_SHAPE, 300, autotune=autotune)  # K-fastest: a tune of its own
    assert len(calls) == 2
    assert any(":T512:N BLOCK_M" in line for line in tuning.describe("cuda"))


def test_hot_experts_of_small_calls_get_narrower_tiles(fake_card, monkeypatch):
    """Calls of 64-512 tokens: on the H100's table (and cards without one) the hot experts get 64-row blocks with
    64-wide gate_up and 128-wide down tiles where those are wider than the call's own row block, else the 128-row
    tiles of HOT_LOAD rows per expert, as do other calls and every call on the H200's table (its 128-row load would
    hit other entries of its shape table)."""
    monkeypatch.setattr(tuning, "_hot_memo", {})
    cuda = torch.device("cuda")
    for shape in ((torch.bfloat16, 256, 8, 7168, 512), (torch.bfloat16, 8, 2, 4096, 14336),
                  (torch.bfloat16, 16, 2, 4096, 6400)):
        for card, small_m in (("NVIDIA H100 80GB HBM3", 64), ("NVIDIA H200", 128), ("Some Future GPU", 64)):
            fake_card(card)
            large = tuning.hot_config(cuda, *shape)  # no token count: HOT_LOAD rows per expert
            assert large["BLOCK_M"] == 128, card
            for tokens in (64, 128, 256, 512):
                small = tuning.hot_config(cuda, *shape, tokens, above=16)
                assert small["BLOCK_M"] == small_m, (card, tokens)
                if small_m == 64:
                    assert (small["up"]["BLOCK_N"], small["down"]["BLOCK_N"]) == (64, 128)
                else:
                    assert small == large, (card, shape, tokens)
                # a call whose own row block is already 64 keeps the 128-row hot tiles (a hot class at all)
                assert tuning.hot_config(cuda, *shape, tokens, above=64) == large
                # and the call has a hot class: at 64 tokens only the 64-row blocks fit (an expert every token picks)
                assert tuning.hot_class(dict(BLOCK_M=16), small, tokens) == ((small, small_m) if small_m <= tokens
                                                                             else (None, 0)), (card, tokens)
            for tokens in (32, 63, 513, 4096):
                assert tuning.hot_config(cuda, *shape, tokens, above=16) == large, (card, tokens)


def test_info_says_when_precompile_is_off(fake_card, monkeypatch):
    fake_card(next(iter(tuning.TABLES)))
    monkeypatch.setenv("DLINFER_PRECOMPILE", "0")
    assert any("precompile: off (DLINFER_PRECOMPILE=0)" in line for line in tuning.describe("cuda"))


def test_tuning_cache_beats_the_table_and_bad_files_are_ignored(fake_card, tmp_path, caplog):
    card = next(iter(tuning.TABLES))
    fake_card(card)
    mine = tuning.CANDIDATES[-1]
    tuning.store(card, tuning.shape_key(*_SHAPE, 64), mine)
    assert _config(64, []) == mine
    tuning.cache_file(card).write_text("{not json")
    tuning._memo.clear()
    tuning._disk.clear()
    assert _config(64, []) != mine or mine == tuning._tier(tuning.TABLES[card]["tiers"], 16)
    assert "ignoring the tuning cache" in caplog.text
    tuning.cache_file(card).write_text(json.dumps({"configs": {tuning.shape_key(*_SHAPE, 64): {"BLOCK_M": 8}}}))
    assert tuning.load_cache(card) == {}  # BLOCK_M < 16 cannot run tl.dot: dropped


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DLINFER_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_file("NVIDIA H200") == tmp_path / "xdg" / "dlinfer" / "tuning" / "moe-nvidia-h200.json"
    monkeypatch.setenv("DLINFER_CACHE_DIR", str(tmp_path / "mine"))
    assert tuning.cache_dir() == tmp_path / "mine"


def test_tune_cli_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        tuning.main(["--shape", "8,2,4096"])
    assert "four integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tuning.main([])
    assert "--model or --shape" in capsys.readouterr().err


@pytest.mark.parametrize("layout, suffixes", [("n-fastest", [":N"]), ("both", ["", ":N"])])
def test_tune_measures_each_layout_on_its_own_weights_and_keys(monkeypatch, tmp_path, layout, suffixes):
    monkeypatch.setenv("DLINFER_CACHE_DIR", str(tmp_path))
    seen = []

    def fastest(run, cands, max_s):  # runs the first candidate on the layout's weights (no CUDA events on the CPU)
        out = run(cands[0])
        seen.append(out.shape)
        return cands[0], 1.0

    real = triton_moe.fused_moe
    layouts = []

    def recording(x, w_up, w_down, *args, **kwargs):
        layouts.append((is_n_fastest(w_up), is_n_fastest(w_down)))
        return real(x, w_up, w_down, *args, **kwargs)

    monkeypatch.setattr(tuning, "pick_fastest", fastest)
    monkeypatch.setattr(triton_moe, "fused_moe", recording)
    path = tuning.tune([(4, 2, 32, 24)], [3, 40], torch.float32, tuning.LAYOUTS[layout], 1.0, torch.device("cpu"))
    keys = sorted(tuning.load_cache("cpu"))
    want = sorted(tuning.shape_key(torch.float32, 4, 2, 32, 24, t) + sfx for sfx in suffixes for t in (3, 40))
    assert path == tuning.cache_file("cpu") and keys == want
    assert layouts == [(sfx == ":N",) * 2 for sfx in suffixes for _ in (3, 40)]
    assert seen == [(t, 32) for _ in suffixes for t in (3, 40)]


# ---------------------------------------------------------------- the kernels compile for the H100

_SM90_SCRIPT = r'''
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dlinfer.vendor.triton import activation, fused_rotary_kv, kv_cache, moe, norm, rotary, tuning

def compile_sm90(fn, types, constexprs, num_warps, num_stages=3):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
        # What the launcher specializes on at run time for aligned tensors and strides/sizes divisible by 16.
        if name not in constexprs and (sig[name].startswith("*") or name.startswith("stride")
                                       or name in ("n_out", "k_dim", "up_offset")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    ttgir = k.asm["ttgir"]
    return dict(shared=k.metadata.shared, async_copies=ttgir.count("async_copy_global_to_local"),
                tma_copies=ttgir.count("async_tma_copy_global_to_local"), wgmma=ttgir.count("warp_group_dot"),
                warp_specialize=ttgir.count("ttg.warp_specialize"), b16_loads=k.asm["ptx"].count("ld.global.b16"))

def layout(n_fastest, gemm):
    """The weight's unit stride as the launcher specializes it (a constant 1) and the gate_up GEMM's SPLIT_UP."""
    return dict(stride_wn=1, SPLIT_UP=gemm == "up") if n_fastest else dict(stride_wk=1, SPLIT_UP=False)

bf = "*bf16"
out = {}
configs = [c for t in tuning.TABLES.values() for c in [c for _, c in t["tiers"]] + list(t["shapes"].values())]
configs += [c for t in tuning.TABLES.values() for *_, c in t.get("rules", ())]
configs += tuning.CANDIDATES
configs = [c for i, c in enumerate(configs) if c not in configs[:i]]
# N-fastest weights, with the tables' tiers and rules: TMA_B as a 3-D [E, K, N] descriptor (TMA_B=2), no WS
n_fastest = [[c for _, c in t["tiers"]] + [c for *_, c in t.get("rules", ())] for t in tuning.TABLES.values()]
n_fastest = [{f: v for f, v in c.items() if f != "WS"} for cs in n_fastest for c in cs]
n_fastest = [c for i, c in enumerate(n_fastest) if c not in n_fastest[:i]]
for nf, cfg in [(False, c) for c in configs] + [(True, c) for c in n_fastest]:
    flags = {f: bool(cfg.get(f, 0)) for f in ("TMA_A", "TMA_B", "PERSISTENT", "WS")}
    for gemm in ("up", "down"):
        c = cfg[gemm]
        types = dict(a_ptr=bf, w_ptr=bf, out_ptr=bf, sorted_ptr="*i32", meta_ptr="*i32")
        # (TMA_ACT: the gate_up GEMM's sorted store, the down GEMM's A by TMA)
        tma_act = flags["TMA_A"] or bool(cfg.get("TMA_ACT", 0))
        flags = dict(flags, TMA_A=flags["TMA_A"] or (gemm == "down" and tma_act))
        flags["WS"] = flags["WS"] and flags["TMA_A"] and flags["TMA_B"] and moe.WS_COMPILES  # as fused_moe on a GPU
        consts = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=c["GROUP_M"],
                      EB=128, HOT=cfg["BLOCK_M"] >= 128, SILU=gemm == "up", EVEN_K=True, PRECISION="tf32",
                      WHILE_LOOP=False, SORTED_OUT=gemm == "up" and tma_act, **flags, **layout(nf, gemm))
        if nf and flags["TMA_B"]:  # as moe._tma_b_mode / moe._split_up: the weight by TMA, gate and up as two boxes
            consts.update(TMA_B=2, SPLIT_UP=False)
        # The host-side tensor descriptors fused_moe passes (None when the field is off).
        w_block = f"1, {c['BLOCK_K']}, {c['BLOCK_N']}" if nf else f"{c['BLOCK_N']}, {c['BLOCK_K']}"
        for name, on, block in (("a_desc", flags["TMA_A"], f"{cfg['BLOCK_M']}, {c['BLOCK_K']}"),
                                ("w_desc", flags["TMA_B"], w_block)):
            if on:
                types[name] = f"tensordesc<bf16[{block}]>"
            else:
                consts[name] = None
        out[f"gemm {gemm} {'N-fastest ' * nf}{json.dumps(cfg, sort_keys=True)}"] = dict(
            compile_sm90(moe._moe_gemm_kernel, types, consts, c["num_warps"], c["num_stages"]), flags=flags,
            num_warps=c["num_warps"], block_m=cfg["BLOCK_M"])
# MERGE: the two tile classes in one launch, with the H200 table's widest tier as the hot experts' tiles (as
# tuning.hot_config gives them), warps and stages of the hot class.
for t in [tuning.TABLES["NVIDIA H200"]]:
    hot = t["tiers"][-1][1]
    for _, cfg in t["tiers"][:-1]:
        for tma in (False, True):
            for gemm in ("up", "down"):
                c, h = cfg[gemm], hot[gemm]
                types = dict(a_ptr=bf, w_ptr=bf, out_ptr=bf, sorted_ptr="*i32", meta_ptr="*i32")
                consts = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=c["GROUP_M"],
                              EVEN_K=True, HOT_BLOCK_M=hot["BLOCK_M"], HOT_BLOCK_N=h["BLOCK_N"],
                              HOT_BLOCK_K=h["BLOCK_K"], HOT_GROUP_M=h["GROUP_M"], HOT_EVEN_K=True, EB=128,
                              SILU=gemm == "up", PRECISION="tf32", WHILE_LOOP=False, TMA_A=tma, TMA_B=tma,
                              SORTED_OUT=tma and gemm == "up")
                for name, rows, kk in (("a_desc", cfg["BLOCK_M"], c["BLOCK_K"]), ("hot_a_desc", hot["BLOCK_M"],
                                       h["BLOCK_K"]), ("w_desc", c["BLOCK_N"], c["BLOCK_K"]),
                                       ("hot_w_desc", h["BLOCK_N"], h["BLOCK_K"])):
                    if tma:
                        types[name] = f"tensordesc<bf16[{rows}, {kk}]>"
                    else:
                        consts[name] = None
                # persistent (MERGE) for both operand paths (by pointers also from N-fastest weights), one program
                # per tile (MERGE_GRID) on TMA
                for persistent, nf in ((True, False), (False, False)) if tma else ((True, False), (True, True)):
                    flags = dict(TMA_A=tma, TMA_B=tma, PERSISTENT=persistent, WS=False)
                    key = f"gemm merged {gemm} tma={tma} persistent={persistent} {'N-fastest ' * nf}"
                    out[key + json.dumps(cfg, sort_keys=True)] = (
                        dict(compile_sm90(moe._moe_gemm_merged_kernel, types,
                                          dict(consts, PERSISTENT=persistent, **layout(nf, gemm)),
                                          h["num_warps"], h["num_stages"]),
                             flags=flags, num_warps=h["num_warps"], block_m=hot["BLOCK_M"]))
out["gather"] = compile_sm90(moe._moe_gather_kernel, dict(x_ptr=bf, out_ptr=bf, sorted_ptr="*i32", meta_ptr="*i32"),
                             dict(EB=128, HOT_BLOCK_M=128, ROWS=moe.GATHER_ROWS, BLOCK_H=moe.GATHER_BLOCK_H),
                             moe.GATHER_NUM_WARPS)
for experts, topk in ((8, 2), (128, 8)):
    chunk = max(16, min(moe.SORT_MAX_CHUNK, moe.SORT_TILE // experts))
    ids = dict(ids_ptr="*i64", rank_ptr="*i32", hist_ptr="*i32", sorted_ptr="*i32", meta_ptr="*i32")
    out[f"histogram E={experts}"] = compile_sm90(moe._moe_histogram_kernel, ids, dict(CHUNK=chunk, EB=experts),
                                                 moe.SORT_NUM_WARPS)
    for single in (False, True):
        out[f"scatter E={experts} single={single}"] = compile_sm90(
            moe._moe_scatter_kernel, ids, dict(CHUNK=chunk, EB=experts, CB=moe.SORT_CHUNKS_PER_STEP, BLOCK_M=32,
                                               HOT_BLOCK_M=128, SINGLE_CHUNK=single, WHILE_LOOP=False), moe.SORT_NUM_WARPS)
    rows = max(1, min(moe.GATING_MAX_ROWS, moe.GATING_TILE // experts))
    out[f"gating E={experts}"] = compile_sm90(moe._gating_kernel, dict(logits_ptr=bf, weights_ptr="*fp32",
                                              ids_ptr="*i64"), dict(TOPK=topk, ROWS=rows, EB=experts), 4)
out["combine"] = compile_sm90(moe._moe_combine_kernel, dict(y_ptr=bf, w_ptr="*fp32", out_ptr=bf),
                              dict(RENORMALIZE=True, KB=8, BLOCK_H=moe.COMBINE_BLOCK_H), moe.COMBINE_NUM_WARPS)
out["silu_and_mul"] = compile_sm90(activation._silu_and_mul_kernel, dict(x_ptr=bf, out_ptr=bf),
                                   dict(BLOCK=activation.SILU_MAX_BLOCK), activation.SILU_NUM_WARPS)
for hidden in (4096, 128):
    block, rows, warps = norm._launch_config(hidden)
    for residual in (False, True):
        out[f"rms_norm H={hidden} residual={residual}"] = compile_sm90(
            norm._rms_norm_kernel, dict(x_ptr=bf, res_ptr=bf, w_ptr=bf, out_ptr=bf, sum_ptr=bf, eps="fp32"),
            dict(HAS_RESIDUAL=residual, ROWS=rows, BLOCK=block), warps)
half, heads_q, heads_k, warps = rotary.launch_config(32, 8, 128)
out["rotary"] = compile_sm90(rotary._rotary_kernel, dict(q_ptr=bf, k_ptr=bf, cos_ptr=bf, sin_ptr=bf),
                             dict(HEADS_Q=heads_q, HEADS_K=heads_k, HALF=half), warps)
out["rotary_fill_kv"] = compile_sm90(
    fused_rotary_kv._rotary_fill_kv_kernel, dict(q_ptr=bf, k_ptr=bf, v_ptr=bf, kc_ptr=bf, vc_ptr=bf, cos_ptr=bf,
                                                 sin_ptr=bf, slot_ptr="*i32"),
    dict(HEADS_Q=heads_q, HEADS_K=heads_k, HALF=half, DV=128), warps)
heads, d_block, dv_block, warps = kv_cache.launch_config(8, 128, 128)
out["fill_kv_cache"] = compile_sm90(kv_cache._fill_kv_cache_kernel, dict(k_ptr=bf, v_ptr=bf, kc_ptr=bf, vc_ptr=bf,
                                    slot_ptr="*i64"), dict(HEADS=heads, D=d_block, DV=dv_block), warps)
print("RESULT " + json.dumps(out))
'''


def test_kernels_compile_for_sm90():
    """Every non-attention kernel of the triton vendor compiles for the H100 (sm_90) with its launch configs, in
    bf16, without a GPU (Triton's bundled ptxas): shared memory fits, and the MoE GEMM loops are software-
    pipelined (async copies, in 16-byte pieces), which the interpreter cannot show; the GEMMs also for weights
    stored N-fastest."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for name, info in result.items():
        assert info["shared"] <= 232448, f"{name}: {info['shared']} bytes of shared memory (H100 max 232448)"
        if name.startswith("gemm"):
            flags = info["flags"]
            # Hopper's wgmma serves row blocks of 64 per warp group (narrower ones run mma.sync)
            assert (info["wgmma"] > 0) == (info["block_m"] >= 64), f"{name}: {info['wgmma']} wgmma ops"
            # Pipelined: pointer operands by cp.async, TMA operands by TMA copies, both in the K loop.
            if not (flags["TMA_A"] and flags["TMA_B"]):
                assert info["async_copies"] > 0, f"{name}: the K loop is not pipelined"
            if flags["TMA_A"] or flags["TMA_B"]:
                assert info["tma_copies"] > 0, f"{name}: a TMA field is set but there is no TMA copy"
            else:
                assert info["tma_copies"] == 0, name
            # no operand read element by element (an N-fastest weight's interleaved gate/up tile would be)
            assert info["b16_loads"] == 0, f"{name}: {info['b16_loads']} 2-byte global loads"
            ws = flags["WS"] and flags["TMA_A"] and flags["TMA_B"] and info["num_warps"] == 4
            assert (info["warp_specialize"] > 0) == ws, f"{name}: warp specialization {'not ' if ws else ''}expected"
    if triton_moe.WS_COMPILES:  # Triton 3.6 (the GPU image's); fused_moe drops WS on other releases
        assert any(i.get("flags", {}).get("WS") for i in result.values()), "no warp-specialized candidate compiled"


def test_library_never_imports_benchmarks_or_tests():
    """dlinfer must work from an installed wheel, where ``benchmarks/`` and ``tests/`` do not exist."""
    import ast
    from pathlib import Path

    import dlinfer

    bad = []
    for path in Path(dlinfer.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("benchmarks", "tests")]
    assert not bad, bad


@pytest.fixture
def host_timed_events(monkeypatch):
    """``torch.cuda.Event`` and ``torch.cuda.synchronize`` on the host clock (no GPU): what ``pick_fastest`` times
    with."""
    import time as _time

    class Event:
        def __init__(self, enable_timing=False):
            self.t = 0.0

        def record(self):
            self.t = _time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def test_pick_fastest_skips_failing_and_wrong_candidates(host_timed_events):
    """The autotune's selection on fake CUDA events: a candidate that raises or disagrees is never picked."""
    import time as _time

    good = torch.ones(4)
    slow, fast, wrong, broken = ({"n": i} for i in range(4))

    def run(cfg):
        if cfg is broken:
            raise RuntimeError("out of shared memory")
        _time.sleep(0.004 if cfg is slow else 0.0005)
        return good * (2 if cfg is wrong else 1)

    best, us = tuning.pick_fastest(run, [slow, broken, wrong, fast], reps=2)
    assert best is fast and 0 < us < 4000
    with pytest.raises(RuntimeError, match="no candidate"):
        tuning.pick_fastest(run, [broken])


def test_pick_fastest_names_a_candidate_that_does_not_finish(host_timed_events, caplog):
    """A candidate still running past ``stuck_s`` (a GPU kernel that never ends cannot be interrupted) is logged as
    an error naming its config; one that finishes in time or fails leaves no such line."""
    import time as _time

    quick, stuck, broken = {"BLOCK_M": 16}, {"BLOCK_M": 128, "WS": 1}, {"BLOCK_M": 64}

    def run(cfg):
        if cfg is broken:
            raise RuntimeError("out of shared memory")
        _time.sleep(0.4 if cfg is stuck else 0.0)
        return torch.ones(4)

    with caplog.at_level("ERROR", logger="dlinfer"):
        tuning.pick_fastest(run, [quick, broken], reps=1, stuck_s=0.2)
        _time.sleep(0.3)  # past the limit: the watches of the finished candidates were cancelled
        assert "has not finished" not in caplog.text
        tuning.pick_fastest(run, [quick, stuck], reps=1, stuck_s=0.2)
    stuck_lines = [r.getMessage() for r in caplog.records if "has not finished after" in r.getMessage()]
    assert len(stuck_lines) == 1 and "'WS': 1" in stuck_lines[0] and "DLINFER_AUTOTUNE=0" in stuck_lines[0]
    calls = []

    def fails_when_timed(cfg):  # runs once, then raises in its timed calls: the error reaches the caller
        calls.append(cfg)
        if len(calls) > 1:
            raise RuntimeError("launch failed")
        return torch.ones(4)

    caplog.clear()
    with caplog.at_level("ERROR", logger="dlinfer"), pytest.raises(RuntimeError, match="launch failed"):
        tuning.pick_fastest(fails_when_timed, [quick], reps=1, stuck_s=0.2)
    _time.sleep(0.3)
    assert "has not finished" not in caplog.text  # its watch ended with it


def test_autotune_result_kept_when_the_cache_cannot_be_written(fake_card, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DLINFER_CACHE_DIR", str(blocker))  # a file where the folder should be: mkdir fails
    fake_card("Some Future GPU")
    calls = []
    cfg = _config(40, calls)
    assert cfg == calls[0][-1] and _config(64, calls) == cfg and len(calls) == 1  # one bucket: tuned once
    assert "not cached" in caplog.text


def test_mixtral_like_routing_is_as_close_to_float64_as_the_reference():
    """Top-2 of 8 experts, renormalized (Mixtral): the triton vendor's gating picks the reference's experts and
    its fused_moe is as close to a float64 computation as the reference vendor, within a few roundings of the
    exact result (fp32 accumulation and combine; fp16 here, bf16 tl.dot is wrong in the interpreter)."""
    torch.manual_seed(0)
    tokens, hidden, inter, experts, topk, dtype = 24, 64, 128, 8, 2, torch.float16
    x = torch.randn(tokens, hidden).to(dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden) * hidden ** -0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter) * inter ** -0.5).to(dtype)
    logits = torch.randn(tokens, experts).to(dtype)
    weights, ids = with_vendor("triton", ops.moe_gating_topk_softmax, logits, topk)
    ref_w, ref_ids = with_vendor("reference", ops.moe_gating_topk_softmax, logits, topk)
    assert torch.equal(ids, ref_ids) and torch.allclose(weights, ref_w, rtol=1e-6, atol=0)
    w = weights.double() / weights.double().sum(-1, keepdim=True)
    exact = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for s in range(topk):
            g, u = (gate_up[ids[t, s]].double() @ x[t].double()).chunk(2)
            exact[t] += w[t, s] * (down[ids[t, s]].double() @ (torch.nn.functional.silu(g) * u))

    def err(y):
        return float((y.double() - exact).norm() / exact.norm())

    ours = with_vendor("triton", ops.fused_moe, x, gate_up, down, weights, ids, topk, True)
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, topk, True)
    assert err(ours) <= 1.05 * err(ref) + 1e-7
    assert err(ours) <= 4 * err(exact.to(dtype))


def test_precompile_runs_every_token_bucket(poison):
    """precompile() runs one dummy call per bucket 1, 2, 4, ... up to max_tokens (compiling what each needs)."""
    _, gate_up, down, _, _ = _moe_inputs(1, 32, 24, 4, 2, torch.float32)
    assert triton_moe.precompile(gate_up, down, 2, 5) == 4  # 1, 2, 4, 8
    assert triton_moe.precompile(gate_up, down, 2, 5, max_s=0) == 1  # the budget spent by the first bucket


def test_precompile_on_first_use_once_per_shape_and_off_switch(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_moe, "precompile", lambda gu, d, k, max_tokens, dtype: calls.append(max_tokens) or 1)
    monkeypatch.setattr(triton_moe, "_precompiled", set())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    big = triton_moe.PRECOMPILE_MIN_TOKENS + 3
    x, gate_up, down, _, _ = _moe_inputs(big, 32, 24, 4, 2, torch.float32)
    triton_moe._precompile_on_first_use(x, gate_up, down, 2)
    assert calls == [big]  # the first call's tokens when it is larger than PRECOMPILE_MIN_TOKENS
    triton_moe._precompile_on_first_use(x[:5], gate_up, down, 2)
    assert calls == [big, triton_moe.PRECOMPILE_MIN_TOKENS]  # (the caller skips shapes already done)
    monkeypatch.setenv("DLINFER_PRECOMPILE", "0")
    monkeypatch.setattr(triton_moe, "_precompiled", set())
    triton_moe._precompile_on_first_use(x, gate_up, down, 2)
    assert len(calls) == 2
    # off leaves the shape open (`dlinfer check` turns it off for its run; serving later in the process still
    # precompiles)
    assert triton_moe._precompiled == set()
    monkeypatch.delenv("DLINFER_PRECOMPILE")
    triton_moe._precompile_on_first_use(x, gate_up, down, 2)
    assert len(calls) == 3 and len(triton_moe._precompiled) == 1
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(triton_moe, "_precompiled", set())
    triton_moe._precompile_on_first_use(x, gate_up, down, 2)
    assert triton_moe._precompiled == set()  # inside graph capture: nothing, the next eager call does it


def test_precompile_compiles_for_the_weight_layout_passed(monkeypatch):
    """The first-use precompile is keyed by the weights' layout too (K-fastest and N-fastest weights of one shape
    compile their own kernel variants) and runs on the weights the call passed: N-fastest ones are read in place."""
    x, gate_up, down, _, _ = _moe_inputs(3, 32, 24, 4, 2, torch.float32)
    up_n, down_n = n_fastest(gate_up), n_fastest(down)
    key_k, key_n = triton_moe._precompile_key(x, gate_up, down), triton_moe._precompile_key(x, up_n, down_n)
    assert key_k != key_n and key_k == triton_moe._precompile_key(x[:1], gate_up.clone(), down.clone())
    monkeypatch.setattr(triton_moe, "_precompiled", set())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(triton_moe, "PRECOMPILE_MIN_TOKENS", 2)
    reads = []
    _spy_gemms(monkeypatch, reads)
    triton_moe._precompile_on_first_use(x, up_n, down_n, 2)
    assert triton_moe._precompiled == {key_n}
    assert len(reads) >= 6 and len(reads) % 2 == 0  # two GEMMs for each bucket 1, 2, 4
    for silu, ptr, strides, split in reads:
        w = up_n if silu else down_n
        assert (ptr, strides, split) == (w.data_ptr(), w.stride(), silu)


class _FakeKernel:
    """A ``@triton.jit`` function as run_buckets reads it: per-device (kernel cache, ...) tuples."""

    def __init__(self):
        self.device_caches = {0: ({}, {}, None, None, None)}


def test_precompile_logs_its_variants_and_seconds_and_stops_at_its_budget(caplog, monkeypatch):
    kernels = (_FakeKernel(), _FakeKernel())
    ran = []

    def run_bucket(tokens):  # one new variant of each kernel per bucket, one more of the first from 4 tokens on
        ran.append(tokens)
        for k in kernels:
            k.device_caches[0][0][tokens] = object()
        if tokens >= 4:
            kernels[0].device_caches[0][0][-tokens] = object()

    caplog.set_level("INFO", logger="dlinfer")
    assert triton_moe.run_buckets(run_bucket, 5, "fused_moe test shape", kernels) == 4 and ran == [1, 2, 4, 8]
    assert "dlinfer: fused_moe test shape: 10 kernel variants compiled for 4 token buckets (up to 5 tokens) in" \
        in caplog.text
    caplog.clear()
    ran.clear()
    clock = iter(range(0, 1000, 50))  # each perf_counter() reading 50 s after the last
    monkeypatch.setattr(triton_moe.time, "perf_counter", lambda: next(clock))
    assert triton_moe.run_buckets(run_bucket, 8192, "fused_moe test shape", kernels, max_s=120) == 3
    assert ran == [1, 2, 4]  # smallest first (what serving meets most); the others compile on first use
    warning = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and "precompile stopped after" in warning[0].getMessage()
    assert "at 3 of 14 token buckets" in warning[0].getMessage()
    assert triton_moe.compiled_variants((object(),)) is None  # what the interpreter's kernels are


@pytest.mark.parametrize("layout", ["k-fastest", "n-fastest"])
@pytest.mark.parametrize("case", [
    (1, 32, 16, 8, 2, False, torch.int64),   # most experts empty (zero-row groups)
    (37, 40, 24, 4, 2, True, torch.int32),
    (70, 40, 24, 6, 2, False, "skewed"),    # two hot experts
])
def test_fused_moe_on_torchs_grouped_gemm(poison, monkeypatch, layout, case):
    """The GROUPED_MM field serves a bf16 call from torch's grouped GEMM: the same output as the reference within
    bf16 tolerance (and as the Triton kernels: one combine kernel, the same roundings), every expert's rows where
    they belong, whatever the weight layout; no Triton GEMM runs."""
    tokens, hidden, inter, experts, topk, renormalize, ids_kind = case
    dtype = torch.bfloat16
    if ids_kind == "skewed":
        x, gate_up, down, weights, ids = _skewed_inputs(dtype, hidden, inter)
    else:
        x, gate_up, down, weights, ids = _moe_inputs(tokens, hidden, inter, experts, topk, dtype, ids_kind)
    if layout == "n-fastest":
        gate_up, down = n_fastest(gate_up), n_fastest(down)
    assert triton_moe.grouped_mm_serves(x, gate_up, down)
    called = []
    real = triton_moe._gemm
    monkeypatch.setattr(triton_moe, "_gemm", lambda *a, **k: called.append(1) or real(*a, **k))
    out = poison(triton_moe.fused_moe, x, gate_up, down, weights, ids, renormalize,
                 config=dict(_NARROW, GROUPED_MM=1))
    assert not called, "the Triton GEMMs ran although GROUPED_MM serves the call"
    ref = with_vendor("reference", ops.fused_moe, x.float(), gate_up.float(), down.float(), weights, ids,
                      ids.shape[1], renormalize)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    kernels = triton_moe.fused_moe(x, gate_up, down, weights, ids, renormalize, config=dict(_NARROW))
    torch.testing.assert_close(out.float(), kernels.float(), atol=1e-2, rtol=1e-2)


def test_grouped_gemm_field_is_a_hint(monkeypatch):
    """Where torch's grouped GEMM cannot serve the call (fp16, fp32; a torch without it) the field is ignored and
    the Triton kernels run, as for the Hopper fields."""
    x, gate_up, down, weights, ids = _moe_inputs(9, 32, 16, 4, 2, torch.float16)
    assert not triton_moe.grouped_mm_serves(x, gate_up, down)
    out = triton_moe.fused_moe(x, gate_up, down, weights, ids, True, config=dict(_NARROW, GROUPED_MM=1))
    ref = with_vendor("reference", ops.fused_moe, x, gate_up, down, weights, ids, 2, True)
    _check_moe(out, ref, torch.float16)
    xb, ub, db = x.bfloat16(), gate_up.bfloat16(), down.bfloat16()
    assert triton_moe.grouped_mm_serves(xb, ub, db)
    monkeypatch.setattr(triton_moe, "_grouped_mm_fn", lambda: None)
    assert not triton_moe.grouped_mm_serves(xb, ub, db)


def test_the_vendor_prefers_n_fastest_experts_where_the_cards_table_has_them(monkeypatch):
    """The Triton vendor's weight_layout hook: N-fastest experts for 16-bit fused_moe on a card whose table has
    N-fastest entries (the H100's), no preference elsewhere (other cards, fp32, other ops, CPU tensors)."""
    h100 = "NVIDIA H100 80GB HBM3"
    assert "n_fastest" in tuning.TABLES[h100]
    assert tuning.preferred_layout(h100, torch.bfloat16) == "n_fastest"
    assert tuning.preferred_layout(h100, torch.float16) == "n_fastest"
    assert tuning.preferred_layout(h100, torch.float32) is None
    assert tuning.preferred_layout("NVIDIA H200", torch.bfloat16) is None or "n_fastest" in tuning.TABLES["NVIDIA H200"]
    assert tuning.preferred_layout("Some Other GPU", torch.bfloat16) is None
    assert triton_moe.weight_layout("fused_moe", torch.device("cpu"), torch.bfloat16) is None
    monkeypatch.setattr(tuning, "card_name", lambda device: h100)
    cuda = torch.device("cuda", 0)
    assert triton_moe.weight_layout("fused_moe", cuda, torch.bfloat16) == "n_fastest"
    assert triton_moe.weight_layout("linear", cuda, torch.bfloat16) is None
    vendor = dlinfer.vendor.get_vendor("triton")
    assert vendor.weight_layout("fused_moe", cuda, torch.bfloat16) == "n_fastest"
