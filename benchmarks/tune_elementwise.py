"""Sweep the launch constants of the triton vendor's memory-bound kernels on a GPU.

    python3 benchmarks/tune_elementwise.py [--ops rotary,silu,fill,norm] [--out DIR]

Each kernel module keeps its launch parameters in module-level constants (``ROTARY_WARPS``, ``SILU_MAX_BLOCK``,
``KV_TILE``, ``NORM_TILE`` ...). This script sets each candidate and times it by CUDA-graph replay with the L2
flushed (benchmarks/timing.py) at the anchor shapes, beside LMDeploy's kernel (rotary, silu) when its wheel is
importable (benchmarks/peers.py). It only times: correctness is `dlinfer check` and benchmarks/gpu_suite.py.
It prints one line per candidate and the best per case, and writes ``tune_elementwise.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import timing  # noqa: E402

DTYPE = torch.bfloat16


def _cases():
    """(name, module, {constant: candidates}, [(tokens, build)]) per kernel family."""
    from benchmarks import peers
    from dlinfer.vendor.triton import activation, kv_cache, norm, rotary

    def rotary_inputs(tokens):
        qkv = torch.randn(tokens, 48, 128, device="cuda", dtype=DTYPE)
        cos = torch.randn(tokens, 128, device="cuda", dtype=DTYPE)
        sin = torch.randn(tokens, 128, device="cuda", dtype=DTYPE)
        q, k = qkv[:, :32], qkv[:, 32:40]
        nbytes = 2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 2
        peer = (lambda lmd: peers.lmdeploy_rotary(lmd, q, k, cos, sin))
        return (lambda: rotary.apply_rotary_pos_emb(q, k, cos, sin)), peer, nbytes

    def silu_inputs(tokens):
        x = torch.randn(tokens, 2 * 14336, device="cuda", dtype=DTYPE)
        return (lambda: activation.silu_and_mul(x)), (lambda lmd: peers.lmdeploy_silu_and_mul(lmd, x)), \
            x.numel() * 2 * 3 // 2

    def fill_inputs(tokens):
        k = torch.randn(tokens, 8, 128, device="cuda", dtype=DTYPE)
        v = torch.randn(tokens, 8, 128, device="cuda", dtype=DTYPE)
        blocks = (tokens + 63) // 64 + 4
        kc = torch.empty(blocks, 64, 8, 128, device="cuda", dtype=DTYPE)
        vc = torch.empty_like(kc)
        slots = torch.randperm(blocks * 64, device="cuda")[:tokens]
        return (lambda: kv_cache.fill_kv_cache(k, v, kc, vc, slots, [], [], 0)), None, 4 * k.numel() * 2

    def norm_inputs(tokens):
        x = torch.randn(tokens, 4096, device="cuda", dtype=DTYPE)
        w = torch.randn(4096, device="cuda", dtype=DTYPE)
        return (lambda: norm.rms_norm(x, w, 1e-6)), None, 2 * x.numel() * 2

    return {
        "rotary": (rotary, {"ROTARY_TOKEN_BLOCKS": [True, False], "ROTARY_WARPS": [1, 2, 4, 8]},
                   [1, 256, 8192], rotary_inputs),
        "silu": (activation, {"SILU_MAX_BLOCK": [512, 1024, 2048, 4096], "SILU_NUM_WARPS": [2, 4, 8]},
                 [256, 8192], silu_inputs),
        "fill": (kv_cache, {"KV_TILE": [1024, 2048, 4096], "KV_ELEMS_PER_WARP": [128, 256, 512]},
                 [256, 8192], fill_inputs),
        "norm": (norm, {"NORM_TILE": [2048, 4096, 8192], "NORM_ELEMS_PER_WARP": [256, 512, 1024]},
                 [1, 256, 8192], norm_inputs),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="rotary,silu,fill,norm")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    flush = timing.Flusher("cuda")
    copy_gbs = timing.measure_ceilings("cuda").copy_gbps
    try:
        from benchmarks import peers

        lmd = peers.load_lmdeploy()
    except Exception as exc:  # noqa: BLE001 - the sweep runs without the peer, and says so
        print(f"peer not loaded: {type(exc).__name__}: {exc}")
        lmd = None
    results = []
    for name in args.ops.split(","):
        module, space, token_list, build = _cases()[name]
        defaults = {k: getattr(module, k) for k in space}
        for tokens in token_list:
            fn, peer, nbytes = build(tokens)
            best = None
            peer_us = None
            if peer is not None and lmd is not None:
                peer_us = timing.gpu_time(lambda: peer(lmd), flush).us
                gbs = nbytes / peer_us / 1e3
                results.append({"op": name, "tokens": tokens, "config": "lmdeploy", "us": peer_us, "gbs": gbs,
                                "pct_copy": 100 * gbs / copy_gbs if copy_gbs else None, "default": False})
                print(f"{name:7s} T={tokens:<5d} lmdeploy {peer_us:8.2f} us {gbs:7.0f} GB/s")
            for values in itertools.product(*space.values()):
                cfg = dict(zip(space, values))
                for k, v in cfg.items():
                    setattr(module, k, v)
                try:
                    t = timing.gpu_time(fn, flush).us
                except Exception as exc:  # noqa: BLE001 - a config that fails to compile is skipped
                    print(f"{name} T={tokens} {cfg}: {type(exc).__name__}: {exc}"[:200])
                    continue
                gbs = nbytes / t / 1e3
                row = {"op": name, "tokens": tokens, "config": cfg, "us": t, "gbs": gbs,
                       "pct_copy": 100 * gbs / copy_gbs if copy_gbs else None,
                       "default": cfg == defaults}
                results.append(row)
                mark = " (default)" if row["default"] else ""
                print(f"{name:7s} T={tokens:<5d} {cfg} {t:8.2f} us {gbs:7.0f} GB/s{mark}")
                if best is None or t < best["us"]:
                    best = row
            for k, v in defaults.items():
                setattr(module, k, v)
            default_us = next((r["us"] for r in results if r["op"] == name and r["tokens"] == tokens
                               and r["default"]), float("nan"))
            if best:
                vs = f", peer {peer_us:.2f} us: best {peer_us / best['us']:.3f}x, default {peer_us / default_us:.3f}x" \
                    if peer_us else ""
                print(f"BEST {name} T={tokens}: {best['config']} {best['us']:.2f} us {best['gbs']:.0f} GB/s "
                      f"(default {default_us:.2f} us{vs}; copy {copy_gbs:.0f} GB/s)")
    out = Path(args.out) / "tune_elementwise.json"
    out.write_text(json.dumps({"copy_gbs": copy_gbs, "device": torch.cuda.get_device_name(),
                               "results": results}, indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
