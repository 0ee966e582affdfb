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

``--part own`` measures only dlinfer's own Python cost per op, for every op of the GPU suite's eager part
(``gpu_suite.py --only eager``, same calls, smaller tensors): a zero-cost stand-in vendor (each function returns
outputs allocated once) is registered and forced, and ``dlinfer.ops.<op>(...)`` is timed against a direct call of
that stand-in with the arguments dlinfer handed it. The CPU is modelled as an accelerator
(``dlinfer.ops._checks.HOST_DEVICE_TYPES`` emptied for the measurement): the value checks and the vendor-result
check, which always run on host tensors, are off as on a GPU without ``DLINFER_CHECK=1``, so the timed path is
the one GPU tensors take. Writes ``benchmarks/results/dispatch_own_overhead.json``.

    python benchmarks/dispatch_overhead.py [--part levels|own] [--calls 2000] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):
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


# ------------------------------------------------------------------------------ own overhead (--part own)
def step_tensors(dtype=torch.bfloat16) -> types.SimpleNamespace:
    """The arguments of one decode step as ``gpu_suite.py --only eager`` builds them (smaller tensors: neither a
    stand-in vendor nor a stubbed launch reads them); dlinfer's and LMDeploy's calls share them."""
    g = torch.Generator().manual_seed(1)
    t = types.SimpleNamespace(hq=4, hk=2, head=64, hidden=256, inter=512, batch=4, ctx=256, block=64, tp=16,
                              experts=8, topk=2)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    t.x1, t.r1, t.w, t.xs = rnd(1, t.hidden), rnd(1, t.hidden), torch.ones(t.hidden, dtype=dtype), rnd(1, 2 * t.inter)
    qkv = rnd(t.batch, (t.hq + 2 * t.hk) * t.head)
    t.q = qkv[:, :t.hq * t.head].view(t.batch, t.hq, t.head)
    t.k = qkv[:, t.hq * t.head:(t.hq + t.hk) * t.head].view(t.batch, t.hk, t.head)
    t.v = qkv[:, (t.hq + t.hk) * t.head:].view(t.batch, t.hk, t.head)
    t.cos, t.sin = rnd(t.batch, t.head), rnd(t.batch, t.head)
    nb = t.batch * t.ctx // t.block
    t.k_cache, t.v_cache = rnd(nb, t.block, t.hk, t.head), rnd(nb, t.block, t.hk, t.head)
    t.table = torch.randperm(nb, generator=g).view(t.batch, -1).to(torch.int32)
    t.seqlens = torch.full((t.batch,), t.ctx, dtype=torch.int32)
    t.slots = torch.arange(t.batch, dtype=torch.int32) * t.ctx + t.ctx - 1
    t.qd, t.out_d, t.scale = t.q.contiguous(), torch.empty(t.batch, t.hq, t.head, dtype=dtype), t.head ** -0.5
    t.qp, t.kp, t.vp = rnd(t.tp, t.hq, t.head), rnd(t.tp, t.hk, t.head), rnd(t.tp, t.hk, t.head)
    t.out_p = torch.empty(t.tp, t.hq, t.head, dtype=dtype)
    t.lp = torch.full((1,), t.tp, dtype=torch.int32)
    t.cup = torch.tensor([0, t.tp], dtype=torch.int32)
    t.xm, t.logits = rnd(1, t.hidden), rnd(1, t.experts)
    t.gate_up, t.down = rnd(t.experts, 2 * t.inter, t.hidden), rnd(t.experts, t.hidden, t.inter)
    t.tw, t.ti = torch.topk(torch.softmax(t.logits.float(), -1), t.topk, dim=-1)
    t.lw = rnd(t.hidden, t.hidden)
    t.a8 = torch.randint(-127, 128, (1, t.hidden), dtype=torch.int8, generator=g)
    t.b8 = torch.randint(-127, 128, (t.hidden, t.hidden), dtype=torch.int8, generator=g)
    t.a_scale, t.b_scale = torch.rand(1, 1, generator=g) + 0.1, torch.rand(t.hidden, 1, generator=g) + 0.1
    return t


def eager_calls(t: types.SimpleNamespace) -> dict[str, Callable[[], object]]:
    """op -> a call of ``dlinfer.ops.<op>`` as ``gpu_suite.py --only eager`` makes it, on :func:`step_tensors`.
    The batch layout of the prefill calls is planned once, as the engine adapters' per-step builder does
    (``dlinfer.framework.batch``)."""
    from dlinfer.framework import batch as batch_layout

    layout = batch_layout.from_lengths(t.lp, t.lp, no_history=True)
    q_ends, table1 = layout.q_ends, t.table[:1]  # made by the caller (LMDeploy's backend), once per step
    return {
        "rms_norm": lambda: ops.rms_norm(t.x1, t.w, 1e-6),
        "add_rms_norm": lambda: ops.add_rms_norm(t.x1, t.r1, t.w, 1e-6),
        "silu_and_mul": lambda: ops.silu_and_mul(t.xs),
        "apply_rotary_pos_emb": lambda: ops.apply_rotary_pos_emb(t.q, t.k, t.cos, t.sin),
        "fill_kv_cache": lambda: ops.fill_kv_cache(t.k, t.v, t.k_cache, t.v_cache, t.slots),
        "apply_rotary_pos_emb_fill_kv_cache": lambda: ops.apply_rotary_pos_emb_fill_kv_cache(
            t.q, t.k, t.v, t.k_cache, t.v_cache, t.cos, t.sin, t.slots),
        "paged_decode_attention": lambda: ops.paged_decode_attention(
            t.qd, t.k_cache, t.v_cache, t.table, t.block, None, t.seqlens, t.ctx, t.hq, t.hk, attn_output=t.out_d),
        "prefill_attention": lambda: ops.prefill_attention(t.qp, t.kp, t.vp, None, None, t.lp, t.lp, t.tp, t.hq, t.hk,
                                                           [None], attn_output=t.out_p),
        "paged_prefill_attention": lambda: ops.paged_prefill_attention(
            t.qp, None, None, t.k_cache, t.v_cache, table1, t.block, q_ends, t.lp, t.tp, t.tp, t.hq, t.hk, [None],
            attn_output=t.out_p),
        "moe_gating_topk_softmax": lambda: ops.moe_gating_topk_softmax(t.logits, t.topk, None),
        "fused_moe": lambda: ops.fused_moe(t.xm, t.gate_up, t.down, t.tw, t.ti, t.topk, True),
        "linear": lambda: ops.linear(t.x1, t.lw),
        # the W8A8 family's per-layer ops (LMDeploy's SmoothQuant models)
        "rms_norm_w8a8": lambda: ops.rms_norm_w8a8(t.x1, t.w, 1e-6),
        "add_rms_norm_w8a8": lambda: ops.add_rms_norm_w8a8(t.x1, t.r1, t.w, 1e-6),
        "dynamic_quant": lambda: ops.dynamic_quant(t.x1),
        "linear_w8a8": lambda: ops.linear_w8a8(t.a8, t.b8, t.a_scale, t.b_scale, t.x1.dtype),
    }


class StandIn:
    """A vendor whose every function returns outputs allocated at its first call (``None`` for in-place ops) and
    remembers the arguments of its last call: the cost of the vendor itself is a Python call."""

    NAME = "standin"

    def __init__(self):
        from dlinfer.ops import table as op_table

        self.last: dict[str, tuple] = {}
        self.functions = {d.name: self._function(d) for d in op_table.TABLE}

    def _function(self, d):
        outputs, last = [], self.last

        def fn(*args):
            last[d.name] = args
            if not outputs:
                outputs.append(d.fake(*args))
            return outputs[0]
        return fn

    def vendor(self) -> registry.Vendor:
        return registry.Vendor(name=self.NAME, priority=1 << 30, devices=frozenset({"cpu"}),
                               default_devices=frozenset({"cpu"}), ops=self.functions)


@contextlib.contextmanager
def as_accelerator():
    """Tensors on the CPU take the path of accelerator tensors without ``DLINFER_CHECK=1`` (no value checks, no
    vendor-result check): ``_checks.HOST_DEVICE_TYPES`` is emptied, and restored after."""
    from dlinfer.ops import _checks

    saved = _checks.HOST_DEVICE_TYPES
    _checks.set_host_device_types(frozenset())
    try:
        yield
    finally:
        _checks.set_host_device_types(saved)


def measure_own(calls: int, warmup: int = 200, accelerator: bool = True) -> list[dict]:
    """Per op: ``dlinfer.ops.<op>(...)`` and the stand-in vendor called directly with the arguments dlinfer
    handed it, interleaved call by call. ``own_us`` is the difference: dlinfer's Python cost per call."""
    standin = StandIn()
    fns = eager_calls(step_tensors())
    rows = []
    with registry.pinned("reference"), contextlib.ExitStack() as stack:
        registry.register_vendor(standin.vendor())
        stack.enter_context(registry.forced(StandIn.NAME))
        if accelerator:
            stack.enter_context(as_accelerator())
        for op, call in fns.items():
            call()
            fn, args = standin.functions[op], standin.last[op]
            levels = {"dlinfer": call, "direct": lambda fn=fn, args=args: fn(*args)}
            samples = _interleaved(levels, calls, warmup)
            med = {name: _median_us(s) for name, s in samples.items()}
            rows.append({"op": op, "calls": calls, "median_us": med, "own_us": med["dlinfer"] - med["direct"]})
    return rows


def own_table(rows: list[dict]) -> str:
    lines = ["| op | dlinfer.ops | stand-in vendor, direct | dlinfer's own cost |", "|---|---:|---:|---:|"]
    for r in rows:
        m = r["median_us"]
        lines.append(f"| {r['op']} | {m['dlinfer']:.2f} | {m['direct']:.2f} | {r['own_us']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------- launch preparation (--part vendor)
@contextlib.contextmanager
def stubbed_kernels(prefixes: tuple[str, ...]):
    """Every Triton kernel object (``KernelInterface``: jit, autotuned, heuristics) in the modules under
    ``prefixes`` launches nothing inside the block: what is left of a call is the host code around the launch."""
    from triton.runtime.jit import KernelInterface

    def launch_nothing(*args, **kwargs):
        return None

    stubbed = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(prefixes):
            continue
        for obj in vars(module).values():
            if isinstance(obj, KernelInterface) and "run" not in vars(obj):
                obj.run = launch_nothing
                stubbed.append(obj)
    try:
        yield len(stubbed)
    finally:
        for obj in stubbed:
            del obj.run


def _lmdeploy_calls(k, t: types.SimpleNamespace) -> dict[str, Callable[[], object]]:
    """LMDeploy 0.18's wrappers on :func:`step_tensors` (as ``gpu_suite.py`` calls them), with H100-like device
    properties (the wrappers read them; on the CPU there are none)."""
    from benchmarks import peers

    props = dict(multi_processor_count=132, compute_capability=(9, 0), warps_per_sm=64, blocks_per_sm=32)
    for name, module in sys.modules.items():
        if name.startswith("lmdeploy.pytorch.kernels.cuda") and module is not None:
            if hasattr(module, "get_device_props"):
                module.get_device_props = lambda device=None: props
            if hasattr(module, "is_cuda"):
                module.is_cuda = lambda: True
    q_start, ones = torch.arange(t.batch, dtype=torch.int32), torch.ones(t.batch, dtype=torch.int32)
    cup, tp, table1, start1 = t.cup, t.tp, t.table[:1], t.cup[:1]
    return {
        "rms_norm": lambda: peers.lmdeploy_rms_norm(k, t.x1, t.w, 1e-6),
        "add_rms_norm": lambda: peers.lmdeploy_add_rms_norm(k, t.x1, t.r1, t.w, 1e-6),
        "silu_and_mul": lambda: peers.lmdeploy_silu_and_mul(k, t.xs),
        "apply_rotary_pos_emb": lambda: peers.lmdeploy_rotary(k, t.q, t.k, t.cos, t.sin),
        "fill_kv_cache": lambda: peers.lmdeploy_fill_kv_cache(k, t.k, t.v, t.k_cache, t.v_cache, q_start, ones,
                                                              t.seqlens, 1, t.table),
        "paged_decode_attention": lambda: peers.lmdeploy_paged_decode(k, t.qd, t.k_cache, t.v_cache, t.table,
                                                                      t.seqlens, t.scale),
        "prefill_attention": lambda: peers.lmdeploy_prefill(k, t.qp, t.kp, t.vp, cup, cup, tp, tp, t.scale),
        "paged_prefill_attention": lambda: peers.lmdeploy_paged_prefill(k, t.qp, t.k_cache, t.v_cache, table1, cup,
                                                                        cup, t.lp, start1, tp, tp, tp, t.scale),
        "linear": lambda: torch.nn.functional.linear(t.x1, t.lw),
    }


def measure_vendor(calls: int, warmup: int = 200) -> list[dict]:
    """Per op, the host code of a whole call with every Triton kernel launch stubbed out (``TRITON_INTERPRET=1``:
    the ``triton`` vendor then serves CPU tensors): ``dlinfer`` is ``dlinfer.ops.<op>(...)`` with the ``triton``
    vendor forced, on the accelerator path; ``vendor`` that vendor's function called directly with the arguments
    dlinfer hands it (its launch preparation alone); ``lmdeploy`` LMDeploy 0.18's wrapper on the same batch
    (``torch`` for linear), when LMDeploy is importable. Triton's own launcher is not in these numbers."""
    if not os.environ.get("TRITON_INTERPRET", "").strip() in ("1", "true", "yes", "on"):
        raise SystemExit("--part vendor needs TRITON_INTERPRET=1 (the triton vendor serves CPU tensors only then)")
    from dlinfer.vendor import triton as triton_vendor

    tensors, peer = step_tensors(), {}
    try:
        from benchmarks import peers

        peer = _lmdeploy_calls(peers.load_lmdeploy(), tensors)
    except Exception as exc:  # noqa: BLE001 - the comparison is optional
        print(f"LMDeploy not loaded ({type(exc).__name__}: {exc}); dlinfer columns only")
    standin, fns = StandIn(), eager_calls(tensors)
    with registry.pinned("reference", "triton"), contextlib.ExitStack() as stack:
        registry.register_vendor(standin.vendor())
        with registry.forced(StandIn.NAME), as_accelerator():
            for call in fns.values():
                call()  # the arguments dlinfer hands a vendor
        stack.enter_context(registry.forced("triton"))
        stack.enter_context(as_accelerator())
        stack.enter_context(stubbed_kernels(("dlinfer.vendor.triton", "lmdeploy.")))
        rows = []
        for op, call in fns.items():
            if op not in triton_vendor.VENDOR.ops:
                continue
            fn, args = triton_vendor.VENDOR.ops[op], standin.last[op]
            levels = {"dlinfer": call, "vendor": lambda fn=fn, args=args: fn(*args)}
            if op in peer:
                levels["lmdeploy"] = peer[op]
            for f in levels.values():
                f()
            samples = _interleaved(levels, calls, warmup)
            med = {name: _median_us(s) for name, s in samples.items()}
            row = {"op": op, "calls": calls, "median_us": med}
            if "lmdeploy" in med:
                row["dlinfer_minus_lmdeploy_us"] = med["dlinfer"] - med["lmdeploy"]
            rows.append(row)
    return rows


def _interleaved(levels: dict[str, Callable[[], object]], calls: int, warmup: int) -> dict[str, list[int]]:
    samples: dict[str, list[int]] = {name: [] for name in levels}
    for _ in range(warmup):
        for f in levels.values():
            f()
    clock = time.perf_counter_ns
    for _ in range(calls):
        for name, f in levels.items():
            t0 = clock()
            f()
            samples[name].append(clock() - t0)
    return samples


def vendor_table(rows: list[dict]) -> str:
    lines = ["| op | dlinfer.ops (triton, launches stubbed) | triton vendor function alone | LMDeploy wrapper | "
             "dlinfer − LMDeploy |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        m = r["median_us"]
        peer = f"{m['lmdeploy']:.2f}" if "lmdeploy" in m else "-"
        diff = f"{r['dlinfer_minus_lmdeploy_us']:+.2f}" if "dlinfer_minus_lmdeploy_us" in r else "-"
        lines.append(f"| {r['op']} | {m['dlinfer']:.2f} | {m['vendor']:.2f} | {peer} | {diff} |")
    return "\n".join(lines)


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
    parser.add_argument("--part", choices=("levels", "own", "vendor"), default="levels",
                        help="levels: the reference vendor at four levels (default); own: dlinfer's own cost per op "
                             "with a stand-in vendor, on the accelerator path; vendor: whole calls with the Triton "
                             "launches stubbed, against LMDeploy's wrappers (TRITON_INTERPRET=1)")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per level (>= 1000)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/dispatch_overhead.json "
                                                   "(--part own: dispatch_own_overhead.json, --part vendor: "
                                                   "launch_preparation.json)")
    args = parser.parse_args(argv)
    if args.calls < 1000:
        parser.error("--calls must be >= 1000")
    # Tiny tensors: one intra-op thread, so that OpenMP barriers on a busy machine do not swamp the Python cost.
    torch.set_num_threads(args.threads)
    if args.part == "own":
        rows = measure_own(args.calls)
        result = {"benchmark": "dispatch_own_overhead", "machine": machine(), "unit": "µs per call (median)",
                  "levels": {"dlinfer": "dlinfer.ops.<op>(...) with the stand-in vendor forced, on the accelerator "
                                        "path (HOST_DEVICE_TYPES emptied)",
                             "direct": "the stand-in vendor's function called with the arguments dlinfer handed it"},
                  "command": "python benchmarks/dispatch_overhead.py --part own", "results": rows}
        text = own_table(rows)
        default_out = "dispatch_own_overhead.json"
    elif args.part == "vendor":
        rows = measure_vendor(args.calls)
        result = {"benchmark": "launch_preparation", "machine": machine(), "unit": "µs per call (median)",
                  "levels": {"dlinfer": "dlinfer.ops.<op>(...) with the triton vendor forced, every Triton launch "
                                        "stubbed, on the accelerator path",
                             "vendor": "the triton vendor's function called directly (its launch preparation)",
                             "lmdeploy": "LMDeploy 0.18's wrapper, launches stubbed (torch F.linear for linear)"},
                  "command": "TRITON_INTERPRET=1 python benchmarks/dispatch_overhead.py --part vendor",
                  "results": rows}
        text = vendor_table(rows)
        default_out = "launch_preparation.json"
    else:
        rows = measure(args.calls)
        result = {"benchmark": "dispatch_overhead", "machine": machine(), "unit": "µs per call (median)",
                  "levels": {"wrapper": "dlinfer.ops.<op>(...)",
                             "wrapper_no_value_checks": "the same with the value checks off (the GPU path without "
                                                        "DLINFER_CHECK=1); on CPU tensors they always run",
                             "custom_op": "torch.ops.dlinfer.<op>(...)", "impl": "the vendor implementation, direct",
                             "floor": "a bare no-op torch.library custom op"},
                  "results": rows}
        text = table(rows)
        default_out = "dispatch_overhead.json"
    out = Path(args.out or ROOT / "results" / default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['benchmark']} on {result['machine']['cpu']} ({result['machine']['date']}), "
          f"µs per call, median of {args.calls} calls\n")
    print(text)
    print(f"\nwritten to {out}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
