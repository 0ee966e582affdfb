"""Eager per-call overhead of dlinfer's dispatch layer, on the CPU.

For a few ops on tiny tensors, the wall time of one Python call at four levels:

* ``wrapper``    ``dlinfer.ops.<op>(...)``: argument checks + custom op + vendor selection + implementation;
* ``wrapper_no_value_checks`` the same with the checks that read tensor values off: what a GPU call pays
  without ``DLINFER_CHECK=1`` (on CPU tensors those checks always run);
* ``custom_op``  ``torch.ops.dlinfer.<op>(...)``: the torch.library dispatcher + selection + implementation;
* ``impl``       the serving vendor's implementation called directly (the work itself, no dlinfer layer);
* ``floor``      a bare no-op ``torch.library`` custom op taking one tensor: what any custom op costs.

``wrapper - impl`` is what dlinfer adds per call; ``custom_op - impl`` the part torch.library accounts for.
Median of ``--calls`` (>= 1000) timed calls per level; the levels are interleaved call by call so that they see
the same machine state. Writes ``benchmarks/results/dispatch_overhead.json`` and prints a markdown table.

    python benchmarks/dispatch_overhead.py [--calls 2000] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dlinfer  # noqa: E402
import dlinfer.ops as ops  # noqa: E402
from benchmarks import timing  # noqa: E402
from dlinfer.vendor import registry  # noqa: E402

ROOT = Path(__file__).resolve().parent


def _cases():
    """op -> (wrapper call, custom-op call, the Call the registry selects on)."""
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    hidden, weight = torch.randn(4, 64), torch.ones(64)
    tokens, heads, head_size, block = 4, 2, 16, 16
    k, v = torch.randn(tokens, heads, head_size), torch.randn(tokens, heads, head_size)
    k_cache, v_cache = torch.zeros(4, block, heads, head_size), torch.zeros(4, block, heads, head_size)
    slots = torch.tensor([0, 17, 34, 51])
    q = torch.randn(2, 4, head_size)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    kv_lens = torch.tensor([20, 9], dtype=torch.int32)
    out = torch.empty(2, 4, head_size)
    scale = head_size ** -0.5
    Call = registry.Call
    return {
        "silu_and_mul": (lambda: ops.silu_and_mul(x), lambda: torch.ops.dlinfer.silu_and_mul(x),
                         Call("silu_and_mul", "cpu", x.dtype), (x,)),
        "rms_norm": (lambda: ops.rms_norm(hidden, weight, 1e-6),
                     lambda: torch.ops.dlinfer.rms_norm(hidden, weight, 1e-6),
                     Call("rms_norm", "cpu", hidden.dtype), (hidden, weight, 1e-6)),
        "fill_kv_cache": (lambda: ops.fill_kv_cache(k, v, k_cache, v_cache, slots),
                          lambda: torch.ops.dlinfer.fill_kv_cache(k, v, k_cache, v_cache, slots, [], [], 0),
                          Call("fill_kv_cache", "cpu", k.dtype, head_size, head_size, block),
                          (k, v, k_cache, v_cache, slots, [], [], 0)),
        "paged_decode_attention": (
            lambda: ops.paged_decode_attention(q, k_cache, v_cache, table, block, None, kv_lens, 32, 4, 2,
                                               attn_output=out),
            lambda: torch.ops.dlinfer.paged_decode_attention(q, k_cache, v_cache, table, kv_lens, 32, scale, out),
            Call("paged_decode_attention", "cpu", q.dtype, head_size, head_size, block),
            (q, k_cache, v_cache, table, kv_lens, 32, scale, out)),
    }


def _without_value_checks(fn):
    """``fn`` with the checks that read tensor values turned off, as on a GPU without ``DLINFER_CHECK=1``
    (on CPU tensors they always run)."""
    from dlinfer.ops import _checks

    original = _checks.values_checked

    def off(*tensors):
        return False

    def call():
        _checks.values_checked = off
        try:
            return fn()
        finally:
            _checks.values_checked = original
    return call


def _median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1e3


def measure(calls: int, warmup: int = 200) -> list[dict]:
    rows = []
    floor_x = torch.randn(4, 64)
    for op, (wrapper, custom, call, impl_args) in _cases().items():
        vendor, impl = registry.select(call)
        levels = {"wrapper": wrapper, "wrapper_no_value_checks": _without_value_checks(wrapper),
                  "custom_op": custom, "impl": lambda impl=impl, a=impl_args: impl(*a),
                  "floor": lambda: timing.noop_custom_op(floor_x)}
        samples: dict[str, list[int]] = {name: [] for name in levels}
        for _ in range(warmup):
            for fn in levels.values():
                fn()
        clock = time.perf_counter_ns
        for _ in range(calls):
            for name, fn in levels.items():
                t0 = clock()
                fn()
                samples[name].append(clock() - t0)
        med = {name: _median_us(s) for name, s in samples.items()}
        p90 = {name: statistics.quantiles(s, n=10)[-1] / 1e3 for name, s in samples.items()}
        rows.append({"op": op, "vendor": vendor.name, "calls": calls, "median_us": med, "p90_us": p90,
                     "dispatch_overhead_us": med["wrapper"] - med["impl"],
                     "dispatch_overhead_no_value_checks_us": med["wrapper_no_value_checks"] - med["impl"],
                     "custom_op_overhead_us": med["custom_op"] - med["impl"],
                     "wrapper_checks_us": med["wrapper"] - med["custom_op"]})
    return rows


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "dlinfer": dlinfer.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def table(rows: list[dict]) -> str:
    lines = ["| op | vendor | wrapper | wrapper, no value checks | torch.ops | vendor impl | no-op custom op | "
             "dlinfer adds (wrapper − impl) | same, no value checks |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["median_us"]
        lines.append(f"| {r['op']} | {r['vendor']} | {m['wrapper']:.1f} | {m['wrapper_no_value_checks']:.1f} | "
                     f"{m['custom_op']:.1f} | {m['impl']:.1f} | {m['floor']:.1f} | {r['dispatch_overhead_us']:.1f} | "
                     f"{r['dispatch_overhead_no_value_checks_us']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per level (>= 1000)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", default=str(ROOT / "results" / "dispatch_overhead.json"))
    args = parser.parse_args(argv)
    if args.calls < 1000:
        parser.error("--calls must be >= 1000")
    # Tiny tensors: one intra-op thread, so that OpenMP barriers on a busy machine do not swamp the Python cost.
    torch.set_num_threads(args.threads)
    rows = measure(args.calls)
    result = {"benchmark": "dispatch_overhead", "machine": machine(), "unit": "µs per call (median)",
              "levels": {"wrapper": "dlinfer.ops.<op>(...)",
                         "wrapper_no_value_checks": "the same with the value checks off (the GPU path without "
                                                    "DLINFER_CHECK=1); on CPU tensors they always run",
                         "custom_op": "torch.ops.dlinfer.<op>(...)", "impl": "the vendor implementation, direct",
                         "floor": "a bare no-op torch.library custom op"},
              "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"dispatch overhead on {result['machine']['cpu']} ({result['machine']['date']}), "
          f"µs per call, median of {args.calls} calls\n")
    print(table(rows))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
