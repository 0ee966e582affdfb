"""Sweep the launch configs of the Triton vendor's dense quantized GEMMs against LMDeploy 0.18's own kernels.

    python benchmarks/tune_quant.py --budget-s 540            # one GPU, ~9 minutes: table + $OUT/tune_quant.json
    python benchmarks/tune_quant.py --formats awq --ts 1,16   # a subset
    TRITON_INTERPRET=1 python benchmarks/tune_quant.py --dry-run   # CPU smoke test: tiny shapes, wall-clock times

Formats: ``awq`` (W4A16, ``weight_quant_matmul``, group 128, float16: LMDeploy's AWQ kernel is float16 only) against
``awq_kernels.awq_linear``; ``w8a8`` (int8 x int8, per-token and per-channel scales, ``linear_w8a8``) against
``w8a8_triton_kernels.matmul_kernel_dynamic_quant``. Shapes: Llama-3-8B's linears (N, K) = qkv (6144, 4096),
o (4096, 4096), gate_up (28672, 4096), down (4096, 14336); T (rows) in {1, 16, 64, 256, 4096}.

Phases, each respecting ``--budget-s`` (the JSON is rewritten after every measurement, so a run cut short keeps
what it measured):

1. ceilings: device copy bandwidth and bf16 matmul peak (``benchmarks/timing.py``), int8 ``torch._int_mm`` peak;
2. baseline: for every (format, shape, T): dlinfer's default config (``awq_config`` / ``int8_config``) and the
   peer, each checked against the reference vendor (relative error), timed by CUDA-graph replay with the L2
   flushed before every call (``timing.gpu_time``). The peer's autotuners key on (N, K) only, so their caches
   are cleared for every T: the peer gets its best config for each T (the peer's most favourable reading);
3. sweep: coordinate descent from the default config (one field at a time over its candidate values, keeping a
   change that is >= 1 % faster and still matches the reference), worst ratio to the peer first; AWQ calls of at
   most ``GEMV_MAX_ROWS`` rows first try the few-row FMA kernel (``gemv=1``) from ``GEMV_STARTS``.

Columns: µs per call, ``x peer`` = peer µs / dlinfer µs (>= 1: dlinfer faster), ``% bound`` = the roofline time
``max(bytes moved / copy bandwidth, flops / peak)`` over the measured time (peak: bf16 matmul for AWQ, int8
``_int_mm`` for W8A8, both measured in the run). The JSON's ``best`` entries are the configs to carry into
``dlinfer/vendor/triton/quant.py`` (or to try through ``DLINFER_TRITON_AWQ`` / ``DLINFER_TRITON_W8A8``).

LMDeploy on the GPU machine: the wheels of ``scripts/lmdeploy_gpu_wheels.sh`` (carry ``.whl``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; python3 benchmarks/tune_quant.py --budget-s 540
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TS = (1, 16, 64, 256, 4096)
FORMATS = ("awq", "w8a8")
GROUP = 128
DRY_SHAPES = {"tiny": (72, 256)}
DRY_TS = (1, 20)
# candidate values per field, swept one field at a time (coordinate descent)
SWEEP = {
    "awq": {"block_n": [64, 128, 256], "split_k": [1, 2, 3, 4, 6, 8, 12, 16], "block_m": [16, 32, 64, 128, 256],
            "block_k": [32, 64, 128], "num_stages": [2, 3, 4, 5, 6], "num_warps": [4, 8], "group_m": [1, 8],
            "pdl": [0], "gemv": [0]},  # gemv: the FMA kernel's starting points (GEMV_STARTS), then back to 0
    "w8a8": {"block_n": [64, 128, 256], "split_k": [1, 2, 3, 4, 6, 8, 12, 16], "block_m": [16, 32, 64, 128, 256],
             "block_k": [64, 128, 256], "num_stages": [2, 3, 4, 5], "num_warps": [4, 8], "group_m": [1, 8, 16],
             "tma": [1], "pdl": [0]},
}
# AWQ calls of <= GEMV_MAX_ROWS rows first try the FMA kernel (``gemv=1``) from these starting points (tiles whose
# float32 accumulator fits the registers without spills for 1-2 rows on sm_90, per ptxas), split K by the rule;
# the coordinate descent then goes on from the fastest of them if it beats the default
GEMV_STARTS = [dict(gemv=1, block_m=16, block_n=bn, block_k=bk, num_warps=w, num_stages=st, split_k=0)
               for bn, bk, w in ((128, 32, 4), (256, 16, 8), (128, 16, 4), (64, 64, 4)) for st in (3, 5)]
TOL = {"awq": 3e-3, "w8a8": 3e-3}  # relative error (Frobenius) against the reference, float16 outputs


# ------------------------------------------------------------------------------------------------- problems
@dataclasses.dataclass
class Problem:
    fmt: str
    shape: str
    n: int
    k: int
    t: int
    tensors: dict
    ref: object = None  # the reference vendor's output

    @property
    def key(self) -> str:
        return f"{self.fmt}:{self.shape}:T{self.t}"

    def bytes_moved(self) -> float:
        n, k, t = self.n, self.k, self.t
        if self.fmt == "awq":  # int4 weights, fp16 scales, packed zeros, fp16 x and out
            return n * k / 2 + (k // GROUP) * n * 2.5 + t * k * 2 + t * n * 2
        return n * k + t * k + t * n * 2 + 4 * (t + n)  # int8 weights and x, fp16 out, fp32 scales

    def flops(self) -> float:
        return 2.0 * self.t * self.n * self.k


def make_problem(fmt: str, shape: str, n: int, k: int, t: int, device: str):
    import torch

    g = torch.Generator(device=device).manual_seed(n + k + t)
    if fmt == "awq":
        x = torch.randn(t, k, device=device, generator=g).half()
        qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k, n // 8), device=device, generator=g, dtype=torch.int32)
        qzeros = torch.randint(-2 ** 31, 2 ** 31 - 1, (k // GROUP, n // 8), device=device, generator=g,
                               dtype=torch.int32)
        scales = (torch.rand(k // GROUP, n, device=device, generator=g) * 0.01 + 0.001).half()
        return Problem(fmt, shape, n, k, t, dict(x=x, qweight=qweight, scales=scales, qzeros=qzeros))
    a = torch.randint(-127, 128, (t, k), device=device, generator=g).to(torch.int8)
    b = torch.randint(-127, 128, (n, k), device=device, generator=g).to(torch.int8)
    rms_scale = torch.rand(t, 1, device=device, generator=g) * 1e-3 + 1e-4
    linear_scale = torch.rand(n, 1, device=device, generator=g) * 1e-3 + 1e-4
    return Problem(fmt, shape, n, k, t, dict(a=a, b=b, rms_scale=rms_scale, linear_scale=linear_scale))


def ours(p: Problem, cfg):
    """A callable running dlinfer's kernel on ``p`` with ``cfg`` (a GemmConfig; None: the default)."""
    import torch

    from dlinfer.vendor.triton import quant

    x = p.tensors
    if p.fmt == "awq":
        return lambda: quant.weight_quant_matmul(x["x"], x["qweight"], x["scales"], x["qzeros"], None, GROUP,
                                                 config=cfg)
    return lambda: quant.linear_w8a8(x["a"], x["b"], x["rms_scale"], x["linear_scale"], torch.float16, torch.int8,
                                     None, config=cfg)


def reference(p: Problem):
    import torch

    import dlinfer.ops as ops
    from dlinfer.vendor import registry

    x = p.tensors
    with registry.forced("reference"):
        if p.fmt == "awq":
            return ops.weight_quant_matmul(x["x"], x["qweight"], x["scales"], x["qzeros"], group_size=GROUP)
        return ops.linear_w8a8(x["a"], x["b"], x["rms_scale"], x["linear_scale"], torch.float16)


def default_config(p: Problem):
    from dlinfer.vendor.triton import quant

    dev = p.tensors["x" if p.fmt == "awq" else "a"].device
    if p.fmt == "awq":
        return quant.awq_config(dev.type, dev.index, p.tensors["x"].dtype, quant._bucket(p.t), p.n, p.k, GROUP)
    return quant.int8_config(dev.type, dev.index, quant._bucket(p.t), p.n, p.k)


def rel_err(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


# -------------------------------------------------------------------------------------------------- peers
class Peer:
    """LMDeploy 0.18's AWQ and int8 GEMM kernels (loaded without its serving stack, as benchmarks/peers.py)."""

    def __init__(self):
        import importlib

        from benchmarks import peers

        peers.load_lmdeploy()
        base = "lmdeploy.pytorch.kernels.cuda"
        self.awq = importlib.import_module(f"{base}.awq_kernels")
        self.w8a8 = importlib.import_module(f"{base}.w8a8_triton_kernels")

    def reset_autotune(self) -> None:
        for kernel in (self.awq.awq_linear_kernel, self.w8a8._linear):
            getattr(kernel, "cache", {}).clear()

    def fn(self, p: Problem):
        import torch

        x = p.tensors
        if p.fmt == "awq":
            return lambda: self.awq.awq_linear(x["x"], x["qweight"], x["scales"], x["qzeros"])
        return lambda: self.w8a8.matmul_kernel_dynamic_quant(x["a"], x["b"], x["rms_scale"], x["linear_scale"],
                                                            output_dtype=torch.float16)


# ------------------------------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, gpu: bool):
        self.gpu = gpu
        if gpu:
            from benchmarks.timing import Flusher

            self.flush = Flusher()

    def __call__(self, fn) -> float:
        """µs per call: CUDA-graph replay with the L2 flushed (GPU), else the median wall time of 3 calls."""
        if self.gpu:
            from benchmarks.timing import gpu_time

            return gpu_time(fn, self.flush).us
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return sorted(times)[1]


def measure_ceilings(gpu: bool) -> dict:
    if not gpu:
        return {}
    import torch

    from benchmarks.timing import measure_ceilings as timing_ceilings

    c = timing_ceilings(copy_gib=2, reps=10)
    out = {"copy_gbps": c.copy_gbps, "bf16_tflops": c.matmul_tflops}
    try:  # int8 tensor-core peak: cuBLASLt's int8 GEMM at 8192^3
        a = torch.randint(-127, 128, (8192, 8192), device="cuda", dtype=torch.int8)
        b = torch.randint(-127, 128, (8192, 8192), device="cuda", dtype=torch.int8).T
        for _ in range(3):
            torch._int_mm(a, b)
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(10)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(10)]
        for s, e in zip(starts, ends):
            s.record()
            torch._int_mm(a, b)
            e.record()
        torch.cuda.synchronize()
        ms = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[5]
        out["int8_tops"] = 2 * 8192 ** 3 / (ms * 1e-3) / 1e12
    except Exception as exc:  # noqa: BLE001 - the bound column then uses the bf16 peak x 2, noted
        out["int8_tops"] = 2 * c.matmul_tflops
        out["int8_note"] = f"torch._int_mm failed ({type(exc).__name__}); int8 peak taken as 2 x bf16"
    return out


def bound_us(p: Problem, ceilings: dict) -> float | None:
    if not ceilings:
        return None
    peak = ceilings["bf16_tflops"] if p.fmt == "awq" else ceilings["int8_tops"]
    return max(p.bytes_moved() / (ceilings["copy_gbps"] * 1e9), p.flops() / (peak * 1e12)) * 1e6


# -------------------------------------------------------------------------------------------------- sweep
def run_config(p: Problem, cfg, timer: Timer) -> dict:
    """Check ``cfg`` against the reference, then time it; errors (e.g. out of shared memory) are recorded."""
    fn = ours(p, cfg)
    try:
        err = rel_err(fn(), p.ref)
        if not err < TOL[p.fmt]:
            return {"error": f"rel err {err:.3g} vs the reference (tolerance {TOL[p.fmt]})", "rel_err": err}
        return {"us": timer(fn), "rel_err": err}
    except Exception as exc:  # noqa: BLE001 - one bad candidate must not stop the sweep
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def sweep(p: Problem, row: dict, timer: Timer, deadline: float, values: dict, save) -> None:
    """Coordinate descent from the default config over ``values``; results appended to ``row['candidates']``."""
    from dlinfer.vendor.triton import quant

    best_cfg = quant.GemmConfig(**row["default"]["config"])
    best_us = row["default"].get("us")
    if best_us is None:
        return
    tried = {json.dumps(config_dict(best_cfg), sort_keys=True)}
    starts = [dict(s) for s in GEMV_STARTS[:len(GEMV_STARTS) if "gemv" in values else 1]] \
        if p.fmt == "awq" and p.t <= quant.GEMV_MAX_ROWS else []
    moves = starts + [{f: v} for f, options in values.items() for v in options]
    for change in moves:
        if time.monotonic() > deadline:
            row["sweep_cut"] = "budget"
            return
        cfg = dataclasses.replace(best_cfg, **change)
        if p.fmt == "awq":
            cfg = dataclasses.replace(cfg, block_k=min(cfg.block_k, GROUP))
        key = json.dumps(config_dict(cfg), sort_keys=True)
        if key in tried:
            continue
        tried.add(key)
        result = dict(config=config_dict(cfg), **run_config(p, cfg, timer))
        row["candidates"].append(result)
        if "us" in result and result["us"] < best_us * 0.99:
            best_cfg, best_us = cfg, result["us"]
            row["best"] = result
        save()
    row["sweep_done"] = True


def baseline(fmt: str, shape: str, n: int, k: int, t: int, device: str, timer: Timer, peer: Peer | None,
             ceilings: dict) -> dict:
    """One (format, shape, T): dlinfer's default config and the peer, each checked against the reference and
    timed (a result row; ``candidates`` empty until :func:`sweep`)."""
    p = make_problem(fmt, shape, n, k, t, device)
    p.ref = reference(p)
    cfg = default_config(p)
    row = {"key": p.key, "format": fmt, "shape": shape, "n": n, "k": k, "t": t, "bound_us": bound_us(p, ceilings),
           "default": dict(config=config_dict(cfg), **run_config(p, cfg, timer)), "candidates": []}
    if peer is not None:
        peer.reset_autotune()
        try:
            fn = peer.fn(p)
            row["peer"] = {"rel_err": rel_err(fn(), p.ref), "us": timer(fn)}
        except Exception as exc:  # noqa: BLE001 - recorded, the other rows go on
            row["peer"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return row


def summarize(row: dict) -> str:
    d, peer, best = row["default"], row.get("peer", {}), row.get("best") or row["default"]

    def us(r):
        return f"{r['us']:9.2f}" if "us" in r else f"{'-':>9}"

    def ratio(r):
        return f"{peer['us'] / r['us']:6.2f}" if "us" in r and "us" in peer else f"{'-':>6}"

    def pct(r):
        return f"{100 * row['bound_us'] / r['us']:6.1f}" if "us" in r and row.get("bound_us") else f"{'-':>6}"

    cfg = best.get("config", {})
    short = ",".join(f"{k}={v}" for k, v in cfg.items() if k != "target_programs")
    return (f"{row['key']:24s} {us(d)} {us(peer)} {ratio(d)} {pct(d)}   {us(best)} {ratio(best)} {pct(best)}  "
            f"{short}")


HEADER = (f"{'format:shape:T':24s} {'ours us':>9} {'peer us':>9} {'x peer':>6} {'%bound':>6}   {'best us':>9} "
          f"{'x peer':>6} {'%bound':>6}  best config")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/tune_quant.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"from {', '.join(SHAPES)}")
    parser.add_argument("--ts", default=",".join(map(str, TS)), help="rows (tokens) per call")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting measurements after this")
    parser.add_argument("--no-sweep", action="store_true", help="baseline only (defaults and peer)")
    parser.add_argument("--out", default=None, help="result JSON (default: $OUT/tune_quant.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU smoke test (TRITON_INTERPRET=1): tiny shapes, wall-clock times, no peer")
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    formats = [f for f in args.formats.split(",") if f]
    bad = sorted(set(formats) - set(FORMATS))
    if bad:
        parser.error(f"--formats: unknown {bad}; known: {', '.join(FORMATS)}")
    shapes = DRY_SHAPES if args.dry_run else {s: SHAPES[s] for s in args.shapes.split(",") if s in SHAPES}
    if not args.dry_run and len(shapes) != len([s for s in args.shapes.split(",") if s]):
        parser.error(f"--shapes: known: {', '.join(SHAPES)}")
    ts = DRY_TS if args.dry_run else tuple(int(t) for t in args.ts.split(",") if t)

    import torch

    gpu = not args.dry_run
    if gpu and not torch.cuda.is_available():
        parser.error("no CUDA device (use --dry-run on a CPU)")
    device = "cuda" if gpu else "cpu"
    out_path = Path(args.out or os.path.join(os.environ.get("OUT", "."), "tune_quant.json"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"argv": sys.argv[1:] if argv is None else list(argv), "dry_run": args.dry_run,
                    "card": torch.cuda.get_device_name(0) if gpu else "cpu (interpreter)", "rows": {}}

    def save():
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        out_path.write_text(json.dumps(report, indent=1, default=str))

    timer = Timer(gpu)
    report["ceilings"] = measure_ceilings(gpu)
    save()
    peer = None
    if gpu:
        try:
            peer = Peer()
        except Exception as exc:  # noqa: BLE001 - ours are still timed
            report["peer_error"] = f"{type(exc).__name__}: {exc}"
            print("peer unavailable:", report["peer_error"])

    problems = []
    for fmt in formats:
        for shape, (n, k) in shapes.items():
            for t in ts:
                problems.append((fmt, shape, n, k, t))

    # phase 2: defaults and peer
    rows = report["rows"]
    for fmt, shape, n, k, t in problems:
        if time.monotonic() > deadline:
            report["cut"] = "budget (baseline)"
            break
        row = baseline(fmt, shape, n, k, t, device, timer, peer, report["ceilings"])
        rows[row["key"]] = row
        print(summarize(row), flush=True)
        save()
        if gpu:
            torch.cuda.empty_cache()

    # phase 3: sweeps, worst ratio to the peer first (or slowest vs the bound)
    if not args.no_sweep:
        def badness(row):
            d, pr = row["default"], row.get("peer", {})
            if "us" in d and "us" in pr:
                return d["us"] / pr["us"]
            if "us" in d and row.get("bound_us"):
                return d["us"] / row["bound_us"]
            return 0.0

        for row in sorted(rows.values(), key=badness, reverse=True):
            if time.monotonic() > deadline:
                report["cut"] = "budget (sweep)"
                break
            p = make_problem(row["format"], row["shape"], row["n"], row["k"], row["t"], device)
            p.ref = reference(p)
            values = SWEEP[p.fmt]
            if args.dry_run:  # the script's logic, not a search: two values of three fields (a split among them)
                values = {f: values[f][:2] for f in ("split_k", "block_n", "block_m")}
            sweep(p, row, timer, deadline, values, save)
            save()
            del p
            if gpu:
                torch.cuda.empty_cache()

    print("\n" + HEADER)
    for row in rows.values():
        print(summarize(row))
    if report.get("ceilings"):
        c = report["ceilings"]
        print(f"ceilings: copy {c['copy_gbps']:.0f} GB/s, bf16 {c['bf16_tflops']:.0f} TFLOP/s, "
              f"int8 {c['int8_tops']:.0f} TOP/s")
    save()
    print(f"wrote {out_path} ({report['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
