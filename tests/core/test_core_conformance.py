"""The conformance kit passes the reference and catches vendors that are wrong in the ways kernels go wrong."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dlinfer.testing import conformance
from dlinfer.testing.conformance import run_conformance
from dlinfer.vendor import Capabilities, Vendor

def ref_ops():
    from dlinfer.vendor import get_vendor

    return get_vendor("reference").ops


def register(registry, name, ops, caps=None):
    registry.register_vendor(Vendor(name=name, priority=-10, devices=frozenset({"cpu"}), default_devices=frozenset(),
                                    ops=ops, capabilities=caps or {}))


def test_reference_passes_quick_matrix_and_json(isolated_registry, tmp_path):
    lines = []
    report = run_conformance("reference", "cpu", quick=True, seed=123, progress=lines.append)
    assert report.ok, report.table()
    assert len(lines) == len(conformance.ALL_OPS)
    assert all(s.status == "pass" for s in report.summaries())
    kinds = {r.op for r in report.results}
    assert kinds == set(conformance.ALL_OPS)
    path = tmp_path / "r.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    assert data["ok"] is True and data["seed"] == 123 and data["vendor"] == "reference"
    assert data["oracle"] == "float64 oracle" and "vs 'float64 oracle'" in report.table()
    # compared with float64 math, not with itself: bf16 rounding inside the reference shows
    worst = {s.op: s.worst_rel_err for s in report.summaries()}
    assert worst["fused_moe"] > 1e-4 and worst["add_rms_norm"] > 1e-4
    assert conformance.ORACLE_VENDOR not in isolated_registry.vendors()  # the temporary vendor is gone
    assert {o["op"] for o in data["ops"]} == set(conformance.ALL_OPS)
    assert data["environment"]["torch"] == torch.__version__


def test_quick_matrix_covers_what_the_kit_promises():
    cases = {op: spec.cases(True) for op, spec in conformance.SPECS.items()}
    decode = cases["paged_decode_attention"]
    assert {c["hq"] // c["hk"] for c in decode} >= {1, 4, 8} and any(c["hk"] == 1 for c in decode)  # GQA + MQA
    assert any(0 in c["lens"] for c in decode)  # zero-length rows
    assert {c["layout"] for c in decode} == {"separate", "packed", "head_major"}  # strided caches
    assert {c["out"] for c in decode} == {"none", "given", "alias"}
    assert any(c["d"] != c["dv"] for c in decode)
    prefill = cases["paged_prefill_attention"]
    assert any(h > 0 for c in prefill for h, _ in c["seqs"]) and any(not c["causal"] for c in prefill)
    full = {op: spec.cases(False) for op, spec in conformance.SPECS.items()}
    assert {c["block"] for c in full["paged_decode_attention"]} == {16, 32, 64, 128}
    assert {c["d"] for c in full["paged_decode_attention"]} >= {64, 80, 96, 128, 256}


def test_wrong_values_fail(isolated_registry):
    def silu_off_by_a_bit(x):
        return (ref_ops()["silu_and_mul"](x).float() * 1.05).to(x.dtype)
    register(isolated_registry, "sloppy", {"silu_and_mul": silu_off_by_a_bit})
    report = run_conformance("sloppy", "cpu", quick=True, ops=["silu_and_mul", "rms_norm"], seed=1)
    assert not report.ok
    s = {x.op: x for x in report.summaries()}
    assert s["silu_and_mul"].status == "FAIL" and s["silu_and_mul"].failed == 6
    assert s["rms_norm"].status == "n/a"
    assert "rel err" in report.failures[0].detail
    assert "FAILED" in report.table()


def test_unwritten_zero_length_rows_fail(isolated_registry):
    def decode_skipping_empty_rows(query, key_cache, value_cache, block_table, kv_seqlens, *rest):
        out = rest[-1]
        keep = out.clone()
        ref_ops()["paged_decode_attention"](query, key_cache, value_cache, block_table, kv_seqlens, *rest)
        empty = kv_seqlens.cpu() == 0
        out[empty] = keep[empty]  # leaves whatever was there (the kit's NaN poison)
    register(isolated_registry, "lazy", {"paged_decode_attention": decode_skipping_empty_rows})
    report = run_conformance("lazy", "cpu", quick=True, ops=["paged_decode_attention"], seed=2)
    fails = report.failures
    assert fails and any("NaN" in f.detail for f in fails)
    # the case with attn_output=None has no zero-length row to catch and passes
    assert any(r.status == "pass" for r in report.results)


def test_reading_past_the_sequence_end_fails(isolated_registry):
    def decode_reading_whole_blocks(query, key_cache, value_cache, block_table, kv_seqlens, max_kv, scale, out):
        """Attends over whole blocks and masks the tail with p = 0: NaN in unused slots leaks through."""
        bs = key_cache.shape[1]
        group = query.shape[1] // key_cache.shape[2]
        for b, n in enumerate(kv_seqlens.tolist()):
            if n == 0:
                out[b] = 0
                continue
            blocks = block_table[b, : (n + bs - 1) // bs].long()
            k = key_cache[blocks].flatten(0, 1).float().repeat_interleave(group, 1)
            v = value_cache[blocks].flatten(0, 1).float().repeat_interleave(group, 1)
            s = torch.einsum("hd,khd->hk", query[b].float(), k) * scale
            p = torch.softmax(s.masked_fill(torch.arange(k.shape[0]) >= n, float("-inf")), -1)
            out[b] = torch.einsum("hk,khd->hd", p, v).to(out.dtype)
    register(isolated_registry, "overread", {"paged_decode_attention": decode_reading_whole_blocks})
    report = run_conformance("overread", "cpu", quick=True, ops=["paged_decode_attention"], seed=3,
                             dtypes=[torch.float32])
    assert not report.ok
    assert any("NaN" in f.detail for f in report.failures)


def test_padding_slot_written_to_the_last_slot_fails(isolated_registry):
    def fill_ignoring_padding(key, value, key_cache, value_cache, slots, *rest):
        bs = key_cache.shape[1]
        s = slots.long()  # -1 indexes the last block's last row: a stray write
        key_cache[s // bs, s % bs] = key
        value_cache[s // bs, s % bs] = value
    register(isolated_registry, "stray", {"fill_kv_cache": fill_ignoring_padding})
    report = run_conformance("stray", "cpu", quick=True, ops=["fill_kv_cache"], seed=4)
    statuses = [r.status for r in report.results]
    assert statuses.count("fail") == 6 and statuses.count("pass") == 3  # the 2 padded cases x 3 dtypes fail
    assert all("elements differ" in f.detail for f in report.failures)


def test_wrong_topk_ids_fail(isolated_registry):
    def gating_wrong_ids(logits, topk):
        w, ids = ref_ops()["moe_gating_topk_softmax"](logits, topk)
        return w, ids.flip(-1)
    register(isolated_registry, "badgate", {"moe_gating_topk_softmax": gating_wrong_ids})
    report = run_conformance("badgate", "cpu", quick=True, ops=["moe_gating_topk_softmax"], seed=5)
    assert not report.ok
    assert "not the top-k" in report.failures[0].detail


def test_refusals_and_exceptions(isolated_registry):
    def boom(*args):
        raise RuntimeError("kernel launch failed")
    register(isolated_registry, "partial", {"silu_and_mul": ref_ops()["silu_and_mul"], "rms_norm": boom},
             caps={"silu_and_mul": Capabilities(dtypes=frozenset({torch.float32}))})
    report = run_conformance("partial", "cpu", quick=True, ops=["silu_and_mul", "rms_norm", "linear"], seed=6)
    s = {x.op: x for x in report.summaries()}
    assert s["silu_and_mul"].status == "pass" and s["silu_and_mul"].refused == 4 and s["silu_and_mul"].passed == 2
    assert "dtype float16 not supported" in s["silu_and_mul"].note
    assert s["rms_norm"].status == "FAIL" and "kernel launch failed" in s["rms_norm"].note
    assert s["linear"].status == "n/a"
    assert not report.ok


def test_only_refusals_is_ok(isolated_registry):
    register(isolated_registry, "refuser", {"silu_and_mul": ref_ops()["silu_and_mul"]},
             caps={"silu_and_mul": Capabilities(dtypes=frozenset())})
    report = run_conformance("refuser", "cpu", quick=True, ops=["silu_and_mul"], seed=7)
    assert report.ok and report.summaries()[0].status == "refused"


def test_interpreter_skips_bf16_matmul_for_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert conformance.interpreter_skip("triton", "paged_decode_attention", torch.bfloat16)
    assert conformance.interpreter_skip("triton", "fused_moe", torch.bfloat16)
    assert conformance.interpreter_skip("triton", "paged_decode_attention", torch.float16) is None
    assert conformance.interpreter_skip("triton", "rms_norm", torch.bfloat16) is None
    assert conformance.interpreter_skip("reference", "paged_decode_attention", torch.bfloat16) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert conformance.interpreter_skip("triton", "paged_decode_attention", torch.bfloat16) is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown vendor"):
        run_conformance("no_such_vendor", "cpu", quick=True)
    with pytest.raises(ValueError, match="unknown op"):
        run_conformance("reference", "cpu", quick=True, ops=["silu"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compare(dtype):
    ref = torch.randn(64, 32).to(dtype)
    assert conformance.compare("o", ref.clone(), ref, dtype, "matmul")[0]
    bad = ref.clone()
    bad[3, 4] = float("nan")
    ok, _, _, why = conformance.compare("o", bad, ref, dtype, "matmul")
    assert not ok and "NaN" in why
    big = ref.clone()
    big[0, 0] += 50
    assert not conformance.compare("o", big, ref, dtype, "elementwise")[0]  # one wrong element is caught
    assert not conformance.compare("o", ref[:10], ref, dtype, "matmul")[0]
    assert conformance.compare("o", torch.zeros(3), torch.zeros(3), dtype, "matmul")[0]
    assert not conformance.compare("o", torch.ones(3), torch.zeros(3), dtype, "matmul")[0]


def _break_reference(monkeypatch, registry, op, fn):
    monkeypatch.setitem(registry.get_vendor("reference").ops, op, fn)
    registry.clear_selection_cache()


@pytest.mark.parametrize("op", ["silu_and_mul", "paged_decode_attention", "fill_kv_cache", "fused_moe"])
def test_a_broken_reference_fails_against_the_oracle(isolated_registry, monkeypatch, op):
    """Reference against itself could never fail; against the float64 oracle a wrong reference does."""
    good = ref_ops()[op]

    def silu_halves_swapped(x):
        gate, up = x.float().chunk(2, dim=-1)
        return (torch.nn.functional.silu(up) * gate).to(x.dtype)

    def decode_scale_off(query, key_cache, value_cache, block_table, kv_seqlens, max_kv, scale, out):
        good(query, key_cache, value_cache, block_table, kv_seqlens, max_kv, scale * 1.25, out)

    def fill_drops_last_token(key, value, key_cache, value_cache, slots, *rest):
        good(key[:-1], value[:-1], key_cache, value_cache, slots[:-1], *rest)

    def moe_without_renormalize(x, gate_up, down, weights, ids, renormalize):
        return good(x, gate_up, down, weights, ids, False)

    broken = {"silu_and_mul": silu_halves_swapped, "paged_decode_attention": decode_scale_off,
              "fill_kv_cache": fill_drops_last_token, "fused_moe": moe_without_renormalize}[op]
    assert run_conformance("reference", "cpu", quick=True, ops=[op, "rms_norm"], seed=8).ok  # the real one passes
    _break_reference(monkeypatch, isolated_registry, op, broken)
    report = run_conformance("reference", "cpu", quick=True, ops=[op, "rms_norm"], seed=8)
    assert not report.ok, report.table()
    s = {x.op: x for x in report.summaries()}
    assert s[op].status == "FAIL" and s["rms_norm"].status == "pass"
    assert all(f.op == op for f in report.failures)
    assert "FAILED" in report.table() and "float64 oracle" in report.table()


def test_oracle_serves_any_dtype_and_keeps_in_place_writes():
    from dlinfer.testing import oracle

    buf = torch.randn(3, 16, 2, 20).to(torch.bfloat16)
    kc, vc = buf[..., :12], buf[..., 12:]  # strided views of one packed buffer
    before = buf.clone()
    k, v = torch.randn(2, 4, 12).to(torch.bfloat16)[:, :2], torch.randn(2, 2, 8).to(torch.bfloat16)
    oracle.upcast_op("fill_kv_cache")(k, v, kc, vc, torch.tensor([5, -1]), [], [], 0)
    assert torch.equal(kc[0, 5], k[0]) and torch.equal(vc[0, 5], v[0])
    before[0, 5] = buf[0, 5]
    assert torch.equal(buf, before)  # nothing else written, the -1 slot skipped
    w, ids = oracle.upcast_op("moe_gating_topk_softmax")(torch.tensor([[1.0, 3.0, 3.0, 0.0]]).half(), 2)
    assert w.dtype == torch.float32 and ids.tolist() == [[1, 2]]  # ties to the lower id
    assert oracle.upcast_op("linear")(torch.ones(2, 3).half(), torch.ones(4, 3).half(), None).dtype == torch.float16
    with pytest.raises(ValueError, match="op"):
        oracle.upcast_op("silu")


def _flag_recorder(seen):
    """silu_and_mul (the reference's) that records DLINFER_PRECOMPILE and DLINFER_AUTOTUNE as each call sees them."""
    from dlinfer import settings

    def silu(x):
        seen.append((settings.flag("DLINFER_PRECOMPILE"), settings.flag("DLINFER_AUTOTUNE")))
        return ref_ops()["silu_and_mul"](x)
    return silu


def test_check_runs_without_serving_warmups(isolated_registry, monkeypatch):
    """The fused-MoE precompile (every token bucket of a shape) and autotune serve engines, not a correctness check:
    a run turns both off unless the environment sets them, and puts the environment back afterwards."""
    monkeypatch.delenv("DLINFER_PRECOMPILE", raising=False)
    monkeypatch.setenv("DLINFER_AUTOTUNE", "")
    seen = []
    register(isolated_registry, "spy", {"silu_and_mul": _flag_recorder(seen)})
    report = run_conformance("spy", "cpu", quick=True, ops=["silu_and_mul"], seed=7)
    assert report.ok and seen and set(seen) == {(False, False)}
    assert "DLINFER_PRECOMPILE" not in os.environ and os.environ["DLINFER_AUTOTUNE"] == ""
    assert report.environment["DLINFER_PRECOMPILE"] == "0" and report.environment["DLINFER_AUTOTUNE"] == "0"
    seen.clear()
    monkeypatch.setenv("DLINFER_PRECOMPILE", "1")  # set explicitly: the check includes it
    report = run_conformance("spy", "cpu", quick=True, ops=["silu_and_mul"], seed=7)
    assert set(seen) == {(True, False)} and report.environment["DLINFER_PRECOMPILE"] == "1"
    assert os.environ["DLINFER_PRECOMPILE"] == "1" and os.environ["DLINFER_AUTOTUNE"] == ""


def test_each_op_is_named_before_it_runs(isolated_registry):
    """An op that never finishes is named: ``starting`` gets the op's line before its first case runs."""
    events = []

    def silu(x):
        events.append("call")
        return ref_ops()["silu_and_mul"](x)
    register(isolated_registry, "slow", {"silu_and_mul": silu})
    run_conformance("slow", "cpu", quick=True, ops=["rms_norm", "silu_and_mul"], seed=8, progress=events.append,
                    starting=events.append)
    assert events[0] == "[1/2] rms_norm: n/a (slow does not provide it)"
    assert events[1] == "[2/2] silu_and_mul: 6 cases ..." and events[2] == "call"
    assert events[-1].startswith("[2/2] silu_and_mul: 6 cases, 6 pass") and events.count("call") == 6
