"""benchmarks/vllm_gpu.py end to end on this CPU: the GPU run's code, on a tiny MoE model, before any device time.

One invocation (about two and a half minutes here): build the tiny Qwen3-MoE model, start vLLM + dlinfer in its own
process group, warm it up, time it, collect the dlinfer evidence and the Triton compile counts from the engine's
worker process, score it with the float32 oracle, then serve the model with ``vllm serve`` on 127.0.0.1 (the serve
part: streamed requests, TTFT/TPOT), write the JSON and the table. A second invocation (about a minute) runs
``--interleave`` on the tiny Llama: stock and dlinfer alive at once, their timed passes alternating. (The stock run
of the first differs only by DLINFER_VLLM=0 in its environment; tests/test_vllm_gpu_bench.py checks the stock side
of the report. The script's own CPU run of both:
``python benchmarks/vllm_gpu.py --device cpu --eager``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm is not installed (bash scripts/setup_vllm_env.sh)")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import compile_log, vllm_gpu  # noqa: E402


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_gpu")
    out = tmp / "out.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLINFER_", "VLLM_"))}
    cmd = [sys.executable, str(REPO / "benchmarks" / "vllm_gpu.py"), "--device", "cpu", "--eager", "--models",
           "qwen3moe", "--backends", "dlinfer", "--requests", "6", "--timed-passes", "2", "--oracle-prompts", "2", "--deadline", "500", "--parts", "offline,serve", "--model-dir",
           str(tmp / "models"), "--work-dir", str(tmp / "work"), "--cache-dir", str(tmp / "cache"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_the_run_finishes_and_the_table_is_printed(bench):
    proc, report = bench
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert report["complete"] is True
    assert "| qwen3moe (2 layers) | - |" in proc.stdout and proc.stdout.rstrip().endswith("s)")
    run = report["runs"]["qwen3moe/dlinfer"]
    assert run["requests"] == 6 and run["output_tokens"] >= 6 * 8 and len(run["oracle_tokens"]) == 2
    assert run["output_tok_s"] > 0 and run["problems"] == []
    # two timed passes, the second over other prompts: the reported rate is one of them, the spread between them
    assert len(run["pass_output_tok_s"]) == 2 and run["output_tok_s"] in run["pass_output_tok_s"]
    spread = abs(run["pass_output_tok_s"][0] - run["pass_output_tok_s"][1]) / run["output_tok_s"]
    assert abs(run["pass_spread"] - spread) < 1e-3  # both from rounded numbers


@pytest.mark.slow
def test_dlinfer_evidence_comes_from_the_worker(bench):
    _, report = bench
    worker = report["runs"]["qwen3moe/dlinfer"]["workers"][0]
    assert set(worker["vendors"]) >= {"fused_moe", "moe_gating_topk_softmax", "paged_decode_attention"}
    assert all(v == ["reference"] for v in worker["vendors"].values())  # the CPU's vendor
    assert worker["counts"]["paged_decode_attention"] > 0
    log = "\n".join(report["runs"]["qwen3moe/dlinfer"]["log"])
    assert "dlinfer: vLLM plugin took over on cpu" in log


@pytest.mark.slow
def test_triton_compiles_are_counted_in_the_model_process(bench):
    """The compile log reached the worker that ran the model (its pid is among the counted processes, its hooks were
    Triton's): counts for the warm-up and for each timed pass, in the JSON, the table and the log. (The CPU's
    reference vendor and vLLM's CPU kernels compile no Triton kernel: zeros here.)"""
    proc, report = bench
    run = report["runs"]["qwen3moe/dlinfer"]
    phases = [run["triton_compiles_warmup"], *run["triton_compiles_per_pass"]]
    assert len(run["triton_compiles_per_pass"]) == 2
    assert run["gpu_per_pass"] == [None, None]  # no nvidia-smi here: no samples (benchmarks/gpu_monitor.py)
    for c in phases:
        assert set(c) == {"count", "seconds", "per_kernel", "pids", "hooked"}
        assert isinstance(c["count"], int) and isinstance(c["seconds"], float) and c["count"] >= 0 <= c["seconds"]
        assert sum(c["per_kernel"].values()) == c["count"]
        assert c["hooked"] is True and run["workers"][0]["pid"] in c["pids"] and len(c["pids"]) >= 2
    assert "| out tok/s per timed pass (spread) | Triton compiles per timed pass |" in proc.stdout
    counted = ", ".join(map(vllm_gpu.compiles_text, run["triton_compiles_per_pass"]))
    warm = vllm_gpu.compiles_text(phases[0])
    assert f"Triton compiles in the warm-up {warm}, per timed pass {counted})" in proc.stdout


def test_compile_log_counts_in_the_functions_the_workers_get(monkeypatch):
    """install / take / merge, as collective_rpc calls them (with a worker argument), on compilations reported the
    way Triton's JIT calls its hooks: one event per compilation, per kernel, per phase."""
    from triton import knobs

    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", None)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", None)
    monkeypatch.setattr(compile_log, "_log", None)
    assert compile_log.take(object()) == {"pid": os.getpid(), "hooked": False, "count": 0, "seconds": 0.0,
                                          "per_kernel": {}}
    assert compile_log.install(object()) == os.getpid()
    first = compile_log._log
    assert compile_log.install() == os.getpid() and compile_log._log is first  # once per process

    def compile_(name: str) -> None:
        kwargs = dict(key=1, repr="", fn=type("Info", (), {"name": name})(), compile={}, is_manual_warmup=False,
                      already_compiled=False)
        assert knobs.runtime.jit_cache_hook(**kwargs) is False  # Triton goes on and compiles
        knobs.runtime.jit_post_compile_hook(**kwargs)

    for name in ("fused_moe_kernel", "fused_moe_kernel", "_rms_norm"):
        compile_(name)
    taken = compile_log.take(object())
    assert taken["hooked"] is True and taken["count"] == 3 and taken["seconds"] >= 0
    assert taken["per_kernel"] == {"fused_moe_kernel": 2, "_rms_norm": 1}
    assert compile_log.take()["count"] == 0  # a take empties the log: the next phase starts from zero
    other = {"pid": 1, "hooked": True, "count": 1, "seconds": 0.5, "per_kernel": {"_rms_norm": 1}}
    merged = compile_log.merge([taken, other, compile_log.take()])
    assert merged["count"] == 4 and merged["per_kernel"] == {"fused_moe_kernel": 2, "_rms_norm": 2}
    assert merged["pids"] == sorted({1, os.getpid()}) and merged["hooked"] is True
    assert compile_log.merge([taken, dict(other, hooked=False)])["hooked"] is False
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", None)  # replaced by someone else: not counted
    assert compile_log.take()["hooked"] is False


def test_compiles_in_a_timed_pass_are_reported_and_warned_about(tmp_path, capsys):
    """A run whose second timed pass compiled: the [done] line and the run table give every pass's compiles, a
    [warn] line names the pass and its kernels; a pass of a process without Triton's hooks reads "not counted"."""
    def phase(count: int, seconds: float = 0.0, **per_kernel: int) -> dict:
        return {"count": count, "seconds": seconds, "per_kernel": per_kernel, "pids": [7, 8], "hooked": True}

    args = vllm_gpu.parse_args(["--device", "cpu", "--models", "qwen3moe", "--backends", "dlinfer", "--timed-passes",
                                "3", "--out", str(tmp_path / "out.json")])
    bench = vllm_gpu.Bench(args)
    run = vllm_gpu.Run("qwen3moe", "dlinfer", dir=tmp_path)
    result = {"output_tok_s": 100.0, "output_tokens": 60, "generate_s": 0.6, "startup_s": 9.0, "warmup_s": 1.0,
              "pass_output_tok_s": [100.0, 80.0, 101.0], "pass_spread": 0.21,
              "triton_compiles_warmup": phase(12, 4.06, fused_moe_kernel=12),
              "triton_compiles_per_pass": [phase(0), phase(3, 1.24, fused_moe_kernel=2, _rms_norm=1), phase(0)]}
    (tmp_path / "result.json").write_text(json.dumps(result))
    (tmp_path / "log.txt").write_text("")
    bench.finish(run)
    printed = capsys.readouterr().out
    assert "Triton compiles in the warm-up 12 (4.1 s), per timed pass 0, 3 (1.2 s), 0)" in printed
    assert ("[warn] qwen3moe/dlinfer: timed pass 2 compiled 3 Triton kernel variant(s) in 1.2 s (fused_moe_kernel "
            "x2, _rms_norm x1)") in printed
    assert printed.count("[warn]") == 1
    assert "| 100, 80, 101 (21.0 %) | 0, 3 (1.2 s), 0 |" in bench.table(bench.summary())
    bench.report["runs"]["qwen3moe/dlinfer"]["triton_compiles_per_pass"][0]["hooked"] = False
    assert "| not counted, 3 (1.2 s), 0 |" in bench.table(bench.summary())


@pytest.mark.slow
def test_the_oracle_scores_the_run(bench):
    _, report = bench
    runs = report["oracle"]["qwen3moe"]["runs"]
    assert any(name.startswith("transformers bf16") for name in runs)
    # a float32 engine: every token is the float32 argmax
    assert runs["qwen3moe/dlinfer"]["match_rate"] == 1.0 and runs["qwen3moe/dlinfer"]["match_or_tie_rate"] == 1.0
    row = report["summary"][0]
    assert row["dlinfer_checks"] == [] and row["dlinfer_argmax"] == 1.0


@pytest.mark.slow
def test_the_serve_part_streams_from_a_local_server(bench):
    """``vllm serve`` with the plugin on: every request streamed its tokens, TTFT/TPOT measured, the server log shows
    the plugin taking over, and the served greedy tokens are the offline engine's."""
    _, report = bench
    run = report["serve"]["runs"]["qwen3moe/dlinfer"]
    assert "error" not in run, run.get("error")
    assert run["problems"] == [] and run["completed"] == 6 and run["output_tokens"] >= 6 * 8
    assert 0 < run["ttft_median_ms"] <= run["ttft_p99_ms"] and 0 < run["tpot_median_ms"] <= run["tpot_p99_ms"]
    assert run["agreement_with_offline"]["first_token_equal"] == 1.0


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory):
    """``--interleave`` with the real engine children: the tiny Llama, stock and dlinfer alive at once, two timed
    passes each in the order stock 1, dlinfer 1, dlinfer 2, stock 2 (about a minute here)."""
    tmp = tmp_path_factory.mktemp("vllm_gpu_interleave")
    out = tmp / "out.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLINFER_", "VLLM_"))}
    cmd = [sys.executable, str(REPO / "benchmarks" / "vllm_gpu.py"), "--device", "cpu", "--eager", "--models",
           "llama8b", "--interleave", "--timed-passes", "2", "--requests", "4", "--oracle-prompts", "0",
           "--deadline", "400", "--model-dir", str(tmp / "models"), "--work-dir", str(tmp / "work"), "--cache-dir",
           str(tmp / "cache"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, json.loads(out.read_text()), tmp / "work"


@pytest.mark.slow
def test_interleaved_passes_with_real_engines(interleaved):
    """Each engine timed pass by pass on the parent's go_<k>, pass_<k>.json after each, result.json after finish; the
    ratios dlinfer / stock per pass, their median and spread in the JSON and the printed summary."""
    proc, report, work = interleaved
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert report["complete"] is True
    rec = report["interleaved"]["llama8b"]
    assert rec["ran"] == ["stock 1", "dlinfer 1", "dlinfer 2", "stock 2"] and rec["pairs"] == 2
    runs = {b: report["runs"][f"llama8b/{b}"] for b in ("stock", "dlinfer")}
    for b, run in runs.items():
        assert run["interleaved"] is True and len(run["pass_output_tok_s"]) == 2 and run["problems"] == []
        assert sorted(p.name for p in (work / f"llama8b-{b}").glob("pass_*.json")) == ["pass_1.json", "pass_2.json"]
        assert [round(p[f"{b}_output_tok_s"], 1) for p in rec["passes"]] == pytest.approx(run["pass_output_tok_s"],
                                                                                          abs=0.11)
    for k in range(2):
        assert rec["pass_ratios"][k] == pytest.approx(
            runs["dlinfer"]["pass_output_tok_s"][k] / runs["stock"]["pass_output_tok_s"][k], rel=0.01)
    assert rec["ratio_min"] <= rec["ratio_median"] <= rec["ratio_max"]
    assert f"llama8b interleaved: dlinfer / stock output tok/s ratio {rec['ratio_median']:.3f} (passes: " in proc.stdout
