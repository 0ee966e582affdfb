"""Sweep the triton attention kernels' launch parameters on a GPU (through the DLINFER_TRITON_DECODE /
DLINFER_TRITON_PREFILL overrides of dlinfer/vendor/triton/attention_*.py).

    python3 benchmarks/tune_attention.py [--parts prefill,paged_prefill,decode] [--out DIR]

``prefill`` times the launch parameters, and prefill_attention's Hopper variant (``tma=1``, ``warp_specialize=1``)
on the same tiles, at 16x512, 4x2048 and 1x8192 tokens beside LMDeploy's kernel and torch's cuDNN SDPA; then its
library route (``sdpa=1``: torch's cuDNN SDPA serving a uniform batch through ``dlinfer.ops.prefill_attention``),
timed eagerly beside the Triton kernel and torch's cuDNN SDPA timed the same way (the route is never taken while a
CUDA graph is captured), with its first call at a new shape (cuDNN builds an execution plan) timed apart, also
at two lengths no earlier call saw (1x1000, 1x3000).
``decode`` times the split-KV rule's variants and the fused reduce (``fused_reduce=1``: one launch) at batch
1/16/64/256 and 1k-16k tokens of context, block 64 and 16. ``paged_prefill`` sweeps the split-KV settings and the
TMA kernels (``tma=1``, block 64) on chunked prefill (256 new tokens over a 16k history, batch 1 and 8, block 64 and
16) and on whole prompts in the cache (16x512, 4x2048, 1x8192, block 64) beside LMDeploy's flatten-the-cache + flash
attention.

Times each candidate by CUDA-graph replay with the L2 flushed (rows marked ``"timing": "eager"``: events around
each call, L2 flushed); prints one line per candidate and writes ``tune_attention.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import timing  # noqa: E402

HQ, HK, D = 32, 8, 128
# the default (on Hopper: the TMA kernel on 64x64 tiles), then the pointer kernel (tma=0) on its own tiles and variants
PREFILL = ("", "tma=0", *(f"tma=0,{v}" for v in ("block_n=128,num_stages=2", "block_n=128", "pack_gqa=0",
                                                  "num_stages=2", "num_stages=4", "block_m=64,num_warps=4")))
# prefill_attention's Hopper variant (TMA loads; tma=1) beside the pointer kernel on the same explicit tiles
# (128x64 with 4 warps spills registers on sm_90; 128x128 with 4 stages exceeds the shared memory), and its
# warp-specialized form (4 warps + a producer group, no GQA packing; 128x128 with 3 stages exceeds the shared memory).
_TILES = ("block_m=128,block_n=128,num_warps=8,num_stages=3", "block_m=128,block_n=128,num_warps=8,num_stages=2",
          "block_m=128,block_n=64,num_warps=8,num_stages=3", "block_m=128,block_n=64,num_warps=8,num_stages=2",
          "block_m=64,block_n=64,num_warps=4,num_stages=3", "block_m=64,block_n=128,num_warps=4,num_stages=2")
_WS = ("block_m=128,block_n=128,num_warps=4,num_stages=2", "block_m=128,block_n=64,num_warps=4,num_stages=2",
       "block_m=128,block_n=64,num_warps=4,num_stages=3")
PREFILL_HOPPER = (*(f"tma=0,{t}" for t in _TILES), "tma=1", *(f"tma=1,{t}" for t in _TILES),
                  *(f"tma=1,warp_specialize=1,{t}" for t in _WS))
# prefill_attention's library route (torch's cuDNN SDPA for a uniform batch); first calls timed at these B=1 lengths
SDPA_ROUTE = "sdpa=1"
FIRST_CALL_LENGTHS = (1000, 3000)
# the default, no programmatic dependent launch of the reduce kernel, two / three stages for split programs (the
# H100's / H200's default: one of the two changes nothing on each card), more splits than one wave holds (LMDeploy's
# kernel cuts batch 16 into 4 splits where the one-wave rule takes 2-3), its split counts (a power of two: 16/32/32
# at batch 1, 4 at batch 16), the per-tile addressing (hoist_addr=0: every K/V address built per tile) and the
# 4-warp reduce at every batch (reduce_many_programs=0), each alone and both together (the default before either
# was measured), and the fused reduce (one launch: the last split program combines).
DECODE = ("", "pdl=0", "split_stages=2", "split_stages=3", "one_wave=0,target_programs={sms3}",
          "pow2_splits=1,one_wave=0,target_programs={sms3}", "hoist_addr=0", "reduce_many_programs=0",
          "hoist_addr=0,reduce_many_programs=0")
DECODE_FUSED = ("fused_reduce=1",)
# chunked paged prefill (256 new tokens over a 16k history): the split-KV rule, forced split counts, no split,
# a two-wave target, the large tiles (with and without splits), no programmatic dependent launch
PAGED_PREFILL = ("", "splits=0", "splits=2", "splits=4", "splits=8", "target_programs=528",
                 "block_m=128,block_n=128,num_warps=8", "block_m=128,block_n=128,num_warps=8,splits=0",
                 "block_m=128,block_n=64,num_warps=8", "pdl=0")
# paged prefill's TMA kernels (tma=1: key/value tiles by TMA from the caches, a tile inside one page; block 64 only,
# other blocks run the pointer kernel; tma_split=1: split grids too; the sm_90 default where a call qualifies):
# prefill_attention's Hopper tiles with the split rule, un-split, two splits, and beside them the pointer kernel on
# its own tiles in force (tma=0) and on the same tiles
_HOPPER_TILES = "block_m=64,block_n=64,num_warps=4,num_stages=3"
PAGED_PREFILL_TMA = (f"tma=1,tma_split=1,{_HOPPER_TILES}", f"tma=1,{_HOPPER_TILES},splits=0",
                     f"tma=1,tma_split=1,{_HOPPER_TILES},splits=2", f"tma=1,{_HOPPER_TILES}",
                     "tma=1,tma_split=1,block_m=128,block_n=64,num_warps=8,num_stages=3", "tma=0",
                     f"tma=0,{_HOPPER_TILES}")
# (block, batch, new tokens, history): chunked prefill over a long history, then whole prompts in the cache
PAGED_CASES = ((64, 1, 256, 16384), (64, 8, 256, 16384), (16, 1, 256, 16384), (16, 8, 256, 16384),
               (64, 16, 512, 0), (64, 4, 2048, 0), (64, 1, 8192, 0))


def _time(rows, part, case, cfg, fn, flush, work, unit, check=None, graph=True):
    """Time ``fn`` (after ``check(fn())`` returns its relative error, when given) and record one row; ``graph``:
    by CUDA-graph replay, else eagerly (events around each call)."""
    label = (cfg or "default") + ("" if graph else " [eager]")
    try:
        err = check(fn()) if check is not None else None
        measured = timing.gpu_time(fn, flush, graph=graph)
    except Exception as exc:  # noqa: BLE001 - a config that fails to compile is recorded and skipped
        print(part, case, label, "FAILED", type(exc).__name__, str(exc)[:100], flush=True)
        rows.append({"part": part, "case": case, "config": cfg, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return None
    t = measured.us
    rate = work / t / 1e6 if unit == "TFLOP/s" else work / t / 1e3
    note = f" rel_err {err:.1e}" if err is not None else ""
    note += f" ({measured.note})" if getattr(measured, "note", "") else ""
    print(part, case, label, f"{t:.2f} us {rate:.0f} {unit}{note}", flush=True)
    rows.append({"part": part, "case": case, "config": cfg, "us": t, unit: rate, "rel_err": err,
                 "note": getattr(measured, "note", "")})
    if not graph:
        rows[-1]["timing"] = "eager"
    return t


def _sweep(rows, part, case, env_name, config, candidates, fn, flush, work, unit, check, peer_us):
    """Time ``fn`` under each candidate value of ``$env_name`` (``config``: the cached config builder it feeds,
    cleared before each), with its ratio to the peer's time ``peer_us`` when there is one."""
    for cfg in candidates:
        config.cache_clear()
        os.environ[env_name] = cfg
        t = _time(rows, part, case, cfg, fn, flush, work, unit, check)
        if t and peer_us:
            rows[-1]["vs_peer"] = peer_us / t
            print(f"   {case} {cfg or 'default'}: {peer_us / t:.3f}x the peer", flush=True)


def _first_call(fn):
    """Wall time (ms, synchronized before and after) of one call of ``fn``, and how many SDPA calls in it returned
    (so a row says whether the library route served it; one SDPA refused falls back to the Triton kernel)."""
    import torch.nn.functional as F

    real, calls = F.scaled_dot_product_attention, []

    def counted(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        return result

    F.scaled_dot_product_attention = counted
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3, len(calls)
    finally:
        F.scaled_dot_product_attention = real


def _prefill_op(q, k, v, lens, length, out):
    """``dlinfer.ops.prefill_attention`` on equal lengths: one lengths tensor for queries and keys, so the vendor
    gets one offsets tensor (what the library route needs)."""
    import dlinfer.ops as ops

    return lambda: ops.prefill_attention(q, k, v, None, None, lens, lens, length, HQ, HK, [None], attn_output=out)


def _set_prefill(cfg):
    from dlinfer.vendor.triton import attention_prefill as ap

    ap._config.cache_clear()
    os.environ["DLINFER_TRITON_PREFILL"] = cfg


def prefill_route(rows, case, op, cudnn, flush, work, check):
    """The library route (``sdpa=1``) beside the Triton kernel (its default config) and torch's cuDNN SDPA (K/V
    expanded), all timed eagerly: the route is not taken while a CUDA graph is captured, so graph timing would time
    the Triton kernel. The route's first call at this shape (cuDNN's plan build) is timed apart (wall, synced)."""
    _set_prefill(SDPA_ROUTE)
    first_ms, sdpa_calls = _first_call(op)
    print(f"   {case} {SDPA_ROUTE}: first call {first_ms:.2f} ms, served by SDPA: {sdpa_calls > 0}", flush=True)
    route_us = _time(rows, "prefill", case, SDPA_ROUTE, op, flush, work, "TFLOP/s", check, graph=False)
    rows[-1].update(first_call_ms=first_ms, served_by_sdpa=sdpa_calls > 0)
    _set_prefill("")
    triton_us = _time(rows, "prefill", case, "", op, flush, work, "TFLOP/s", check, graph=False)
    cudnn_us = _time(rows, "prefill", case, "torch_cudnn", cudnn, flush, work, "TFLOP/s", graph=False)
    if route_us and triton_us and cudnn_us:
        print(f"   {case} {SDPA_ROUTE} [eager]: {triton_us / route_us:.3f}x the Triton kernel, "
              f"{cudnn_us / route_us:.3f}x torch cuDNN (expanded K/V), eager both", flush=True)


def prefill_first_calls(rows):
    """The route's first call at lengths no earlier call saw (B=1; cuDNN builds a plan per new shape), beside its
    second call at the same shape (wall times, synchronized)."""
    _set_prefill(SDPA_ROUTE)
    for length in FIRST_CALL_LENGTHS:
        q = torch.randn(length, HQ, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(length, HK, D, device="cuda", dtype=torch.bfloat16)
        op = _prefill_op(q, k, torch.randn_like(k), torch.full((1,), length, device="cuda", dtype=torch.int32),
                         length, torch.empty_like(q))
        (first_ms, calls), (second_ms, _) = _first_call(op), _first_call(op)
        case = f"1x{length}"
        print("prefill", case, f"{SDPA_ROUTE} first call {first_ms:.2f} ms, second {second_ms:.2f} ms, served by "
              f"SDPA: {calls > 0}", flush=True)
        rows.append({"part": "prefill_first_call", "case": case, "config": SDPA_ROUTE, "first_call_ms": first_ms,
                     "second_call_ms": second_ms, "served_by_sdpa": calls > 0})


def prefill(rows, flush, peer):
    """Varlen prefill (equal lengths, causal), each candidate beside the peer (LMDeploy's Triton kernel) when loaded
    and beside torch's cuDNN SDPA (K/V pre-expanded to the query heads, the speed bar); errors against float32
    attention of the first sequence (SDPA on its float32 copy: the truth, not another bf16 kernel's roundings, which
    kernels on the same key tiles as the oracle's would match more closely than others). Then the library route
    (:func:`prefill_route`, :func:`prefill_first_calls`)."""
    from dlinfer.vendor.triton import attention_prefill as ap

    from benchmarks import peers

    for seqs, length in ((16, 512), (4, 2048), (1, 8192)):
        tokens = seqs * length
        q = torch.randn(tokens, HQ, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(tokens, HK, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = torch.full((seqs,), length, device="cuda", dtype=torch.int32)
        cu = torch.arange(0, tokens + 1, length, device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        q4 = q.view(seqs, length, HQ, D).transpose(1, 2)
        k4, v4 = (t.view(seqs, length, HK, D).repeat_interleave(HQ // HK, dim=2).transpose(1, 2).contiguous()
                  for t in (k, v))
        case, scale, work = f"{seqs}x{length}", D ** -0.5, 2 * seqs * length * length * HQ * D
        want = torch.nn.functional.scaled_dot_product_attention(
            q4[:1].float(), k4[:1].float(), v4[:1].float(), is_causal=True, scale=scale)
        want = want.transpose(1, 2).reshape(length, HQ, D).double()

        def check(o):
            return float((o.reshape(tokens, HQ, D)[:length].double() - want).norm() / want.norm())

        def cudnn():
            return peers.torch_prefill_sdpa(q4, k4, v4, scale, "cudnn")

        cudnn_us = _time(rows, "prefill", case, "torch_cudnn", cudnn, flush, work, "TFLOP/s")
        peer_us = None
        if peer is not None:
            peer_us = _time(rows, "prefill", case, "lmdeploy", lambda: peers.lmdeploy_prefill(
                peer, q, k, v, cu, cu, length, length, scale), flush, work, "TFLOP/s", check)
        first = len(rows)
        op = _prefill_op(q, k, v, lens, length, out)
        _sweep(rows, "prefill", case, "DLINFER_TRITON_PREFILL", ap._config, PREFILL + PREFILL_HOPPER, op,
               flush, work, "TFLOP/s", check, peer_us)
        for row in rows[first:]:
            if cudnn_us and row.get("us"):
                row["vs_cudnn"] = cudnn_us / row["us"]
                print(f"   {case} {row['config'] or 'default'}: {row['vs_cudnn']:.3f}x cuDNN", flush=True)
        prefill_route(rows, case, op, cudnn, flush, work, check)
        del k4, v4
    prefill_first_calls(rows)
    os.environ.pop("DLINFER_TRITON_PREFILL", None)
    ap._config.cache_clear()


def paged_prefill(rows, flush, peer, batches=None):
    """Paged prefill (:data:`PAGED_CASES`: chunked prefill of 256 new tokens over a 16k history at block 64 and
    16, and whole prompts already in the cache at 16x512 / 4x2048 / 1x8192), each candidate beside the peer
    (LMDeploy's flatten-the-cache + flash attention) when loaded; errors against the reference vendor (float32,
    first sequence)."""
    import dlinfer.ops as ops
    from dlinfer.vendor.reference import attention as ref_attention
    from dlinfer.vendor.triton import attention_prefill as ap

    from benchmarks import peers

    for block, batch, q_len, history in PAGED_CASES:
        if batches and batch not in batches:
            continue
        kv = q_len + history
        blocks = batch * (-(-kv // block))
        kc = torch.randn(blocks, block, HK, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        table = torch.randperm(blocks, device="cuda").int().view(batch, -1)
        q = torch.randn(batch * q_len, HQ, D, device="cuda", dtype=torch.bfloat16)
        cu_q = torch.arange(0, batch * q_len + 1, q_len, device="cuda", dtype=torch.int32)
        cu_k = torch.arange(0, batch * kv + 1, kv, device="cuda", dtype=torch.int32)
        lens = torch.full((batch,), kv, device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        ref = torch.empty(q_len, HQ, D, device="cuda", dtype=torch.float32)
        ref_attention.paged_prefill_attention(q[:q_len].float(), kc, vc, table[:1], cu_q[:2], lens[:1], q_len, kv,
                                              D ** -0.5, True, ref)

        def check(o):
            o = o[:q_len].double()
            return float((o - ref.double()).norm() / ref.double().norm())

        case = f"block{block} B{batch} q{q_len} history{history}"
        work = 4 * HQ * D * batch * (q_len * history + q_len * (q_len + 1) // 2)
        peer_us = None
        if peer is not None:
            peer_us = _time(rows, "paged_prefill", case, "lmdeploy", lambda: peers.lmdeploy_paged_prefill(
                peer, q, kc, vc, table, cu_q, cu_k, lens, cu_k[:-1], q_len, kv, batch * kv, D ** -0.5),
                flush, work, "TFLOP/s", check)
        candidates = PAGED_PREFILL + (PAGED_PREFILL_TMA if block % 64 == 0 else ())
        _sweep(rows, "paged_prefill", case, "DLINFER_TRITON_PREFILL", ap._config, candidates,
               lambda: ops.paged_prefill_attention(q, None, None, kc, vc, table, block, cu_q[1:], lens, q_len, kv,
                                                   HQ, HK, [None], attn_output=out),
               flush, work, "TFLOP/s", check, peer_us)
        del kc, vc
    os.environ.pop("DLINFER_TRITON_PREFILL", None)
    ap._config.cache_clear()


def decode(rows, flush, peer, batches=None):
    """The latency-bound decode shapes (and one bandwidth-bound), each candidate beside the peer when loaded, with
    its split count and its error after the timed graph replays too (the fused reduce's counters must reset)."""
    import dlinfer.ops as ops
    from dlinfer.vendor.reference import attention as ref_attention
    from dlinfer.vendor.triton import attention_decode as ad

    from benchmarks import peers

    for block in (64, 16):
        for batch, ctx in ((1, 1024), (1, 4096), (1, 16384), (16, 1024), (16, 4096), (16, 16384), (64, 1024),
                           (64, 4096), (256, 1024)):
            if batches and batch not in batches:
                continue
            blocks = batch * ctx // block
            kc = torch.randn(blocks, block, HK, D, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            table = torch.randperm(blocks, device="cuda").int().view(batch, -1)
            q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
            lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
            out = torch.empty_like(q)
            sub = min(batch, 2)
            ref = torch.empty(sub, HQ, D, device="cuda", dtype=torch.float32)
            ref_attention.paged_decode_attention(q[:sub].float(), kc, vc, table[:sub], lens[:sub], ctx, D ** -0.5, ref)

            def check(o):
                o = o[:sub].double()
                return float((o - ref.double()).norm() / ref.double().norm())

            case = f"block{block} B{batch} ctx{ctx}"
            work = 2 * kc.numel() * 2
            peer_us = None
            if peer is not None:
                peer_us = _time(rows, "decode", case, "lmdeploy", lambda: peers.lmdeploy_paged_decode(
                    peer, q, kc, vc, table, lens, D ** -0.5), flush, work, "GB/s", check)
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            for cfg in tuple(c.format(sms3=3 * sms) for c in DECODE + DECODE_FUSED):
                _sweep(rows, "decode", case, "DLINFER_TRITON_DECODE", ad._config, (cfg,),
                       lambda: ops.paged_decode_attention(q, kc, vc, table, block, None, lens, ctx, HQ, HK,
                                                          attn_output=out),
                       flush, work, "GB/s", check, peer_us)
                if rows[-1].get("us"):  # out holds the last replay's result
                    splits = ad.num_splits(batch, HK, ctx, ad._config("cuda", 0, torch.bfloat16, D, D, HQ // HK))
                    rows[-1].update(splits=splits, rel_err_replayed=check(out))
                    print(f"   {case} {cfg or 'default'}: {splits} splits, rel_err after replays "
                          f"{rows[-1]['rel_err_replayed']:.1e}", flush=True)
            del kc, vc
    os.environ.pop("DLINFER_TRITON_DECODE", None)
    ad._config.cache_clear()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", default="prefill,decode")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--batches", default="",
                        help="decode, paged_prefill: only these batch sizes (comma-separated)")
    args = parser.parse_args(argv)
    import dlinfer.vendor as vendor

    vendor.set_override("triton")
    flush = timing.Flusher("cuda")
    try:
        from benchmarks import peers

        peer = peers.load_lmdeploy()
    except Exception as exc:  # noqa: BLE001 - the sweep runs without the peer, and says so
        print(f"peer not loaded: {type(exc).__name__}: {exc}")
        peer = None
    rows: list[dict] = []
    for part in args.parts.split(","):
        if part == "decode":
            decode(rows, flush, peer, {int(b) for b in args.batches.split(",") if b})
        elif part == "paged_prefill":
            paged_prefill(rows, flush, peer, {int(b) for b in args.batches.split(",") if b})
        else:
            prefill(rows, flush, peer)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "tune_attention.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
