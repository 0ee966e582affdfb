"""Turn gpu_suite.py JSON files into benchmarks/RESULTS.md and benchmarks/roofline.png.

    python3 benchmarks/report.py [benchmarks/results/bench_*.json] [--md benchmarks/RESULTS.md]
                                 [--png benchmarks/roofline.png] [--notes benchmarks/goal_notes.json]

Every number in the output is computed from the JSON: the tables per op and shape (dlinfer, LMDeploy peer and
torch GPU µs, peer ÷ dlinfer, % of bound), the speed goals each marked met / missed by how much / not
measured, the summary's op-level lines, the eager call costs, and the card, versions, date and command of every run. When several files
hold the same (op, shape), the newest run wins; ratios are always taken within one run (the peer timed beside
dlinfer on the same card). ``--notes`` may map a goal id to a sentence on what limits it (e.g. an ncu
finding); it is printed beside the computed status, never instead of it. ``--summary`` names a short markdown
list written by the developers (the end-to-end results, which come from other scripts) that opens the summary;
every table names the card it was measured on. A new card's runs need no change here: pass their JSON files.

Runs on CPU; the plot needs matplotlib (skipped with a message when it is missing).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER = "lmdeploy"
PARITY = 0.98

OP_ORDER = ("paged_decode_attention", "prefill_attention", "paged_prefill_attention", "fill_kv_cache",
            "apply_rotary_pos_emb_fill_kv_cache", "rms_norm", "add_rms_norm", "apply_rotary_pos_emb", "silu_and_mul",
            "fused_moe", "moe_gating_topk_softmax")


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class Run:
    path: str
    meta: dict
    ceilings: dict
    records: list[dict]
    eager: dict
    check: dict
    parts: dict
    budget_skipped: dict = field(default_factory=dict)
    index: int = 0


@dataclass
class Row:
    """One (op, shape) of one run: its implementations' records."""

    op: str
    case: str
    params: dict
    run: Run
    impls: dict[str, dict] = field(default_factory=dict)

    def us(self, impl: str) -> float | None:
        rec = self.impls.get(impl)
        return rec.get("us") if rec and rec.get("us", 0) > 0 and not rec.get("error") else None

    def pct(self, impl: str) -> float | None:
        rec = self.impls.get(impl)
        return rec.get("pct_bound") if rec and self.us(impl) else None

    def ratio(self, base: str = PEER) -> float | None:
        """``base`` time ÷ dlinfer time (> 1: dlinfer faster)."""
        d, p = self.us("dlinfer"), self.us(base)
        return p / d if d and p else None

    def check_failed(self, impl: str) -> bool:
        rec = self.impls.get(impl) or {}
        return bool(rec.get("check")) and not rec["check"].get("ok", False)


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "meta" not in data or "records" not in data:
            raise ValueError(f"{path}: not a gpu_suite.py result (no 'meta'/'records')")
        runs.append(Run(str(path), data["meta"], data.get("ceilings") or {}, data["records"], data.get("eager") or {},
                        data.get("check") or {}, data.get("parts") or {}, data.get("budget_skipped") or {}))
    runs.sort(key=lambda r: r.meta.get("date", ""))
    for i, run in enumerate(runs, 1):
        run.index = i
    return runs


def merge_rows(runs: list[Run]) -> list[Row]:
    """Rows by (op, case); a later run replaces an earlier one's row as a whole (ratios stay within a run)."""
    rows: dict[tuple[str, str], Row] = {}
    for run in runs:
        mine: dict[tuple[str, str], Row] = {}
        for rec in run.records:
            key = (rec["op"], rec["case"])
            row = mine.setdefault(key, Row(rec["op"], rec["case"], rec.get("params", {}), run))
            row.impls[rec["impl"]] = rec
        rows.update(mine)
    order = {op: i for i, op in enumerate(OP_ORDER)}
    return sorted(rows.values(), key=lambda r: (order.get(r.op, len(order)), r.op, _sort_key(r.params)))


def _sort_key(params: dict) -> tuple:
    return tuple((k, v if isinstance(v, (int, float)) else str(v)) for k, v in params.items())


# ------------------------------------------------------------------------------------------------- labels
def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def label(row: Row) -> str:
    p = row.params
    if row.op == "paged_decode_attention":
        return f"B={p.get('batch')} ctx={_k(p.get('ctx', 0))} block={p.get('block')}"
    if row.op in ("prefill_attention", "paged_prefill_attention"):
        if p.get("history"):  # chunked prefill: new tokens over a cached history
            return f"{p.get('seqs')}×{p.get('seqlen')} over {_k(p['history'])} history, block {p.get('block')}"
        return f"{p.get('seqs')}×{p.get('seqlen')}"
    if row.op in ("fill_kv_cache", "apply_rotary_pos_emb_fill_kv_cache"):
        return f"{p.get('kind')} {p.get('tokens')} tok, block {p.get('block')}"
    if row.op == "fused_moe":
        routing = f", {p['routing']} routing (max load {p.get('max_load_x_mean')}× mean)" if "routing" in p else ""
        return f"{p.get('model')} T={p.get('tokens')}{routing}"
    if row.op == "moe_gating_topk_softmax":
        return f"E{p.get('experts')} top{p.get('topk')} T={p.get('tokens')}"
    if "tokens" in p:
        return f"T={p['tokens']}"
    return row.case


# -------------------------------------------------------------------------------------------------- goals
@dataclass
class Goal:
    id: str
    text: str
    status: str = "not measured"           # met / missed / not measured
    detail: str = ""


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}%"


def _evaluate(goal: Goal, rows: list[Row], test: Callable[[Row], tuple[bool, float, str] | None],
              expected: int | None = None) -> Goal:
    """``test(row)`` gives (ok, shortfall, description) or None when the row lacks the numbers needed.

    Met when every row passes (and, with ``expected``, that many rows were measured); missed names the worst
    shortfall; not measured when no row had the numbers.
    """
    def judged(row: Row):
        result = test(row)
        if result is not None and row.check_failed("dlinfer"):     # fast but wrong counts as a miss
            return False, float("inf"), "dlinfer's output failed its correctness check"
        return result

    results = [(row, judged(row)) for row in rows]
    measured = [(row, r) for row, r in results if r is not None]
    if not measured:
        goal.status, goal.detail = "not measured", "no row with dlinfer and the comparison timed"
        return goal
    failed = [(row, r) for row, r in measured if not r[0]]
    if failed:
        row, (ok, short, desc) = max(failed, key=lambda item: item[1][1])
        goal.status = "missed"
        goal.detail = (f"{len(failed)} of {len(measured)} shapes miss; worst {label(row)}: {desc}")
    else:
        goal.status = "met"
        worst = max(measured, key=lambda item: item[1][1])
        goal.detail = f"all {len(measured)} shapes; tightest {label(worst[0])}: {worst[1][2]}"
    if expected is not None and len(measured) < expected:
        missing = f"{expected - len(measured)} of {expected} expected shapes not measured"
        goal.detail += f"; {missing}"
        if goal.status == "met":
            goal.status = "not measured"
    return goal


def _ratio_test(minimum: float, base: str = PEER):
    def test(row: Row):
        r = row.ratio(base)
        if r is None:
            return None
        return (r >= minimum, minimum - r, f"{_fmt_ratio(r)} vs {base} (goal ≥ {minimum:.2f}×"
                + (f", missed by {minimum - r:.2f}×)" if r < minimum else ")"))
    return test


def _pct_test(minimum: float):
    def test(row: Row):
        p = row.pct("dlinfer")
        if p is None:
            return None
        return (p >= minimum, minimum - p, f"{_fmt_pct(p)} of bound (goal ≥ {minimum:.0f}%"
                + (f", missed by {minimum - p:.0f} points)" if p < minimum else ")"))
    return test


def _ratio_or_pct_test(min_ratio: float, min_pct: float):
    def test(row: Row):
        r, p = row.ratio(), row.pct("dlinfer")
        if r is None and p is None:
            return None
        ok = (r is not None and r >= min_ratio) or (p is not None and p >= min_pct)
        # shortfall in "fraction of the easier target" so that the worst row is the one furthest from both
        short = min((min_ratio - r) / min_ratio if r is not None else 1.0,
                    (min_pct - p) / min_pct if p is not None else 1.0)
        desc = f"{_fmt_ratio(r)} vs {PEER}, {_fmt_pct(p)} of bound (goal ≥ {min_ratio:.1f}× or ≥ {min_pct:.0f}%)"
        return ok, short, desc
    return test


def evaluate_goals(rows: list[Row], runs: list[Run]) -> list[Goal]:
    def sel(op: str, pred: Callable[[dict], bool] = lambda p: True) -> list[Row]:
        return [r for r in rows if r.op == op and pred(r.params)]

    decode = "paged_decode_attention"
    goals = []
    kv_256 = [r for r in sel(decode) if (r.impls.get("dlinfer") or {}).get("bytes", 0) >= 256e6]
    goals.append(_evaluate(Goal("decode_bandwidth", "paged decode: ≥ 90 % of copy bandwidth where the KV read is "
                                "≥ 256 MB"), kv_256, _pct_test(90.0)))
    small = sel(decode, lambda p: p.get("batch") == 1 or p.get("block") == 16)
    goals.append(_evaluate(Goal("decode_small", "paged decode at B = 1 (ctx 1k–16k) and with block size 16: "
                                "≥ 1.3× the peer or ≥ 90 % of bound"), small, _ratio_or_pct_test(1.3, 90.0)))
    goals.append(_evaluate(Goal("decode_parity", "paged decode: nowhere below parity with the peer (≥ 0.98×)"),
                           sel(decode), _ratio_test(PARITY), expected=24))
    prefill, paged_prefill = "prefill_attention", "paged_prefill_attention"
    long_prefill = sel(prefill, lambda p: p.get("seqlen") in (2048, 8192))
    goals.append(_evaluate(Goal(f"{prefill}_peer", "prefill: ≥ 1.2× the peer at 16×512, 4×2048, 1×8192"),
                           sel(prefill), _ratio_test(1.2), expected=3))
    goals.append(_evaluate(Goal(f"{prefill}_cudnn", "prefill: ≥ 0.9× torch cuDNN SDPA at 4×2048 and 1×8192"),
                           long_prefill, _ratio_test(0.9, "torch"), expected=2))
    goals.append(_evaluate(Goal(f"{prefill}_cudnn_parity", "prefill (stretch): parity with torch cuDNN SDPA at "
                                "4×2048 and 1×8192"), long_prefill, _ratio_test(PARITY, "torch"), expected=2))
    goals.append(_evaluate(Goal(f"{paged_prefill}_peer", "paged prefill: ≥ 1.1× the peer everywhere, chunked "
                                "prefill (256 new tokens over 16k of history, batch 1 and 8) included"),
                           sel(paged_prefill), _ratio_test(1.1), expected=7))
    bound_ops = (("fill_kv_cache", "fill_kv_cache", lambda p: p.get("kind") == "prefill"),
                 ("rms_norm", "rms_norm", lambda p: p.get("tokens") == 8192),
                 ("add_rms_norm", "add_rms_norm", lambda p: p.get("tokens") == 8192),
                 ("apply_rotary_pos_emb", "rotary", lambda p: p.get("tokens") == 8192),
                 ("silu_and_mul", "silu_and_mul", lambda p: p.get("tokens") == 8192))
    for op, name, at_8192 in bound_ops:
        goals.append(_evaluate(Goal(f"{op}_bound", f"{name}: ≥ 90 % of bound at 8192 tokens"), sel(op, at_8192),
                               _pct_test(90.0), expected=1))
        goals.append(_evaluate(Goal(f"{op}_parity", f"{name}: parity with the peer at every shape"), sel(op),
                               _ratio_test(PARITY), expected=2 if op == "fill_kv_cache" else 3))
    goals.append(_evaluate(Goal("moe_mixtral", "fused MoE: parity with the peer on Mixtral-8x7B shapes"),
                           sel("fused_moe", lambda p: p.get("model") == "mixtral-8x7b" and "routing" not in p),
                           _ratio_test(PARITY), expected=4))
    goals.append(_evaluate(Goal("moe_qwen3", "fused MoE on Qwen3-30B-A3B shapes at T ≥ 512: ≥ 1.3× the peer or "
                                "≥ 90 % of bound"),
                           sel("fused_moe", lambda p: p.get("model") == "qwen3-30b-a3b" and p.get("tokens", 0) >= 512
                               and "routing" not in p),
                           _ratio_or_pct_test(1.3, 90.0), expected=2))
    goals.append(_evaluate(Goal("gating", "MoE gating (softmax + top-k): ≥ 3× torch's GPU time"),
                           sel("moe_gating_topk_softmax"), _ratio_test(3.0, "torch")))
    goals.append(evaluate_eager_goal(runs))
    return goals


def eager_table(runs: list[Run]) -> tuple[list[dict], Run | None]:
    """Per op: dlinfer and peer median call cost and the floor, from the newest run that measured them."""
    run = next((r for r in reversed(runs) if r.eager.get("costs")), None)
    if run is None:
        return [], None
    costs, pairs = run.eager["costs"], run.eager.get("pairs", {})
    floor = costs.get("floor:noop_custom_op", {}).get("median_us")
    out = []
    for op, impls in pairs.items():
        d = costs.get(impls.get("dlinfer", ""), {}).get("median_us")
        peer_impl = PEER if PEER in impls else ("torch" if "torch" in impls else None)
        p = costs.get(impls.get(peer_impl, ""), {}).get("median_us") if peer_impl else None
        limit = p + floor if p is not None and floor is not None else None
        out.append({"op": op, "dlinfer": d, "peer_impl": peer_impl, "peer": p, "floor": floor, "limit": limit,
                    "ok": (d <= limit) if d is not None and limit is not None else None,
                    "note": "; ".join(f"{k}: {v}" for k, v in impls.items() if str(v).startswith("skipped"))})
    return out, run


def evaluate_eager_goal(runs: list[Run]) -> Goal:
    goal = Goal("eager", "eager call cost per op: at most the peer's plus the bare custom-op floor")
    table, _ = eager_table(runs)
    rows = [t for t in table if t["ok"] is not None]
    if not rows:
        goal.detail = "no eager costs with both dlinfer and a peer"
        return goal
    missed = [t for t in rows if not t["ok"]]
    if missed:
        worst = max(missed, key=lambda t: t["dlinfer"] - t["limit"])
        goal.status = "missed"
        goal.detail = (f"{len(missed)} of {len(rows)} ops miss; worst {worst['op']}: {worst['dlinfer']:.1f} µs vs "
                       f"{worst['peer_impl']} {worst['peer']:.1f} + floor {worst['floor']:.1f} µs "
                       f"(missed by {worst['dlinfer'] - worst['limit']:.1f} µs)")
    else:
        goal.status = "met"
        goal.detail = f"all {len(rows)} ops within the peer's cost plus the floor ({rows[0]['floor']:.1f} µs)"
    return goal


# ---------------------------------------------------------------------------------------------- markdown
def _us(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def _rate(rec: dict | None) -> str:
    if not rec or not rec.get("us"):
        return "-"
    if rec.get("bound") == "compute" and rec.get("tflops"):
        return f"{rec['tflops']:.0f} TFLOP/s"
    return f"{rec['gbps']:.0f} GB/s" if rec.get("gbps") else "-"


def _cell(row: Row, impl: str) -> str:
    rec = row.impls.get(impl)
    if rec is None:
        return "-"
    if rec.get("error"):
        return "error"
    if rec.get("skipped"):
        return "skip"
    return _us(row.us(impl)) + (" ✗" if row.check_failed(impl) else "")


def op_tables(rows: list[Row]) -> list[str]:
    lines = []
    by_op: dict[str, list[Row]] = {}
    for row in rows:
        by_op.setdefault(row.op, []).append(row)
    for op, op_rows in by_op.items():
        extras = sorted({impl for r in op_rows for impl in r.impls} - {"dlinfer", PEER, "torch"})
        lines += [f"### {op} ({_cards(r.run for r in op_rows)})", ""]
        head = ["shape", "dlinfer µs", f"{PEER} µs", "torch µs"] + [f"{e} µs" for e in extras] + [
            f"{PEER} ÷ dlinfer", "torch ÷ dlinfer", "dlinfer % of bound", f"{PEER} % of bound", "dlinfer rate", "run"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in op_rows:
            cells = [label(r), _cell(r, "dlinfer"), _cell(r, PEER), _cell(r, "torch")]
            cells += [_cell(r, e) for e in extras]
            cells += [_fmt_ratio(r.ratio()), _fmt_ratio(r.ratio("torch")), _fmt_pct(r.pct("dlinfer")),
                      _fmt_pct(r.pct(PEER)), _rate(r.impls.get("dlinfer")), str(r.run.index)]
            lines.append("| " + " | ".join(cells) + " |")
        notes = []
        for r in op_rows:
            for impl, rec in r.impls.items():
                if rec.get("error"):
                    notes.append(f"{label(r)} {impl}: error `{rec['error'][:200]}`")
                elif rec.get("skipped"):
                    notes.append(f"{label(r)} {impl}: skipped ({rec['skipped'][:160]})")
                check = rec.get("check")
                if check and not check.get("ok"):
                    notes.append(f"{label(r)} {impl}: correctness check FAILED (rel err "
                                 f"{check.get('rel_err'):.2e} > {check.get('tol')})")
                if rec.get("method") == "eager" and impl == "dlinfer":
                    notes.append(f"{label(r)} {impl}: timed eagerly ({rec.get('note') or 'not capturable'})")
        impl_notes = sorted({f"{impl}: {rec['note']}" for r in op_rows for impl, rec in r.impls.items()
                             if rec.get("note")})
        if impl_notes:
            lines += ["", "Implementations: " + "; ".join(impl_notes) + "."]
        if notes:
            lines += [""] + [f"- {n}" for n in dict.fromkeys(notes)]
        lines.append("")
    return lines


def _cards(runs: Iterable[Run]) -> str:
    """The cards of ``runs``, in run order, joined for a heading."""
    return ", ".join(dict.fromkeys(str(r.meta.get("card", "?")) for r in runs)) or "?"


def _peer_name(meta: dict) -> str:
    """The peer's name and version, without where it was installed on the measuring machine."""
    peer = str(meta.get("peer", meta.get("peer_error", "-")))
    return re.sub(r"\s*\((/|[A-Za-z]:\\)[^)]*\)", "", peer)


def summary_lines(rows: list[Row]) -> list[str]:
    """One line per card: each op's GPU time against the peer (geometric mean of peer ÷ dlinfer over the measured
    shapes, with the range), faster ops first."""
    by_card: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        ratio = row.ratio()
        if ratio and ratio > 0:
            by_card.setdefault(str(row.run.meta.get("card", "?")), {}).setdefault(row.op, []).append(ratio)
    lines = []
    for card, ops in by_card.items():
        means = {op: math.exp(sum(map(math.log, rs)) / len(rs)) for op, rs in ops.items()}
        order = sorted(means, key=lambda op: -means[op])

        def fmt(op):
            rs = ops[op]
            spread = f" ({min(rs):.2f}-{max(rs):.2f}×)" if len(rs) > 1 else ""
            return f"{op} {means[op]:.2f}×{spread}"

        faster = [fmt(op) for op in order if means[op] >= 1.0]
        slower = [fmt(op) for op in order if means[op] < 1.0]
        lines.append(f"- **Ops on {card}** (GPU time per call against {PEER}'s kernels, geometric mean over the "
                     f"shapes below, > 1× = dlinfer faster): at or above the peer: {'; '.join(faster) or 'none'}. "
                     f"Below: {'; '.join(slower) or 'none'}.")
    return lines


def render_markdown(runs: list[Run], rows: list[Row], goals: list[Goal], notes: dict[str, str],
                    png_name: str | None, command: str, summary: str = "",
                    correctness_elsewhere: str | None = None) -> str:
    lines = ["# dlinfer op benchmarks on the GPU", "",
             f"Generated by `{command}` from {len(runs)} run(s) of `benchmarks/gpu_suite.py`; do not edit by hand.",
             "GPU time per call by CUDA-graph replay with the L2 flushed (a 128 MB memset before every call, "
             "subtracted); bound = the op's fewest bytes at the measured copy bandwidth or its FLOPs at the "
             "measured bf16 matmul rate, whichever is larger; ratios > 1 mean dlinfer is faster; ratios are taken "
             "within one run. ✗ marks a row whose output failed its correctness check.", "", "## Summary", ""]
    lines += [line for line in summary.strip().splitlines() if line.strip()] + summary_lines(rows)
    lines += ["", "## Runs", "",
             "| run | card | torch | triton | CUDA | date (UTC) | commit | copy GB/s | bf16 matmul TFLOP/s | "
             "peer | parts | command |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        m, c = run.meta, run.ceilings
        parts = ", ".join(f"{p} ({v.get('status')}, {v.get('wall_s')} s)" for p, v in run.parts.items())
        lines.append(f"| {run.index} | {m.get('card', '?')} | {m.get('torch', '?')} | {m.get('triton', '?')} | "
                     f"{m.get('cuda', '?')} | {m.get('date', '?')} | {str(m.get('git_commit', '?'))[:12]} | "
                     f"{c.get('copy_gbps', 0):.0f} | {c.get('matmul_tflops', 0):.0f} | "
                     f"{_peer_name(m)} | {parts} | `{m.get('command', '?')}` |")
    for run in runs:
        for part, cases in run.budget_skipped.items():
            lines.append(f"\nRun {run.index}: {len(cases)} {part} case(s) not run (the call's time budget ran out): "
                         + "; ".join(cases[:8]) + (" ..." if len(cases) > 8 else ""))
    lines += ["", f"## Speed goals ({_cards(runs)})", "",
              "| goal | status | measured | what limits it |", "|---|---|---|---|"]
    for g in goals:
        mark = {"met": "**met**", "missed": "**missed**"}.get(g.status, g.status)
        lines.append(f"| {g.text} | {mark} | {g.detail} | {notes.get(g.id, '—')} |")
    lines += ["", "## GPU correctness", ""]
    any_check = False
    for run in runs:
        chk = run.check
        if not chk:
            continue
        any_check = True
        if "conformance" in chk:
            conf = chk["conformance"]
            cases = conf.get("cases", [])
            counts = {s: sum(1 for c in cases if c.get("status") == s) for s in ("pass", "fail", "error", "refused",
                                                                                 "skipped")}
            lines.append(f"- run {run.index}: `dlinfer check --vendor triton` on cuda "
                         f"({'quick' if conf.get('quick') else 'full'} matrix): "
                         f"{'OK' if conf.get('ok') else 'FAILED'} — {counts['pass']} passed, "
                         f"{counts['fail'] + counts['error']} failed, {counts['refused']} refused, "
                         f"{counts['skipped']} skipped")
        for key, what in (("pytest_gpu", "pytest tests/gpu"), ("pytest_graphs", "CUDA-graph tests")):
            if key in chk:
                p = chk[key]
                lines.append(f"- run {run.index}: {what}: {p.get('passed')} passed, {p.get('failed')} failed, "
                             f"{p.get('skipped')} skipped")
                for f in p.get("failures", [])[:10]:
                    lines.append(f"  - FAILED `{f.get('test')}`: {str(f.get('message', ''))[:200]}")
    if not any_check and correctness_elsewhere:
        lines.append(f"The op-benchmark runs above did not run the suite's `check` or `graphs` parts; the GPU "
                     f"conformance and CUDA-graph runs are listed under \"{correctness_elsewhere}\" below.")
    elif not any_check:
        lines.append("No run in these files ran the `check` or `graphs` parts.")
    lines += ["", "## Per op and shape (GPU time per call)", ""]
    lines += op_tables(rows)
    table, eager_run = eager_table(runs)
    lines += ["## Eager call cost (host time per call: Python wrapper + dispatch + launch)", ""]
    if eager_run is None:
        lines.append("Not measured in these files.")
    else:
        e = eager_run.eager
        lines += [f"Run {eager_run.index} ({eager_run.meta.get('card', '?')}): median of {e.get('calls')} calls per op, all implementations interleaved "
                  f"in one loop; shapes: {e.get('shapes', '?')}. Floor = a bare no-op `torch.library` custom op.", "",
                  "| op | dlinfer µs | peer | peer µs | floor µs | peer + floor µs | within? |",
                  "|---|---|---|---|---|---|---|"]
        for t in table:
            ok = "-" if t["ok"] is None else ("yes" if t["ok"] else f"no (+{t['dlinfer'] - t['limit']:.1f} µs)")
            lines.append(f"| {t['op']} | {_us(t['dlinfer'])} | {t['peer_impl'] or '-'} | {_us(t['peer'])} | "
                         f"{_us(t['floor'])} | {_us(t['limit'])} | {ok} |")
        for name, why in (e.get("broken") or {}).items():
            lines.append(f"\n- `{name}` raised and was not timed: {why}")
    lines.append("")
    if png_name:
        lines += [f"## % of roofline ({_cards(runs)})", "", f"![% of bound per op and shape, dlinfer vs {PEER}]({png_name})", ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- plot
def render_plot(rows: list[Row], path: Path) -> bool:
    """Horizontal bars: % of bound per (op, shape), dlinfer vs the peer. False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(f"{r.op} | {label(r)}", r.pct("dlinfer"), r.pct(PEER)) for r in rows
            if r.pct("dlinfer") is not None or r.pct(PEER) is not None]
    if not data:
        data = [("no rows", 0.0, 0.0)]
    height = max(3.0, 0.24 * len(data) + 1.2)
    fig, ax = plt.subplots(figsize=(10, height))
    ys = range(len(data))
    bar = 0.4
    ax.barh([y - bar / 2 for y in ys], [d or 0 for _, d, _ in data], height=bar, label="dlinfer (triton)",
            color="#1f77b4")
    ax.barh([y + bar / 2 for y in ys], [p or 0 for _, _, p in data], height=bar, label=f"{PEER} 0.18", color="#ff7f0e")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([name for name, _, _ in data], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(90, color="gray", linestyle="--", linewidth=0.8)
    ax.axvline(100, color="black", linewidth=0.8)
    ax.set_xlabel("% of bound (bytes at measured copy bandwidth, or FLOPs at measured bf16 matmul rate)")
    ax.set_xlim(0, max(110, max(max(d or 0, p or 0) for _, d, p in data) * 1.05))
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.set_title("GPU time per call vs bound (CUDA-graph replay, L2 flushed)", fontsize=10, loc="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*",
                        help="JSON files written by benchmarks/gpu_suite.py (default benchmarks/results/bench_*.json)")
    parser.add_argument("--md", default=str(HERE / "RESULTS.md"), help="markdown output")
    parser.add_argument("--png", default=str(HERE / "roofline.png"), help="plot output ('' for none)")
    parser.add_argument("--notes", default="", help="JSON {goal id: what limits it}, shown beside the goals")
    parser.add_argument("--summary", default="",
                        help="markdown list (the end-to-end results) that opens the summary at the top")
    parser.add_argument("--include", action="append", default=[],
                        help="a markdown file generated elsewhere (e.g. lmdeploy_e2e.md), appended verbatim; "
                             "repeatable")
    args = parser.parse_args(argv)
    if not args.results:
        args.results = sorted(str(p) for p in (HERE / "results").glob("bench_*.json"))
        if not args.results:
            parser.error("no JSON files given and no benchmarks/results/bench_*.json")
    runs = load_runs(args.results)
    rows = merge_rows(runs)
    notes = json.loads(Path(args.notes).read_text()) if args.notes else {}
    if not isinstance(notes, dict):
        parser.error("--notes must hold a JSON object {goal id: text}")
    goals = evaluate_goals(rows, runs)
    unknown = sorted(set(notes) - {g.id for g in goals})
    if unknown:
        parser.error(f"--notes: unknown goal id(s) {unknown}; known: {[g.id for g in goals]}")
    md_path = Path(args.md)
    png_name = None
    if args.png:
        png_path = Path(args.png)
        if render_plot(rows, png_path):
            png_name = png_path.name if png_path.parent.resolve() == md_path.parent.resolve() else str(png_path)
            print(f"report: wrote {png_path}")
        else:
            print("report: matplotlib is not installed; no plot written (pip install matplotlib)", file=sys.stderr)
    command = "python3 benchmarks/report.py " + " ".join(
        ([f"--notes {Path(args.notes).name}"] if args.notes else []) +
        [Path(p).name for p in args.results] + [f"--include {Path(e).name}" for e in args.include])
    if args.summary:
        command += f" --summary {Path(args.summary).name}"
    included = [Path(extra).read_text() for extra in args.include]
    headings = [h.strip() for text in included for h in re.findall(r"^## (.*correctness.*)$", text, re.M | re.I)]
    text = render_markdown(runs, rows, goals, notes, png_name, command,
                           Path(args.summary).read_text() if args.summary else "", headings[0] if headings else None)
    for extra, body in zip(args.include, included):
        text += f"\n<!-- included from {Path(extra).name} -->\n" + body.rstrip() + "\n"
    md_path.write_text(text)
    print(f"report: wrote {md_path} ({len(rows)} rows, {len(runs)} runs)")
    for g in goals:
        print(f"  {g.status:<13} {g.id}: {g.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
