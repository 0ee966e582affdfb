"""Launch configurations of the fused-MoE GEMMs from the card at hand: shipped tables, a disk cache, an autotune.

Where a config comes from, first match wins (per card name, dtype and shape bucket):

1. **the tuning cache**: configs measured on this card by ``dlinfer tune`` or by an autotune on first use, in
   ``<cache dir>/tuning/moe-<card>.json``. The cache dir is ``$DLINFER_CACHE_DIR`` when set, else
   ``$XDG_CACHE_HOME/dlinfer``, else ``~/.cache/dlinfer`` (never inside the installed package). To ship configs
   to other machines with the same card, copy that file into their cache dir (or point ``DLINFER_CACHE_DIR`` at
   a directory holding it); to clear them, ``dlinfer tune --clear`` (or delete the file).
2. **a shipped per-card table** (:data:`TABLES`), for the cards it was measured on, matched by the exact device
   name ``torch.cuda.get_device_name()`` reports: the rows-per-expert tiers, replaced where the table's rules
   name a config for that load and shape (:func:`rule_config`), refined by exact shape entries.
3. **an autotune on first use** on any other card: the first call of a shape bucket that is outside CUDA-graph
   capture times a bounded set of candidates (:data:`CANDIDATES`, at most ``AUTOTUNE_MAX_S`` seconds) on the
   call's own tensors, keeps the fastest whose output agrees with the first candidate's, and writes it to the
   cache. Engines run eager warm-up passes before they capture graphs or time anything, so the tune lands there;
   ``DLINFER_AUTOTUNE=0`` turns it off.
4. otherwise (inside graph capture before any eager call, on CPU under the interpreter, autotune off) the generic
   tiers: the H100's table with smaller pipeline stages at 24-96 rows per expert (:data:`GENERIC_TIERS`).

The shape bucket is ``dtype, E, top-k, hidden, intermediate`` and the token count rounded up to a power of two.
:func:`describe` (shown by ``dlinfer info``) says which configs are in force and where each came from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path

from dlinfer import settings

logger = logging.getLogger("dlinfer")

# ---------------------------------------------------------------------------------------------- shipped tables


# Hopper variants of the grouped GEMM, per config (moe.py's module doc): 0/1, absent = 0.
FLAGS = ("TMA_A", "TMA_ACT", "TMA_B", "PERSISTENT", "WS", "MERGE", "MERGE_GRID")
# Every 0/1 config field: the Hopper variants, HOT_STREAM (the hot experts' GEMMs on their own CUDA stream;
# absent = the DLINFER_MOE_HOT_STREAM setting) and GROUPED_MM (the call served by torch's grouped GEMM instead of
# the Triton kernels: moe.grouped_mm_serves says where it can be).
FIELDS = FLAGS + ("HOT_STREAM", "GROUPED_MM")


def _cfg(block_m, up, down, **flags):
    """``up``/``down`` = (BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); ``flags``: :data:`FIELDS` set."""
    keys = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    unknown = set(flags) - set(FIELDS)
    if unknown:
        raise ValueError(f"_cfg: unknown config fields {sorted(unknown)} (known: {', '.join(FIELDS)})")
    return dict(BLOCK_M=block_m, up=dict(zip(keys, up)), down=dict(zip(keys, down)),
                **{k: int(v) for k, v in flags.items()})


# Tiers by expected rows per expert (T * topk / E), smallest first: (upper bound, config). BLOCK_M is shared by
# both GEMMs (the sorting's padding unit); "up" = gate_up GEMM + SiLU (BLOCK_N gate and BLOCK_N up
# rows in one interleaved tile), "down" = down GEMM.
# Decode tiers stream the weights with narrow programs; prefill tiers are compute-bound (large tiles, GROUP_M
# swizzle for L2 reuse). Measured on an H100 SXM (CUDA-graph replay, L2 flushed, against LMDeploy's kernel). The
# 24-96 rows tier: 64 x 128 K steps with 8 warps on a 4-stage (gate_up) / 3-stage (down) pipeline, timed against the
# former 64-wide 6/5-stage tiles in the same process: 1.00-1.03x as fast (median 1.009x, the lowest 0.9997x) in 14
# cases (Mixtral at 128-384 tokens, E16 top-2 H4096 I6400 at 320 and 384, uniform and skewed routing); the former
# tiles stay an autotune candidate below.
_H100_MID_6STAGE = _cfg(64, (64, 64, 4, 4, 6), (128, 64, 4, 4, 5))
H100_TIERS: list[tuple[float, dict]] = [
    (8, _cfg(16, (32, 128, 1, 4, 4), (32, 128, 1, 4, 4))),
    (24, _cfg(32, (64, 128, 4, 4, 4), (64, 128, 4, 4, 4))),
    (96, _cfg(64, (64, 128, 4, 8, 4), (128, 128, 4, 8, 3))),
    (192, _cfg(64, (64, 64, 8, 4, 4), (128, 64, 8, 4, 4))),
    (math.inf, _cfg(128, (128, 64, 8, 8, 3), (256, 64, 8, 8, 3))),
]

# Measured on an H200 (2026-12-04): a coordinate-descent sweep per shape against LMDeploy's kernel in the same
# run (benchmarks/moe_tune.py) gave the best config per measured shape; from 96 rows per expert up, 128-row
# blocks with 2 x 128-wide gate_up tiles and 256-wide down tiles (4 stages) won the candidate comparisons of
# benchmarks/moe_bench.py --candidates on six shapes with the single-MMA gate_up kernel (the upper tier).
H200_TIERS: list[tuple[float, dict]] = [
    (2, _cfg(16, (32, 128, 1, 4, 4), (32, 128, 1, 4, 4))),
    (10, _cfg(16, (32, 128, 4, 4, 4), (64, 128, 1, 4, 3))),
    (24, _cfg(32, (64, 128, 8, 4, 3), (64, 128, 4, 4, 3))),
    (96, _cfg(64, (64, 64, 1, 4, 4), (128, 64, 8, 8, 4))),
    (math.inf, _cfg(128, (128, 64, 8, 8, 4), (256, 64, 8, 8, 4))),
]
H200_SHAPES: dict[str, dict] = {
    "bfloat16:E8:k2:H4096:I14336:T1": _cfg(16, (32, 128, 1, 4, 4), (32, 128, 1, 4, 4)),
    "bfloat16:E8:k2:H4096:I14336:T64": _cfg(32, (64, 128, 4, 4, 4), (64, 128, 1, 4, 3)),
    "bfloat16:E8:k2:H4096:I14336:T256": _cfg(128, (128, 64, 1, 8, 4), (128, 128, 1, 8, 3)),
    "bfloat16:E8:k2:H4096:I14336:T512": _cfg(128, (128, 64, 8, 8, 4), (128, 64, 8, 8, 4)),
    "bfloat16:E8:k2:H4096:I14336:T2048": _cfg(128, (128, 64, 16, 8, 3), (256, 64, 16, 8, 4)),
    "bfloat16:E8:k2:H4096:I14336:T4096": _cfg(128, (128, 64, 16, 8, 3), (256, 64, 8, 8, 3)),
    "bfloat16:E8:k2:H4096:I14336:T8192": _cfg(128, (128, 64, 8, 8, 3), (256, 64, 8, 8, 3)),
    "bfloat16:E128:k8:H2048:I768:T1": _cfg(16, (32, 128, 1, 4, 4), (128, 128, 1, 8, 3)),
    "bfloat16:E128:k8:H2048:I768:T64": _cfg(16, (32, 128, 1, 4, 4), (64, 128, 1, 4, 3)),
    "bfloat16:E128:k8:H2048:I768:T256": _cfg(32, (64, 128, 16, 4, 3), (64, 128, 4, 4, 3)),
    "bfloat16:E128:k8:H2048:I768:T512": _cfg(64, (64, 128, 4, 4, 3), (128, 64, 8, 4, 4)),
    "bfloat16:E64:k6:H2048:I1408:T1": _cfg(16, (32, 128, 1, 4, 4), (32, 128, 1, 4, 4)),
    "bfloat16:E64:k6:H2048:I1408:T64": _cfg(16, (32, 128, 4, 4, 4), (64, 128, 1, 4, 3)),
    "bfloat16:E64:k6:H2048:I1408:T256": _cfg(32, (64, 128, 8, 4, 3), (128, 64, 4, 4, 4)),
    "bfloat16:E64:k6:H2048:I1408:T512": _cfg(64, (64, 64, 1, 4, 4), (128, 64, 1, 8, 4)),
    "bfloat16:E16:k2:H4096:I6400:T1": _cfg(16, (64, 128, 1, 4, 3), (32, 128, 1, 4, 4)),
    "bfloat16:E16:k2:H4096:I6400:T64": _cfg(32, (64, 128, 1, 4, 3), (32, 128, 1, 4, 4)),
    "bfloat16:E16:k2:H4096:I6400:T256": _cfg(64, (64, 64, 1, 4, 4), (64, 128, 1, 4, 3)),
    "bfloat16:E16:k2:H4096:I6400:T512": _cfg(64, (64, 64, 16, 4, 4), (128, 64, 8, 8, 4)),
    "bfloat16:E16:k2:H4096:I6400:T4096": _cfg(128, (128, 64, 16, 8, 3), (256, 64, 8, 8, 3)),
    "bfloat16:E256:k8:H7168:I512:T1": _cfg(16, (32, 128, 4, 4, 4), (128, 64, 1, 4, 4)),
}

# Configs by load and shape that replace a table's tier config, per card: (rows per expert [lo, hi), intermediate
# size [lo, hi), least experts, config), first match wins; never the hot experts' tiles (a rule is measured on the
# calls whose own load it names). Measured on an H100 SXM (CUDA-graph replay, L2 flushed, uniform and skewed
# routing, each variant against the config in force in the same process; 2048-8192 tokens):
# * from 256 rows per expert, the widest tier's tiles with 4 pipeline stages (not 3) and both GEMM operands read by
#   TMA on wide intermediates (Mixtral E8 top-2 I14336, E16 top-2 I6400: TMA 1.00-1.23x the plain 3-stage config in
#   12 of 12 cases, 4 stages a further 1.04-1.13x in 8 of 8), the weights alone on narrow ones (TMA_A cost 2-15 % on
#   I512-I1408, TMA_B gave 0.99-1.08x; 4 stages a further 1.06-1.09x on Qwen3-30B-A3B at 256 rows);
# * on narrow intermediates (<= 1024) of many experts (>= 64), the same 128-row, 4-stage tiles from 64 rows per
#   expert instead of the 64-row tiers: 1.07-1.12x in 6 of 6 cases (E256 top-8 H7168 I512 at 64 and 128 rows,
#   Qwen3-30B-A3B at 128 rows, both routings); fewer experts keep the narrow tiers (fewer programs than SMs).
_WIDE4 = _cfg(128, (128, 64, 8, 8, 4), (256, 64, 8, 8, 4))
H100_RULES: list[tuple[tuple[float, float], tuple[float, float], int, dict]] = [
    ((256, math.inf), (4096, math.inf), 1, dict(_WIDE4, TMA_A=1, TMA_B=1)),
    ((256, math.inf), (0, 4096), 1, dict(_WIDE4, TMA_B=1)),
    ((64, 256), (0, 1025), 64, _WIDE4),
]

# N-fastest expert weights (``[E, N, K]`` with N the unit-stride dimension, the layout stock LMDeploy serves on CUDA)
# stream each K step's B tile as BLOCK_K rows of contiguous N, not BLOCK_N rows of contiguous K, so their best decode
# tiles differ. On an H100 SXM (CUDA-graph replay, L2 flushed, each against the config in force in one process;
# Mixtral E8 top-2 H4096 I14336 and E64 top-6 H2048 I1408 at 128 and 256 tokens, uniform and skewed routing: 12-64
# rows per expert), the peer's footprint on those weights (64 rows, gate and up 2 x 128 wide, K steps of 32, 4 warps,
# 4 stages: two programs resident per SM) ran 1.01-1.08x the 8-96 rows tiers' time in 8 of 8 cases. (In E64's two
# skewed cases it ran without a hot class; in force, experts of 128 rows or more take the 128-row hot tiles, as on
# K-fastest weights: that combination is not timed yet.) Below 8 rows the K-fastest decode tier (32-wide tiles of
# 128-K steps: 64 contiguous bytes per K row of an N-fastest weight) ran 0.83-0.88x the peer on Qwen3-30B-A3B and E64
# top-6 at 64 tokens (4-6 rows, both routings; 3029af8, H100), where the peer reads those weights with its footprint:
# so the footprint serves the loads up to 96 rows (from a quarter row up since: see _N_DECODE). Timed since on the
# H100 (5 shapes x 1-2048 tokens x uniform and skewed routing, both layouts in one process): from 64 tokens
# N-fastest experts ran 0.92-1.11x as fast as K-fastest ones (below the peer in 17 of 40 cells against K-fastest's
# 22, the worst 0.92x against 0.87x), at 1 token 0.78-0.90x as fast (still 1.05-1.11x the peer); Mixtral-8x7B
# end to end 1.067x stock against K-fastest's 1.036x (interleaved passes, 95 % intervals apart): the table's
# N-fastest entries make N-fastest the layout this card prefers (preferred_layout).
_PEER_FOOTPRINT = _cfg(64, (128, 32, 4, 4, 4), (256, 32, 4, 4, 4))

# Up to a quarter row per expert (one token on 8 experts top-2; up to 4 tokens on 128 experts top-8) few experts are
# touched and the footprint's wide tiles leave the grid short of the SMs (Mixtral's down GEMM at one token: 2 experts
# x 4096 / 256 = 32 programs): 16-row blocks of 64-wide gate_up and 128-wide down tiles, 6 and 5 stages, ran
# 1.12-1.20x the footprint at one token on Mixtral, Qwen3-30B-A3B, E64 top-6 and E16 top-2 (uniform and skewed),
# level with the K-fastest decode tier on K-fastest weights, and 0.99x on Qwen3-30B-A3B at 4 tokens (H100, e432433).
# From half a row per expert to 12 rows the same tiles ran 0.94-1.11x the footprint: it keeps that range.
_N_DECODE = _cfg(16, (64, 64, 1, 4, 6), (128, 64, 1, 4, 5))


def footprint_tiers(tiers: list[tuple[float, dict]]) -> list[tuple[float, dict]]:
    """N-fastest tiers from a card's K-fastest ``tiers``: :data:`_N_DECODE` up to a quarter row per expert, the peer's
    footprint for every tier up to 96 rows per expert, the card's own tiles above."""
    return [(0.25, _N_DECODE)] + [(bound, _PEER_FOOTPRINT if bound <= 96 else cfg) for bound, cfg in tiers]


H100_N_FASTEST_TIERS = footprint_tiers(H100_TIERS)

# Per-card tables: exact device name -> {"tiers": [...], "shapes": {bucket key: config}, optionally
# "hot_small_load": rows per expert (see hot_loads), "rules": configs by load and shape (see H100_RULES) and
# "n_fastest": entries (tiers, shapes, rules) that replace the table's own for N-fastest expert weights}.
# Only cards measured.
TABLES: dict[str, dict] = {
    "NVIDIA H100 80GB HBM3": dict(tiers=H100_TIERS, shapes={}, hot_small_load=128, rules=H100_RULES,
                                  n_fastest=dict(tiers=H100_N_FASTEST_TIERS)),
    "NVIDIA H200": dict(tiers=H200_TIERS, shapes=H200_SHAPES),
}

# The generic fallback when nothing else applies (see the module doc, case 4): the H100's tiers, but at 24-96 rows
# the former 64-wide tiles: their 24 KB pipeline buffers leave four buffers in flight on a card with 99 KB of shared
# memory per block, where the H100's 48 KB ones leave two (fit() trims stages to the card).
GENERIC_TIERS = [(bound, _H100_MID_6STAGE if bound == 96 else cfg) for bound, cfg in H100_TIERS]

# Autotune candidates, tried in this order after the generic tier's own config (bounded: AUTOTUNE_MAX_S).
CANDIDATES: list[dict] = [cfg for _, cfg in H100_TIERS] + [
    _H100_MID_6STAGE,
    _cfg(16, (64, 128, 1, 4, 3), (64, 128, 1, 4, 3)),
    _cfg(32, (128, 64, 4, 4, 3), (128, 64, 4, 4, 4)),
    _cfg(64, (128, 64, 8, 8, 3), (128, 64, 8, 8, 4)),
    _cfg(128, (128, 64, 8, 8, 4), (128, 64, 8, 8, 4)),
    _cfg(128, (128, 64, 8, 8, 4), (256, 64, 8, 8, 4)),
    _cfg(64, (256, 64, 8, 8, 3), (256, 64, 8, 8, 3)),
    _cfg(128, (128, 64, 16, 8, 3), (256, 64, 16, 8, 4)),
] + [
    # Hopper variants (moe.py): last, so every config above is still timed first within AUTOTUNE_MAX_S, and like
    # every candidate they are only picked when measured fastest (a card without TMA runs them on the pointer
    # path). Never a warp-specialized one: a candidate whose kernel does not finish hangs the first call (see
    # moe.WS_COMPILES), which no time bound here can stop.
    _cfg(128, (128, 64, 8, 8, 4), (256, 64, 8, 8, 4), TMA_B=1),
    _cfg(128, (128, 64, 8, 8, 4), (256, 64, 8, 8, 4), TMA_ACT=1, TMA_B=1),
    _cfg(128, (128, 64, 8, 8, 4), (256, 64, 8, 8, 4), TMA_A=1, TMA_B=1),
]
AUTOTUNE_MAX_S = 20.0  # per shape bucket
AUTOTUNE_REPS = 5

# ---------------------------------------------------------------------------------------------- keys, cache


def token_bucket(tokens: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(int(tokens), 1))))


def shape_key(dtype, experts: int, topk: int, hidden: int, inter: int, tokens: int, n_fastest: bool = False) -> str:
    """The bucket a config is stored under (the card is the cache file / table); ``:N`` ends the key of N-fastest
    expert weights (tuned apart: their best tiles differ)."""
    dt = str(dtype).replace("torch.", "")
    return f"{dt}:E{experts}:k{topk}:H{hidden}:I{inter}:T{token_bucket(tokens)}" + (":N" if n_fastest else "")


def card_slug(card: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown"


def cache_dir() -> Path:
    """Where tuned configs live (``$DLINFER_CACHE_DIR``, else the user cache dir; read at every call)."""
    explicit = settings.text("DLINFER_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dlinfer"


def cache_file(card: str) -> Path:
    return cache_dir() / "tuning" / f"moe-{card_slug(card)}.json"


def _valid(cfg) -> bool:
    if not isinstance(cfg, dict) or not isinstance(cfg.get("BLOCK_M"), int) or cfg["BLOCK_M"] < 16:
        return False
    need = {"BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
    if any(cfg.get(f, 0) not in (0, 1) for f in FIELDS):
        return False
    return all(isinstance(cfg.get(g), dict) and need <= set(cfg[g])
               and all(isinstance(cfg[g][k], int) and cfg[g][k] > 0 for k in need) for g in ("up", "down"))


def load_cache(card: str) -> dict[str, dict]:
    """The cached configs of ``card`` (bucket key -> config); a missing or unreadable file is empty (warned)."""
    path = cache_file(card)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("dlinfer: ignoring the tuning cache %s (%s)", path, exc)
        return {}
    entries = data.get("configs", {}) if isinstance(data, dict) else {}
    good = {k: v for k, v in entries.items() if isinstance(k, str) and _valid(v)}
    if len(good) != len(entries):
        logger.warning("dlinfer: ignoring %d malformed entries of %s", len(entries) - len(good), path)
    return good


def store(card: str, key: str, cfg: dict, us: float | None = None) -> Path:
    """Add one entry to the card's cache file (read-merge-replace: concurrent writers lose no other key)."""
    path = cache_file(card)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = load_cache(card)
    entries[key] = cfg
    timings = {}
    try:
        timings = json.loads(path.read_text()).get("us", {})
    except (OSError, ValueError, AttributeError):
        pass
    if us is not None:
        timings[key] = round(us, 2)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(card=card, configs=entries, us=timings), indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def clear(card: str | None = None) -> list[Path]:
    """Delete the cache file of ``card`` (all cards when None); returns what was removed."""
    folder = cache_dir() / "tuning"
    paths = [cache_file(card)] if card else sorted(folder.glob("moe-*.json"))
    removed = []
    for p in paths:
        if p.exists():
            p.unlink()
            removed.append(p)
    with _lock:
        _memo.clear()
        _hot_memo.clear()
        _disk.clear()
    return removed


# ---------------------------------------------------------------------------------------------- lookup

_lock = threading.Lock()
# (card, key) -> (config, source, settled): what is in force in this process; not settled = the generic fallback
# of a card without a table while autotune was off (a later call with autotune on still tunes that bucket).
_memo: dict[tuple, tuple[dict, str, bool]] = {}
_hot_memo: dict[tuple, dict] = {}  # (card, dtype, E, topk, hidden, inter, rows per expert) -> hot experts' config
_disk: dict[str, dict] = {}  # card -> its cache file's entries (read once per process)


def card_name(device) -> str:
    """The device name tables and caches are keyed by (``cpu`` for CPU tensors)."""
    if device.type != "cuda":
        return device.type
    from dlinfer.vendor.triton import host

    return host.card(device.index).name


def preferred_layout(card: str, dtype) -> str | None:
    """The expert-weight layout ``fused_moe`` serves faster on ``card`` in ``dtype``: ``"n_fastest"`` where the card's
    table has N-fastest entries (measured there: every such table's entries were timed on both layouts) and the
    dtype is 16-bit, else None (no measured preference: engines keep the contract's K-fastest layout)."""
    import torch

    table = TABLES.get(card)
    if table is not None and "n_fastest" in table and dtype in (torch.float16, torch.bfloat16):
        return "n_fastest"
    return None


# ---------------------------------------------------------------------------------------------- shared memory

# Shared memory is what decides whether a config launches at all: the tables were measured on sm_90 (227 KB per
# block), an L40S / RTX 4090 (sm_89) has 99 KB, an A100 (sm_80) 163 KB, and a kernel over the limit fails with
# "out of resources". Every config is fitted to the card at hand (:func:`fit`) before it is used: the pipeline is
# made shallower, then the K tile, then the N tile narrower, until :func:`shared_memory` fits. On the cards the
# tables were measured on nothing changes (tests/triton/test_config_family.py checks both that and the estimate
# against the compiler's figure on sm_80 / sm_89 / sm_90 / sm_100).


def shared_memory(block_m: int, c: dict, silu: bool, dtype, capability: int) -> int:
    """Bytes of shared memory of one grouped-GEMM launch (``c``: one of a config's ``up`` / ``down``), an upper
    bound: the A and B tiles of each pipeline buffer (Triton keeps ``num_stages`` buffers on sm_90+, one fewer
    below, where the first load goes to registers), gate and up interleaved in B with ``silu``, plus the
    barriers. fp32 runs with half the K tile (moe._operands); int8 (W8A8) is one byte an element."""
    import torch

    itemsize = dtype.itemsize
    block_k = max(16, c["BLOCK_K"] // 2) if dtype == torch.float32 else c["BLOCK_K"]
    buffers = c["num_stages"] if capability >= 9 else max(1, c["num_stages"] - 1)
    tile = block_m * block_k + (2 if silu else 1) * c["BLOCK_N"] * block_k
    return buffers * tile * itemsize + 1024


def _fit_gemm(block_m: int, c: dict, silu: bool, dtype, card) -> dict:
    c = dict(c)
    while shared_memory(block_m, c, silu, dtype, card.capability) > card.smem_per_block:
        if c["num_stages"] > 2:
            c["num_stages"] -= 1
        elif c["BLOCK_K"] > 32:
            c["BLOCK_K"] //= 2
        elif c["BLOCK_N"] > 16:
            c["BLOCK_N"] //= 2
        else:
            break
    return c


def fit(cfg: dict, dtype, card) -> dict:
    """``cfg`` (both GEMMs, and its ``hot`` entry if any) made to fit ``card``'s shared memory per block
    (:class:`dlinfer.vendor.triton.host.Card`); the same object when it already fits."""
    up = _fit_gemm(cfg["BLOCK_M"], cfg["up"], True, dtype, card)
    down = _fit_gemm(cfg["BLOCK_M"], cfg["down"], False, dtype, card)
    hot = fit(cfg["hot"], dtype, card) if isinstance(cfg.get("hot"), dict) else cfg.get("hot")
    if up == cfg["up"] and down == cfg["down"] and hot is cfg.get("hot"):
        return cfg
    return dict(cfg, up=up, down=down, **({"hot": hot} if "hot" in cfg else {}))


def fitted(cfg: dict, dtype, device) -> dict:
    """``cfg`` fitted to CUDA device ``device`` (as it is elsewhere: the interpreter has no shared memory limit)."""
    if device is None or device.type != "cuda":
        return cfg
    from dlinfer.vendor.triton import host

    return fit(cfg, dtype, host.card(device.index))


def _tier(tiers, rows_per_expert):
    for bound, cfg in tiers:
        if rows_per_expert <= bound:
            return cfg
    return tiers[-1][1]


def rule_config(table: dict, rows_per_expert: float, inter: int, experts: int) -> dict | None:
    """The config a ``table``'s first matching rule (its ``rules``; none by default) serves at this load and shape
    instead of the tier's, or None."""
    for (lo, hi), (ilo, ihi), min_experts, cfg in table.get("rules", ()):
        if lo <= rows_per_expert < hi and ilo <= inter < ihi and experts >= min_experts:
            return cfg
    return None


def static_config(card: str, dtype, experts, topk, hidden, inter, tokens, device=None,
                  rules: bool = True, n_fastest: bool = False) -> tuple[dict, str, bool]:
    """(config, source, final): the cache, the card's table (its load rules unless ``rules`` is False; its
    ``n_fastest`` entries for N-fastest expert weights) or the generic tiers, fitted to CUDA device ``device``'s
    shared memory when given (:func:`fit`); ``final`` is False when the config is only the generic fallback of a
    card without a table (an autotune may replace it)."""
    cfg, source, final = _static_config(card, dtype, experts, topk, hidden, inter, tokens, rules, n_fastest)
    return fitted(cfg, dtype, device), source, final


def _static_config(card: str, dtype, experts, topk, hidden, inter, tokens, rules=True,
                   n_fastest=False) -> tuple[dict, str, bool]:
    with _lock:
        if card not in _disk:
            _disk[card] = load_cache(card) if card != "cpu" else {}
        cached = _disk[card].get(shape_key(dtype, experts, topk, hidden, inter, tokens, n_fastest))
    key = shape_key(dtype, experts, topk, hidden, inter, tokens)  # a table's exact shapes (its n_fastest entries')
    if cached is not None:
        return cached, f"tuning cache {cache_file(card)}", True
    rows = tokens * topk / experts
    table, label = TABLES.get(card), card
    if table is not None and n_fastest and "n_fastest" in table:
        table, label = dict(table, **table["n_fastest"]), f"{card}, N-fastest weights"
    if table is not None:
        if key in table["shapes"]:
            return table["shapes"][key], f"table for {label} (this shape)", True
        ruled = rule_config(table, rows, inter, experts) if rules else None
        if ruled is not None:
            return ruled, f"table for {label} (rule by rows per expert and shape)", True
        return _tier(table["tiers"], rows), f"table for {label} (tier by rows per expert)", True
    source = "generic tiers (H100 table, smaller 24-96 rows tiles; no table for this card)"
    return _tier(GENERIC_TIERS, rows), source, False


def launch_config(device, dtype, experts, topk, hidden, inter, tokens, autotune=None, n_fastest: bool = False) -> dict:
    """The config ``fused_moe`` launches with (``n_fastest``: for N-fastest expert weights, whose tables, cache
    entries and autotune are their own). ``autotune(candidates) -> (config, us)`` is called at most once per
    bucket, only when the card has no table or cache entry, autotune is on and no CUDA graph is being captured
    (a bucket served while autotune was off, e.g. by ``dlinfer check``, still tunes at its first call with it on).
    Each tune logs its bucket, candidate count and seconds."""
    card = card_name(device)
    memo_key = (card, dtype, experts, topk, hidden, inter, tokens, n_fastest)
    hit = _memo.get(memo_key)
    if hit is not None and (hit[2] or autotune is None or not settings.flag("DLINFER_AUTOTUNE")):
        return hit[0]
    cfg, source, final = static_config(card, dtype, experts, topk, hidden, inter, tokens, device,
                                       n_fastest=n_fastest)
    if not final and device.type == "cuda":
        import torch

        if torch.cuda.is_current_stream_capturing():
            return cfg  # not memoized: the first eager call of this bucket still tunes
        if autotune is not None and settings.flag("DLINFER_AUTOTUNE"):
            key = shape_key(dtype, experts, topk, hidden, inter, tokens, n_fastest)
            t0 = time.perf_counter()
            cands = candidates(cfg, dtype, device)
            cfg, us = autotune(cands)
            try:
                where = f"cached in {store(card, key, cfg, us)}"
            except (OSError, RuntimeError) as exc:  # a read-only or missing home: keep it for this process
                where = f"not cached ({exc})"
                logger.warning("dlinfer: fused_moe autotune result not cached: %s", exc)
            with _lock:
                _disk.setdefault(card, {})[key] = cfg
            source = (f"autotuned on first use (at most {len(cands)} candidates, {time.perf_counter() - t0:.1f} s), "
                      f"{where}")
            logger.info("dlinfer: fused_moe %s on %s: %s", key, card, source)
            final = True
    _memo[memo_key] = (cfg, source, final or device.type != "cuda")
    return cfg


# fused_moe compiles every token bucket's kernel variants up to this many tokens (or the first call's count, if
# larger) at a shape's first eager call (see moe.py, "precompile").
PRECOMPILE_MIN_TOKENS = 8192

# Row-count-aware tiles (see ``fused_moe``): experts that hold at least the hot config's BLOCK_M rows are served with
# the config this card uses at HOT_LOAD rows per expert (tables without their rules, cache or generic tiers; never
# autotuned for this, as the call's own tensors have another load). A card's table may name a smaller load
# (``hot_small_load``) for calls of HOT_SMALL_TOKENS tokens: there a hot expert holds at most that many rows, and a few
# such experts on the widest tiles leave most SMs idle (E256 top-8 H7168 I512 at T=256: 8 gate_up programs of 128 x 256
# over K = 7168), so they get the narrower tiles of that load, where those are still wider than the call's own (else the
# HOT_LOAD tiles). The H100's table names 128 rows: 64-row blocks, 64-wide gate_up and 128-wide down tiles, which beat
# the 512-row tiles by 1.04-1.11x on the three skewed cases compared (E256 top-8 at T=256 and 512, E128 top-8 at T=256;
# CUDA-graph replay); cards without a table follow the H100 (GENERIC_HOT_SMALL_LOAD); the H200's table names none (not
# measured there). From 64 tokens: there the 64-row hot blocks are the only hot class that fits (the HOT_LOAD tiles' 128
# rows exceed the call), and serve an expert that every token picks; on the H100 (skewed routing, 7 shapes, CUDA-graph
# replay) E16 top-2 H4096 I6400 went from 0.90x to 1.02x the peer, E8 top-1 H1024 I512 from 2.14x to 1.66x (14 -> 18 us;
# likely the second class's launches around a ~1-us GEMM, not profiled), the other five within 1 %.
HOT_LOAD = 512
HOT_SMALL_TOKENS = range(64, 513)
GENERIC_HOT_SMALL_LOAD = 128


def wider_rows(hot_block_m: int, block_m: int) -> bool:
    """Whether hot tiles of ``hot_block_m`` rows can serve beside a call's own ``block_m``-row tiles: a larger
    multiple of them (the sort pads each expert to its class's block)."""
    return hot_block_m > block_m and hot_block_m % block_m == 0


def hot_class(config: dict, hot_cfg: dict | None, tokens: int) -> tuple[dict | None, int]:
    """The hot experts' config and row threshold of a call of ``tokens`` tokens on its own ``config``, or (None, 0):
    ``hot_cfg`` serves where its row block is a wider multiple of the call's (:func:`wider_rows`), for experts of at
    least ``config["hot_rows"]`` rows (default its BLOCK_M), and only where an expert can hold that many (at most
    ``tokens``)."""
    if hot_cfg is None or not wider_rows(hot_cfg["BLOCK_M"], config["BLOCK_M"]):
        return None, 0
    hot_rows = config.get("hot_rows", hot_cfg["BLOCK_M"])
    return (None, 0) if tokens < hot_rows else (hot_cfg, hot_rows)


def hot_loads(card: str, tokens: int | None) -> tuple[int, ...]:
    """Rows per expert whose configs may serve the hot experts of a call of ``tokens`` tokens on ``card`` (None:
    any count), the preferred first."""
    table = TABLES.get(card)
    small = table.get("hot_small_load") if table is not None else GENERIC_HOT_SMALL_LOAD
    return (small, HOT_LOAD) if small and tokens is not None and tokens in HOT_SMALL_TOKENS else (HOT_LOAD,)


def hot_config(device, dtype, experts: int, topk: int, hidden: int, inter: int, tokens: int | None = None,
               above: int | None = None, n_fastest: bool = False) -> dict:
    """The config of the hot experts' GEMMs for a call of ``tokens`` tokens of this problem on ``device`` whose own
    row block is ``above`` (see :func:`hot_loads`: the first whose BLOCK_M is a larger multiple of ``above``, else
    the HOT_LOAD one); ``n_fastest`` as for :func:`launch_config`."""
    card = card_name(device)
    for load in hot_loads(card, tokens):
        key = (card, dtype, experts, topk, hidden, inter, load, n_fastest)
        hit = _hot_memo.get(key)
        if hit is None:
            bucket = max(1, load * experts // max(topk, 1))
            hit = _hot_memo[key] = static_config(card, dtype, experts, topk, hidden, inter, bucket, device,
                                                 rules=False, n_fastest=n_fastest)[0]
        if above is None or wider_rows(hit["BLOCK_M"], above):
            return hit
    return hit


def candidates(first: dict, dtype=None, device=None) -> list[dict]:
    """``first``, then :data:`CANDIDATES` (fitted to CUDA device ``device``'s shared memory when given) without
    repeats."""
    out = [first]
    for c in CANDIDATES:
        c = fitted(c, dtype, device)
        if c not in out:
            out.append(c)
    return out


# A candidate (its compiles included: under a minute even on a slow host) still running after this many seconds is
# reported as an error: a GPU kernel that never ends cannot be interrupted from the host, so the call hangs, and
# the log is the only place that can say which config did it.
AUTOTUNE_STUCK_S = 180.0


def _stuck_watch(cfg, limit_s: float) -> threading.Timer:
    """A started daemon timer that logs an error naming ``cfg`` unless cancelled within ``limit_s`` seconds."""
    timer = threading.Timer(limit_s, logger.error, args=(
        "dlinfer: fused_moe autotune: candidate %s has not finished after %.0f s (a GPU kernel that never ends "
        "hangs this call); restart with DLINFER_AUTOTUNE=0 (the generic tiers, no autotune) and report this card "
        "and config", cfg, limit_s))
    timer.daemon = True
    timer.start()
    return timer


def pick_fastest(run, cands, *, max_s: float = AUTOTUNE_MAX_S, reps: int = AUTOTUNE_REPS, tol: float = 2e-2,
                 stuck_s: float = AUTOTUNE_STUCK_S):
    """Time ``run(config) -> tensor`` for each candidate (CUDA events, after one untimed call that compiles) and
    return ``(fastest config, its us)``. A candidate that fails to launch or whose output differs from the first
    candidate's by more than ``tol`` (relative norm) is skipped; stops trying new ones after ``max_s`` seconds. A
    candidate still running after ``stuck_s`` seconds is logged as an error (see :data:`AUTOTUNE_STUCK_S`)."""
    import torch

    t_end = time.perf_counter() + max_s
    best, best_us, ref = None, math.inf, None
    for cfg in cands:
        if best is not None and time.perf_counter() > t_end:
            break
        watch = _stuck_watch(cfg, stuck_s)
        try:  # the watch ends with the candidate, however it ends (timed, skipped, or an error for the caller)
            try:
                out = run(cfg).float()
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - e.g. a tile that does not fit this card's shared memory
                logger.debug("dlinfer: autotune skips %s (%s)", cfg, exc)
                continue
            if ref is None:
                ref = out
            elif not float((out - ref).norm()) <= tol * max(float(ref.norm()), 1e-30):
                continue
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                run(cfg)
            stop.record()
            stop.synchronize()
        finally:
            watch.cancel()
        us = start.elapsed_time(stop) * 1e3 / reps
        if us < best_us:
            best, best_us = cfg, us
    if best is None:
        raise RuntimeError("fused_moe autotune: no candidate config could run")
    return best, best_us


# ---------------------------------------------------------------------------------------------- reporting


def describe(device=None) -> list[str]:
    """Lines for ``dlinfer info``: the card, its table, the cache file and the configs in force in this process."""
    lines = []
    card = None
    try:
        import torch

        if device is None and torch.cuda.is_available():
            device = torch.device("cuda")
        if device is not None:
            card = card_name(torch.device(device))
    except Exception as exc:  # noqa: BLE001 - info must always print something
        lines.append(f"fused_moe configs: cannot query the device ({exc})")
    if card is None or card == "cpu":
        lines.append(f"fused_moe configs: no CUDA device; shipped tables for: {', '.join(TABLES)} (with N-fastest "
                     f"expert entries, the layout served faster there: "
                     f"{', '.join(c for c in TABLES if preferred_layout(c, torch.bfloat16)) or 'none'})")
        lines.append(f"  tuning cache dir: {cache_dir() / 'tuning'} (DLINFER_CACHE_DIR relocates it)")
        return lines
    table = TABLES.get(card)
    lines.append(f"fused_moe configs on {card}: " + (
        f"shipped table ({len(table['tiers'])} tiers, {len(table['shapes'])} exact shapes)" if table else
        "no shipped table: autotune on first use " + ("(on)" if settings.flag("DLINFER_AUTOTUNE") else
                                                      "is OFF (DLINFER_AUTOTUNE=0): generic tiers")))
    from dlinfer.vendor.triton import host

    layout = preferred_layout(card, torch.bfloat16)
    lines.append("  expert weight layout served fastest (bf16/fp16): " + (
        "N-fastest (the table's N-fastest entries; LMDeploy's adapter lays experts out so by default)"
        if layout == "n_fastest" else "K-fastest (no N-fastest entries for this card)"))
    lines.append(f"  shared memory per block: {host.card(torch.device(device).index).smem_per_block} B (every config "
                 "is fitted to it: shallower pipelines, then narrower K and N tiles)")
    lines.append("  precompile: " + (f"every token bucket up to {PRECOMPILE_MIN_TOKENS} tokens at a shape's first "
                                     "eager call" if settings.flag("DLINFER_PRECOMPILE") else
                                     "off (DLINFER_PRECOMPILE=0): variants compile as token counts first appear"))
    path = cache_file(card)
    n = len(load_cache(card))
    lines.append(f"  tuning cache: {path} ({n} entries{'' if path.exists() else ', no file yet'}; "
                 "DLINFER_CACHE_DIR relocates it, `dlinfer tune --clear` clears it)")
    in_force = {}  # one line per bucket and config
    for (c, dtype, e, k, h, i, t, nf), (cfg, source, _) in list(_memo.items()):
        if c == card:
            in_force[(shape_key(dtype, e, k, h, i, t, nf), cfg["BLOCK_M"], source)] = None
    for key, block_m, source in sorted(in_force):
        lines.append(f"  in force: {key} BLOCK_M={block_m} <- {source}")
    return lines


# ---------------------------------------------------------------------------------------------- dlinfer tune

MODELS = {"mixtral": (8, 2, 4096, 14336), "qwen3-moe": (128, 8, 2048, 768)}
# --layout: the expert weight layouts each shape is tuned for (True: N-fastest; cache keys end in ":N")
LAYOUTS = {"k-fastest": (False,), "n-fastest": (True,), "both": (False, True)}


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        e, k, h, i = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--shape {text!r}: expected E,topk,hidden,inter (four integers)") from None
    if min(e, k, h, i) <= 0 or k > e:
        raise ValueError(f"--shape {text!r}: sizes must be positive and topk <= E")
    return e, k, h, i


def main(argv=None) -> int:
    """``dlinfer tune``: measure fused_moe configs on this card for some shapes and cache them (see module doc)."""
    import argparse

    p = argparse.ArgumentParser(prog="dlinfer tune", description="Tune the fused-MoE kernel's tiles on this GPU "
                                "and cache them (" + str(cache_dir() / "tuning") + ").")
    p.add_argument("--model", action="append", choices=sorted(MODELS), help="a known MoE shape (repeatable)")
    p.add_argument("--shape", action="append", default=[], metavar="E,TOPK,HIDDEN,INTER", help="(repeatable)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 512, 2048, 4096, 8192])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--max-s", type=float, default=AUTOTUNE_MAX_S, help="seconds per shape bucket (default %(default)s)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="k-fastest",
                   help="expert weight layout to tune for: k-fastest (contiguous, as loaded), n-fastest (N the "
                        "unit-stride dimension: LMDeploy's experts with DLINFER_LMDEPLOY_MOE_N_FASTEST=1, or by "
                        "default on a card whose table has N-fastest entries), or both "
                        "(default %(default)s)")
    p.add_argument("--clear", action="store_true", help="delete this card's cache (all cards without a GPU)")
    p.add_argument("--show", action="store_true", help="print where configs come from and exit")
    args = p.parse_args(argv)
    import torch

    if args.show:
        print("\n".join(describe()))
        return 0
    if args.clear:
        card = card_name(torch.device("cuda")) if torch.cuda.is_available() else None
        removed = clear(card)
        print("removed: " + (", ".join(map(str, removed)) if removed else "nothing (no cache file)"))
        return 0
    try:
        shapes = [MODELS[m] for m in args.model or []] + [_shape(s) for s in args.shape]
    except ValueError as exc:
        p.error(str(exc))
    if not shapes:
        p.error("name at least one --model or --shape")
    if any(t <= 0 for t in args.tokens):
        p.error("--tokens must be positive")
    if not torch.cuda.is_available():
        print("dlinfer tune: needs a CUDA device (tables and caches are per card)", file=sys.stderr)
        return 2
    path = tune(shapes, args.tokens, getattr(torch, args.dtype), LAYOUTS[args.layout], args.max_s,
                torch.device("cuda"))
    print(f"cached in {path}")
    return 0


def tune(shapes, tokens, dtype, layouts, max_s: float, device):
    """Measure the candidates of every ``(E, topk, hidden, inter)`` shape at each token count, for expert weights in
    each layout of ``layouts`` (False: K-fastest, True: N-fastest), on ``device``, and cache the fastest under its
    bucket's key (N-fastest keys end in ``:N``). Returns the cache file."""
    import torch

    from dlinfer.utils.layout import n_fastest as to_n_fastest
    from dlinfer.vendor.triton import moe

    card = card_name(device)
    gen = torch.Generator(device=device).manual_seed(0)
    path = None
    for e, k, h, i in shapes:
        w_up = torch.randn(e, 2 * i, h, device=device, dtype=dtype, generator=gen) * h ** -0.5
        w_down = torch.randn(e, h, i, device=device, dtype=dtype, generator=gen) * i ** -0.5
        for nf in layouts:
            up, down = (to_n_fastest(w_up), to_n_fastest(w_down)) if nf else (w_up, w_down)
            for t in tokens:
                x = torch.randn(t, h, device=device, dtype=dtype, generator=gen)
                w, ids = moe.moe_gating_topk_softmax(torch.randn(t, e, device=device, generator=gen), k)
                first, _, _ = static_config(card, dtype, e, k, h, i, t, device, n_fastest=nf)
                cfg, us = pick_fastest(lambda c: moe.fused_moe(x, up, down, w, ids, True, config=c),
                                       candidates(first, dtype, device), max_s=max_s)
                key = shape_key(dtype, e, k, h, i, t, nf)
                path = store(card, key, cfg, us)
                with _lock:
                    _disk.setdefault(card, {})[key] = cfg
                    _memo.clear()
                    _hot_memo.clear()
                print(f"{key}: {us:9.1f} us  BLOCK_M={cfg['BLOCK_M']} up={cfg['up']} down={cfg['down']}", flush=True)
    return path
