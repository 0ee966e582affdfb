"""Decode variants swept by benchmarks/tune_attention.py (``DLINFER_TRITON_DECODE``), under Triton's interpreter:
the default hoisted addressing (a tile's K/V addresses as one scalar page base plus row offsets made once, K loaded
without a mask) gives the per-tile addressing's bits (``hoist_addr=0``); ``pow2_splits=1`` rounds the split count
down to a power of two; the reduce kernel's warps follow its program count."""

from __future__ import annotations

import math

import pytest
import torch

import dlinfer.ops as ops
from dlinfer.vendor.triton import attention_decode as ad
from test_attention import close, make_block_table, make_cache, run
from test_decode_fused_reduce import decode_env  # noqa: F401 - the fixture


CASES = [
    # Hq, Hk, D, Dv, block, dtype, strided, kv_lens, max_kv (the interpreter tiles 32 tokens: pages of 64/128 hold
    # whole tiles; D 80 (not a power of two) and pages of 16 (smaller than a tile) take the per-tile addressing
    # either way)
    (8, 2, 64, 64, 64, torch.float16, True, [1, 0, 200, 33], 256),
    (8, 2, 64, 64, 128, torch.float16, False, [128, 0, 129, 300], 330),
    (16, 2, 32, 32, 64, torch.float32, True, [40, 0, 3, 77, 129], 160),
    (8, 1, 80, 80, 64, torch.float32, False, [130, 5, 0], 160),
    (8, 1, 64, 32, 64, torch.float16, False, [70, 1], 100),
    (8, 2, 64, 64, 16, torch.float16, True, [17, 0, 80], 110),  # pages smaller than a tile: per-tile addressing
]


@pytest.mark.parametrize("hq,hk,d,dv,block,dtype,strided,kv_lens,max_kv", CASES)
@pytest.mark.parametrize("splits", ["target_programs=1024", "target_programs=1"])
def test_hoisted_addressing_gives_the_same_bits(decode_env, hq, hk, d, dv, block, dtype, strided, kv_lens, max_kv,
                                                splits):
    gen = torch.Generator().manual_seed(hq * 10 + block + d)
    table, num_blocks = make_block_table(kv_lens, block, math.ceil(max_kv / block) + 1, gen)
    kc, vc = make_cache(num_blocks, block, hk, d, dv, dtype, strided, gen)
    query = torch.randn(len(kv_lens), hq, d, generator=gen).to(dtype)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    outs = {}
    for name, spec in (("per_tile", f"hoist_addr=0,{splits}"), ("hoisted", splits), ("reference", splits)):
        decode_env(spec)
        out = torch.full((len(kv_lens), hq, dv), float("nan"), dtype=dtype)
        run("reference" if name == "reference" else "triton", ops.paged_decode_attention, query, kc, vc, table,
            block, None, lens, max_kv, hq, hk, head_size_v=dv, attn_output=out)
        outs[name] = out
    close(outs["hoisted"], outs["reference"], dtype)
    assert torch.equal(outs["hoisted"], outs["per_tile"]), "hoisted addressing must load the same values"


def test_the_default_launch_hoists_where_it_can(decode_env, monkeypatch):
    """The default config hoists (on the GPU's and the interpreter's), and a launch takes it exactly where the
    tile lies in one page of an unquantized cache with power-of-two head sizes."""
    from dlinfer.vendor.triton import host

    cfg = ad._config("cpu", 0, torch.float16, 64, 64, 4)
    assert cfg.hoist_addr
    ad._config.cache_clear()
    ad._card_stages.cache_clear()
    try:
        with host.simulate(host.CARDS["H100"]):
            assert ad._config("cuda", 0, torch.bfloat16, 128, 128, 4).hoist_addr
    finally:
        ad._config.cache_clear()
        ad._card_stages.cache_clear()
    assert ad.hoisted(cfg, True, 0, 64, 64) and ad.hoisted(cfg, True, 0, 64, 32)
    assert not ad.hoisted(cfg, False, 0, 64, 64)  # a tile over several pages
    assert not ad.hoisted(cfg, True, 8, 64, 64) and not ad.hoisted(cfg, True, 0, 80, 80)
    # the launch: HOIST reaches the kernel for a whole-page tile, not for pages of 16
    seen = []
    real = ad._decode_split_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["HOIST"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(ad, "_decode_split_kernel", Spy())
    gen = torch.Generator().manual_seed(3)
    for block in (64, 16):
        table, num_blocks = make_block_table([40, 70], block, math.ceil(100 / block) + 1, gen)
        kc, vc = make_cache(num_blocks, block, 2, 64, 64, torch.float16, False, gen)
        query = torch.randn(2, 8, 64, generator=gen).to(torch.float16)
        run("triton", ops.paged_decode_attention, query, kc, vc, table, block, None,
            torch.tensor([40, 70], dtype=torch.int32), 100, 8, 2)
    assert seen == [True, False]


def test_hoisted_addressing_ignores_garbage_past_the_end(decode_env):
    """Rows past a sequence's end in its last page are read unmasked (K) or masked (V): NaN there changes nothing."""
    gen = torch.Generator().manual_seed(5)
    hq, hk, d, block, kv_lens = 8, 2, 64, 64, [70, 33]
    table, num_blocks = make_block_table(kv_lens, block, 3, gen)
    kc, vc = make_cache(num_blocks, block, hk, d, d, torch.float16, False, gen)
    query = torch.randn(2, hq, d, generator=gen).to(torch.float16)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    want = run("reference", ops.paged_decode_attention, query, kc, vc, table, block, None, lens, 128, hq, hk)
    for b, n in enumerate(kv_lens):
        page = int(table[b, n // block])
        kc[page, n % block:] = float("nan")
        vc[page, n % block:] = float("nan")
    decode_env("target_programs=1024")
    got = run("triton", ops.paged_decode_attention, query, kc, vc, table, block, None, lens, 128, hq, hk)
    close(got, want, torch.float16)


def test_pow2_splits():
    cfg = ad.DecodeConfig(block_n=64, block_h=16, use_dot=True, num_warps=4, num_stages=2, target_programs=396,
                          min_split_tokens=64, one_wave=False, pow2_splits=True)
    # LMDeploy's counts on 132 SMs (Hk 8): batch 1 -> 16 (ctx 1k, one tile each), 32, 32; batch 16 -> 4
    assert [ad.num_splits(1, 8, n, cfg) for n in (1024, 4096, 16384)] == [16, 32, 32]
    assert [ad.num_splits(16, 8, n, cfg) for n in (1024, 4096, 16384)] == [4, 4, 4]
    assert ad.num_splits(64, 8, 4096, cfg) == 1 and ad.num_splits(1, 8, 3000, cfg) == 32
    plain = ad.DecodeConfig(block_n=64, block_h=16, use_dot=True, num_warps=4, num_stages=2, target_programs=396,
                            min_split_tokens=64, one_wave=False)
    assert [ad.num_splits(1, 8, n, plain) for n in (4096, 3000)] == [50, 47]


_COMPILE_HOISTED = r'''
import os, re, subprocess, tempfile
import triton
from sm90 import compile_for
from dlinfer.vendor.triton import attention_decode as dec

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
types = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", block_table_ptr="*i32", kv_lens_ptr="*i32", out_ptr="*bf16",
             mid_o_ptr="*fp32", mid_lse_ptr="*fp32", counter_ptr="*i32", ks_ptr="*bf16", kz_ptr="*bf16",
             vs_ptr="*bf16", vz_ptr="*bf16", qk_scale="fp32")
for stages in (2, 3):
    consts = dict(GROUP=4, BLOCK_H=16, HEAD_DIM=128, BLOCK_D=128, HEAD_DIM_V=128, BLOCK_DV=128, PAGE_SIZE=64,
                  BLOCK_N=64, USE_DOT=True, DIRECT=False, DOT_PRECISION="tf32", WHILE_LOOP=False, PAGE_TILES=True,
                  USE_PDL=True, QUANT=0, FUSED_REDUCE=False, BLOCK_S=1, HOIST=True)
    kernel = compile_for(dec._decode_split_kernel, types, consts, num_warps=4, num_stages=stages)
    assert kernel.metadata.shared <= 227 * 1024, kernel.metadata.shared
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        open(src, "w").write(kernel.asm["ptx"])
        done = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stderr)]
    assert spills and not any(spills), done.stderr
    assert kernel.asm["ttgir"].count("async_copy_global_to_local") >= 4, "K/V loads not pipelined"
    print(stages, "shared", kernel.metadata.shared, done.stderr.strip().splitlines()[-1])
print("compiled")
'''


def test_hoisted_split_kernel_compiles_for_sm90():
    """The hoisted split kernel (bf16, GQA 4, D 128, page 64) for sm_90a on this CPU, 2 and 3 stages: shared memory
    within 227 KB, K/V still cp.async-pipelined, no spills."""
    from sm90 import compile_for_sm90

    compile_for_sm90(_COMPILE_HOISTED)


def test_reduce_warps_follow_the_program_count():
    """Few reduce programs (batch 1): the wide reduce; from ``reduce_many_programs`` (B x Hq, two per SM on a GPU)
    on: the narrow one."""
    from dlinfer.vendor.triton import host

    ad._config.cache_clear()
    ad._card_stages.cache_clear()
    try:
        with host.simulate(host.CARDS["H100"]):
            cfg = ad._config("cuda", 0, torch.bfloat16, 128, 128, 4)
    finally:
        ad._config.cache_clear()
        ad._card_stages.cache_clear()
    assert cfg.reduce_many_programs == 2 * host.CARDS["H100"].sm_count == 264
    assert [ad.reduce_warps(cfg, b, 32) for b in (1, 8, 9, 16, 256)] == [4, 4, 2, 2, 2]
    never = ad.DecodeConfig(block_n=64, block_h=16, use_dot=True, num_warps=4, num_stages=2, target_programs=264,
                            min_split_tokens=64)
    assert ad.reduce_warps(never, 256, 64) == 4
