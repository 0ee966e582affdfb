"""benchmarks/lmdeploy_e2e.py on the CPU: its dry run, and the bookkeeping that needs no GPU."""

from __future__ import annotations

import importlib.util
import math
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lmdeploy_e2e.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("lmdeploy_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lmdeploy_e2e"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--model", "all", "--tp", "2", "--quick",
                           "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dry run: 64 prompts" in done.stdout
    assert "Qwen3-30B-A3B shape with 6 of 48 decoder layers" in done.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--compare-tokens", "0"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "--compare-tokens" in bad.stderr


def _dead(pid: int, wait_s: float = 5.0) -> bool:
    """The process is gone within ``wait_s`` (a kill is asynchronous); a zombie (killed, not yet reaped by whoever
    adopted it) counts as dead."""
    import os
    import time

    end = time.monotonic() + wait_s
    while True:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.1)


def test_generated_tokens_from_detokenizer_windows(e2e):
    prompt, gen = [7, 8, 9, 10], [101, 102, 103, 104, 105]
    ids = prompt + gen
    tokens = e2e.GeneratedTokens()
    # (tokens generated so far, window start in prompt+generated) as LMDeploy's incremental detokenizer moves on
    for generated, offset in ((1, 2), (2, 4), (3, 6), (5, 6), (5, 9)):
        tokens.update(generated, ids[offset:len(prompt) + generated])
    assert tokens.ids() == gen
    partial = e2e.GeneratedTokens()
    partial.update(2, [102])  # a window that never showed position 0
    assert partial.ids() == [-1, 102]


def test_agreement_plan_and_pairs(e2e):
    agr = e2e.agreement([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[1, 2, 3], [4, 0, 6], [0, 8, 9]], 3)
    assert agr["first_token_equal"] == pytest.approx(2 / 3) and agr["all_k_equal"] == pytest.approx(1 / 3)
    assert agr["mean_common_prefix"] == pytest.approx(4 / 3) and agr["min_common_prefix"] == 0
    args = SimpleArgs(model="llama8b", mode="both", backend="both", tp=1)
    runs = e2e.plan(args)
    assert runs == [("llama8b", "stock", "eager", 1), ("llama8b", "dlinfer", "eager", 1),
                    ("llama8b", "stock", "graph", 1), ("llama8b", "dlinfer", "graph", 1)]
    names = [f"{m}/{b}/{mo}/tp{t}" for m, b, mo, t in runs]
    compared = {frozenset(p) for p in e2e.pairs(dict.fromkeys(names))}
    assert frozenset({"llama8b/stock/graph/tp1", "llama8b/dlinfer/graph/tp1"}) in compared
    assert frozenset({"llama8b/stock/eager/tp1", "llama8b/stock/graph/tp1"}) in compared
    assert frozenset({"llama8b/stock/eager/tp1", "llama8b/dlinfer/graph/tp1"}) not in compared
    tp2 = e2e.plan(SimpleArgs(model="qwen3moe", mode="graph", backend="both", tp=2))
    assert tp2 == [("qwen3moe", "dlinfer", "graph", 1), ("qwen3moe", "stock", "graph", 2),
                   ("qwen3moe", "dlinfer", "graph", 2)]
    prompts = e2e.workload(10, 5, 9, 0, 50)
    assert prompts == e2e.workload(10, 5, 9, 0, 50) and all(5 <= len(p) <= 9 for p in prompts)


class SimpleArgs:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_render_tables_from_a_report(e2e, tmp_path):
    run = {"output_tok_s": 1000.0, "total_tok_s": 3000.0, "mean_ttft_s": 0.5, "mean_tpot_s": 0.02, "card": "H100"}
    report = {"environment": {"date": "2026-11-25", "torch": "2.11", "argv": ["--model", "llama8b"]},
              "workload": {"requests": 4, "min_prompt": 1, "max_prompt": 2, "new_tokens": 3},
              "models": {"llama8b": "Llama-3-8B shape, 32 of 32 layers"},
              "runs": {"llama8b/stock/graph/tp1": run,
                       "llama8b/dlinfer/graph/tp1": dict(run, output_tok_s=1100.0),
                       "llama8b/dlinfer/eager/tp1": {"error": "boom"}},
              "agreement": [dict(a="llama8b/dlinfer/graph/tp1", b="llama8b/stock/graph/tp1",
                                 **e2e.agreement([[1, 2]], [[1, 3]], 2))]}
    written = e2e.render([report], tmp_path)
    text = written[0].read_text()
    assert "| llama8b/dlinfer/graph/tp1 | 1100 | 3000 | 500 | 20.00 | 1.100 | not counted |" in text
    assert "failed: boom" in text and "100.0%" in text and "on H100" in text
    assert "Command: `python benchmarks/lmdeploy_e2e.py --model llama8b`" in text


class FakeEngine:
    """Streams like LMDeploy's AsyncEngine.generate: token_ids is the detokenizer's window (a lagging suffix of
    prompt + generated ids), then a last output with no ids."""

    def __init__(self, new_tokens):
        self.new_tokens = new_tokens
        self.sessions = []

    async def preprocess(self, messages, session_id, gen_config, input_ids):
        assert messages is None and gen_config == "greedy"
        self.sessions.append(session_id)
        return list(input_ids)

    async def generate(self, prompt, stream_response):
        import asyncio
        from types import SimpleNamespace

        assert stream_response
        generated = [(sum(prompt) + i) % 97 for i in range(self.new_tokens)]
        ids, offset = list(prompt), max(len(prompt) - 2, 0)
        for i, token in enumerate(generated):
            await asyncio.sleep(0)
            ids.append(token)
            yield SimpleNamespace(generate_token_len=i + 1, token_ids=ids[offset:], finish_reason=None)
            offset = len(ids) - (i % 2)  # the window sometimes keeps one old token
        yield SimpleNamespace(generate_token_len=self.new_tokens, token_ids=[], finish_reason="length")


def test_drive_collects_tokens_and_times(e2e):
    import asyncio
    import itertools

    engine = FakeEngine(new_tokens=5)
    counter = itertools.count()
    prompts = [[1, 2, 3], [4, 5], [6]]
    duration, records = asyncio.run(e2e.drive(engine, lambda: next(counter), prompts, "greedy"))
    assert engine.sessions == [0, 1, 2] and duration > 0
    for prompt, record in zip(prompts, records):
        assert record["tokens"] == [(sum(prompt) + i) % 97 for i in range(5)]
        assert 0 <= record["first"] <= record["last"] <= duration and "error" not in record


def test_run_isolated_kills_the_whole_process_group(e2e, tmp_path):
    assert e2e.run_isolated([sys.executable, "-c", "print('ok')"], 60) == (0, "ok\n")
    marker = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            f"open({str(marker)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(300)")
    with pytest.raises(RuntimeError, match="timed out after 5 s"):
        e2e.run_isolated([sys.executable, "-c", code], 5)
    assert _dead(int(marker.read_text())), "the grandchild survived the timeout"


def test_orchestration_with_fake_runs(e2e, tmp_path, monkeypatch, capsys):
    """main(): every planned run, results merged, agreement computed, JSON and tables written; a failed run is
    recorded and the others go on."""
    import json

    monkeypatch.setattr(e2e, "build_model", lambda key, layers, model_dir, log: tmp_path / key)
    monkeypatch.setattr(e2e, "environment", lambda: {"date": "today", "argv": []})

    def fake_run(command, timeout):
        if "--oracle-child" in command:
            job = json.loads(Path(command[command.index("--oracle-child") + 1]).read_text())
            assert len(job["prompts"]) == 3 and len(job["runs"]["qwen3moe/stock/graph/tp1"]) == 3
            row = {"prompts": 3, "positions": 12, "match_rate": 1.0, "first_token_match": 1.0, "mismatches": 0,
                   "mismatch_deficit_median": 0.0, "mismatch_deficit_max": 0.0, "gap_median": 0.4}
            with open(job["result_path"], "w") as f:
                json.dump({"runs": {name: row for name in job["runs"]}, "oracle_s": 1.0}, f)
            return 0, ""
        spec = json.loads(command[command.index("--child") + 1])
        if spec["backend"] == "dlinfer" and spec["mode"] == "eager":
            return 1, "Traceback ... boom"
        tokens = [[7] * spec["compare_tokens"] for _ in range(spec["requests"])]
        if spec["backend"] == "dlinfer":
            tokens[0] = [7, 8] + [7] * (spec["compare_tokens"] - 2)
        result = {"name": spec["model"], "output_tok_s": 100.0 if spec["backend"] == "stock" else 110.0,
                  "total_tok_s": 300.0, "mean_ttft_s": 0.1, "mean_tpot_s": 0.01, "duration_s": 1.0,
                  "startup_s": 2.0, "warmup_s": 0.5, "first_tokens": tokens,
                  "triton_compiles_timed": {"count": 3, "seconds": 1.5, "per_kernel": {"k": 3}},
                  "triton_compiles_per_pass": [{"count": 3, "seconds": 1.5, "per_kernel": {"k": 3}},
                                               {"count": 0, "seconds": 0.0, "per_kernel": {}}],
                  "gpu_per_pass": [{"samples": 9, "sm_mhz_min": 1755.0, "sm_mhz_median": 1980.0,
                                    "sm_mhz_max": 1980.0, "mem_mhz_min": 3201.0, "power_w_max": 699.0,
                                    "temp_c_max": 70.0, "reasons": ["software power cap"]}, None]}
        with open(spec["result_path"], "w") as f:
            json.dump(result, f)
        return 0, "2026 dlinfer WARNING dlinfer: fused_moe falls back from vendor 'triton' to 'reference'\n"

    monkeypatch.setattr(e2e, "run_isolated", fake_run)
    out = tmp_path / "out" / "r.json"
    code = e2e.main(["--model", "qwen3moe", "--mode", "both", "--requests", "4", "--new-tokens", "8",
                     "--compare-tokens", "4", "--oracle-prompts", "3", "--out", str(out)])
    assert code == 1, "a failed run makes the command fail"
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"qwen3moe/stock/eager/tp1", "qwen3moe/dlinfer/eager/tp1",
                                   "qwen3moe/stock/graph/tp1", "qwen3moe/dlinfer/graph/tp1"}
    assert "boom" in report["runs"]["qwen3moe/dlinfer/eager/tp1"]["error"]
    assert report["runs"]["qwen3moe/dlinfer/graph/tp1"]["dlinfer_warnings"]
    agr = {(a["a"], a["b"]): a for a in report["agreement"]}
    pair = agr[("qwen3moe/dlinfer/graph/tp1", "qwen3moe/stock/graph/tp1")]
    assert pair["first_token_equal"] == 1.0 and pair["all_k_equal"] == 0.75
    assert report["models"] == {"qwen3moe": "Qwen3-30B-A3B shape, 12 of 48 layers"}
    table = (out.parent / "lmdeploy_e2e.md").read_text()
    assert "| qwen3moe/dlinfer/graph/tp1 | 110 | 300 | 100 | 10.00 | 1.100 | 3 (1.5 s) |" in table
    assert "warm-up: one untimed pass of a like workload" in table
    assert set(report["oracle"]["qwen3moe"]["runs"]) == {"qwen3moe/stock/eager/tp1", "qwen3moe/stock/graph/tp1",
                                                         "qwen3moe/dlinfer/graph/tp1"}
    assert "Float32 oracle (qwen3moe)" in table and "| qwen3moe/dlinfer/graph/tp1 | 3 | 100.0% |" in table
    printed = capsys.readouterr().out
    assert "[jit] qwen3moe/stock/graph/tp1: Triton compiles per timed pass: 3 (1.5 s), 0" in printed
    assert ("[gpu] qwen3moe/stock/graph/tp1: timed pass 1: SM 1755-1980 MHz (median 1980), <= 699 W, <= 70 C, "
            "software power cap") in printed
    assert "timed pass 2" not in printed  # no samples: no line


def test_score_tokens_and_summary(e2e):
    import torch

    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.5], [0.0, 0.0, 5.0]])
    scored = e2e.score_tokens(logits, [1, 2, 2])
    assert scored["match"] == [True, False, True]
    assert scored["deficit"] == pytest.approx([0.0, 0.5, 0.0]) and scored["gap"] == pytest.approx([2.0, 0.5, 5.0])
    summary = e2e.summarize_scores([scored, e2e.score_tokens(logits[:1], [0])])
    assert summary["positions"] == 4 and summary["match_rate"] == pytest.approx(0.5)
    assert summary["first_token_match"] == pytest.approx(0.5) and summary["mismatches"] == 2
    assert summary["mismatch_deficit_max"] == pytest.approx(3.0) and summary["gap_median"] == pytest.approx(2.0)
    assert summary["mismatch_deficit_p90"] == pytest.approx(3.0)
    worst = summary["worst_mismatches"]
    assert [(w["prompt"], w["position"]) for w in worst] == [(1, 0), (0, 1)]
    assert worst[0]["deficit"] == pytest.approx(3.0) and worst[1]["gap"] == pytest.approx(0.5)
    assert e2e.summarize_scores([scored], worst_n=0)["worst_mismatches"] == []
    assert "router_gap_median" not in summary and "router_gap" not in worst[0]  # a dense model: no router


def test_router_gaps_and_their_summary(e2e):
    """The router gap is the k-th minus the (k+1)-th router logit, smallest over the layers, at the last positions;
    the summary gives it at the worst mismatches and its medians at all positions and at mismatches."""
    import torch

    layer0 = torch.tensor([[9.0, 0.0, 0.0, 0.0], [3.0, 2.0, 1.9, 0.0], [5.0, 4.0, 1.0, 0.0]])
    layer1 = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 2.5, 1.0, 0.0], [5.0, 4.9, 4.0, 0.0]])
    gaps = e2e.router_gaps([layer0, layer1], topk=2, last=2)  # positions 1 and 2 (the first is the prompt's)
    assert gaps == pytest.approx([0.1, 0.9])  # min(2.0-1.9, 2.5-1.0), min(4.0-1.0, 4.9-4.0)
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.5]])
    scored = e2e.score_tokens(logits, [1, 2], router_gap=gaps)  # position 1 missed
    assert scored["router_gap"] == pytest.approx(gaps)
    summary = e2e.summarize_scores([scored])
    assert summary["worst_mismatches"][0]["router_gap"] == pytest.approx(0.9)
    assert summary["router_gap_median"] == pytest.approx(0.5)
    assert summary["mismatch_router_gap_median"] == pytest.approx(0.9)


def greedy_tokens(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """``n`` greedy tokens of a transformers ``model`` after each prompt (no cache: a reference, not a server)."""
    import torch

    out = []
    for prompt in prompts:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        out.append(ids[len(prompt):])
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "mixtral"])
def test_float32_oracle_scores_greedy_and_corrupted_tokens(e2e, tmp_path, arch):
    """The oracle child on a tiny model: float32 greedy tokens match the float32 argmax everywhere; tokens
    replaced by other ids are mismatches with a positive deficit; the bf16 yardstick row is there; MoE models
    also get the float32 router's gaps (none below zero)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from dlinfer.testing.tiny_models import build_tiny_model

    path = build_tiny_model(tmp_path / arch, arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = e2e.workload(3, 5, 12, 0, 200)
    greedy = greedy_tokens(model, prompts, 6)
    corrupted = [[(t + 1) % 200 for t in g] for g in greedy]
    archs = {"qwen3_moe": e2e.MODELS["qwen3moe"][0], "mixtral": e2e.MODELS["mixtral"][0]}
    job = {"model_dir": path, "arch": archs.get(arch, "llama3-8b"),
           "prompts": prompts, "runs": {"m/stock/eager/tp1": greedy, "m/dlinfer/eager/tp1": corrupted,
                                        "m/stock/graph/tp1": greedy},
           "result_path": str(tmp_path / "oracle.json")}
    e2e.run_oracle(job)
    out = json.loads((tmp_path / "oracle.json").read_text())["runs"]
    assert out["m/stock/eager/tp1"]["match_rate"] == 1.0 and out["m/stock/graph/tp1"]["mismatches"] == 0
    bad = out["m/dlinfer/eager/tp1"]
    assert bad["match_rate"] == 0.0 and bad["first_token_match"] == 0.0 and bad["mismatch_deficit_median"] > 0
    yardstick = out["transformers bf16 (on m/stock/eager/tp1's tokens)"]
    assert yardstick["positions"] == 18 and 0.5 <= yardstick["match_rate"] <= 1.0
    if arch == "llama":
        assert "router_gap_median" not in bad
    else:
        assert bad["router_gap_median"] >= 0 and bad["mismatch_router_gap_median"] >= 0
        assert all(w["router_gap"] >= 0 for w in bad["worst_mismatches"]) and len(bad["worst_mismatches"]) == 5


def test_ops_served_lists_the_vendor_of_each_op(e2e):
    import torch

    import dlinfer.ops as ops
    from dlinfer.vendor import registry

    saved = registry.snapshot()
    try:  # a developer's installed vendor plugin (simulated) must not change the answer: the test pins the set
        registry.register_vendor(registry.Vendor(
            name="developer_plugin", priority=500, devices=frozenset({"cpu"}), default_devices=frozenset({"cpu"}),
            ops={"silu_and_mul": registry.get_vendor("reference").ops["silu_and_mul"]}))
        with registry.pinned("reference"):
            ops.silu_and_mul(torch.randn(3, 8))
            served = e2e._ops_served()
    finally:
        registry.restore(saved)
    assert "error" not in served and served["silu_and_mul"] == ["reference[cpu,float32]"]


def test_union_length_counts_overlaps_once(e2e):
    assert e2e.union_length([]) == 0
    assert e2e.union_length([(0, 10), (5, 15), (20, 25), (21, 22), (30, 30)]) == 20
    assert e2e.union_length([(3, 4), (0, 1)]) == 2


def test_profile_reports_the_pass_wall_time_and_gpu_busy_share(e2e):
    """On a CPU the profiler sees no kernel: the pass's wall time stands, the GPU's busy time is zero."""
    ran = []
    rows, summary = e2e._profile_kernels(lambda prompts: (ran.append(prompts), time.sleep(0.05)), [[1, 2]])
    assert ran == [[[1, 2]]] and rows == []
    assert summary["wall_s"] >= 0.05 and summary["busy_ms"] == 0 and summary["busy_share"] == 0
    assert summary["kernel_launches"] == 0


def test_forward_log_records_each_forward_and_why_prefill(e2e, monkeypatch):
    """The forward log wraps LMDeploy's inputs maker: each forward's kind, sequences and tokens, and the scheduler's
    reason for a prefill. Driven here with stand-ins for the maker's scheduler and the forward it builds."""
    pytest.importorskip("lmdeploy")
    import torch
    from lmdeploy.pytorch.engine.inputs_maker import InputsMakerAsync

    decisions = iter([True, False, True])
    monkeypatch.setattr(InputsMakerAsync, "do_prefill_default", lambda self: next(decisions))
    built = iter([dict(inputs=types.SimpleNamespace(is_decoding=False, input_ids=torch.zeros(1, 700)),
                       running=[1, 2]),
                  dict(inputs=types.SimpleNamespace(is_decoding=True, input_ids=torch.zeros(1, 3)), running=[1, 2, 3]),
                  dict(inputs=types.SimpleNamespace(is_decoding=False, input_ids=torch.zeros(1, 9000)),
                       running=[4] * 9)])
    monkeypatch.setattr(InputsMakerAsync, "_make_forward_inputs", lambda self, prefill, enable_empty=False: next(built))
    log = e2e.ForwardLog()
    assert log.install()
    seq = types.SimpleNamespace(num_token_ids=500)
    sched = types.SimpleNamespace(waiting=[seq] * 20, num_ready=lambda: 0, num_running=lambda: 3,
                                  num_waiting=lambda: 20)
    maker = types.SimpleNamespace(scheduler=sched, _decode_count=0,
                                  config=types.SimpleNamespace(prefill_interval=16, max_prefill_token_num=8192,
                                                               max_batches=256))
    InputsMakerAsync.do_prefill_default(maker)  # not recording yet: nothing kept
    InputsMakerAsync._make_forward_inputs(maker, True)
    log.start()
    for _ in range(2):
        prefill = InputsMakerAsync.do_prefill_default(maker)
        InputsMakerAsync._make_forward_inputs(maker, prefill)
    summary = log.stop()
    assert summary["prefill_forwards"] == 1 and summary["decode_forwards"] == 1
    assert summary["decode_seqs"]["mean"] == 3 and summary["prefill_reasons"] == {"token_budget": 1}
    first = summary["first_prefills"][0]
    assert (first["seqs"], first["tokens"], first["waiting"], first["active"]) == (9, 9000, 20, 3)
    line = e2e.forwards_line("x", summary)
    assert "1 prefill forwards (tokens mean 9000" in line and "token_budget 1" in line
    assert log.stop() is None  # stopped: nothing more is recorded
    # the reasons in do_prefill_default's order: a long prompt's pending last chunk first, then the decode interval
    chunk = types.SimpleNamespace(**vars(maker), _has_pending_last_long_context_chunk=lambda: True)
    assert e2e.ForwardLog._why(chunk, True)["reason"] == "long_context_chunk"
    maker._decode_count = 16
    assert e2e.ForwardLog._why(maker, True)["reason"] == "interval"
    assert e2e.ForwardLog._why(maker, False)["reason"] == "decode"
    assert e2e.ForwardLog._why(types.SimpleNamespace(), True) == {}  # another scheduler: unexplained, no error


def test_summarize_forwards_reasons_and_stats(e2e):
    rows = [dict(t=1.0, prefill=True, seqs=4, tokens=2000, reason="few_running", waiting=50, active=0),
            dict(t=1.5, prefill=False, seqs=4, tokens=4),
            dict(t=2.0, prefill=True, seqs=10, tokens=8000, reason="token_budget", waiting=40, active=4),
            dict(t=2.5, prefill=True, seqs=2, tokens=900, reason="few_running", waiting=30, active=14)]
    s = e2e.summarize_forwards(rows)
    assert (s["prefill_forwards"], s["decode_forwards"]) == (3, 1)
    assert s["prefill_tokens"] == dict(mean=3633.3, min=900, median=2000, max=8000)
    assert s["prefill_reasons"] == {"few_running": 2, "token_budget": 1}
    assert [r["t"] for r in s["first_prefills"]] == [0.0, 1.0, 1.5]


def test_compile_log_counts_triton_compilations(e2e, monkeypatch):
    """CompileLog installs itself as Triton's JIT hooks and counts one event per compilation, per kernel. (No GPU
    here: Triton's interpreter compiles nothing, so the hooks are called the way Triton 3.6 calls them.)"""
    pytest.importorskip("triton")
    from triton import knobs

    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", None)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", None)
    log = e2e.CompileLog()
    log.install()
    assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == (log._before, log._after)
    info = type("Info", (), {"name": "_probe_kernel"})()
    for _ in range(2):
        kwargs = dict(key=1, repr="", fn=info, compile={}, is_manual_warmup=False, already_compiled=False)
        assert knobs.runtime.jit_cache_hook(**kwargs) is False  # False: Triton goes on and compiles
        knobs.runtime.jit_post_compile_hook(**kwargs)
    taken = log.take()
    assert taken["count"] == 2 and taken["per_kernel"] == {"_probe_kernel": 2} and taken["seconds"] >= 0
    empty = log.take()
    assert empty["count"] == 0
    other = {"count": 3, "seconds": 1.25, "per_kernel": {"_other": 2, "_probe_kernel": 1}}
    assert e2e.CompileLog.total([taken, empty, other]) == {
        "count": 5, "seconds": round(taken["seconds"] + 1.25, 2), "per_kernel": {"_probe_kernel": 3, "_other": 2}}


def _warm_up_and_time(e2e, monkeypatch, timed_count: int, **spec_kw):
    """warm_up_and_time as run_child calls it (no --interleave), --requests 4 and 3 timed passes; --pass-seconds
    gives ``timed_count`` requests per timed pass (the rate's arithmetic is timed_request_count's own test). Returns
    the warm-ups' record, the passes' compilations and each call of the engine as (kind, prompts): warm (the
    warm-up's prompts) or timed (the timed prompts); the warm-up pass at the timed count has a compile."""
    import contextlib

    spec = e2e.RunSpec(model="llama8b", model_dir="/nowhere", backend="stock", mode="graph", tp=1, requests=4,
                       min_prompt=3, max_prompt=9, new_tokens=2, compare_tokens=2, seed=5, vocab_limit=50,
                       max_batch_size=8, cache_max_entry_count=0.5, block_size=64, vendor=None, result_path="",
                       timed_passes=3, **spec_kw)
    monkeypatch.setattr(e2e, "timed_request_count", lambda requests, warm_requests, busy_s, seconds:
                        timed_count if seconds > 0 and warm_requests == 4 else requests)
    compiles = e2e.CompileLog()
    calls = []

    timing = [False]  # the monitor's start: the timed passes begin

    def run(prompts):
        seed = {spec.seed + 1: "warm", spec.seed: "timed" if timing[0] else "rehearse"}
        (kind,) = (kind for s, kind in seed.items()
                   if prompts == e2e.workload(len(prompts), spec.min_prompt, spec.max_prompt, s, spec.vocab_limit))
        calls.append((kind, len(prompts)))
        if kind != "timed" and len(calls) == 2:  # a CUDA graph for a batch size the first warm-up did not reach
            compiles.events.append(("_fill_graph_common_inputs_kernel", 0.5))
        return 1.0, [{"tokens": [7, 7]} for _ in prompts]

    monitor = type("Monitor", (), {"start": lambda self: timing.__setitem__(0, True), "stop": lambda self: None,
                                   "phase": lambda self, name: contextlib.nullcontext()})()
    prompts, warm, passes, per_pass = e2e.warm_up_and_time(run, spec, compiles, monitor)
    assert len(prompts) == len(passes[0][1]) and len(passes) == 3
    return warm, per_pass, calls


def test_rehearsal_of_the_timed_prompts_before_the_first_timed_pass(e2e, monkeypatch):
    """By default (--warmup full) one untimed pass of the timed prompts themselves runs after the warm-up and before
    timed pass 1, whatever the counts: its time and compilations are recorded as the pass at the timed count
    (``rehearsal`` says which prompts it ran), the timed passes see no compilation; the [ready] / [done] text
    names it."""
    warm, per_pass, calls = _warm_up_and_time(e2e, monkeypatch, 12, pass_seconds=8.0)
    assert calls == [("warm", 4), ("rehearse", 12), ("timed", 12), ("timed", 12), ("timed", 12)]
    assert warm["warmup_full_count_requests"] == 12 and warm["rehearsal"] is True
    assert warm["triton_compiles_warmup_full_count"]["per_kernel"] == {"_fill_graph_common_inputs_kernel": 1}
    assert [c["count"] for c in per_pass] == [0, 0, 0]
    assert "rehearsal of the timed prompts (12 requests)" in e2e.warmup_text(dict(warm, warmup_s=2.0))
    _, _, equal = _warm_up_and_time(e2e, monkeypatch, 4, pass_seconds=8.0)  # equal counts: still rehearsed
    assert equal == [("warm", 4), ("rehearse", 4), ("timed", 4), ("timed", 4), ("timed", 4)]
    _, _, short = _warm_up_and_time(e2e, monkeypatch, 4, warmup="short", timed_requests=20)
    assert short == [("warm", 4), ("timed", 20), ("timed", 20), ("timed", 20)]  # --warmup short: none


def test_warm_up_at_the_timed_count_before_the_first_timed_pass(e2e, monkeypatch):
    """--no-rehearsal, a timed pass of more requests than the warm-up (--pass-seconds, or a count handed down from
    the model's first run): one more warm-up pass of the warm-up's prompts at exactly that count runs before timed
    pass 1; its time and compilations are recorded on their own (the warm-up's keys keep their meaning), the timed
    passes see no compilation."""
    warm, per_pass, calls = _warm_up_and_time(e2e, monkeypatch, 12, pass_seconds=8.0, rehearsal=False)
    assert calls == [("warm", 4), ("warm", 12), ("timed", 12), ("timed", 12), ("timed", 12)]
    assert warm["warmup_full_count_requests"] == 12 and warm["warmup_full_count_s"] is not None
    assert warm["triton_compiles_warmup_full_count"]["per_kernel"] == {"_fill_graph_common_inputs_kernel": 1}
    assert warm["triton_compiles_warmup"]["count"] == 0 and [c["count"] for c in per_pass] == [0, 0, 0]
    _, _, handed = _warm_up_and_time(e2e, monkeypatch, 4, timed_requests=7, rehearsal=False)  # an earlier run's
    assert handed == [("warm", 4), ("warm", 7), ("timed", 7), ("timed", 7), ("timed", 7)]


def test_no_extra_warm_up_when_the_counts_are_equal(e2e, monkeypatch):
    """--no-rehearsal, the timed pass has the warm-up's request count: nothing more runs and the record says so;
    --warmup short keeps its short warm-up (it is there to leave the variants to the timed pass)."""
    warm, per_pass, calls = _warm_up_and_time(e2e, monkeypatch, 4, pass_seconds=8.0, rehearsal=False)
    assert calls == [("warm", 4), ("timed", 4), ("timed", 4), ("timed", 4)]
    assert (warm["warmup_full_count_requests"], warm["warmup_full_count_s"],
            warm["triton_compiles_warmup_full_count"]) == (None, None, None)
    assert e2e.warmup_text(dict(warm, warmup_s=2.0)) == "warm-up 2 s"
    _, _, short = _warm_up_and_time(e2e, monkeypatch, 4, warmup="short", timed_requests=20, rehearsal=False)
    assert short == [("warm", 4), ("timed", 20), ("timed", 20), ("timed", 20)]


def test_window_rate_on_hand_made_records(e2e):
    """window_tok_s: a pass of D = 4 s has the window [1, 3] (2 s); each record's tokens in it, alone and together."""
    records = {
        "inside": ({"tokens": [7] * 5, "first": 1.5, "last": 2.5}, 5.0),  # first + the 4 others, all in
        "straddling the end": ({"tokens": [7] * 5, "first": 2.0, "last": 4.0}, 3.0),  # first + 4 * 1/2
        "straddling the start": ({"tokens": [7] * 3, "first": 0.0, "last": 2.0}, 1.0),  # first out, 2 * 1/2
        "first at the edge": ({"tokens": [7] * 3, "first": 1.0, "last": 1.5}, 3.0),  # a <= first: all in
        "before": ({"tokens": [7] * 4, "first": 0.1, "last": 0.9}, 0.0),
        "after": ({"tokens": [7] * 4, "first": 3.5, "last": 3.9}, 0.0),
        "one token": ({"tokens": [7], "first": 2.2, "last": 2.2}, 1.0),
        "one token, outside": ({"tokens": [7], "first": 0.5, "last": 0.5}, 0.0),
        "last == first": ({"tokens": [7] * 3, "first": 1.2, "last": 1.2}, 1.0),  # the first token only
        "no token (failed)": ({"tokens": [], "error": True}, 0.0),
    }
    for what, (record, tokens) in records.items():
        assert e2e.window_tok_s([record], 4.0) == tokens / 2, what
    assert e2e.window_tok_s([r for r, _ in records.values()], 4.0) == 14.0 / 2
    # another window: [0, 2] of the same pass
    assert e2e.window_tok_s([records["straddling the start"][0]], 4.0, window=(0.0, 0.5)) == 3.0 / 2
    assert e2e.window_tok_s([records["inside"][0]], 0.0) is None


def test_pass_rates_whole_pass_and_window(e2e):
    """pass_rates, the per-pass fields of the child's result: the whole-pass rates and spreads as before (the
    spread relative to the median duration, the first pass left out in the _after_first one), and the window rates
    with theirs. One request over the whole pass, 9 tokens: 1 + 8 / 2 of them in the window of half the pass."""
    passes = [(d, [{"tokens": [7] * 9, "first": 0.0, "last": d}]) for d in (8.0, 4.0, 5.0)]
    assert e2e.pass_rates(passes, 20) == {
        "pass_output_tok_s": [2.5, 5.0, 4.0], "pass_spread": 0.8, "pass_spread_after_first": 0.2,
        "pass_window_tok_s": [1.0, 2.0, 1.6], "pass_window_spread": 0.625, "pass_window_spread_after_first": 0.25}
    two = e2e.pass_rates(passes[:2], 20)
    assert (two["pass_spread"], two["pass_spread_after_first"]) == (0.5, None)  # (8 - 4) / 8: the upper median
    assert (two["pass_window_spread"], two["pass_window_spread_after_first"]) == (0.5, None)
    assert e2e._spreads("x", [1.0, None]) == {"x": None, "x_after_first": None}


def test_timed_passes_collect_and_disable_gc_and_report_the_window_rate(e2e, monkeypatch):
    """Each timed pass: after the parent's go, gc.collect(), then the pass with the collector off, on again after
    it (also when the pass fails); pass_<k>.json has the pass's window rate beside its output tok/s."""
    import contextlib
    import gc

    events = []
    monkeypatch.setattr(gc, "collect", lambda *args: events.append("collect") or 0)
    # D = 4 s, window [1, 3]: the first request 1 + 4 tokens, the second 2 * 1/2: 6 tokens in 2 s
    records = [{"tokens": [7] * 5, "first": 1.0, "last": 3.0}, {"tokens": [7] * 3, "first": 0.0, "last": 2.0}]

    def run(prompts):
        events.append(("run", gc.isenabled()))
        return 4.0, records

    class Control:
        def __init__(self):
            self.written = {}

        def wait(self, name):
            events.append((name, gc.isenabled()))

        def write(self, name, data):
            self.written[name] = data

    monitor = type("Monitor", (), {"phase": lambda self, name: contextlib.nullcontext(),
                                   "summary": lambda self, name: None})()
    control = Control()
    try:
        passes, _ = e2e.timed_passes(run, [[1, 2]], 2, e2e.CompileLog(), monitor, control)
        assert gc.isenabled()
        assert events == [("go_1", True), "collect", ("run", False), ("go_2", True), "collect", ("run", False)]
        assert passes == [(4.0, records)] * 2
        for k in (1, 2):
            written = control.written[f"pass_{k}.json"]
            assert (written["output_tokens"], written["output_tok_s"], written["window_tok_s"]) == (8, 2.0, 3.0)

        def failing(prompts):
            raise RuntimeError("engine died")

        with pytest.raises(RuntimeError, match="engine died"):
            e2e.timed_passes(failing, [[1, 2]], 1, e2e.CompileLog(), monitor)
        assert gc.isenabled()
    finally:
        gc.enable()


def test_run_child_with_a_fake_lmdeploy(e2e, tmp_path, monkeypatch):
    """run_child on a stand-in for lmdeploy (its pipeline, async engine and loop thread): the result JSON has each
    timed pass's window rate beside its output tok/s and says what it does with the garbage collector; the engine
    (on its loop thread) ran the warm-up with the collector on and every timed pass with it off; on after the run."""
    import asyncio
    import gc
    import itertools
    import json
    import threading
    import types
    from types import SimpleNamespace

    try:  # the child installs its CompileLog as Triton's hooks: put them back afterwards
        from triton import knobs

        for hook in ("jit_cache_hook", "jit_post_compile_hook"):
            monkeypatch.setattr(knobs.runtime, hook, getattr(knobs.runtime, hook))
    except ImportError:
        pass
    spec = e2e.RunSpec(model="llama8b", model_dir=str(tmp_path), backend="stock", mode="graph", tp=1, requests=4,
                       min_prompt=3, max_prompt=9, new_tokens=5, compare_tokens=2, seed=5, vocab_limit=50,
                       max_batch_size=8, cache_max_entry_count=0.5, block_size=64, vendor=None,
                       result_path=str(tmp_path / "result.json"), timed_passes=3)

    class Engine(FakeEngine):
        def __init__(self):
            super().__init__(spec.new_tokens)
            self.gc_enabled = []  # per request, on the engine's loop thread
            self.engine = SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=64, block_size=64,
                                                                       max_prefill_token_num=8192))

        async def generate(self, prompt, stream_response):
            self.gc_enabled.append(gc.isenabled())
            async for out in super().generate(prompt, stream_response):
                # tokens spread over a pass of ~10 ms: a pass of back-to-back tokens lasts well under a millisecond,
                # and one late thread wake-up on a busy 2-core host then put all of them outside the window
                await asyncio.sleep(0.002)
                yield out

    class Pipe:
        def __init__(self, model_dir, backend_config, log_level):
            assert model_dir == spec.model_dir and backend_config.num_gpu_blocks == 0
            self.async_engine = Engine()
            self.session_mgr = SimpleNamespace(get=itertools.count().__next__)
            loop = asyncio.new_event_loop()
            self.internal_thread = threading.Thread(target=loop.run_forever, daemon=True)
            self.internal_thread.loop = loop
            self.internal_thread.start()
            self.closed = False

        def close(self):
            loop = self.internal_thread.loop
            loop.call_soon_threadsafe(loop.stop)
            self.internal_thread.join(10)
            loop.close()
            self.closed = True

    pipes = []
    lmdeploy = types.ModuleType("lmdeploy")
    lmdeploy.GenerationConfig = lambda **kw: "greedy"
    lmdeploy.PytorchEngineConfig = lambda **kw: SimpleNamespace(**kw)
    lmdeploy.pipeline = lambda *args, **kw: pipes.append(Pipe(*args, **kw)) or pipes[-1]
    monkeypatch.setitem(sys.modules, "lmdeploy", lmdeploy)
    try:
        e2e.run_child(spec)
    finally:
        gc.enable()
    (pipe,) = pipes
    assert pipe.closed and gc.isenabled()
    # the warm-up's 4 requests and the rehearsal's 4 with the collector on, 3 timed passes of 4 with it off
    assert pipe.async_engine.gc_enabled == [True] * 8 + [False] * 12
    result = json.loads(Path(spec.result_path).read_text())
    assert result["rehearsal"] is True and result["warmup_full_count_requests"] == 4
    assert result["gc"] == "collected before each timed pass, disabled during it"
    assert result["output_tokens"] == 20 and len(result["pass_output_tok_s"]) == 3
    windows = result["pass_window_tok_s"]
    assert len(windows) == 3 and all(w > 0 for w in windows), windows
    assert result["pass_window_spread"] == pytest.approx(  # of the unrounded rates, rounded to 4 places
        (max(windows) - min(windows)) / sorted(windows)[1], abs=1e-4 + 0.2 / min(windows))
    assert result["pass_spread_after_first"] is not None and "pass_window_spread_after_first" in result


# ------------------------------------------------------------------------------------------------ --interleave
# A stand-in for `lmdeploy_e2e.py --child SPEC` that follows the --interleave protocol with the script's own
# child-side code (PassControl, warm_up_and_time, timed_passes, pass_rates): after a pretend start its warm-up
# pass(es), ready.json, then timed passes on the parent's go_<k> with the durations of its plan (every request's first
# and last token at the plan's spans, else at 0 and at the pass's end), then the result JSON on finish. The timed
# request count --pass-seconds would give is the plan's. Each pass is logged (warm-ups with their prompt count,
# timed passes' start/end) to a file shared by both children, so the test sees the order the passes really ran in.
FAKE_CHILD = r'''
import contextlib, importlib.util, json, os, sys, time
from pathlib import Path

module = importlib.util.spec_from_file_location("lmdeploy_e2e", sys.argv[1])
e2e = importlib.util.module_from_spec(module)
sys.modules["lmdeploy_e2e"] = e2e
module.loader.exec_module(e2e)
spec = e2e.RunSpec(**json.loads(sys.argv[2]))
plan = json.loads(Path(os.environ["FAKE_PLAN"]).read_text())[spec.backend]
events = Path(os.environ["FAKE_EVENTS"])


def note(text):
    with open(events, "a") as f:
        f.write(text + "\n")


note(f"pid {spec.backend} {os.getpid()}")
Path(events.parent / f"spec_{spec.backend}.json").write_text(sys.argv[2])
if plan.get("hang") == "ready":
    time.sleep(300)
control = e2e.PassControl(spec.control_dir, spec.control_timeout)
e2e.timed_request_count = lambda requests, *rest: plan.get("timed_requests", requests)
durations = iter(plan["durations"])
done = []


def run(prompts):
    if prompts == e2e.workload(len(prompts), spec.min_prompt, spec.max_prompt, spec.seed + 1, spec.vocab_limit):
        note(f"warm {spec.backend} {len(prompts)}")  # the warm-up's prompts
        return 0.01, [{"tokens": [7] * spec.new_tokens} for _ in prompts]
    if not (Path(spec.control_dir) / "ready.json").exists():  # the timed prompts before ready: the rehearsal
        note(f"rehearse {spec.backend} {len(prompts)}")
        return 0.01, [{"tokens": [7] * spec.new_tokens} for _ in prompts]
    k = len(done) + 1
    if plan.get("exit_at_pass") == k:
        print(plan.get("last_words", f"fake {spec.backend}: dying in pass {k}"), flush=True)
        os._exit(3)
    note(f"start {spec.backend} {k}")
    time.sleep(0.05)
    note(f"end {spec.backend} {k}")
    done.append(k)
    duration = next(durations)
    first, last = plan["spans"][k - 1] if "spans" in plan else (0.0, duration)
    return duration, [{"tokens": [7] * spec.new_tokens, "first": first, "last": last} for _ in prompts]


class Monitor:
    start = stop = staticmethod(lambda: None)
    phase = staticmethod(lambda name: contextlib.nullcontext())
    summary = staticmethod(lambda name: None)


ready = {"startup_s": 0.5, "num_gpu_blocks": spec.num_gpu_blocks or plan["num_gpu_blocks"], "block_size": 64,
         "max_prefill_token_num": 8192}
prompts, warm, passes, per_pass = e2e.warm_up_and_time(run, spec, e2e.CompileLog(), Monitor(), control, ready)
requests = len(prompts)
durations = [d for d, _ in passes]
out = requests * spec.new_tokens
median = sorted(durations)[len(durations) // 2]
result = {"name": spec.name, "output_tok_s": out / median, "total_tok_s": 2 * out / median, "mean_ttft_s": 0.1,
          "mean_tpot_s": 0.01, "duration_s": median, "startup_s": 0.5, "timed_requests": requests, **warm,
          **e2e.pass_rates(passes, out), "triton_compiles_per_pass": per_pass,
          "first_tokens": [[7] * spec.compare_tokens] * requests}
Path(spec.result_path).write_text(json.dumps(result))
'''


@pytest.fixture
def interleave_env(e2e, tmp_path, monkeypatch):
    """main() with fake children: run(plan, *argv) -> exit code, report, the children's events (pids, passes'
    starts and ends in order), the specs they got (by backend), seconds."""
    import json
    import time

    fake = tmp_path / "fake_child.py"
    fake.write_text(FAKE_CHILD)
    events = tmp_path / "events.txt"
    monkeypatch.setenv("FAKE_EVENTS", str(events))
    monkeypatch.setenv("FAKE_PLAN", str(tmp_path / "plan.json"))
    monkeypatch.setattr(e2e, "build_model", lambda key, layers, model_dir, log: tmp_path / key)
    monkeypatch.setattr(e2e, "environment", lambda: {"date": "today", "argv": []})
    monkeypatch.setattr(e2e, "run_isolated", lambda *a, **k: pytest.fail("a run outside the interleaved pair"))
    start_child = e2e.start_child
    monkeypatch.setattr(e2e, "start_child", lambda command, log_path: start_child(
        [sys.executable, str(fake), str(SCRIPT), command[command.index("--child") + 1]], log_path))

    def run(plan, *argv):
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        events.write_text("")
        for stale in tmp_path.glob("spec_*.json"):
            stale.unlink()
        out = tmp_path / "out" / "r.json"
        t0 = time.perf_counter()
        code = e2e.main(["--model", "llama8b", "--mode", "graph", "--interleave", "--requests", "4",
                         "--new-tokens", "8", "--compare-tokens", "4", "--oracle-prompts", "0", "--out", str(out),
                         "--pass-gap", "0", *argv])
        seconds = time.perf_counter() - t0
        specs = {path.stem[5:]: json.loads(path.read_text()) for path in tmp_path.glob("spec_*.json")}
        return code, json.loads(out.read_text()), events.read_text().splitlines(), specs, seconds

    return run


def test_interleaved_order_and_ratios(e2e):
    assert e2e.interleaved_order(4) == [(1, "stock"), (1, "dlinfer"), (2, "dlinfer"), (2, "stock"),
                                        (3, "stock"), (3, "dlinfer"), (4, "dlinfer"), (4, "stock")]
    got = e2e.pass_ratios([100.0, 100.0, 200.0], [102.0, 103.0, 210.0])
    assert got["pass_ratios"] == [1.02, 1.03, 1.05] and got["ratio_median"] == 1.03
    assert (got["ratio_min"], got["ratio_max"]) == (1.02, 1.05)
    assert got["ratio_spread"] == pytest.approx(0.03 / 1.03, abs=1e-5)
    pair = dict(got, model="llama8b", mode="graph")
    assert e2e.ratio_line("llama8b graph", pair) == ("llama8b graph interleaved: dlinfer / stock output tok/s ratio 1.030 "
                                    "(passes: 1.020 1.030 1.050; spread 2.9 %; geometric mean 1.033, 95 % interval "
                                    "0.996-1.072)")
    assert "(> 2 %)" in e2e.ratio_warning("llama8b graph", pair, "more passes")
    assert e2e.ratio_warning("llama8b graph", dict(pair, ratio_spread=0.019), "more passes") is None


def test_ratio_interval(e2e):
    """The geometric mean of the per-pass ratios and its 95 % interval (Student's t over the log-ratios), from three
    passes on and for positive ratios only."""
    assert e2e.ratio_interval([1.07]) is None and e2e.ratio_interval([1.0, 1.1]) is None
    assert e2e.ratio_interval([0.0, 1.0, 1.1]) is None and "ratio_ci95" not in e2e.pass_ratios([1.0] * 3, [0, 1, 1])
    mean, low, high = e2e.ratio_interval([1.0, 1.1, 1.21])  # logs 0, l, 2l (l = ln 1.1): sd l, se l / sqrt 3
    half = 4.303 * math.log(1.1) / math.sqrt(3)  # t(2) = 4.303
    assert mean == pytest.approx(1.1) and (low, high) == (pytest.approx(1.1 * math.exp(-half)),
                                                          pytest.approx(1.1 * math.exp(half)))
    assert e2e.ratio_interval([1.03] * 5) == (pytest.approx(1.03), pytest.approx(1.03), pytest.approx(1.03))
    # more passes pin the same scatter tighter; 40 passes use the t quantile of 30 degrees of freedom
    width = [(lambda m, lo, hi: hi / lo)(*e2e.ratio_interval([0.98, 1.02] * n)) for n in (3, 20)]
    assert 1 < width[1] < width[0]
    sd = statistics.stdev([math.log(0.98), math.log(1.02)] * 20)
    assert width[1] == pytest.approx(math.exp(2 * 2.042 * sd / math.sqrt(40)))


def test_more_passes_stops_at_the_interval_the_cap_or_the_deadline(e2e):
    """--until-ci's rule: stop once the 95 % interval's half-width is within the target, at the pass cap, or when two
    more passes of each engine (and as long again to finish) would not fit the time left; else two more."""
    noisy = [1.0, 0.8, 1.25, 1.0]  # half-width 34 %
    assert e2e.ci_half_width(noisy) == pytest.approx(0.33626, abs=1e-4)
    assert e2e.ci_half_width([1.0, 1.1]) is None  # no interval from two passes
    assert e2e.more_passes([1.03] * 4, 0.01, 4, 16, pair_s=5.0, seconds_left=1000) == "interval"
    assert e2e.more_passes(noisy, 0.01, 4, 16, pair_s=5.0, seconds_left=1000) is None
    assert e2e.more_passes(noisy, 0.01, 4, 5, pair_s=5.0, seconds_left=1000) == "max passes"
    assert e2e.more_passes(noisy, 0.01, 4, 16, pair_s=5.0, seconds_left=14.9) == "deadline"
    assert e2e.more_passes(noisy, 0.01, 4, 16, pair_s=5.0, seconds_left=15.0) is None
    assert e2e.more_passes([1.0, 1.1], 0.01, 2, 16, pair_s=5.0, seconds_left=1000) is None


def test_until_ci_adds_pass_pairs_until_the_interval_is_narrow(interleave_env, capsys):
    """--until-ci 1.5: four passes each leave the ratio known to +-2.8 %, six to +-1.5 %: two more passes of each
    engine, in the ABBA order, then both children told to stop; the pair's record and a [pair] line say so, and the
    per-pass spread's warning is left out (the interval, not one pass, is the ratio's noise)."""
    durations = [2.0, 1.96, 2.04, 1.98, 2.0, 2.02, 2.0, 2.0]
    plan = {"stock": {"timed_requests": 4, "num_gpu_blocks": 64, "durations": [2.0] * 8},
            "dlinfer": {"timed_requests": 4, "num_gpu_blocks": 64, "durations": durations}}
    code, report, events, specs, _ = interleave_env(plan, "--timed-passes", "4", "--until-ci", "1.5")
    assert code == 0, report["log"]
    order = [line.split(" ", 1)[1] for line in events if line.startswith("start")]
    assert order == [f"{b} {k}" for k, b in e2e_order(6)]
    assert specs["stock"]["max_timed_passes"] == specs["dlinfer"]["max_timed_passes"] == 16
    (pair,) = report["interleaved"]
    assert len(pair["pass_ratios"]) == 6 and pair["until_ci"]["passes"] == 6
    assert pair["until_ci"]["stopped"] == "interval" and pair["until_ci"]["half_width"] <= 0.015
    assert report["runs"]["llama8b/dlinfer/graph/tp1"]["pass_output_tok_s"] == [pytest.approx(32 / d, abs=0.05)
                                                                                for d in durations[:6]]
    assert report["workload"]["until_ci"] == 1.5 and report["workload"]["max_timed_passes"] == 16
    printed = capsys.readouterr().out
    assert ("[pair] llama8b graph interleaved, --until-ci 1.5 %: 6 passes each, the ratio known to +-1.50 % "
            "(95 % interval); stopped: the 95 % interval reached the target") in printed
    assert "[warn] llama8b graph interleaved: the per-pass ratios spread" not in printed


def test_until_ci_stops_at_max_timed_passes(interleave_env, capsys):
    """A ratio too noisy for the target: the pair stops at --max-timed-passes, says so, and keeps the spread's
    warning."""
    plan = {"stock": {"timed_requests": 4, "num_gpu_blocks": 64, "durations": [2.0] * 6},
            "dlinfer": {"timed_requests": 4, "num_gpu_blocks": 64, "durations": [2.0, 2.5, 1.6, 2.0, 2.4, 1.7]}}
    code, report, events, _, _ = interleave_env(plan, "--timed-passes", "2", "--until-ci", "1",
                                                "--max-timed-passes", "6")
    assert code == 0, report["log"]
    assert len([line for line in events if line.startswith("start")]) == 12
    (pair,) = report["interleaved"]
    assert pair["until_ci"]["passes"] == 6 and pair["until_ci"]["stopped"] == "max passes"
    printed = capsys.readouterr().out
    assert "stopped: --max-timed-passes reached" in printed
    assert "[warn] llama8b graph interleaved: the per-pass ratios spread" in printed


def e2e_order(passes):
    return [(k, b) for k in range(1, passes + 1) for b in (("stock", "dlinfer") if k % 2 else ("dlinfer", "stock"))]


def test_until_ci_needs_interleave(e2e, capsys):
    with pytest.raises(SystemExit):
        e2e.main(["--model", "llama8b", "--until-ci", "2", "--dry-run"])
    assert "--until-ci adds timed passes to an interleaved pair: needs --interleave" in capsys.readouterr().err


def test_interleaved_passes_keep_a_quiet_gap(interleave_env):
    """--pass-gap: each pass starts that long after the last one ended (what an engine leaves behind after its pass
    must not run into the other's)."""
    plan = {b: {"timed_requests": 4, "num_gpu_blocks": 64, "durations": [1.0] * 4} for b in ("stock", "dlinfer")}
    code, report, _, _, _ = interleave_env(plan, "--timed-passes", "4", "--pass-gap", "0.3")
    assert code == 0, report["log"]
    (pair,) = report["interleaved"]
    spans = sorted((p[f"{b}_start_s"], p[f"{b}_end_s"]) for p in pair["passes"] for b in ("stock", "dlinfer"))
    gaps = [spans[i + 1][0] - spans[i][1] for i in range(len(spans) - 1)]
    assert len(gaps) == 7 and min(gaps) >= 0.299, gaps  # the times are rounded to ms


def test_interleaved_pair_with_fake_children(interleave_env, capsys):
    """--interleave: the stock child's block count and timed request count reach the dlinfer child's spec, the
    passes run ABBA one at a time, per-pass ratios (from the children's durations) and their summary land in the
    JSON and the printed table, with a warning for a spread over 2 %."""
    plan = {"stock": {"timed_requests": 12, "num_gpu_blocks": 1234, "durations": [2.0, 2.0, 2.0, 2.0]},
            "dlinfer": {"timed_requests": 99, "num_gpu_blocks": 777, "durations": [2.0, 2.5, 1.6, 2.0]}}
    code, report, events, specs, _ = interleave_env(plan, "--timed-passes", "4", "--pass-seconds", "10")
    assert code == 0, report["log"]
    passes = [line for line in events if line.startswith(("start", "end"))]
    order = [line.split(" ", 1)[1] for line in passes[::2]]
    assert order == ["stock 1", "dlinfer 1", "dlinfer 2", "stock 2", "stock 3", "dlinfer 3", "dlinfer 4", "stock 4"]
    assert all(passes[i] == "end " + passes[i - 1].split(" ", 1)[1] for i in range(1, len(passes), 2)), passes
    assert specs["stock"]["num_gpu_blocks"] == 0 and specs["stock"]["timed_requests"] is None
    assert specs["dlinfer"]["num_gpu_blocks"] == 1234 and specs["dlinfer"]["timed_requests"] == 12
    assert specs["stock"]["cache_max_entry_count"] == specs["dlinfer"]["cache_max_entry_count"] == pytest.approx(0.3)
    assert specs["stock"]["control_dir"] != specs["dlinfer"]["control_dir"]
    (pair,) = report["interleaved"]
    # stock 2 s per pass; dlinfer 2, 2.5, 1.6, 2 s: ratios 1, 0.8, 1.25, 1
    assert pair["pass_ratios"] == [1.0, 0.8, 1.25, 1.0] and pair["ratio_median"] == 1.0
    assert (pair["ratio_min"], pair["ratio_max"], pair["ratio_spread"]) == (0.8, 1.25, 0.45)
    assert pair["order"][:4] == ["stock 1", "dlinfer 1", "dlinfer 2", "stock 2"]
    assert pair["kv_cache"]["stock"]["num_gpu_blocks"] == pair["kv_cache"]["dlinfer"]["num_gpu_blocks"] == 1234
    assert pair["timed_requests"] == 12 and pair["cache_max_entry_count"] == pytest.approx(0.3)
    assert [p["first"] for p in pair["passes"]] == ["stock", "dlinfer", "stock", "dlinfer"]
    assert pair["passes"][1]["dlinfer_output_tok_s"] == pytest.approx(12 * 8 / 2.5)
    runs = report["runs"]
    assert runs["llama8b/dlinfer/graph/tp1"]["timed_requests"] == 12
    assert runs["llama8b/stock/graph/tp1"]["pass_output_tok_s"] == [48.0] * 4
    assert report["workload"]["interleave"] is True and report["workload"]["timed_passes"] == 4
    assert report["agreement"] and report["agreement"][0]["all_k_equal"] == 1.0
    printed = capsys.readouterr().out
    assert ("llama8b graph interleaved: dlinfer / stock output tok/s ratio 1.000 (passes: 1.000 0.800 1.250 "
            "1.000; spread 45.0 %; geometric mean 1.000, 95 % interval 0.748-1.336)") in printed
    assert "[warn] llama8b graph interleaved: the per-pass ratios spread 45.0 % (> 2 %)" in printed
    assert "[ready] llama8b/stock/graph/tp1: 1234 KV-cache blocks, 12 requests per timed pass" in printed
    table = next(Path(line[6:]) for line in report["log"] if line.endswith("lmdeploy_e2e.md")).read_text()
    assert "| llama8b graph | 1.000 | 1.000 0.800 1.250 1.000 | 45.0 % | 1234, 1234 |" in table
    for pid in (int(line.split()[2]) for line in events if line.startswith("pid")):
        assert _dead(pid)


def test_interleaved_window_ratios_beside_the_whole_pass_ones(interleave_env, capsys):
    """--interleave: each pass_<k>.json's window rate reaches the pair's passes, a second ratio series from them
    (median, min, max, spread) stands beside the whole-pass one, and a second [pair] line, a table line and a
    markdown column show it. Every pass lasts 2 s (whole-pass ratios 1); 4 requests of 8 tokens, window [0.5, 1.5]:
    spans (0, 2) put 1 + 7 / 2 - 1 = 3.5 tokens of a request in it (14 tok/s), spans (0.5, 1.5) all 8 (32 tok/s)."""
    plan = {"stock": {"timed_requests": 4, "num_gpu_blocks": 64, "durations": [2.0, 2.0],
                      "spans": [[0.0, 2.0], [0.0, 2.0]]},
            "dlinfer": {"durations": [2.0, 2.0], "spans": [[0.0, 2.0], [0.5, 1.5]]}}
    code, report, _, _, _ = interleave_env(plan, "--timed-passes", "2")
    assert code == 0, report["log"]
    (pair,) = report["interleaved"]
    assert pair["pass_ratios"] == [1.0, 1.0] and pair["ratio_median"] == 1.0 and pair["ratio_spread"] == 0.0
    assert [(p["stock_window_tok_s"], p["dlinfer_window_tok_s"]) for p in pair["passes"]] == [(14.0, 14.0),
                                                                                              (14.0, 32.0)]
    assert pair["window_pass_ratios"] == [1.0, 2.28571] and pair["window_ratio_median"] == 1.64286
    assert (pair["window_ratio_min"], pair["window_ratio_max"], pair["window_ratio_spread"]) == (1.0, 2.28571,
                                                                                                0.78261)
    runs = report["runs"]
    assert runs["llama8b/dlinfer/graph/tp1"]["pass_window_tok_s"] == [14.0, 32.0]
    assert runs["llama8b/dlinfer/graph/tp1"]["pass_window_spread"] == 0.5625  # (32 - 14) / 32
    assert runs["llama8b/stock/graph/tp1"]["pass_window_spread"] == 0.0
    printed = capsys.readouterr().out.splitlines()
    whole = printed.index("[pair] llama8b graph interleaved: dlinfer / stock output tok/s ratio 1.000 (passes: 1.000 "
                          "1.000; spread 0.0 %)")  # two passes: no interval
    window = ("llama8b graph interleaved, steady-state window: dlinfer / stock output "
              "tok/s ratio 1.643 (passes: 1.000 2.286; spread 78.3 %)")
    assert printed[whole + 1] == "[pair] " + window
    assert window in printed  # the table at the end
    table = next(Path(line[6:]) for line in report["log"] if line.endswith("lmdeploy_e2e.md")).read_text()
    assert "| llama8b graph | 1.000 | 1.000 1.000 | 0.0 % | 64, 64 | 1.643 (78.3 %) |" in table


def test_window_ratios_need_a_window_rate_on_every_pass(e2e):
    """window_ratios: pass_ratios of the window rates under window_ keys; nothing where a pass lacks a positive
    window rate (a child without them, an empty window), and then no window line in the table."""
    assert e2e.window_ratios([10.0, 20.0], [11.0, 18.0]) == {
        "window_pass_ratios": [1.1, 0.9], "window_ratio_median": 1.0, "window_ratio_min": 0.9,
        "window_ratio_max": 1.1, "window_ratio_spread": 0.2}
    for stock, mine in (([10.0, None], [11.0, 12.0]), ([10.0, 0.0], [11.0, 12.0]), ([], [])):
        assert e2e.window_ratios(stock, mine) == {}
    pair = dict(e2e.pass_ratios([10.0, 10.0], [11.0, 9.0]), model="llama8b", mode="graph")
    assert "steady-state window" not in e2e.table({}, [], interleaved=[pair])
    assert e2e.ratio_line("m", pair, "window_") == ("m interleaved, steady-state window: "
                                                    "no pass ran on both engines: no ratio")


def test_interleaved_engines_both_rehearse_the_timed_prompts_first(interleave_env, capsys):
    """--interleave with a timed count (12) over the warm-up's (4): each engine runs its warm-up pass and then the
    timed prompts once, untimed, before it reports ready, so both have done it before any timed pass; the JSON and
    the [ready] / [done] lines have it. With --no-rehearsal the warm-up's prompts run at 12 instead, and with equal
    counts (4) nothing more runs."""
    plan = {b: {"timed_requests": 12, "num_gpu_blocks": 64, "durations": [1.0] * 4} for b in ("stock", "dlinfer")}
    code, report, events, _, _ = interleave_env(plan, "--timed-passes", "4", "--pass-seconds", "10")
    assert code == 0, report["log"]
    first_timed = next(i for i, line in enumerate(events) if line.startswith("start"))
    assert [line for line in events if line.startswith(("warm", "rehearse"))] == [
        "warm stock 4", "rehearse stock 12", "warm dlinfer 4", "rehearse dlinfer 12"]
    assert all(not line.startswith(("warm", "rehearse")) for line in events[first_timed:]), events
    printed = capsys.readouterr().out
    for backend in ("stock", "dlinfer"):
        name = f"llama8b/{backend}/graph/tp1"
        run = report["runs"][name]
        assert run["warmup_full_count_requests"] == 12 and run["warmup_full_count_s"] is not None
        assert run["triton_compiles_warmup_full_count"]["count"] == 0 and run["timed_requests"] == 12
        assert run["rehearsal"] is True
        ready = next(line for line in printed.splitlines() if line.startswith(f"[ready] {name}:"))
        done = next(line for line in printed.splitlines() if line.startswith(f"[done] {name}:"))
        for line in (ready, done):
            assert "rehearsal of the timed prompts (12 requests)" in line and "with 0 Triton compiles" in line, line
    assert report["workload"]["rehearsal"] is True
    code, report, events, _, _ = interleave_env(plan, "--timed-passes", "2", "--pass-seconds", "10",
                                                "--no-rehearsal")
    assert code == 0, report["log"]
    assert [line for line in events if line.startswith(("warm", "rehearse"))] == [
        "warm stock 4", "warm stock 12", "warm dlinfer 4", "warm dlinfer 12"]
    assert "warm-up at the timed count (12 requests)" in capsys.readouterr().out
    plan = {b: {"timed_requests": 4, "num_gpu_blocks": 64, "durations": [1.0] * 4} for b in ("stock", "dlinfer")}
    code, report, events, _, _ = interleave_env(plan, "--timed-passes", "2", "--pass-seconds", "10",
                                                "--no-rehearsal")
    assert code == 0, report["log"]
    assert [line for line in events if line.startswith(("warm", "rehearse"))] == ["warm stock 4", "warm dlinfer 4"]
    assert report["runs"]["llama8b/dlinfer/graph/tp1"]["warmup_full_count_s"] is None
    assert "at the timed count" not in capsys.readouterr().out


def test_interleaved_child_that_exits_early_fails_the_pair(interleave_env):
    """The dlinfer child dies in its second pass: the pair fails at once with the child's name, what it did not do
    and its output; the stock child is killed; the command fails."""
    plan = {"stock": {"timed_requests": 4, "num_gpu_blocks": 50, "durations": [1.0] * 4},
            "dlinfer": {"durations": [1.0] * 4, "exit_at_pass": 2}}
    code, report, events, specs, seconds = interleave_env(plan, "--run-timeout", "60")
    assert code == 1 and seconds < 20
    for name in ("llama8b/stock/graph/tp1", "llama8b/dlinfer/graph/tp1"):
        error = report["runs"][name]["error"]
        assert "interleaved pair failed: llama8b/dlinfer/graph/tp1 exited (code 3) before timed pass 2" in error
        assert "fake dlinfer: dying in pass 2" in error
    assert report["interleaved"] == [] and specs["dlinfer"]["num_gpu_blocks"] == 50
    for pid in (int(line.split()[2]) for line in events if line.startswith("pid")):
        assert _dead(pid)


def test_interleaved_child_out_of_memory_gets_a_hint(interleave_env):
    """A child that dies of CUDA out-of-memory (two engines' weights on one card): the failure line is followed by
    a hint naming the knobs that make room; any other failure gets none."""
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 8.38 GiB."
    for words, hinted in ((oom, True), ("RuntimeError: boom", False)):
        plan = {"stock": {"timed_requests": 4, "num_gpu_blocks": 50, "durations": [1.0] * 4},
                "dlinfer": {"durations": [1.0] * 4, "exit_at_pass": 1, "last_words": words}}
        code, report, *_ = interleave_env(plan, "--run-timeout", "60", "--cache-max-entry-count", "0.5")
        assert code == 1 and words in report["runs"]["llama8b/dlinfer/graph/tp1"]["error"]
        hints = [line for line in report["log"] if line.startswith("[hint]")]
        assert bool(hints) == hinted, report["log"]
        if hinted:
            assert "--cache-max-entry-count (now 0.5" in hints[0] and "--layers" in hints[0]


def test_interleaved_child_that_never_answers_times_out(interleave_env):
    """The stock child hangs before ready: the pair fails after its budget (2 x --run-timeout), the hung child's
    process group killed, the dlinfer child never started; no hang."""
    plan = {"stock": {"hang": "ready"}, "dlinfer": {}}
    code, report, events, specs, seconds = interleave_env(plan, "--run-timeout", "1.5")
    assert code == 1 and 3 <= seconds < 15
    error = report["runs"]["llama8b/dlinfer/graph/tp1"]["error"]
    assert "llama8b/stock/graph/tp1: no ready (engine start and warm-up) within the pair's budget" in error
    assert set(specs) == {"stock"}
    (pid,) = (int(line.split()[2]) for line in events if line.startswith("pid"))
    assert _dead(pid)


def test_interleave_flags(e2e, tmp_path, capsys):
    """--interleave: refused with --tp > 1, one backend or one pass; accepted by --dry-run (4 passes by default)."""
    for bad, message in ((["--tp", "2"], "--tp 1 only"), (["--backend", "dlinfer"], "needs --backend both"),
                         (["--timed-passes", "1"], "--timed-passes >= 2"), (["--pass-gap", "-1"], "--pass-gap")):
        with pytest.raises(SystemExit) as exit_info:
            e2e.main(["--dry-run", "--interleave", *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--interleave", "--quick", "--model", "llama8b",
                           "--mode", "graph", "--out", str(tmp_path / "r.json")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "interleaved: each stock/dlinfer pair alive at once on the card, 4 timed passes each in the order " \
           "stock 1, dlinfer 1, dlinfer 2, stock 2" in done.stdout and "dry run: 64 prompts" in done.stdout


def test_stream_lengths_count_and_window(e2e):
    """--arrival stream: the pre-aged fill's lengths, the timed count from the warm-up's rate, the steady window
    from the ramp's end to the last submission, and the per-request timeline."""
    assert e2e.request_lengths(4, 8) == [8, 8, 8, 8]
    lengths = e2e.request_lengths(6, 8, in_flight=4, shortest=2)
    assert lengths == [8, 6, 4, 2, 8, 8]
    assert e2e.stream_request_count(4, 800, 2.0, 10.0, 8, 1) == 4 + 500
    assert e2e.stream_request_count(4, 0, 2.0, 10.0, 8, 3) == 3
    records = [{"submitted": 0.0, "first": 1.0, "last": 3.0, "tokens": [1] * 3},
               {"submitted": 0.0, "first": 2.0, "last": 4.0, "tokens": [1] * 3},
               {"submitted": 3.0, "first": 3.5, "last": 5.5, "tokens": [1] * 5},
               {"submitted": 4.0, "first": 4.5, "last": 6.5, "tokens": [1] * 5}]
    assert e2e.stream_window(records, 2) == (2.0, 4.0)
    rate = e2e.pass_window_rate(records, 6.5, in_flight=2)
    assert rate == pytest.approx(e2e.window_tok_s(records, 1.0, (2.0, 4.0)))
    assert e2e.pass_window_rate(records, 6.5) == pytest.approx(e2e.window_tok_s(records, 6.5))
    assert e2e.stream_window(records, 4) is None  # nothing submitted after the fill
    assert e2e.request_times(records[:1]) == [[0.0, 1.0, 3.0]]


def test_drive_stream_keeps_in_flight(e2e):
    """--arrival stream: at most ``in_flight`` requests at once, each with its own max_new_tokens."""
    import asyncio
    import types

    state = {"now": 0, "peak": 0, "lengths": []}

    class Engine:
        async def preprocess(self, _, session_id, gen_config, input_ids):
            state["lengths"].append(gen_config.max_new_tokens)
            return gen_config.max_new_tokens

        async def generate(self, n, stream_response=True):
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            for k in range(1, n + 1):
                await asyncio.sleep(0)
                yield types.SimpleNamespace(generate_token_len=k, token_ids=[k], finish_reason=None)
            state["now"] -= 1

    gen = types.SimpleNamespace(max_new_tokens=4)
    sessions = iter(range(100))
    _, records = asyncio.run(e2e.drive(Engine(), lambda: next(sessions), [[1]] * 5, gen, in_flight=2,
                                       lengths=[4, 2, 4, 4, 4]))
    assert state["peak"] == 2
    assert sorted(state["lengths"]) == [2, 4, 4, 4, 4] and gen.max_new_tokens == 4
    assert [len(r["tokens"]) for r in records] == [4, 2, 4, 4, 4]
    assert all(r["submitted"] <= r["first"] <= r["last"] for r in records)


def test_drive_without_streaming_asks_for_one_output_and_records_no_first_token(e2e):
    """--no-stream: the engine is asked not to stream; a record keeps its end and tokens but no first-token time,
    and such a pass has no window rate (no time to first token either)."""
    import asyncio
    import types

    asked = []

    class Engine:
        async def preprocess(self, _, session_id, gen_config, input_ids):
            return gen_config.max_new_tokens

        async def generate(self, n, stream_response=True):
            asked.append(stream_response)
            await asyncio.sleep(0)
            yield types.SimpleNamespace(generate_token_len=n, token_ids=list(range(1, n + 1)), finish_reason="length")

    gen = types.SimpleNamespace(max_new_tokens=3)
    sessions = iter(range(100))
    duration, records = asyncio.run(e2e.drive(Engine(), lambda: next(sessions), [[1]] * 4, gen,
                                              stream_response=False))
    assert asked == [False] * 4
    assert all(len(r["tokens"]) == 3 and "first" not in r and 0 <= r["last"] <= duration for r in records)
    assert e2e.pass_window_rate(records, duration) is None
    assert e2e.pass_window_rate(records, duration, in_flight=2) is None
    rates = e2e.pass_rates([(duration, records), (duration, records)], 12)
    assert rates["pass_window_tok_s"] == [None, None] and rates["pass_window_spread"] is None


def test_the_first_engine_of_a_pair_leaves_room_for_the_second(e2e):
    gib = 1 << 30
    free, weights, reserve = 78.7 * gib, 22.1 * gib, 6 * gib  # an 8-layer Mixtral shape on an 80 GB card
    frac = e2e.twin_cache_fraction(free, weights, 0.3, reserve)
    assert 0.2 < frac < 0.3  # the default's 0.3 did not fit there (out of memory in the second engine)
    cache = frac * (free - weights - reserve)  # what LMDeploy gives the first engine at that fraction
    assert 2 * (weights + reserve + cache) <= free * (1 + 1e-9)  # both engines fit, with the same cache
    # room to spare: the fraction asked for stands
    assert e2e.twin_cache_fraction(140 * gib, 4 * gib, 0.3, reserve) == 0.3
    with pytest.raises(ValueError, match="--interleave: two engines of 40.0 GiB"):
        e2e.twin_cache_fraction(free, 40 * gib, 0.3, reserve)


def test_checkpoint_bytes_counts_the_weight_files(e2e, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 20)
    (tmp_path / "config.json").write_text("{}")
    assert e2e.checkpoint_bytes(tmp_path) == 120
