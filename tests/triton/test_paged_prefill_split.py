"""Split-KV paged (chunked) prefill in the Triton vendor, under Triton's interpreter (CPU), against the reference
vendor: each sequence's keys cut into slices, partial outputs and log-sum-exps in an fp32 scratch, a combine
kernel merging them. Splits are forced through the launch config (``splits=N``) so every case runs the split and
combine kernels whatever the rule would pick; a spy on the kernels checks they ran. Outputs and scratch buffers are
poisoned with NaN (tests/triton/test_attention.py's ``run``), padding tokens past the last sequence must stay
untouched, block tables are shuffled with garbage past each sequence's last block. The split-count rule is checked
on a modelled 132-SM card; the split and combine kernels are compiled for sm_90."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_attention import close, make_block_table, make_cache, run

import dlinfer.ops as ops
from dlinfer.vendor.triton import attention_decode
from dlinfer.vendor.triton import attention_prefill as ap


class _Spy:
    """Stands in for a ``@triton.jit`` kernel in the module: records each launch grid, then launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture
def force_splits(monkeypatch):
    """``force_splits(n)``: the launch config with ``splits=n``; returns the spies of the split, combine and direct
    kernels."""

    def force(n: int):
        real = ap._config
        monkeypatch.setattr(ap, "_config", lambda *args: dataclasses.replace(real(*args), splits=n))
        spies = {name: _Spy(getattr(ap, name))
                 for name in ("_prefill_split_kernel", "_prefill_combine_kernel", "_prefill_kernel")}
        for name, spy in spies.items():
            monkeypatch.setattr(ap, name, spy)
        return spies

    return force


def _paged_case(hq, hk, d, dv, block_size, dtype, strided, q_lens, history, seed, quant_bits=0, pad=4):
    gen = torch.Generator().manual_seed(seed)
    kv_lens = [q + h for q, h in zip(q_lens, history)]
    width = math.ceil(max(max(kv_lens), 1) / block_size) + 2
    table, num_blocks = make_block_table(kv_lens, block_size, width, gen)
    extra = {}
    if quant_bits:
        dk, dvk = (d, dv) if quant_bits == 8 else (d // 2, dv // 2)
        key_cache = torch.randint(0, 1 << quant_bits, (num_blocks, block_size, hk, dk), generator=gen,
                                  dtype=torch.uint8)
        value_cache = torch.randint(0, 1 << quant_bits, (num_blocks, block_size, hk, dvk), generator=gen,
                                    dtype=torch.uint8)
        # dequantized values within about +-2 (scores and outputs of the size the fp16 tolerance is set for)
        shape = (num_blocks, block_size, hk)
        scales = [((0.5 + torch.rand(shape, generator=gen)) * 2 / (1 << quant_bits)).to(dtype) for _ in "kv"]
        zeros = [((1 << quant_bits - 1) + torch.rand(shape, generator=gen) - 0.5).to(dtype) for _ in "kv"]
        extra = dict(kv_scales=scales, kv_zeros=zeros, quant_bits=quant_bits)
    else:
        key_cache, value_cache = make_cache(num_blocks, block_size, hk, d, dv, dtype, strided, gen)
    query = torch.randn(sum(q_lens) + pad, hq, d, generator=gen).to(dtype)
    cu_seqlens_q = torch.tensor(q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return query, key_cache, value_cache, table, cu_seqlens_q, torch.tensor(kv_lens, dtype=torch.int32), extra


def _paged(vendor, case, hq, hk, dv, block_size, causal, max_q, max_kv, out):
    query, key_cache, value_cache, table, cu, kv_lens, extra = case
    run(vendor, ops.paged_prefill_attention, query, None, None, key_cache, value_cache, table, block_size, cu,
        kv_lens, max_q, max_kv, hq, hk, [torch.ones(1)] if causal else [], head_size_v=dv, attn_output=out, **extra)
    return out


SPLIT_CASES = [
    # Hq, Hk, D, Dv, block_size, dtype, strided, causal, q_lens, history, splits
    # chunked: short queries over long histories; a zero-length and a one-token sequence; GQA 4 (packed)
    (8, 2, 64, 64, 16, torch.float32, True, True, [9, 0, 1, 20], [70, 33, 90, 45], 3),
    (8, 2, 64, 64, 64, torch.float16, False, True, [9, 0, 1, 20], [70, 33, 90, 45], 5),
    # no history (q == kv): slices of the causal range, the short tiles' later slices empty
    (4, 1, 32, 32, 16, torch.float16, False, True, [40, 17, 1], [0, 0, 0], 4),
    (2, 2, 32, 48, 64, torch.float32, True, True, [35, 0], [0, 0], 3),  # MHA (GQA 1), Dv != D
    (8, 1, 32, 32, 64, torch.float16, True, True, [12, 3], [100, 1], 6),  # GQA 8
    (6, 1, 32, 32, 16, torch.float16, False, True, [10, 4], [60, 25], 3),  # GQA 6: not packed
    (4, 2, 32, 32, 16, torch.float32, False, False, [6, 13, 0], [50, 0, 20], 4),  # non-causal
    (4, 1, 80, 80, 16, torch.float16, False, True, [5], [3], 8),  # D 80; more slices than key tiles: most empty
    # 16-wide values under 32-wide keys: the value tile is padded to 32 masked columns (ap.MIN_BLOCK_DV)
    (4, 1, 24, 16, 16, torch.float16, False, True, [2, 3], [16, 3], 3),
]


@pytest.mark.parametrize("hq,hk,d,dv,block_size,dtype,strided,causal,q_lens,history,splits", SPLIT_CASES)
def test_split_paged_prefill_matches_reference(force_splits, hq, hk, d, dv, block_size, dtype, strided, causal,
                                               q_lens, history, splits):
    spies = force_splits(splits)
    case = _paged_case(hq, hk, d, dv, block_size, dtype, strided, q_lens, history, seed=hq * 7 + d + splits)
    tokens = case[0].shape[0]
    max_q, max_kv = max(q_lens) + 5, max(q + h for q, h in zip(q_lens, history)) + 40  # bounds, as under graphs
    got = _paged("triton", case, hq, hk, dv, block_size, causal, max_q, max_kv,
                 torch.full((tokens, hq, dv), float("nan"), dtype=dtype))
    want = _paged("reference", case, hq, hk, dv, block_size, causal, max_q, max_kv,
                  torch.full((tokens, hq, dv), float("nan"), dtype=dtype))
    real = sum(q_lens)
    close(got[:real], want[:real], dtype)
    assert torch.isnan(got[real:]).all(), "wrote padding tokens past cu_seqlens_q[-1]"
    assert len(spies["_prefill_split_kernel"].grids) == 1 and len(spies["_prefill_combine_kernel"].grids) == 1
    assert not spies["_prefill_kernel"].grids
    assert spies["_prefill_split_kernel"].grids[0][0] % splits == 0  # tiles x splits


@pytest.mark.parametrize("d,dv,block_dv", [(16, 16, 16), (24, 16, 32), (32, 16, 32), (128, 16, 32), (16, 24, 32),
                                           (64, 64, 64), (192, 128, 128)])
def test_value_tiles_are_as_wide_as_the_key_tiles_up_to_32(d, dv, block_dv):
    """16-wide value tiles under wider key tiles miscompiled on an H100 (Triton 3.6): such values get 32 masked
    columns, interpreted and compiled alike; other widths keep their power of two."""
    for while_loop in (True, False):
        meta = ap._meta(4, 4, d, dv, 64, 64, 4, 3, True, 16, True, "tf32", while_loop, 0)
        assert (meta["BLOCK_D"], meta["BLOCK_DV"]) == (ap.next_power_of_2(d), block_dv)


@pytest.mark.parametrize("bits", [8, 4])
def test_split_paged_prefill_quantized_cache(force_splits, bits):
    force_splits(3)
    hq, hk, d, block_size, q_lens, history = 8, 2, 64, 16, [7, 1, 0], [60, 30, 9]
    case = _paged_case(hq, hk, d, d, block_size, torch.float16, False, q_lens, history, seed=bits, quant_bits=bits)
    tokens = case[0].shape[0]
    outs = [_paged(vendor, case, hq, hk, d, block_size, True, 8, 80,
                   torch.full((tokens, hq, d), float("nan"), dtype=torch.float16))
            for vendor in ("triton", "reference")]
    close(outs[0][:8], outs[1][:8], torch.float16)
    assert torch.isnan(outs[0][8:]).all()


def test_split_output_aliases_query(force_splits):
    """LMDeploy passes ``attn_output = query[..., :Dv]``: the split kernel only reads queries, the combine writes
    the output after it."""
    force_splits(4)
    hq, hk, d, dv, block_size, q_lens, history = 4, 1, 64, 32, 16, [11, 6], [50, 3]
    query, key_cache, value_cache, table, cu, kv_lens, _ = _paged_case(hq, hk, d, dv, block_size, torch.float16, True,
                                                                      q_lens, history, seed=5, pad=0)
    want = run("reference", ops.paged_prefill_attention, query.clone(), None, None, key_cache, value_cache, table,
               block_size, cu, kv_lens, 11, 61, hq, hk, [None], head_size_v=dv)
    buffer = query.clone()
    run("triton", ops.paged_prefill_attention, buffer, None, None, key_cache, value_cache, table, block_size, cu,
        kv_lens, 11, 61, hq, hk, [None], head_size_v=dv, attn_output=buffer[..., :dv])
    close(buffer[..., :dv], want, torch.float16)
    assert torch.equal(buffer[..., dv:], query[..., dv:]), "wrote outside attn_output"


def test_default_rule_splits_a_small_grid_over_a_long_history():
    """No forcing: the interpreter's config (16 target programs, 32-token slices) splits one short chunk over a
    long history, and the result matches the reference; a large length bound (a graph captured long) over short
    sequences leaves most slices empty."""
    hq, hk, d, block_size = 4, 1, 32, 16
    cfg = ap._config("cpu", torch.float16, d, d, False)
    for q_lens, history, max_kv in (([8], [200], 208), ([3, 1], [20, 0], 640)):
        pack = ap._pack(cfg, hq // hk)
        programs = ap.cdiv(max(q_lens), cfg.block_m // pack) * (hq // pack) * len(q_lens)
        assert ap.num_splits(programs, max_kv, cfg) > 1
        case = _paged_case(hq, hk, d, d, block_size, torch.float16, False, q_lens, history, seed=max_kv)
        tokens, real = case[0].shape[0], sum(q_lens)
        outs = [_paged(vendor, case, hq, hk, d, block_size, True, max(q_lens), max_kv,
                       torch.full((tokens, hq, d), float("nan"), dtype=torch.float16))
                for vendor in ("triton", "reference")]
        close(outs[0][:real], outs[1][:real], torch.float16)


def test_split_prefill_attention_packed_keys(force_splits):
    """The non-paged op runs on the same split and combine kernels (keys packed like the queries)."""
    spies = force_splits(3)
    gen = torch.Generator().manual_seed(4)
    hq, hk, d, q_lens, kv_lens = 8, 2, 32, [7, 30, 0], [40, 30, 5]
    query = torch.randn(sum(q_lens) + 2, hq, d, generator=gen).to(torch.float16)
    key = torch.randn(sum(kv_lens), hk, d, generator=gen).to(torch.float16)
    value = torch.randn(sum(kv_lens), hk, d, generator=gen).to(torch.float16)
    outs = []
    for vendor in ("triton", "reference"):
        out = torch.full(query.shape, float("nan"), dtype=torch.float16)
        run(vendor, ops.prefill_attention, query, key, value, None, None, torch.tensor(q_lens),
            torch.tensor(kv_lens, dtype=torch.int32), 30, hq, hk, [None], attn_output=out)
        outs.append(out)
    real = sum(q_lens)
    close(outs[0][:real], outs[1][:real], torch.float16)
    assert torch.isnan(outs[0][real:]).all()
    assert spies["_prefill_combine_kernel"].grids


@pytest.mark.parametrize("n,split", [(64, True), (40, False)])
def test_default_rule_for_prefill_attention_uses_the_query_bound(monkeypatch, n, split):
    """Keys partitioned like the queries (one lengths tensor): the rule's KV bound is ``max_q_seq_len``, not the
    padded buffer's 300 keys. The interpreter's rule (16 target programs, 32-key slices): a 64-token prompt is 8
    programs and splits in 2; a 40-token one (5 programs) would split in 3 by the buffer but stays whole by its
    bound. Both match the reference."""
    spy = _Spy(ap._prefill_combine_kernel)
    monkeypatch.setattr(ap, "_prefill_combine_kernel", spy)
    gen = torch.Generator().manual_seed(n)
    hq, hk, d, padded = 4, 1, 32, 300
    query = torch.randn(padded, hq, d, generator=gen).to(torch.float16)
    key = torch.randn(padded, hk, d, generator=gen).to(torch.float16)
    value = torch.randn(padded, hk, d, generator=gen).to(torch.float16)
    lens = torch.tensor([n])
    outs = []
    for vendor in ("triton", "reference"):
        out = torch.full(query.shape, float("nan"), dtype=torch.float16)
        run(vendor, ops.prefill_attention, query, key, value, None, None, lens, lens, n, hq, hk, [None],
            attn_output=out)
        outs.append(out)
    close(outs[0][:n], outs[1][:n], torch.float16)
    assert torch.isnan(outs[0][n:]).all()
    assert len(spy.grids) == (1 if split else 0)


def test_split_rows_that_see_no_key_are_zero(force_splits):
    """Causal with more queries than keys (the op refuses it; the kernels must still not emit NaN): rows no slice
    reaches get zeros from the combine, like the reference (test_attention's case, run split in 3)."""
    import test_attention

    spies = force_splits(3)
    test_attention.test_prefill_rows_that_see_no_key_are_zero()
    assert spies["_prefill_combine_kernel"].grids


@pytest.mark.parametrize("where", ["first_slice_key", "diagonal_key", "value"])
def test_split_nan_in_nan_out(force_splits, where):
    """A NaN in the cache reaches exactly the rows the reference makes NaN through the split and combine kernels,
    and no other row: a key in the first slice (every row of the sequence sees it), a key past some rows' diagonal
    in the last slice (only the later rows see it), a value of the other sequence. (The interpreter's maximum
    propagates NaN, so this does not tell whether the combine would drop a NaN partial under the GPU's max; the
    combine counts a NaN log-sum-exp as live for that.)"""
    force_splits(3)
    hq, hk, d, block_size, q_lens, history = 4, 2, 16, 16, [6, 4], [50, 30]
    case = _paged_case(hq, hk, d, d, block_size, torch.float32, False, q_lens, history, seed=9, pad=0)
    key_cache, value_cache, table = case[1], case[2], case[3]

    def poison(cache, b, t, head):
        cache[int(table[b, t // block_size]), t % block_size, head, 3] = float("nan")

    if where == "first_slice_key":
        poison(key_cache, 0, 2, 1)
    elif where == "diagonal_key":
        poison(key_cache, 0, history[0] + 3, 0)  # queries 3.. of sequence 0 see it, 0..2 do not
    else:
        poison(value_cache, 1, 10, 1)
    tokens = sum(q_lens)
    tri, ref = (_paged(vendor, case, hq, hk, d, block_size, True, 6, 56, torch.full((tokens, hq, d), float("nan")))
                for vendor in ("triton", "reference"))
    nan_rows = {tuple(ix) for ix in torch.nonzero(ref.isnan().any(-1)).tolist()}
    assert nan_rows and nan_rows != {(t, h) for t in range(tokens) for h in range(hq)}
    assert {tuple(ix) for ix in torch.nonzero(tri.isnan().any(-1)).tolist()} == nan_rows
    finite = torch.isfinite(ref)
    torch.testing.assert_close(tri[finite], ref[finite], atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------ the split rule
H200 = dict(sm_count=132, smem_per_sm=233472, threads_per_sm=2048)  # an H100/H200: 132 SMs, 228 KB per SM


def _gpu_config(max_q: int, head: int = 128) -> ap.PrefillConfig:
    """The GPU launch config of bf16 32/8 heads on the modelled card (what ``_config`` builds on a cuda device)."""
    base = {False: ap.PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
            True: ap.PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)}[max_q >= ap.LONG_QUERIES]
    return dataclasses.replace(base, target_programs=ap.resident_programs(base, head, head, 2, **H200))


def _splits(batch, max_q, max_kv, hq=32, hk=8):
    cfg = _gpu_config(max_q)
    pack = ap._pack(cfg, hq // hk)
    return ap.num_splits(ap.cdiv(max_q, cfg.block_m // pack) * (hq // pack) * batch, max_kv, cfg)


def test_resident_programs_follow_shared_memory_and_threads():
    small = ap.PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)  # 112 KB: two per SM
    large = ap.PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)  # 224 KB: one per SM
    assert ap.resident_programs(small, 128, 128, 2, **H200) == 264
    assert ap.resident_programs(large, 128, 128, 2, **H200) == 132
    fp32 = ap.PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)  # 128 KB with tf32x3: one per SM
    assert ap.resident_programs(fp32, 128, 128, 4, **H200) == 132
    tiny = ap.PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)  # threads bound it: 16 per SM
    assert ap.resident_programs(tiny, 64, 64, 2, **H200) == 16 * 132


def test_split_rule_on_a_132_sm_card():
    """Chunked prefill of 256 tokens over a 16k history, 32/8 heads: batch 1 is 128 programs of 64 x 64 tiles, two
    fit per SM, so two slices fill one wave; batch 8 (1024 programs) and long prompts already fill the card; short
    histories are never split."""
    assert _splits(1, 256, 16384 + 256) == 2
    assert _splits(8, 256, 16384 + 256) == 1
    assert _splits(64, 256, 16384 + 256) == 1
    assert _splits(1, 8192, 8192) == 1  # 128x128 tiles: 2048 programs
    assert _splits(1, 256, 256) == 1  # a short KV range: slices would be under min_split_tokens
    assert _splits(1, 64, 16384) == 8  # 4 query tiles x 8 head groups = 32 programs: 264 // 32
    assert _splits(1, 32, 16384) == 16  # 2 x 8 = 16 programs
    assert _splits(1, 32, 4096) == 8  # 16 ... but 4096 keys make 8 slices of 512
    assert _splits(1, 1, 1 << 20, hq=8, hk=8) == 33  # 8 programs of one token: 264 // 8
    assert _splits(1, 1, 1 << 20, hq=1, hk=1) == attention_decode.MAX_SPLITS


def test_split_overrides_from_the_environment(monkeypatch):
    """``DLINFER_TRITON_PREFILL`` (GPU configs) sweeps the split: ``splits=0`` never splits, ``splits=N`` forces
    N slices, ``target_programs`` moves the rule's target."""
    cfg = _gpu_config(256)
    monkeypatch.setenv("DLINFER_TRITON_PREFILL", "splits=0")
    assert ap.num_splits(128, 16640, attention_decode.env_overrides(cfg, "DLINFER_TRITON_PREFILL")) == 1
    monkeypatch.setenv("DLINFER_TRITON_PREFILL", "splits=6")
    assert ap.num_splits(4096, 100, attention_decode.env_overrides(cfg, "DLINFER_TRITON_PREFILL")) == 6
    monkeypatch.setenv("DLINFER_TRITON_PREFILL", "target_programs=528,min_split_tokens=1024")
    tuned = attention_decode.env_overrides(cfg, "DLINFER_TRITON_PREFILL")
    assert ap.num_splits(128, 16640, tuned) == 4
    assert ap.num_splits(128, 2048, tuned) == 2
    monkeypatch.setenv("DLINFER_TRITON_PREFILL", "min_split_tokens=0")  # one key a slice at the most
    assert ap.num_splits(128, 3, attention_decode.env_overrides(cfg, "DLINFER_TRITON_PREFILL")) == 2
    monkeypatch.setenv("DLINFER_TRITON_PREFILL", "target_programs=0")
    assert ap.num_splits(16, 16640, attention_decode.env_overrides(cfg, "DLINFER_TRITON_PREFILL")) == 1


# ------------------------------------------------------------------- GPU code paths, compiled without a GPU
_COMPILE_SPLIT_FOR_SM90 = r'''
from sm90 import compile_sm90
from dlinfer.vendor.triton import attention_prefill as pre

LIMIT = 227 * 1024
for paged, pack, causal, quant, bm, bn, warps, stages, dt, d in (
        (True, 4, True, 0, 64, 64, 4, 3, "bf16", 128), (True, 4, True, 0, 128, 128, 8, 3, "bf16", 128),
        (True, 1, False, 0, 64, 64, 4, 3, "bf16", 128), (True, 4, True, 8, 64, 64, 4, 3, "bf16", 128),
        (True, 4, True, 4, 64, 64, 4, 3, "bf16", 128), (False, 4, True, 0, 64, 64, 4, 3, "bf16", 128),
        (True, 4, True, 0, 64, 64, 8, 2, "bf16", 256), (True, 4, True, 0, 64, 32, 4, 2, "fp32", 128)):
    cache = "*u8" if quant else "*" + dt
    types = dict(q_ptr="*" + dt, k_ptr=cache, v_ptr=cache, mid_o_ptr="*fp32", mid_lse_ptr="*fp32",
                 q_starts_ptr="*i32", kv_ptr_lens="*i32", block_table_ptr="*i32", ks_ptr="*" + dt, kz_ptr="*" + dt,
                 vs_ptr="*" + dt, vz_ptr="*" + dt, qk_scale="fp32")
    consts = dict(GROUP=4, PACK=pack, HEAD_DIM=d, BLOCK_D=d, HEAD_DIM_V=d, BLOCK_DV=d, BLOCK_M=bm,
                  BLOCK_N=bn, PAGED=paged, PAGE_SIZE=16, CAUSAL=causal,
                  DOT_PRECISION="tf32x3" if dt == "fp32" else "tf32", WHILE_LOOP=False, QUANT=quant, USE_PDL=True)
    smem, ttgir = compile_sm90(pre._prefill_split_kernel, types, consts, warps, stages)
    assert smem <= LIMIT, (bm, bn, quant, smem)
    # the split rule's residency model never counts less shared memory than the kernel takes
    cfg = pre.PrefillConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
    assert smem <= pre.shared_memory(cfg, d, d, 4 if dt == "fp32" else 2), (bm, bn, dt, d, smem)
    assert "warp_group_dot" in ttgir, "the split kernel must run on Hopper tensor cores (wgmma)"
    print("split", paged, pack, causal, quant, bm, bn, dt, d, smem)
for pdl in (True, False):
    for dv in (128, 64):
        smem, ttgir = compile_sm90(pre._prefill_combine_kernel,
                                   dict(mid_o_ptr="*fp32", mid_lse_ptr="*fp32", out_ptr="*bf16", q_starts_ptr="*i32"),
                                   dict(NUM_HEADS=32, HEAD_DIM_V=dv, BLOCK_DV=dv, BLOCK_R=32, WHILE_LOOP=False,
                                        USE_PDL=pdl), 4, 2)
        assert smem <= LIMIT
        print("combine", pdl, dv, smem)
print("compiled")
'''


def test_split_and_combine_kernels_compile_for_sm90():
    """The GPU configs of the split kernel (bf16 64x64 and 128x128 tiles at D 128, 64x64 at D 256, fp32 64x32 with
    tf32x3 dots, paged / packed keys, causal or not, int8 and int4 caches) and the combine kernel (with and without programmatic dependent launch) compile for sm_90 with the
    triton wheel's ptxas, within 227 KB of shared memory and within what the split rule's residency model counts,
    the split kernel on wgmma."""
    from sm90 import compile_for_sm90

    compile_for_sm90(_COMPILE_SPLIT_FOR_SM90)
