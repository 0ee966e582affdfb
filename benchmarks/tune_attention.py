"""Sweep the triton attention kernels' launch parameters on a GPU (through the DLINFER_TRITON_DECODE /
DLINFER_TRITON_PREFILL overrides of dlinfer/vendor/triton/attention_*.py).

    python3 benchmarks/tune_attention.py [--parts prefill,decode] [--out DIR]

Times each candidate by CUDA-graph replay with the L2 flushed; prints one line per candidate and writes
``tune_attention.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import timing  # noqa: E402

HQ, HK, D = 32, 8, 128
PREFILL = ("", "block_n=128,num_stages=2", "block_n=128", "pack_gqa=0", "num_stages=2", "num_stages=4",
           "block_m=64,num_warps=4")
DECODE = ("", "num_stages=2", "target_programs=528", "target_programs=1056", "min_split_tokens=128", "num_warps=8")


def _time(rows, part, case, cfg, fn, flush, work, unit):
    try:
        t = timing.gpu_time(fn, flush).us
    except Exception as exc:  # noqa: BLE001 - a config that fails to compile is recorded and skipped
        print(part, case, cfg or "default", "FAILED", type(exc).__name__, str(exc)[:100], flush=True)
        rows.append({"part": part, "case": case, "config": cfg, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    rate = work / t / 1e6 if unit == "TFLOP/s" else work / t / 1e3
    print(part, case, cfg or "default", f"{t:.1f} us {rate:.0f} {unit}", flush=True)
    rows.append({"part": part, "case": case, "config": cfg, "us": t, unit: rate})


def prefill(rows, flush):
    import dlinfer.ops as ops
    from dlinfer.vendor.triton import attention_prefill as ap

    for seqs, length in ((16, 512), (4, 2048), (1, 8192)):
        tokens = seqs * length
        q = torch.randn(tokens, HQ, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(tokens, HK, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = torch.full((seqs,), length, device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        for cfg in PREFILL:
            ap._config.cache_clear()
            os.environ["DLINFER_TRITON_PREFILL"] = cfg
            _time(rows, "prefill", f"{seqs}x{length}", cfg,
                  lambda: ops.prefill_attention(q, k, v, None, None, lens, lens, length, HQ, HK, [None],
                                                attn_output=out),
                  flush, 2 * seqs * length * length * HQ * D, "TFLOP/s")
    os.environ.pop("DLINFER_TRITON_PREFILL", None)
    ap._config.cache_clear()


def decode(rows, flush):
    import dlinfer.ops as ops
    from dlinfer.vendor.triton import attention_decode as ad

    for block in (16, 64):
        for batch, ctx in ((1, 1024), (1, 4096), (1, 16384), (16, 1024), (16, 16384), (64, 4096)):
            blocks = batch * ctx // block
            kc = torch.randn(blocks, block, HK, D, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            table = torch.randperm(blocks, device="cuda").int().view(batch, -1)
            q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
            lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
            out = torch.empty_like(q)
            for cfg in DECODE:
                ad._config.cache_clear()
                os.environ["DLINFER_TRITON_DECODE"] = cfg
                _time(rows, "decode", f"block{block} B{batch} ctx{ctx}", cfg,
                      lambda: ops.paged_decode_attention(q, kc, vc, table, block, None, lens, ctx, HQ, HK,
                                                         attn_output=out),
                      flush, 2 * kc.numel() * 2, "GB/s")
            del kc, vc
    os.environ.pop("DLINFER_TRITON_DECODE", None)
    ad._config.cache_clear()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", default="prefill,decode")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    import dlinfer.vendor as vendor

    vendor.set_override("triton")
    flush = timing.Flusher("cuda")
    rows: list[dict] = []
    for part in args.parts.split(","):
        {"prefill": prefill, "decode": decode}[part](rows, flush)
        Path(args.out, "tune_attention.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
