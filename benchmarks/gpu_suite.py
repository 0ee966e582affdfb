"""dlinfer's GPU entry point: correctness on the GPU, CUDA-graph tests, op benchmarks against the peers.

    python3 benchmarks/gpu_suite.py --only check,graphs,decode,... [--quick] [--out DIR] [--dry-run]

Parts (run in this order, whatever order ``--only`` names them in):

  check          the conformance kit (``dlinfer.testing.conformance``) for vendor triton on cuda (full matrix
                 unless --quick) and pytest tests/gpu/ (minus the graph tests when ``graphs`` runs too)
  graphs         pytest tests/gpu/test_cuda_graphs.py: every op captured in a CUDA graph, replayed with other
                 lengths, block tables and slots, compared with the reference vendor
  ceilings       copy bandwidth (4 GiB device to device) and bf16 8192^3 matmul; measured automatically
                 whenever a benchmark part runs, since every "% of bound" divides by them
  decode         paged_decode_attention, B x ctx x block
  prefill        prefill_attention (varlen, causal)
  paged_prefill  paged_prefill_attention (the cache holds the new tokens; history 0), and chunked prefill: 256
                 new tokens over a 16k history, batch 1 and 8, block 64 and 16
  fill           fill_kv_cache (256 decode / 8192 prefill tokens), and the fused rotary + KV write
  norm           rms_norm, add_rms_norm
  rotary         apply_rotary_pos_emb, in place on strided q/k views of a fused qkv
  act            silu_and_mul
  moe            fused_moe, Mixtral-8x7B and Qwen3-30B-A3B shapes
  moe_serving    fused_moe at the token counts a serving engine sends (decode batch 256, prefill chunks 2048 and
                 8192 = LMDeploy's max_prefill_token_num) with uniform and skewed routing (hot experts)
  gating         moe_gating_topk_softmax
  eager          host cost per call (wrapper + dispatch + launch), dlinfer and peers interleaved

Every benchmark row times dlinfer (vendor ``triton`` forced), LMDeploy 0.18.0's Triton kernel (the peer, see
benchmarks/peers.py) and torch, after a correctness check of each against an oracle on the same inputs. GPU
time is CUDA-graph replay with the L2 flushed (benchmarks/timing.py). All parts append to one JSON file under
``--out`` (default ``$OUT``), rewritten after every part; a failing part records its error and the suite goes
on. benchmarks/report.py turns JSON files into benchmarks/RESULTS.md and the roofline plot.

Nothing here touches CUDA at import time; ``--dry-run`` validates the arguments and prints the plan on CPU.

On the GPU machine (no network): ``scripts/gpu_wheels.sh`` here first, name ``.whl`` in the call's ``carry``,
and start the command with

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/lmdeploy-*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
        TRITON_CACHE_DIR=$PWD/.gpu_out/triton || exit; set -o pipefail;
    python3 benchmarks/gpu_suite.py --only ... --commit <git hash> 2>&1 | tee $OUT/suite.log

Each call stays inside ``--budget-s`` (default 540 s): cases past it are recorded as skipped, and the JSON is
rewritten after every part, so whatever ran comes back. Then, here:
copy the ``bench_*.json`` files into benchmarks/results/ and run ``python3 benchmarks/report.py`` (RESULTS.md,
and roofline.png where matplotlib is installed).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import peers, timing  # noqa: E402

PARTS = ("check", "graphs", "ceilings", "decode", "prefill", "paged_prefill", "fill", "norm", "rotary", "act",
         "moe", "moe_serving", "gating", "eager")
BENCH_PARTS = ("decode", "prefill", "paged_prefill", "fill", "norm", "rotary", "act", "moe", "moe_serving", "gating",
               "eager")

DTYPE = torch.bfloat16
HQ, HK, HEAD = 32, 8, 128
HIDDEN = 4096
INTER_SILU = 14336
EPS = 1e-6
EAGER_DECODE = (16, 1024, 64)           # eager call cost: decode batch, context, block size
EAGER_PREFILL = 128                    # eager call cost: prefill tokens (one sequence)
TORCH_DECODE_MAX_KV_BYTES = 1.2e9      # torch's gather+SDPA copies the whole KV: keep it to the small cases

MOE_MODELS = {
    "mixtral-8x7b": dict(experts=8, topk=2, hidden=4096, inter=14336),
    "qwen3-30b-a3b": dict(experts=128, topk=8, hidden=2048, inter=768),
}


# ------------------------------------------------------------------------------------------------- grids
def grid(part: str, quick: bool) -> list[dict]:
    """The cases of a benchmark part (the anchor shapes of the speed goals; a subset when quick)."""
    if part == "decode":
        batches, ctxs = ((1, 256), (1024, 16384)) if quick else ((1, 16, 64, 256), (1024, 4096, 16384))
        return [dict(batch=b, ctx=c, block=bs) for bs in (64, 16) for b in batches for c in ctxs]
    if part in ("prefill", "paged_prefill"):
        shapes = ((4, 2048),) if quick else ((16, 512), (4, 2048), (1, 8192))
        cases = [dict(seqs=s, seqlen=l) for s, l in shapes]
        if part == "paged_prefill":  # chunked prefill: 256 new tokens over a 16k history (split-KV at batch 1)
            chunked = ((1, 64),) if quick else ((1, 64), (8, 64), (1, 16), (8, 16))
            cases += [dict(seqs=s, seqlen=256, block=b, history=16384) for s, b in chunked]
        return cases
    if part == "fill":
        cases = [dict(kind="decode", tokens=256, block=64), dict(kind="prefill", tokens=8192, block=64)]
        return cases + [dict(kind="rotary_fill", tokens=8192, block=64)]
    if part in ("norm", "rotary", "act"):
        return [dict(tokens=t) for t in ((1, 8192) if quick else (1, 256, 8192))]
    if part == "moe":
        tokens = (64, 4096) if quick else (1, 64, 512, 4096)
        return [dict(model=m, tokens=t) for m in MOE_MODELS for t in tokens]
    if part == "moe_serving":
        cases = [dict(model="qwen3-30b-a3b", tokens=t, routing=r) for t in (256, 2048, 8192)
                 for r in ("uniform", "skewed")]
        cases += [dict(model="mixtral-8x7b", tokens=t, routing="uniform") for t in (256, 8192)]
        return cases[2:4] if quick else cases
    if part == "gating":
        tokens = (4096,) if quick else (1, 64, 512, 4096)
        return [dict(model=m, tokens=t) for m in MOE_MODELS for t in tokens]
    if part == "eager":
        return [dict(calls=1000, passes=2 if quick else 4)]
    return []


# ----------------------------------------------------------------------------------------------- helpers
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (inf when ``out`` has a NaN/inf or the shapes differ)."""
    if tuple(out.shape) != tuple(ref.shape):
        return float("inf")
    o, r = out.double(), ref.double()
    if not bool(torch.isfinite(o).all()):
        return float("inf")
    denom = float(r.norm())
    return float((o - r).norm()) / (denom if denom > 0 else 1.0)


def _fmt_case(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        pass
    return "unknown"


class Suite:
    def __init__(self, args: argparse.Namespace, out_path: Path, deadline: float | None = None):
        self.args = args
        self.quick = args.quick
        self.out_path = out_path
        self.deadline = deadline if deadline is not None else time.perf_counter() + args.budget_s
        self.device = torch.device("cuda")
        self.flush: timing.Flusher | None = None
        self.ceilings: timing.Ceilings | None = None
        self.lmd: peers.LmdeployKernels | None = None
        self.lmd_error = ""
        if args.append and out_path.exists():
            # Continue a run (after a CUDA fault, the suite restarts itself here): same meta, same ceilings.
            self.data = json.loads(out_path.read_text())
            self.data["meta"].setdefault("continued_by", []).append(" ".join([Path(sys.executable).name] + sys.argv))
            if self.data.get("ceilings"):
                c = self.data["ceilings"]
                self.ceilings = timing.Ceilings(copy_gbps=c["copy_gbps"], matmul_tflops=c["matmul_tflops"],
                                                copy_bytes=c.get("copy_bytes", 0))
        else:
            self.data = {"meta": self._meta(), "parts": {}, "records": [], "eager": {}, "check": {}}
        self.save()

    # ------------------------------------------------------------------------------------------ metadata
    def _meta(self) -> dict:
        import triton

        props = torch.cuda.get_device_properties(0)
        return {
            "card": torch.cuda.get_device_name(0),
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": self.args.commit or _git_commit(),
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "quick": self.quick,
            "parts": self.args.parts,
            "dtype": str(DTYPE).replace("torch.", ""),
        }

    def remaining(self) -> float:
        """Seconds left of ``--budget-s``."""
        return self.deadline - time.perf_counter()

    def cases(self, part: str):
        """The part's cases while the budget lasts; the rest are recorded as skipped."""
        cases = grid(part, self.quick)
        for i, params in enumerate(cases):
            if self.remaining() < 5:
                left = [_fmt_case(c) for c in cases[i:]]
                self.data.setdefault("budget_skipped", {})[part] = left
                print(f"  budget spent: {len(left)} case(s) of {part} not run", flush=True)
                return
            t0 = time.perf_counter()
            yield params
            print(f"  ({part} {_fmt_case(params)}: {time.perf_counter() - t0:.1f} s)", flush=True)

    def save(self) -> None:
        tmp = self.out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.out_path)

    # ------------------------------------------------------------------------------------------- set-up
    def prepare_bench(self) -> None:
        import dlinfer
        from dlinfer.vendor import registry

        if self.flush is None:
            self.flush = timing.Flusher(self.device)
        triton_vendor = registry.vendors().get("triton")
        if triton_vendor is None:
            raise RuntimeError(f"the triton vendor did not load: {registry.load_errors().get('triton')}")
        self.triton_vendor = triton_vendor
        dlinfer.vendor.set_override("triton")
        self.data["meta"]["triton_vendor_ops"] = sorted(triton_vendor.ops)
        if self.lmd is None and not self.lmd_error:
            try:
                self.lmd = peers.load_lmdeploy()
                self.data["meta"]["peer"] = f"lmdeploy {self.lmd.version} ({self.lmd.root})"
            except Exception as exc:  # noqa: BLE001 - the suite runs without the peer, and says so
                self.lmd_error = f"{type(exc).__name__}: {exc}"
                self.data["meta"]["peer_error"] = self.lmd_error
                print(f"  peer not loaded: {self.lmd_error}", flush=True)

    def measure_ceilings(self) -> None:
        self.ceilings = timing.measure_ceilings(self.device)
        self.data["ceilings"] = self.ceilings.to_dict()
        print(f"  ceilings: copy {self.ceilings.copy_gbps:.0f} GB/s, bf16 matmul "
              f"{self.ceilings.matmul_tflops:.0f} TFLOP/s", flush=True)

    def provides(self, op: str) -> str:
        """'' when the triton vendor serves ``op``, else why not."""
        if op not in self.triton_vendor.ops:
            return f"the triton vendor does not provide {op}"
        return ""

    # -------------------------------------------------------------------------------------------- rows
    def measure(self, part: str, op: str, params: dict, impl: str, fn: Callable[[], object], *,
                nbytes: float, flops: float = 0.0, check: Callable[[object], float] | None = None,
                tol: float = 2e-2, graph: bool = True, prepare: Callable[[], None] | None = None,
                note: str = "") -> object:
        """Check then time one implementation on one case; append the record; return the checked output.

        ``check(output) -> error`` compares the output of one call (after ``prepare()``, which resets in-place
        inputs) with the oracle; ``tol`` bounds it. A failed check is recorded and the row still timed.
        """
        rec = {"part": part, "op": op, "case": _fmt_case(params), "params": params, "impl": impl,
               "bytes": float(nbytes), "flops": float(flops), "note": note}
        out = None
        try:
            if prepare is not None:
                prepare()
            out = fn()
            torch.cuda.synchronize()
            if check is not None:
                err = float(check(out))
                rec["check"] = {"rel_err": err, "tol": tol, "ok": bool(err <= tol)}
            t = timing.gpu_time(fn, self.flush, graph=graph)
            rec.update(t.to_dict())
            rec.update(timing.rates(nbytes, flops, t.us, self.ceilings.copy_gbps, self.ceilings.matmul_tflops))
        except Exception as exc:  # noqa: BLE001 - one broken row must not stop the part
            torch.cuda.synchronize()
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        self.data["records"].append(rec)
        status = rec.get("error") or (f"{rec['us']:.1f} us" + (f", {rec['pct_bound']:.0f}% of bound"
                                                               if rec.get("pct_bound") else ""))
        if rec.get("check") and not rec["check"]["ok"]:
            status += f"  CHECK FAILED (rel err {rec['check']['rel_err']:.2e})"
        print(f"    {op:<26} {rec['case']:<40} {impl:<10} {status}", flush=True)
        return out

    def skip(self, part: str, op: str, params: dict, impl: str, why: str) -> None:
        self.data["records"].append({"part": part, "op": op, "case": _fmt_case(params), "params": params,
                                     "impl": impl, "skipped": why})

    # -------------------------------------------------------------------------------------------- parts
    def run(self, part: str) -> None:
        getattr(self, f"part_{part}")()

    def part_ceilings(self) -> None:
        if self.ceilings is not None and self.args.append:
            print("  ceilings: kept from the run being continued", flush=True)
            return
        self.measure_ceilings()

    def part_check(self) -> None:
        """``dlinfer check --vendor triton --device cuda`` and pytest tests/gpu, each in a process of its own
        (a kernel fault there must not poison this process's CUDA context)."""
        share = 0.75 if "graphs" in self.args.parts else 0.85
        conf = run_conformance_subprocess(self.quick, timeout=max(30.0, self.remaining() * share))
        self.data["check"]["conformance"] = conf
        self.data["check"]["conformance_ok"] = bool(conf.get("ok"))
        self.save()
        ignore = ["tests/gpu/test_cuda_graphs.py"] if "graphs" in self.args.parts else []
        files = [f for f in sorted((ROOT / "tests" / "gpu").glob("test_*.py"))
                 if str(f.relative_to(ROOT)) not in ignore]
        if files:
            self.data["check"]["pytest_gpu"] = run_pytest(["tests/gpu"], ignore,
                                                          timeout=max(30.0, self.remaining() - 5))
        else:
            self.data["check"]["pytest_gpu"] = {"passed": 0, "failed": 0, "skipped": 0, "failures": [],
                                                "note": "no tests/gpu files besides the graph tests (part graphs)"}
        if not conf.get("ok") or self.data["check"]["pytest_gpu"]["failed"]:
            raise RuntimeError("GPU correctness failed (see check.conformance / check.pytest_gpu)")

    def part_graphs(self) -> None:
        result = run_pytest(["tests/gpu/test_cuda_graphs.py"], [], timeout=max(30.0, self.remaining() - 5))
        self.data["check"]["pytest_graphs"] = result
        if result["failed"] or not result["passed"]:
            raise RuntimeError(f"CUDA-graph tests: {result['passed']} passed, {result['failed']} failed")

    # decode ------------------------------------------------------------------------------------------
    def part_decode(self) -> None:
        for params in self.cases("decode"):
            self._decode_case(**params)
            torch.cuda.empty_cache()

    def _decode_case(self, batch: int, ctx: int, block: int) -> None:
        import dlinfer.ops as ops
        from dlinfer.vendor.reference import attention as ref_attention

        params = dict(batch=batch, ctx=ctx, block=block)
        gen = torch.Generator(device=self.device).manual_seed(batch * 7919 + ctx + block)
        blocks_per_seq = -(-ctx // block)
        num_blocks = batch * blocks_per_seq
        k_cache = torch.randn(num_blocks, block, HK, HEAD, device=self.device, dtype=DTYPE, generator=gen)
        v_cache = torch.randn(num_blocks, block, HK, HEAD, device=self.device, dtype=DTYPE, generator=gen)
        table = torch.randperm(num_blocks, device=self.device, generator=gen).view(batch, blocks_per_seq)
        table = table.to(torch.int32)
        seqlens = torch.full((batch,), ctx, device=self.device, dtype=torch.int32)
        query = torch.randn(batch, HQ, HEAD, device=self.device, dtype=DTYPE, generator=gen)
        scale = 1.0 / math.sqrt(HEAD)
        kv_bytes = 2 * batch * ctx * HK * HEAD * DTYPE.itemsize
        nbytes = kv_bytes + 2 * query.numel() * DTYPE.itemsize + table.numel() * 4
        flops = 4.0 * batch * HQ * ctx * HEAD

        # Oracle: the reference vendor on (at most) 4 sequences, in float32.
        sub = min(batch, 4)
        ref = torch.empty(sub, HQ, HEAD, device=self.device, dtype=torch.float32)
        ref_attention.paged_decode_attention(query[:sub].float(), k_cache, v_cache, table[:sub], seqlens[:sub], ctx,
                                             scale, ref)

        def check(out):
            return rel_err(out[:sub], ref)

        why = self.provides("paged_decode_attention")
        if why:
            self.skip("decode", "paged_decode_attention", params, "dlinfer", why)
        else:
            out = torch.empty_like(query)

            def run_dlinfer():
                return ops.paged_decode_attention(query, k_cache, v_cache, table, block, None, seqlens, ctx, HQ, HK,
                                                  attn_output=out)

            self.measure("decode", "paged_decode_attention", params, "dlinfer", run_dlinfer, nbytes=nbytes,
                         flops=flops, check=check, prepare=lambda: out.fill_(float("nan")))
        if self.lmd is not None:
            self.measure("decode", "paged_decode_attention", params, "lmdeploy",
                         lambda: peers.lmdeploy_paged_decode(self.lmd, query, k_cache, v_cache, table, seqlens, scale),
                         nbytes=nbytes, flops=flops, check=check)
        else:
            self.skip("decode", "paged_decode_attention", params, "lmdeploy", self.lmd_error)
        if kv_bytes <= TORCH_DECODE_MAX_KV_BYTES:
            self.measure("decode", "paged_decode_attention", params, "torch",
                         lambda: peers.torch_paged_decode(query, k_cache, v_cache, table, ctx, scale),
                         nbytes=nbytes, flops=flops, check=check, note="gather + SDPA")
        else:
            self.skip("decode", "paged_decode_attention", params, "torch",
                      f"gather + SDPA copies {kv_bytes / 1e9:.1f} GB of KV; run only up to "
                      f"{TORCH_DECODE_MAX_KV_BYTES / 1e9:.1f} GB")

    # prefill ----------------------------------------------------------------------------------------
    def _prefill_inputs(self, seqs: int, seqlen: int):
        gen = torch.Generator(device=self.device).manual_seed(seqs * 131 + seqlen)
        tokens = seqs * seqlen
        q = torch.randn(tokens, HQ, HEAD, device=self.device, dtype=DTYPE, generator=gen)
        k = torch.randn(tokens, HK, HEAD, device=self.device, dtype=DTYPE, generator=gen)
        v = torch.randn(tokens, HK, HEAD, device=self.device, dtype=DTYPE, generator=gen)
        lens = torch.full((seqs,), seqlen, device=self.device, dtype=torch.int32)
        cu = torch.arange(0, tokens + 1, seqlen, device=self.device, dtype=torch.int32)
        # FLOPs of causal attention as FlashAttention counts them: 4 * S^2 * H * D / 2 per sequence.
        flops = 4.0 * seqs * seqlen * seqlen * HQ * HEAD / 2
        nbytes = (2 * q.numel() + k.numel() + v.numel()) * DTYPE.itemsize
        return q, k, v, lens, cu, flops, nbytes

    def _sdpa_oracle(self, q, k, v, seqs, seqlen, scale):
        group = HQ // HK
        q4 = q.view(seqs, seqlen, HQ, HEAD).transpose(1, 2).contiguous()
        k4 = k.view(seqs, seqlen, HK, HEAD).repeat_interleave(group, dim=2).transpose(1, 2).contiguous()
        v4 = v.view(seqs, seqlen, HK, HEAD).repeat_interleave(group, dim=2).transpose(1, 2).contiguous()
        return q4, k4, v4

    @staticmethod
    def _sdpa_output(q4, k4, v4, scale) -> torch.Tensor:
        """Causal SDPA as ``[T, H, D]``: cuDNN, else FlashAttention-2, else torch's default choice."""
        import torch.nn.functional as F

        for backend in ("cudnn", "flash"):
            try:
                return peers.torch_prefill_sdpa(q4, k4, v4, scale, backend).transpose(1, 2).flatten(0, 1)
            except RuntimeError as exc:
                print(f"    (SDPA {backend} unavailable as the oracle: {str(exc)[:120]})", flush=True)
        return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale).transpose(1, 2).flatten(0, 1)

    def _torch_prefill_rows(self, part, op, params, q4, k4, v4, scale, nbytes, flops, check, varlen=None):
        """torch's SDPA on equal-length ``[B, H, S, D]`` batches with K/V pre-expanded (the reference points), and,
        given ``varlen = (q, k, v, cu, max_seqlen)``, torch's varlen library kernels on the packed GQA layout the
        ops take (what a library-backed path of the registry could serve for unequal lengths)."""
        for impl, backend in (("torch", "cudnn"), ("torch_fa2", "flash")):
            self.measure(part, op, params, impl, lambda b=backend: peers.torch_prefill_sdpa(q4, k4, v4, scale, b),
                         nbytes=nbytes, flops=flops, check=lambda o: check(o.transpose(1, 2).flatten(0, 1)),
                         note=f"SDPA {backend}, K/V pre-expanded to {HQ} heads (not timed)")
        if varlen is not None:
            q, k, v, cu, max_seqlen = varlen
            for impl, backend in (("torch_cudnn_varlen", "cudnn"), ("torch_fa2_varlen", "fa2")):
                self.measure(part, op, params, impl,
                             lambda b=backend: peers.torch_prefill_varlen(q, k, v, cu, max_seqlen, scale, b),
                             nbytes=nbytes, flops=flops, check=check,
                             note=f"torch varlen {backend} on packed [T, H, D], {HQ}/{HK} heads (GQA, no expansion)")

    def part_prefill(self) -> None:
        for params in self.cases("prefill"):
            self._prefill_case(**params)
            torch.cuda.empty_cache()

    def _prefill_case(self, seqs: int, seqlen: int) -> None:
        import dlinfer.ops as ops

        params = dict(seqs=seqs, seqlen=seqlen)
        q, k, v, lens, cu, flops, nbytes = self._prefill_inputs(seqs, seqlen)
        scale = 1.0 / math.sqrt(HEAD)
        q4, k4, v4 = self._sdpa_oracle(q, k, v, seqs, seqlen, scale)
        # Oracle: cuDNN SDPA's bf16 output over every token, itself checked against the reference vendor
        # (float32) on the first 256 queries of sequence 0 (a full float32 reference would cost O(S^2) memory).
        from dlinfer.vendor.reference import attention as ref_attention

        head_q = min(seqlen, 256)
        ref_head = torch.empty(head_q, HQ, HEAD, device=self.device, dtype=torch.float32)
        starts = torch.tensor([0, min(int(lens[0]), head_q)], device=self.device, dtype=torch.int32)
        ref_attention.prefill_attention(q[:head_q].float(), k[:head_q].float(), v[:head_q].float(),
                                        starts, starts, head_q, scale, True, ref_head)
        ref_full = self._sdpa_output(q4, k4, v4, scale)
        head_err = rel_err(ref_full[:head_q], ref_head)
        if head_err > 2e-2:
            raise RuntimeError(f"cuDNN SDPA disagrees with the reference vendor (rel err {head_err:.2e})")

        def check(out):
            return rel_err(out, ref_full)

        op = "prefill_attention"
        why = self.provides(op)
        if why:
            self.skip("prefill", op, params, "dlinfer", why)
        else:
            out = torch.empty_like(q)
            self.measure("prefill", op, params, "dlinfer",
                         lambda: ops.prefill_attention(q, k, v, None, None, lens, lens, seqlen, HQ, HK, [None],
                                                       softmax_scale=scale, attn_output=out),
                         nbytes=nbytes, flops=flops, check=check, prepare=lambda: out.fill_(float("nan")))
        if self.lmd is not None:
            self.measure("prefill", op, params, "lmdeploy",
                         lambda: peers.lmdeploy_prefill(self.lmd, q, k, v, cu, cu, seqlen, seqlen, scale),
                         nbytes=nbytes, flops=flops, check=check)
        else:
            self.skip("prefill", op, params, "lmdeploy", self.lmd_error)
        self._torch_prefill_rows("prefill", op, params, q4, k4, v4, scale, nbytes, flops, check,
                                 varlen=(q, k, v, cu, seqlen))

    def part_paged_prefill(self) -> None:
        for params in self.cases("paged_prefill"):
            self._paged_prefill_case(**params)
            torch.cuda.empty_cache()

    def _paged_prefill_case(self, seqs: int, seqlen: int, block: int = 64, history: int = 0) -> None:
        if history:
            return self._chunked_prefill_case(seqs, seqlen, block, history)
        params = dict(seqs=seqs, seqlen=seqlen, block=block)
        q, k, v, lens, cu, flops, nbytes = self._prefill_inputs(seqs, seqlen)
        scale = 1.0 / math.sqrt(HEAD)
        gen = torch.Generator(device=self.device).manual_seed(seqs + seqlen + 1)
        blocks_per_seq = -(-seqlen // block)
        num_blocks = seqs * blocks_per_seq
        table = torch.randperm(num_blocks, device=self.device, generator=gen).view(seqs, blocks_per_seq)
        pos = torch.arange(seqlen, device=self.device)
        slots = (table.long()[:, pos // block] * block + pos % block).flatten()
        k_cache = torch.empty(num_blocks, block, HK, HEAD, device=self.device, dtype=DTYPE)
        v_cache = torch.empty_like(k_cache)
        k_cache.view(-1, HK, HEAD)[slots] = k
        v_cache.view(-1, HK, HEAD)[slots] = v
        table = table.to(torch.int32)
        q4, k4, v4 = self._sdpa_oracle(q, k, v, seqs, seqlen, scale)
        ref_full = self._sdpa_output(q4, k4, v4, scale)

        def check(out):
            return rel_err(out, ref_full)

        self._paged_prefill_rows(params, q, k_cache, v_cache, table, block, cu, cu, lens, seqlen, seqlen, scale,
                                 nbytes, flops, check)
        self._torch_prefill_rows("paged_prefill", "paged_prefill_attention", params, q4, k4, v4, scale, nbytes, flops,
                                 check)

    def _paged_prefill_rows(self, params, q, k_cache, v_cache, table, block, cu_q, cu_k, kv_lens, max_q, max_kv,
                            scale, nbytes, flops, check) -> None:
        """The dlinfer and peer rows of one paged prefill case (``cu_q`` / ``cu_k``: ``[B + 1]`` start offsets of the
        queries and of the flattened keys)."""
        import dlinfer.ops as ops

        op = "paged_prefill_attention"
        why = self.provides(op)
        if why:
            self.skip("paged_prefill", op, params, "dlinfer", why)
        else:
            out = torch.empty_like(q)
            self.measure("paged_prefill", op, params, "dlinfer",
                         lambda: ops.paged_prefill_attention(q, None, None, k_cache, v_cache, table, block, cu_q[1:],
                                                             kv_lens, max_q, max_kv, HQ, HK, [None],
                                                             softmax_scale=scale, attn_output=out),
                         nbytes=nbytes, flops=flops, check=check, prepare=lambda: out.fill_(float("nan")))
        if self.lmd is not None:
            kv_total = int(cu_k[-1])
            self.measure("paged_prefill", op, params, "lmdeploy",
                         lambda: peers.lmdeploy_paged_prefill(self.lmd, q, k_cache, v_cache, table, cu_q, cu_k, kv_lens,
                                                              cu_k[:-1], max_q, max_kv, kv_total, scale),
                         nbytes=nbytes, flops=flops, check=check, note="flatten_kv_cache + flash_attn_varlen_func")
        else:
            self.skip("paged_prefill", op, params, "lmdeploy", self.lmd_error)

    def _chunked_prefill_case(self, seqs: int, seqlen: int, block: int, history: int) -> None:
        """``seqlen`` new tokens per sequence over ``history`` cached ones (the cache holds both, shuffled blocks):
        dlinfer and the peer (flatten the cache, then flash attention), checked against the reference vendor in
        float32. No torch row: SDPA's ``is_causal`` aligns the diagonal top-left, not with the history."""
        from dlinfer.vendor.reference import attention as ref_attention

        params = dict(seqs=seqs, seqlen=seqlen, block=block, history=history)
        kv = history + seqlen
        scale = 1.0 / math.sqrt(HEAD)
        gen = torch.Generator(device=self.device).manual_seed(seqs * 7 + block + history)
        blocks_per_seq = -(-kv // block)
        num_blocks = seqs * blocks_per_seq
        table = torch.randperm(num_blocks, device=self.device, generator=gen).view(seqs, blocks_per_seq).int()
        k_cache = torch.randn(num_blocks, block, HK, HEAD, device=self.device, dtype=DTYPE, generator=gen)
        v_cache = torch.randn(num_blocks, block, HK, HEAD, device=self.device, dtype=DTYPE, generator=gen)
        q = torch.randn(seqs * seqlen, HQ, HEAD, device=self.device, dtype=DTYPE, generator=gen)
        cu_q = torch.arange(0, seqs * seqlen + 1, seqlen, device=self.device, dtype=torch.int32)
        cu_k = torch.arange(0, seqs * kv + 1, kv, device=self.device, dtype=torch.int32)
        kv_lens = torch.full((seqs,), kv, device=self.device, dtype=torch.int32)
        ref = torch.empty(seqs * seqlen, HQ, HEAD, device=self.device, dtype=torch.float32)
        ref_attention.paged_prefill_attention(q.float(), k_cache, v_cache, table, cu_q, kv_lens, seqlen, kv, scale,
                                              True, ref)
        # FLOPs of the visible scores: query i of a sequence sees history + i + 1 keys.
        flops = 4.0 * HQ * HEAD * seqs * (seqlen * history + seqlen * (seqlen + 1) / 2)
        nbytes = (2 * q.numel() + 2 * seqs * kv * HK * HEAD) * DTYPE.itemsize

        def check(out):
            return rel_err(out, ref)

        self._paged_prefill_rows(params, q, k_cache, v_cache, table, block, cu_q, cu_k, kv_lens, seqlen, kv, scale,
                                 nbytes, flops, check)

    # fill ------------------------------------------------------------------------------------------
    def part_fill(self) -> None:
        for params in self.cases("fill"):
            self._fill_case(**params)
            torch.cuda.empty_cache()

    def _fill_case(self, kind: str, tokens: int, block: int) -> None:
        import dlinfer.ops as ops

        params = dict(kind=kind, tokens=tokens, block=block)
        gen = torch.Generator(device=self.device).manual_seed(tokens + block)
        if kind == "decode":        # one new token per sequence, after a random history of < 1024 tokens
            seqs, new = tokens, 1
            history = torch.randint(0, 1023, (seqs,), device=self.device, generator=gen)
        else:                       # 4 sequences of 2048 new tokens, no history
            seqs, new = 4, tokens // 4
            history = torch.zeros(seqs, dtype=torch.int64, device=self.device)
        kv_lens = history + new
        blocks_per_seq = -(-int(kv_lens.max()) // block)
        num_blocks = seqs * blocks_per_seq
        table = torch.randperm(num_blocks, device=self.device, generator=gen).view(seqs, blocks_per_seq)
        pos = (history[:, None] + torch.arange(new, device=self.device)[None, :])          # [seqs, new]
        slots = (table.gather(1, pos // block) * block + pos % block).flatten()
        table32, slots32 = table.to(torch.int32), slots.to(torch.int32)
        q_lens = torch.full((seqs,), new, device=self.device, dtype=torch.int32)
        q_start = torch.arange(0, seqs * new, new, device=self.device, dtype=torch.int32)
        kv_lens32 = kv_lens.to(torch.int32)
        key = torch.randn(tokens, HK, HEAD, device=self.device, dtype=DTYPE, generator=gen)
        value = torch.randn(tokens, HK, HEAD, device=self.device, dtype=DTYPE, generator=gen)
        k_cache = torch.empty(num_blocks, block, HK, HEAD, device=self.device, dtype=DTYPE)
        v_cache = torch.empty_like(k_cache)
        nbytes = 2 * (key.numel() + value.numel()) * DTYPE.itemsize + tokens * 4

        def poison():
            k_cache.fill_(float("nan"))
            v_cache.fill_(float("nan"))

        if kind == "rotary_fill":
            self._rotary_fill_case(params, key, value, k_cache, v_cache, slots32, table32, q_start, q_lens,
                                   kv_lens32, new, poison, gen)
            return

        def check(_):
            got_k = k_cache.view(-1, HK, HEAD)[slots]
            got_v = v_cache.view(-1, HK, HEAD)[slots]
            return 0.0 if torch.equal(got_k, key) and torch.equal(got_v, value) else float("inf")

        op = "fill_kv_cache"
        why = self.provides(op)
        if why:
            self.skip("fill", op, params, "dlinfer", why)
        else:
            self.measure("fill", op, params, "dlinfer",
                         lambda: ops.fill_kv_cache(key, value, k_cache, v_cache, slots32),
                         nbytes=nbytes, check=check, tol=0.0, prepare=poison)
        if self.lmd is not None:
            self.measure("fill", op, params, "lmdeploy",
                         lambda: peers.lmdeploy_fill_kv_cache(self.lmd, key, value, k_cache, v_cache, q_start, q_lens,
                                                              kv_lens32, new, table32),
                         nbytes=nbytes, check=check, tol=0.0, prepare=poison)
        else:
            self.skip("fill", op, params, "lmdeploy", self.lmd_error)
        self.measure("fill", op, params, "torch",
                     lambda: peers.torch_fill_kv_cache(key, value, k_cache, v_cache, slots),
                     nbytes=nbytes, check=check, tol=0.0, prepare=poison, note="index_copy_")

    def _rotary_fill_case(self, params, key, value, k_cache, v_cache, slots32, table32, q_start, q_lens, kv_lens32,
                          new, poison, gen) -> None:
        """Rotary on q/k views of a fused qkv, then the KV write: dlinfer's fused op vs the two-kernel paths."""
        import dlinfer.ops as ops
        from dlinfer.vendor.reference import rotary as ref_rotary

        tokens = key.shape[0]
        qkv0 = torch.randn(tokens, (HQ + 2 * HK) * HEAD, device=self.device, dtype=DTYPE, generator=gen)
        qkv = qkv0.clone()
        q = qkv[:, :HQ * HEAD].view(tokens, HQ, HEAD)
        k = qkv[:, HQ * HEAD:(HQ + HK) * HEAD].view(tokens, HK, HEAD)
        v = qkv[:, (HQ + HK) * HEAD:].view(tokens, HK, HEAD)
        cos, sin = _rope_tables(tokens, HEAD, self.device, gen)
        ref_q = qkv0[:, :HQ * HEAD].view(tokens, HQ, HEAD).clone()
        ref_k = qkv0[:, HQ * HEAD:(HQ + HK) * HEAD].view(tokens, HK, HEAD).clone()
        ref_rotary.apply_rotary_pos_emb(ref_q, ref_k, cos, sin)
        slots = slots32.long()

        def prepare():
            qkv.copy_(qkv0)
            poison()

        def check(_):
            got_k = k_cache.view(-1, HK, HEAD)[slots]
            got_v = v_cache.view(-1, HK, HEAD)[slots]
            if not torch.equal(got_v, v):
                return float("inf")
            return max(rel_err(q, ref_q), rel_err(k, ref_k), rel_err(got_k, ref_k))

        # Rotating in place again on every timed call keeps the data a rotation of random values.
        # Fewest bytes: q and k read and written back, k and v written to the cache, v and cos/sin read.
        nbytes = ((2 * q.numel() + 3 * k.numel() + 2 * v.numel()) * DTYPE.itemsize
                  + 2 * cos.numel() * cos.element_size() + tokens * 4)
        op = "apply_rotary_pos_emb_fill_kv_cache"
        why = self.provides(op)
        if why:
            self.skip("fill", op, params, "dlinfer", why)
        else:
            self.measure("fill", op, params, "dlinfer",
                         lambda: ops.apply_rotary_pos_emb_fill_kv_cache(q, k, v, k_cache, v_cache, cos, sin, slots32),
                         nbytes=nbytes, check=check, tol=1e-2, prepare=prepare, note="one fused kernel")
        if not self.provides("apply_rotary_pos_emb") and not self.provides("fill_kv_cache"):
            def two_ops():
                ops.apply_rotary_pos_emb(q, k, cos, sin)
                ops.fill_kv_cache(k, v, k_cache, v_cache, slots32)

            self.measure("fill", op, params, "dlinfer_2op", two_ops, nbytes=nbytes, check=check, tol=1e-2,
                         prepare=prepare, note="dlinfer rotary then dlinfer fill_kv_cache")
        if self.lmd is not None:
            def lmd_two():
                peers.lmdeploy_rotary(self.lmd, q, k, cos, sin)
                peers.lmdeploy_fill_kv_cache(self.lmd, k, v, k_cache, v_cache, q_start, q_lens, kv_lens32, new,
                                             table32)

            self.measure("fill", op, params, "lmdeploy", lmd_two, nbytes=nbytes, check=check, tol=1e-2,
                         prepare=prepare, note="lmdeploy rotary then lmdeploy fill_kv_cache")

    # norm / rotary / act -------------------------------------------------------------------------------
    def part_norm(self) -> None:
        import dlinfer.ops as ops
        from dlinfer.vendor.reference import norm as ref_norm

        for params in self.cases("norm"):
            tokens = params["tokens"]
            gen = torch.Generator(device=self.device).manual_seed(tokens)
            x = torch.randn(tokens, HIDDEN, device=self.device, dtype=DTYPE, generator=gen)
            r = torch.randn(tokens, HIDDEN, device=self.device, dtype=DTYPE, generator=gen)
            w = 1.0 + 0.1 * torch.randn(HIDDEN, device=self.device, dtype=DTYPE, generator=gen)
            ref = ref_norm.rms_norm(x, w, EPS)
            ref_add = ref_norm.add_rms_norm(x, r, w, EPS)
            nbytes = 2 * x.numel() * DTYPE.itemsize + w.numel() * DTYPE.itemsize
            op = "rms_norm"
            rows = [("dlinfer", lambda: ops.rms_norm(x, w, EPS), self.provides(op)),
                    ("lmdeploy", lambda: peers.lmdeploy_rms_norm(self.lmd, x, w, EPS), self._lmd_missing()),
                    ("torch", lambda: peers.torch_rms_norm(x, w, EPS), "")]
            for impl, fn, why in rows:
                if why:
                    self.skip("norm", op, params, impl, why)
                else:
                    self.measure("norm", op, params, impl, fn, nbytes=nbytes, check=lambda o: rel_err(o, ref),
                                 tol=1e-2, note="HF LlamaRMSNorm formula" if impl == "torch" else "")
            op = "add_rms_norm"
            nbytes = 4 * x.numel() * DTYPE.itemsize + w.numel() * DTYPE.itemsize

            def check_add(o):
                return max(rel_err(o[0], ref_add[0]), rel_err(o[1], ref_add[1]))

            rows = [("dlinfer", lambda: ops.add_rms_norm(x, r, w, EPS), self.provides(op)),
                    ("lmdeploy", lambda: peers.lmdeploy_add_rms_norm(self.lmd, x, r, w, EPS), self._lmd_missing()),
                    ("torch", lambda: peers.torch_add_rms_norm(x, r, w, EPS), "")]
            for impl, fn, why in rows:
                if why:
                    self.skip("norm", op, params, impl, why)
                else:
                    self.measure("norm", op, params, impl, fn, nbytes=nbytes, check=check_add, tol=1e-2,
                                 note="add, then HF formula" if impl == "torch" else "")

    def _lmd_missing(self) -> str:
        return "" if self.lmd is not None else (self.lmd_error or "lmdeploy not loaded")

    def part_rotary(self) -> None:
        import dlinfer.ops as ops
        from dlinfer.vendor.reference import rotary as ref_rotary

        op = "apply_rotary_pos_emb"
        for params in self.cases("rotary"):
            tokens = params["tokens"]
            gen = torch.Generator(device=self.device).manual_seed(tokens + 5)
            qkv0 = torch.randn(tokens, (HQ + 2 * HK) * HEAD, device=self.device, dtype=DTYPE, generator=gen)
            qkv = qkv0.clone()
            q = qkv[:, :HQ * HEAD].view(tokens, HQ, HEAD)
            k = qkv[:, HQ * HEAD:(HQ + HK) * HEAD].view(tokens, HK, HEAD)
            cos, sin = _rope_tables(tokens, HEAD, self.device, gen)
            ref_q = qkv0[:, :HQ * HEAD].view(tokens, HQ, HEAD).clone()
            ref_k = qkv0[:, HQ * HEAD:(HQ + HK) * HEAD].view(tokens, HK, HEAD).clone()
            ref_rotary.apply_rotary_pos_emb(ref_q, ref_k, cos, sin)
            nbytes = 2 * (q.numel() + k.numel()) * DTYPE.itemsize + 2 * cos.numel() * cos.element_size()

            def check(_):
                return max(rel_err(q, ref_q), rel_err(k, ref_k))

            rows = [("dlinfer", lambda: ops.apply_rotary_pos_emb(q, k, cos, sin), self.provides(op)),
                    ("lmdeploy", lambda: peers.lmdeploy_rotary(self.lmd, q, k, cos, sin), self._lmd_missing()),
                    ("torch", lambda: peers.torch_rotary(q, k, cos, sin), "")]
            for impl, fn, why in rows:
                if why:
                    self.skip("rotary", op, params, impl, why)
                else:
                    self.measure("rotary", op, params, impl, fn, nbytes=nbytes, check=check, tol=1e-2,
                                 prepare=lambda: qkv.copy_(qkv0),
                                 note="in place on q/k views of a fused qkv" + (", HF formula + copy_" if
                                                                                 impl == "torch" else ""))

    def part_act(self) -> None:
        import dlinfer.ops as ops
        from dlinfer.vendor.reference import activation as ref_act

        op = "silu_and_mul"
        for params in self.cases("act"):
            tokens = params["tokens"]
            gen = torch.Generator(device=self.device).manual_seed(tokens + 9)
            x = torch.randn(tokens, 2 * INTER_SILU, device=self.device, dtype=DTYPE, generator=gen)
            ref = ref_act.silu_and_mul(x)
            nbytes = 3 * tokens * INTER_SILU * DTYPE.itemsize
            rows = [("dlinfer", lambda: ops.silu_and_mul(x), self.provides(op)),
                    ("lmdeploy", lambda: peers.lmdeploy_silu_and_mul(self.lmd, x), self._lmd_missing()),
                    ("torch", lambda: peers.torch_silu_and_mul(x), "")]
            for impl, fn, why in rows:
                if why:
                    self.skip("act", op, params, impl, why)
                else:
                    self.measure("act", op, params, impl, fn, nbytes=nbytes, check=lambda o: rel_err(o, ref), tol=1e-2)

    # moe ---------------------------------------------------------------------------------------------
    def part_moe(self, part: str = "moe") -> None:
        current = None
        weights = None
        for params in self.cases(part):
            if params["model"] != current:
                weights = None
                torch.cuda.empty_cache()
                current = params["model"]
                weights = self._moe_weights(**MOE_MODELS[current])
            self._moe_case(part, params, weights, **MOE_MODELS[current])
            torch.cuda.empty_cache()

    def part_moe_serving(self) -> None:
        self.part_moe(part="moe_serving")

    def _moe_weights(self, experts, topk, hidden, inter):
        gen = torch.Generator(device=self.device).manual_seed(experts * 17 + hidden)
        gate_up = torch.randn(experts, 2 * inter, hidden, device=self.device, dtype=DTYPE, generator=gen)
        gate_up.mul_(hidden ** -0.5)
        down = torch.randn(experts, hidden, inter, device=self.device, dtype=DTYPE, generator=gen)
        down.mul_(inter ** -0.5)
        return gate_up, down

    def _moe_case(self, part, params, weights, experts, topk, hidden, inter) -> None:
        import dlinfer.ops as ops
        from dlinfer.vendor.reference import moe as ref_moe

        gate_up, down = weights
        tokens = params["tokens"]
        gen = torch.Generator(device=self.device).manual_seed(tokens * 3 + experts)
        x = torch.randn(tokens, hidden, device=self.device, dtype=DTYPE, generator=gen)
        logits = torch.randn(tokens, experts, device=self.device, dtype=torch.float32, generator=gen)
        if params.get("routing") == "skewed":
            # a per-expert bias with a std of 1.5 logits: a few hot experts get several times the mean load
            logits += 1.5 * torch.randn(experts, device=self.device, dtype=torch.float32, generator=gen)
        topk_w, topk_ids = torch.topk(torch.softmax(logits, -1), topk, dim=-1)
        used = int(torch.unique(topk_ids).numel())
        if "routing" in params:
            load = torch.bincount(topk_ids.flatten(), minlength=experts).float()
            params = dict(params, max_load_x_mean=round(float(load.max() / load.mean()), 2))
        nbytes = used * 3 * hidden * inter * DTYPE.itemsize + 2 * x.numel() * DTYPE.itemsize
        flops = 6.0 * tokens * topk * hidden * inter
        params = dict(params, experts=experts, topk=topk, hidden=hidden, inter=inter, experts_used=used)
        # Oracle: the reference vendor on (at most) the first 256 tokens; tokens are independent in MoE.
        sub = min(tokens, 256)
        ref = ref_moe.fused_moe(x[:sub], gate_up, down, topk_w[:sub], topk_ids[:sub], True)
        op = "fused_moe"

        def check(o):
            return rel_err(o[:sub], ref)

        # the peer on dlinfer's tensors ("lmdeploy") and on its weights in the layout stock LMDeploy serves them in
        # ("lmdeploy_engine": N-fastest, faster for its kernel at decode sizes, slower at large token counts)
        engine = peers.lmdeploy_moe_weights(gate_up, down) if not self._lmd_missing() else (gate_up, down)
        order = [("lmdeploy", lambda: peers.lmdeploy_fused_moe(self.lmd, x, gate_up, down, topk_w, topk_ids, topk,
                                                                True), self._lmd_missing(), True),
                 ("lmdeploy_engine", lambda: peers.lmdeploy_fused_moe(self.lmd, x, *engine, topk_w, topk_ids, topk,
                                                                       True), self._lmd_missing(), True),
                 ("dlinfer", lambda: ops.fused_moe(x, gate_up, down, topk_w, topk_ids, topk, True), self.provides(op),
                  True),
                 ("torch", lambda: peers.torch_moe_expert_loop(x, gate_up, down, topk_w, topk_ids, True), "", False)]
        for impl, fn, why, graph in order:
            if why:
                self.skip(part, op, params, impl, why)
            else:
                self.measure(part, op, params, impl, fn, nbytes=nbytes, flops=flops, check=check, tol=3e-2,
                             graph=graph, note="expert loop (host syncs: eager events)" if impl == "torch" else "")

    def part_gating(self) -> None:
        import dlinfer.ops as ops

        op = "moe_gating_topk_softmax"
        for params in self.cases("gating"):
            cfg = MOE_MODELS[params["model"]]
            tokens, experts, topk = params["tokens"], cfg["experts"], cfg["topk"]
            params = dict(params, experts=experts, topk=topk)
            gen = torch.Generator(device=self.device).manual_seed(tokens + experts)
            logits = torch.randn(tokens, experts, device=self.device, dtype=torch.float32, generator=gen).to(DTYPE)
            probs = torch.softmax(logits.float(), -1)
            ref_w = torch.topk(probs, topk, dim=-1).values
            nbytes = logits.numel() * DTYPE.itemsize + tokens * topk * (4 + 8)

            def check(o):
                # bf16 logits tie often; torch.topk breaks ties in no fixed order. Tie-agnostic: the chosen
                # experts' probabilities must be the top-k values, and the returned weights those values.
                w, ids = o
                chosen = probs.gather(1, ids.long())
                return max(rel_err(w.float(), ref_w), rel_err(chosen, ref_w))

            rows = [("dlinfer", lambda: ops.moe_gating_topk_softmax(logits, topk, None), self.provides(op)),
                    ("torch", lambda: peers.torch_gating(logits, topk), "")]
            for impl, fn, why in rows:
                if why:
                    self.skip("gating", op, params, impl, why)
                else:
                    self.measure("gating", op, params, impl, fn, nbytes=nbytes, check=check, tol=1e-3,
                                 note="softmax + topk" if impl == "torch" else "")

    # eager call cost ---------------------------------------------------------------------------------
    def part_eager(self) -> None:
        """Host cost per call at one-decode-step shapes, every implementation interleaved in one loop."""
        import dlinfer.ops as ops
        from dlinfer.framework import batch as batch_layout

        dev = self.device
        calls = grid("eager", self.quick)[0]["calls"]
        g = torch.Generator(device=dev).manual_seed(1)
        fns: dict[str, Callable[[], object]] = {}
        pairs: dict[str, dict[str, str]] = {}
        floor_x = torch.empty(1, device=dev)
        fns["floor:noop_custom_op"] = lambda: timing.noop_custom_op(floor_x)

        def add(op, impl, fn, why=""):
            if why:
                pairs.setdefault(op, {})[impl] = f"skipped: {why}"
                return
            name = f"{op}:{impl}"
            fns[name] = fn
            pairs.setdefault(op, {})[impl] = name

        lmd_why = self._lmd_missing()
        x1 = torch.randn(1, HIDDEN, device=dev, dtype=DTYPE, generator=g)
        r1 = torch.randn(1, HIDDEN, device=dev, dtype=DTYPE, generator=g)
        w = torch.ones(HIDDEN, device=dev, dtype=DTYPE)
        add("rms_norm", "dlinfer", lambda: ops.rms_norm(x1, w, EPS), self.provides("rms_norm"))
        add("rms_norm", "lmdeploy", lambda: peers.lmdeploy_rms_norm(self.lmd, x1, w, EPS), lmd_why)
        add("add_rms_norm", "dlinfer", lambda: ops.add_rms_norm(x1, r1, w, EPS), self.provides("add_rms_norm"))
        add("add_rms_norm", "lmdeploy", lambda: peers.lmdeploy_add_rms_norm(self.lmd, x1, r1, w, EPS), lmd_why)
        xs = torch.randn(1, 2 * INTER_SILU, device=dev, dtype=DTYPE, generator=g)
        add("silu_and_mul", "dlinfer", lambda: ops.silu_and_mul(xs), self.provides("silu_and_mul"))
        add("silu_and_mul", "lmdeploy", lambda: peers.lmdeploy_silu_and_mul(self.lmd, xs), lmd_why)
        # one decode step: `batch` sequences of `ctx` tokens (block `block`), one new token each
        batch, ctx, block = EAGER_DECODE
        qkv = torch.randn(batch, (HQ + 2 * HK) * HEAD, device=dev, dtype=DTYPE, generator=g)
        q = qkv[:, :HQ * HEAD].view(batch, HQ, HEAD)
        k = qkv[:, HQ * HEAD:(HQ + HK) * HEAD].view(batch, HK, HEAD)
        v = qkv[:, (HQ + HK) * HEAD:].view(batch, HK, HEAD)
        cos, sin = _rope_tables(batch, HEAD, dev, g)
        add("apply_rotary_pos_emb", "dlinfer", lambda: ops.apply_rotary_pos_emb(q, k, cos, sin),
            self.provides("apply_rotary_pos_emb"))
        add("apply_rotary_pos_emb", "lmdeploy", lambda: peers.lmdeploy_rotary(self.lmd, q, k, cos, sin), lmd_why)
        nb = batch * ctx // block
        k_cache = torch.randn(nb, block, HK, HEAD, device=dev, dtype=DTYPE, generator=g)
        v_cache = torch.randn(nb, block, HK, HEAD, device=dev, dtype=DTYPE, generator=g)
        table = torch.randperm(nb, device=dev, generator=g).view(batch, -1).to(torch.int32)
        seqlens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
        hist = seqlens.long() - 1
        slots = (table.long().gather(1, (hist // block)[:, None])[:, 0] * block + hist % block).to(torch.int32)
        q_start = torch.arange(batch, device=dev, dtype=torch.int32)
        ones = torch.ones(batch, device=dev, dtype=torch.int32)
        add("fill_kv_cache", "dlinfer", lambda: ops.fill_kv_cache(k, v, k_cache, v_cache, slots),
            self.provides("fill_kv_cache"))
        add("fill_kv_cache", "lmdeploy", lambda: peers.lmdeploy_fill_kv_cache(self.lmd, k, v, k_cache, v_cache,
                                                                              q_start, ones, seqlens, 1, table),
            lmd_why)
        # dlinfer's fusion against what LMDeploy runs for the same work: its rotary, then its cache fill
        add("apply_rotary_pos_emb_fill_kv_cache", "dlinfer",
            lambda: ops.apply_rotary_pos_emb_fill_kv_cache(q, k, v, k_cache, v_cache, cos, sin, slots),
            self.provides("apply_rotary_pos_emb_fill_kv_cache"))
        add("apply_rotary_pos_emb_fill_kv_cache", "lmdeploy",
            lambda: (peers.lmdeploy_rotary(self.lmd, q, k, cos, sin),
                     peers.lmdeploy_fill_kv_cache(self.lmd, k, v, k_cache, v_cache, q_start, ones, seqlens, 1, table)),
            lmd_why)
        qd = q.contiguous()
        out_d = torch.empty_like(qd)
        scale = 1.0 / math.sqrt(HEAD)
        add("paged_decode_attention", "dlinfer",
            lambda: ops.paged_decode_attention(qd, k_cache, v_cache, table, block, None, seqlens, ctx, HQ, HK,
                                               attn_output=out_d), self.provides("paged_decode_attention"))
        add("paged_decode_attention", "lmdeploy",
            lambda: peers.lmdeploy_paged_decode(self.lmd, qd, k_cache, v_cache, table, seqlens, scale), lmd_why)
        # prefill of one sequence of EAGER_PREFILL tokens
        tp = EAGER_PREFILL
        qp = torch.randn(tp, HQ, HEAD, device=dev, dtype=DTYPE, generator=g)
        kp = torch.randn(tp, HK, HEAD, device=dev, dtype=DTYPE, generator=g)
        vp = torch.randn(tp, HK, HEAD, device=dev, dtype=DTYPE, generator=g)
        lp = torch.full((1,), tp, device=dev, dtype=torch.int32)
        cup = torch.tensor([0, tp], device=dev, dtype=torch.int32)
        out_p = torch.empty_like(qp)
        add("prefill_attention", "dlinfer",
            lambda: ops.prefill_attention(qp, kp, vp, None, None, lp, lp, tp, HQ, HK, [None], attn_output=out_p),
            self.provides("prefill_attention"))
        add("prefill_attention", "lmdeploy",
            lambda: peers.lmdeploy_prefill(self.lmd, qp, kp, vp, cup, cup, tp, tp, scale), lmd_why)
        tbl1 = table[:1]
        # The engine adapters build the step's batch layout once (dlinfer.framework.batch), before the layers run:
        # the wrappers then get LMDeploy's lengths and its cu_seqlens[1:] view and convert nothing (LMDeploy's
        # kernels get the offsets its own metadata builder made, likewise outside the timed call; the [1:] view is
        # made by LMDeploy's backend, the caller).
        layout = batch_layout.from_lengths(lp, lp, no_history=True)
        q_ends, start1 = layout.q_ends, cup[:1]
        add("paged_prefill_attention", "dlinfer",
            lambda: ops.paged_prefill_attention(qp, None, None, k_cache, v_cache, tbl1, block, q_ends, lp, tp,
                                                tp, HQ, HK, [None], attn_output=out_p),
            self.provides("paged_prefill_attention"))
        add("paged_prefill_attention", "lmdeploy",
            lambda: peers.lmdeploy_paged_prefill(self.lmd, qp, k_cache, v_cache, tbl1, cup, cup, lp, start1, tp,
                                                 tp, tp, scale), lmd_why)
        # MoE, Qwen3-30B-A3B shapes, one token
        cfg = MOE_MODELS["qwen3-30b-a3b"]
        gate_up, down = self._moe_weights(**cfg)
        xm = torch.randn(1, cfg["hidden"], device=dev, dtype=DTYPE, generator=g)
        logits = torch.randn(1, cfg["experts"], device=dev, dtype=DTYPE, generator=g)
        tw, ti = torch.topk(torch.softmax(logits.float(), -1), cfg["topk"], dim=-1)
        add("moe_gating_topk_softmax", "dlinfer", lambda: ops.moe_gating_topk_softmax(logits, cfg["topk"], None),
            self.provides("moe_gating_topk_softmax"))
        add("moe_gating_topk_softmax", "torch", lambda: peers.torch_gating(logits, cfg["topk"]))
        add("fused_moe", "dlinfer", lambda: ops.fused_moe(xm, gate_up, down, tw, ti, cfg["topk"], True),
            self.provides("fused_moe"))
        add("fused_moe", "lmdeploy",
            lambda: peers.lmdeploy_fused_moe(self.lmd, xm, gate_up, down, tw, ti, cfg["topk"], True), lmd_why)
        lw = torch.randn(HIDDEN, HIDDEN, device=dev, dtype=DTYPE, generator=g)
        add("linear", "dlinfer", lambda: ops.linear(x1, lw), self.provides("linear"))
        add("linear", "torch", lambda: torch.nn.functional.linear(x1, lw))

        self._add_vendor_only(fns, pairs)

        # A callable that raises would stop the loop: try each once, drop (and record) the broken ones.
        broken = {}
        for name in list(fns):
            try:
                fns[name]()
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001
                broken[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                del fns[name]
        # Passes in different orders (the first as built, then seeded shuffles): a row's cost depends on the call
        # before it (caches, the driver's state after a heavy peer call), so no row always follows the same one.
        # Each row's cost is the median of its passes' medians.
        passes = grid("eager", self.quick)[0].get("passes", 1)
        order, rng, per_pass = list(fns), random.Random(0), []
        for i in range(passes):
            if i:
                rng.shuffle(order)
            per_pass.append(timing.eager_call_cost({n: fns[n] for n in order}, calls=calls, warmup=min(50, calls)))
        costs = {name: {"median_us": statistics.median(p[name]["median_us"] for p in per_pass),
                        "p10_us": statistics.median(p[name]["p10_us"] for p in per_pass),
                        "p90_us": statistics.median(p[name]["p90_us"] for p in per_pass),
                        "calls": sum(p[name]["calls"] for p in per_pass),
                        "pass_medians_us": [round(p[name]["median_us"], 2) for p in per_pass]} for name in fns}
        self.data["eager"] = {"calls": calls, "passes": passes, "costs": costs, "pairs": pairs, "broken": broken,
                              "shapes": f"T=1 (norms, silu {INTER_SILU}, gating/MoE Qwen3-30B-A3B, linear "
                                        f"{HIDDEN}x{HIDDEN}), {batch} tokens (rotary, fill), decode B={batch} ctx {ctx} "
                                        f"block {block}, prefill 1x{tp}"}
        floor = costs["floor:noop_custom_op"]["median_us"]
        print(f"    eager call cost (median of {passes} passes' medians of {calls} calls, µs): floor (bare custom op) "
              f"{floor:.1f}", flush=True)
        for op, impls in pairs.items():
            cells = []
            for impl, name in impls.items():
                cells.append(f"{impl} {costs[name]['median_us']:.1f}" if name in costs else
                             f"{impl} {'skipped' if name.startswith('skipped') else 'broken'}")
            print(f"    {op:<26} " + ", ".join(cells), flush=True)
        for name, why in broken.items():
            print(f"    BROKEN {name}: {why}", flush=True)


    def _add_vendor_only(self, fns: dict[str, Callable[[], object]], pairs: dict[str, dict[str, str]]) -> None:
        """Per op, a ``vendor_only`` row: the triton vendor's function called directly with the arguments dlinfer
        hands it (recorded from one call of each dlinfer row), so ``dlinfer - vendor_only`` is dlinfer's own
        wrapper and dispatch cost and ``vendor_only`` its launch code plus Triton's launcher."""
        from dlinfer.vendor import Vendor, registry

        triton_vendor, recorded = self.triton_vendor, {}

        def recording(op, fn):
            def record(*args):
                recorded[op] = args
                return fn(*args)
            return record

        recorder = Vendor(name="triton_recording", priority=triton_vendor.priority, devices=triton_vendor.devices,
                          default_devices=frozenset(), capabilities=triton_vendor.capabilities,
                          ops={op: recording(op, fn) for op, fn in triton_vendor.ops.items()})
        with registry.pinned(*registry.vendors()):
            registry.register_vendor(recorder)
            with registry.forced(recorder.name):
                for op, impls in pairs.items():
                    if impls.get("dlinfer") in fns:
                        try:
                            fns[impls["dlinfer"]]()
                        except Exception:  # noqa: BLE001 - recorded as broken by the caller's own trial call
                            pass
        torch.cuda.synchronize()
        for op, args in recorded.items():
            if op in pairs:
                name = f"{op}:vendor_only"
                fns[name] = lambda fn=triton_vendor.ops[op], args=args: fn(*args)
                pairs[op]["vendor_only"] = name


def _rope_tables(tokens: int, head: int, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama-style cos/sin ``[T, D]`` (halves repeated) at random positions, in the model dtype."""
    positions = torch.randint(0, 32768, (tokens,), device=device, generator=gen).float()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head, 2, device=device).float() / head))
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(DTYPE), angles.sin().to(DTYPE)


# ------------------------------------------------------------------------------------ subprocess checks
def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_conformance_subprocess(quick: bool, timeout: float) -> dict:
    """``python -m dlinfer.cli check --vendor triton --device cuda [--quick] --json F``; its report as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conformance.json"
        cmd = [sys.executable, "-m", "dlinfer.cli", "check", "--vendor", "triton", "--device", "cuda",
               "--json", str(path)] + (["--quick"] if quick else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=timeout)
            output, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            output = f"{out}\ndlinfer check timed out after {timeout:.0f} s"
            rc = -1
        seconds = round(time.perf_counter() - t0, 1)
        result = json.loads(path.read_text()) if path.exists() else {"ok": False}
    # The table and the failures are the end of its output.
    lines = output.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("dlinfer check:")), max(0, len(lines) - 40))
    print("\n".join("    " + line for line in lines[start:][-60:]), flush=True)
    result.update(command=" ".join(cmd[1:]), returncode=rc, wall_s=seconds)
    if rc not in (0, 1) or "cases" not in result:
        result["ok"] = False
        result["output_tail"] = output[-3000:]
    print(f"  dlinfer check: {'OK' if result.get('ok') else 'FAILED'} (rc {rc}) in {seconds} s", flush=True)
    return result


def run_pytest(paths: list[str], ignore: list[str], timeout: float = 480.0) -> dict:
    """Run pytest in a subprocess from the repository root; counts and failures from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={xml}", *paths]
        for path in ignore:
            cmd.append(f"--ignore={path}")
        env = _child_env()
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            output, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            output, rc = f"{out}\npytest timed out after {timeout:.0f} s", -1
        result = {"command": " ".join(cmd[1:]), "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
                  "passed": 0, "failed": 0, "skipped": 0, "failures": []}
        if xml.exists():
            root = ET.parse(xml).getroot()
            for case in root.iter("testcase"):
                name = f"{case.get('classname')}::{case.get('name')}"
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                if bad is not None:
                    result["failed"] += 1
                    result["failures"].append({"test": name, "message": (bad.get("message") or "")[:500]})
                elif case.find("skipped") is not None:
                    result["skipped"] += 1
                else:
                    result["passed"] += 1
        elif rc != 0:
            result["failed"] = 1
            result["failures"].append({"test": "pytest", "message": output[-2000:]})
    tail = output.strip().splitlines()[-15:]
    print("\n".join("    " + line for line in tail), flush=True)
    print(f"  pytest {' '.join(paths)}: {result['passed']} passed, {result['failed']} failed, "
          f"{result['skipped']} skipped in {result['seconds']} s", flush=True)
    return result


# ---------------------------------------------------------------------------------------------- summary
def summary_table(records: list[dict]) -> str:
    """One line per (op, case): dlinfer / peer / torch GPU µs, peer÷dlinfer, dlinfer % of bound."""
    short = {"apply_rotary_pos_emb_fill_kv_cache": "rotary+fill_kv", "paged_decode_attention": "paged_decode",
             "paged_prefill_attention": "paged_prefill", "prefill_attention": "prefill",
             "moe_gating_topk_softmax": "moe_gating", "apply_rotary_pos_emb": "rotary"}
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for rec in records:
        impl, op = rec["impl"], short.get(rec["op"], rec["op"])
        for base in ("dlinfer", "torch"):          # variants (dlinfer_2op, torch_fa2) get rows of their own
            if impl.startswith(base + "_"):
                op, impl = f"{op}[{impl[len(base) + 1:]}]", base
        rows.setdefault((op, rec["case"]), {})[impl] = rec
    head = f"{'op':<26} {'case':<44} {'dlinfer':>9} {'lmdeploy':>9} {'torch':>9} {'peer/dl':>7} {'dl %bnd':>7}"
    lines = [head, "-" * len(head)]

    def us(rec):
        if rec is None:
            return "-"
        if "us" not in rec:
            return "err" if rec.get("error") else "skip"
        return f"{rec['us']:.1f}" + ("!" if rec.get("check") and not rec["check"]["ok"] else "")

    for (op, case), impls in rows.items():
        d, p, t = impls.get("dlinfer"), impls.get("lmdeploy"), impls.get("torch")
        ratio = "-"
        if d and p and "us" in d and "us" in p and d["us"] > 0:
            ratio = f"{p['us'] / d['us']:.2f}"
        elif d and t and "us" in d and "us" in t and d["us"] > 0:
            ratio = f"t{t['us'] / d['us']:.2f}"
        pct = f"{d['pct_bound']:.0f}%" if d and d.get("pct_bound") else "-"
        lines.append(f"{op[:26]:<26} {case[:44]:<44} {us(d):>9} {us(p):>9} {us(t):>9} {ratio:>7} {pct:>7}")
    lines.append("(µs of GPU time per call; '!' = correctness check failed; peer/dl > 1: dlinfer faster; "
                 "t = vs torch where no LMDeploy peer)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="check,graphs,decode,prefill,paged_prefill,fill,norm,rotary,act,moe,"
                                          "gating,eager",
                        help=f"comma-separated parts: {','.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="quick conformance matrix and a reduced grid")
    parser.add_argument("--out", default=os.environ.get("OUT", ""),
                        help="directory for the JSON (default $OUT, else ./results)")
    parser.add_argument("--name", default="", help="JSON file name (default bench_<UTC time>.json)")
    parser.add_argument("--commit", default="", help="git commit to record (the GPU machine has no .git)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-time budget in seconds: cases past it are skipped and recorded (default 540, "
                             "inside a 600 s device call)")
    parser.add_argument("--append", action="store_true",
                        help="continue the run in --out/--name: keep its meta, ceilings and records")
    parser.add_argument("--dry-run", action="store_true", help="validate the arguments, print the plan, exit")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if not parts:
        parser.error("--only: name at least one part")
    ordered = [p for p in PARTS if p in parts]
    if any(p in BENCH_PARTS for p in ordered) and "ceilings" not in ordered:
        ordered.insert(ordered.index(next(p for p in ordered if p in BENCH_PARTS)), "ceilings")
    args.parts = ordered
    if args.budget_s <= 0:
        parser.error("--budget-s must be > 0")
    if args.append and not args.name:
        parser.error("--append needs --name (the JSON file to continue)")
    if args.name and (not all(c.isalnum() or c in "._-" for c in args.name) or not args.name.endswith(".json")):
        parser.error("--name: letters, digits, '.', '_' and '-' only, ending in .json")
    return args


def plan(args: argparse.Namespace) -> str:
    lines = [f"parts: {', '.join(args.parts)} ({'quick' if args.quick else 'full'})"]
    for part in args.parts:
        cases = grid(part, args.quick)
        if cases:
            lines.append(f"  {part}: {len(cases)} case(s): " + "; ".join(_fmt_case(c) for c in cases[:6])
                         + (" ..." if len(cases) > 6 else ""))
        else:
            lines.append(f"  {part}")
    return "\n".join(lines)


def print_goals(path: Path) -> None:
    """The speed goals as benchmarks/report.py judges this run alone (shapes of other runs missing)."""
    try:
        from benchmarks import report

        runs = report.load_runs([path])
        goals = report.evaluate_goals(report.merge_rows(runs), runs)
    except Exception as exc:  # noqa: BLE001 - a summary must never fail the run
        print(f"(goals not evaluated: {type(exc).__name__}: {exc})", flush=True)
        return
    print("speed goals, this run alone:", flush=True)
    for goal in goals:
        if goal.status != "not measured" or "expected shapes not measured" in goal.detail:
            print(f"  {goal.status:<12} {goal.id}: {goal.detail[:150]}", flush=True)


def cuda_healthy() -> bool:
    """False once a kernel fault (e.g. an illegal address) has broken this process's CUDA context."""
    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(plan(args), flush=True)
    if args.dry_run:
        return 0
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; nothing to run (use --dry-run to check arguments)", file=sys.stderr)
        return 2
    out_dir = Path(args.out or ROOT / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or f"bench_{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    suite = Suite(args, out_dir / name)
    print(f"results: {suite.out_path}", flush=True)
    t_all = time.perf_counter()
    for i, part in enumerate(args.parts):
        t0 = time.perf_counter()
        print(f"== {part}", flush=True)
        status, error = "ok", ""
        if suite.remaining() < 10:
            suite.data["parts"][part] = {"status": "skipped", "error": "budget (--budget-s) spent", "wall_s": 0.0}
            suite.save()
            print(f"== {part}: skipped, budget spent", flush=True)
            continue
        try:
            if part in BENCH_PARTS:
                suite.prepare_bench()
                if suite.ceilings is None:
                    raise RuntimeError("no ceilings measured (the ceilings part failed)")
            suite.run(part)
        except Exception as exc:  # noqa: BLE001 - a failing part is recorded and the suite goes on
            status, error = "error", f"{type(exc).__name__}: {exc}"
            print(traceback.format_exc(), flush=True)
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
        wall = time.perf_counter() - t0
        suite.data["parts"][part] = {"status": status, "error": error, "wall_s": round(wall, 1)}
        suite.save()
        print(f"== {part}: {status} in {wall:.1f} s" + (f" ({error[:300]})" if error else ""), flush=True)
        if status != "ok" and not cuda_healthy():
            rest = args.parts[i + 1:]
            print(f"gpu_suite: the CUDA context is broken after {part}; continuing {rest} in a new process",
                  flush=True)
            if not rest or suite.remaining() < 30:
                return 1
            cmd = [sys.executable, str(Path(__file__).resolve()), "--only", ",".join(rest), "--out", str(out_dir),
                   "--name", name, "--append", "--budget-s", f"{suite.remaining():.0f}"]
            cmd += (["--quick"] if args.quick else []) + (["--commit", args.commit] if args.commit else [])
            child = subprocess.run(cmd, env=_child_env())
            return 1 if child.returncode == 0 else child.returncode
        torch.cuda.empty_cache()
    if suite.data["records"]:
        print(summary_table(suite.data["records"]), flush=True)
        print_goals(suite.out_path)
    print("parts: " + ", ".join(f"{p} {v['status']} {v['wall_s']}s" for p, v in suite.data["parts"].items()),
          flush=True)
    print(f"total {time.perf_counter() - t_all:.0f} s; results in {suite.out_path}", flush=True)
    return 0 if all(v["status"] == "ok" for v in suite.data["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
