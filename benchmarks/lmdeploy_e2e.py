"""LMDeploy's PyTorch engine end to end: stock vs dlinfer, eager vs CUDA graphs, same prompts, same card.

    python benchmarks/lmdeploy_e2e.py --model llama8b --mode both          # one H100, < 10 minutes
    python benchmarks/lmdeploy_e2e.py --model qwen3moe --mode both
    python benchmarks/lmdeploy_e2e.py --model llama8b --mode graph --tp 2  # two GPUs: tp=2 vs tp=1
    python benchmarks/lmdeploy_e2e.py --model llama8b --layers 8 --quant awq --mode graph --timed-passes 3 \
        --pass-seconds 15 --oracle-prompts 8                              # quantized: awq | w8a8, --kv-quant 8
    python benchmarks/lmdeploy_e2e.py --model llama8b --layers 8 --quant w8a8 --mode graph --interleave \
        --timed-passes 4 --pass-seconds 10 --oracle-prompts 8              # the ratio from alternating passes
    python benchmarks/lmdeploy_e2e.py --dry-run                           # CPU: arguments and imports only

Models are random-weight bf16 checkpoints of real shapes, written on the GPU machine
(``dlinfer.testing.tiny_models.build_tiny_model``): Llama-3-8B (32 layers) and Qwen3-30B-A3B cut to 12 of its
48 layers (``--layers`` changes either; the output says how many). Each configuration runs in its own process
(``lmdeploy.pipeline``, greedy, ``ignore_eos``) on the same seeded synthetic workload: ``--requests`` prompts of
uniformly random length in ``[--min-prompt, --max-prompt]`` random tokens, ``--new-tokens`` output tokens each,
all submitted at once. Reported per run: output tokens/s, total tokens/s, mean time to first token (from
submission, queueing included), mean time per output token after the first and the Triton compilations that
happened during the timed pass (after a warm-up pass of a like workload, ``--warmup``); per pair of runs: greedy-token
agreement on the first ``--compare-tokens`` tokens of every prompt (stock eager vs stock graph calibrates what
bf16 batching alone changes). Beside each timed pass's output tokens/s (the headline) stands its steady-state window
rate (``window_tok_s``): the output tokens emitted in the middle half of the pass, ``[0.25 D, 0.75 D]`` of its
duration D, over the window's length (a request's first token at its time, the others spread evenly up to its last
one), which leaves out the ramp-up (every request queued at once) and the tail (the last requests at a small batch).
Python's garbage collector runs before each timed pass and is disabled during it (``gc`` in the JSON), in both
backends alike, so that no collection pause lands in a timed pass; the warm-up passes keep it on.

Quantized serving (``--quant``, ``--kv-quant``; both backends on the same checkpoint and cache): the float model is
quantized once with ``dlinfer.testing.quantize`` (on the GPU) and cached in ``--model-dir``: ``awq`` (W4A16, group
128, zero points; LMDeploy serves AWQ in float16 — stock builds TurboMind's GEMM where its extension is built, else
its Triton ``awq_linear``: the result names which), ``w8a8`` (LMDeploy's SmoothQuant format: int8 weights, float32
per-channel scales, bfloat16 otherwise; activations quantized per token by the engines); ``--kv-quant 8`` is
LMDeploy's ``quant_policy`` 8 (int8 KV cache). 4-bit caches are refused (dlinfer sends their paged prefill on CUDA
to the reference vendor), AWQ MoE models too (LMDeploy builds no AWQ experts), W8A8 Qwen3-MoE too (LMDeploy 0.18
cannot run it); W8A8 Mixtral runs without the oracle only (``--oracle-prompts 0``). ``--pass-seconds S`` sizes
each timed pass to about S seconds (from the first run's warm-up rate; every run of a model then times the same
prompts), so that the passes' spread, printed per run, is the noise. A timed pass of more requests than the
warm-up pass runs larger batches, and the engine captures a CUDA graph (compiling LMDeploy's
``_fill_graph_common_inputs_kernel``) for each batch size it first meets, and its kernels specialize on sizes. So
with ``--warmup full`` the child runs one more untimed pass before its first timed pass: a rehearsal, the timed
prompts themselves (LMDeploy's scheduler makes the same forwards for the same requests, as two engines did forward
for forward on an H100, so the timed passes meet batches whose CUDA graphs and kernels are ready; a first timed pass
after a warm-up of other prompts still compiled 1-5 of LMDeploy's kernels and ran 6-13 % slower than the later
ones); with ``--no-rehearsal`` the warm-up's prompts at the timed count, and only when that count exceeds the
warm-up's. Its seconds and compilations are ``warmup_full_count_s`` /
``warmup_full_count_requests`` / ``triton_compiles_warmup_full_count`` (``rehearsal``: whether it was the timed
prompts) in the JSON (``warmup_s`` and ``triton_compiles_warmup`` stay the first warm-up pass's) and in the
``[ready]`` / ``[done]`` lines; ``--warmup short`` keeps its 16 prompts only.

Greedy tokens of two bf16 engines part ways wherever a random model's top two logits are closer than bf16 rounding,
and from there on the sequences differ, so agreement alone cannot tell a rounding difference from a bug. The
float32 oracle (``--oracle-prompts``, after the runs) settles it: transformers loads the same checkpoint in float32
and, teacher-forced on each run's own tokens, scores every generated token against its float32 argmax (match rate,
and how far below the float32 maximum the mismatched tokens' logits are). transformers itself in bf16, scored the
same way on the first run's tokens, is the yardstick of what bf16 alone costs. For a quantized checkpoint the
oracle is the dequantized model (``dlinfer.testing.quantize.load_dequantized_model``: the quantized weights expanded
to float32, the function the checkpoint stands for, the same for both engines); the engines' on-the-fly
quantization (W8A8's activations, an int8 KV cache) counts as their error, and the yardstick runs in the engine's
dtype (float16 for AWQ).

``--arrival stream`` (``--in-flight N``, default ``--max-batch-size``) replaces the burst by a steady stream: N
requests in flight, a new one submitted (the next prompt of the same fixed list) whenever one finishes, until all
are submitted. The first N (the fill) are pre-aged: their output lengths are spread evenly from ``--new-tokens``
down to ``--compare-tokens`` (descending, so the first prompts, the oracle's, keep long outputs), every later
request has ``--new-tokens``; so completions, and the prefills that replace them, come at an even pace from the end
of the ramp on instead of in waves. A stream pass's window is then its steady state: from the ramp's end (the last
fill request's first token) to the last submission (after which the in-flight count decays: the tail), and
``window_tok_s`` is the output rate there (the headline of a stream pass and of its ratio). ``--pass-seconds`` sizes
that window: N plus as many requests as the warm-up's output rate finishes in that time. Every timed pass also
keeps its requests' times (``pass_request_times``: submission, first and last token, seconds from the pass's
start), so that a pass's timeline (ramp, occupancy, tail) can be read from the JSON.

``--no-stream`` asks the engine for each request's tokens once, at its end, instead of token by token. Streamed,
every running request costs the engine's event loop an incremental detokenization and a response object per step:
with an 8-layer model that is about half of a step's host time, the same for both backends, so it dilutes the
ratio and its host-side stalls dominate the pass-to-pass noise. Without streaming there is no time to first token
and no window rate (whole-pass rates only).

``--interleave`` measures the ratio dlinfer / stock with the drift of the card (clocks, power, neighbours) taken
out: both engines of a pair (same model, mode, quantization) are alive at once, in two child processes on the
same GPU, and their timed passes alternate, one at a time (never two at once), in the order stock, dlinfer for
odd passes and dlinfer, stock for even ones (ABBA: a drift linear in time cancels). The stock child starts,
warms up, sizes the timed pass (``--pass-seconds``), warms up at that count when it is larger (above) and reports
ready with the number of KV-cache blocks its engine allocated; the dlinfer child then starts with that block count
(``PytorchEngineConfig.num_gpu_blocks``) and request count, so both run the same cache and prompts whatever memory
each found free, and it too runs its warm-up pass at the timed count before it reports ready: both engines have done
it before the parent sends the first ``go_1``. (Nothing estimates a pass's time here: the extra warm-up pass falls
within the wait for ``ready.json``, which the pair's budget bounds as any other wait.) Both engines share the card's
memory: the first one's cache takes half of ``--cache-max-entry-count`` of the free memory (0.3 by default), or less
where that would leave the second one no room for its weights, runtime buffers and the same cache (given as a block
count, which the fraction then no longer sizes): :func:`twin_cache_fraction`, from the free memory the first child
finds and the checkpoint's bytes (a Mixtral shape of 8 layers, 23 GB of weights, on an 80 GB card: 0.22). tp 1
only. Per pair the result has, besides each run's own fields, the per-pass ratios of output tokens/s (pass k of
dlinfer over pass k of stock, adjacent in time), their median (the ratio), min, max and spread (max - min) /
median, the noise of the ratio (a warning when over 2 %), their geometric mean with its 95 %
confidence interval (Student's t over the log-ratios: how well the passes together pin the ratio; ``ratio_geomean``,
``ratio_ci95``), and the same of the steady-state window rates (``window_ratio_median`` and so on, and a second
``[pair]`` line). ``--until-ci PCT`` makes the pass count the measurement's own: after ``--timed-passes``, the pair
runs two more passes of each engine at a time (keeping the ABBA order) until that interval lies within +-PCT % of
the geometric mean (``"stopped": "interval"``), ``--max-timed-passes`` are done, or two more would not fit the time
left (the pair's budget less ``ORACLE_RESERVE_S`` for the float32 oracle); the pair's ``until_ci`` record and a
``[pair]`` line say how many passes ran, how well the ratio is known and why it stopped. Each pass starts
``--pass-gap`` seconds (1 by default) after the last one ended, so that what an
engine leaves behind after its pass (threads still spinning, output handling) does not run into the other's. The
channel is files in a temporary folder (the parent writes ``go_<k>`` and ``finish``, a child ``ready.json`` and
``pass_<k>.json``, each atomically by a rename); every wait of the parent ends at the pair's budget (twice
``--run-timeout``, within ``--deadline``), after which both process groups are killed; a child's own waits end there
too, or at once when the parent is gone.

Results go to ``$OUT/lmdeploy_e2e.json`` (``--out`` overrides; rewritten after every run, so a run cut short
still leaves what finished) with the card, versions and settings; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    # name: (tiny_models REAL_SHAPES key, description, default layers, full layers)
    "llama8b": ("llama3-8b", "Llama-3-8B shape", 32, 32),
    "qwen3moe": ("qwen3-30b-a3b", "Qwen3-30B-A3B shape", 12, 48),
    "mixtral": ("mixtral-8x7b", "Mixtral-8x7B shape", 8, 32),
}
QUICK_LAYERS = {"llama8b": 8, "qwen3moe": 6, "mixtral": 4}
# --quant: (dlinfer.testing.quantize format, description, the dtype LMDeploy serves it in; None: the checkpoint's)
QUANTS = {
    "none": (None, "random bf16 weights", None),
    "awq": ("awq", "AWQ W4A16 (4-bit weights, group 128, zero points; LMDeploy runs AWQ in float16)", "float16"),
    "w8a8": ("w8a8", "SmoothQuant W8A8 (int8 weights per output channel, int8 activations per token; bfloat16)",
             None),
}
AWQ_GROUP_SIZE = 128
# --kv-quant: LMDeploy's quant_policy
KV_QUANTS = {0: "KV cache in the model's dtype", 8: "int8 KV cache (quant_policy 8: per-token scales and zeros)"}
# What run_child does with Python's garbage collector around each timed pass (the result JSON's "gc")
GC_TIMED = "collected before each timed pass, disabled during it"
# The steady-state window of a timed pass: these fractions of its duration (window_tok_s)
STEADY_WINDOW = (0.25, 0.75)
WINDOW_TEXT = "steady-state window"  # a burst: the middle half of each pass; a stream: ramp end to last submission
WARMUPS = {"full": "one untimed pass of a like workload (other prompts), and one more at the timed pass's request "
                   "count when that is larger",
           "full+rehearsal": "one untimed pass of a like workload (other prompts), then one of the timed prompts "
                             "themselves",
           "short": "16 untimed prompts (kernel variants first needed in the timed pass compile there)"}


@dataclasses.dataclass
class RunSpec:
    model: str
    model_dir: str
    backend: str  # stock | dlinfer
    mode: str  # eager | graph
    tp: int
    requests: int
    min_prompt: int
    max_prompt: int
    new_tokens: int
    compare_tokens: int
    seed: int
    vocab_limit: int
    max_batch_size: int
    cache_max_entry_count: float
    block_size: int
    vendor: str | None
    result_path: str
    profile: bool = False
    warmup: str = "full"  # full | short
    rehearsal: bool = True  # --warmup full: one untimed pass of the timed prompts before the timed passes
    timed_passes: int = 1
    max_timed_passes: int = 0  # --until-ci: up to this many passes, those past timed_passes while the parent asks
    quant: str = "none"  # none | awq | w8a8 (the checkpoint in model_dir is quantized so already)
    kv_quant: int = 0  # LMDeploy's quant_policy
    pass_seconds: float = 0.0  # > 0: scale the timed pass's request count so a pass lasts about this long
    timed_requests: int | None = None  # fixed count for the timed passes (from an earlier run of the same model)
    num_gpu_blocks: int = 0  # > 0: this many KV-cache blocks (PytorchEngineConfig.num_gpu_blocks); 0: from free memory
    control_dir: str | None = None  # --interleave: the folder of the parent's channel (see PassControl)
    control_timeout: float = 0.0  # --interleave: seconds a wait for the parent's go may last
    arrival: str = "burst"  # burst: every request submitted at once | stream: in_flight kept in flight
    in_flight: int = 0  # --arrival stream: requests kept in flight (0: max_batch_size)
    stream_response: bool = True  # False (--no-stream): each request's output delivered once, at its end
    twin_room: bool = False  # --interleave: size the cache so a second engine of these weights fits beside this one

    @property
    def name(self) -> str:
        return f"{self.model}/{self.backend}/{self.mode}/tp{self.tp}"


# ------------------------------------------------------------------------------------------------ workload
def workload(requests: int, min_prompt: int, max_prompt: int, seed: int, vocab_limit: int) -> list[list[int]]:
    """The fixed synthetic prompts: seeded lengths in [min_prompt, max_prompt], token ids in [4, vocab_limit)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(4, vocab_limit) for _ in range(rng.randint(min_prompt, max_prompt))]
            for _ in range(requests)]


def request_lengths(count: int, new_tokens: int, in_flight: int = 0, shortest: int = 1) -> list[int]:
    """Output tokens of each of ``count`` requests: ``new_tokens`` each, except (``in_flight`` > 0, --arrival
    stream) the first ``in_flight`` ones, the pre-aged fill, spread evenly from ``new_tokens`` down to ``shortest``
    (descending), so that the fill's requests finish one after the other at an even pace, as a steady state's do."""
    lengths = [new_tokens] * count
    fill = min(in_flight, count)
    low = max(1, min(shortest, new_tokens))
    for i in range(fill):  # none for a burst (in_flight <= 0)
        lengths[i] = new_tokens - round((new_tokens - low) * i / max(1, fill - 1))
    return lengths


def stream_request_count(in_flight: int, warm_out_tokens: int, warm_busy_s: float, pass_seconds: float,
                         new_tokens: int, requests: int) -> int:
    """Requests per timed pass of --arrival stream: the fill (``in_flight``) and as many more as finish in
    ``pass_seconds`` at the warm-up's output rate (``warm_out_tokens`` in ``warm_busy_s``), ``new_tokens`` each;
    never fewer than ``requests``."""
    import math

    if pass_seconds <= 0 or warm_busy_s <= 0 or warm_out_tokens <= 0 or new_tokens <= 0:
        return requests
    return max(requests, in_flight + math.ceil(pass_seconds * warm_out_tokens / warm_busy_s / new_tokens))


def timed_request_count(requests: int, warm_requests: int, warm_busy_s: float, pass_seconds: float,
                        cap: int = 64) -> int:
    """Requests per timed pass so that a pass lasts about ``pass_seconds``, from the warm-up pass's rate
    (``warm_requests`` in ``warm_busy_s`` seconds, Triton compilations left out): never fewer than ``requests``
    (fewer would also shrink the batch the engine runs, i.e. measure something else), at most ``cap`` times it."""
    if pass_seconds <= 0 or warm_busy_s <= 0 or warm_requests <= 0:
        return requests
    import math

    return min(max(requests, math.ceil(pass_seconds * warm_requests / warm_busy_s)), cap * requests)


def agreement(a: list[list[int]], b: list[list[int]], k: int) -> dict:
    """Greedy-token agreement of two runs on the first ``k`` tokens of every prompt."""
    prefixes = []
    for x, y in zip(a, b):
        n = 0
        for u, v in zip(x[:k], y[:k]):
            if u != v:
                break
            n += 1
        prefixes.append(n)
    count = len(prefixes)
    return {
        "prompts": count,
        "first_token_equal": sum(p >= 1 for p in prefixes) / count if count else None,
        "all_k_equal": sum(p >= k for p in prefixes) / count if count else None,
        "mean_common_prefix": sum(prefixes) / count if count else None,
        "min_common_prefix": min(prefixes) if count else None,
        "k": k,
    }


# A generated token whose float32 logit is within this many logits of the float32 maximum is a near-tie: bf16
# rounding (of any engine, transformers in bf16 included) decides such ties either way; a wrong kernel lands far below.
TIE_GAP = 0.5


def score_tokens(logits, tokens: list[int], gap_floor: float = 0.0, router_gap: list[float] | None = None) -> dict:
    """Score generated ``tokens`` against float32 ``logits`` ([len(tokens), vocab], teacher-forced on those very
    tokens): per position whether the token is the float32 argmax, its deficit (float32 max logit minus the
    token's logit; 0 where it is the argmax) and the float32 gap between the best two logits; ``router_gap`` (MoE
    models, :func:`router_gaps`) is kept beside them."""
    import torch

    logits = logits.float()
    ids = torch.tensor(tokens, dtype=torch.long, device=logits.device)
    top2 = logits.topk(2, dim=-1).values
    chosen = logits.gather(1, ids[:, None])[:, 0]
    deficit = (top2[:, 0] - chosen).clamp_min(0)
    out = {"match": (logits.argmax(-1) == ids).tolist(), "deficit": deficit.tolist(),
           "gap": (top2[:, 0] - top2[:, 1]).tolist()}
    if router_gap is not None:
        out["router_gap"] = list(router_gap)
    return out


def router_gaps(router_logits, topk: int, last: int) -> list[float]:
    """Per position of the last ``last`` ones, the smallest float32 router-logit gap over the layers between the
    ``topk``-th and the next expert (``router_logits``: one ``[positions, experts]`` tensor per MoE layer): where it
    is near zero, a rounding anywhere upstream can swap one of the position's experts for another (a routing flip,
    which changes that layer's output wholesale)."""
    import torch

    stacked = torch.stack([r.float()[-last:] for r in router_logits])  # [layers, last, experts]
    top = stacked.topk(topk + 1, dim=-1).values
    return (top[..., topk - 1] - top[..., topk]).min(dim=0).values.tolist()


def summarize_scores(scores: list[dict], tie_gap: float = TIE_GAP, worst_n: int = 5) -> dict:
    """One run's oracle scores over its prompts: match rate, first-token match rate, deficits of mismatches (median,
    90th percentile, max, and the ``worst_n`` largest with their prompt, position and float32 top-2 gap, so that one
    large deficit can be traced to its token), and the tie-aware match rate (the token is the float32 argmax or its
    float32 logit is within ``tie_gap``)."""
    import statistics

    match = [m for s in scores for m in s["match"]]
    near = [m or d <= tie_gap for s in scores for m, d in zip(s["match"], s["deficit"])]
    first = [s["match"][0] for s in scores if s["match"]]
    # every mismatch as (deficit, prompt, position, gap), largest deficit first
    mismatched = sorted(((d, i, j, s["gap"][j]) for i, s in enumerate(scores)
                         for j, (m, d) in enumerate(zip(s["match"], s["deficit"])) if not m), reverse=True)
    missed = [d for d, *_ in reversed(mismatched)]  # ascending
    worst = [{"prompt": i, "position": j, "deficit": d, "gap": g} for d, i, j, g in mismatched[:worst_n]]
    gaps = [g for s in scores for g in s["gap"]]
    routed = {}
    if scores and all("router_gap" in s for s in scores):  # MoE: are the mismatches where routing is near a tie?
        for w in worst:
            w["router_gap"] = scores[w["prompt"]]["router_gap"][w["position"]]
        every = [g for s in scores for g in s["router_gap"]]
        at_miss = [scores[i]["router_gap"][j] for _, i, j, _ in mismatched]
        routed = {"router_gap_median": statistics.median(every) if every else None,
                  "mismatch_router_gap_median": statistics.median(at_miss) if at_miss else None}
    return {
        "prompts": len(scores),
        "positions": len(match),
        "match_rate": sum(match) / len(match) if match else None,
        "match_or_tie_rate": sum(near) / len(near) if near else None,
        "tie_gap": tie_gap,
        "first_token_match": sum(first) / len(first) if first else None,
        "mismatches": len(missed),
        "mismatch_deficit_median": statistics.median(missed) if missed else 0.0,
        "mismatch_deficit_max": missed[-1] if missed else 0.0,
        "mismatch_deficit_p90": missed[min(len(missed) - 1, int(0.9 * len(missed)))] if missed else 0.0,
        "worst_mismatches": worst,
        "gap_median": statistics.median(gaps) if gaps else None,
        **routed,
    }


def teacher_forced_logits(model, prompt: list[int], tokens: list[int], router_topk: int = 0):
    """``(logits, router gaps)``: the logits at the positions that produced ``tokens`` (prompt + tokens[:-1] in, the
    last len(tokens) out) and, with ``router_topk`` (an MoE model's experts per token), their router gaps
    (:func:`router_gaps`; else None)."""
    import torch

    ids = torch.tensor([prompt + tokens[:-1]], device=model.device)
    with torch.no_grad():
        extra = {"output_router_logits": True} if router_topk else {}
        out = model(input_ids=ids, logits_to_keep=len(tokens), **extra)
    logits = out.logits[0, -len(tokens):].float()
    return logits, router_gaps(out.router_logits, router_topk, len(tokens)) if router_topk else None


def run_oracle(job: dict) -> None:
    """The float32 oracle child: load ``job["model_dir"]`` with transformers in float32, score every run's tokens
    on its first ``len(job["prompts"])`` prompts, then transformers in the engine's dtype (``job["engine_dtype"]``,
    default bfloat16) on the first run's tokens. A quantized checkpoint (``job["quant"]`` awq / w8a8) is loaded
    dequantized (``dlinfer.testing.quantize.load_dequantized_model``): the float function its weights stand for,
    the same for both engines; what the engines quantize on the fly (W8A8's activations, a quantized KV cache)
    counts as their error."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    kwargs = {"dtype": torch.float32}
    config = json.loads((Path(job["model_dir"]) / "config.json").read_text())
    if "moe" in job.get("arch", "") or "num_experts" in config or "num_local_experts" in config:
        kwargs["experts_implementation"] = "eager"  # a plain per-expert loop: exact in float32 everywhere
    quantized = job.get("quant", "none") != "none"

    def load(dtype):
        if quantized:
            from dlinfer.testing.quantize import load_dequantized_model

            return load_dequantized_model(job["model_dir"], dtype, device)
        return AutoModelForCausalLM.from_pretrained(job["model_dir"], **dict(kwargs, dtype=dtype)).to(device).eval()

    model = load(torch.float32)
    load_s = time.perf_counter() - t0
    prompts, runs = job["prompts"], job["runs"]
    # MoE: the float32 router's margin at each scored position (quantized checkpoints load through another path)
    router_topk = 0 if quantized else int(config.get("num_experts_per_tok") or 0)
    out: dict = {"load_s": round(load_s, 1), "runs": {}}
    seen: dict[str, list[dict]] = {}  # identical token lists are scored once
    base = next(iter(runs))
    base_logits = []
    for name, token_lists in runs.items():
        key = json.dumps(token_lists)
        if key not in seen:
            scores = []
            for i, (prompt, tokens) in enumerate(zip(prompts, token_lists)):
                logits, gaps = teacher_forced_logits(model, prompt, tokens, router_topk)
                scores.append(score_tokens(logits, tokens, router_gap=gaps))
                if name == base:
                    base_logits.append(logits.cpu())
            seen[key] = scores
        out["runs"][name] = summarize_scores(seen[key], job.get("tie_gap", TIE_GAP))
    # the yardstick: transformers in the engine's dtype, its own argmax teacher-forced on the first run's tokens;
    # loaded anew, since .to(bfloat16) would also round the rotary inv_freq buffer (kept in float32)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    engine_dtype = getattr(torch, job.get("engine_dtype") or "bfloat16")
    model = load(engine_dtype)
    scores = []
    for prompt, tokens, ref in zip(prompts, runs[base], base_logits):
        own = teacher_forced_logits(model, prompt, tokens)[0].argmax(-1).tolist()
        scored = score_tokens(ref.to(device), own)
        scores.append(scored)
    label = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(engine_dtype, str(engine_dtype)[6:])
    out["runs"][f"transformers {label} (on {base}'s tokens)"] = summarize_scores(scores, job.get("tie_gap", TIE_GAP))
    out["oracle_s"] = round(time.perf_counter() - t0, 1)
    Path(job["result_path"]).write_text(json.dumps(out))


class GeneratedTokens:
    """The generated ids of one request, rebuilt from LMDeploy's streamed outputs.

    Each streamed ``GenOut`` carries ``generate_token_len`` (tokens generated so far) and ``token_ids``, a suffix
    of prompt + generated ids (the incremental detokenizer's window, possibly empty); its last entries are the
    newest generated tokens.
    """

    def __init__(self):
        self.count = 0
        self._by_position: dict[int, int] = {}

    def update(self, generated: int | None, window) -> None:
        generated = int(generated or 0)
        window = list(window or [])
        m = min(len(window), generated)
        for j in range(m):
            self._by_position[generated - m + j] = int(window[len(window) - m + j])
        self.count = max(self.count, generated)

    def ids(self) -> list[int]:
        """Generated ids in order; -1 where no output ever carried a position (never expected)."""
        return [self._by_position.get(i, -1) for i in range(self.count)]


async def drive(engine, new_session, prompts: list[list[int]], gen_config, in_flight: int = 0,
                lengths: list[int] | None = None, stream_response: bool = True) -> tuple[float, list[dict]]:
    """Submit the prompts to LMDeploy's async engine: all at once (``in_flight`` 0, the burst), or ``in_flight``
    at a time, the next one as soon as one finishes (--arrival stream). ``lengths``: per request its
    ``max_new_tokens`` (default: ``gen_config``'s). Per request: generated ids, and the times of its submission,
    first and last token (seconds from the pass's start). Returns (wall time, records).

    ``stream_response`` False (--no-stream): the engine hands each request's tokens over once, when it ends, so the
    per-step output handling of every running request (incremental detokenization, one response object per
    request and step, all in the engine's event loop) leaves the timed loop; a record then has no first-token
    time, only its end (``last``)."""
    import asyncio
    import copy

    start = time.perf_counter()

    async def one(ids: list[int], record: dict, length: int | None) -> None:
        record["submitted"] = time.perf_counter() - start
        config = gen_config
        if length is not None and length != getattr(gen_config, "max_new_tokens", None):
            config = copy.copy(gen_config)
            config.max_new_tokens = length
        request = await engine.preprocess(None, session_id=new_session(), gen_config=config, input_ids=ids)
        tokens = GeneratedTokens()
        async for out in engine.generate(request, stream_response=stream_response):
            now = time.perf_counter() - start
            tokens.update(out.generate_token_len, out.token_ids)
            if tokens.count:
                if stream_response:
                    record.setdefault("first", now)
                record["last"] = now
            if out.finish_reason == "error":
                record["error"] = True
        record["tokens"] = tokens.ids()

    records: list[dict] = [{} for _ in prompts]
    sizes = list(lengths) if lengths is not None else [None] * len(prompts)
    if in_flight <= 0:
        await asyncio.gather(*(one(ids, rec, n) for ids, rec, n in zip(prompts, records, sizes)))
    else:
        queue = iter(range(len(prompts)))

        async def lane() -> None:  # one in-flight slot: its requests one after the other
            for i in queue:
                await one(prompts[i], records[i], sizes[i])

        await asyncio.gather(*(lane() for _ in range(min(in_flight, len(prompts)))))
    return time.perf_counter() - start, records


def stream_window(records: list[dict], in_flight: int) -> tuple[float, float] | None:
    """The steady state of an --arrival stream pass (:func:`drive`'s records), in seconds from its start: from the
    end of the ramp (the last first token of the fill, the first ``in_flight`` requests) to the last submission
    (after it the in-flight count decays: the tail). None when there is no such interval."""
    fill = records[:in_flight]
    if not fill or any("first" not in r for r in fill) or len(records) <= in_flight:
        return None
    a = max(r["first"] for r in fill)
    b = max(r.get("submitted", 0.0) for r in records)
    return (a, b) if b > a else None


def pass_window_rate(records: list[dict], duration: float, in_flight: int = 0) -> float | None:
    """A pass's steady-state rate: :func:`window_tok_s` over the middle half of the pass (a burst), or over
    :func:`stream_window` (``in_flight`` > 0, a stream); None without first-token times (--no-stream)."""
    if not any("first" in r for r in records):
        return None
    if in_flight <= 0:
        return window_tok_s(records, duration)
    bounds = stream_window(records, in_flight)
    return None if bounds is None else window_tok_s(records, 1.0, bounds)


def request_times(records: list[dict]) -> list[list]:
    """Per request of a pass [submitted, first token, last token] in seconds from the pass's start (ms rounded;
    None where missing): the pass's timeline for the JSON."""
    return [[None if r.get(key) is None else round(r[key], 3) for key in ("submitted", "first", "last")]
            for r in records]


def window_tok_s(records: list[dict], duration: float, window: tuple[float, float] = STEADY_WINDOW) -> float | None:
    """The steady-state output rate of one pass: the output tokens emitted within ``[a, b]`` = ``window`` times
    ``duration`` (the middle half by default), divided by ``b - a``; None when the window is empty.

    ``records`` are :func:`drive`'s: per request ``tokens`` (n of them) and the times of its ``first`` and ``last``
    token in seconds from submission. The first token counts where it was emitted (``a <= first <= b``); the other
    n - 1 are taken as spread evenly over ``(first, last]``, so the window holds the share of them that its overlap
    with that interval is. A request with one token, or with ``last <= first``, counts its first token only; one
    without a first token counts nothing. The pass's ramp-up (every request queued at once) and tail (the last
    requests at a small batch) stay outside the window."""
    a, b = window[0] * duration, window[1] * duration
    if b <= a:
        return None
    tokens = 0.0
    for record in records:
        n = len(record.get("tokens") or [])
        if not n or "first" not in record:
            continue
        first, last = record["first"], record.get("last", record["first"])
        tokens += a <= first <= b
        if n > 1 and last > first:
            tokens += (n - 1) * max(0.0, min(last, b) - max(first, a)) / (last - first)
    return tokens / (b - a)


def _spreads(name: str, values: list) -> dict:
    """``name``: (max - min) / median of ``values`` (the upper median for an even count); ``name``_after_first: the
    same over values[1:] (relative to the same median) with three or more values, else None. Both None where a
    value is missing or the median is not positive."""
    median = sorted(values)[len(values) // 2] if values and None not in values else None
    if median is None or median <= 0:
        return {name: None, f"{name}_after_first": None}
    return {name: round((max(values) - min(values)) / median, 4),
            f"{name}_after_first": (round((max(values[1:]) - min(values[1:])) / median, 4)
                                    if len(values) >= 3 else None)}


def pass_rates(passes: list[tuple[float, list[dict]]], out_tokens: int, in_flight: int = 0) -> dict:
    """Per timed pass ((duration, records) each, as :func:`timed_passes` returns them) the output tokens/s of the
    whole pass (``out_tokens`` over its duration) and the steady-state window rate (:func:`pass_window_rate`), each
    with its spread over the passes (:func:`_spreads`: ``pass_spread`` is that of the durations)."""
    durations = [d for d, _ in passes]
    windows = [pass_window_rate(records, d, in_flight) for d, records in passes]
    return {"pass_output_tok_s": [round(out_tokens / d, 1) for d in durations],
            # Without the first pass (where a kernel variant first met can still compile): the run-to-run noise.
            **_spreads("pass_spread", durations),
            "pass_window_tok_s": [None if w is None else round(w, 1) for w in windows],
            **_spreads("pass_window_spread", windows)}


# ------------------------------------------------------------------------------------------ child process
# What an engine holds beside its weights and KV cache (CUDA context, CUDA graphs, LMDeploy's runtime estimate,
# the allocator's slack); an 8-layer Mixtral engine on an H100 held ~3 GiB of it.
TWIN_RESERVE_BYTES = 6 << 30


def checkpoint_bytes(model_dir: str | Path) -> int:
    """The bytes of a checkpoint's weight files (``*.safetensors``, ``*.bin``): about what its engine's weights take
    on the GPU."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in Path(model_dir).glob(pattern))


def twin_cache_fraction(free_bytes: int, weight_bytes: int, wanted: float,
                        reserve_bytes: int = TWIN_RESERVE_BYTES) -> float:
    """The KV-cache fraction (LMDeploy's ``cache_max_entry_count``: of the memory left after the weights and the
    runtime) of an engine that ``free_bytes`` of GPU memory must hold twice over, weights, reserve and cache (the
    second engine of an interleaved pair gets the same block count): at most ``wanted``. Raises ValueError when two
    copies of the weights and reserve alone do not fit."""
    room = free_bytes - 2 * (weight_bytes + reserve_bytes)
    if room <= 0:
        raise ValueError(f"--interleave: two engines of {weight_bytes / 2**30:.1f} GiB of weights (and "
                         f"{reserve_bytes / 2**30:.0f} GiB of runtime each) do not fit in the {free_bytes / 2**30:.1f} "
                         f"GiB free on this card; fewer --layers, or run without --interleave")
    return min(wanted, room / (2 * (free_bytes - weight_bytes - reserve_bytes)))


def run_child(spec: RunSpec) -> None:
    """One configuration: start lmdeploy.pipeline, warm up, run the workload, write the result JSON."""
    import asyncio
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if spec.vendor:
        os.environ["DLINFER_VENDOR"] = spec.vendor
    import torch
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

    if spec.backend == "dlinfer":
        import dlinfer.framework.lmdeploy_ext as lmdeploy_ext

        lmdeploy_ext.apply()
    forward_log = ForwardLog()
    forward_log_installed = spec.profile and forward_log.install()  # before the engine binds its do_prefill

    cache_fraction = spec.cache_max_entry_count
    if spec.twin_room and not spec.num_gpu_blocks and torch.cuda.is_available():
        cache_fraction = twin_cache_fraction(torch.cuda.mem_get_info()[0], checkpoint_bytes(spec.model_dir),
                                             cache_fraction)
        if cache_fraction < spec.cache_max_entry_count:
            print(f"[cache] {spec.name}: KV cache {cache_fraction:.3f} of the free memory (not "
                  f"{spec.cache_max_entry_count:g}): room for the second engine of the pair", flush=True)
    config = PytorchEngineConfig(tp=spec.tp, eager_mode=spec.mode == "eager", max_batch_size=spec.max_batch_size,
                                 cache_max_entry_count=cache_fraction, block_size=spec.block_size,
                                 session_len=spec.max_prompt + spec.new_tokens + 64, quant_policy=spec.kv_quant,
                                 num_gpu_blocks=spec.num_gpu_blocks,
                                 # LMDeploy picks ray for tp > 1 on stock CUDA; its own mp executor needs no ray
                                 distributed_executor_backend="mp" if spec.tp > 1 else None)
    t0 = time.perf_counter()
    pipe = pipeline(spec.model_dir, backend_config=config, log_level="WARNING")
    startup_s = time.perf_counter() - t0

    gen = GenerationConfig(max_new_tokens=spec.new_tokens, do_sample=False, ignore_eos=True)

    in_flight = stream_in_flight(spec)

    def run(batch):
        lengths = request_lengths(len(batch), spec.new_tokens, in_flight, spec.compare_tokens) if in_flight else None
        coro = drive(pipe.async_engine, pipe.session_mgr.get, batch, gen, in_flight, lengths, spec.stream_response)
        return asyncio.run_coroutine_threadsafe(coro, pipe.internal_thread.loop).result()

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_monitor import GpuMonitor

    compiles = CompileLog()
    compiles.install()
    control = PassControl(spec.control_dir, spec.control_timeout) if spec.control_dir else None
    monitor = GpuMonitor(device_index=0)  # the card's clocks, power and throttling per pass (None on a CPU)
    ready = dict(startup_s=round(startup_s, 2), cache_fraction=round(cache_fraction, 4), **engine_cache(pipe))
    prompts, warm, passes, pass_compiles = warm_up_and_time(run, spec, compiles, monitor, control, ready=ready)
    requests = len(prompts)
    timed_compiles = CompileLog.total(pass_compiles)
    duration, records = sorted(passes, key=lambda p: p[0])[len(passes) // 2]
    if any(r.get("error") for r in records):
        raise RuntimeError(f"{spec.name}: some requests failed")
    out_tokens = sum(len(r["tokens"]) for r in records)
    expected = sum(request_lengths(requests, spec.new_tokens, in_flight, spec.compare_tokens))
    if out_tokens != expected:
        raise RuntimeError(f"{spec.name}: {out_tokens} tokens generated, expected {expected}")
    in_tokens = sum(len(p) for p in prompts)
    ttft = [r["first"] for r in records if "first" in r]
    tpot = [(r["last"] - r["first"]) / (len(r["tokens"]) - 1) for r in records
            if len(r["tokens"]) > 1 and "first" in r]  # none with --no-stream
    served = _ops_served() if spec.backend == "dlinfer" and spec.tp == 1 else {}
    profile, profile_summary, forwards = None, None, None
    if spec.profile:
        if forward_log_installed:
            forward_log.start()
        try:
            profile, profile_summary = _profile_kernels(run, prompts)
        except Exception as exc:  # noqa: BLE001 - a profile is a detail, never a reason to lose the run
            profile = [{"kernel": f"profiler failed: {type(exc).__name__}: {exc}", "total_ms": 0, "calls": 0,
                        "share": 0}]
        finally:
            forwards = forward_log.stop() if forward_log_installed else None
    result = {
        "name": spec.name,
        "spec": dataclasses.asdict(spec),
        "startup_s": round(startup_s, 2),
        **{key: warm[key] for key in ("warmup_s", "warmup_full_count_s", "warmup_full_count_requests", "rehearsal")},
        "duration_s": round(duration, 3),
        "timed_requests": requests,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / duration,
        "total_tok_s": (out_tokens + in_tokens) / duration,
        **pass_rates(passes, out_tokens, in_flight),
        "arrival": spec.arrival,
        "in_flight": in_flight or None,
        "gc": GC_TIMED,
        "mean_ttft_s": sum(ttft) / len(ttft) if ttft else None,
        "median_ttft_s": sorted(ttft)[len(ttft) // 2] if ttft else None,
        "p99_ttft_s": sorted(ttft)[min(len(ttft) - 1, (len(ttft) * 99) // 100)] if ttft else None,
        "mean_tpot_s": sum(tpot) / len(tpot) if tpot else None,
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "max_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available()
        else None,
        "ops_served": served,
        "lmdeploy_w4a16_gemm": _stock_w4a16_gemm() if spec.quant == "awq" and spec.backend == "stock" else None,
        "missing_token_ids": sum(t < 0 for r in records for t in r["tokens"]),
        "triton_compiles_warmup": warm["triton_compiles_warmup"],
        "triton_compiles_warmup_full_count": warm["triton_compiles_warmup_full_count"],
        "triton_compiles_timed": timed_compiles,
        "triton_compiles_per_pass": pass_compiles,
        "gpu_per_pass": [monitor.summary(f"pass {k + 1}") for k in range(len(passes))],
        "profile_top_kernels": profile,
        "profile_summary": profile_summary,
        "profile_forwards": forwards,
        "first_tokens": [r["tokens"][:spec.compare_tokens] for r in records],
        # per timed pass, per request: [submitted, first token, last token], seconds from the pass's start
        "pass_request_times": [request_times(recs) for _, recs in passes],
    }
    pipe.close()
    Path(spec.result_path).write_text(json.dumps(result))


def warm_up_and_time(run, spec: RunSpec, compiles, monitor, control=None, ready: dict | None = None):
    """A started engine's passes, ``run`` driving it over a list of prompts: the warm-up pass, the timed request
    count, the warm-up pass at that count when it is larger, ``ready.json`` (--interleave: ``ready`` with the
    count and the warm-ups' record) for the parent's ``control``, the timed passes (phases of ``monitor``) and the
    parent's ``finish``. Returns (the timed prompts, the warm-ups' record as the result JSON holds it, the passes,
    the compilations of each)."""

    warm_tokens = [0]  # output tokens of the last warm-up pass

    def untimed_pass(prompts) -> tuple[float, dict, list[dict]]:  # seconds, Triton compilations, records
        t0 = time.perf_counter()
        _, records = run(prompts)
        return time.perf_counter() - t0, compiles.take(), records

    def warm_pass(count: int) -> tuple[float, dict]:  # the warm-up's prompts (not the timed ones), ``count`` of them
        seconds, jit, records = untimed_pass(
            workload(count, spec.min_prompt, spec.max_prompt, spec.seed + 1, spec.vocab_limit))
        warm_tokens[0] = sum(len(r.get("tokens") or []) for r in records)
        return seconds, jit

    # Warm-up: a whole pass of a workload like the timed one (other prompts, same lengths' distribution), so
    # that Triton compiles the kernel variants every batch size and context length needs (both backends' kernels
    # specialize on them) before the timing, not during it. --warmup short: the first 16 prompts only.
    warm_count = spec.requests if spec.warmup == "full" else min(16, spec.requests)
    warmup_s, warmup_compiles = warm_pass(warm_count)
    # The timed pass, --timed-passes times over the same prompts: their spread is the run-to-run noise of the
    # throughput (the median pass is reported). --pass-seconds: as many prompts as make a pass last about that
    # long at the warm-up's rate (the first run of a model decides; the parent hands its count to the others, so
    # every run of a model times the same prompts). workload() draws prompt after prompt: a longer list starts
    # with the same prompts, the oracle's among them.
    # --arrival stream: --pass-seconds sizes the steady window (the fill and what finishes in that time).
    in_flight = stream_in_flight(spec)
    busy_s = warmup_s - warmup_compiles["seconds"]
    requests = spec.timed_requests or (
        stream_request_count(in_flight, warm_tokens[0], busy_s, spec.pass_seconds, spec.new_tokens, spec.requests)
        if in_flight else timed_request_count(spec.requests, warm_count, busy_s, spec.pass_seconds))
    warm = {"warmup_s": round(warmup_s, 2), "triton_compiles_warmup": warmup_compiles,
            "warmup_full_count_requests": None, "warmup_full_count_s": None,
            "triton_compiles_warmup_full_count": None, "rehearsal": False}
    prompts = workload(requests, spec.min_prompt, spec.max_prompt, spec.seed, spec.vocab_limit)
    if spec.warmup == "full" and (spec.rehearsal or requests > warm_count):
        # The engine captures a CUDA graph (and compiles its input kernels) for each batch it first meets, and
        # its kernels specialize on sizes: one more untimed pass at exactly the timed count, so that this happens
        # here, not in the timed passes. A rehearsal (the timed prompts themselves) meets the very batches the
        # timed passes will; otherwise the warm-up's prompts at that count, only where it exceeds the warm-up's.
        seconds, full_compiles = untimed_pass(prompts)[:2] if spec.rehearsal else warm_pass(requests)
        warm.update(warmup_full_count_requests=requests, warmup_full_count_s=round(seconds, 2),
                    triton_compiles_warmup_full_count=full_compiles, rehearsal=spec.rehearsal)
    if control:  # --interleave: the parent starts the other engine (with this cache) and then calls each pass
        control.write("ready.json", dict(ready or {}, timed_requests=requests, **warm))
    monitor.start()
    passes, pass_compiles = timed_passes(run, prompts, spec.timed_passes, compiles, monitor, control, in_flight,
                                         most=spec.max_timed_passes)
    monitor.stop()
    if control:  # nothing of this run (a profile, the engine's shutdown) while the other engine is timed
        control.wait("finish")
    return prompts, warm, passes, pass_compiles


def timed_passes(run, prompts: list[list[int]], count: int, compiles, monitor, control=None, in_flight: int = 0,
                 most: int = 0):
    """``count`` timed passes of ``run`` over ``prompts`` (at least one): per pass (duration, records) and the
    Triton compilations it saw (``compiles.take()``), each pass a phase of the GPU ``monitor``. Python's garbage
    collector runs before each pass and is off during it (``GC_TIMED``: no collection pause in a timed pass), on
    again after it whatever happens. With ``control`` (--interleave) each pass waits for the parent's ``go_<k>`` and
    reports ``pass_<k>.json`` (with the pass's steady-state window rate, :func:`pass_window_rate`; ``in_flight``:
    that of an --arrival stream pass); with ``most`` > ``count`` (--until-ci) passes past ``count`` run while the
    parent sends ``go_<k>``, up to ``most``, and end at its ``stop``."""
    passes, pass_compiles = [], []
    for k in range(1, max(1, count, most if control else 0) + 1):
        if control and k > count:
            if control.wait_any(f"go_{k}", "stop") == "stop":
                break
        elif control:
            control.wait(f"go_{k}")
        gc.collect()
        gc.disable()
        try:
            with monitor.phase(f"pass {k}"):
                duration, records = run(prompts)
        finally:
            gc.enable()
        passes.append((duration, records))
        pass_compiles.append(compiles.take())
        if control:
            out_tokens = sum(len(r.get("tokens") or []) for r in records)
            control.write(f"pass_{k}.json", {"k": k, "duration_s": duration, "output_tokens": out_tokens,
                                             "output_tok_s": out_tokens / duration if duration > 0 else None,
                                             "window_tok_s": pass_window_rate(records, duration, in_flight),
                                             "triton_compiles": pass_compiles[-1],
                                             "gpu": monitor.summary(f"pass {k}")})
    return passes, pass_compiles


def stream_in_flight(spec: RunSpec) -> int:
    """Requests kept in flight by a --arrival stream run (``in_flight``, default ``max_batch_size``); 0: a burst."""
    if spec.arrival != "stream":
        return 0
    return spec.in_flight if spec.in_flight > 0 else spec.max_batch_size


def engine_cache(pipe) -> dict:
    """The KV cache LMDeploy's PyTorch engine allocated: the Engine (``pipe.async_engine.engine``) keeps its
    CacheConfig as ``cache_config``, whose ``num_gpu_blocks`` the executor filled in at start from the free memory
    (``ExecutorBase.update_configs``) unless PytorchEngineConfig set it; the Engine copies the count into its
    engine config, ``pipe.async_engine.backend_config`` (the fallback, for an engine in another process)."""
    engine = pipe.async_engine
    cache = getattr(engine.engine, "cache_config", None) or engine.backend_config
    return {key: getattr(cache, key, None) for key in ("num_gpu_blocks", "block_size", "max_prefill_token_num")}


def write_json_atomic(path: Path, data) -> None:
    """``data`` as JSON at ``path``, whole or not at all for a reader polling for it (a temporary name, then a
    rename within the folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class PassControl:
    """The child's end of --interleave's channel, a folder the parent made: the child writes ``ready.json`` and
    ``pass_<k>.json``; it waits for the parent's ``go_<k>`` and ``finish`` (polled every 20 ms), at most
    ``timeout`` seconds each, and gives up at once when the parent is gone."""

    POLL_S = 0.02

    def __init__(self, folder: str, timeout: float):
        self.folder = Path(folder)
        self.timeout = timeout if timeout > 0 else 3600.0
        self.parent = os.getppid()

    def write(self, name: str, data) -> None:
        write_json_atomic(self.folder / name, data)

    def wait(self, name: str) -> None:
        self.wait_any(name)

    def wait_any(self, *names: str) -> str:
        """The first of ``names`` the parent has written (the earliest named when several have)."""
        end = time.monotonic() + self.timeout
        while True:
            for name in names:
                if (self.folder / name).exists():
                    return name
            if os.getppid() != self.parent:
                raise SystemExit(f"the parent process is gone while this child waits for {' or '.join(names)}")
            if time.monotonic() > end:
                raise TimeoutError(f"no {' or '.join(names)} from the parent within {self.timeout:.0f} s")
            time.sleep(self.POLL_S)


class CompileLog:
    """Triton compilations in this process (cache misses of a kernel's in-memory cache: a full compile, or a load
    from the on-disk cache), through Triton's JIT hooks: how many, which kernels and the seconds they held the
    host, per phase of a run."""

    def __init__(self):
        self.events: list[tuple[str, float]] = []
        self._t0 = 0.0

    def install(self) -> None:
        try:
            from triton import knobs
        except ImportError:  # no Triton: nothing compiles
            return
        knobs.runtime.jit_cache_hook = self._before
        knobs.runtime.jit_post_compile_hook = self._after

    def _before(self, **kwargs) -> bool:
        self._t0 = time.perf_counter()
        return False  # False: go on and compile

    def _after(self, **kwargs) -> bool:
        fn = kwargs.get("fn")
        self.events.append((getattr(fn, "name", "?"), time.perf_counter() - self._t0))
        return False

    @staticmethod
    def total(takes: list[dict]) -> dict:
        """The sum of several :meth:`take` results (count, seconds, count per kernel)."""
        per_kernel: dict[str, int] = {}
        for t in takes:
            for name, n in t["per_kernel"].items():
                per_kernel[name] = per_kernel.get(name, 0) + n
        return {"count": sum(t["count"] for t in takes), "seconds": round(sum(t["seconds"] for t in takes), 2),
                "per_kernel": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))}

    def take(self) -> dict:
        """The compilations since the last call: count, seconds, and count per kernel."""
        events, self.events = self.events, []
        per_kernel: dict[str, int] = {}
        for name, _ in events:
            per_kernel[name] = per_kernel.get(name, 0) + 1
        return {"count": len(events), "seconds": round(sum(t for _, t in events), 2),
                "per_kernel": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))}


def _profile_kernels(run, prompts: list[list[int]], top: int = 25) -> tuple[list[dict], dict]:
    """GPU kernels by total time over one more pass of ``prompts`` (torch.profiler/CUPTI sees every kernel of
    the process, the engine thread's and CUDA-graph replays' included): what an op costs, to name it. Also the
    pass's wall time, the sum of all its kernels' times and the time the GPU was busy (the union of the kernels'
    intervals, so that kernels overlapping on two streams count once): ``busy_share`` = busy / wall is how much
    of the pass a faster kernel can win back; the rest is the GPU waiting for the host."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    # CUDA activity only: tracing the host's ops too would slow the engine's loop and so lengthen the wall time;
    # without a GPU (the tests) the host's ops are the only activity there is to trace
    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        start = time.perf_counter()
        run(prompts)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - start
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us:
            rows.append({"kernel": event.key[:160], "total_ms": round(device_us / 1e3, 3), "calls": event.count})
    rows.sort(key=lambda r: -r["total_ms"])
    total = sum(r["total_ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = round(r["total_ms"] / total, 4)
    intervals = [(e.time_range.start, e.time_range.end) for e in prof.events()
                 if str(getattr(e, "device_type", "")).endswith("CUDA") and e.time_range.end > e.time_range.start]
    busy_ms = union_length(intervals) / 1e3
    summary = {"wall_s": round(wall_s, 3), "kernel_ms": round(sum(r["total_ms"] for r in rows), 1),
               "busy_ms": round(busy_ms, 1), "busy_share": round(busy_ms / 1e3 / wall_s, 4) if wall_s else None,
               "kernel_launches": sum(r["calls"] for r in rows)}
    return rows[:top], summary


class ForwardLog:
    """Each forward LMDeploy's scheduler makes during the profiled pass: prefill or decode, sequences and tokens, and
    why ``do_prefill_default`` chose prefill (waiting prompts' tokens over the prefill budget, too few sequences
    running, too many decode steps in a row, a long prompt's next chunk). The engine runs in this process at tp=1;
    ``install`` patches LMDeploy's inputs maker before the engine is built and returns False (nothing is recorded)
    where its internals are not the ones this reads."""

    def __init__(self):
        self.rows: list[dict] | None = None
        self._decision: dict | None = None

    def install(self) -> bool:
        try:
            from lmdeploy.pytorch.engine.inputs_maker import InputsMakerAsync
        except ImportError:
            return False
        make, decide = getattr(InputsMakerAsync, "_make_forward_inputs", None), getattr(
            InputsMakerAsync, "do_prefill_default", None)
        if make is None or decide is None:
            return False
        log = self

        def do_prefill_default(maker):
            prefill = decide(maker)
            if log.rows is not None:
                log._decision = log._why(maker, prefill)
            return prefill

        def _make_forward_inputs(maker, prefill, enable_empty=False):
            out = make(maker, prefill, enable_empty)
            if log.rows is not None and out is not None:
                inputs = out.get("inputs")
                decoding = bool(getattr(inputs, "is_decoding", not prefill)) if inputs is not None else not prefill
                ids = getattr(inputs, "input_ids", None)
                log.rows.append(dict(t=time.perf_counter(), prefill=not decoding,
                                     seqs=len(out.get("running") or []),
                                     tokens=int(ids.numel()) if ids is not None else None,
                                     **(log._decision or {})))
                log._decision = None
            return out

        InputsMakerAsync.do_prefill_default = do_prefill_default
        InputsMakerAsync._make_forward_inputs = _make_forward_inputs
        return True

    @staticmethod
    def _why(maker, prefill: bool) -> dict:
        """The scheduler's state at a do_prefill decision, read after it (a prefill decision changes none of it) and
        the reason in ``do_prefill_default``'s order of checks."""
        try:
            sched, config = maker.scheduler, maker.config
            waiting_tokens = sum(seq.num_token_ids for seq in sched.waiting)
            active = sched.num_ready() + sched.num_running()
            pending_chunk = getattr(maker, "_has_pending_last_long_context_chunk", lambda: False)()
            if not prefill:
                reason = "decode"
            elif pending_chunk:
                reason = "long_context_chunk"
            elif maker._decode_count >= config.prefill_interval:
                reason = "interval"
            elif waiting_tokens >= config.max_prefill_token_num:
                reason = "token_budget"
            elif active < config.max_batches * 0.5:
                reason = "few_running"
            else:
                reason = "other"
            return dict(reason=reason, waiting=sched.num_waiting(), waiting_tokens=waiting_tokens, active=active)
        except Exception:  # noqa: BLE001 - a diagnostic: another LMDeploy's scheduler simply goes unexplained
            return {}

    def start(self) -> None:
        self.rows, self._decision = [], None

    def stop(self) -> dict | None:
        rows, self.rows = self.rows, None
        return summarize_forwards(rows) if rows else None


def summarize_forwards(rows: list[dict]) -> dict:
    """Forward counts per kind, tokens and sequences per prefill forward, and the reasons prefill was chosen."""
    def stats(values):
        values = sorted(v for v in values if v is not None)
        if not values:
            return None
        return dict(mean=round(sum(values) / len(values), 1), min=values[0], median=values[len(values) // 2],
                    max=values[-1])

    pre = [r for r in rows if r["prefill"]]
    dec = [r for r in rows if not r["prefill"]]
    reasons: dict[str, int] = {}
    for r in pre:
        reasons[r.get("reason", "unknown")] = reasons.get(r.get("reason", "unknown"), 0) + 1
    t0 = rows[0]["t"]
    return dict(prefill_forwards=len(pre), decode_forwards=len(dec),
                prefill_tokens=stats([r["tokens"] for r in pre]), prefill_seqs=stats([r["seqs"] for r in pre]),
                decode_seqs=stats([r["seqs"] for r in dec]), prefill_reasons=reasons,
                # the first prefills: how many prompts were waiting, and when (s from the first forward)
                first_prefills=[dict(t=round(r["t"] - t0, 3), seqs=r["seqs"], tokens=r["tokens"],
                                     waiting=r.get("waiting"), active=r.get("active"), reason=r.get("reason"))
                                for r in pre[:12]])


def forwards_line(name: str, summary: dict) -> str:
    """One log line for ``summarize_forwards``' result."""
    tok, seqs = summary.get("prefill_tokens") or {}, summary.get("prefill_seqs") or {}
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["prefill_reasons"].items(), key=lambda kv: -kv[1]))
    return (f"[sched] {name}: {summary['prefill_forwards']} prefill forwards (tokens mean {tok.get('mean')}, "
            f"max {tok.get('max')}; sequences mean {seqs.get('mean')}), {summary['decode_forwards']} decode forwards "
            f"(sequences mean {(summary.get('decode_seqs') or {}).get('mean')}); prefill chosen for: {reasons}")


def union_length(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals (overlaps counted once)."""
    covered, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        covered += end - max(start, reach)
        reach = end
    return covered


def _stock_w4a16_gemm() -> str:
    """Which GEMM stock LMDeploy builds for AWQ layers on CUDA: TurboMind's when its extension is built (and the
    GPU is sm_90, group 128, float16), else its Triton ``awq_linear`` (LMDEPLOY_W4A16_GEMM_BACKEND picks)."""
    try:
        from lmdeploy import turbomind
        from lmdeploy.pytorch import envs

        built = turbomind.is_available()
        return (f"LMDEPLOY_W4A16_GEMM_BACKEND={envs.w4a16_gemm_backend}; TurboMind extension "
                f"{'built: its GEMM serves sm_90, group 128, float16' if built else 'not built: Triton awq_linear'}")
    except Exception as exc:  # noqa: BLE001 - a report detail
        return f"unknown ({type(exc).__name__}: {exc})"


def _ops_served() -> dict:
    """Which vendor served each dlinfer op in this process (from the registry's selection cache)."""
    try:
        from dlinfer.vendor import registry

        served: dict[str, set] = {}
        for call, vendor in registry.selections().items():
            served.setdefault(call.op, set()).add(f"{vendor}[{call.device_type},{str(call.dtype)[6:]}]")
        return {op: sorted(v) for op, v in sorted(served.items())}
    except Exception as exc:  # noqa: BLE001 - a report detail, never a reason to lose the run
        return {"error": f"{type(exc).__name__}: {exc}"}


# ------------------------------------------------------------------------------------------------- parent
def build_model(key: str, layers: int, model_dir: Path, log) -> Path:
    shape, desc, _, full = MODELS[key]
    path = model_dir / f"{key}_{layers}l"
    marker = path / "dlinfer_tiny_model.json"
    if marker.exists():
        log(f"[build] {desc}, {layers} of {full} layers: reusing {path}")
        return path
    log(f"[build] {desc}, {layers} of {full} layers, random bf16 weights on the GPU -> {path}")
    code = ("import sys, torch; from dlinfer.testing.tiny_models import build_tiny_model; "
            "build_tiny_model(sys.argv[1], sys.argv[2], dtype=torch.bfloat16, device='cuda', "
            "num_hidden_layers=int(sys.argv[3]))")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(path), shape, str(layers)], check=True, cwd=ROOT)
    log(f"[build] done in {time.perf_counter() - t0:.0f} s")
    return path


def quantized_model(src: Path, quant: str, log) -> Path:
    """``src`` (a float model directory of build_model) quantized with ``dlinfer.testing.quantize`` (AWQ: group
    AWQ_GROUP_SIZE, float16; W8A8: int8 weights with float32 per-channel scales, the rest in bfloat16, as
    ``lmdeploy lite smooth_quant`` writes a bfloat16 model), on the GPU when there is one; cached beside ``src``
    (a marker written last: a cut build is redone)."""
    import shutil

    path = src.parent / f"{src.name}_{quant}"
    marker = path / "dlinfer_quantized.json"
    if marker.exists():
        log(f"[build] {quant}: reusing {path}")
        return path
    partial = path.parent / f"{path.name}.partial"
    for stale in (path, partial):
        shutil.rmtree(stale, ignore_errors=True)
    log(f"[build] {quant}: quantizing {src} -> {path}")
    code = ("import json, sys, time, torch; from dlinfer.testing.quantize import quantize_model; "
            "t0 = time.perf_counter(); device = 'cuda' if torch.cuda.is_available() else 'cpu'; "
            "stats = quantize_model(sys.argv[1], sys.argv[2], sys.argv[3], group_size=int(sys.argv[4]), "
            "device=device); print('QUANTIZED ' + json.dumps(dict(stats, device=device, "
            "seconds=round(time.perf_counter() - t0, 1))))")
    done = subprocess.run([sys.executable, "-c", code, str(src), str(partial), QUANTS[quant][0], str(AWQ_GROUP_SIZE)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0 or "QUANTIZED " not in done.stdout:
        raise RuntimeError(f"quantizing {src} ({quant}) failed, exit {done.returncode}: {done.stderr[-3000:]}")
    stats = json.loads(done.stdout.split("QUANTIZED ", 1)[1].splitlines()[0])
    stats.update(format=QUANTS[quant][0], group_size=AWQ_GROUP_SIZE if quant == "awq" else None)
    (partial / marker.name).write_text(json.dumps(stats))
    partial.rename(path)
    log(f"[build] {quant}: done in {stats['seconds']:.0f} s on {stats['device']} (max relative weight error "
        f"{stats['max_rel_weight_error']:.4f})")
    return path


def run_isolated(command: list[str], timeout: float) -> tuple[int, str]:
    """Run ``command`` in its own process group; past ``timeout`` kill the whole group (an engine's spawned
    tensor-parallel workers included, so they free their GPU before the next run). Returns (exit code, output)."""
    import signal

    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RuntimeError(f"timed out after {timeout:.0f} s: {(output or '')[-2000:]}") from None
    finally:
        try:  # workers a finished child left behind
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, output or ""


# ------------------------------------------------------------------------------- --interleave: the parent's end
def start_child(command: list[str], log_path: Path) -> subprocess.Popen:
    """``command`` in its own process group (killed whole, as run_isolated does), its output to ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


class ChildProcess:
    """One child of an interleaved pair, seen from the parent: its process (group), its folder of the channel
    (see PassControl) and its output log there. Every wait ends at an absolute ``deadline`` (time.monotonic())
    or as soon as the child has exited without the awaited file."""

    POLL_S = 0.02

    def __init__(self, name: str, command: list[str], folder: Path):
        self.name, self.folder = name, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "output.log"
        self.proc = start_child(command, self.log_path)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def send(self, name: str) -> None:
        write_json_atomic(self.folder / name, {})

    def wait_for(self, name: str, deadline: float, what: str) -> dict:
        path = self.folder / name
        while True:
            code = self.proc.poll()
            if path.exists():  # looked at after poll(): a file written just before the exit still counts
                return json.loads(path.read_text())
            if code is not None:
                raise RuntimeError(f"{self.name} exited (code {code}) before {what}: {self.output()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {what} within the pair's budget (timed out; killed): "
                                   f"{self.output()[-2000:]}")
            time.sleep(self.POLL_S)

    def finish(self, deadline: float) -> int:
        """Let the child write its result and exit; its exit code."""
        self.send("finish")
        try:
            return self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{self.name}: did not exit within the pair's budget after its last pass (timed "
                               f"out; killed): {self.output()[-2000:]}") from None

    def kill(self) -> None:
        """The whole process group (the engine's workers included), the child reaped."""
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def interleaved_order(passes: int) -> list[tuple[int, str]]:
    """(pass, backend) in the order they run: stock, dlinfer for odd passes, dlinfer, stock for even ones (ABBA)."""
    return [(k, backend) for k in range(1, passes + 1)
            for backend in (("stock", "dlinfer") if k % 2 else ("dlinfer", "stock"))]


# Two-sided 95 % quantiles of Student's t by degrees of freedom (larger counts: the next smaller entry's, a
# slightly wider interval; from 30 on, 2.042).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def ratio_interval(ratios: list[float]) -> tuple[float, float, float] | None:
    """The geometric mean of the per-pass ratios and the bounds of its 95 % confidence interval (Student's t over the
    log-ratios, the passes taken as independent samples); None for fewer than three passes (two give a t of 12.7:
    no interval worth printing) or a ratio that is not positive. The spread (max - min) says how far one pass pair
    can be off; this says how well all of them together pin the ratio."""
    if len(ratios) < 3 or min(ratios) <= 0:
        return None
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    df = len(logs) - 1
    t = _T95[max(k for k in _T95 if k <= df)]
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def pass_ratios(stock: list[float], mine: list[float]) -> dict:
    """Per pass the ratio dlinfer / stock of output tokens/s (pass k of each, adjacent in time), their median (the
    ratio reported), min, max and spread (max - min) / median (the noise of the ratio), and from three passes on
    their geometric mean and its 95 % confidence interval's bounds (:func:`ratio_interval`)."""
    ratios = [m / s for s, m in zip(stock, mine)]
    median = statistics.median(ratios)
    out = {"pass_ratios": [round(r, 5) for r in ratios], "ratio_median": round(median, 5),
           "ratio_min": round(min(ratios), 5), "ratio_max": round(max(ratios), 5),
           "ratio_spread": round((max(ratios) - min(ratios)) / median, 5)}
    interval = ratio_interval(ratios)
    if interval is not None:
        out["ratio_geomean"], out["ratio_ci95"] = round(interval[0], 5), [round(b, 5) for b in interval[1:]]
    return out


def window_ratios(stock: list, mine: list) -> dict:
    """:func:`pass_ratios` of the passes' steady-state window rates (``window_tok_s``), its keys prefixed with
    ``window_`` (``window_pass_ratios``, ``window_ratio_median``, ...); empty where a pass has no positive window
    rate on either engine."""
    if not stock or not all(isinstance(x, (int, float)) and x > 0 for x in stock + mine):
        return {}
    return {f"window_{key}": value for key, value in pass_ratios(stock, mine).items()}


def ratio_line(label: str, rec: dict, prefix: str = "") -> str:
    """One line for the interleaved engines ``label`` names: the ratio (the median of the per-pass ratios), the
    per-pass ratios and their spread. Shared by this script and vllm_gpu.py. ``prefix`` "window_": the same line of
    the steady-state window rates (:func:`window_ratios`)."""
    what = f"{label} interleaved" + (f", {WINDOW_TEXT}" if prefix else "")
    ratios = rec.get(f"{prefix}pass_ratios")
    if not ratios:
        return f"{what}: no pass ran on both engines: no ratio"
    spread = (f"spread {100 * rec[f'{prefix}ratio_spread']:.1f} %" if len(ratios) > 1 else
              "one pass pair: no spread")
    if rec.get(f"{prefix}ratio_ci95") is not None:
        low, high = rec[f"{prefix}ratio_ci95"]
        spread += f"; geometric mean {rec[f'{prefix}ratio_geomean']:.3f}, 95 % interval {low:.3f}-{high:.3f}"
    return (f"{what}: dlinfer / stock output tok/s ratio {rec[f'{prefix}ratio_median']:.3f} "
            f"(passes: {' '.join(f'{r:.3f}' for r in ratios)}; {spread})")


def ratio_warning(label: str, rec: dict, remedy: str) -> str | None:
    """A ``[warn]`` line when the per-pass ratios spread more than 2 % (the noise bar of the speed goals), else None."""
    if (rec.get("ratio_spread") or 0) <= 0.02:
        return None
    return (f"[warn] {label} interleaved: the per-pass ratios spread {100 * rec['ratio_spread']:.1f} % (> 2 %): the "
            f"ratio is known no better than that; {remedy} for a tighter one")


_REMEDY = "more --timed-passes (or --until-ci) or a longer --pass-seconds"
# --until-ci: seconds of the command's deadline kept for the float32 oracle after the pairs (24 prompts of a 12-layer
# Qwen3-30B-A3B shape took 43 s on an H100, loading included)
ORACLE_RESERVE_S = 120.0

_STOPPED = {"interval": "the 95 % interval reached the target", "max passes": "--max-timed-passes reached",
            "deadline": "two more passes would not fit the time left"}


def until_ci_line(label: str, rec: dict) -> str:
    """The --until-ci outcome of a pair (its summary's ``until_ci``) in words."""
    half = rec.get("half_width")
    known = "no interval" if half is None else f"the ratio known to +-{100 * half:.2f} %"
    return (f"{label} interleaved, --until-ci {100 * rec['target']:g} %: {rec['passes']} passes each, {known} "
            f"(95 % interval); stopped: {_STOPPED.get(rec.get('stopped'), rec.get('stopped'))}")


def pair_lines(label: str, pair: dict) -> list[str]:
    """The lines of an interleaved pair's summary: its ratio, the --until-ci outcome, a warning for a per-pass spread
    over 2 % (not once --until-ci reached its interval: the spread is then the single pass's noise, the interval the
    ratio's), the steady-state window's ratio."""
    lines = [ratio_line(label, pair)]
    if pair.get("until_ci"):
        lines.append(until_ci_line(label, pair["until_ci"]))
    warning = ratio_warning(label, pair, _REMEDY)
    if warning and (pair.get("until_ci") or {}).get("stopped") != "interval":
        lines.append(warning)
    if pair.get("window_pass_ratios"):
        lines.append(ratio_line(label, pair, "window_"))
    return lines


def warmup_kind(workload: dict) -> str:
    """The WARMUPS key of a report's workload (reports written before the rehearsal existed have none)."""
    kind = workload.get("warmup", "short")
    return f"{kind}+rehearsal" if kind == "full" and workload.get("rehearsal") else kind


def warmup_text(rec: dict) -> str:
    """The warm-up of a run (its result, or its child's ``ready.json``) in words: the warm-up pass's seconds and,
    when one ran, the warm-up pass at the timed request count with its Triton compilations."""
    text = f"warm-up {rec.get('warmup_s') or 0:.0f} s"
    if rec.get("warmup_full_count_s") is not None:
        jit = rec.get("triton_compiles_warmup_full_count") or {}
        what = "rehearsal of the timed prompts" if rec.get("rehearsal") else "warm-up at the timed count"
        text += (f", {what} ({rec.get('warmup_full_count_requests')} requests) "
                 f"{rec['warmup_full_count_s']:.1f} s with {jit.get('count', '?')} Triton compiles "
                 f"({jit.get('seconds', '?')} s)")
    return text


def ready_line(name: str, ready: dict) -> str:
    """The ``[ready]`` line of an interleaved child from its ``ready.json``."""
    return (f"[ready] {name}: {ready.get('num_gpu_blocks')} KV-cache blocks, {ready.get('timed_requests')} requests "
            f"per timed pass (startup {ready.get('startup_s') or 0:.0f} s, {warmup_text(ready)})")


def ci_half_width(ratios: list[float]) -> float | None:
    """The relative half-width of the 95 % interval of :func:`ratio_interval` (0.01: the ratio known to +-1 %), or
    None where there is no interval yet."""
    interval = ratio_interval(ratios)
    return None if interval is None else interval[2] / interval[0] - 1.0


def more_passes(ratios: list[float], until_ci: float, passes: int, max_passes: int, pair_s: float,
                seconds_left: float) -> str | None:
    """Why an --until-ci pair stops after ``passes`` timed passes, or None to run two more (one of each engine's
    passes per pair of passes, in the ABBA order): ``"interval"`` once the 95 % interval's half-width is at most
    ``until_ci`` (relative), ``"max passes"`` at ``max_passes``, ``"deadline"`` when ``seconds_left`` (before the
    extension must end) would not hold two more passes of each engine at ``pair_s`` seconds (the longest pair of
    one stock and one dlinfer pass so far, gaps included) and as long again for the children to finish."""
    half = ci_half_width(ratios)
    if half is not None and half <= until_ci:
        return "interval"
    if passes + 2 > max_passes:
        return "max passes"
    if seconds_left < 3 * pair_s:
        return "deadline"
    return None


def run_interleaved(stock: RunSpec, mine: RunSpec, budget_s: float, log, pass_gap: float = 0.0,
                    until_ci: float = 0.0, max_passes: int = 0, extend_s: float | None = None
                    ) -> tuple[dict, dict]:
    """One pair of --interleave (see the module docstring): the stock child (``stock``) started and warmed up,
    then the dlinfer child (``mine``) with the stock engine's KV-cache block count and timed request count, their
    timed passes alternating ABBA, one at a time, then each child let finish, stock first. Returns ({backend:
    (result, output)}, the pair's summary); raises RuntimeError naming the child and what it failed to do when a
    child exits early or misses the budget (``budget_s`` seconds for the whole pair), both process groups killed
    either way. ``until_ci`` > 0 (--until-ci, relative): after ``stock.timed_passes`` passes each, two more at a time
    until :func:`more_passes` says stop (at most ``max_passes``; two more only while they fit the first
    ``extend_s`` seconds of the budget, default all of it); the summary says why it stopped."""
    import shutil
    import tempfile

    start_time = time.monotonic()
    deadline = start_time + budget_s
    extend_end = start_time + (budget_s if extend_s is None else min(budget_s, extend_s))
    adaptive = until_ci > 0 and max_passes > stock.timed_passes
    if adaptive:
        stock = dataclasses.replace(stock, max_timed_passes=max_passes)
        mine = dataclasses.replace(mine, max_timed_passes=max_passes)
    folder = Path(tempfile.mkdtemp(prefix="lmdeploy_e2e_interleave_"))
    children: dict[str, ChildProcess] = {}
    specs = {"stock": dataclasses.replace(stock, control_dir=str(folder / "stock"), control_timeout=budget_s)}
    try:
        def start(backend: str) -> dict:
            spec = specs[backend]
            children[backend] = ChildProcess(spec.name, [sys.executable, __file__, "--child",
                                                         json.dumps(dataclasses.asdict(spec))], folder / backend)
            return children[backend].wait_for("ready.json", deadline, "ready (engine start and warm-up)")

        ready = {"stock": start("stock")}
        log(ready_line(stock.name, ready["stock"]))
        specs["dlinfer"] = dataclasses.replace(mine, control_dir=str(folder / "dlinfer"), control_timeout=budget_s,
                                               timed_requests=ready["stock"]["timed_requests"],
                                               num_gpu_blocks=int(ready["stock"].get("num_gpu_blocks") or 0))
        ready["dlinfer"] = start("dlinfer")
        log(ready_line(mine.name, ready["dlinfer"]))
        for key in ("num_gpu_blocks", "max_prefill_token_num", "timed_requests"):
            if ready["stock"].get(key) != ready["dlinfer"].get(key):
                log(f"[warn] {stock.model} {stock.mode} interleaved: the engines differ in {key} "
                    f"(stock {ready['stock'].get(key)}, dlinfer {ready['dlinfer'].get(key)})")
        got: dict[str, dict[int, dict]] = {"stock": {}, "dlinfer": {}}
        passes_run, stopped = max(1, stock.timed_passes), None
        order = interleaved_order(passes_run)
        t0 = time.monotonic()
        i = 0
        while True:
            for k, backend in order[i:]:
                if i:  # a quiet gap: what the last pass leaves behind (threads, output handling) ends before this one
                    time.sleep(pass_gap)
                i += 1
                start_s = time.monotonic() - t0
                children[backend].send(f"go_{k}")
                got[backend][k] = children[backend].wait_for(f"pass_{k}.json", deadline, f"timed pass {k}")
                got[backend][k].update(start_s=round(start_s, 3), end_s=round(time.monotonic() - t0, 3))
            if not adaptive:
                break
            ratios = [(got["dlinfer"][k].get("output_tok_s") or 0.0) / (got["stock"][k].get("output_tok_s") or 1.0)
                      for k in range(1, passes_run + 1)]
            pair_s = max(sum(got[b][k]["end_s"] - got[b][k]["start_s"] + pass_gap for b in got)
                         for k in range(1, passes_run + 1))
            stopped = more_passes(ratios, until_ci, passes_run, max_passes, pair_s, extend_end - time.monotonic())
            if stopped:
                for child in children.values():
                    child.send("stop")
                break
            passes_run += 2
            order = interleaved_order(passes_run)
        runs = {}
        for backend in ("stock", "dlinfer"):
            code = children[backend].finish(deadline)
            output = children[backend].output()
            if code != 0:
                raise RuntimeError(f"{specs[backend].name} exit {code} after its timed passes: {output[-3000:]}")
            runs[backend] = (json.loads(Path(specs[backend].result_path).read_text()), output)
    finally:
        for child in children.values():
            child.kill()
        shutil.rmtree(folder, ignore_errors=True)
    passes = sorted(got["stock"])
    rates = {key: {backend: [got[backend][k].get(key) for k in passes] for backend in ("stock", "dlinfer")}
             for key in ("output_tok_s", "window_tok_s")}
    summary = {"model": stock.model, "mode": stock.mode, "stock": stock.name, "dlinfer": mine.name,
               "order": [f"{backend} {k}" for k, backend in order],
               **pass_ratios(rates["output_tok_s"]["stock"], rates["output_tok_s"]["dlinfer"]),
               **window_ratios(rates["window_tok_s"]["stock"], rates["window_tok_s"]["dlinfer"]),
               "timed_requests": ready["stock"]["timed_requests"],
               "kv_cache": {backend: {key: ready[backend].get(key) for key in
                                      ("num_gpu_blocks", "block_size", "max_prefill_token_num")}
                            for backend in ready},
               "cache_max_entry_count": ready["stock"].get("cache_fraction", stock.cache_max_entry_count),
               "passes": [{"k": k, "first": "stock" if k % 2 else "dlinfer",
                           **{f"{backend}_{key}": got[backend][k].get(key)
                              for backend in ("stock", "dlinfer")
                              for key in ("output_tok_s", "window_tok_s", "duration_s", "start_s", "end_s")},
                           "triton_compiles": {backend: (got[backend][k].get("triton_compiles") or {}).get("count")
                                               for backend in ("stock", "dlinfer")}}
                          for k in passes]}
    if adaptive:
        half = ci_half_width(summary["pass_ratios"])
        summary["until_ci"] = {"target": until_ci, "max_passes": max_passes, "passes": len(passes),
                               "stopped": stopped, "half_width": None if half is None else round(half, 5)}
    return {backend: runs[backend] for backend in ("stock", "dlinfer")}, summary


def environment() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "argv": sys.argv[1:]}
    for name in ("torch", "triton", "transformers", "lmdeploy", "dlinfer"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception as exc:  # noqa: BLE001
            info[name] = f"unavailable ({type(exc).__name__})"
    info["settings"] = {k: v for k, v in os.environ.items() if k.startswith("DLINFER_")}  # e.g. the MoE layout
    try:  # nvidia-smi rather than torch.cuda: the parent must not hold a CUDA context during the runs
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        info["cards"] = [line.strip() for line in smi.stdout.splitlines() if line.strip()]
    except Exception as exc:  # noqa: BLE001
        info["cards"] = f"unknown ({type(exc).__name__})"
    return info


def quant_refusal(models: list[str], quant: str, kv_quant: int, oracle: bool = True) -> str | None:
    """Why ``--quant`` / ``--kv-quant`` cannot run on ``models`` here (with the float32 oracle when ``oracle``),
    naming the flag; None when they can."""
    if kv_quant == 4:
        return ("--kv-quant 4: dlinfer sends paged prefill over a 4-bit KV cache on CUDA to its reference vendor "
                "(pure torch; the Triton kernel is not yet verified there), so the run would time the reference, "
                "not dlinfer; use --kv-quant 0 or 8")
    if kv_quant not in KV_QUANTS:
        return f"--kv-quant must be one of {sorted(KV_QUANTS)} (LMDeploy's integer quant_policy), got {kv_quant}"
    if quant not in QUANTS:
        return f"--quant must be one of {sorted(QUANTS)}, got {quant!r}"
    moe = [m for m in models if MODELS[m][0] != "llama3-8b"]
    if quant == "awq" and moe:
        return f"--quant awq: LMDeploy builds no AWQ experts, so MoE models ({', '.join(moe)}) cannot be served AWQ"
    if quant == "w8a8" and "qwen3moe" in moe:
        return ("--quant w8a8 with qwen3moe: LMDeploy 0.18 itself cannot run a W8A8 Qwen3-MoE (it builds the "
                "attention's q/k norms as W8A8 norms, whose int8 output its rotary embedding cannot take)")
    if quant == "w8a8" and moe and oracle:
        return (f"--quant w8a8 with {', '.join(moe)}: this script's float32 oracle dequantizes dense checkpoints "
                "only (transformers fuses MoE experts under other names); --oracle-prompts 0 runs it without the "
                "oracle")
    return None


def plan(args) -> list[tuple[str, str, str, int]]:
    """(model, backend, mode, tp) of every run, in order."""
    chosen = [args.model] if isinstance(args.model, str) else args.model
    models = list(MODELS) if "all" in chosen else list(dict.fromkeys(chosen))
    modes = ["eager", "graph"] if args.mode == "both" else [args.mode]
    backends = ["stock", "dlinfer"] if args.backend == "both" else [args.backend]
    runs = []
    for model in models:
        for mode in modes:
            if args.tp > 1:
                if "dlinfer" in backends:
                    runs.append((model, "dlinfer", mode, 1))  # the tp=1 reference for token agreement
                runs += [(model, backend, mode, args.tp) for backend in backends]
            else:
                runs += [(model, backend, mode, 1) for backend in backends]
    return runs


def pairs(results: dict) -> list[tuple[str, str]]:
    """Pairs of runs to compare tokens of: dlinfer vs stock, graph vs eager, tp>1 vs tp=1."""
    out = []
    names = list(results)
    for a in names:
        model, backend, mode, tp = a.split("/")
        for b in names:
            if a >= b:
                continue
            m2, b2, mo2, tp2 = b.split("/")
            if m2 != model:
                continue
            same = (backend == b2) + (mode == mo2) + (tp == tp2)
            if same == 2:
                out.append((a, b))
    return out


def timed_requests(r: dict):
    """Requests per timed pass of one run (results older than --pass-seconds: the spec's --requests)."""
    return r.get("timed_requests") or (r.get("spec") or {}).get("requests", "?")


def pass_spread(r: dict) -> str:
    """The timed passes' spread of one run, in words: (max - min) / median duration over passes 2.. (the noise)
    with three or more passes, over all of them with two; '-' with one."""
    passes = r.get("pass_output_tok_s") or []
    if len(passes) < 2:
        return "-"
    if r.get("pass_spread_after_first") is not None:
        return f"{r['pass_spread_after_first']:.1%} ({len(passes) - 1} passes)"
    return f"{r.get('pass_spread', 0):.1%} ({len(passes)} passes)"


def table(results: dict, agreements: list[dict], oracle: dict | None = None,
          interleaved: list[dict] | None = None) -> str:
    lines = [f"{'run':34} {'out tok/s':>10} {'total tok/s':>12} {'TTFT ms':>9} {'TPOT ms':>9} {'time s':>7} "
             f"{'start s':>7} {'requests':>8}  pass spread"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:34} FAILED: {r['error'][:90]}")
            continue
        lines.append(f"{name:34} {r['output_tok_s']:10.0f} {r['total_tok_s']:12.0f} "
                     f"{1e3 * (r['mean_ttft_s'] or 0):9.1f} {1e3 * (r['mean_tpot_s'] or 0):9.2f} "
                     f"{r['duration_s']:7.1f} {r['startup_s']:7.1f} {timed_requests(r):>8}  "
                     f"{pass_spread(r)}")
    for model in sorted({n.split("/")[0] for n in results}):
        for mode in ("eager", "graph"):
            stock = results.get(f"{model}/stock/{mode}/tp1") or {}
            mine = results.get(f"{model}/dlinfer/{mode}/tp1") or {}
            if "output_tok_s" in stock and "output_tok_s" in mine:
                lines.append(f"{model} {mode}: dlinfer / stock output tok/s = "
                             f"{mine['output_tok_s'] / stock['output_tok_s']:.3f}")
    for pair in interleaved or []:
        lines += pair_lines(f"{pair['model']} {pair['mode']}", pair)
    for agr in agreements:
        lines.append(f"tokens {agr['a']} vs {agr['b']}: first token equal {agr['first_token_equal']:.1%}, "
                     f"first {agr['k']} equal {agr['all_k_equal']:.1%}, mean common prefix "
                     f"{agr['mean_common_prefix']:.1f}/{agr['k']}")
    for model, result in (oracle or {}).items():
        if "error" in result:
            lines.append(f"float32 oracle {model}: FAILED: {result['error'][-200:]}")
            continue
        for name, o in result["runs"].items():
            lines.append(f"float32 oracle, {name}: tokens = fp32 argmax {o['match_rate']:.1%}, first token "
                         f"{o['first_token_match']:.1%}, {o['mismatches']}/{o['positions']} mismatches, deficit "
                         f"median {o['mismatch_deficit_median']:.3f} p90 {o.get('mismatch_deficit_p90', 0.0):.3f} "
                         f"max {o['mismatch_deficit_max']:.3f}, median top-2 gap {o['gap_median']:.3f}")
            if o.get("worst_mismatches"):
                routed = "router_gap" in o["worst_mismatches"][0]
                lines.append(f"  worst mismatches (prompt:position deficit/gap{'/router gap' if routed else ''}): "
                             + ", ".join(f"{w['prompt']}:{w['position']} {w['deficit']:.2f}/{w['gap']:.2f}"
                                         + (f"/{w['router_gap']:.3f}" if routed else "")
                                         for w in o["worst_mismatches"]))
            if o.get("router_gap_median") is not None:
                lines.append(f"  float32 router gap (k-th vs next expert, smallest over layers): median "
                             f"{o['router_gap_median']:.3f} at all positions, "
                             f"{o.get('mismatch_router_gap_median') or 0.0:.3f} at mismatches")
    return "\n".join(lines)


def render(reports: list[dict], out_dir: Path) -> list[Path]:
    """``lmdeploy_e2e.md`` (tables for benchmarks/RESULTS.md) and, with matplotlib, ``lmdeploy_e2e.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["## LMDeploy end to end: stock vs dlinfer", "",
             "Generated by `benchmarks/lmdeploy_e2e.py` from its JSON; do not edit by hand.", ""]
    groups: list[tuple[str, list[tuple[str, float]]]] = []  # one panel per report: (title, bars)
    for report in reports:
        env, wl = report["environment"], report["workload"]
        card = next((r.get("card") for r in report["runs"].values() if r.get("card")), None) or env.get("cards")
        bars: list[tuple[str, float]] = []
        groups.append((f"{str(env['date'])[:16]} {str(card).replace('NVIDIA ', '')[:16]}, warm-up "
                       f"{warmup_kind(wl)}", bars))
        lines += [f"{env['date']} on {card}; torch {env.get('torch')}, triton {env.get('triton')}, "
                  f"lmdeploy {env.get('lmdeploy')}, transformers {env.get('transformers')}. "
                  f"Models: {'; '.join(report['models'].values())}. Workload: {wl['requests']} requests, prompts "
                  f"{wl['min_prompt']}-{wl['max_prompt']} tokens, {wl['new_tokens']} new tokens, greedy; warm-up: "
                  f"{WARMUPS.get(warmup_kind(wl))}. "
                  f"Command: `python benchmarks/lmdeploy_e2e.py {' '.join(env.get('argv', []))}`", "",
                  "| run | output tok/s | total tok/s | mean TTFT (ms) | mean TPOT (ms) | dlinfer / stock | "
                  "Triton compiles while timed | requests, pass spread |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in report["runs"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'][:60]} | | | | | | |")
                continue
            model, backend, mode, tp = name.split("/")
            ratio = ""
            stock = report["runs"].get(f"{model}/stock/{mode}/{tp}", {})
            if backend == "dlinfer" and "output_tok_s" in stock:
                ratio = f"{r['output_tok_s'] / stock['output_tok_s']:.3f}"
            jit = r.get("triton_compiles_timed")
            jit = f"{jit['count']} ({jit['seconds']:.1f} s)" if jit else "not counted"
            lines.append(f"| {name} | {r['output_tok_s']:.0f} | {r['total_tok_s']:.0f} | "
                         f"{1e3 * (r['mean_ttft_s'] or 0):.0f} | {1e3 * (r['mean_tpot_s'] or 0):.2f} | {ratio} | "
                         f"{jit} | {timed_requests(r)}, {pass_spread(r)} |")
            bars.append((name, r["output_tok_s"]))
        if report.get("interleaved"):
            lines += ["", "Interleaved pairs (`--interleave`): both engines alive at once on the card, timed passes "
                      "alternating stock, dlinfer / dlinfer, stock (ABBA); the ratio is the median of the per-pass "
                      "ratios dlinfer / stock of output tokens/s, the spread (max - min) / median their noise; the "
                      "steady-state window ratio is the same of the output tokens emitted in the middle half of each "
                      "pass.", "",
                      "| pair | ratio | per-pass ratios | spread | KV-cache blocks (stock, dlinfer) | "
                      "steady-state window: ratio (spread) |", "|---|---:|---|---:|---:|---:|"]
            for pair in report["interleaved"]:
                blocks = ", ".join(str((pair.get("kv_cache") or {}).get(b, {}).get("num_gpu_blocks"))
                                   for b in ("stock", "dlinfer"))
                window = (f"{pair['window_ratio_median']:.3f} ({100 * pair['window_ratio_spread']:.1f} %)"
                          if pair.get("window_pass_ratios") else "-")
                lines.append(f"| {pair['model']} {pair['mode']} | {pair['ratio_median']:.3f} | "
                             f"{' '.join(f'{r:.3f}' for r in pair['pass_ratios'])} | "
                             f"{100 * pair['ratio_spread']:.1f} % | {blocks} | {window} |")
        if report["agreement"]:
            lines += ["", "| greedy tokens | first token equal | first k equal | mean common prefix |",
                      "|---|---:|---:|---:|"]
            for a in report["agreement"]:
                lines.append(f"| {a['a']} vs {a['b']} | {a['first_token_equal']:.1%} | {a['all_k_equal']:.1%} "
                             f"(k={a['k']}) | {a['mean_common_prefix']:.1f} |")
        for model, result in (report.get("oracle") or {}).items():
            if "error" in result:
                lines += ["", f"float32 oracle for {model}: failed: {result['error'][-200:]}"]
                continue
            what = (report.get("quant") or {}).get("oracle") or "transformers in float32"
            lines += ["", f"Float32 oracle ({model}): {what}, teacher-forced on each run's own "
                      "tokens; a token counts as matching when it is the float32 argmax; the deficit is how far "
                      "(in logits) below the float32 maximum a mismatched token scored.", "",
                      "| tokens of | prompts | = fp32 argmax | first token = fp32 argmax | mismatches | "
                      "deficit median / max | median top-2 gap |", "|---|---:|---:|---:|---:|---:|---:|"]
            for name, o in result["runs"].items():
                lines.append(f"| {name} | {o['prompts']} | {o['match_rate']:.1%} | {o['first_token_match']:.1%} | "
                             f"{o['mismatches']}/{o['positions']} | {o['mismatch_deficit_median']:.3f} / "
                             f"{o['mismatch_deficit_max']:.3f} | {o['gap_median']:.3f} |")
        lines.append("")
    written = [out_dir / "lmdeploy_e2e.md"]
    written[0].write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    groups = [g for g in groups if g[1]]
    if not groups:
        return written
    widths = [max(2, len(bars)) for _, bars in groups]
    fig, axes = plt.subplots(1, len(groups), figsize=(max(6.0, 0.9 * sum(widths) + 1), 4.4), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (title, bars) in zip(axes[0], groups):
        ax.bar(range(len(bars)), [b[1] for b in bars],
               color=["tab:orange" if "/dlinfer/" in b[0] else "tab:blue" for b in bars])
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=8)
    axes[0][0].set_ylabel("output tokens/s")
    fig.suptitle("LMDeploy PyTorch engine: stock (blue) vs dlinfer (orange); one panel per run of the script")
    fig.tight_layout()
    written.append(out_dir / "lmdeploy_e2e.png")
    fig.savefig(written[-1], dpi=120)
    return written


def main(argv=None) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_monitor  # (stdlib only) the [gpu] lines

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS) + ["all"], nargs="+", default=["llama8b"],
                        help="one or more models, or all (default %(default)s)")
    parser.add_argument("--mode", choices=["eager", "graph", "both"], default="both")
    parser.add_argument("--backend", choices=["stock", "dlinfer", "both"], default="both")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (2 on the two-GPU machine)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 64 requests of 128-512 tokens, 64 new tokens, fewer layers")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: see MODELS)")
    parser.add_argument("--requests", type=int, default=None, help="default 256 (64 with --quick)")
    parser.add_argument("--min-prompt", type=int, default=128)
    parser.add_argument("--max-prompt", type=int, default=None, help="default 1024 (512 with --quick)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256 (64 with --quick)")
    parser.add_argument("--compare-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--cache-max-entry-count", type=float, default=0.6)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--vendor", default=None, help="force a dlinfer vendor (DLINFER_VENDOR); default: auto")
    parser.add_argument("--model-dir", default="/tmp/lmdeploy_e2e_models")
    parser.add_argument("--out", default=None, help="result JSON (default: $OUT/lmdeploy_e2e.json)")
    parser.add_argument("--run-timeout", type=float, default=420, help="seconds per configuration")
    parser.add_argument("--deadline", type=float, default=560,
                        help="seconds for the whole command; runs that would start later are skipped")
    parser.add_argument("--profile", action="store_true",
                        help="after each timed run, list the GPU kernels by time over one more pass of the workload")
    parser.add_argument("--dry-run", action="store_true", help="check arguments and imports only (CPU)")
    parser.add_argument("--render", nargs="+", default=None, metavar="JSON",
                        help="only write lmdeploy_e2e.md (+ .png with matplotlib) from result JSONs, into --out's "
                             "folder or $OUT")
    parser.add_argument("--warmup", choices=["full", "short"], default="full",
                        help="before timing, one pass of a like workload (full) or of 16 prompts (short)")
    parser.add_argument("--timed-passes", type=int, default=None,
                        help="timed passes over the same prompts; the median is reported, the spread is the noise "
                             "(default 1; 4 with --interleave); beside each pass's output tok/s its steady-state "
                             "window rate (output tokens in the middle half of the pass); Python's garbage collector "
                             "runs before each timed pass and is off during it")
    parser.add_argument("--pass-seconds", type=float, default=0.0,
                        help="> 0: as many requests per timed pass (never fewer than --requests) as make a pass "
                             "last about this many seconds at the warm-up's rate; the first run of a model decides "
                             "the count for all its runs (default 0: --requests). With --warmup full every run "
                             "then passes once, untimed, over the timed prompts before timing them (see "
                             "--no-rehearsal), so that the larger batches' CUDA graphs are captured before the "
                             "timing (warmup_full_count_s in the JSON)")
    parser.add_argument("--no-rehearsal", dest="rehearsal", action="store_false",
                        help="with --warmup full, skip the untimed pass of the timed prompts before the timed "
                             "passes (then the warm-up's prompts run at the timed count only where it exceeds the "
                             "warm-up's)")
    parser.add_argument("--quant", choices=list(QUANTS), default="none",
                        help="weights: none (bf16), awq (W4A16, group 128, float16) or w8a8 (SmoothQuant int8); "
                             "the model is quantized once with dlinfer.testing.quantize and cached in --model-dir; "
                             "both backends serve the same checkpoint")
    parser.add_argument("--kv-quant", type=int, default=0, metavar="{0,8}",
                        help="KV cache: LMDeploy's quant_policy, 0 (model dtype) or 8 (int8), both backends")
    parser.add_argument("--oracle-prompts", type=int, default=16,
                        help="score every run's tokens on this many prompts against transformers in float32 "
                             "(teacher-forced; 0: off)")
    parser.add_argument("--interleave", action="store_true",
                        help="both backends of a pair alive at once on the card, their timed passes alternating "
                             "ABBA, one at a time: per-pass ratios dlinfer / stock, their median and spread; the "
                             "first engine's cache takes half of --cache-max-entry-count, the second the same "
                             "number of blocks (needs --backend both and --tp 1)")
    parser.add_argument("--pass-gap", type=float, default=1.0,
                        help="--interleave: seconds between the end of one timed pass and the start of the next, so "
                             "that what an engine leaves behind after its pass (threads still spinning, output "
                             "handling) does not run into the other's (default %(default)s)")
    parser.add_argument("--until-ci", type=float, default=0.0, metavar="PCT",
                        help="--interleave: after --timed-passes, two more passes at a time until the 95 %% interval "
                             "of the ratio is within +-PCT %% of its geometric mean, --max-timed-passes are done, or "
                             "two more would not fit the pair's time (its budget less the float32 oracle's "
                             "reserve); the summary says which (default 0: exactly --timed-passes)")
    parser.add_argument("--max-timed-passes", type=int, default=None,
                        help="--until-ci: passes per engine at most (default 4 x --timed-passes)")
    parser.add_argument("--arrival", choices=["burst", "stream"], default="burst",
                        help="burst (default): every request of a pass submitted at once; stream: --in-flight "
                             "requests kept in flight (a new one whenever one finishes; the fill's lengths spread so "
                             "that they finish at an even pace), the steady window from the ramp's end to the last "
                             "submission is each pass's window rate, and --pass-seconds sizes that window")
    parser.add_argument("--in-flight", type=int, default=0,
                        help="--arrival stream: requests kept in flight (default: --max-batch-size)")
    parser.add_argument("--no-stream", action="store_true",
                        help="each request's output delivered once, at its end, instead of token by token: the "
                             "engine's per-step output handling of every running request leaves the timed loop "
                             "(with an 8-layer model it is about half of a step's host time); no time to first token "
                             "or window rate then")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--oracle-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.render:
        folder = Path(args.out).parent if args.out else Path(os.environ.get("OUT", "."))
        for path in render([json.loads(Path(p).read_text()) for p in args.render], folder):
            print(f"wrote {path}")
        return 0

    if args.child:
        run_child(RunSpec(**json.loads(args.child)))
        return 0
    if args.oracle_child:
        run_oracle(json.loads(Path(args.oracle_child).read_text()))
        return 0

    started = time.perf_counter()
    if args.tp < 1:
        parser.error("--tp must be >= 1")
    requests = args.requests or (64 if args.quick else 256)
    max_prompt = args.max_prompt or (512 if args.quick else 1024)
    new_tokens = args.new_tokens or (64 if args.quick else 256)
    if not 1 <= args.min_prompt <= max_prompt:
        parser.error("need 1 <= --min-prompt <= --max-prompt")
    if args.compare_tokens < 1 or args.compare_tokens > new_tokens:
        parser.error("--compare-tokens must be in [1, --new-tokens]")
    if args.oracle_prompts < 0:
        parser.error("--oracle-prompts must be >= 0")
    if args.pass_seconds < 0:
        parser.error("--pass-seconds must be >= 0")
    if args.pass_gap < 0:
        parser.error("--pass-gap must be >= 0")
    if args.timed_passes is None:
        args.timed_passes = 4 if args.interleave else 1
    if args.timed_passes < 1:
        parser.error("--timed-passes must be >= 1")
    if args.interleave:
        if args.tp > 1:
            parser.error("--interleave runs both engines on one card at once: --tp 1 only")
        if args.backend != "both":
            parser.error("--interleave alternates stock and dlinfer passes: needs --backend both")
        if args.timed_passes < 2:
            parser.error("--interleave needs --timed-passes >= 2 (an even number completes the ABBA order)")
    if args.until_ci < 0:
        parser.error("--until-ci must be >= 0")
    if args.until_ci and not args.interleave:
        parser.error("--until-ci adds timed passes to an interleaved pair: needs --interleave")
    if args.max_timed_passes is None:
        args.max_timed_passes = 4 * args.timed_passes
    if args.until_ci and args.max_timed_passes < args.timed_passes:
        parser.error("--max-timed-passes must be >= --timed-passes")
    out_path = Path(args.out or Path(os.environ.get("OUT", ".")) / "lmdeploy_e2e.json")
    log_lines: list[str] = []

    def log(message: str) -> None:
        print(message, flush=True)
        log_lines.append(message)

    runs = plan(args)
    refusal = quant_refusal(list(dict.fromkeys(r[0] for r in runs)), args.quant, args.kv_quant,
                            oracle=args.oracle_prompts > 0)
    if refusal:
        parser.error(refusal)
    layers = {m: args.layers or (QUICK_LAYERS[m] if args.quick else MODELS[m][2]) for m in {r[0] for r in runs}}
    for m, n in layers.items():
        log(f"model {m}: {MODELS[m][1]} with {n} of {MODELS[m][3]} decoder layers, {QUANTS[args.quant][1]}; "
            f"{KV_QUANTS[args.kv_quant]}")
    oracle_note = (("float32 transformers with the checkpoint's weights dequantized (the function the quantized "
                    "checkpoint stands for" + ("; the engines' per-token int8 activations are their error"
                                               if args.quant == "w8a8" else "") + ")")
                   if args.quant != "none" else "float32 transformers on the bf16 checkpoint")
    if args.kv_quant:
        oracle_note += "; its KV cache is float: the int8 KV cache is the engines' error"
    log(f"workload: {requests} requests, prompts {args.min_prompt}-{max_prompt} tokens, {new_tokens} new tokens, "
        f"greedy, ignore_eos; runs: " + ", ".join(f"{m}/{b}/{mo}/tp{t}" for m, b, mo, t in runs))
    if args.interleave:
        log(f"interleaved: each stock/dlinfer pair alive at once on the card, {args.timed_passes} timed passes each "
            f"in the order {', '.join(f'{b} {k}' for k, b in interleaved_order(args.timed_passes))}; KV cache: "
            f"{args.cache_max_entry_count / 2:g} of the free memory for the stock engine (less where the dlinfer "
            "engine would not fit beside it), its block count for the dlinfer engine"
            + (f"; then two more at a time until the ratio's 95 % interval is within +-{args.until_ci:g} % (at most "
               f"{args.max_timed_passes} passes each)" if args.until_ci else ""))

    if args.dry_run:
        import dlinfer.framework.lmdeploy_ext  # noqa: F401
        import dlinfer.testing.quantize  # noqa: F401  (the quantizer and the oracle's dequantizing loader)
        from dlinfer.testing.tiny_models import REAL_SHAPES

        unknown = [shape for shape, *_ in MODELS.values() if shape not in REAL_SHAPES]
        if unknown:
            raise SystemExit(f"dlinfer.testing.tiny_models has no REAL_SHAPES entry for {unknown}")
        prompts = workload(requests, args.min_prompt, max_prompt, args.seed, 500)
        try:
            import lmdeploy  # noqa: F401

            lmdeploy_state = f"lmdeploy {lmdeploy.__version__} importable"
        except ImportError as exc:
            lmdeploy_state = f"lmdeploy not importable here ({exc})"
        log(f"dry run: {len(prompts)} prompts, {sum(map(len, prompts))} prompt tokens; --quant {args.quant}, "
            f"--kv-quant {args.kv_quant}; {lmdeploy_state}; oracle: {oracle_note}; would write {out_path}")
        return 0

    suffix = "" if args.quant == "none" and not args.kv_quant else ", " + ", ".join(
        ([QUANTS[args.quant][1]] if args.quant != "none" else []) + ([KV_QUANTS[args.kv_quant]] if args.kv_quant
                                                                     else []))
    report = {"environment": environment(), "layers": layers,
              "models": {m: f"{MODELS[m][1]}, {n} of {MODELS[m][3]} layers{suffix}" for m, n in layers.items()},
              "quant": {"weights": args.quant, "kv_quant": args.kv_quant, "oracle": oracle_note},
              "workload": {"requests": requests, "min_prompt": args.min_prompt, "max_prompt": max_prompt,
                           "new_tokens": new_tokens, "seed": args.seed, "warmup": args.warmup,
                           "rehearsal": args.warmup == "full" and args.rehearsal,
                           "timed_passes": args.timed_passes, "pass_seconds": args.pass_seconds,
                           "until_ci": args.until_ci or None,
                           "max_timed_passes": args.max_timed_passes if args.until_ci else None,
                           "arrival": args.arrival, "in_flight": args.in_flight or None,
                           "stream_response": not args.no_stream},
              "runs": {}, "agreement": [], "oracle": {}, "log": log_lines}
    if args.interleave:
        report["workload"]["interleave"] = True
        report["interleaved"] = []
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out_path.write_text(json.dumps(report, indent=1))

    model_dirs = {m: build_model(m, layers[m], Path(args.model_dir), log) for m in layers}
    if args.quant != "none":
        model_dirs = {m: quantized_model(path, args.quant, log) for m, path in model_dirs.items()}
    token_lists: dict[str, list[list[int]]] = {}
    timed_counts: dict[str, int] = {}  # --pass-seconds: the timed request count of each model's first run

    def make_spec(model: str, backend: str, mode: str, tp: int) -> RunSpec:
        # --interleave: the first engine's cache leaves room for the second engine on the same card
        cache = args.cache_max_entry_count / 2 if args.interleave else args.cache_max_entry_count
        return RunSpec(model=model, model_dir=str(model_dirs[model]), backend=backend, mode=mode, tp=tp,
                       requests=requests, min_prompt=args.min_prompt, max_prompt=max_prompt, new_tokens=new_tokens,
                       compare_tokens=args.compare_tokens, seed=args.seed, vocab_limit=500,
                       max_batch_size=args.max_batch_size, cache_max_entry_count=cache,
                       block_size=args.block_size, vendor=args.vendor, profile=args.profile, warmup=args.warmup,
                       rehearsal=args.rehearsal,
                       timed_passes=args.timed_passes, quant=args.quant, kv_quant=args.kv_quant,
                       pass_seconds=args.pass_seconds, timed_requests=timed_counts.get(model),
                       arrival=args.arrival, in_flight=args.in_flight, stream_response=not args.no_stream,
                       twin_room=args.interleave,
                       result_path=f"/tmp/lmdeploy_e2e_{model}_{args.quant}_kv{args.kv_quant}_{backend}_{mode}"
                                   f"_tp{tp}.json")

    def accept(name: str, model: str, result: dict, output: str) -> None:
        """A finished run's result into the report (and its lines into the log)."""
        token_lists[name] = result.pop("first_tokens")
        if args.pass_seconds and model not in timed_counts and result.get("timed_requests"):
            timed_counts[model] = result["timed_requests"]
            log(f"[pass] {model}: {timed_counts[model]} requests per timed pass (about {args.pass_seconds:.0f} s "
                f"at {name}'s warm-up rate), for every run of {model}")
        notes = list(dict.fromkeys(line.strip() for line in output.splitlines()
                                   if "dlinfer" in line and ("WARNING" in line or "falls back" in line)))
        result["dlinfer_warnings"] = notes[:40]
        for note in notes[:10]:
            log(f"[warn] {name}: {note[:200]}")
        report["runs"][name] = result
        timed_jit = result.get("triton_compiles_timed") or {}
        log(f"[done] {name}: {result['output_tok_s']:.0f} output tok/s, {result['duration_s']:.1f} s "
            f"(startup {result['startup_s']:.0f} s, {warmup_text(result)}; Triton compiles in the "
            f"timed pass: {timed_jit.get('count', '?')}, {timed_jit.get('seconds', '?')} s; passes "
            f"{result.get('pass_output_tok_s')}, spread {result.get('pass_spread', 0):.1%}; TTFT median "
            f"{1e3 * (result.get('median_ttft_s') or 0):.0f} ms, p99 {1e3 * (result.get('p99_ttft_s') or 0):.0f} ms)")
        per_pass = result.get("triton_compiles_per_pass") or []
        if len(per_pass) > 1:
            log(f"[jit] {name}: Triton compiles per timed pass: "
                + ", ".join(f"{c['count']} ({c['seconds']} s)" if c["count"] else "0" for c in per_pass))
        for k, g in enumerate(result.get("gpu_per_pass") or [], 1):
            if g is not None:
                log(f"[gpu] {name}: timed pass {k}: {gpu_monitor.describe(g)}")
        noise = result.get("pass_spread_after_first")
        if noise is not None and noise > 0.02:
            log(f"[warn] {name}: timed passes 2..{len(result['pass_output_tok_s'])} differ by {noise:.1%} (> 2 %): "
                f"each pass lasts {result['duration_s']:.1f} s; raise --pass-seconds (or --requests) for a tighter "
                "measurement")
        summary = result.get("profile_summary")
        if summary:
            log(f"[kernel] {name}: profiled pass {summary['wall_s']} s, GPU busy {summary['busy_ms'] / 1e3:.2f} s "
                f"({summary['busy_share']:.1%}), kernels {summary['kernel_ms'] / 1e3:.2f} s in "
                f"{summary['kernel_launches']} launches")
        if result.get("profile_forwards"):
            log(forwards_line(name, result["profile_forwards"]))
            log(f"[sched] {name}: first prefills " + "; ".join(
                f"{r['t']} s: {r['seqs']} seqs {r['tokens']} tokens ({r['reason']}, {r['waiting']} waiting, "
                f"{r['active']} active)" for r in result["profile_forwards"]["first_prefills"]))
        for row in (result.get("profile_top_kernels") or [])[:12]:
            log(f"[kernel] {name}: {row['share']:6.1%} {row['total_ms']:9.1f} ms {row['calls']:7d}x "
                f"{row['kernel'][:90]}")
        if result.get("ops_served"):
            log(f"[ops] {name}: " + "; ".join(f"{op}: {','.join(v) if isinstance(v, list) else v}"
                                                for op, v in result["ops_served"].items()))
        report["agreement"] = [dict(a=a, b=b, **agreement(token_lists[a], token_lists[b], args.compare_tokens))
                               for a, b in pairs(token_lists)]
        save()

    # one run at a time, or with --interleave one pair (stock, dlinfer) at a time
    units = ([[r] for r in runs] if not args.interleave
             else list({(m, mo, t): [r for r in runs if r[0] == m and r[2] == mo and r[3] == t]
                        for m, _, mo, t in runs}.values()))
    for unit in units:
        names = [f"{model}/{backend}/{mode}/tp{tp}" for model, backend, mode, tp in unit]
        left = args.deadline - (time.perf_counter() - started)
        if left < 60 * len(unit):
            for name in names:
                log(f"[skip] {name}: {left:.0f} s left before the deadline")
                report["runs"][name] = {"error": "skipped: deadline"}
            continue
        if len(unit) == 2:  # --interleave
            stock, mine = (make_spec(*run) for run in unit)
            log(f"[run] {stock.name} and {mine.name}, interleaved")
            t0 = time.perf_counter()
            try:
                budget_s = min(2 * args.run_timeout, left - 10)
                reserve = ORACLE_RESERVE_S if args.oracle_prompts else 0.0
                done, pair = run_interleaved(stock, mine, budget_s=budget_s, log=log, pass_gap=args.pass_gap,
                                             until_ci=args.until_ci / 100, max_passes=args.max_timed_passes,
                                             extend_s=max(0.0, min(budget_s, left - 10 - reserve)))
            except Exception as exc:  # noqa: BLE001 - record and go on with the other pairs
                log(f"[fail] {stock.name} and {mine.name} (interleaved) after {time.perf_counter() - t0:.0f} s: "
                    f"{str(exc)[-1500:]}")
                if "OutOfMemoryError" in str(exc) or "out of memory" in str(exc):
                    log(f"[hint] both engines hold the model's weights on one card with --interleave: a smaller "
                        f"--cache-max-entry-count (now {args.cache_max_entry_count:g}; the first engine's cache "
                        f"takes half of it) or fewer --layers leaves the second engine room")
                for name in names:
                    report["runs"][name] = {"error": f"interleaved pair failed: {str(exc)[-3000:]}"}
                save()
                continue
            for spec, backend in ((stock, "stock"), (mine, "dlinfer")):
                accept(spec.name, spec.model, *done[backend])
            report["interleaved"].append(pair)
            for line in pair_lines(f"{pair['model']} {pair['mode']}", pair):
                log(line if line.startswith("[warn]") else f"[pair] {line}")
            save()
            continue
        (model, backend, mode, tp), name = unit[0], names[0]
        spec = make_spec(model, backend, mode, tp)
        log(f"[run] {name}")
        t0 = time.perf_counter()
        try:
            code, output = run_isolated([sys.executable, __file__, "--child", json.dumps(dataclasses.asdict(spec))],
                                        timeout=min(args.run_timeout, left - 10))
            if code != 0:
                raise RuntimeError(f"exit {code}: {output[-3000:]}")
            result = json.loads(Path(spec.result_path).read_text())
        except Exception as exc:  # noqa: BLE001 - record and go on with the other runs
            log(f"[fail] {name} after {time.perf_counter() - t0:.0f} s: {str(exc)[-1500:]}")
            report["runs"][name] = {"error": str(exc)[-3000:]}
            save()
            continue
        accept(name, model, result, output)

    if args.oracle_prompts:
        prompts = workload(requests, args.min_prompt, max_prompt, args.seed, 500)[:args.oracle_prompts]
        for model in layers:
            runs_of_model = {n: t[:len(prompts)] for n, t in token_lists.items() if n.split("/")[0] == model}
            left = args.deadline - (time.perf_counter() - started)
            if not runs_of_model:
                continue
            if left < 60:
                log(f"[skip] float32 oracle for {model}: {left:.0f} s left before the deadline")
                report["oracle"][model] = {"error": "skipped: deadline"}
                continue
            job_path = Path(f"/tmp/lmdeploy_e2e_oracle_{model}.json")
            result_path = Path(f"/tmp/lmdeploy_e2e_oracle_{model}_result.json")
            job_path.write_text(json.dumps({"model_dir": str(model_dirs[model]), "arch": MODELS[model][0],
                                            "prompts": prompts, "runs": runs_of_model, "quant": args.quant,
                                            "engine_dtype": QUANTS[args.quant][2] or "bfloat16",
                                            "result_path": str(result_path)}))
            log(f"[oracle] {model}: {oracle_note}; {len(prompts)} prompts x {len(runs_of_model)} runs")
            try:
                code, output = run_isolated([sys.executable, __file__, "--oracle-child", str(job_path)],
                                            timeout=min(args.run_timeout, left - 10))
                if code != 0:
                    raise RuntimeError(f"exit {code}: {output[-3000:]}")
                report["oracle"][model] = json.loads(result_path.read_text())
                log(f"[oracle] {model}: done in {report['oracle'][model]['oracle_s']:.0f} s")
            except Exception as exc:  # noqa: BLE001 - the runs' results stand without it
                log(f"[fail] float32 oracle for {model}: {str(exc)[-1500:]}")
                report["oracle"][model] = {"error": str(exc)[-3000:]}
            save()

    log("")
    log(table(report["runs"], report["agreement"], report["oracle"], report.get("interleaved")))
    save()
    for path in render([report], out_path.parent):
        log(f"wrote {path}")
    log(f"wrote {out_path} ({time.perf_counter() - started:.0f} s)")
    save()
    return 0 if all("error" not in r for r in report["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
