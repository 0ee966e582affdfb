"""The triton vendor's attention kernels against the reference vendor, under Triton's interpreter (CPU).

Every output is poisoned with NaN before the call (and so is the decode kernel's scratch buffer, through a
poisoned ``torch.empty``), so an element a kernel forgets to write, or a stale partial the reduce wrongly
reads, shows up. Block tables are shuffled and their unused trailing entries hold out-of-range garbage, which a
kernel must never read. Matmul kernels are checked in fp32 and fp16 only (Triton 3.6's interpreter gets
``tl.dot`` on bf16 wrong); the elementwise decode path (one query head per KV head) is checked in bf16 too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch

import dlinfer.ops as ops
import dlinfer.vendor
from dlinfer.errors import NotSupportedError
from dlinfer.vendor.triton import attention_decode, attention_prefill

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}
GARBAGE = 1 << 20  # block-table entries past a sequence's last block: out of range on purpose


@contextlib.contextmanager
def poisoned_empty():
    """``torch.empty`` returns NaN-filled float tensors while active (the kernels' scratch buffers)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


def run(vendor: str, fn, *args, **kwargs):
    dlinfer.vendor.set_override(vendor)
    try:
        with poisoned_empty():
            return fn(*args, **kwargs)
    finally:
        dlinfer.vendor.clear_overrides()


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    assert not torch.isnan(got).any(), "an output element was not written"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def make_cache(num_blocks, block_size, num_kv_heads, head_size, head_size_v, dtype, strided, gen):
    """``[NB, BS, Hk, D]`` / ``[NB, BS, Hk, Dv]`` caches; strided ones are views of one packed vLLM-style
    ``kv[NB, Hk, BS, D + Dv]`` buffer."""
    if strided:
        kv = torch.randn(num_blocks, num_kv_heads, block_size, head_size + head_size_v, generator=gen).to(dtype)
        key_cache = kv.transpose(1, 2)[..., :head_size]
        value_cache = kv.transpose(1, 2)[..., head_size:]
        assert not key_cache.is_contiguous() and not value_cache.is_contiguous()
        return key_cache, value_cache
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=gen).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size_v, generator=gen).to(dtype)
    return key_cache, value_cache


def make_block_table(kv_lens, block_size, width, gen, dtype=torch.int32):
    """Shuffled distinct blocks per sequence; entries past each sequence's last block are garbage."""
    need = [math.ceil(n / block_size) for n in kv_lens]
    num_blocks = sum(need) + 3  # a few blocks no one uses
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(kv_lens), width), GARBAGE, dtype=torch.int64)
    table[:, 1::2] = -7
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = order[used:used + n]
        used += n
    return table.to(dtype), num_blocks


# ------------------------------------------------------------------------------------------------- decode
DECODE_CASES = [
    # Hq, Hk, D, Dv, block_size, dtype, strided, kv_lens
    (2, 2, 64, 64, 16, torch.float32, False, [0, 1, 37, 90]),  # MHA: elementwise path, split-KV
    (2, 2, 64, 64, 16, torch.bfloat16, True, [23, 0, 64]),  # MHA bf16 (no tl.dot), strided
    (8, 2, 64, 64, 16, torch.float16, True, [17, 0, 80]),  # GQA 4, strided, split-KV
    (8, 1, 80, 80, 64, torch.float32, False, [130, 5, 0]),  # MQA 8, D 80 padded to 128
    (8, 1, 64, 32, 64, torch.float16, False, [70, 1]),  # Dv != D
    (16, 2, 32, 32, 16, torch.float32, True, [40, 0, 3, 77]),  # GQA 8
    (4, 4, 32, 48, 16, torch.float16, False, [33, 0, 48, 15]),  # B*Hk = 16 programs: one split, no reduce
    (8, 2, 64, 64, 128, torch.float16, True, [128, 0, 129, 300]),  # tiles inside one page (one page id each)
]


@pytest.mark.parametrize("hq,hk,d,dv,block_size,dtype,strided,kv_lens", DECODE_CASES)
def test_paged_decode(hq, hk, d, dv, block_size, dtype, strided, kv_lens):
    gen = torch.Generator().manual_seed(hq * 1000 + d + block_size)
    batch = len(kv_lens)
    width = math.ceil(max(kv_lens) / block_size) + 2
    table, num_blocks = make_block_table(kv_lens, block_size, width, gen)
    key_cache, value_cache = make_cache(num_blocks, block_size, hk, d, dv, dtype, strided, gen)
    query = torch.randn(batch, hq, d, generator=gen).to(dtype)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    max_kv = max(kv_lens) + 29  # an upper bound, as under CUDA graphs
    outs = []
    for vendor in ("triton", "reference"):
        out = torch.full((batch, hq, dv), float("nan"), dtype=dtype)
        run(vendor, ops.paged_decode_attention, query, key_cache, value_cache, table, block_size, None, lens,
            max_kv, hq, hk, head_size_v=dv, attn_output=out)
        outs.append(out)
    close(outs[0], outs[1], dtype)
    for b, n in enumerate(kv_lens):
        if n == 0:
            assert torch.equal(outs[0][b], torch.zeros_like(outs[0][b])), "kv_seqlens == 0 must give a zero row"


def test_paged_decode_output_aliases_query_and_scale():
    """LMDeploy writes the output over the query buffer (``attn_output = query[..., :Dv]``)."""
    gen = torch.Generator().manual_seed(7)
    hq, hk, d, dv, block_size, kv_lens = 8, 2, 64, 32, 16, [50, 0, 19]
    table, num_blocks = make_block_table(kv_lens, block_size, 6, gen, torch.int64)
    key_cache, value_cache = make_cache(num_blocks, block_size, hk, d, dv, torch.float32, False, gen)
    lens = torch.tensor(kv_lens)
    query = torch.randn(len(kv_lens), hq, d, generator=gen)
    want = run("reference", ops.paged_decode_attention, query.clone(), key_cache, value_cache, table, block_size,
               None, lens, 64, hq, hk, head_size_v=dv, softmax_scale=0.3)
    buffer = query.clone()
    out = buffer[..., :dv]
    run("triton", ops.paged_decode_attention, buffer, key_cache, value_cache, table, block_size, None, lens, 64, hq,
        hk, head_size_v=dv, softmax_scale=0.3, attn_output=out)
    close(out, want, torch.float32)
    assert torch.equal(buffer[..., dv:], query[..., dv:]), "wrote outside attn_output"


def test_paged_decode_many_empty_splits():
    """A large length bound (a graph captured long) over short sequences: most splits are empty."""
    gen = torch.Generator().manual_seed(3)
    hq, hk, d, block_size, kv_lens = 4, 1, 32, 16, [9, 0]
    table, num_blocks = make_block_table(kv_lens, block_size, 40, gen)
    key_cache, value_cache = make_cache(num_blocks, block_size, hk, d, d, torch.float16, False, gen)
    query = torch.randn(2, hq, d, generator=gen).to(torch.float16)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    cfg = attention_decode._config("cpu", 0, torch.float16, d, d, hq // hk)
    assert attention_decode.num_splits(2, hk, 640, cfg) > 4
    got = run("triton", ops.paged_decode_attention, query, key_cache, value_cache, table, block_size, None, lens,
              640, hq, hk)
    want = run("reference", ops.paged_decode_attention, query, key_cache, value_cache, table, block_size, None, lens,
               640, hq, hk)
    close(got, want, torch.float16)


def test_decode_split_count_depends_on_shapes_only():
    cfg = attention_decode.DecodeConfig(block_n=64, block_h=16, use_dot=True, num_warps=4, num_stages=3,
                                        target_programs=264, min_split_tokens=64)
    split = attention_decode.num_splits
    assert split(1, 8, 1024, cfg) == 16  # B=1 ctx 1k: 128 programs of one tile each
    assert split(1, 8, 1 << 20, cfg) == 33  # long context: enough programs for 2 waves of 132 SMs
    assert split(256, 8, 4096, cfg) == 1  # big batch: no reduce kernel
    assert split(1, 1, 1 << 20, cfg) == attention_decode.MAX_SPLITS
    assert split(4, 8, 0, cfg) == 1


# ------------------------------------------------------------------------------------------------ prefill
PREFILL_CASES = [
    # Hq, Hk, D, Dv, dtype, causal, q_lens, kv_lens (None: same as q_lens)
    (4, 1, 64, 64, torch.float32, True, [5, 0, 37, 16], None),  # MQA, a zero-length sequence
    (8, 2, 80, 48, torch.float16, True, [33, 9], None),  # GQA 4, D 80, Dv != D
    (2, 2, 32, 32, torch.float16, True, [7, 20], [30, 20]),  # causal end alignment: q shorter than kv
    (8, 1, 32, 64, torch.float32, False, [12, 30], [40, 3]),  # non-causal (vision), q/kv lengths differ
    (6, 2, 64, 64, torch.float16, True, [19, 8], None),  # GQA 3: never packed
]


@pytest.fixture(params=[True, False], ids=["pack_gqa", "head_per_program"])
def pack_gqa(request, monkeypatch):
    """Run the prefill kernels with GQA packing allowed (the default) and refused."""
    if not request.param:
        real = attention_prefill._config
        monkeypatch.setattr(attention_prefill, "_config",
                            lambda *args: dataclasses.replace(real(*args), pack_gqa=False))
    return request.param


@pytest.mark.parametrize("hq,hk,d,dv,dtype,causal,q_lens,kv_lens", PREFILL_CASES)
def test_prefill(hq, hk, d, dv, dtype, causal, q_lens, kv_lens, pack_gqa):
    gen = torch.Generator().manual_seed(hq * 100 + d + dv)
    kv_lens = q_lens if kv_lens is None else kv_lens
    tokens, kv_tokens = sum(q_lens) + 3, sum(kv_lens) + 2  # trailing padding tokens
    query = torch.randn(tokens, hq, d, generator=gen).to(dtype)
    key = torch.randn(kv_tokens, hk, d, generator=gen).to(dtype)
    value = torch.randn(kv_tokens, hk, dv, generator=gen).to(dtype)
    q_seqlens, kv_seqlens = torch.tensor(q_lens), torch.tensor(kv_lens, dtype=torch.int32)
    mask = [torch.ones(1)] if causal else []
    outs = []
    for vendor in ("triton", "reference"):
        out = torch.full((tokens, hq, dv), float("nan"), dtype=dtype)
        run(vendor, ops.prefill_attention, query, key, value, None, None, q_seqlens, kv_seqlens, max(q_lens) + 21,
            hq, hk, mask, attn_output=out)
        outs.append(out)
    real = sum(q_lens)
    close(outs[0][:real], outs[1][:real], dtype)
    assert torch.isnan(outs[0][real:]).all(), "wrote padding tokens past the last sequence"


def test_prefill_output_aliases_query(pack_gqa):
    gen = torch.Generator().manual_seed(11)
    hq, hk, d, dv, lens = 4, 2, 64, 64, [21, 14]
    query = torch.randn(sum(lens), hq, d, generator=gen).to(torch.float16)
    key = torch.randn(sum(lens), hk, d, generator=gen).to(torch.float16)
    value = torch.randn(sum(lens), hk, dv, generator=gen).to(torch.float16)
    seqlens = torch.tensor(lens)
    want = run("reference", ops.prefill_attention, query.clone(), key, value, None, None, seqlens, seqlens, 21, hq,
               hk, [None])
    buffer = query.clone()
    run("triton", ops.prefill_attention, buffer, key, value, None, None, seqlens, seqlens, 21, hq, hk, [None],
        attn_output=buffer)
    close(buffer, want, torch.float16)


# ------------------------------------------------------------------------------------------ paged prefill
PAGED_PREFILL_CASES = [
    # Hq, Hk, D, Dv, block_size, dtype, strided, causal, q_lens, history lens
    (8, 2, 64, 64, 16, torch.float32, True, True, [9, 0, 20], [30, 12, 0]),  # chunked prefill, GQA 4
    (8, 1, 64, 32, 64, torch.float16, False, True, [17, 5], [50, 70]),  # MQA 8, block 64, Dv != D
    (2, 2, 80, 80, 16, torch.float16, True, True, [24], [7]),  # MHA, D 80
    (4, 2, 32, 32, 16, torch.float32, False, False, [6, 13], [10, 0]),  # non-causal
    (4, 1, 32, 32, 16, torch.float16, True, True, [40, 3], [17, 33]),  # diagonal one past a tile edge
]


@pytest.mark.parametrize("hq,hk,d,dv,block_size,dtype,strided,causal,q_lens,history", PAGED_PREFILL_CASES)
def test_paged_prefill(hq, hk, d, dv, block_size, dtype, strided, causal, q_lens, history, pack_gqa):
    gen = torch.Generator().manual_seed(hq * 10 + d + block_size)
    kv_lens = [q + h for q, h in zip(q_lens, history)]
    width = math.ceil(max(kv_lens) / block_size) + 3
    table, num_blocks = make_block_table(kv_lens, block_size, width, gen, torch.int64)
    key_cache, value_cache = make_cache(num_blocks, block_size, hk, d, dv, dtype, strided, gen)
    tokens = sum(q_lens) + 4  # padding tokens after the last sequence
    query = torch.randn(tokens, hq, d, generator=gen).to(dtype)
    cu_seqlens_q = torch.tensor(q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    kv_seqlens = torch.tensor(kv_lens, dtype=torch.int32)
    mask = [torch.ones(1)] if causal else []
    outs = []
    for vendor in ("triton", "reference"):
        out = torch.full((tokens, hq, dv), float("nan"), dtype=dtype)
        run(vendor, ops.paged_prefill_attention, query, None, None, key_cache, value_cache, table, block_size,
            cu_seqlens_q, kv_seqlens, max(q_lens) + 17, max(kv_lens) + 40, hq, hk, mask, head_size_v=dv,
            attn_output=out)
        outs.append(out)
    real = sum(q_lens)
    close(outs[0][:real], outs[1][:real], dtype)
    assert torch.isnan(outs[0][real:]).all(), "wrote padding tokens past cu_seqlens_q[-1]"


def test_paged_prefill_output_aliases_query(pack_gqa):
    gen = torch.Generator().manual_seed(5)
    hq, hk, d, dv, block_size, q_lens, history = 4, 1, 64, 32, 16, [11, 6], [20, 3]
    kv_lens = [q + h for q, h in zip(q_lens, history)]
    table, num_blocks = make_block_table(kv_lens, block_size, 3, gen)
    key_cache, value_cache = make_cache(num_blocks, block_size, hk, d, dv, torch.float16, True, gen)
    query = torch.randn(sum(q_lens), hq, d, generator=gen).to(torch.float16)
    cu = torch.tensor(q_lens).cumsum(0)
    kv = torch.tensor(kv_lens)
    want = run("reference", ops.paged_prefill_attention, query.clone(), None, None, key_cache, value_cache, table,
               block_size, cu, kv, 11, 31, hq, hk, [None], head_size_v=dv)
    buffer = query.clone()
    run("triton", ops.paged_prefill_attention, buffer, None, None, key_cache, value_cache, table, block_size, cu, kv,
        11, 31, hq, hk, [None], head_size_v=dv, attn_output=buffer[..., :dv])
    close(buffer[..., :dv], want, torch.float16)
    assert torch.equal(buffer[..., dv:], query[..., dv:])


# ------------------------------------------------------------------------------------------- capabilities
def test_unsupported_head_size_is_refused_by_name():
    query = torch.randn(1, 2, 8)
    key_cache = torch.randn(2, 16, 2, 8)
    table = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(NotSupportedError, match="head size 8"):
        run("triton", ops.paged_decode_attention, query, key_cache, key_cache, table, 16, None,
            torch.tensor([3]), 16, 2, 2)


def test_capabilities_declare_features():
    caps = dlinfer.vendor.get_vendor("triton").capabilities
    assert "strided_cache" in caps["paged_decode_attention"].features
    assert {"strided_cache", "non_causal"} <= caps["paged_prefill_attention"].features
    assert "non_causal" in caps["prefill_attention"].features
    for op in ("paged_decode_attention", "paged_prefill_attention", "prefill_attention"):
        assert {torch.float16, torch.bfloat16, torch.float32} <= caps[op].dtypes
        assert {64, 80, 96, 128, 256} <= caps[op].head_sizes


# ------------------------------------------------------------------------- the GPU tile shapes, interpreted
@pytest.mark.parametrize("hq,hk", [(8, 2), (2, 2)], ids=["gqa4", "mha_on_tensor_cores"])
def test_paged_decode_with_gpu_tiles(monkeypatch, hq, hk):
    """The H100 launch parameters: 64-token tiles spanning four 16-token pages, 264 target programs, tl.dot
    even for one query head (padded to 16 rows)."""
    gpu = attention_decode.DecodeConfig(block_n=64, block_h=16, use_dot=True, num_warps=4, num_stages=3,
                                        target_programs=264, min_split_tokens=64)
    monkeypatch.setattr(attention_decode, "_config", lambda *args: gpu)
    gen = torch.Generator().manual_seed(21)
    d, block_size, kv_lens = 128, 16, [200, 0, 61]
    table, num_blocks = make_block_table(kv_lens, block_size, 20, gen)
    key_cache, value_cache = make_cache(num_blocks, block_size, hk, d, d, torch.float16, True, gen)
    query = torch.randn(len(kv_lens), hq, d, generator=gen).to(torch.float16)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    assert attention_decode.num_splits(len(kv_lens), hk, 300, gpu) == 5  # cdiv(300, 64): one split a tile
    got = run("triton", ops.paged_decode_attention, query, key_cache, value_cache, table, block_size, None, lens,
              300, hq, hk)
    want = run("reference", ops.paged_decode_attention, query, key_cache, value_cache, table, block_size, None, lens,
               300, hq, hk)
    close(got, want, torch.float16)


def test_prefill_with_gpu_tiles(monkeypatch):
    """128 x 64 tiles: two masked diagonal tiles per query tile, chunked history not a multiple of a tile."""
    from dlinfer.vendor.triton import attention_prefill

    monkeypatch.setattr(attention_prefill, "_config",
                        lambda *args: attention_prefill.PrefillConfig(block_m=128, block_n=64, num_warps=8,
                                                                      num_stages=3))
    gen = torch.Generator().manual_seed(8)
    hq, hk, d, block_size, q_lens, history = 2, 1, 64, 16, [150, 70], [0, 45]
    kv_lens = [q + h for q, h in zip(q_lens, history)]
    # varlen prefill (no history)
    query = torch.randn(sum(q_lens), hq, d, generator=gen).to(torch.float16)
    key = torch.randn(sum(q_lens), hk, d, generator=gen).to(torch.float16)
    value = torch.randn(sum(q_lens), hk, d, generator=gen).to(torch.float16)
    seqlens = torch.tensor(q_lens)
    got = run("triton", ops.prefill_attention, query, key, value, None, None, seqlens, seqlens, 150, hq, hk, [None])
    want = run("reference", ops.prefill_attention, query, key, value, None, None, seqlens, seqlens, 150, hq, hk,
               [None])
    close(got, want, torch.float16)
    # paged, with history
    table, num_blocks = make_block_table(kv_lens, block_size, 12, gen)
    key_cache, value_cache = make_cache(num_blocks, block_size, hk, d, d, torch.float16, False, gen)
    cu = torch.tensor(q_lens).cumsum(0)
    kv = torch.tensor(kv_lens)
    got = run("triton", ops.paged_prefill_attention, query, None, None, key_cache, value_cache, table, block_size,
              cu, kv, 150, 160, hq, hk, [None])
    want = run("reference", ops.paged_prefill_attention, query, None, None, key_cache, value_cache, table,
               block_size, cu, kv, 150, 160, hq, hk, [None])
    close(got, want, torch.float16)


def test_gqa_packing_choice():
    gpu = attention_prefill.PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    assert [attention_prefill._pack(gpu, g) for g in (1, 2, 3, 4, 6, 8, 16)] == [1, 2, 1, 4, 1, 8, 1]
    assert attention_prefill._pack(dataclasses.replace(gpu, pack_gqa=False), 4) == 1
    cpu = attention_prefill._config("cpu", torch.float16, 64, 64)
    assert attention_prefill._pack(cpu, 8) == 8  # the interpreter tests exercise packing up to GQA 8


def test_prefill_rows_that_see_no_key_are_zero():
    """Causal with more queries than keys (the op's checks refuse it; the kernel still must not emit NaN):
    the first ``q_len - kv_len`` queries see nothing and give zeros, like the reference."""
    from dlinfer.vendor.reference import attention as reference

    gen = torch.Generator().manual_seed(2)
    query = torch.randn(20, 2, 32, generator=gen)
    key = torch.randn(6, 1, 32, generator=gen)
    value = torch.randn(6, 1, 32, generator=gen)
    cu_seqlens_q = torch.tensor([0, 20], dtype=torch.int32)  # the vendor contract: [B + 1] start offsets
    cu_seqlens_kv = torch.tensor([0, 6], dtype=torch.int32)
    got = torch.full((20, 2, 32), float("nan"))
    want = torch.full((20, 2, 32), float("nan"))
    attention_prefill.prefill_attention(query, key, value, cu_seqlens_q, cu_seqlens_kv, 20, 0.2, True, got)
    reference.prefill_attention(query, key, value, cu_seqlens_q, cu_seqlens_kv, 20, 0.2, True, want)
    close(got, want, torch.float32)
    assert torch.equal(got[:14], torch.zeros_like(got[:14]))


def test_launch_parameter_overrides_from_the_environment(monkeypatch):
    cfg = attention_prefill.PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    monkeypatch.setenv("DLINFER_TRITON_PREFILL", "block_n=128, pack_gqa=0")
    tuned = attention_decode.env_overrides(cfg, "DLINFER_TRITON_PREFILL")
    assert (tuned.block_n, tuned.pack_gqa, tuned.block_m) == (128, False, 128)
    monkeypatch.setenv("DLINFER_TRITON_PREFILL", "blockn=128")
    with pytest.raises(ValueError, match="DLINFER_TRITON_PREFILL"):
        attention_decode.env_overrides(cfg, "DLINFER_TRITON_PREFILL")
    monkeypatch.setenv("DLINFER_TRITON_PREFILL", "block_n=big")
    with pytest.raises(ValueError, match="block_n must be an integer"):
        attention_decode.env_overrides(cfg, "DLINFER_TRITON_PREFILL")


# ------------------------------------------------------------------- GPU code paths, compiled without a GPU
_COMPILE_FOR_SM90 = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dlinfer.vendor.triton import attention_decode as dec, attention_prefill as pre

def compile_(fn, ptrs, consts, floats, num_warps, num_stages):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name], attrs[(i,)] = "*" + ptrs[name], [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                                  num_stages=num_stages))

for dt, group, use_dot, direct, page, quant in (("bf16", 4, True, False, 64, 0), ("bf16", 1, True, True, 16, 0),
                                               ("fp32", 1, False, False, 16, 0), ("bf16", 4, True, False, 64, 8),
                                               ("fp16", 1, True, True, 16, 4), ("fp32", 1, False, False, 16, 8)):
    cache = "u8" if quant else dt
    ptrs = dict(q_ptr=dt, k_ptr=cache, v_ptr=cache, block_table_ptr="i32", kv_lens_ptr="i32", out_ptr=dt,
                mid_o_ptr="fp32", mid_lse_ptr="fp32", counter_ptr="i32", ks_ptr=dt, kz_ptr=dt, vs_ptr=dt, vz_ptr=dt)
    consts = dict(GROUP=group, BLOCK_H=16 if use_dot else 1, HEAD_DIM=128, BLOCK_D=128, HEAD_DIM_V=128,
                  BLOCK_DV=128, PAGE_SIZE=page, BLOCK_N=64, USE_DOT=use_dot, DIRECT=direct,
                  DOT_PRECISION="ieee" if dt == "fp32" else "tf32", WHILE_LOOP=False, PAGE_TILES=page % 64 == 0,
                  USE_PDL=not direct, QUANT=quant, FUSED_REDUCE=False, BLOCK_S=1,
                  HOIST=page % 64 == 0 and not quant)  # the default launch hoists whole-page tiles of 16-bit caches
    compile_(dec._decode_split_kernel, ptrs, consts, ("qk_scale",), 4, 3)
for pdl in (True, False):
    compile_(dec._decode_reduce_kernel, dict(mid_o_ptr="fp32", mid_lse_ptr="fp32", out_ptr="bf16"),
             dict(HEAD_DIM_V=128, BLOCK_DV=128, BLOCK_S=16, USE_PDL=pdl), (), 4, 1)
for paged, pack, causal, quant in ((False, 4, True, 0), (True, 1, True, 0), (True, 4, False, 0), (True, 4, True, 8),
                                  (True, 1, True, 4)):
    cache = "u8" if quant else "bf16"
    ptrs = dict(q_ptr="bf16", k_ptr=cache, v_ptr=cache, out_ptr="bf16", q_starts_ptr="i32", kv_ptr_lens="i32",
                block_table_ptr="i32", ks_ptr="bf16", kz_ptr="bf16", vs_ptr="bf16", vz_ptr="bf16")
    consts = dict(GROUP=4, PACK=pack, HEAD_DIM=128, BLOCK_D=128, HEAD_DIM_V=128, BLOCK_DV=128, BLOCK_M=128,
                  BLOCK_N=64, PAGED=paged, PAGE_SIZE=64, CAUSAL=causal, DOT_PRECISION="tf32", WHILE_LOOP=False,
                  QUANT=quant)
    kernel = compile_(pre._prefill_kernel, ptrs, consts, ("qk_scale",), 8, 3)
    assert "wgmma" in kernel.asm["ptx"], "prefill must run on Hopper tensor cores (wgmma)"
print("compiled")
'''


def test_gpu_code_paths_compile_for_sm90():
    """The for-loop (pipelined) code paths the interpreter does not run, compiled for an H100 (sm_90a) on this
    CPU with the ptxas of the triton wheel: catches compile errors (quantized caches included), and checks prefill
    uses wgmma."""
    from sm90 import compile_for_sm90

    compile_for_sm90(_COMPILE_FOR_SM90)


def test_num_splits_rules():
    """One wave (default on GPUs): as many slices as fit in the resident programs, never a second partial wave;
    the older rule reaches target_programs (ceil). Both respect the length bound and MAX_SPLITS."""
    import dataclasses

    from dlinfer.vendor.triton.attention_decode import MAX_SPLITS, DecodeConfig, num_splits

    cfg = DecodeConfig(block_n=64, block_h=16, use_dot=True, num_warps=4, num_stages=2, target_programs=264,
                       min_split_tokens=64, resident_programs=264)
    assert cfg.one_wave
    assert num_splits(1, 8, 4096, cfg) == 33
    assert num_splits(16, 8, 1024, cfg) == 2
    assert num_splits(64, 8, 4096, cfg) == 1
    assert num_splits(1, 8, 100, cfg) == 2
    assert num_splits(1, 1, 1 << 20, cfg) == MAX_SPLITS
    old = dataclasses.replace(cfg, one_wave=False)
    assert num_splits(16, 8, 1024, old) == 3
    assert num_splits(64, 8, 4096, old) == 1
