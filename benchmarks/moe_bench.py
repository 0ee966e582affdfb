"""Fused MoE on the GPU at hand: dlinfer against LMDeploy's kernel in one run, checked against the reference vendor.

For every shape (the two anchor models and shapes no table lists), token count and routing (uniform; skewed: one
hot expert plus a random per-expert bias), on fresh random bf16 inputs:

* correctness: dlinfer (``dlinfer.ops.fused_moe``, the triton vendor with the configs in force on this card) and
  the peer against the reference vendor on the first 128 tokens (relative error norm);
* GPU time by CUDA-graph replay with the L2 flushed (``benchmarks/timing.py``) of the peer (LMDeploy 0.18's
  ``fused_moe``, autotuned on its warm-up calls) and of dlinfer as a user gets it (its warm-up calls run the
  autotune on first use where the card has no table; the tune's seconds are reported). The peer is timed twice:
  on dlinfer's tensors (``peer_shared_us``, ``speed_shared``) and on its weights in the layout stock LMDeploy
  serves them in (``peers.lmdeploy_moe_weights``, N-fastest: ``peer_engine_us``); ``speed`` is against the faster
  of the two, the peer as a stock engine could run it at its best;
* ``--autotune-shapes`` run as on a card without a table (its table is hidden for them): their first call runs
  the autotune on first use, whose result lands in the tuning cache (``DLINFER_CACHE_DIR``);
* with ``--candidates``: extra tile configs (``EXTRA``, uniform routing) and the Hopper variants (``HOPPER``: the
  config in force, hot-expert tiles included, with each set of the GEMM's ``TMA_A``/``TMA_ACT``/``TMA_B``/
  ``PERSISTENT``/``MERGE`` fields, and warp-specialized (``WS``) 4-warp configs where ``DLINFER_MOE_WS=1``; on
  the routings of ``--candidates-routings``) at ``rows per expert >= --candidates-from``, each checked against the
  reference before it is timed: material for the card's table; ``--candidate-sets hot`` adds the config in force with
  narrower hot-expert tiles and without a hot class (``hot_candidates``), ``tma`` only the Hopper set's TMA
  variants (``TMA_FLAGS``, three compiles a case instead of twelve), ``merge`` the config in force with both
  tile classes in one launch of one program per tile (``MERGE_FLAGS``), ``stream`` the config in force with the
  hot experts' GEMMs beside the others on their own stream and after them (``STREAM_FLAGS``: the same kernels, so
  nothing to compile), ``rules`` each distinct config of the card tables' load rules (``rule_candidates``: another
  card's rules timed here), ``split`` the card's narrower tiers for all but the heaviest experts, which keep the
  config in force (``split_candidates``), ``decode`` long-K and deeper-pipeline tiles for the memory-bound range
  (``DECODE``), ``peer`` tiles of the peer's decode footprint and neighbours (``PEER_TILES``), ``ndecode`` 16-row
  tiles for N-fastest weights under 8 rows per expert (``N_DECODE``), ``grouped`` the call
  on torch's grouped GEMM (the ``GROUPED_MM`` field: CUTLASS on Hopper, bf16) with both weight layouts; routings of
  ``--candidates-routings``. ``--dlinfer-n-fastest`` also times dlinfer on the peer's N-fastest weights (its kernels
  read them in place), against the peer at its faster layout; ``--candidates-layout n-fastest`` times the
  candidates on those weights.
  A summary per variant (its time over the config in force's, per case) ends the output.

Prints one line per case (before its candidates) and a table of speed ratios last; writes everything to ``--out``
(JSON), rewritten after every case and candidate so that a run cut short keeps what it timed. ``--budget-s`` is
checked before every case and every candidate. Each candidate compiles its own kernels (30-60 s on a slow host):
``--compile-workers`` processes compile a case's candidates in parallel first (using at most half the budget left),
and a candidate is started only if the budget still holds the slowest timed one so far (for one the workers did
not reach: the longest a worker took for one, at least ``COLD_CANDIDATE_S``); the others are skipped and counted. A
candidate that failed in its worker is reported with the worker's error and not run again here (a compile that
fails there fails here, after costing the same minutes). Each candidate's line ends with the seconds it took here.

Roofline per case (:func:`moe_bytes`, :func:`roofline`): from the routing used, the experts touched (with at least
one token), the bytes of their weights read once plus the input, the output and the intermediate activation
(written and read once): the least any fused MoE must move; against the copy bandwidth and bf16 matmul peak
measured at the start (``timing.measure_ceilings``, as the other benchmarks), the time bound (memory or compute,
the larger) and each kernel's share of it. The case line shows ``touched 3/8  bound 12.3us  dl 62% pk 71%``; two
tables follow the speed table.

``--graph-check`` first runs every Hopper variant (and the plain kernel) captured once in a CUDA graph and replayed
on new inputs and routings (uniform and skewed, written into the captured buffers), each replay against the
reference vendor: the descriptors and grids captured must serve any routing of the same shape.

    python benchmarks/moe_bench.py --out moe_bench.json --budget-s 240 --candidates
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers, timing  # noqa: E402
from dlinfer import settings  # noqa: E402
from dlinfer.vendor.triton import tuning  # noqa: E402
from dlinfer.vendor.triton.tuning import _cfg  # noqa: E402  (the tables' own config builder)

# (name, experts, topk, hidden, inter): the anchors, then shapes no table lists.
SHAPES = [("mixtral", 8, 2, 4096, 14336), ("qwen3", 128, 8, 2048, 768), ("e64k6", 64, 6, 2048, 1408),
          ("e16k2", 16, 2, 4096, 6400), ("e256k8", 256, 8, 7168, 512), ("e32k1", 32, 1, 2048, 3584),
          ("e8k1", 8, 1, 1024, 512)]
TOKENS = [1, 64, 256, 512, 2048, 4096, 8192]


# Wide tiles for compute-bound calls (the peer's own shape on Hopper is 64 x 512 x 64, 8 warps, 3 stages).
EXTRA = [_cfg(64, (256, 64, 8, 8, 3), (256, 64, 8, 8, 3)),
         _cfg(64, (128, 64, 8, 4, 4), (256, 64, 8, 4, 4)),
         _cfg(128, (128, 64, 8, 8, 4), (256, 64, 8, 8, 4)),
         _cfg(128, (128, 128, 8, 8, 2), (256, 128, 8, 8, 2)),
         _cfg(64, (128, 64, 8, 8, 4), (256, 64, 8, 8, 4)),
         _cfg(128, (128, 64, 1, 8, 3), (256, 64, 1, 8, 3)),
         _cfg(128, (128, 64, 16, 8, 3), (256, 64, 16, 8, 4))]

# Tiles for the memory-bound range (decode batches, up to ~128 rows per expert), where the weights stream from HBM
# once: with K-fastest weights a tile row is BLOCK_K contiguous elements, so longer K steps (256) and deeper
# pipelines keep more of each weight row in flight per program; with the tiers' own shapes at one more stage and
# the H200 table's Mixtral 256-token config (128-row blocks, 8 warps) for comparison.
DECODE = [_cfg(16, (32, 256, 1, 4, 3), (32, 256, 1, 4, 3)),
          _cfg(32, (32, 256, 4, 4, 3), (64, 256, 4, 4, 3)),
          _cfg(32, (64, 128, 4, 4, 5), (64, 128, 4, 4, 5)),
          _cfg(64, (32, 256, 4, 4, 3), (32, 256, 4, 4, 3)),
          _cfg(64, (64, 256, 4, 8, 2), (64, 256, 4, 8, 2)),
          _cfg(64, (64, 128, 4, 4, 4), (64, 128, 4, 4, 4)),
          _cfg(64, (64, 128, 4, 8, 4), (128, 128, 4, 8, 3)),
          _cfg(64, (128, 64, 4, 4, 4), (128, 64, 4, 4, 4)),
          _cfg(64, (64, 64, 4, 4, 6), (128, 64, 4, 4, 5)),
          _cfg(128, (128, 64, 1, 8, 4), (128, 128, 1, 8, 3))]

# The peer's decode tile and neighbours. Its compact kernel on Hopper runs 64 x 256 x 32 tiles, 4 warps, 4 stages on
# the gate_up weight as one [2I, K] GEMM (silu_and_mul is a kernel of its own): 20 KB of shared memory a stage, two
# programs resident per SM. dlinfer's gate_up tile holds gate and up rows together (2 x BLOCK_N), so its footprint
# twin is BLOCK_N 128; the H100's former 24-96 rows tier (6 stages of 24 KB, now DECODE[8]) kept one program per SM,
# and a program's pipeline fill at its start was then not hidden behind another's. For --candidates-layout n-fastest
# above all (a tile row along N is then BLOCK_N contiguous elements), and K-fastest for comparison.
PEER_TILES = [_cfg(64, (128, 32, 4, 4, 4), (256, 32, 4, 4, 4)),
              _cfg(64, (128, 32, 4, 4, 5), (256, 32, 4, 4, 5)),
              _cfg(64, (64, 64, 4, 4, 4), (128, 64, 4, 4, 4)),
              _cfg(32, (128, 32, 4, 4, 4), (256, 32, 4, 4, 4)),
              _cfg(64, (256, 32, 4, 4, 4), (256, 32, 4, 4, 4))]

# Few-row tiles (under 8 rows per expert: decode batches on many experts) for N-fastest weights: 16-row blocks whose
# tile rows along N are 64-256 contiguous bytes and whose grid stays above the SM count on narrow intermediates
# (Qwen3-30B-A3B at one token: 8 experts x 768 / BLOCK_N programs for gate_up; Mixtral's down GEMM at one token:
# 2 experts x 4096 / BLOCK_N programs, 32 with the peer's 256-wide footprint).
N_DECODE = [_cfg(16, (64, 64, 1, 4, 4), (64, 64, 1, 4, 4)),
            _cfg(16, (64, 64, 1, 4, 6), (128, 64, 1, 4, 5)),
            _cfg(16, (64, 128, 1, 4, 4), (128, 64, 1, 4, 4)),
            _cfg(16, (128, 32, 1, 4, 4), (128, 64, 1, 4, 4)),
            _cfg(16, (128, 64, 1, 4, 4), (256, 64, 1, 4, 3)),
            _cfg(16, (32, 64, 1, 4, 6), (64, 128, 1, 4, 4)),
            _cfg(16, (128, 32, 1, 4, 6), (256, 32, 1, 4, 6)),
            _cfg(16, (64, 64, 1, 4, 4), (32, 128, 1, 4, 4)),
            _cfg(16, (32, 128, 1, 4, 4), (32, 128, 1, 4, 4))]  # the H100's K-fastest decode tier

# Candidate sets of whole tile configs (--candidate-sets name: the label their candidates are reported under).
TILE_SETS = {"decode": ("decode", DECODE), "peer": ("peer", PEER_TILES), "ndecode": ("ndec", N_DECODE)}


def tile_set_candidates(sets, in_force: dict, hot) -> list[tuple[str, dict]]:
    """(name, config): the whole tile configs of the :data:`TILE_SETS` named in ``sets`` other than the config in
    force, each with the hot experts' tiles ``hot``, named by their set's label and index."""
    return [(f"{label}{i}", dict(c, hot=hot)) for key, (label, tiles) in TILE_SETS.items() if key in sets
            for i, c in enumerate(tiles) if c != in_force]


# Hopper variants: field sets added to the config in force (the effect of each field alone), then whole configs
# for warp specialization (it takes effect with 4 warps and both operands on TMA).
HOPPER_FLAGS = [dict(TMA_B=1), dict(TMA_ACT=1, TMA_B=1), dict(TMA_A=1, TMA_B=1), dict(PERSISTENT=1),
                dict(TMA_B=1, PERSISTENT=1), dict(TMA_A=1, TMA_B=1, PERSISTENT=1), dict(MERGE=1),
                dict(TMA_B=1, MERGE=1), dict(TMA_ACT=1, TMA_B=1, MERGE=1)]
# Both tile classes in one launch of one program per possible tile (hot tiles first): the block scheduler balances
# the long hot tiles against the short ones, which a persistent MERGE loop's round-robin does not.
MERGE_FLAGS = [dict(MERGE_GRID=1), dict(TMA_B=1, MERGE_GRID=1)]
# The TMA variants alone (the leads of the Hopper set at 2048+ tokens, where the GEMMs are compute-bound): a quarter
# of the Hopper set's compiles, for sweeps over many large-token cases.
TMA_FLAGS = [dict(TMA_B=1), dict(TMA_A=1, TMA_B=1), dict(TMA_A=1, TMA_B=1, PERSISTENT=1)]
STREAM_FLAGS = [dict(HOT_STREAM=1), dict(HOT_STREAM=0)]  # the hot experts' GEMMs beside the others, or after them
HOPPER_WS = [_cfg(128, (64, 64, 8, 4, 4), (128, 64, 8, 4, 4), TMA_A=1, TMA_B=1, PERSISTENT=1, WS=1),
             _cfg(128, (64, 64, 8, 4, 4), (128, 64, 8, 4, 4), TMA_ACT=1, TMA_B=1, WS=1),
             _cfg(64, (128, 64, 8, 4, 3), (128, 64, 8, 4, 3), TMA_A=1, TMA_B=1, PERSISTENT=1, WS=1)]


def flag_candidates(in_force: dict, hot: dict, flag_sets) -> list[tuple[str, dict]]:
    """(name, config): ``in_force`` with each field set of ``flag_sets`` and the hot experts' tiles ``hot`` (given
    explicitly: a config passed to fused_moe gets no hot class otherwise)."""
    return [("+".join(f), dict(in_force, hot=hot, **f)) for f in flag_sets]


def hopper_candidates(in_force: dict, hot: dict) -> list[tuple[str, dict]]:
    """(name, config) of the Hopper variants for a case whose config in force is ``in_force`` and whose hot
    experts' tiles are ``hot``: :data:`HOPPER_FLAGS`, then the warp-specialized configs where ``DLINFER_MOE_WS=1``
    lets them run warp-specialized (opt-in: see ``moe.WS_COMPILES``; a hang stops the whole benchmark)."""
    out = flag_candidates(in_force, hot, HOPPER_FLAGS)
    if not settings.flag("DLINFER_MOE_WS"):
        return out
    out += [(f"ws{i}:" + "+".join(k for k in tuning.FLAGS if k != "WS" and c.get(k)), dict(c, hot=hot))
            for i, c in enumerate(HOPPER_WS)]
    return out


def rule_candidates(hot: dict) -> list[tuple[str, dict]]:
    """(name, config): each distinct config of every card table's load rules (``tuning.TABLES[...]["rules"]``),
    with the hot experts' tiles ``hot``: on a card whose table has no rules (or other ones), whether another
    card's measured rules would win here."""
    out, seen = [], []
    for card, table in tuning.TABLES.items():
        for _, _, _, cfg in table.get("rules", ()):
            if cfg not in seen:
                seen.append(cfg)
                flags = "+".join(k for k in tuning.FLAGS if cfg.get(k)) or "plain"
                out.append((f"rule BM{cfg['BLOCK_M']} {cfg['up']['num_stages']}st {flags}", dict(cfg, hot=hot)))
    return out


SPLIT_HOT_ROWS = (256, 512)  # the hot threshold of the split candidates: above the narrower experts' own loads


def split_candidates(in_force: dict, tiers, dtype, device) -> list[tuple[str, dict]]:
    """(name, config): each of the card's tier configs of half the config in force's row block, with its Hopper
    fields, serving every expert below ``SPLIT_HOT_ROWS`` rows, and the config in force for the experts above.
    Under skewed routing the mean load (which picks the config in force) counts the hot experts' rows: E16 top-2
    at 2048 tokens averages 256 rows per expert, but besides one expert of ~2000 rows the others hold ~136, which
    128-row blocks pad to 256."""
    hot = {k: v for k, v in in_force.items() if k not in ("hot", "hot_rows")}
    fields = {k: v for k, v in hot.items() if k in tuning.FIELDS}
    out, seen = [], set()
    for _, tier in tiers:
        c = tuning.fitted(tier, dtype, device)
        key = (c["BLOCK_M"], c["up"]["BLOCK_N"], c["down"]["BLOCK_N"])
        if 2 * c["BLOCK_M"] == hot["BLOCK_M"] and key not in seen:
            seen.add(key)
            out += [(f"split BM{key[0]} up{key[1]} down{key[2]} | in force >= {rows} rows",
                     dict(c, **fields, hot=hot, hot_rows=rows)) for rows in SPLIT_HOT_ROWS]
    return out


def hot_candidates(in_force: dict, hot: dict, tiers, dtype, device) -> list[tuple[str, dict]]:
    """(name, config): the config in force with narrower hot-expert tiles (each of the card's tier configs whose
    row block lies strictly between the config in force's and the hot one's and is a multiple of the former; its
    row block is then also the hot threshold), and with no hot class at all. Under skewed routing one or two hot
    experts on the widest tiles give few programs (e.g. 8 gate_up tiles of 128 x 256 over K = 7168 for one
    256-row expert of a 512-wide intermediate): narrower hot tiles trade weight re-reads for SMs."""
    out, seen = [], set()
    for _, tier in tiers:
        c = tuning.fitted(tier, dtype, device)
        bm = c["BLOCK_M"]
        key = (bm, c["up"]["BLOCK_N"], c["down"]["BLOCK_N"])
        if tuning.wider_rows(bm, in_force["BLOCK_M"]) and bm < hot["BLOCK_M"] and key not in seen:
            seen.add(key)
            out.append((f"hot BM{bm} up{key[1]} down{key[2]}", dict(in_force, hot=c)))
    if in_force["BLOCK_M"] < hot["BLOCK_M"]:
        out.append(("no hot class", dict(in_force, hot=None)))
    return out


def routing(tokens, experts, topk, skewed, gen):
    logits = torch.randn(tokens, experts, device=gen.device, generator=gen)
    if skewed:  # expert 0 is hot (in nearly every token's top-k), the rest get a random bias
        bias = 1.5 * torch.randn(experts, device=gen.device, generator=gen)
        bias[0] = 6.0
        logits += bias
    w, ids = torch.topk(torch.softmax(logits, -1), topk, dim=-1)
    return w, ids


def case_inputs(gen, experts, topk, hidden, tokens, skewed, dtype):
    """A case's hidden states and routing, drawn from ``gen`` reseeded for this case alone: the same case draws the
    same inputs whichever cases ran before it in the process (runs with other --tokens or --routings lists, or
    other settings in other processes, time the same routings)."""
    gen.manual_seed(((experts * 31 + hidden) * 8209 + tokens) * 2 + int(skewed))
    x = torch.randn(tokens, hidden, device=gen.device, dtype=dtype, generator=gen)
    return (x, *routing(tokens, experts, topk, skewed, gen))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def moe_bytes(topk_ids: torch.Tensor, hidden: int, inter: int, elem_size: int = 2) -> dict:
    """The least bytes a fused MoE on the routing ``topk_ids`` ([tokens, topk]) must move: each expert that gets a
    token reads its gate_up ([2 * inter, hidden]) and down ([hidden, inter]) weights once (``weight_bytes``); the
    input and the output (tokens x hidden) and the intermediate activation (tokens x topk x inter, written once and
    read once) add to that in ``min_bytes``. All at ``elem_size`` bytes an element; the routing weights and ids are
    left out (a few bytes a token), and so is a kernel's wider gate_up output (2 x inter): a floor, not a model."""
    tokens, topk = topk_ids.shape
    touched = int(torch.unique(topk_ids).numel())
    weight_bytes = touched * (2 * inter * hidden + hidden * inter) * elem_size
    act_bytes = (2 * tokens * hidden + 2 * tokens * topk * inter) * elem_size
    return dict(experts_touched=touched, weight_bytes=weight_bytes, min_bytes=weight_bytes + act_bytes)


def roofline(min_bytes: int, flops: float, dlinfer_us: float, peer_us: float, copy_gbps: float,
             matmul_tflops: float) -> dict:
    """``min_bytes`` (:func:`moe_bytes`) over each time (GB/s), and the time bound ``bound_us``: the larger of the
    bytes at the copy bandwidth ``copy_gbps`` (bytes read + written, :func:`timing.measure_ceilings`) and the
    ``flops`` at the bf16 matmul peak ``matmul_tflops`` (``bound``: which one), with each kernel's share of it
    (bound / its time; 1.0 = at the ceiling): :func:`timing.rates` of each time."""
    mine, peer = (timing.rates(min_bytes, flops, us, copy_gbps, matmul_tflops) for us in (dlinfer_us, peer_us))
    return dict(dlinfer_gbps=mine["gbps"], peer_gbps=peer["gbps"], copy_gbps=copy_gbps, matmul_tflops=matmul_tflops,
                bound_us=mine["bound_us"], bound=mine["bound"], dlinfer_of_bound=mine["pct_bound"] / 100,
                peer_of_bound=peer["pct_bound"] / 100)


def graph_check(tokens=384, experts=8, topk=2, hidden=1024, inter=768, replays=3) -> int:
    """Each Hopper variant (with hot-expert tiles) captured in a CUDA graph, replayed on new values; returns the
    number of failures (printed)."""
    from dlinfer.vendor.reference import moe as ref_moe
    from dlinfer.vendor.triton import moe as tmoe

    gen = torch.Generator(device="cuda").manual_seed(5)
    dtype = torch.bfloat16
    w_up = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=dtype, generator=gen) * hidden ** -0.5
    w_down = torch.randn(experts, hidden, inter, device="cuda", dtype=dtype, generator=gen) * inter ** -0.5
    x = torch.empty(tokens, hidden, device="cuda", dtype=dtype)
    tw = torch.empty(tokens, topk, device="cuda")
    ti = torch.empty(tokens, topk, device="cuda", dtype=torch.int64)

    def fill(skewed):
        x.copy_(torch.randn(tokens, hidden, device="cuda", generator=gen))
        w, ids = routing(tokens, experts, topk, skewed, gen)
        tw.copy_(w)
        ti.copy_(ids)

    narrow = _cfg(32, (64, 64, 4, 4, 3), (64, 64, 4, 4, 3))
    hot = _cfg(128, (64, 64, 8, 4, 4), (128, 64, 8, 4, 4))
    ws = [dict(TMA_A=1, TMA_B=1, WS=1), dict(TMA_ACT=1, TMA_B=1, PERSISTENT=1, WS=1)]  # opt-in (DLINFER_MOE_WS)
    variants = [("plain", {})] + [("+".join(f), f) for f in HOPPER_FLAGS + MERGE_FLAGS + [
        dict(TMA_A=1)] + (ws if settings.flag("DLINFER_MOE_WS") else []) + [dict(TMA_A=1, TMA_B=1, MERGE=1)]]
    failures = 0
    for name, flags in variants:
        cfg = dict(narrow, hot=hot, hot_rows=128, **flags)
        fill(False)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                tmoe.fused_moe(x, w_up, w_down, tw, ti, True, config=cfg)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = tmoe.fused_moe(x, w_up, w_down, tw, ti, True, config=cfg)
            errs = []
            for i in range(replays):
                fill(i % 2 == 1)
                graph.replay()
                torch.cuda.synchronize()
                errs.append(rel(out, ref_moe.fused_moe(x, w_up, w_down, tw, ti, True)))
            ok = all(e < 2e-2 for e in errs)
            print(f"graph check {name:32s} " + " ".join(f"{e:.1e}" for e in errs) + ("" if ok else "  FAIL"),
                  flush=True)
        except Exception as exc:  # noqa: BLE001 - reported as a failure
            ok = False
            print(f"graph check {name:32s} {type(exc).__name__}: {str(exc)[:200]}  FAIL", flush=True)
        failures += not ok
    return failures


def warm_worker(spec_path: str) -> int:
    """``--warm-worker SPEC``: run each config of the JSON ``SPEC`` once on zero inputs of its case's shape (the
    kernels compile for this GPU into Triton's on-disk cache, where the parent then finds them), appending a line
    ``index seconds ok|failed`` per config to ``SPEC["done"]`` once tried (its error message to stderr)."""
    from dlinfer.vendor.triton import moe as tmoe

    spec = json.loads(Path(spec_path).read_text())
    experts, topk, hidden, inter, tokens = (spec[k] for k in ("experts", "topk", "hidden", "inter", "tokens"))
    dtype, device = torch.bfloat16, spec.get("device", "cuda")
    if spec.get("n_fastest"):  # the candidates' weights are N-fastest: their own kernel variants
        w_up = torch.zeros(experts, hidden, 2 * inter, device=device, dtype=dtype).transpose(1, 2)
        w_down = torch.zeros(experts, inter, hidden, device=device, dtype=dtype).transpose(1, 2)
    else:
        w_up = torch.zeros(experts, 2 * inter, hidden, device=device, dtype=dtype)
        w_down = torch.zeros(experts, hidden, inter, device=device, dtype=dtype)
    x = torch.zeros(tokens, hidden, device=device, dtype=dtype)
    tw, ti = routing(tokens, experts, topk, spec["skewed"], torch.Generator(device=device).manual_seed(1))
    for index, cfg in zip(spec["indices"], spec["configs"]):
        t0, status = time.time(), "ok"
        try:
            tmoe.fused_moe(x, w_up, w_down, tw, ti, True, config=cfg)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - the parent reports it with the candidate
            status = "failed"
            print(f"candidate {index}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr, flush=True)
        with open(spec["done"], "a") as f:
            f.write(f"{index} {time.time() - t0:.2f} {status}\n")
    return 0


def read_warm_log(text: str) -> dict[int, tuple[float, bool]]:
    """The lines ``index seconds ok|failed`` of the workers' log -> {index: (seconds, ok)}."""
    out = {}
    for line in text.splitlines():
        index, seconds, status = line.split()
        out[int(index)] = (float(seconds), status == "ok")
    return out


def warm_candidates(configs: list[dict], shape: dict, workers: int, timeout_s: float,
                    free_bytes: int | None = None) -> tuple[int, float, dict[int, tuple[float, bool]]]:
    """Compile ``configs`` (the candidates of one case, ``shape`` its experts/topk/hidden/inter/tokens/skewed) in
    up to ``workers`` processes at once (:func:`warm_worker`), each holding one zero copy of the weights (at most
    40 % of the free GPU memory for all of them): a candidate's kernels compile in 30-60 s on a slow host, one at
    a time in this process, in parallel there. Workers still running after ``timeout_s`` are killed with their
    process groups (the compiler's subprocesses too). Returns (processes, seconds, {index of a config tried:
    (its seconds in the worker, whether it ran)}); (0, 0, empty) when not worth it. A worker that exits with an
    error has its stderr's tail printed, and so has one whose config failed."""
    import signal
    import subprocess
    import tempfile

    weight_bytes = 3 * shape["experts"] * shape["inter"] * shape["hidden"] * 2 + (600 << 20)  # + a CUDA context
    free = torch.cuda.mem_get_info()[0] if free_bytes is None else free_bytes
    n = min(workers, len(configs), int(0.4 * free // weight_bytes))
    if n < 2:
        return 0, 0.0, {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        done = Path(tmp) / "done.txt"
        done.touch()
        procs = []
        try:
            for w in range(n):
                path = Path(tmp) / f"warm_{w}.json"
                indices = list(range(w, len(configs), n))
                path.write_text(json.dumps(dict(shape, configs=[configs[i] for i in indices], indices=indices,
                                                done=str(done))))
                err = open(Path(tmp) / f"warm_{w}.err", "w")
                procs.append((subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--warm-worker",
                                                str(path)], stdout=subprocess.DEVNULL, stderr=err,
                                               start_new_session=True), err))
            for proc, err in procs:
                try:
                    code = proc.wait(timeout=max(1.0, t0 + timeout_s - time.time()))
                except subprocess.TimeoutExpired:
                    code = None
                err.flush()
                tail = Path(err.name).read_text()[-600:].strip()
                if code or tail:  # it died, or a config failed in it (its error)
                    print(f"   compile worker (exit code {code}): {tail}", flush=True)
        finally:
            for proc, err in procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
                err.close()
        tried = read_warm_log(done.read_text())
    return n, time.time() - t0, tried


def key_rows(key: str) -> float:
    """Mean rows per expert of a tuning key's token bucket (``bfloat16:E8:k2:H4096:I14336:T512`` -> 128)."""
    fields = {f[0]: f[1:] for f in key.split(":")[1:]}
    return int(fields["T"]) * int(fields["k"]) / int(fields["E"])


# A candidate the compile workers did not reach: what its first call costs in this process (compiles included) on
# a slow host, for the budget check before it.
COLD_CANDIDATE_S = 60.0


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--warm-worker"]:
        return warm_worker(argv[1])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="moe_bench.json")
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip remaining cases after this many seconds")
    ap.add_argument("--shapes", nargs="*", default=[s[0] for s in SHAPES])
    ap.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    ap.add_argument("--routings", nargs="*", default=["uniform", "skewed"], choices=["uniform", "skewed"])
    ap.add_argument("--candidates", action="store_true", help="also time EXTRA (uniform routing) and HOPPER configs")
    ap.add_argument("--candidates-from", type=float, default=128.0, help="rows per expert (default %(default)s)")
    ap.add_argument("--candidate-sets", nargs="*", default=["extra", "hopper"],
                    choices=["extra", "hopper", "tma", "hot", "merge", "stream", "rules", "split", "decode", "peer",
                             "ndecode", "grouped"],
                    help="which candidates --candidates times (default %(default)s)")
    ap.add_argument("--candidates-routings", nargs="*", default=["uniform", "skewed"], choices=["uniform", "skewed"],
                    help="routings the HOPPER variants are timed on (default %(default)s)")
    ap.add_argument("--autotune-shapes", nargs="*", default=["e32k1", "e8k1"],
                    help="shapes run as on a card without a table: the first call autotunes (default %(default)s)")
    ap.add_argument("--graph-check", action="store_true", help="first check the Hopper variants under CUDA graphs")
    ap.add_argument("--dlinfer-n-fastest", action="store_true",
                    help="also time dlinfer on the weights in the peer's N-fastest layout (speed_n_fastest)")
    ap.add_argument("--n-fastest-tiers", default="table", choices=["table", "footprint"],
                    help="the configs --dlinfer-n-fastest runs under on a card whose table has no N-fastest entries: "
                         "table (the card's own, as served) or footprint (tuning.footprint_tiers of the card's "
                         "tiers, the candidate N-fastest entries, in this process only)")
    ap.add_argument("--candidates-layout", default="k-fastest", choices=["k-fastest", "n-fastest"],
                    help="the weight layout the candidates are timed on (n-fastest: the peer's engine layout; with "
                         "--dlinfer-n-fastest, vs_in_force is against the config in force on that layout)")
    ap.add_argument("--compile-workers", type=int, default=min(8, (os.cpu_count() or 2) // 2),
                    help="processes that compile a case's candidates in parallel before they are timed, 0: none "
                         "(default %(default)s)")
    args = ap.parse_args(argv)
    import dlinfer.ops as ops
    from dlinfer.vendor import registry
    from dlinfer.vendor.reference import moe as ref_moe
    from dlinfer.vendor.triton import moe as tmoe

    graph_failures = graph_check() if args.graph_check else 0
    card_table = tuning.TABLES.get(torch.cuda.get_device_name())
    if args.n_fastest_tiers == "footprint" and card_table is not None and "n_fastest" not in card_table:
        card_table["n_fastest"] = dict(tiers=tuning.footprint_tiers(card_table["tiers"]),
                                       shapes={k: c for k, c in card_table["shapes"].items() if key_rows(k) > 96})
        print("N-fastest weights on candidate entries: footprint_tiers of this card's tiers (its exact shapes above "
              "96 rows per expert)", flush=True)
    t0 = time.time()
    dtype = torch.bfloat16
    flush = timing.Flusher("cuda")
    lmd = peers.load_lmdeploy()

    def gpu_us(fn):
        return timing.graph_gpu_time(fn, flush, reps=10, target_us=2000).us

    ceilings = timing.measure_ceilings("cuda", copy_gib=2)  # as the other benchmarks measure them
    copy_gbps, matmul_tflops = ceilings.copy_gbps, ceilings.matmul_tflops
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cache=str(tuning.cache_dir()),
                  ceilings=ceilings.to_dict(), cases=[], skipped=[])
    print(f"{result['device']}  torch {torch.__version__}  copy {copy_gbps:.0f} GB/s  bf16 matmul "
          f"{matmul_tflops:.0f} TFLOP/s  tuning: "
          + " | ".join(tuning.describe()), flush=True)

    for name, experts, topk, hidden, inter in SHAPES:
        if name not in args.shapes:
            continue
        card = torch.cuda.get_device_name()
        hidden_table = tuning.TABLES.pop(card, None) if name in args.autotune_shapes else None
        gen = torch.Generator(device="cuda").manual_seed(experts * 31 + hidden + 7)
        w_up = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=dtype, generator=gen) * hidden ** -0.5
        w_down = torch.randn(experts, hidden, inter, device="cuda", dtype=dtype, generator=gen) * inter ** -0.5
        pw_up, pw_down = peers.lmdeploy_moe_weights(w_up, w_down)
        for tokens in args.tokens:
            for rt in args.routings:
                if time.time() - t0 > args.budget_s:
                    result["skipped"].append(f"{name} T={tokens} {rt}")
                    continue
                x, tw, ti = case_inputs(gen, experts, topk, hidden, tokens, rt == "skewed", dtype)
                load = torch.bincount(ti.flatten(), minlength=experts).float()
                sub = min(tokens, 128)
                ref = ref_moe.fused_moe(x[:sub], w_up, w_down, tw[:sub], ti[:sub], True)
                assert registry.select(registry.Call("fused_moe", "cuda", dtype))[0].name == "triton"

                def ours():
                    return ops.fused_moe(x, w_up, w_down, tw, ti, topk, True)

                def peer():  # on the tensors dlinfer gets
                    return peers.lmdeploy_fused_moe(lmd, x, w_up, w_down, tw, ti, topk, True)

                def peer_engine():  # on its weights in the layout stock LMDeploy serves them in
                    return peers.lmdeploy_fused_moe(lmd, x, pw_up, pw_down, tw, ti, topk, True)

                t_first = time.time()
                out = ours()  # the first eager call: where an autotune on first use happens
                torch.cuda.synchronize()
                first_s = time.time() - t_first
                err, peer_err = rel(out[:sub], ref), rel(peer()[:sub], ref)
                peer_engine_err = rel(peer_engine()[:sub], ref)
                peer_shared_us, peer_engine_us, our_us = gpu_us(peer), gpu_us(peer_engine), gpu_us(ours)
                peer_us = min(peer_shared_us, peer_engine_us)  # the peer at its faster layout
                src = tuning.launch_config(x.device, dtype, experts, topk, hidden, inter, tokens)
                in_force = [ln for ln in tuning.describe() if tuning.shape_key(dtype, experts, topk, hidden, inter,
                                                                               tokens) in ln]
                nbytes = moe_bytes(ti, hidden, inter, w_up.element_size())  # the routing used, for the roofline
                case = dict(shape=name, experts=experts, topk=topk, hidden=hidden, inter=inter, tokens=tokens,
                            routing=rt, max_load_x_mean=round(float(load.max() / load.mean()), 2),
                            rel_err=err, peer_rel_err=max(peer_err, peer_engine_err), peer_us=peer_us,
                            peer_shared_us=peer_shared_us, peer_engine_us=peer_engine_us, dlinfer_us=our_us,
                            speed=peer_us / our_us, speed_shared=peer_shared_us / our_us, config=src,
                            source=in_force, first_call_s=round(first_s, 2),
                            tflops=6.0 * tokens * topk * hidden * inter / our_us / 1e6, **nbytes,
                            **roofline(nbytes["min_bytes"], 6.0 * tokens * topk * hidden * inter, our_us, peer_us,
                                       copy_gbps, matmul_tflops), extra=[])
                print(f"{name:7s} T={tokens:5d} {rt:7s} load {case['max_load_x_mean']:5.1f}x  peer {peer_us:8.1f} "
                      f"(engine {peer_engine_us:.1f}, shared {peer_shared_us:.1f}) dlinfer {our_us:8.1f} us  "
                      f"{case['speed']:.2f}x ({case['speed_shared']:.2f}x shared)  err {err:.1e} "
                      f"(peer {case['peer_rel_err']:.1e})  "
                      f"first call {first_s:.1f}s  touched {case['experts_touched']}/{experts}  bound "
                      f"{case['bound_us']:.1f}us ({case['bound']})  dl {case['dlinfer_of_bound']:.0%} "
                      f"pk {case['peer_of_bound']:.0%}",
                      flush=True)
                if args.dlinfer_n_fastest:  # dlinfer on the peer's layout, read in place (by TMA where TMA_B is set)
                    def ours_n_fastest():
                        return ops.fused_moe(x, pw_up, pw_down, tw, ti, topk, True)

                    nf_err = rel(ours_n_fastest()[:sub], ref)
                    nf_us = gpu_us(ours_n_fastest)
                    case.update(dlinfer_n_fastest_us=nf_us, dlinfer_n_fastest_rel_err=nf_err,
                                speed_n_fastest=peer_us / nf_us,
                                config_n_fastest=tuning.launch_config(x.device, dtype, experts, topk, hidden, inter,
                                                                      tokens, n_fastest=True))
                    print(f"   dlinfer on N-fastest weights {nf_us:8.1f} us  {peer_us / nf_us:.2f}x peer  "
                          f"{our_us / nf_us:.2f}x K-fastest  err {nf_err:.1e}", flush=True)
                rows = tokens * topk / experts
                cw_up, cw_down, base_us = w_up, w_down, our_us  # the candidates' weights, and the time to beat
                if args.candidates_layout == "n-fastest":  # the candidates vary the config in force on them
                    cw_up, cw_down = pw_up, pw_down
                    base_us = case.get("dlinfer_n_fastest_us", our_us)
                    src = tuning.launch_config(x.device, dtype, experts, topk, hidden, inter, tokens, n_fastest=True)
                cands = []
                if args.candidates and rows >= args.candidates_from:
                    if "grouped" in args.candidate_sets:  # the routing decides nothing in it: every routing
                        cands.append(("grouped_mm", dict(src, GROUPED_MM=1)))
                    if "extra" in args.candidate_sets and rt == "uniform":
                        cands += [("extra", c) for c in EXTRA if c != src]
                    if rt in args.candidates_routings:  # the sets built around the hot experts' tiles
                        hot = tuning.hot_config(x.device, dtype, experts, topk, hidden, inter, tokens,
                                                above=src["BLOCK_M"],
                                                n_fastest=args.candidates_layout == "n-fastest")
                        if "hopper" in args.candidate_sets:
                            cands += hopper_candidates(src, hot)
                        elif "tma" in args.candidate_sets:  # a subset of the Hopper set
                            cands += flag_candidates(src, hot, TMA_FLAGS)
                        if "merge" in args.candidate_sets:
                            cands += flag_candidates(src, hot, MERGE_FLAGS)
                        if "stream" in args.candidate_sets and tuning.wider_rows(hot["BLOCK_M"], src["BLOCK_M"]) \
                                and hot["BLOCK_M"] <= tokens:
                            cands += flag_candidates(src, hot, STREAM_FLAGS)  # only where there is a hot class
                        if "rules" in args.candidate_sets:
                            cands += rule_candidates(hot)
                        table = hidden_table or tuning.TABLES.get(card) or dict(tiers=tuning.GENERIC_TIERS)
                        if "hot" in args.candidate_sets:
                            cands += hot_candidates(src, hot, table["tiers"], dtype, x.device)
                        cands += tile_set_candidates(args.candidate_sets, src, hot)
                        if "split" in args.candidate_sets:
                            cands += split_candidates(src, table["tiers"], dtype, x.device)
                # Each candidate compiles its own kernels (30-60 s a candidate on a slow host): compiled in parallel
                # first, then one is started only when the budget still holds the slowest one so far.
                warmed = {}
                if cands and args.compile_workers > 0 and time.time() - t0 < args.budget_s:
                    shape = dict(experts=experts, topk=topk, hidden=hidden, inter=inter, tokens=tokens,
                                 skewed=rt == "skewed", n_fastest=args.candidates_layout == "n-fastest")
                    # at most half of what is left: the candidates still have to be timed
                    procs, secs, warmed = warm_candidates([c for _, c in cands], shape, args.compile_workers,
                                                          (args.budget_s - (time.time() - t0)) / 2)
                    if procs:
                        case["compile_s"] = round(secs, 1)
                        print(f"   {len(warmed)} of {len(cands)} candidates compiled in {secs:.0f} s by {procs} "
                              f"processes", flush=True)
                slowest, skipped = 0.0, 0
                cold_s = max([COLD_CANDIDATE_S] + [secs for secs, _ in warmed.values()])  # one not compiled ahead
                for i, (label, cfg) in enumerate(cands):
                    if i in warmed and not warmed[i][1]:  # its worker's error was printed above
                        case["extra"].append(dict(label=label, config=cfg, us=float("inf"), rel_err=float("nan"),
                                                  speed=0.0, vs_in_force=0.0, failed="in its compile worker"))
                        print(f"   {label:28s} failed in its compile worker (not run again)", flush=True)
                        continue
                    if time.time() - t0 + (slowest if i in warmed else max(slowest, cold_s)) > args.budget_s:
                        skipped += 1
                        continue
                    t_cand = time.time()
                    try:
                        e = rel(tmoe.fused_moe(x, cw_up, cw_down, tw, ti, True, config=cfg)[:sub], ref)
                        us = gpu_us(lambda: tmoe.fused_moe(x, cw_up, cw_down, tw, ti, True, config=cfg)) \
                            if e < 2e-2 else float("inf")
                    except Exception as exc:  # noqa: BLE001 - a tile that cannot launch here is skipped
                        e, us = float("nan"), float("inf")
                        print(f"   candidate {label} {cfg}: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
                    case["extra"].append(dict(label=label, config=cfg, us=us, rel_err=e, speed=peer_us / us,
                                              vs_in_force=base_us / us, layout=args.candidates_layout))
                    if label != "extra":
                        print(f"   {label:28s} {us:8.1f} us  {peer_us / us:.2f}x peer  {base_us / us:.2f}x in force  "
                              f"err {e:.1e}  {time.time() - t_cand:.0f} s", flush=True)
                    slowest = max(slowest, time.time() - t_cand)
                    # the case so far, candidates included: a run killed mid-case keeps what it timed
                    Path(args.out).write_text(json.dumps({**result, "cases": [*result["cases"], case]}, indent=1))
                if skipped:
                    case["candidates_skipped"] = skipped
                    print(f"   budget: {skipped} candidates of this case skipped (a timed one took up to "
                          f"{slowest:.0f} s here, one not compiled ahead ~{cold_s:.0f} s)", flush=True)
                result["cases"].append(case)
                Path(args.out).write_text(json.dumps(result, indent=1))  # after every case: a killed run keeps them
                best_extra = min(case["extra"], key=lambda c: c["us"], default=None)
                if best_extra:
                    print(f"   best extra {peer_us / best_extra['us']:.2f}x peer", flush=True)
                del x, tw, ti, ref, out
        del w_up, w_down, pw_up, pw_down
        torch.cuda.empty_cache()
        if hidden_table is not None:
            tuning.TABLES[card] = hidden_table
    Path(args.out).write_text(json.dumps(result, indent=1))
    tables = [("speed", "{:7.2f}", f"fused_moe speed vs LMDeploy at its faster weight layout (peer us / dlinfer "
                                    f"us), {result['device']}:"),
              ("speed_shared", "{:7.2f}", "fused_moe speed vs LMDeploy on the same tensors as dlinfer:")]
    ceiling = f"copy {copy_gbps:.0f} GB/s, matmul {matmul_tflops:.0f} TFLOP/s"
    tables += [(f"{who}_of_bound", "{:7.0%}", f"{title} at the roofline (bound us / {who} us; {ceiling}):")
               for who, title in (("dlinfer", "dlinfer"), ("peer", "LMDeploy"))]
    for key, fmt, title in tables:
        print(f"\n{title}")
        for rt in args.routings:
            print(f"  {rt:8s}" + "".join(f"{t:>7d}" for t in args.tokens))
            for name, *_ in SHAPES:
                row = {c["tokens"]: c[key] for c in result["cases"] if c["shape"] == name and c["routing"] == rt}
                if row:
                    print(f"  {name:8s}" + "".join(fmt.format(row[t]) if t in row else "      -"
                                                   for t in args.tokens))
    if not result["cases"]:
        print("no case ran")
        return 1
    labels = sorted({c["label"] for case in result["cases"] for c in case["extra"] if c["label"] != "extra"})
    if labels:
        print("\nHopper variants: speed over the config in force (in-force us / variant us), min / median / max "
              "over the cases timed (uniform | skewed):")
        for label in labels:
            parts = []
            for rt in args.routings:
                v = sorted(c["vs_in_force"] for case in result["cases"] if case["routing"] == rt
                           for c in case["extra"] if c["label"] == label)
                parts.append(f"{v[0]:.2f} / {v[len(v) // 2]:.2f} / {v[-1]:.2f} ({len(v)})" if v else "-")
            print(f"  {label:28s} " + " | ".join(parts))
    worst = min((c["speed"], c["shape"], c["tokens"], c["routing"]) for c in result["cases"])
    bad = [c for c in result["cases"] if not c["rel_err"] < 2e-2]
    print(f"worst {worst[0]:.2f}x ({worst[1]} T={worst[2]} {worst[3]}); {len(bad)} cases over 2e-2 rel err; "
          f"skipped {len(result['skipped'])}; {time.time() - t0:.0f} s")
    if graph_failures:
        print(f"{graph_failures} Hopper variants failed the CUDA-graph check (see 'graph check' lines)")
    return 0 if not bad and not graph_failures else 1


if __name__ == "__main__":
    sys.exit(main())
