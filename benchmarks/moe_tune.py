"""Sweep fused-MoE tile configurations on the GPU at hand, against LMDeploy's kernel in the same run.

For each MoE shape and token count: the peer (LMDeploy 0.18's ``fused_moe``, autotuned on its first call), dlinfer
with the config it would choose today, and a coordinate-descent sweep of candidate configs (BLOCK_M, the gate_up
and down tiles, GROUP_M), each checked against the default config's output. GPU time by CUDA-graph replay with
the L2 flushed (``benchmarks/timing.py``). Writes a JSON whose ``table`` maps shape keys to the best config found:
the format of the per-card tables shipped in ``dlinfer/vendor/triton/configs/``.

    python benchmarks/moe_tune.py --out moe_tune.json --budget-s 420
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers, timing  # noqa: E402
from dlinfer.vendor.triton import moe as tmoe  # noqa: E402

# (name, experts, topk, hidden, inter): the two anchor models, then shapes outside them.
SHAPES = [
    ("mixtral", 8, 2, 4096, 14336),
    ("qwen3", 128, 8, 2048, 768),
    ("e64k6", 64, 6, 2048, 1408),
    ("e16k2", 16, 2, 4096, 6400),
    ("e256k8", 256, 8, 7168, 512),
    ("e32k4", 32, 4, 3072, 2048),
]
TOKENS = [1, 64, 256, 512, 2048, 4096, 8192]

UP_TILES = [dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
            dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
            dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
            dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
            dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
            dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
            dict(BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3),
            dict(BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=5)]
DOWN_TILES = [dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
              dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
              dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
              dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
              dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
              dict(BLOCK_N=256, BLOCK_K=32, num_warps=4, num_stages=4),
              dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)]


def shape_key(experts, topk, hidden, inter, tokens, dtype="bfloat16"):
    bucket = 1 << max(0, math.ceil(math.log2(max(tokens, 1))))
    return f"{dtype}:E{experts}:k{topk}:H{hidden}:I{inter}:T{bucket}"


def routing(tokens, experts, topk, skewed, device, gen):
    logits = torch.randn(tokens, experts, device=device, generator=gen)
    if skewed:
        logits += 1.5 * torch.randn(experts, device=device, generator=gen)
    w, ids = torch.topk(torch.softmax(logits, -1), topk, dim=-1)
    return w, ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="moe_tune.json")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--shapes", nargs="*", default=[s[0] for s in SHAPES])
    ap.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    ap.add_argument("--no-sweep", action="store_true", help="time the default config and the peer only")
    ap.add_argument("--skewed", action="store_true", help="skewed routing (a few hot experts)")
    args = ap.parse_args(argv)
    t_start = time.time()
    dev = "cuda"
    dtype = torch.bfloat16
    flush = timing.Flusher(dev)
    lmd = peers.load_lmdeploy()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cases=[], table={})

    def gpu_us(fn):
        return timing.graph_gpu_time(fn, flush, reps=10, target_us=3000).us

    for name, experts, topk, hidden, inter in SHAPES:
        if name not in args.shapes:
            continue
        gen = torch.Generator(device=dev).manual_seed(experts * 31 + hidden)
        w_up = torch.randn(experts, 2 * inter, hidden, device=dev, dtype=dtype, generator=gen) * hidden ** -0.5
        w_down = torch.randn(experts, hidden, inter, device=dev, dtype=dtype, generator=gen) * inter ** -0.5
        peer_weights = peers.lmdeploy_moe_weights(w_up, w_down)
        for tokens in args.tokens:
            if time.time() - t_start > args.budget_s:
                print(f"budget spent: skipping {name} T={tokens}", flush=True)
                continue
            x = torch.randn(tokens, hidden, device=dev, dtype=dtype, generator=gen)
            tw, ti = routing(tokens, experts, topk, args.skewed, dev, gen)
            default = copy.deepcopy(tmoe.moe_launch_config(tokens, experts, topk, hidden, inter))
            ref = tmoe.fused_moe(x, w_up, w_down, tw, ti, True, config=default)
            peer_out = peers.lmdeploy_fused_moe(lmd, x, w_up, w_down, tw, ti, topk, True)
            peer_err = float((peer_out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
            # the peer at its faster weight layout: dlinfer's tensors or the one stock LMDeploy serves (N-fastest)
            peer_us = min(gpu_us(lambda w=w: peers.lmdeploy_fused_moe(lmd, x, *w, tw, ti, topk, True))
                          for w in ((w_up, w_down), peer_weights))

            def run(cfg):
                try:
                    out = tmoe.fused_moe(x, w_up, w_down, tw, ti, True, config=cfg)
                    err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
                    if not err < 2e-2:
                        return float("inf"), f"rel err {err:.3g}"
                    return gpu_us(lambda: tmoe.fused_moe(x, w_up, w_down, tw, ti, True, config=cfg)), ""
                except Exception as exc:  # noqa: BLE001 - a candidate that cannot launch (shared memory) is skipped
                    return float("inf"), f"{type(exc).__name__}: {str(exc)[:60]}"

            default_us, _ = run(default)
            best, best_us, tried = copy.deepcopy(default), default_us, 1
            if not args.no_sweep:
                steps = [("BLOCK_M", None, v) for v in (16, 32, 64, 128)]
                steps += [("tile", "up", v) for v in UP_TILES] + [("tile", "down", v) for v in DOWN_TILES]
                steps += [("GROUP_M", g, v) for g in ("up", "down") for v in (1, 4, 8, 16)]
                steps += [("BLOCK_M", None, v) for v in (16, 32, 64, 128)]
                seen = [default]
                for what, gemm, value in steps:
                    cand = copy.deepcopy(best)
                    if what == "BLOCK_M":
                        cand["BLOCK_M"] = value
                    elif what == "GROUP_M":
                        cand[gemm]["GROUP_M"] = value
                    else:
                        cand[gemm].update(value)
                    if cand in seen:
                        continue
                    seen.append(cand)
                    us, _why = run(cand)
                    tried += 1
                    if us < best_us:
                        best, best_us = cand, us
            flops = 6.0 * tokens * topk * hidden * inter
            case = dict(shape=name, experts=experts, topk=topk, hidden=hidden, inter=inter, tokens=tokens,
                        skewed=args.skewed, peer_us=peer_us, peer_rel_err=peer_err, default_us=default_us,
                        best_us=best_us, best=best, tried=tried, tflops_best=flops / best_us / 1e6)
            result["cases"].append(case)
            result["table"][shape_key(experts, topk, hidden, inter, tokens)] = best
            print(f"{name:8s} T={tokens:5d} peer {peer_us:9.1f} us  default {default_us:9.1f} "
                  f"({peer_us / default_us:5.2f}x)  best {best_us:9.1f} ({peer_us / best_us:5.2f}x) "
                  f"tried {tried:2d}  {best}", flush=True)
            del x, tw, ti, ref, peer_out
        del w_up, w_down, peer_weights
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} after {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
