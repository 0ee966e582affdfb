"""Quantized serving on one NVIDIA GPU: checks, timings and a tiny end-to-end serve, in one call.

    python benchmarks/quant_gpu.py                       # all parts, within --deadline seconds (default 280)
    python benchmarks/quant_gpu.py --parts check,timing   # a subset
    python benchmarks/quant_gpu.py --dry-run              # CPU: arguments, imports and the case lists only

Parts, in this order (a part that would start past the deadline is skipped and says so):

* ``check``: the Triton vendor against the reference on the GPU (``dlinfer.testing.conformance``): the quick
  matrix of the quantized ops and of the three cache ops (their quantized-cache cases included), then every
  quantized-cache case of the full matrix (8 and 4 bits, GQA ratios, odd head sizes, block 16/64, shuffled block
  tables, NaN scales in unused slots), in float16, bfloat16 and float32.
* ``timing``: paged decode over a bfloat16, an 8-bit and a 4-bit cache (Llama-3-8B heads: 32 / 8, D 128, block
  64), dlinfer's Triton kernel against LMDeploy 0.18's own (``flash_attn_with_kvcache``, ``quant_policy`` 0 / 8 /
  4) on the same caches (written by dlinfer's ``fill_kv_cache``: the outputs must agree, which checks the shared
  layout on the GPU); the quantizing cache write, dlinfer's against LMDeploy's; the dense AWQ and int8 GEMMs at
  their default configs against LMDeploy's (``awq_linear``, ``matmul_kernel_dynamic_quant``) on Llama-3-8B's o and
  gate_up linears at 1 and 4096 tokens (``benchmarks/tune_quant.py`` sweeps them). CUDA-graph replay, L2 flushed
  (``benchmarks/timing.py``).
* ``e2e``: a tiny random-weight Llama quantized offline (``dlinfer.testing.quantize``: AWQ, and W8A8) served by
  LMDeploy's engine (``lmdeploy.pipeline``, CUDA graphs) with ``quant_policy`` 8 (AWQ) / 4 (W8A8), stock and on
  dlinfer, each in its own process: greedy tokens and the generated tokens' logits compared.

LMDeploy on the GPU machine: the wheels of ``scripts/lmdeploy_gpu_wheels.sh`` (run it here, carry ``.whl``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; python3 benchmarks/quant_gpu.py --deadline 270

(one H200, about 4-5 minutes; ``--parts check,timing --deadline 150`` starts no engine). Results:
``$OUT/quant_gpu.json`` (``--out``), rewritten after every part; a summary is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUANT_OPS = ("weight_quant_matmul", "dynamic_quant", "linear_w8a8", "linear_w8a8_static", "rms_norm_w8a8",
             "add_rms_norm_w8a8", "fused_moe_w8a8")
CACHE_OPS = ("fill_kv_cache", "paged_prefill_attention", "paged_decode_attention")
PARTS = ("check", "timing", "e2e")
# decode shapes: (batch, context)
DECODE_SHAPES = ((1, 8192), (16, 2048), (64, 1024))
E2E = (("awq", 8, "float16"), ("w8a8", 4, "float16"))  # (format, quant_policy, dtype)
GEMM_SHAPES = (("o", 1), ("gate_up", 1), ("o", 4096), ("gate_up", 4096))  # (Llama-3-8B linear, tokens)


def quantized_cache_cases() -> list[tuple[str, dict]]:
    """Every quantized-cache case of the full conformance matrix, as (op, params)."""
    from dlinfer.testing.conformance.cases import SPECS

    return [(op, p) for op in CACHE_OPS for p in SPECS[op].cases(False) if p.get("quant")]


# ------------------------------------------------------------------------------------------------- check
def part_check(seed: int, device: str = "cuda") -> dict:
    import torch

    from dlinfer.testing.conformance import run_conformance
    from dlinfer.testing.conformance.runner import DTYPES, run_case

    quick = run_conformance("triton", device, quick=True, ops=QUANT_OPS + CACHE_OPS, seed=seed, progress=print)
    rows = []
    for i, (op, p) in enumerate(quantized_cache_cases()):
        for j, dtype in enumerate(DTYPES):
            rows.append(run_case("triton", op, p, dtype, torch.device(device), seed + 7919 * i + j))
    failures = [f"{r.op} {r.case} {r.dtype}: {r.status} {r.detail}" for r in rows if r.status != "pass"]
    worst = max((r.rel_err for r in rows if r.rel_err is not None and r.status == "pass"), default=None)
    print(f"full-matrix quantized-cache cases: {len(rows)} runs, {len(rows) - len(failures)} pass, worst rel err "
          f"{worst}")
    for line in failures[:20]:
        print("  FAIL", line)
    return {"quick_ok": quick.ok, "quick_table": quick.table(), "quick_failures": [
                f"{r.op} {r.case} {r.dtype}: {r.status} {r.detail}" for r in quick.failures],
            "full_quant_cache_runs": len(rows), "full_quant_cache_failures": failures,
            "full_quant_cache_worst_rel_err": worst, "seed": seed}


# ------------------------------------------------------------------------------------------------ timing
def _filled_cache(bits: int, batch: int, context: int, hq=32, hk=8, d=128, block=64, dtype=None):
    """A paged cache holding ``context`` tokens per sequence (shuffled blocks), written by dlinfer's
    fill_kv_cache (quantized when ``bits``), with its LMDeploy-layout [..., 2] scales/zeros."""
    import torch

    import dlinfer.ops as ops

    dtype = dtype or torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(batch * 7 + bits)
    per_seq = context // block
    num_blocks = batch * per_seq + 1
    table = torch.randperm(num_blocks - 1, device="cuda", generator=g)[:batch * per_seq].view(batch, per_seq)
    table = table.to(torch.int32)
    slots = (table.long()[:, :, None] * block + torch.arange(block, device="cuda")).view(-1)
    k = torch.randn(slots.numel(), hk, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(slots.numel(), hk, d, device="cuda", dtype=dtype, generator=g)
    dc = d // 2 if bits == 4 else d
    cache_dtype = torch.uint8 if bits else dtype
    kc = torch.zeros(num_blocks, block, hk, dc, device="cuda", dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    ksz = torch.zeros(num_blocks, block, hk, 2, device="cuda", dtype=dtype)
    vsz = torch.zeros_like(ksz)
    for start in range(0, slots.numel(), 65536):  # chunks: bounded temporaries
        end = start + 65536
        ops.fill_kv_cache(k[start:end], v[start:end], kc, vc, slots[start:end], [ksz], [vsz], bits)
    q = torch.randn(batch, hq, d, device="cuda", dtype=dtype, generator=g)
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    return dict(q=q, kc=kc, vc=vc, ksz=ksz, vsz=vsz, table=table, lens=lens, k=k, v=v, slots=slots, hq=hq, hk=hk,
                block=block)


def part_timing() -> dict:
    import torch

    import dlinfer.ops as ops
    from benchmarks import peers
    from benchmarks.timing import Flusher, gpu_time
    from dlinfer.vendor import registry

    peer = peers.load_lmdeploy()
    flush = Flusher()
    results = []
    with registry.forced("triton"):
        for batch, context in DECODE_SHAPES:
            for bits in (0, 8, 4):
                c = _filled_cache(bits, batch, context)
                scale = 128 ** -0.5
                kv = {} if not bits else dict(kv_scales=(c["ksz"][..., 0], c["vsz"][..., 0]),
                                              kv_zeros=(c["ksz"][..., 1], c["vsz"][..., 1]), quant_bits=bits)
                out = torch.empty_like(c["q"])

                def ours(c=c, kv=kv, out=out):
                    ops.paged_decode_attention(c["q"], c["kc"], c["vc"], c["table"], c["block"], None, c["lens"],
                                               context, c["hq"], c["hk"], softmax_scale=scale, attn_output=out, **kv)

                def theirs(c=c, bits=bits):
                    return peer.pagedattention.flash_attn_with_kvcache(
                        c["q"], c["kc"], c["vc"], cache_seqlens=c["lens"], page_table=c["table"], max_seqlen_q=1,
                        softmax_scale=scale, k_scales_zeros=c["ksz"] if bits else None,
                        v_scales_zeros=c["vsz"] if bits else None, quant_policy=bits)

                ours()
                agree = float((out.float() - theirs().float()).norm() / out.float().norm())
                t_ours, t_theirs = gpu_time(ours, flush), gpu_time(theirs, flush)
                row = {"op": "paged_decode_attention", "batch": batch, "context": context, "quant_bits": bits,
                       "dlinfer_us": round(t_ours.us, 2), "lmdeploy_us": round(t_theirs.us, 2),
                       "speedup": round(t_theirs.us / t_ours.us, 3), "rel_diff_vs_lmdeploy": agree}
                print(row)
                results.append(row)
                del c
                torch.cuda.empty_cache()
        # the quantizing cache write: a decode step of 64 sequences, and an 8k-token prefill
        for tokens in (64, 8192):
            for bits in (8, 4):
                results.append(_time_fill(tokens, bits, peer, flush, gpu_time))
                print(results[-1])
    results += _time_gemms()
    return {"rows": results, "card": torch.cuda.get_device_name(0)}


def _time_gemms() -> list[dict]:
    """The dense quantized GEMMs (AWQ W4A16, int8 W8A8) at their default configs against LMDeploy's kernels on
    GEMM_SHAPES, each output checked against the reference (benchmarks/tune_quant.py: the full sweep)."""
    import torch

    from benchmarks import tune_quant

    timer, peer, rows = tune_quant.Timer(True), tune_quant.Peer(), []
    for fmt in tune_quant.FORMATS:
        for shape, t in GEMM_SHAPES:
            n, k = tune_quant.SHAPES[shape]
            r = tune_quant.baseline(fmt, shape, n, k, t, "cuda", timer, peer, {})
            ours, theirs = r["default"], r.get("peer", {})
            row = {"op": "weight_quant_matmul" if fmt == "awq" else "linear_w8a8", "shape": shape, "n": n, "k": k,
                   "tokens": t, "dlinfer_us": round(ours["us"], 2) if "us" in ours else ours.get("error"),
                   "lmdeploy_us": round(theirs["us"], 2) if "us" in theirs else theirs.get("error"),
                   "rel_err": ours.get("rel_err"), "lmdeploy_rel_err": theirs.get("rel_err"),
                   "config": ours["config"]}
            if "us" in ours and "us" in theirs:
                row["speedup"] = round(theirs["us"] / ours["us"], 3)
            print(row)
            rows.append(row)
            torch.cuda.empty_cache()
    return rows


def _time_fill(tokens: int, bits: int, peer, flush, gpu_time, hk=8, d=128, block=64) -> dict:
    import torch

    import dlinfer.ops as ops

    decode = tokens == 64  # 64 sequences, one new token each after 5 cached ones; else one sequence of `tokens`
    num_blocks = (tokens if decode else tokens // block) + 2
    dc = d // 2 if bits == 4 else d
    kc = torch.zeros(num_blocks, block, hk, dc, device="cuda", dtype=torch.uint8)
    vc = torch.zeros_like(kc)
    ksz = torch.zeros(num_blocks, block, hk, 2, device="cuda", dtype=torch.bfloat16)
    vsz = torch.zeros_like(ksz)
    k = torch.randn(tokens, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if decode:
        table = torch.arange(tokens, device="cuda", dtype=torch.int32)[:, None]
        slots = table.long()[:, 0] * block + 5
        q_lens = torch.ones(tokens, device="cuda", dtype=torch.int32)
        kv_lens = torch.full((tokens,), 6, device="cuda", dtype=torch.int32)
    else:
        table = torch.arange(tokens // block, device="cuda", dtype=torch.int32)[None]
        slots = torch.arange(tokens, device="cuda")
        q_lens = kv_lens = torch.tensor([tokens], device="cuda", dtype=torch.int32)
    starts = torch.cumsum(q_lens, 0) - q_lens

    def ours():
        ops.fill_kv_cache(k, v, kc, vc, slots, [ksz], [vsz], bits)

    def theirs():
        peer.fill_kv_cache.fill_kv_cache(k, v, kc, vc, starts, q_lens, kv_lens, 1 if decode else tokens, table, ksz,
                                         vsz, bits)

    t_ours, t_theirs = gpu_time(ours, flush), gpu_time(theirs, flush)
    return {"op": "fill_kv_cache", "tokens": tokens, "quant_bits": bits, "dlinfer_us": round(t_ours.us, 2),
            "lmdeploy_us": round(t_theirs.us, 2), "speedup": round(t_theirs.us / t_ours.us, 3)}


# ---------------------------------------------------------------------------------------------------- e2e
PROMPTS = ["The quick brown fox", "A paged key value cache stores", "Mixture of experts layers send each token",
           "Hello world! Numbers: 0 1 2 3", "Rotary position embeddings rotate pairs", "Python, Triton, CUDA",
           "Large language models generate one token at a time", "Root mean square normalization divides"]


def run_e2e_child(job: dict) -> None:
    """One engine in this process: LMDeploy's pipeline (stock or on dlinfer), greedy, logits of each new token."""
    import torch
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

    if job["backend"] == "dlinfer":
        import dlinfer.framework.lmdeploy_ext as lmdeploy_ext

        lmdeploy_ext.apply()
    config = PytorchEngineConfig(quant_policy=job["quant_policy"], dtype=job["dtype"], max_batch_size=8,
                                 cache_max_entry_count=0.05, block_size=64, session_len=256, eager_mode=False)
    t0 = time.perf_counter()
    pipe = pipeline(job["model"], backend_config=config, log_level="WARNING")
    startup = time.perf_counter() - t0
    gen = GenerationConfig(max_new_tokens=job["new_tokens"], do_sample=False, ignore_eos=True,
                           output_logits="generation")
    outs = pipe.infer(PROMPTS, gen_config=gen)
    torch.save({"tokens": [list(o.token_ids) for o in outs],
                "logits": [o.logits.float().cpu() if o.logits is not None else None for o in outs],
                "startup_s": startup}, job["out"])
    pipe.close()


def part_e2e(work: Path, deadline: float) -> dict:
    import torch

    from benchmarks.lmdeploy_e2e import run_isolated
    from dlinfer.testing.quantize import quantize_model
    from dlinfer.testing.tiny_models import build_tiny_model

    src = build_tiny_model(work / "tiny_llama", "llama", dtype=torch.float16)
    report = {}
    for fmt, quant_policy, dtype in E2E:
        model = work / f"tiny_llama_{fmt}"
        quantize_model(src, model, fmt, group_size=64)
        runs = {}
        for backend in ("stock", "dlinfer"):
            left = deadline - time.monotonic()
            if left < 40:
                runs[backend] = {"skipped": f"{left:.0f} s left before the deadline"}
                continue
            out = work / f"{fmt}_{backend}.pt"
            job = dict(backend=backend, model=str(model), quant_policy=quant_policy, dtype=dtype, new_tokens=16,
                       out=str(out))
            code, log = run_isolated([sys.executable, __file__, "--e2e-child", json.dumps(job)], timeout=left - 10)
            if code != 0:
                runs[backend] = {"error": log[-3000:]}
                print(f"e2e {fmt} {backend}: FAILED\n{log[-3000:]}")
                continue
            runs[backend] = torch.load(out)
        report[fmt] = compare_runs(runs, fmt, quant_policy)
        print(f"e2e {fmt} quant_policy={quant_policy}: {report[fmt]}")
    return report


def compare_runs(runs: dict, fmt: str, quant_policy: int) -> dict:
    """Greedy-token agreement of stock and dlinfer, and the logits' relative difference while they agree."""
    stock, ours = runs.get("stock", {}), runs.get("dlinfer", {})
    summary = {"quant_policy": quant_policy,
               "stock": stock.get("error") or stock.get("skipped") or f"ok, startup {stock.get('startup_s', 0):.1f} s",
               "dlinfer": ours.get("error") or ours.get("skipped") or f"ok, startup {ours.get('startup_s', 0):.1f} s"}
    if "tokens" not in stock or "tokens" not in ours:
        return summary
    common, first_equal, rel = [], 0, []
    for a, b, la, lb in zip(stock["tokens"], ours["tokens"], stock["logits"], ours["logits"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        common.append(n)
        first_equal += int(n > 0)
        if la is not None and lb is not None and n:
            rel.append(float((la[:n] - lb[:n]).norm() / la[:n].norm()))
    summary.update(prompts=len(common), first_token_equal=first_equal, mean_common_prefix=sum(common) / len(common),
                   new_tokens=len(stock["tokens"][0]), max_logits_rel_diff=max(rel) if rel else None)
    return summary


# --------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/quant_gpu.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--deadline", type=float, default=280, help="seconds for all parts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="result JSON (default: $OUT/quant_gpu.json)")
    parser.add_argument("--work", default="/tmp/quant_gpu", help="folder for the e2e models")
    parser.add_argument("--dry-run", action="store_true", help="check arguments and imports only (CPU)")
    parser.add_argument("--e2e-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.e2e_child:
        run_e2e_child(json.loads(args.e2e_child))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; known: {', '.join(PARTS)}")
    cases = quantized_cache_cases()
    if args.dry_run:
        import benchmarks.lmdeploy_e2e  # noqa: F401  (the e2e part's helpers import)
        import benchmarks.timing  # noqa: F401
        import benchmarks.tune_quant  # noqa: F401  (the GEMM timings' helpers)

        print(f"dry run: parts {', '.join(parts)}; {len(cases)} full-matrix quantized-cache cases x 3 dtypes; "
              f"{len(DECODE_SHAPES) * 3} decode timings; {len(GEMM_SHAPES) * 2} GEMM timings; "
              f"e2e {', '.join(f'{f} quant_policy={q}' for f, q, _ in E2E)}")
        return 0
    start = time.monotonic()
    deadline = start + args.deadline
    out = Path(args.out or os.path.join(os.environ.get("OUT", "."), "quant_gpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"argv": sys.argv[1:], "parts": {}}
    for part in parts:
        if time.monotonic() > deadline - 20:
            report["parts"][part] = {"skipped": "deadline"}
            continue
        t0 = time.monotonic()
        try:
            if part == "check":
                result = part_check(args.seed)
            elif part == "timing":
                result = part_timing()
            else:
                result = part_e2e(work, deadline)
        except Exception as exc:  # noqa: BLE001 - one part's failure must not lose the others' results
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.monotonic() - t0, 1)
        report["parts"][part] = result
        out.write_text(json.dumps(report, indent=1, default=str))
    print("\n== summary ==")
    for part, result in report["parts"].items():
        if part == "check" and "quick_ok" in result:
            print(f"check: quick {'OK' if result['quick_ok'] else 'FAILED'}; full quantized-cache cases "
                  f"{result['full_quant_cache_runs'] - len(result['full_quant_cache_failures'])}/"
                  f"{result['full_quant_cache_runs']} pass ({result['seconds']} s)")
        elif part == "timing" and "rows" in result:
            for row in result["rows"]:
                print("timing:", row)
        else:
            print(f"{part}:", {k: v for k, v in result.items() if k != "quick_table"})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
