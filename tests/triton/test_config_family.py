"""Every launch config the Triton vendor would choose, for a family of shapes nobody tuned and on the cards users
have, compiles and fits the card's shared memory.

The vendor's own config functions are asked what they would launch (``host.simulate`` answers each card model's
facts: major capability, SM count, shared memory per block and per SM), for dense attention (head sizes 64-256
incl. 80/96/112/192, GQA 1-16, page sizes 16-128, batch 1-256, context up to 32k), the fused MoE (E 8-256, top-k
1-8, hidden 2-7k, intermediate 512-14336, every token bucket up to 8192, the hot experts' tiles), the quantized
GEMMs (AWQ groups 32/64/128, W8A8 dense and MoE) and the element-wise kernels. The distinct (kernel, constexprs,
warps, stages) combinations are compiled for each card's architecture with the triton wheel's ptxas, in one
subprocess, and each one's ``metadata.shared`` must be within the card's per-block limit; ptxas' register and
spill counts are recorded.

Cost: by default the A100 and L40S models (the cards whose 163 / 99 KB the sm_90-measured configs must be fitted
to), one representative per shared-memory class (the constexprs that only move masks, addresses or loop trip
counts, such as the exact head size within its power of two, the GQA ratio within its padded tile or K, are
dropped from the key): about 250 compiles, 3 minutes on two cores. ``DLINFER_CONFIG_FAMILY=cards`` adds the
RTX 4090, H100, H200 and B200 at their own architectures (about 730 compiles, 11 minutes);
``DLINFER_CONFIG_FAMILY=all`` compiles every distinct combination of every card (about 25,000: hours; slice it
with ``python tests/triton/test_config_family.py --all --cards L40S --families moe``, which prints the table of
shared memory, registers and spills and can write it as JSON).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import pytest
import torch

from dlinfer.vendor.triton import (activation, attention_decode as dec, attention_prefill as pre, host, kv_cache, moe,
                                   norm, quant, rotary, tuning)

# ------------------------------------------------------------------------------------------- the card models

#: card model -> the architecture its kernels compile for (NVIDIA sm_XY -> XY)
ARCH = {"A100": 80, "L40S": 89, "RTX 4090": 89, "H100": 90, "H200": 90, "B200": 100}
# The default run: the sm_8x cards, whose 99 / 163 KB the sm_90-measured configs must be fitted to (their launches
# compiled for sm_89 and checked against both limits). DLINFER_CONFIG_FAMILY=cards adds the RTX 4090, H100, H200
# and B200, each compiled for its own architecture (about 11 minutes on two cores); =all compiles every distinct
# combination instead of one per class.
CI_CARDS = ("A100", "L40S")
ALL_CARDS = tuple(ARCH)

# ------------------------------------------------------------------------------------------- the shape family

DTYPES = (torch.bfloat16, torch.float32)
HEADS = ((64, 64), (80, 80), (96, 96), (112, 112), (128, 128), (192, 192), (256, 256), (192, 128))
GROUPS = (1, 3, 4, 5, 7, 8, 16)
PAGES = (16, 32, 64, 128)
DECODE_RUNS = ((1, 32768), (4, 4096), (16, 1024), (64, 4096), (256, 2048), (1, 128))  # (batch, max context)
PREFILL_RUNS = ((1, 16, 32768), (1, 256, 16384), (4, 2048, 2048), (8, 512, 4096), (1, 8192, 8192))  # (B, q, kv)
MOE_SHAPES = ((8, 2, 4096, 14336), (16, 2, 4096, 6400), (64, 6, 2048, 1408), (64, 1, 4096, 1024),
              (160, 6, 5120, 1536), (128, 8, 2048, 768), (256, 8, 7168, 2048), (32, 4, 2880, 2880))
MOE_TOKENS = tuple(1 << i for i in range(14))  # 1 ... 8192
GEMM_SHAPES = ((2048, 2048), (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (5120, 5120),
               (8192, 8192), (2880, 2880), (13824, 5120))  # (N, K)
GEMM_ROWS = (1, 16, 64, 256, 1024, 8192)
AWQ_GROUPS = (32, 64, 128)
HIDDENS = (2048, 2880, 4096, 5120, 7168, 8192)

# constexprs that move only masks, addresses, loop trip counts or which pointer the epilogue stores to, not the
# tiles staged in shared memory: dropped from the class key of the default run (the exhaustive run keeps them)
SHAPE_ONLY = {"GROUP", "HEAD_DIM", "HEAD_DIM_V", "PAGE_SIZE", "PAGE_TILES", "EB", "GROUP_M", "K", "ITERS", "MAGIC",
              "NUM_HEADS", "USE_PDL", "EVEN_K", "EVEN_N", "BLOCK_S", "DIRECT", "TOPK", "HAS_ZEROS", "PACK", "PAGED"}

T = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: str  # "module.attribute" under dlinfer.vendor.triton
    types: tuple  # (argument, Triton type) pairs for the non-constexpr arguments that are not i32
    consts: tuple  # (name, value) pairs
    num_warps: int
    num_stages: int

    def key(self, exhaustive: bool) -> tuple:
        if exhaustive:
            return self.kernel, self.types, self.consts, self.num_warps, self.num_stages
        consts = tuple((k, v) for k, v in self.consts if k not in SHAPE_ONLY)
        if dict(self.consts).get("SPLIT_K") is not None:  # split or not (the epilogue), not how many
            consts = tuple((k, min(v, 2) if k == "SPLIT_K" else v) for k, v in consts)
        return self.kernel, self.types, consts, self.num_warps, self.num_stages


def _launch(kernel: str, types: dict, consts: dict, num_warps: int, num_stages: int = 3) -> Launch:
    return Launch(kernel, tuple(sorted(types.items())), tuple(sorted(consts.items())), num_warps, num_stages)


@contextlib.contextmanager
def model(name: str):
    """The config functions see card ``name`` (``host.CARDS``) as CUDA device 0, on this CPU; their memos are
    cleared before and after."""
    facts = host.CARDS[name]
    saved = torch.cuda.is_current_stream_capturing
    memos = (dec._config, dec._card_stages, pre._config, quant.awq_config, quant.int8_config)

    def clear():
        for fn in memos:
            fn.cache_clear()
        tuning._memo.clear()
        tuning._hot_memo.clear()

    clear()
    torch.cuda.is_current_stream_capturing = lambda: False
    try:
        with host.simulate(facts):
            yield facts
    finally:
        torch.cuda.is_current_stream_capturing = saved
        clear()


# ------------------------------------------------------------------------------------------- what would launch

def decode_launches(exhaustive: bool):
    cuda = torch.device("cuda", 0)
    for dtype in DTYPES + ((torch.float16,) if exhaustive else ()):
        for d, dv in HEADS:
            for group in GROUPS:
                for page in PAGES:
                    for quant_bits in (0, 8, 4):
                        if quant_bits == 4 and (d % 2 or dv % 2):
                            continue
                        cfg = dec._config("cuda", 0, dtype, d, dv, group)
                        for batch, ctx in DECODE_RUNS:
                            for hk in (1, 8):
                                splits = dec.num_splits(batch, hk, ctx, cfg)
                                direct = splits == 1
                                fused = cfg.fused_reduce and not direct
                                pdl = cfg.pdl and not direct and not fused
                                cache = "u8" if quant_bits else T[dtype]
                                yield _launch("attention_decode._decode_split_kernel", dict(
                                    q_ptr="*" + T[dtype], k_ptr="*" + cache, v_ptr="*" + cache, out_ptr="*" + T[dtype],
                                    block_table_ptr="*i32", kv_lens_ptr="*i32", mid_o_ptr="*fp32",
                                    mid_lse_ptr="*fp32", counter_ptr="*i32", ks_ptr="*" + T[dtype],
                                    kz_ptr="*" + T[dtype], vs_ptr="*" + T[dtype], vz_ptr="*" + T[dtype],
                                    qk_scale="fp32"), dict(
                                    GROUP=group, BLOCK_H=cfg.block_h, HEAD_DIM=d, BLOCK_D=host.next_power_of_2(d),
                                    HEAD_DIM_V=dv, BLOCK_DV=host.next_power_of_2(dv), PAGE_SIZE=page,
                                    BLOCK_N=cfg.block_n, USE_DOT=cfg.use_dot, DIRECT=direct,
                                    DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", WHILE_LOOP=False,
                                    PAGE_TILES=cfg.page_tiles and page % cfg.block_n == 0, USE_PDL=pdl,
                                    QUANT=quant_bits, FUSED_REDUCE=fused,
                                    BLOCK_S=host.next_power_of_2(splits) if fused else 1,
                                    HOIST=dec.hoisted(cfg, cfg.page_tiles and page % cfg.block_n == 0, quant_bits,
                                                      d, dv)),
                                    cfg.num_warps, cfg.split_stages if splits > 1 else cfg.num_stages)
                                if not direct and not fused:
                                    yield _launch("attention_decode._decode_reduce_kernel", dict(
                                        mid_o_ptr="*fp32", mid_lse_ptr="*fp32", out_ptr="*" + T[dtype]), dict(
                                        HEAD_DIM_V=dv, BLOCK_DV=host.next_power_of_2(dv),
                                        BLOCK_S=host.next_power_of_2(splits), USE_PDL=pdl),
                                        dec.reduce_warps(cfg, batch, hk * group), 3)
    del cuda


def prefill_launches(exhaustive: bool):
    for dtype in DTYPES + ((torch.float16,) if exhaustive else ()):
        for d, dv in HEADS:
            for group in GROUPS:
                for batch, q_len, kv_len in PREFILL_RUNS:
                    cfg = pre._config("cuda", dtype, d, dv, q_len >= pre.LONG_QUERIES, 0)
                    pack = pre._pack(cfg, group)
                    hq = 8 * group
                    programs = host.cdiv(q_len, cfg.block_m // pack) * (hq // pack) * batch
                    for paged, page, quant_bits in ((False, 1, 0), (True, 16, 0), (True, 64, 8), (True, 128, 4)):
                        if quant_bits == 4 and (d % 2 or dv % 2):  # a 4-bit cache packs two columns a byte
                            continue
                        splits = pre.num_splits(programs, kv_len if paged else q_len, cfg)
                        cache = "u8" if quant_bits else T[dtype]
                        types = dict(q_ptr="*" + T[dtype], k_ptr="*" + cache, v_ptr="*" + cache,
                                     q_starts_ptr="*i32", kv_ptr_lens="*i32", block_table_ptr="*i32",
                                     ks_ptr="*" + T[dtype], kz_ptr="*" + T[dtype], vs_ptr="*" + T[dtype],
                                     vz_ptr="*" + T[dtype], qk_scale="fp32")
                        meta = dict(pre._meta(group, pack, d, dv, cfg.block_m, cfg.block_n, cfg.num_warps,
                                              cfg.num_stages, paged, page, True,
                                              "tf32x3" if dtype == torch.float32 else "tf32", False, quant_bits))
                        warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
                        if splits == 1:
                            yield _launch("attention_prefill._prefill_kernel", dict(types, out_ptr="*" + T[dtype]),
                                          meta, warps, stages)
                            continue
                        pdl = cfg.pdl and host.has_pdl("cuda", 0)
                        yield _launch("attention_prefill._prefill_split_kernel",
                                      dict(types, mid_o_ptr="*fp32", mid_lse_ptr="*fp32"), dict(meta, USE_PDL=pdl),
                                      warps, stages)
                        yield _launch("attention_prefill._prefill_combine_kernel", dict(
                            mid_o_ptr="*fp32", mid_lse_ptr="*fp32", out_ptr="*" + T[dtype], q_starts_ptr="*i32"), dict(
                            NUM_HEADS=hq, HEAD_DIM_V=dv, BLOCK_DV=host.next_power_of_2(dv), BLOCK_R=cfg.combine_rows,
                            WHILE_LOOP=False, USE_PDL=pdl), cfg.combine_warps, 2)


def _moe_gemm(cfg: dict, block_m: int, gemm: str, dtype, hot: bool, experts: int, k_dim: int, w8a8: bool) -> Launch:
    c = cfg[gemm]
    block_k = c["BLOCK_K"]
    precision = "tf32"
    if dtype == torch.float32 and not w8a8:  # moe._operands
        precision, block_k = "ieee", max(16, block_k // 2)
    consts = dict(BLOCK_M=block_m, BLOCK_N=c["BLOCK_N"], BLOCK_K=block_k, GROUP_M=c["GROUP_M"],
                  EB=host.next_power_of_2(experts), HOT=hot, SILU=gemm == "up", EVEN_K=k_dim % block_k == 0,
                  WHILE_LOOP=False)
    if w8a8:
        types = dict(a_ptr="*i8", a_scale_ptr="*fp32", w_ptr="*i8", w_scale_ptr="*fp32",
                     out_ptr="*" + (T[dtype] if gemm == "up" else "fp32"), sorted_ptr="*i32", meta_ptr="*i32")
        return _launch("quant._moe_w8a8_gemm_kernel", types, consts, c["num_warps"], c["num_stages"])
    # the default path (no Hopper fields set in the tables and tiers; the autotune candidates with them run only
    # where they are measured)
    consts.update(PRECISION=precision, TMA_A=False, TMA_B=False, PERSISTENT=False, WS=False, SORTED_OUT=False,
                  SPLIT_UP=False, a_desc=None, w_desc=None, stride_wk=1)  # K-fastest weights, as the tables run
    types = dict(a_ptr="*" + T[dtype], w_ptr="*" + T[dtype], out_ptr="*" + T[dtype], sorted_ptr="*i32",
                 meta_ptr="*i32")
    return _launch("moe._moe_gemm_kernel", types, consts, c["num_warps"], c["num_stages"])


def _moe_classes(cfg: dict, hot_cfg: dict | None, tokens: int):
    """(hot, BLOCK_M, config) of the GEMM launches fused_moe makes (its hot-experts rule)."""
    block_m = cfg["BLOCK_M"]
    out = [(False, block_m, cfg)]
    hot_cfg = tuning.hot_class(cfg, hot_cfg, tokens)[0]
    if hot_cfg is not None:
        out.append((True, hot_cfg["BLOCK_M"], hot_cfg))
    return out


def moe_launches(exhaustive: bool):
    cuda = torch.device("cuda", 0)
    for dtype in DTYPES + ((torch.float16,) if exhaustive else ()):
        for experts, topk, hidden, inter in MOE_SHAPES:
            for tokens in MOE_TOKENS:
                cfg = tuning.launch_config(cuda, dtype, experts, topk, hidden, inter, tokens)
                hot_cfg = tuning.hot_config(cuda, dtype, experts, topk, hidden, inter, tokens, above=cfg["BLOCK_M"])
                for hot, block_m, c in _moe_classes(cfg, hot_cfg, tokens):
                    yield _moe_gemm(c, block_m, "up", dtype, hot, experts, hidden, False)
                    yield _moe_gemm(c, block_m, "down", dtype, hot, experts, inter, False)
                if dtype == torch.float32:
                    continue
                w8 = quant.w8a8_launch_config(tokens, experts, topk, cuda)
                for hot, block_m, c in _moe_classes(w8, w8["hot"], tokens):
                    yield _moe_gemm(c, block_m, "up", dtype, hot, experts, hidden, True)
                    yield _moe_gemm(c, block_m, "down", dtype, hot, experts, inter, True)
    # the autotune's candidates (tried on cards without a table): each must launch, or it is time wasted
    first = tuning.static_config(tuning.card_name(cuda), torch.bfloat16, 8, 2, 4096, 14336, 64, cuda)[0]
    for cand in tuning.candidates(first, torch.bfloat16, cuda):
        if not any(cand.get(f, 0) for f in tuning.FLAGS):
            yield _moe_gemm(cand, cand["BLOCK_M"], "up", torch.bfloat16, True, 8, 4096, False)
            yield _moe_gemm(cand, cand["BLOCK_M"], "down", torch.bfloat16, True, 8, 14336, False)


def gemm_launches(exhaustive: bool):
    for n, k in GEMM_SHAPES:
        for m in GEMM_ROWS:
            bucket = quant._bucket(m)
            for dtype in DTYPES + ((torch.float16,) if exhaustive else ()):
                for group in AWQ_GROUPS:
                    if k % group:
                        continue
                    c = quant.awq_config("cuda", 0, dtype, bucket, n, k, group)
                    if c.dequant:  # the weights dequantized by a streaming kernel, then torch's GEMM
                        yield _launch("quant._awq_dequant_kernel", dict(
                            qw_ptr="*i32", s_ptr="*" + T[dtype], z_ptr="*i32", w_ptr="*" + T[dtype]), dict(
                            GROUP=group, HAS_ZEROS=True, MAGIC=quant._AWQ_MAGIC[dtype], BLOCK_K=64, BLOCK_N=128), 4)
                        continue
                    yield _launch("quant._awq_gemm_kernel", dict(
                        x_ptr="*" + T[dtype], qw_ptr="*i32", s_ptr="*" + T[dtype], z_ptr="*i32", b_ptr="*" + T[dtype],
                        out_ptr="*" + T[dtype], ws_ptr="*fp32"), dict(
                        K=k, GROUP=group, HAS_ZEROS=True, HAS_BIAS=False, IEEE=dtype == torch.float32,
                        MAGIC=quant._AWQ_MAGIC[dtype], BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                        GROUP_M=c.group_m, SPLIT_K=c.split_k, ITERS=host.cdiv(host.cdiv(k, c.block_k), c.split_k),
                        EVEN_N=n % c.block_n == 0, USE_PDL=c.split_k > 1 and host.has_pdl("cuda", 0)),
                        c.num_warps, c.num_stages)
            c = quant.int8_config("cuda", 0, bucket, n, k)
            yield _launch("quant._int8_gemm_kernel", dict(
                a_ptr="*i8", b_ptr="*i8", out_ptr="*bf16", ws_ptr="*i32", row_scale_ptr="*fp32",
                col_scale_ptr="*fp32", qbias_ptr="*fp32", bias_ptr="*bf16"), dict(
                K=k, HAS_ROW_SCALE=True, HAS_QBIAS=False, HAS_BIAS=False, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                BLOCK_K=c.block_k, GROUP_M=c.group_m, SPLIT_K=c.split_k,
                ITERS=host.cdiv(host.cdiv(k, c.block_k), c.split_k), TMA=False, a_desc=None, b_desc=None,
                USE_PDL=c.split_k > 1 and host.has_pdl("cuda", 0)), c.num_warps, c.num_stages)


def elementwise_launches(exhaustive: bool):
    bf = "*bf16"
    for hidden in HIDDENS + (128, 14336):
        block, rows, warps = norm._launch_config(hidden)
        for residual in (False, True):
            yield _launch("norm._rms_norm_kernel", dict(x_ptr=bf, res_ptr=bf, w_ptr=bf, out_ptr=bf, sum_ptr=bf,
                                                        eps="fp32"), dict(HAS_RESIDUAL=residual, ROWS=rows,
                                                                          BLOCK=block), warps)
            yield _launch("quant._row_quant_kernel", dict(x_ptr=bf, res_ptr=bf, w_ptr=bf, q_ptr="*i8",
                                                          scale_ptr="*fp32", sum_ptr=bf, eps="fp32"),
                          dict(HAS_RESIDUAL=residual, NORM=True, BLOCK=host.next_power_of_2(hidden)),
                          max(1, min(16, host.next_power_of_2(hidden) // 512)))
        block, warps = activation._launch_config(hidden)
        yield _launch("activation._silu_and_mul_kernel", dict(x_ptr=bf, out_ptr=bf), dict(BLOCK=block), warps)
        yield _launch("moe._moe_combine_kernel", dict(y_ptr=bf, w_ptr="*fp32", out_ptr=bf),
                      dict(RENORMALIZE=True, KB=8, BLOCK_H=min(moe.COMBINE_BLOCK_H, host.next_power_of_2(hidden))),
                      moe.COMBINE_NUM_WARPS)
    for d, dv in HEADS:
        for hq, hk in ((8, 8), (24, 8), (40, 8), (56, 8), (64, 4)):
            half, heads_q, heads_k, warps = rotary.launch_config(hq, hk, d)
            yield _launch("rotary._rotary_kernel", dict(q_ptr=bf, k_ptr=bf, cos_ptr=bf, sin_ptr=bf),
                          dict(HEADS_Q=heads_q, HEADS_K=heads_k, HALF=half), warps)
            yield _launch("fused_rotary_kv._rotary_fill_kv_kernel", dict(
                q_ptr=bf, k_ptr=bf, v_ptr=bf, kc_ptr=bf, vc_ptr=bf, cos_ptr=bf, sin_ptr=bf, slot_ptr="*i32"),
                dict(HEADS_Q=heads_q, HEADS_K=heads_k, HALF=half, DV=host.next_power_of_2(dv)), warps)
            heads, d_block, dv_block, warps = kv_cache.launch_config(hk, d, dv)
            yield _launch("kv_cache._fill_kv_cache_kernel", dict(k_ptr=bf, v_ptr=bf, kc_ptr=bf, vc_ptr=bf,
                                                                 slot_ptr="*i64"),
                          dict(HEADS=heads, D=d_block, DV=dv_block), warps)
    for experts, topk, _, _ in MOE_SHAPES:
        eb = host.next_power_of_2(experts)
        rows = max(1, min(moe.GATING_MAX_ROWS, moe.GATING_TILE // eb))
        yield _launch("moe._gating_kernel", dict(logits_ptr=bf, weights_ptr="*fp32", ids_ptr="*i64"),
                      dict(TOPK=topk, ROWS=rows, EB=eb), 4 if rows * eb >= 1024 else 1)
        chunk = max(16, min(moe.SORT_MAX_CHUNK, moe.SORT_TILE // eb))
        ids = dict(ids_ptr="*i64", rank_ptr="*i32", hist_ptr="*i32", sorted_ptr="*i32", meta_ptr="*i32")
        yield _launch("moe._moe_histogram_kernel", ids, dict(CHUNK=chunk, EB=eb), moe.SORT_NUM_WARPS)
        for single in (False, True):
            yield _launch("moe._moe_scatter_kernel", ids, dict(CHUNK=chunk, EB=eb, CB=moe.SORT_CHUNKS_PER_STEP,
                                                               BLOCK_M=16, HOT_BLOCK_M=128, SINGLE_CHUNK=single,
                                                               WHILE_LOOP=False), moe.SORT_NUM_WARPS)


FAMILIES = {"decode": decode_launches, "prefill": prefill_launches, "moe": moe_launches, "gemm": gemm_launches,
            "elementwise": elementwise_launches}


def launches(card: str, exhaustive: bool = False, families=tuple(FAMILIES)) -> dict[tuple, Launch]:
    """The distinct launches (one per class, or every one with ``exhaustive``) card model ``card`` would make for
    the shape family."""
    out: dict[tuple, Launch] = {}
    with model(card):
        for fam in families:
            for launch in FAMILIES[fam](exhaustive):
                out.setdefault(launch.key(exhaustive), launch)
    return out


# ------------------------------------------------------------------------------------------- compile them

_COMPILE = r'''
import contextlib, importlib, io, json, re, sys, time
from triton import knobs
from sm90 import compile_for

jobs = json.load(sys.stdin)
knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills, printed per compile
for arch, kernel, types, consts, warps, stages in jobs:
    module, name = kernel.split(".")
    fn = getattr(importlib.import_module("dlinfer.vendor.triton." + module), name)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            k = compile_for(fn, dict(types), dict(consts), warps, stages, arch=arch)
        text = log.getvalue()
        regs = re.search(r"Used (\d+) registers", text)
        spills = re.search(r"(\d+) bytes spill stores", text)
        res = dict(shared=k.metadata.shared, regs=int(regs.group(1)) if regs else None,
                   spills=int(spills.group(1)) if spills else None)
    except Exception as exc:  # noqa: BLE001 - reported per launch
        res = dict(error=f"{type(exc).__name__}: {str(exc)[-600:]}")
    res["s"] = round(time.perf_counter() - t0, 2)
    print("RESULT " + json.dumps(res), flush=True)
'''


def compile_all(jobs: list[tuple[int, Launch]], timeout: int = 3000) -> list[dict]:
    """Compile ``(arch, launch)`` jobs in one subprocess (no interpreter, a fresh Triton cache so ptxas runs and
    reports registers and spills); one result dict per job (``shared``/``regs``/``spills`` or ``error``)."""
    import subprocess
    import tempfile

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"no ptxas in the triton wheel ({ptxas})")
    payload = json.dumps([(arch, l.kernel, l.types, l.consts, l.num_warps, l.num_stages) for arch, l in jobs])
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = cache
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__))]
                                            + [p for p in [env.get("PYTHONPATH")] if p])
        done = subprocess.run([sys.executable, "-c", _COMPILE], input=payload, env=env, capture_output=True,
                              text=True, timeout=timeout)
    results = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and len(results) == len(jobs), done.stderr[-3000:]
    return results


def plan(cards=CI_CARDS, exhaustive: bool = False, families=tuple(FAMILIES)):
    """``(jobs, owners)``: the distinct ``(arch, launch)`` compile jobs of ``cards`` and, per job, the cards (with
    their per-block limit) that would launch it."""
    jobs: dict[tuple, tuple[int, Launch]] = {}
    owners: dict[tuple, list[tuple[str, int]]] = {}
    for card in cards:
        # the default run compiles every sm_8x card's launches for sm_89 (Triton's sm_80 code keeps the same
        # buffers); the exhaustive run for each card's own architecture
        arch = ARCH[card] if exhaustive or ARCH[card] >= 90 else 89
        for key, launch in launches(card, exhaustive, families).items():
            job = (arch,) + key
            jobs.setdefault(job, (arch, launch))
            owners.setdefault(job, []).append((card, host.CARDS[card].smem_per_block))
    return list(jobs.values()), list(owners.values())


def problems(jobs, owners, results) -> list[str]:
    bad = []
    for (arch, launch), cards, res in zip(jobs, owners, results):
        what = f"sm_{arch} {launch.kernel} warps={launch.num_warps} stages={launch.num_stages} {dict(launch.consts)}"
        if "error" in res:
            bad.append(f"{what}: does not compile: {res['error']}")
            continue
        over = [c for c, limit in cards if res["shared"] > limit]
        if over:
            bad.append(f"{what}: {res['shared']} B of shared memory, over the limit of {', '.join(over)}")
    return bad


# ------------------------------------------------------------------------------------------- the tests

MAX_CI_JOBS = 700  # the default run's compile count stays bounded (about 0.5 s each on a 2-core CPU)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_config_compiles_and_fits_each_card(family):
    """Each card's configs for the shape family compile for its architecture and fit its shared memory."""
    mode = os.environ.get("DLINFER_CONFIG_FAMILY", "")
    exhaustive = mode == "all"
    jobs, owners = plan(ALL_CARDS if mode in ("all", "cards") else CI_CARDS, exhaustive, (family,))
    assert exhaustive or len(jobs) <= MAX_CI_JOBS, f"{len(jobs)} compile jobs: refine the classes (SHAPE_ONLY)"
    results = compile_all(jobs)
    bad = problems(jobs, owners, results)
    assert not bad, f"{len(bad)} of {len(jobs)} launches:\n" + "\n".join(bad[:40])


def _moe_estimate(launch: Launch, arch: int) -> int | None:
    """``tuning.shared_memory``'s figure for a grouped-GEMM launch (None for other kernels)."""
    if launch.kernel not in ("moe._moe_gemm_kernel", "quant._moe_w8a8_gemm_kernel"):
        return None
    consts, types = dict(launch.consts), dict(launch.types)
    dtype = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32, "*i8": torch.int8}[types["a_ptr"]]
    block_k = consts["BLOCK_K"] * (2 if dtype == torch.float32 else 1)  # the config's K (fp32 runs half of it)
    c = dict(BLOCK_N=consts["BLOCK_N"], BLOCK_K=block_k, num_stages=launch.num_stages)
    return tuning.shared_memory(consts["BLOCK_M"], c, consts["SILU"], dtype, arch // 10)


def test_moe_shared_memory_estimate_bounds_the_compiler():
    """``tuning.fit`` sizes configs by ``tuning.shared_memory``: it must never be below what Triton allocates, on
    each architecture (Triton keeps one pipeline buffer fewer below sm_90). Checked on the family's launches and
    on the widest tiles (the H200 table's, the autotune candidates'), compiled for sm_89 and sm_90."""
    jobs, _ = plan(CI_CARDS, False, ("moe",))
    widest = tuning._cfg(128, (128, 64, 16, 8, 3), (256, 64, 16, 8, 4))
    assert widest in tuning.CANDIDATES
    wide = [tuning.TABLES["NVIDIA H200"]["tiers"][-1][1], widest]
    for cfg in wide:
        for arch in (89, 90):
            for gemm, k_dim in (("up", 4096), ("down", 14336)):
                jobs.append((arch, _moe_gemm(cfg, cfg["BLOCK_M"], gemm, torch.bfloat16, True, 8, k_dim, False)))
    jobs = [(arch, l) for arch, l in jobs if _moe_estimate(l, arch) is not None]
    results = compile_all(jobs)
    low = [f"sm_{arch} {dict(l.consts)} stages={l.num_stages}: {r.get('shared', r.get('error'))} B > estimate "
           f"{_moe_estimate(l, arch)}" for (arch, l), r in zip(jobs, results)
           if "error" in r or r["shared"] > _moe_estimate(l, arch)]
    assert not low, "\n".join(low[:20])


def test_generic_mid_tier_keeps_a_deep_pipeline_on_small_shared_memory_cards():
    """The generic tiers (cards without a table, autotune off) are the H100's except at 24-96 rows per expert, where
    they keep 64-wide tiles: fitted to a 99 KB card those keep four pipeline buffers in flight, the H100's 64 x 128-K
    tiles two (sm_89 keeps one buffer fewer than its stages)."""
    assert [c for b, c in tuning.GENERIC_TIERS if b != 96] == [c for b, c in tuning.H100_TIERS if b != 96]
    h100, generic = tuning._tier(tuning.H100_TIERS, 64), tuning._tier(tuning.GENERIC_TIERS, 64)
    assert h100 != generic and generic in tuning.CANDIDATES and h100 in tuning.CANDIDATES
    for name in ("L40S", "RTX 4090"):
        def buffers(cfg, gemm):
            return tuning.fit(cfg, torch.bfloat16, host.CARDS[name])[gemm]["num_stages"] - 1
        assert min(buffers(generic, "up"), buffers(generic, "down")) >= 4, name
        assert buffers(h100, "up") == 2, name


def test_fit_keeps_the_measured_configs_on_their_cards_and_fits_the_others():
    """On the H100 / H200 (where the tables and tiers were measured) and the B200 (the same 227 KB) every shipped
    config is kept as it is: nothing measured changes. On the A100 and the sm_89 cards each fitted config is within
    the per-block limit by the estimate, and only stages, then K, then N tiles shrink (never rows: BLOCK_M is the
    sorting's padding unit)."""
    shipped = [c for t in tuning.TABLES.values() for c in [c for _, c in t["tiers"]] + list(t["shapes"].values())]
    shipped += [c for c in tuning.CANDIDATES]
    w8 = [c for _, c in quant.W8A8_TIERS]
    for name in ("H100", "H200", "B200"):
        card = host.CARDS[name]
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert all(tuning.fit(c, dtype, card) is c for c in shipped), (name, dtype)
        assert all(tuning.fit(c, torch.int8, card) is c for c in w8), name
    changed = 0
    for name in ("A100", "L40S", "RTX 4090"):
        card = host.CARDS[name]
        for dtype, configs in ((torch.bfloat16, shipped), (torch.float32, shipped), (torch.int8, w8)):
            for c in configs:
                f = tuning.fit(c, dtype, card)
                changed += f is not c
                assert f["BLOCK_M"] == c["BLOCK_M"]
                for g in ("up", "down"):
                    assert tuning.shared_memory(f["BLOCK_M"], f[g], g == "up", dtype, card.capability) \
                        <= card.smem_per_block, (name, dtype, c)
                    assert all(f[g][k] <= c[g][k] for k in ("BLOCK_N", "BLOCK_K", "num_stages")), (name, c, f)
                    assert (f[g]["GROUP_M"], f[g]["num_warps"]) == (c[g]["GROUP_M"], c[g]["num_warps"])
    assert changed  # the sm_89 cards' 99 KB do need it (the wide tiers take 144-192 KB)


def test_every_family_shape_is_served_by_the_triton_vendor():
    """No head size, page size or dtype of the family falls back to the reference vendor (the capabilities)."""
    caps = __import__("dlinfer.vendor", fromlist=["get_vendor"]).get_vendor("triton").capabilities
    for op in ("paged_decode_attention", "paged_prefill_attention", "prefill_attention"):
        assert {d for pair in HEADS for d in pair} <= caps[op].head_sizes, op
        assert set(DTYPES) | {torch.float16} <= caps[op].dtypes, op
        if caps[op].block_sizes:
            assert set(PAGES) <= caps[op].block_sizes, op
    for op in ("fused_moe", "weight_quant_matmul", "linear_w8a8", "fused_moe_w8a8"):
        assert op not in caps or not caps[op].head_sizes, op  # no shape limits declared


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="every distinct combination, not one per class")
    p.add_argument("--cards", default=",".join(ALL_CARDS), help="of %(default)s")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--json", help="write every result here")
    args = p.parse_args(argv)
    cards = tuple(c.strip() for c in args.cards.split(","))
    t0 = time.perf_counter()
    jobs, owners = plan(cards, args.all, tuple(args.families.split(",")))
    print(f"{len(jobs)} compile jobs ({time.perf_counter() - t0:.1f} s to plan)", flush=True)
    t0 = time.perf_counter()
    results = compile_all(jobs, timeout=36000)
    print(f"compiled in {time.perf_counter() - t0:.1f} s")
    rows = []
    for (arch, launch), cards_, res in zip(jobs, owners, results):
        rows.append(dict(arch=arch, kernel=launch.kernel, warps=launch.num_warps, stages=launch.num_stages,
                         consts={k: v for k, v in launch.consts}, cards=[c for c, _ in cards_], **res))
        spill = f" SPILLS {res['spills']} B" if res.get("spills") else ""
        print(f"sm_{arch} {launch.kernel:40s} w{launch.num_warps} s{launch.num_stages} "
              f"{res.get('shared', '-'):>7} B {res.get('regs', '-'):>4} regs{spill} {res.get('error', '')[:200]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    bad = problems(jobs, owners, results)
    print("\n".join(bad) if bad else "every launch compiles and fits")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())


# ------------------------------------------------------------------------------------------- the interpreter
# Shapes of the family that the attention tests do not cover (GQA 3 / 5 / 7, head sizes 96 / 112 / 192 / 256,
# D != Dv at 192 / 128), run against the reference under Triton's interpreter (its own small tiles).
UNLISTED_DECODE = [
    # Hq, Hk, D, Dv, block_size, dtype, kv_lens
    (10, 2, 96, 96, 32, torch.float16, [77, 0, 200]),  # GQA 5, D 96
    (8, 2, 256, 256, 16, torch.float16, [150, 33]),  # D 256
    (6, 2, 192, 128, 64, torch.float32, [70, 129]),  # GQA 3, D 192 / Dv 128
]
UNLISTED_PREFILL = [
    # Hq, Hk, D, Dv, block_size (0: varlen prefill), dtype, q_lens, history
    (7, 1, 112, 112, 32, torch.float16, [19, 6], [40, 0]),  # GQA 7, D 112, chunked
    (6, 2, 256, 256, 0, torch.float16, [30, 9], [0, 0]),  # GQA 3, D 256
]


@pytest.mark.parametrize("hq,hk,d,dv,block_size,dtype,kv_lens", UNLISTED_DECODE)
def test_unlisted_decode_shapes(hq, hk, d, dv, block_size, dtype, kv_lens):
    from test_attention import close, make_block_table, make_cache, run

    import dlinfer.ops as ops

    gen = torch.Generator().manual_seed(hq * 1000 + d)
    width = math.ceil(max(kv_lens) / block_size) + 2
    table, num_blocks = make_block_table(kv_lens, block_size, width, gen)
    key_cache, value_cache = make_cache(num_blocks, block_size, hk, d, dv, dtype, False, gen)
    query = torch.randn(len(kv_lens), hq, d, generator=gen).to(dtype)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    outs = [run(vendor, ops.paged_decode_attention, query, key_cache, value_cache, table, block_size, None, lens,
                max(kv_lens) + 9, hq, hk, head_size_v=dv) for vendor in ("triton", "reference")]
    close(outs[0], outs[1], dtype)


@pytest.mark.parametrize("hq,hk,d,dv,block_size,dtype,q_lens,history", UNLISTED_PREFILL)
def test_unlisted_prefill_shapes(hq, hk, d, dv, block_size, dtype, q_lens, history):
    from test_attention import close, make_block_table, make_cache, run

    import dlinfer.ops as ops

    gen = torch.Generator().manual_seed(hq * 10 + d)
    kv_lens = [q + h for q, h in zip(q_lens, history)]
    query = torch.randn(sum(q_lens), hq, d, generator=gen).to(dtype)
    mask = [torch.ones(1)]
    if block_size:
        table, num_blocks = make_block_table(kv_lens, block_size, math.ceil(max(kv_lens) / block_size) + 2, gen)
        key_cache, value_cache = make_cache(num_blocks, block_size, hk, d, dv, dtype, False, gen)
        cu = torch.tensor(q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        args = (query, None, None, key_cache, value_cache, table, block_size, cu,
                torch.tensor(kv_lens, dtype=torch.int32), max(q_lens), max(kv_lens), hq, hk, mask)
        outs = [run(v, ops.paged_prefill_attention, *args, head_size_v=dv) for v in ("triton", "reference")]
    else:
        key = torch.randn(sum(q_lens), hk, d, generator=gen).to(dtype)
        value = torch.randn(sum(q_lens), hk, dv, generator=gen).to(dtype)
        seqlens = torch.tensor(q_lens)
        args = (query, key, value, None, None, seqlens, seqlens, max(q_lens), hq, hk, mask)
        outs = [run(v, ops.prefill_attention, *args) for v in ("triton", "reference")]
    close(outs[0], outs[1], dtype)
