"""benchmarks/vllm_gpu.py end to end on this CPU: the GPU run's code, on a tiny MoE model, before any device time.

One invocation (about two and a half minutes here): build the tiny Qwen3-MoE model, start vLLM + dlinfer in its own
process group, warm it up, time it, collect the dlinfer evidence from the engine's worker process, score it with
the float32 oracle, then serve the model with ``vllm serve`` on 127.0.0.1 (the serve part: streamed requests,
TTFT/TPOT), write the JSON and the table. (The stock run differs only by DLINFER_VLLM=0 in its environment;
tests/test_vllm_gpu_bench.py checks the stock side of the report. The script's own CPU run of both:
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
