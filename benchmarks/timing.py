"""GPU timing for µs-scale ops: CUDA-graph replay with the L2 flushed, eager call cost, the two ceilings.

GPU time per call (a method that held within ~1 % across runs): capture one CUDA
graph of ``n x [128 MB memset; op]`` and one of ``n x [128 MB memset]``, replay both alternately ``reps``
times, and take ``(median(op graph) - median(memset graph)) / n``. The memset evicts the 50 MB L2, so every
call reads its inputs from HBM as it would inside a model, and graph replay removes the launch gaps that make
eager timings of small ops measure Python instead of the GPU.

Ops that cannot be captured (host syncs, e.g. a torch expert loop) are timed eagerly with CUDA events around
each call after a flush (``method="eager"``); the record says which method gave each number.

Eager call cost: the wall time of the Python call itself (wrapper + dispatch + launch), median of >= 1000
calls, several callables interleaved in one process so that they see the same machine state.

Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

FLUSH_BYTES = 128 << 20


@dataclass
class GpuTime:
    us: float                       # GPU time per call, µs
    method: str                     # "graph" (replay minus memset-only replay) or "eager" (events per call)
    n: int = 1                      # calls per graph
    reps: int = 0                   # replays (or eager calls) measured
    spread_us: tuple[float, float] = (0.0, 0.0)   # min/max of the per-replay estimates
    note: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spread_us"] = list(self.spread_us)
        return d


class Flusher:
    """A 128 MB buffer whose memset evicts the L2 (50 MB on H100)."""

    def __init__(self, device: torch.device | str = "cuda", nbytes: int = FLUSH_BYTES):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def _events(count: int):
    return [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]


def eager_gpu_time(fn: Callable[[], object], flush: Flusher, reps: int = 10, warmup: int = 2) -> GpuTime:
    """Events around each call, L2 flushed before each; includes launch gaps inside ``fn``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = _events(reps)
    for start, end in pairs:
        flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e3 for s, e in pairs]
    return GpuTime(us=statistics.median(times), method="eager", n=1, reps=reps,
                   spread_us=(min(times), max(times)))


def _capture(body: Callable[[], None]) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def graph_gpu_time(fn: Callable[[], object], flush: Flusher, *, n: int | None = None, reps: int = 15,
                   target_us: float = 4000.0, warmup: int = 3) -> GpuTime:
    """GPU time per call of ``fn`` by CUDA-graph replay with the L2 flushed before every call.

    ``fn`` must be capturable (no host syncs, no allocation that depends on values). ``n`` (calls per graph)
    defaults to what fills about ``target_us`` of GPU time per replay, between 3 and 100.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):          # warm up (compiles Triton kernels, autotunes) off the capture
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    if n is None:
        estimate = eager_gpu_time(fn, flush, reps=3, warmup=0).us
        flush_est = eager_gpu_time(flush, flush, reps=3, warmup=0).us
        n = int(max(3, min(100, target_us // max(estimate + flush_est, 1.0))))

    def op_body():
        for _ in range(n):
            flush()
            fn()

    def flush_body():
        for _ in range(n):
            flush()

    g_op = _capture(op_body)
    g_flush = _capture(flush_body)
    g_op.replay()
    g_flush.replay()
    torch.cuda.synchronize()
    op_ev, fl_ev = _events(reps), _events(reps)
    for (s1, e1), (s2, e2) in zip(op_ev, fl_ev):
        s1.record()
        g_op.replay()
        e1.record()
        s2.record()
        g_flush.replay()
        e2.record()
    torch.cuda.synchronize()
    op_us = [s.elapsed_time(e) * 1e3 for s, e in op_ev]
    fl_us = [s.elapsed_time(e) * 1e3 for s, e in fl_ev]
    per_rep = [(a - b) / n for a, b in zip(op_us, fl_us)]
    us = (statistics.median(op_us) - statistics.median(fl_us)) / n
    del g_op, g_flush
    return GpuTime(us=us, method="graph", n=n, reps=reps, spread_us=(min(per_rep), max(per_rep)))


def gpu_time(fn: Callable[[], object], flush: Flusher, *, graph: bool = True, **kwargs) -> GpuTime:
    """Graph timing when ``graph`` (falling back to eager, noted, if capture fails), else eager."""
    if graph:
        try:
            return graph_gpu_time(fn, flush, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a capture failure is recorded, the number still taken
            torch.cuda.synchronize()
            result = eager_gpu_time(fn, flush, reps=kwargs.get("reps", 10))
            result.note = f"graph capture failed ({type(exc).__name__}: {str(exc)[:200]}); eager timing"
            return result
    return eager_gpu_time(fn, flush, reps=kwargs.get("reps", 10))


# ---------------------------------------------------------------------------------------------- call cost
@torch.library.custom_op("dlinfer_gpu_suite::noop", mutates_args=())
def _noop(x: torch.Tensor) -> None:
    return None


@_noop.register_fake
def _(x):
    return None


def noop_custom_op(x: torch.Tensor) -> None:
    """A bare ``torch.library`` custom op that does nothing: the floor of any custom-op call."""
    torch.ops.dlinfer_gpu_suite.noop(x)


def eager_call_cost(fns: dict[str, Callable[[], object]], calls: int = 1000, warmup: int = 50,
                    sync_every: int = 50) -> dict[str, dict]:
    """Median host wall time per call (µs) of each callable, all interleaved in one loop.

    The device is synchronized every ``sync_every`` rounds, outside the timed calls, so that no call waits
    for a full launch queue: keep the GPU work per call small (the shapes of one decode step).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    for i in range(calls):
        for name in names:
            fn = fns[name]
            t0 = clock()
            fn()
            t1 = clock()
            samples[name].append((t1 - t0) / 1e3)
        if (i + 1) % sync_every == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    out = {}
    for name, values in samples.items():
        values.sort()
        out[name] = {"median_us": statistics.median(values), "p10_us": values[len(values) // 10],
                     "p90_us": values[(len(values) * 9) // 10], "calls": len(values)}
    return out


# ----------------------------------------------------------------------------------------------- ceilings
@dataclass
class Ceilings:
    copy_gbps: float                 # device-to-device copy, bytes read + written per second / 1e9
    matmul_tflops: float             # bf16 8192^3 torch.matmul
    copy_bytes: int = 0
    matmul_shape: tuple[int, int, int] = (8192, 8192, 8192)
    samples: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["matmul_shape"] = list(self.matmul_shape)
        return d


def rates(nbytes: float, flops: float, us: float, copy_gbps: float, matmul_tflops: float) -> dict:
    """Bound (µs), which resource bounds it, % of bound, and achieved GB/s and TFLOP/s of one timing."""
    mem_s, cmp_s = nbytes / (copy_gbps * 1e9), flops / (matmul_tflops * 1e12)
    bound_us = max(mem_s, cmp_s) * 1e6
    return {"bound_us": bound_us, "bound": "memory" if mem_s >= cmp_s else "compute",
            "pct_bound": 100.0 * bound_us / us if us > 0 else None,
            "gbps": nbytes / (us * 1e-6) / 1e9 if us > 0 else None,
            "tflops": flops / (us * 1e-6) / 1e12 if us > 0 and flops else None}


def measure_ceilings(device="cuda", copy_gib: int = 4, reps: int = 10) -> Ceilings:
    """Copy bandwidth (``copy_gib`` GiB copied device to device, read + written counted) and bf16 matmul peak."""
    nbytes = copy_gib << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    torch.cuda.synchronize()
    pairs = _events(reps)
    for s, e in pairs:
        s.record()
        dst.copy_(src)
        e.record()
    torch.cuda.synchronize()
    copy_ms = [s.elapsed_time(e) for s, e in pairs]
    copy_gbps = 2 * nbytes / (statistics.median(copy_ms) * 1e-3) / 1e9
    del src, dst
    torch.cuda.empty_cache()

    m = k = n = 8192
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    pairs = _events(reps)
    for s, e in pairs:
        s.record()
        torch.matmul(a, b)
        e.record()
    torch.cuda.synchronize()
    mm_ms = [s.elapsed_time(e) for s, e in pairs]
    tflops = 2 * m * n * k / (statistics.median(mm_ms) * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return Ceilings(copy_gbps=copy_gbps, matmul_tflops=tflops, copy_bytes=2 * nbytes,
                    samples={"copy_ms": copy_ms, "matmul_ms": mm_ms})
