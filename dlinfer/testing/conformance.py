"""The conformance kit: test a vendor against ``reference`` on fresh random inputs.

For every op of the contract (``dlinfer.ops.CORE_OPS`` and ``EXTRA_OPS``) the kit builds a matrix of cases
(odd shapes, float32/float16/bfloat16, GQA ratios 1/4/8 and MQA, block sizes 16-128, strided caches that are
views of one packed K|V buffer, shuffled block tables, mixed lengths, zero-length decode rows, chunked
prefill, non-causal prefill, ``attn_output`` given or aliasing the query, ``head_size_v != head_size``), runs
each case twice through the public wrappers of ``dlinfer.ops`` — once with the vendor under test forced for
the op, once with ``reference`` forced — on identical inputs, and compares the results.

When the vendor under test is ``reference`` itself, the other side is the independent float64 oracle of
:mod:`dlinfer.testing.oracle` instead (inputs copied to float64, results cast back to the dtype, in-place
writes kept), served through the same public wrappers by a temporary vendor ``float64_oracle``; the
tolerances stay those of the dtype, since the reference computes in float32 and rounds to the dtype.

* Outputs passed in (``attn_output``) are poisoned with NaN, and cache slots a kernel must not read hold
  NaN, so unwritten elements and reads past a sequence's end show up; a NaN or Inf in a result never passes.
* Error is the relative norm ``||out - ref|| / ||ref||`` (in float64) plus the largest absolute difference
  relative to ``max |ref|``; tolerances depend on the dtype and on whether the op accumulates products
  (attention, MoE, linear: float32 tolerances admit TF32). Writes into the cache are compared bit for bit,
  over the whole packed buffer, so stray writes show up too.
* A case the forced vendor refuses (``dlinfer.errors.NotSupportedError`` from the registry) is reported as
  ``refused`` with the reason, which is not a failure; an op the vendor does not provide is ``n/a``.

Python API::

    from dlinfer.testing.conformance import run_conformance
    report = run_conformance("triton", device="cuda")          # full matrix
    print(report.table()); assert report.ok

``dlinfer check`` is the command-line front end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

import dlinfer
import dlinfer.ops as ops
from dlinfer.errors import NotSupportedError
from dlinfer.testing import oracle
from dlinfer.vendor import registry

ALL_OPS: tuple[str, ...] = tuple(ops.CORE_OPS) + tuple(getattr(ops, "EXTRA_OPS", ()))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Ops whose Triton kernels use tl.dot, which Triton 3.6's interpreter computes wrongly in bfloat16.
MATMUL_OPS = frozenset({"prefill_attention", "paged_prefill_attention", "paged_decode_attention", "fused_moe",
                        "linear"})

# (relative-norm tolerance, max-abs tolerance as a fraction of max |ref|) per kind and dtype.
TOLERANCES: dict[str, dict[torch.dtype, tuple[float, float]]] = {
    "elementwise": {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.6e-2, 6e-2)},
    "matmul": {torch.float32: (2e-3, 1e-2), torch.float16: (3e-3, 2e-2), torch.bfloat16: (2e-2, 8e-2)},
    "exact": {torch.float32: (0.0, 0.0), torch.float16: (0.0, 0.0), torch.bfloat16: (0.0, 0.0)},
}

PASS, FAIL, ERROR, REFUSED, NA, SKIPPED = "pass", "fail", "error", "refused", "n/a", "skipped"

ORACLE_VENDOR = "float64_oracle"  # the temporary vendor serving dlinfer.testing.oracle
ORACLE_LABEL = "float64 oracle"


def baseline_for(vendor: str) -> str:
    """What ``vendor`` is compared against: the float64 oracle for ``reference``, else ``reference``."""
    return ORACLE_LABEL if vendor == "reference" else "reference"


# ------------------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class CaseResult:
    op: str
    case: str
    dtype: str
    status: str  # pass / fail / error / refused / skipped
    rel_err: float | None = None
    max_abs: float | None = None
    detail: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class OpSummary:
    op: str
    status: str  # pass / FAIL / refused / n/a / skipped
    passed: int = 0
    failed: int = 0
    refused: int = 0
    skipped: int = 0
    worst_rel_err: float | None = None
    worst_case: str = ""
    note: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class Report:
    vendor: str
    device: str
    quick: bool
    seed: int
    results: list[CaseResult]
    not_provided: list[str]
    seconds: float
    environment: dict[str, Any]

    @property
    def ok(self) -> bool:
        """True when no case failed or raised an error."""
        return not any(r.status in (FAIL, ERROR) for r in self.results)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.status in (FAIL, ERROR)]

    def summaries(self) -> list[OpSummary]:
        out = []
        ops_seen = [op for op in ALL_OPS if op in self.not_provided or any(r.op == op for r in self.results)]
        for op in ops_seen:
            if op in self.not_provided:
                out.append(OpSummary(op, NA, note=f"{self.vendor} does not provide {op}"))
                continue
            rows = [r for r in self.results if r.op == op]
            s = OpSummary(op, PASS, seconds=sum(r.seconds for r in rows))
            for r in rows:
                if r.status == PASS:
                    s.passed += 1
                elif r.status in (FAIL, ERROR):
                    s.failed += 1
                elif r.status == REFUSED:
                    s.refused += 1
                else:
                    s.skipped += 1
                if r.rel_err is not None and (s.worst_rel_err is None or r.rel_err > s.worst_rel_err):
                    s.worst_rel_err, s.worst_case = r.rel_err, f"{r.dtype} {r.case}"
            failed = [r for r in rows if r.status in (FAIL, ERROR)]
            refused = [r for r in rows if r.status == REFUSED]
            skipped = [r for r in rows if r.status == SKIPPED]
            if failed:
                s.status = "FAIL"
                s.note = f"{failed[0].dtype} {failed[0].case}: {failed[0].detail}"
            elif not s.passed and refused:
                s.status = REFUSED
            elif not s.passed and skipped:
                s.status = SKIPPED
            if not failed:
                notes = []
                if refused:
                    notes.append(f"refused {len(refused)}: {_first_reason(refused)}")
                if skipped:
                    notes.append(f"skipped {len(skipped)}: {skipped[0].detail}")
                s.note = "; ".join(notes)
            out.append(s)
        return out

    def table(self, width: int = 180) -> str:
        """A plain-text pass/fail table, one row per op, with the worst relative error."""
        head = f"{'op':<36} {'result':<8} {'pass':>5} {'fail':>5} {'refus':>5} {'skip':>5} {'worst rel err':>13}  note"
        lines = [f"dlinfer check: vendor {self.vendor!r} vs {baseline_for(self.vendor)!r} on {self.device} "
                 f"({'quick' if self.quick else 'full'} matrix, seed {self.seed})", head, "-" * len(head)]
        for s in self.summaries():
            worst = "-" if s.worst_rel_err is None else f"{s.worst_rel_err:.2e}"
            note = s.note if len(s.note) <= width - 80 else s.note[: max(20, width - 83)] + "..."
            lines.append(f"{s.op:<36} {s.status:<8} {s.passed:>5} {s.failed:>5} {s.refused:>5} {s.skipped:>5} "
                         f"{worst:>13}  {note}")
        counts = {k: sum(r.status == k for r in self.results) for k in (PASS, FAIL, ERROR, REFUSED, SKIPPED)}
        lines.append("-" * len(head))
        lines.append(f"{'OK' if self.ok else 'FAILED'}: {counts[PASS]} passed, {counts[FAIL] + counts[ERROR]} "
                     f"failed, {counts[REFUSED]} refused, {counts[SKIPPED]} skipped, {len(self.not_provided)} "
                     f"ops n/a, in {self.seconds:.1f} s")
        for r in self.failures[:20]:
            lines.append(f"  FAIL {r.op} [{r.dtype} {r.case}]: {r.detail}")
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more failures (see the JSON report)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "oracle": baseline_for(self.vendor),
            "device": self.device,
            "quick": self.quick,
            "seed": self.seed,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "environment": self.environment,
            "ops": [dataclasses.asdict(s) for s in self.summaries()],
            "cases": [dataclasses.asdict(r) for r in self.results],
        }

    def write_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")


def _first_reason(rows: Sequence[CaseResult]) -> str:
    reasons = []
    for r in rows:
        if r.detail not in reasons:
            reasons.append(r.detail)
    text = reasons[0]
    return text if len(reasons) == 1 else f"{text} (+{len(reasons) - 1} other reasons)"


# ---------------------------------------------------------------------------------------- input helpers
class _Rand:
    """Deterministic random inputs (same seed, same tensors): values drawn on the device, indices on the host."""

    def __init__(self, seed: int, device: torch.device):
        self.gen = torch.Generator().manual_seed(seed)
        self.device = device
        self.device_gen = self.gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)

    def normal(self, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=self.device_gen, dtype=torch.float32, device=self.device)
        return (x * scale).to(dtype)

    def ints(self, low: int, high: int, *shape) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.gen)

    def perm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen)


def _caches(rnd: _Rand, num_blocks: int, block_size: int, heads: int, d: int, dv: int, dtype, layout: str):
    """Key/value caches ``[num_blocks, block_size, heads, d|dv]`` and the buffers that hold them.

    layouts: ``separate`` (two contiguous tensors), ``packed`` (vLLM: one buffer, K|V in the last dim, so the
    caches are strided views), ``head_major`` (buffers ``[blocks, heads, block_size, d]`` seen transposed).
    """
    if layout == "separate":
        k = rnd.normal(num_blocks, block_size, heads, d, dtype=dtype)
        v = rnd.normal(num_blocks, block_size, heads, dv, dtype=dtype)
        return k, v, [k, v]
    if layout == "packed":
        buf = rnd.normal(num_blocks, block_size, heads, d + dv, dtype=dtype)
        return buf[..., :d], buf[..., d:], [buf]
    if layout == "head_major":
        kb = rnd.normal(num_blocks, heads, block_size, d, dtype=dtype)
        vb = rnd.normal(num_blocks, heads, block_size, dv, dtype=dtype)
        return kb.transpose(1, 2), vb.transpose(1, 2), [kb, vb]
    raise ValueError(f"unknown cache layout {layout!r}")


def _paged(rnd: _Rand, kv_lens: Sequence[int], block_size: int, heads: int, d: int, dv: int, dtype, layout: str,
           index_dtype=torch.int32, tail: str = "random"):
    """Caches holding ``kv_lens`` tokens per sequence in shuffled blocks; every other slot holds NaN.

    ``tail`` fills block-table entries past a sequence's last block: ``random`` valid ids or ``garbage``
    (out-of-range ids, which the contract says are ignored).
    """
    need = [(n + block_size - 1) // block_size for n in kv_lens]
    width = max(need + [1]) + 1
    num_blocks = sum(need) + 3
    k_cache, v_cache, buffers = _caches(rnd, num_blocks, block_size, heads, d, dv, dtype, layout)
    order = rnd.perm(num_blocks).tolist()
    table = rnd.ints(0, num_blocks, len(kv_lens), width)
    if tail == "garbage":
        table = table + num_blocks + 1000
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    nxt = 0
    for b, (n, blocks) in enumerate(zip(kv_lens, need)):
        for i in range(blocks):
            table[b, i] = order[nxt]
            used[order[nxt], : min(block_size, n - i * block_size)] = True
            nxt += 1
    unused = (~used).to(k_cache.device)
    k_cache[unused] = float("nan")
    v_cache[unused] = float("nan")
    return k_cache, v_cache, buffers, table.to(device=rnd.device, dtype=index_dtype)


def _mask(causal: bool, device) -> list:
    return [torch.ones(1, dtype=torch.bool, device=device)] if causal else []


def _rope_tables(rnd: _Rand, tokens: int, d: int, dtype):
    pos = rnd.ints(0, 4096, tokens).float()
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = pos[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(rnd.device, dtype), emb.sin().to(rnd.device, dtype)


# --------------------------------------------------------------------------------------------- op specs
@dataclasses.dataclass
class OpSpec:
    """How to test one op: its cases, how to build inputs for one, how to run it, what to compare."""

    kind: str
    cases: Callable[[bool], list[dict]]
    build: Callable[[dict, torch.dtype, _Rand], dict]
    run: Callable[[dict], dict[str, torch.Tensor]]
    extra_check: Callable[[dict, dict, dict, torch.dtype], list[str]] | None = None


def _silu_cases(quick):
    if quick:
        return [dict(shape=(3, 14)), dict(shape=(2, 3, 32), strided=True)]
    return [dict(shape=(1, 2 * 14336)), dict(shape=(7, 2 * 1000)), dict(shape=(257, 2 * 4096)),
            dict(shape=(13, 2 * 129)), dict(shape=(2, 5, 2 * 64), strided=True), dict(shape=(1024, 2 * 1408))]


def _silu_build(p, dtype, rnd):
    shape = p["shape"]
    if p.get("strided"):
        buf = rnd.normal(*shape[:-1], shape[-1] + 8, dtype=dtype)
        return {"x": buf[..., : shape[-1]]}
    return {"x": rnd.normal(*shape, dtype=dtype)}


def _norm_cases(quick):
    if quick:
        return [dict(shape=(3, 17), eps=1e-6), dict(shape=(2, 2, 32), eps=1e-5, strided=True)]
    return [dict(shape=(1, 4096), eps=1e-6), dict(shape=(257, 4096), eps=1e-5), dict(shape=(13, 5120), eps=1e-6),
            dict(shape=(64, 129), eps=1e-6), dict(shape=(3, 7, 2048), eps=1e-6, strided=True),
            dict(shape=(1000, 8192), eps=1e-5)]


def _norm_build(p, dtype, rnd, residual=False):
    shape = p["shape"]
    if p.get("strided"):
        hidden = rnd.normal(*shape[:-1], shape[-1] + 16, dtype=dtype)[..., : shape[-1]]
    else:
        hidden = rnd.normal(*shape, dtype=dtype)
    inputs = {"hidden": hidden, "weight": (1.0 + rnd.normal(shape[-1], scale=0.1)).to(dtype), "eps": p["eps"]}
    if residual:
        inputs["residual"] = rnd.normal(*shape, dtype=dtype)
    return inputs


def _rotary_cases(quick):
    if quick:
        return [dict(T=5, hq=4, hk=2, d=16, fused=True), dict(T=3, hq=8, hk=1, d=8, fused=False, table3d=True)]
    cases = []
    for i, d in enumerate((64, 80, 96, 128, 256)):
        hq, hk = ((32, 8), (28, 4), (16, 16), (8, 1), (32, 32))[i]
        for T in (1, 37, 1024):
            cases.append(dict(T=T, hq=hq, hk=hk, d=d, fused=(T != 37), table3d=(T == 1)))
    return cases


def _qkv(rnd, T, hq, hk, d, dv, dtype, fused):
    """q/k/v ``[T, H, D]``: views of one fused projection buffer (strided), or separate tensors."""
    if fused:
        buf = rnd.normal(T, (hq + hk) * d + hk * dv, dtype=dtype)
        q = buf[:, : hq * d].view(T, hq, d)
        k = buf[:, hq * d:(hq + hk) * d].view(T, hk, d)
        v = buf[:, (hq + hk) * d:].view(T, hk, dv)
        return q, k, v, buf
    q, k, v = rnd.normal(T, hq, d, dtype=dtype), rnd.normal(T, hk, d, dtype=dtype), rnd.normal(T, hk, dv, dtype=dtype)
    return q, k, v, None


def _rotary_build(p, dtype, rnd):
    q, k, v, buf = _qkv(rnd, p["T"], p["hq"], p["hk"], p["d"], p["d"], dtype, p["fused"])
    cos, sin = _rope_tables(rnd, p["T"], p["d"], dtype)
    if p.get("table3d"):
        cos, sin = cos[None], sin[None]
    return {"q": q, "k": k, "buf": buf, "cos": cos, "sin": sin}


def _rotary_run(x):
    q, k = ops.apply_rotary_pos_emb(x["q"], x["k"], x["cos"], x["sin"])
    if q is not x["q"] or k is not x["k"]:
        raise AssertionError("apply_rotary_pos_emb must return the query and key objects it was given")
    return {"qkv_buffer": x["buf"]} if x["buf"] is not None else {"query": q, "key": k}


def _fill_cases(quick):
    if quick:
        return [dict(T=5, hk=2, d=16, dv=16, block=16, layout="separate", pad=0),
                dict(T=7, hk=1, d=16, dv=8, block=32, layout="packed", pad=2),
                dict(T=4, hk=2, d=8, dv=8, block=16, layout="head_major", pad=1, fused_kv=True, idx=torch.int64)]
    cases = []
    layouts = ("separate", "packed", "head_major")
    for i, block in enumerate((16, 32, 64, 128)):
        for j, (d, dv) in enumerate(((64, 64), (80, 80), (128, 128), (256, 256), (192, 128))):
            cases.append(dict(T=(1, 37, 256, 2049)[(i + j) % 4], hk=(8, 1, 4, 2, 16)[j], d=d, dv=dv, block=block,
                              layout=layouts[(i + j) % 3], pad=(0, 3)[(i * j) % 2], fused_kv=bool((i + j) % 2),
                              idx=(torch.int32, torch.int64)[i % 2]))
    return cases


def _fill_build(p, dtype, rnd, rotary=False):
    T, hk, d, dv, block = p["T"], p["hk"], p["d"], p["dv"], p["block"]
    num_blocks = (T + block - 1) // block + 2
    k_cache, v_cache, buffers = _caches(rnd, num_blocks, block, hk, d, dv, dtype, p["layout"])
    slots = rnd.perm(num_blocks * block)[:T]
    if p["pad"]:
        slots[rnd.perm(T)[: p["pad"]]] = -1
    inputs = {"k_cache": k_cache, "v_cache": v_cache, "buffers": buffers,
              "slots": slots.to(rnd.device, p.get("idx", torch.int32))}
    if rotary:
        hq = p["hq"]
        q, k, v, buf = _qkv(rnd, T, hq, hk, d, dv, dtype, p.get("fused_kv", False))
        cos, sin = _rope_tables(rnd, T, d, dtype)
        inputs.update(q=q, k=k, v=v, qkv=buf, cos=cos, sin=sin)
    elif p.get("fused_kv"):
        buf = rnd.normal(T, hk * (d + dv), dtype=dtype)
        inputs.update(k=buf[:, : hk * d].view(T, hk, d), v=buf[:, hk * d:].view(T, hk, dv))
    else:
        inputs.update(k=rnd.normal(T, hk, d, dtype=dtype), v=rnd.normal(T, hk, dv, dtype=dtype))
    return inputs


def _fill_run(x):
    kc, vc = ops.fill_kv_cache(x["k"], x["v"], x["k_cache"], x["v_cache"], x["slots"])
    if kc is not x["k_cache"] or vc is not x["v_cache"]:
        raise AssertionError("fill_kv_cache must return the cache objects it was given")
    return {f"cache_buffer{i}": b for i, b in enumerate(x["buffers"])}


def _rotary_fill_cases(quick):
    if quick:
        return [dict(T=5, hq=4, hk=2, d=16, dv=16, block=16, layout="packed", pad=1, fused_kv=True),
                dict(T=3, hq=8, hk=1, d=8, dv=8, block=32, layout="separate", pad=0)]
    return [dict(T=T, hq=hq, hk=hk, d=d, dv=d, block=block, layout=layout, pad=pad, fused_kv=fused)
            for T, hq, hk, d, block, layout, pad, fused in (
                (1, 32, 8, 128, 64, "packed", 0, True), (37, 28, 4, 128, 16, "separate", 3, True),
                (256, 16, 16, 64, 32, "head_major", 0, False), (2049, 32, 8, 128, 128, "packed", 5, True),
                (64, 8, 1, 80, 16, "separate", 1, True), (19, 16, 2, 256, 64, "packed", 0, True))]


def _rotary_fill_run(x):
    q, k = ops.apply_rotary_pos_emb_fill_kv_cache(x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["cos"],
                                                   x["sin"], x["slots"])
    out = {f"cache_buffer{i}": b for i, b in enumerate(x["buffers"])}
    if x["qkv"] is not None:
        out["qkv_buffer"] = x["qkv"]
    else:
        out.update(query=q, key=k)
    return out


def _attn_output(x, mode, tokens, hq, dv, dtype, rnd):
    if mode == "given":
        return torch.full((tokens, hq, dv), float("nan"), dtype=dtype, device=rnd.device)
    if mode == "alias":
        return x["q"]
    return None


def _prefill_cases(quick):
    if quick:
        return [dict(seqs=((5, 5), (1, 1), (9, 9)), hq=8, hk=8, d=16, dv=16, causal=True, fused=True, out="none"),
                dict(seqs=((4, 4), (7, 7)), hq=8, hk=2, d=16, dv=24, causal=False, fused=False, out="given"),
                dict(seqs=((3, 6), (2, 2)), hq=8, hk=1, d=16, dv=16, causal=True, fused=False, out="alias")]
    cases = []
    ratios = ((32, 32), (32, 8), (32, 4), (16, 1))
    for i, d in enumerate((64, 80, 96, 128, 256)):
        hq, hk = ratios[i % 4]
        cases.append(dict(seqs=((1, 1), (129, 129), (17, 17), (600, 600)), hq=hq, hk=hk, d=d, dv=d, causal=True,
                          fused=True, out="none"))
        cases.append(dict(seqs=((256, 256), (77, 77)), hq=hq, hk=hk, d=d, dv=d, causal=False, fused=False,
                          out="given"))
        cases.append(dict(seqs=((31, 100), (5, 5), (64, 1000)), hq=hq, hk=hk, d=d, dv=d, causal=True, fused=False,
                          out="alias"))
    cases.append(dict(seqs=((33, 33), (250, 250)), hq=16, hk=4, d=192, dv=128, causal=True, fused=True,
                      out="given"))
    cases.append(dict(seqs=((2048, 2048),), hq=32, hk=8, d=128, dv=128, causal=True, fused=True, out="none"))
    return cases


def _prefill_build(p, dtype, rnd):
    q_lens = [s[0] for s in p["seqs"]]
    kv_lens = [s[1] for s in p["seqs"]]
    hq, hk, d, dv = p["hq"], p["hk"], p["d"], p["dv"]
    if p["fused"] and q_lens == kv_lens:
        q, k, v, _ = _qkv(rnd, sum(q_lens), hq, hk, d, dv, dtype, True)
    else:
        q = rnd.normal(sum(q_lens), hq, d, dtype=dtype)
        k, v = rnd.normal(sum(kv_lens), hk, d, dtype=dtype), rnd.normal(sum(kv_lens), hk, dv, dtype=dtype)
    x = {"q": q, "k": k, "v": v, "p": p,
         "q_lens": torch.tensor(q_lens, dtype=torch.int32, device=rnd.device),
         "kv_lens": torch.tensor(kv_lens, dtype=torch.int32, device=rnd.device)}
    x["out"] = _attn_output(x, p["out"], q.shape[0], hq, dv, dtype, rnd)
    return x


def _prefill_run(x):
    p = x["p"]
    out = ops.prefill_attention(x["q"], x["k"], x["v"], None, None, x["q_lens"], x["kv_lens"],
                                max(s[0] for s in p["seqs"]) + 2, p["hq"], p["hk"], _mask(p["causal"], x["q"].device),
                                attn_output=x["out"])
    if x["out"] is not None and out is not x["out"]:
        raise AssertionError("prefill_attention must return the attn_output it was given")
    return {"out": out}


def _paged_prefill_cases(quick):
    if quick:
        return [dict(seqs=((0, 5), (7, 3), (20, 1)), hq=8, hk=8, d=16, dv=16, block=16, layout="separate",
                     causal=True, out="none"),
                dict(seqs=((9, 4), (0, 6)), hq=8, hk=2, d=32, dv=16, block=32, layout="packed", causal=False,
                     out="given", pad=2),
                dict(seqs=((16, 2), (3, 3)), hq=8, hk=1, d=16, dv=16, block=16, layout="head_major", causal=True,
                     out="alias", tail="garbage")]
    cases = []
    ratios = ((32, 32), (32, 8), (32, 4), (16, 1))
    layouts = ("separate", "packed", "head_major")
    seqs_list = (((0, 129), (300, 17), (1000, 1), (64, 64)), ((0, 512), (2000, 48)), ((5, 3), (0, 1), (4095, 200)))
    i = 0
    for d in (64, 80, 96, 128, 256):
        for block in (16, 32, 64, 128):
            hq, hk = ratios[i % 4]
            cases.append(dict(seqs=seqs_list[i % 3], hq=hq, hk=hk, d=d, dv=d, block=block, layout=layouts[i % 3],
                              causal=(i % 4 != 3), out=("none", "given", "alias")[i % 3], pad=(0, 5)[i % 2],
                              tail=("random", "garbage")[(i // 2) % 2], host_lens=(i % 5 == 0)))
            i += 1
    cases.append(dict(seqs=((100, 33), (0, 250)), hq=16, hk=4, d=192, dv=128, block=64, layout="packed",
                      causal=True, out="given"))
    return cases


def _paged_prefill_build(p, dtype, rnd):
    q_lens = [s[1] for s in p["seqs"]]
    kv_lens = [s[0] + s[1] for s in p["seqs"]]
    hq, hk, d, dv = p["hq"], p["hk"], p["d"], p["dv"]
    k_cache, v_cache, _, table = _paged(rnd, kv_lens, p["block"], hk, d, dv, dtype, p["layout"],
                                        tail=p.get("tail", "random"))
    tokens = sum(q_lens) + p.get("pad", 0)
    lens_device = "cpu" if p.get("host_lens") else rnd.device
    x = {"q": rnd.normal(tokens, hq, d, dtype=dtype), "k_cache": k_cache, "v_cache": v_cache, "table": table,
         "p": p, "valid": sum(q_lens),
         "cu": torch.tensor(q_lens, dtype=torch.int64).cumsum(0).to(lens_device, torch.int32),
         "kv_lens": torch.tensor(kv_lens, dtype=torch.int32, device=lens_device)}
    x["out"] = _attn_output(x, p["out"], tokens, hq, dv, dtype, rnd)
    return x


def _paged_prefill_run(x):
    p = x["p"]
    out = ops.paged_prefill_attention(
        x["q"], None, None, x["k_cache"], x["v_cache"], x["table"], p["block"], x["cu"], x["kv_lens"],
        max(s[1] for s in p["seqs"]) + 3, max(s[0] + s[1] for s in p["seqs"]) + 5, p["hq"], p["hk"],
        _mask(p["causal"], x["q"].device), head_size_v=p["dv"], attn_output=x["out"])
    if x["out"] is not None and out is not x["out"]:
        raise AssertionError("paged_prefill_attention must return the attn_output it was given")
    return {"out": out[: x["valid"]]}


def _decode_cases(quick):
    if quick:
        return [dict(lens=(1, 17, 0, 40), hq=8, hk=8, d=16, dv=16, block=16, layout="separate", out="given"),
                dict(lens=(33, 5), hq=8, hk=2, d=32, dv=16, block=32, layout="packed", out="none"),
                dict(lens=(20, 0, 3), hq=8, hk=1, d=16, dv=16, block=16, layout="head_major", out="alias",
                     tail="garbage", idx=torch.int64)]
    cases = []
    ratios = ((32, 32), (32, 8), (32, 4), (16, 1))
    layouts = ("separate", "packed", "head_major")
    lens_list = ((1, 17, 0, 4000, 129, 64, 65, 1023), (2048,), (0, 0, 1, 300, 5000, 16, 33, 100, 7, 1, 2, 3, 999,
                                                               4096, 31, 32, 1500))
    i = 0
    for d in (64, 80, 96, 128, 256):
        for block in (16, 32, 64, 128):
            hq, hk = ratios[i % 4]
            cases.append(dict(lens=lens_list[i % 3], hq=hq, hk=hk, d=d, dv=d, block=block, layout=layouts[i % 3],
                              out=("given", "none", "alias")[i % 3], tail=("random", "garbage")[(i // 2) % 2],
                              idx=(torch.int32, torch.int64)[(i // 3) % 2], host_lens=(i % 5 == 1)))
            i += 1
    cases.append(dict(lens=(100, 0, 777), hq=16, hk=4, d=192, dv=128, block=64, layout="packed", out="given"))
    cases.append(dict(lens=tuple(range(1, 257, 5)), hq=32, hk=8, d=128, dv=128, block=64, layout="packed",
                      out="given"))
    return cases


def _decode_build(p, dtype, rnd):
    hq, hk, d, dv = p["hq"], p["hk"], p["d"], p["dv"]
    k_cache, v_cache, _, table = _paged(rnd, p["lens"], p["block"], hk, d, dv, dtype, p["layout"],
                                        index_dtype=p.get("idx", torch.int32), tail=p.get("tail", "random"))
    lens_device = "cpu" if p.get("host_lens") else rnd.device
    x = {"q": rnd.normal(len(p["lens"]), hq, d, dtype=dtype), "k_cache": k_cache, "v_cache": v_cache,
         "table": table, "p": p, "kv_lens": torch.tensor(p["lens"], dtype=torch.int32, device=lens_device)}
    x["out"] = _attn_output(x, p["out"], len(p["lens"]), hq, dv, dtype, rnd)
    return x


def _decode_run(x):
    p = x["p"]
    b = len(p["lens"])
    cu = torch.arange(1, b + 1, dtype=torch.int32, device=x["q"].device)
    out = ops.paged_decode_attention(x["q"], x["k_cache"], x["v_cache"], x["table"], p["block"], cu, x["kv_lens"],
                                     max(p["lens"]) + 9, p["hq"], p["hk"], head_size_v=p["dv"], attn_output=x["out"])
    if x["out"] is not None and out is not x["out"]:
        raise AssertionError("paged_decode_attention must return the attn_output it was given")
    return {"out": out}


def _gating_cases(quick):
    if quick:
        return [dict(T=5, E=8, topk=2), dict(T=3, E=60, topk=4)]
    return [dict(T=1, E=8, topk=2), dict(T=4096, E=8, topk=2), dict(T=37, E=60, topk=4),
            dict(T=513, E=128, topk=8), dict(T=7, E=256, topk=8), dict(T=100, E=64, topk=6)]


def _gating_build(p, dtype, rnd):
    return {"logits": rnd.normal(p["T"], p["E"], dtype=dtype, scale=2.0), "topk": p["topk"]}


def _gating_run(x):
    weights, ids = ops.moe_gating_topk_softmax(x["logits"], x["topk"], None)
    return {"weights": weights, "ids": ids}


def _gating_check(out, ref, x, dtype) -> list[str]:
    """Ids may differ from the reference only between (near-)equal probabilities; dtypes are fixed."""
    problems = []
    w, ids = out["weights"], out["ids"]
    if w.dtype != torch.float32 or ids.dtype != torch.int64:
        problems.append(f"weights/ids must be float32/int64, got {w.dtype}/{ids.dtype}")
        return problems
    probs = torch.softmax(x["logits"].double(), dim=-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= probs.shape[1]):
        return [f"expert ids out of range [0, {probs.shape[1]})"]
    if ids.numel() and bool((ids.sort(dim=-1).values.diff(dim=-1) == 0).any()):
        problems.append("an expert id is selected twice for one token")
    chosen = probs.gather(1, ids.long())
    rtol = TOLERANCES["elementwise"][torch.float32][0] * 10
    if not torch.allclose(chosen, ref["weights"].double(), rtol=rtol, atol=1e-6):
        problems.append("the selected experts are not the top-k by probability")
    return problems


def _moe_cases(quick):
    if quick:
        return [dict(T=3, H=16, I=8, E=4, topk=2, renorm=False), dict(T=5, H=24, I=16, E=8, topk=3, renorm=True)]
    return [dict(T=1, H=1024, I=512, E=8, topk=2, renorm=False), dict(T=37, H=512, I=352, E=16, topk=4, renorm=True),
            dict(T=129, H=256, I=96, E=64, topk=8, renorm=True), dict(T=512, H=2048, I=768, E=32, topk=8,
                                                                     renorm=True),
            dict(T=64, H=4096, I=1024, E=8, topk=2, renorm=False), dict(T=7, H=136, I=40, E=5, topk=5, renorm=False)]


def _moe_build(p, dtype, rnd):
    T, H, I, E, topk = p["T"], p["H"], p["I"], p["E"], p["topk"]
    scores = torch.softmax(rnd.normal(T, E), dim=-1)
    weights, ids = torch.topk(scores, topk, dim=-1)
    return {"x": rnd.normal(T, H, dtype=dtype), "gate_up": rnd.normal(E, 2 * I, H, dtype=dtype, scale=H ** -0.5),
            "down": rnd.normal(E, H, I, dtype=dtype, scale=I ** -0.5), "weights": weights.float(),
            "ids": ids.to(torch.int32 if T % 2 else torch.int64), "topk": topk, "renorm": p["renorm"]}


def _moe_run(x):
    return {"out": ops.fused_moe(x["x"], x["gate_up"], x["down"], x["weights"], x["ids"], x["topk"], x["renorm"],
                                 None)}


def _linear_cases(quick):
    if quick:
        return [dict(shape=(3, 16), N=24, bias=True), dict(shape=(2, 3, 17), N=5, bias=False)]
    return [dict(shape=(1, 4096), N=4096, bias=False), dict(shape=(257, 4096), N=6144, bias=True),
            dict(shape=(2, 33, 1000), N=129, bias=True), dict(shape=(1024, 2048), N=512, bias=False)]


def _linear_build(p, dtype, rnd):
    k = p["shape"][-1]
    return {"x": rnd.normal(*p["shape"], dtype=dtype), "w": rnd.normal(p["N"], k, dtype=dtype, scale=k ** -0.5),
            "b": rnd.normal(p["N"], dtype=dtype) if p["bias"] else None}


SPECS: dict[str, OpSpec] = {
    "silu_and_mul": OpSpec("elementwise", _silu_cases, _silu_build, lambda x: {"out": ops.silu_and_mul(x["x"])}),
    "rms_norm": OpSpec("elementwise", _norm_cases, _norm_build,
                       lambda x: {"out": ops.rms_norm(x["hidden"], x["weight"], x["eps"])}),
    "add_rms_norm": OpSpec(
        "elementwise", _norm_cases, lambda p, dt, r: _norm_build(p, dt, r, residual=True),
        lambda x: dict(zip(("normed", "added"), ops.add_rms_norm(x["hidden"], x["residual"], x["weight"], x["eps"])))),
    "apply_rotary_pos_emb": OpSpec("elementwise", _rotary_cases, _rotary_build, _rotary_run),
    "fill_kv_cache": OpSpec("exact", _fill_cases, _fill_build, _fill_run),
    "prefill_attention": OpSpec("matmul", _prefill_cases, _prefill_build, _prefill_run),
    "paged_prefill_attention": OpSpec("matmul", _paged_prefill_cases, _paged_prefill_build, _paged_prefill_run),
    "paged_decode_attention": OpSpec("matmul", _decode_cases, _decode_build, _decode_run),
    "moe_gating_topk_softmax": OpSpec("elementwise", _gating_cases, _gating_build, _gating_run, _gating_check),
    "fused_moe": OpSpec("matmul", _moe_cases, _moe_build, _moe_run),
    "linear": OpSpec("matmul", _linear_cases, _linear_build,
                     lambda x: {"out": ops.linear(x["x"], x["w"], x["b"])}),
    "apply_rotary_pos_emb_fill_kv_cache": OpSpec(
        "elementwise", _rotary_fill_cases, lambda p, dt, r: _fill_build(p, dt, r, rotary=True), _rotary_fill_run),
}


# ------------------------------------------------------------------------------------------ comparison
def compare(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, kind: str,
            ) -> tuple[bool, float, float, str]:
    """``(ok, rel_err, max_abs, why)`` of one output against the reference's."""
    if not isinstance(out, torch.Tensor):
        return False, math.inf, math.inf, f"{name}: expected a tensor, got {type(out).__name__}"
    if tuple(out.shape) != tuple(ref.shape):
        return False, math.inf, math.inf, f"{name}: shape {tuple(out.shape)}, reference {tuple(ref.shape)}"
    if out.dtype != ref.dtype:
        return False, math.inf, math.inf, f"{name}: dtype {out.dtype}, reference {ref.dtype}"
    if ref.dtype in (torch.int32, torch.int64):
        return True, 0.0, 0.0, ""  # integer outputs are judged by the op's own check
    o, r = out.detach().double(), ref.detach().double()
    if kind == "exact":
        same = (o == r) | (torch.isnan(o) & torch.isnan(r))
        bad = int((~same).sum())
        if bad:
            finite = torch.isfinite(o) & torch.isfinite(r)
            max_abs = float((o - r)[finite].abs().max()) if bool(finite.any()) else math.inf
            idx = tuple(int(i) for i in torch.nonzero(~same)[0].tolist())
            return False, math.inf, max_abs, f"{name}: {bad} elements differ (first at {idx}); writes must be exact"
        return True, 0.0, 0.0, ""
    if not bool(torch.isfinite(r).all()):
        return False, math.inf, math.inf, f"{name}: the reference output is not finite (a bug in the kit)"
    bad = ~torch.isfinite(o)
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        return False, math.inf, math.inf, (f"{name}: {int(bad.sum())} NaN/Inf elements (first at {idx}): "
                                           "unwritten output or a read of a slot it must not read")
    diff = o - r
    ref_norm = float(r.norm())
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    ref_max = float(r.abs().max()) if r.numel() else 0.0
    rel = float(diff.norm()) / ref_norm if ref_norm > 0 else (0.0 if max_abs == 0 else math.inf)
    rtol, afrac = TOLERANCES[kind][dtype]
    abs_bound = afrac * max(ref_max, 1e-3)
    if ref_norm == 0:
        ok = max_abs <= abs_bound
        why = "" if ok else f"{name}: max |out - ref| {max_abs:.3e} where the reference is all zeros"
        return ok, (0.0 if ok else math.inf), max_abs, why
    ok = rel <= rtol and max_abs <= abs_bound
    why = "" if ok else (f"{name}: rel err {rel:.3e} (tol {rtol:.0e}), max abs {max_abs:.3e} "
                         f"(tol {abs_bound:.3e})")
    return ok, rel, max_abs, why


# ------------------------------------------------------------------------------------------ the runner
@contextlib.contextmanager
def _forced(vendor: str, op: str):
    """Force ``vendor`` for ``op`` (beats the per-op env var too), restoring the previous state after."""
    with registry._lock:
        had, previous = op in registry._overrides, registry._overrides.get(op)
    registry.set_override(vendor, op=op)
    try:
        yield
    finally:
        with registry._lock:
            if had:
                registry._overrides[op] = previous
            else:
                registry._overrides.pop(op, None)
            registry.clear_selection_cache()


def _describe(p: dict) -> str:
    parts = []
    for k, v in p.items():
        if isinstance(v, torch.dtype):
            v = str(v).replace("torch.", "")
        elif isinstance(v, bool):
            if not v:
                continue
            parts.append(k)
            continue
        elif isinstance(v, tuple):
            v = "x".join(str(t) for t in v) if all(isinstance(t, int) for t in v) else \
                ",".join("+".join(str(s) for s in t) if isinstance(t, tuple) else str(t) for t in v)
        parts.append(f"{k}={v}")
    return " ".join(parts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interpreter_skip(vendor: str, op: str, dtype: torch.dtype) -> str | None:
    """Why a case is skipped on this machine, or None."""
    if (vendor == "triton" and dtype == torch.bfloat16 and op in MATMUL_OPS
            and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        return "bf16 tl.dot is wrong in Triton 3.6's interpreter (TRITON_INTERPRET=1); run bf16 on a GPU"
    return None


_ORACLE: registry.Vendor | None = None


def _oracle_as_vendor() -> registry.Vendor:
    global _ORACLE
    if _ORACLE is None:
        features = frozenset({"strided_cache", "non_causal"})
        _ORACLE = registry.Vendor(
            name=ORACLE_VENDOR, priority=-1000, devices=frozenset({registry.ANY_DEVICE}),
            default_devices=frozenset(), ops={op: oracle.upcast_op(op) for op in oracle.OPS},
            capabilities={op: registry.Capabilities(features=features)
                          for op in ("fill_kv_cache", "prefill_attention", "paged_prefill_attention",
                                     "paged_decode_attention", "apply_rotary_pos_emb_fill_kv_cache")},
            description="dlinfer.testing.oracle: independent float64 math (conformance kit only)")
    return _ORACLE


@contextlib.contextmanager
def _oracle_vendor():
    """Register the float64 oracle as a vendor (never a default; only forced) for the duration; re-entrant."""
    vendor = _oracle_as_vendor()
    with registry._lock:
        current = registry._vendors.get(ORACLE_VENDOR)
        if current is vendor:  # already registered by an enclosing run
            nested = True
        elif current is not None:
            raise RuntimeError(f"a vendor named {ORACLE_VENDOR!r} is already registered; the kit needs the name")
        else:
            nested = False
            registry.register_vendor(vendor)
    try:
        yield
    finally:
        if not nested:
            registry.unregister_vendor(ORACLE_VENDOR)


def run_case(vendor: str, op: str, params: dict, dtype: torch.dtype, device: torch.device, seed: int) -> CaseResult:
    """One case: the vendor and its baseline (``reference``, or the float64 oracle for ``reference``) on
    identical inputs, compared."""
    spec = SPECS[op]
    name = _describe(params)
    dt = str(dtype).replace("torch.", "")
    start = time.perf_counter()
    skip = interpreter_skip(vendor, op, dtype)
    if skip:
        return CaseResult(op, name, dt, SKIPPED, detail=skip)
    baseline = ORACLE_VENDOR if vendor == "reference" else "reference"
    try:
        ref_inputs = spec.build(params, dtype, _Rand(seed, device))
        with _oracle_vendor() if baseline == ORACLE_VENDOR else contextlib.nullcontext(), _forced(baseline, op):
            ref = spec.run(ref_inputs)
        _sync(device)
    except Exception as exc:  # noqa: BLE001 - reported as an error of the kit, never hidden
        return CaseResult(op, name, dt, ERROR,
                          detail=f"the {baseline_for(vendor)} raised {type(exc).__name__}: {exc}",
                          seconds=time.perf_counter() - start)
    try:
        inputs = spec.build(params, dtype, _Rand(seed, device))
        with _forced(vendor, op):
            out = spec.run(inputs)
        _sync(device)
    except NotSupportedError as exc:
        reason, marker = str(exc), "cannot serve this call on "
        if marker in reason:  # keep the reasons, drop the op/vendor/dtype preamble the row already shows
            reason = reason.split(marker, 1)[1].split(": ", 1)[-1]
        return CaseResult(op, name, dt, REFUSED, detail=reason, seconds=time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001
        return CaseResult(op, name, dt, ERROR, detail=f"{type(exc).__name__}: {exc}",
                          seconds=time.perf_counter() - start)
    worst_rel, worst_abs, problems = 0.0, 0.0, []
    if set(out) != set(ref):
        problems.append(f"outputs {sorted(out)} vs reference {sorted(ref)}")
    for key in ref:
        if key not in out:
            continue
        ok, rel, max_abs, why = compare(key, out[key], ref[key], dtype, spec.kind)
        worst_rel, worst_abs = max(worst_rel, rel), max(worst_abs, max_abs)
        if not ok:
            problems.append(why)
    if spec.extra_check is not None and not problems:
        problems.extend(spec.extra_check(out, ref, inputs, dtype))
    status = FAIL if problems else PASS
    return CaseResult(op, name, dt, status, worst_rel, worst_abs, "; ".join(problems),
                      time.perf_counter() - start)


def environment(device: torch.device) -> dict[str, Any]:
    env = {"dlinfer": dlinfer.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "platform": platform.platform(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "")}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def run_conformance(vendor: str, device: str | torch.device | None = None, quick: bool = False,
                    ops: Iterable[str] | None = None, seed: int | None = None,
                    dtypes: Iterable[torch.dtype] = DTYPES,
                    progress: Callable[[str], None] | None = None) -> Report:
    """Test ``vendor`` against ``reference`` on ``device`` (default: this machine's default device).

    ``reference`` itself is tested against the independent float64 oracle (:mod:`dlinfer.testing.oracle`).

    Args:
        vendor: a registered vendor name.
        device: where to run; default ``dlinfer.vendor.default_device_type()``.
        quick: a small matrix (tiny shapes; what CI runs under ``TRITON_INTERPRET=1``).
        ops: op names to test (default every op of the contract).
        seed: random seed (default: fresh); the report records it so a failure can be replayed.
        dtypes: dtypes to test.
        progress: called with one line per op as it finishes (e.g. ``print``).

    Raises:
        ValueError: an unknown vendor or op name.
    """
    vend = registry.get_vendor(vendor)
    device = torch.device(device if device is not None else registry.default_device_type())
    selected = list(ALL_OPS) if ops is None else list(ops)
    unknown = [op for op in selected if op not in SPECS]
    if unknown:
        raise ValueError(f"ops: unknown op(s) {unknown}; known: {', '.join(ALL_OPS)}")
    if seed is None:
        seed = random.SystemRandom().randrange(2 ** 31)
    dtypes = tuple(dtypes)
    results: list[CaseResult] = []
    not_provided: list[str] = []
    start = time.perf_counter()
    with _oracle_vendor() if vendor == "reference" else contextlib.nullcontext():
        _run_ops(vendor, vend, selected, quick, seed, dtypes, device, results, not_provided, progress)
    return Report(vendor, str(device), quick, seed, results, not_provided, time.perf_counter() - start,
                  environment(device))


def _run_ops(vendor, vend, selected, quick, seed, dtypes, device, results, not_provided, progress) -> None:
    for n, op in enumerate(selected, 1):
        if not vend.provides(op):
            not_provided.append(op)
            if progress:
                progress(f"[{n}/{len(selected)}] {op}: n/a ({vendor} does not provide it)")
            continue
        op_start = time.perf_counter()
        rows = []
        for i, params in enumerate(SPECS[op].cases(quick)):
            for j, dtype in enumerate(dtypes):
                rows.append(run_case(vendor, op, params, dtype, device, seed + 7919 * i + j))
        results.extend(rows)
        if progress:
            counts = {k: sum(r.status == k for r in rows) for k in (PASS, FAIL, ERROR, REFUSED, SKIPPED)}
            worst = max((r.rel_err for r in rows if r.rel_err is not None and r.status == PASS), default=None)
            text = (f"[{n}/{len(selected)}] {op}: {len(rows)} cases, {counts[PASS]} pass, "
                    f"{counts[FAIL] + counts[ERROR]} fail, {counts[REFUSED]} refused, {counts[SKIPPED]} skipped")
            if worst is not None:
                text += f", worst rel err {worst:.2e}"
            progress(text + f" ({time.perf_counter() - op_start:.1f} s)")


__all__ = ["ALL_OPS", "ORACLE_LABEL", "CaseResult", "OpSummary", "Report", "SPECS", "TOLERANCES", "baseline_for",
           "compare", "run_case", "run_conformance"]
