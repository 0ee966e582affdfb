"""The fused reduce of the Triton paged decode (``DLINFER_TRITON_DECODE="fused_reduce=1"``): the last split
program of each (sequence, KV head) combines the partials itself, so one kernel is launched instead of two. Under
Triton's interpreter, against the reference vendor and against the two-kernel path (the same combine, so the same
bits), with splits forced: empty, one-token and shorter-than-the-splits sequences, GQA 1/4/8, block 16/64,
shuffled block tables, an int8 cache, repeated calls (the arrival counters reset themselves); a spy on the kernel
launches; and the sm_90 compile of the fused split kernel (atomics with acq_rel, shared memory, no spills)."""

from __future__ import annotations

import math

import pytest
import torch

import dlinfer.ops as ops
from dlinfer.vendor import registry
from dlinfer.vendor.triton import attention_decode as ad
from test_attention import close, make_block_table, make_cache, run


@pytest.fixture
def decode_env(monkeypatch):
    """``set(spec)``: rebuild the decode config from ``DLINFER_TRITON_DECODE=spec`` (the config is cached)."""

    def set_spec(spec: str):
        monkeypatch.setenv("DLINFER_TRITON_DECODE", spec)
        ad._config.cache_clear()

    yield set_spec
    ad._config.cache_clear()


def _decode(vendor, query, kc, vc, table, block, lens, max_kv, hq, hk, **kv):
    out = torch.full(query.shape, float("nan"), dtype=query.dtype)
    run(vendor, ops.paged_decode_attention, query, kc, vc, table, block, None, lens, max_kv, hq, hk,
        attn_output=out, **kv)
    return out


def _counters_zero():
    return all(int(t.abs().sum()) == 0 for bufs in ad._COUNTERS.values() for t in bufs)


CASES = [
    # Hq, Hk, D, block, dtype, kv_lens, max_kv (the length bound: sets the split count)
    (2, 2, 64, 16, torch.float32, [0, 1, 37, 90], 256),  # GQA 1 (elementwise), 8 splits: most slices empty
    (8, 2, 64, 64, torch.float16, [1, 0, 200, 33], 256),  # GQA 4, tiles inside a page
    (16, 2, 32, 16, torch.float32, [40, 0, 3, 77, 129], 160),  # GQA 8, 5 splits
    (8, 1, 32, 16, torch.float16, [0], 64),  # only an empty sequence
]


@pytest.mark.parametrize("hq,hk,d,block,dtype,kv_lens,max_kv", CASES)
def test_fused_reduce_matches_reference_and_two_kernels(decode_env, hq, hk, d, block, dtype, kv_lens, max_kv):
    gen = torch.Generator().manual_seed(hq * 100 + block)
    table, num_blocks = make_block_table(kv_lens, block, math.ceil(max_kv / block) + 1, gen)
    kc, vc = make_cache(num_blocks, block, hk, d, d, dtype, False, gen)
    query = torch.randn(len(kv_lens), hq, d, generator=gen).to(dtype)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    args = (query, kc, vc, table, block, lens, max_kv, hq, hk)
    decode_env("target_programs=1024")
    cfg = ad._config("cpu", 0, dtype, d, d, hq // hk)
    splits = ad.num_splits(len(kv_lens), hk, max_kv, cfg)
    assert splits > 1 and not cfg.fused_reduce  # a one-token (or empty) sequence leaves slices empty
    two_kernels = _decode("triton", *args)
    decode_env("fused_reduce=1,target_programs=1024")
    assert ad._config("cpu", 0, dtype, d, d, hq // hk).fused_reduce
    fused = _decode("triton", *args)
    want = _decode("reference", *args)
    close(fused, want, dtype)
    assert torch.equal(fused, two_kernels), "the fused combine must be the reduce kernel's, bit for bit"
    for b, n in enumerate(kv_lens):
        if n == 0:
            assert torch.equal(fused[b], torch.zeros_like(fused[b])), "kv_seqlens == 0 must give a zero row"
    assert _counters_zero(), "the last arriver must reset its counter"


def test_repeated_calls_reset_the_counters(decode_env):
    """Three calls with different inputs (and batches) through the same counter buffer, each checked."""
    decode_env("fused_reduce=1,target_programs=512")
    hq, hk, d, block, dtype = 8, 2, 32, 16, torch.float16
    for call, kv_lens in enumerate(([70, 5, 0], [1, 150], [33, 0, 96, 2])):
        gen = torch.Generator().manual_seed(40 + call)
        table, num_blocks = make_block_table(kv_lens, block, 12, gen)
        kc, vc = make_cache(num_blocks, block, hk, d, d, dtype, call == 1, gen)
        query = torch.randn(len(kv_lens), hq, d, generator=gen).to(dtype)
        lens = torch.tensor(kv_lens, dtype=torch.int32)
        args = (query, kc, vc, table, block, lens, 180, hq, hk)
        assert ad.num_splits(len(kv_lens), hk, 180, ad._config("cpu", 0, dtype, d, d, hq // hk)) == 6
        close(_decode("triton", *args), _decode("reference", *args), dtype)
        assert _counters_zero(), f"call {call}: counters left set"


def test_int8_cache(decode_env):
    from test_kv_quant import _filled

    decode_env("fused_reduce=1,target_programs=512")
    dtype, hq, hk, d, block, lens = torch.float16, 8, 2, 64, 16, [300, 3, 0, 129]
    c = _filled(8, dtype, "triton", lens, hk, d, block, num_blocks=40)
    kv = dict(kv_scales=(c["ksz"][..., 0], c["vsz"][..., 0]), kv_zeros=(c["ksz"][..., 1], c["vsz"][..., 1]),
              quant_bits=8)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(9)).to(dtype)
    args = (q, c["kc"], c["vc"], c["table"], block, torch.tensor(lens, dtype=torch.int32), 320, hq, hk)
    assert ad.num_splits(len(lens), hk, 320, ad._config("cpu", 0, dtype, d, d, hq // hk)) == 10
    got = _decode("triton", *args, **kv)
    want = _decode("reference", *args, **kv)
    close(got, want, dtype)
    assert _counters_zero()


class _LaunchSpy:
    """Stands in for a ``@triton.jit`` kernel and counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("fused", [False, True])
def test_reduce_kernel_is_launched_only_without_fused_reduce(decode_env, monkeypatch, fused):
    split = _LaunchSpy(ad._decode_split_kernel)
    reduce = _LaunchSpy(ad._decode_reduce_kernel)
    monkeypatch.setattr(ad, "_decode_split_kernel", split)
    monkeypatch.setattr(ad, "_decode_reduce_kernel", reduce)
    decode_env(f"fused_reduce={int(fused)},target_programs=256")
    gen = torch.Generator().manual_seed(2)
    kv_lens, block, hq, hk, d = [50, 9], 16, 4, 2, 32
    table, num_blocks = make_block_table(kv_lens, block, 5, gen)
    kc, vc = make_cache(num_blocks, block, hk, d, d, torch.float32, False, gen)
    query = torch.randn(2, hq, d, generator=gen)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    args = (query, kc, vc, table, block, lens, 64, hq, hk)
    assert ad.num_splits(2, hk, 64, ad._config("cpu", 0, torch.float32, d, d, hq // hk)) == 2
    close(_decode("triton", *args), _decode("reference", *args), torch.float32)
    assert (split.launches, reduce.launches) == (1, 0 if fused else 1)
    # one split (a length bound of one tile): the program writes the output, no reduce either way
    short = (query, kc, vc, table, block, torch.tensor([20, 9], dtype=torch.int32), 32, hq, hk)
    close(_decode("triton", *short), _decode("reference", *short), torch.float32)
    assert (split.launches, reduce.launches) == (2, 0 if fused else 1)


def test_arrival_counters_grow_and_stay_alive(monkeypatch):
    monkeypatch.setattr(ad, "_COUNTERS", {})
    cpu = torch.device("cpu")
    first = ad.arrival_counters(cpu, 10)
    assert first.dtype == torch.int32 and first.numel() == ad.MIN_COUNTERS and int(first.abs().sum()) == 0
    assert ad.arrival_counters(cpu, ad.MIN_COUNTERS) is first
    bigger = ad.arrival_counters(cpu, ad.MIN_COUNTERS + 1)
    assert bigger.numel() == 2 * ad.MIN_COUNTERS
    assert ad._COUNTERS[("cpu", 0)] == [first, bigger]  # the old one is kept (a graph may hold its address)
    assert ad.arrival_counters(cpu, 7) is bigger


def test_fused_reduce_switch_parses(monkeypatch):
    monkeypatch.setenv("DLINFER_TRITON_DECODE", "fused_reduce=1")
    cfg = ad.DecodeConfig(block_n=64, block_h=16, use_dot=True, num_warps=4, num_stages=2, target_programs=264,
                          min_split_tokens=64)
    assert not cfg.fused_reduce
    assert ad.env_overrides(cfg, "DLINFER_TRITON_DECODE").fused_reduce is True


_COMPILE_FUSED = r'''
import os, re, subprocess, tempfile
import triton
from sm90 import compile_sm90
from dlinfer.vendor.triton import attention_decode as dec

kernels = []
real_compile = triton.compile
def keep(*args, **kwargs):
    kernels.append(real_compile(*args, **kwargs))
    return kernels[-1]
triton.compile = keep
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
for dt, group, use_dot, page, quant, stages in (("bf16", 4, True, 64, 0, 3), ("bf16", 1, True, 16, 0, 3),
                                               ("fp32", 1, False, 16, 0, 2), ("bf16", 8, True, 64, 8, 3)):
    cache = "u8" if quant else dt
    types = dict(q_ptr="*" + dt, k_ptr="*" + cache, v_ptr="*" + cache, block_table_ptr="*i32",
                 kv_lens_ptr="*i32", out_ptr="*" + dt, mid_o_ptr="*fp32", mid_lse_ptr="*fp32", counter_ptr="*i32",
                 ks_ptr="*" + dt, kz_ptr="*" + dt, vs_ptr="*" + dt, vz_ptr="*" + dt, qk_scale="fp32")
    consts = dict(GROUP=group, BLOCK_H=16 if use_dot else 1, HEAD_DIM=128, BLOCK_D=128, HEAD_DIM_V=128,
                  BLOCK_DV=128, PAGE_SIZE=page, BLOCK_N=64, USE_DOT=use_dot, DIRECT=False,
                  DOT_PRECISION="ieee" if dt == "fp32" else "tf32", WHILE_LOOP=False, PAGE_TILES=page % 64 == 0,
                  USE_PDL=False, QUANT=quant, FUSED_REDUCE=True, BLOCK_S=64, HOIST=False)
    shared, _ = compile_sm90(dec._decode_split_kernel, types, consts, num_warps=4, num_stages=stages)
    assert shared <= 227 * 1024, (dt, group, shared)
    ptx = kernels[-1].asm["ptx"]
    atoms = [line for line in ptx.splitlines() if "atom." in line]
    assert atoms and all(".acq_rel" in a and ".gpu" in a for a in atoms), atoms
    lines = ptx.splitlines()
    arrive = next(i for i, line in enumerate(lines) if "atom." in line)
    last_store = max(i for i, line in enumerate(lines[:arrive]) if "st.global" in line)
    assert any("bar.sync" in line for line in lines[last_store:arrive]), "no CTA barrier between stores and atom"
    first_load = next(i for i, line in enumerate(lines) if i > arrive and "ld.global" in line)
    assert any("bar.sync" in line for line in lines[arrive:first_load]), "no CTA barrier between atom and loads"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        open(src, "w").write(ptx)
        done = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stderr)]
    assert spills and not any(spills), done.stderr
    print(dt, group, quant, "shared", shared, atoms[0].strip(), done.stderr.strip().splitlines()[-1])
print("compiled")
'''


def test_fused_split_kernel_compiles_for_sm90():
    """The fused split kernel compiled for sm_90a on this CPU: shared memory within 227 KB, the arrival is an
    ``atom`` with ``.acq_rel`` at ``.gpu`` scope after a CTA barrier, and ptxas reports no spills."""
    from sm90 import compile_for_sm90

    compile_for_sm90(_COMPILE_FUSED)
