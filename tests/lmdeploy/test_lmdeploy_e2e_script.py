"""benchmarks/lmdeploy_e2e.py on the CPU: its dry run, and the bookkeeping that needs no GPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
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
    import os
    import time

    pid = int(marker.read_text())

    def alive() -> bool:  # a zombie (killed, not yet reaped by whoever adopted it) counts as dead
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return True

    for _ in range(50):  # the kill is asynchronous
        if not alive():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild survived the timeout")


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


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_float32_oracle_scores_greedy_and_corrupted_tokens(e2e, tmp_path, arch):
    """The oracle child on a tiny model: float32 greedy tokens match the float32 argmax everywhere; tokens
    replaced by other ids are mismatches with a positive deficit; the bf16 yardstick row is there."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from dlinfer.testing.tiny_models import build_tiny_model

    path = build_tiny_model(tmp_path / arch, arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = e2e.workload(3, 5, 12, 0, 200)
    greedy = greedy_tokens(model, prompts, 6)
    corrupted = [[(t + 1) % 200 for t in g] for g in greedy]
    job = {"model_dir": path, "arch": e2e.MODELS["qwen3moe"][0] if arch == "qwen3_moe" else "llama3-8b",
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
