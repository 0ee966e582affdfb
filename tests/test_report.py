"""benchmarks/report.py on a synthetic gpu_suite.py JSON, and the suite's CPU import / --dry-run (no GPU needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_suite, report, timing  # noqa: E402

COPY_GBPS, MATMUL_TFLOPS = 3000.0, 750.0


def _rec(part, op, params, impl, us, nbytes, flops=0.0, ok=True):
    rec = {"part": part, "op": op, "case": gpu_suite._fmt_case(params), "params": params, "impl": impl,
           "bytes": float(nbytes), "flops": float(flops), "note": "", "us": us, "method": "graph", "n": 10,
           "reps": 15, "spread_us": [us * 0.99, us * 1.01],
           "check": {"rel_err": 1e-3 if ok else 0.5, "tol": 2e-2, "ok": ok}}
    rec.update(timing.rates(nbytes, flops, us, COPY_GBPS, MATMUL_TFLOPS))
    return rec


def _bound_us(nbytes):
    return nbytes / (COPY_GBPS * 1e9) * 1e6


def synthetic(date="2026-11-25T22:00:00+00:00"):
    recs = []
    # decode: B=1 ctx=1k block 64 -> dlinfer 1.4x the peer (met); B=256 ctx=16k block 16 -> 80 % of bound (missed)
    small = dict(batch=1, ctx=1024, block=64)
    nb_small = 2 * 1024 * 8 * 128 * 2
    recs += [_rec("decode", "paged_decode_attention", small, "dlinfer", 5.0, nb_small),
             _rec("decode", "paged_decode_attention", small, "lmdeploy", 7.0, nb_small),
             _rec("decode", "paged_decode_attention", small, "torch", 29.0, nb_small)]
    big = dict(batch=256, ctx=16384, block=16)
    nb_big = 2 * 256 * 16384 * 8 * 128 * 2
    recs += [_rec("decode", "paged_decode_attention", big, "dlinfer", _bound_us(nb_big) / 0.80, nb_big),
             _rec("decode", "paged_decode_attention", big, "lmdeploy", _bound_us(nb_big) / 0.85, nb_big),
             {"part": "decode", "op": "paged_decode_attention", "case": gpu_suite._fmt_case(big), "params": big,
              "impl": "torch", "skipped": "gather + SDPA copies 17.2 GB of KV"}]
    # prefill: 1.25x the peer at 4x2048, 0.9x cuDNN
    pf = dict(seqs=4, seqlen=2048)
    flops = 4.0 * 4 * 2048 * 2048 * 32 * 128 / 2
    recs += [_rec("prefill", "prefill_attention", pf, "dlinfer", 400.0, 1e7, flops),
             _rec("prefill", "prefill_attention", pf, "lmdeploy", 500.0, 1e7, flops),
             _rec("prefill", "prefill_attention", pf, "torch", 360.0, 1e7, flops)]
    # rms_norm at 8192: 95 % of bound, parity; one failed correctness check on torch
    for tokens in (1, 256, 8192):
        p = dict(tokens=tokens)
        nb = 2 * tokens * 4096 * 2 + 4096 * 2
        recs += [_rec("norm", "rms_norm", p, "dlinfer", _bound_us(nb) / 0.95 if tokens == 8192 else 2.0, nb),
                 _rec("norm", "rms_norm", p, "lmdeploy", _bound_us(nb) / 0.93 if tokens == 8192 else 2.5, nb),
                 _rec("norm", "rms_norm", p, "torch", 30.0, nb, ok=tokens != 256)]
    # gating: 2.5x torch (missed 3x)
    g = dict(model="qwen3-30b-a3b", tokens=4096, experts=128, topk=8)
    recs += [_rec("gating", "moe_gating_topk_softmax", g, "dlinfer", 10.0, 1e6),
             _rec("gating", "moe_gating_topk_softmax", g, "torch", 25.0, 1e6)]
    eager = {"calls": 1000, "shapes": "decode step",
             "costs": {"floor:noop_custom_op": {"median_us": 8.0}, "rms_norm:dlinfer": {"median_us": 20.0},
                       "rms_norm:lmdeploy": {"median_us": 15.0}, "fused_moe:dlinfer": {"median_us": 40.0},
                       "fused_moe:lmdeploy": {"median_us": 25.0}},
             "pairs": {"rms_norm": {"dlinfer": "rms_norm:dlinfer", "lmdeploy": "rms_norm:lmdeploy"},
                       "fused_moe": {"dlinfer": "fused_moe:dlinfer", "lmdeploy": "fused_moe:lmdeploy"}},
             "broken": {}}
    return {"meta": {"card": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0", "cuda": "13.0",
                     "date": date, "git_commit": "abc123def456", "command": "python3 benchmarks/gpu_suite.py --quick",
                     "peer": "lmdeploy 0.18.0"},
            "ceilings": {"copy_gbps": COPY_GBPS, "matmul_tflops": MATMUL_TFLOPS},
            "parts": {"decode": {"status": "ok", "wall_s": 12.0}},
            "records": recs, "eager": eager,
            "check": {"pytest_graphs": {"passed": 20, "failed": 0, "skipped": 0, "failures": []}}}


def _goals(tmp_path, data):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    runs = report.load_runs([path])
    rows = report.merge_rows(runs)
    return {g.id: g for g in report.evaluate_goals(rows, runs)}, rows


def test_goals_are_computed_from_the_numbers(tmp_path):
    goals, rows = _goals(tmp_path, synthetic())
    # B=1 block 64 passes at 1.4x, B=256 block 16 fails: 0.94x the peer and 80 % of bound
    assert goals["decode_small"].status == "missed"
    assert "B=256 ctx=16k block=16" in goals["decode_small"].detail
    assert goals["decode_bandwidth"].status == "missed"
    assert "80%" in goals["decode_bandwidth"].detail and "missed by 10 points" in goals["decode_bandwidth"].detail
    assert goals["decode_parity"].status == "missed"            # 0.94x < 0.98x
    assert "missed by 0.04×" in goals["decode_parity"].detail
    # prefill 1.25x the peer, but only 1 of the 3 shapes was measured: not "met"
    assert goals["prefill_attention_peer"].status == "not measured"
    assert "2 of 3 expected shapes not measured" in goals["prefill_attention_peer"].detail
    assert goals["prefill_attention_cudnn"].status == "not measured"   # 0.90x cuDNN meets it; 1 of 2 shapes
    assert goals["prefill_attention_cudnn_parity"].status == "missed"  # 0.90x < parity
    assert goals["rms_norm_bound"].status == "met"
    assert goals["rms_norm_parity"].status == "met"
    assert goals["add_rms_norm_bound"].status == "not measured"
    assert goals["gating"].status == "missed" and "2.50×" in goals["gating"].detail
    assert goals["eager"].status == "missed"                     # fused_moe 40 > 25 + 8
    assert "fused_moe" in goals["eager"].detail and "missed by 7.0 µs" in goals["eager"].detail
    ratios = {(r.op, report.label(r)): r.ratio() for r in rows}
    assert ratios[("paged_decode_attention", "B=1 ctx=1k block=64")] == pytest.approx(1.4)


def test_a_wrong_dlinfer_row_misses_its_goal(tmp_path):
    data = synthetic()
    for rec in data["records"]:
        if rec["op"] == "rms_norm" and rec["impl"] == "dlinfer" and rec["params"]["tokens"] == 8192:
            rec["check"] = {"rel_err": 0.3, "tol": 1e-2, "ok": False}
    goals, _ = _goals(tmp_path, data)
    assert goals["rms_norm_bound"].status == "missed"
    assert "failed its correctness check" in goals["rms_norm_bound"].detail


def test_newer_run_replaces_a_row_as_a_whole(tmp_path):
    old, new = synthetic("2026-11-25T20:00:00+00:00"), synthetic("2026-11-25T23:00:00+00:00")
    for rec in new["records"]:
        if rec["op"] == "moe_gating_topk_softmax" and rec["impl"] == "dlinfer":
            rec.update(timing.rates(rec["bytes"], 0.0, 5.0, COPY_GBPS, MATMUL_TFLOPS), us=5.0)
    paths = []
    for name, data in (("b_new.json", new), ("a_old.json", old)):
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(tmp_path / name)
    runs = report.load_runs(paths)
    assert [r.meta["date"][:13] for r in runs] == ["2026-11-25T20", "2026-11-25T23"]
    goals = {g.id: g for g in report.evaluate_goals(report.merge_rows(runs), runs)}
    assert goals["gating"].status == "met"                       # 25 / 5 = 5x torch in the newer run


def test_markdown_report(tmp_path):
    data = synthetic()
    data["budget_skipped"] = {"moe": ["model=qwen3-30b-a3b tokens=4096"]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"gating": "ncu: launch-bound at T=4096 (measured)"}))
    md = tmp_path / "RESULTS.md"
    assert report.main([str(path), "--md", str(md), "--png", "", "--notes", str(notes)]) == 0
    text = md.read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "2.11.0+cu130" in text and "abc123def456" in text
    assert "python3 benchmarks/gpu_suite.py --quick" in text
    assert "### paged_decode_attention" in text and "B=256 ctx=16k block=16" in text
    assert "ncu: launch-bound at T=4096 (measured)" in text
    assert "correctness check FAILED" in text                    # the torch rms_norm row at T=256
    assert "skipped (gather + SDPA copies 17.2 GB of KV)" in text
    assert "CUDA-graph tests: 20 passed, 0 failed" in text
    assert "1 moe case(s) not run (the call's time budget ran out): model=qwen3-30b-a3b tokens=4096" in text
    assert "| fused_moe | 40.0 | lmdeploy | 25.0 | 8.0 | 33.0 | no (+7.0 µs) |" in text


def test_include_appends_other_markdown(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(synthetic()))
    extra = tmp_path / "lmdeploy_e2e.md"
    extra.write_text("## End to end\n\n| model | tok/s |\n|---|---|\n| llama | 1 |\n")
    md = tmp_path / "RESULTS.md"
    assert report.main([str(path), "--md", str(md), "--png", "", "--include", str(extra)]) == 0
    text = md.read_text()
    assert text.rstrip().endswith("| llama | 1 |")
    assert "--include lmdeploy_e2e.md`" in text


def test_unknown_note_id_is_refused(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(synthetic()))
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"no_such_goal": "x"}))
    with pytest.raises(SystemExit):
        report.main([str(path), "--md", str(tmp_path / "R.md"), "--png", "", "--notes", str(notes)])


def test_not_a_suite_json_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"records": []}))
    with pytest.raises(ValueError, match="not a gpu_suite.py result"):
        report.load_runs([path])


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(synthetic()))
    png = tmp_path / "roofline.png"
    assert report.main([str(path), "--md", str(tmp_path / "RESULTS.md"), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![% of bound" in (tmp_path / "RESULTS.md").read_text()


def test_suite_imports_and_dry_runs_on_cpu(capsys):
    assert not torch.cuda.is_initialized()
    assert gpu_suite.main(["--dry-run", "--quick", "--only", "decode,moe,check"]) == 0
    out = capsys.readouterr().out
    assert "parts: check, ceilings, decode, moe (quick)" in out
    assert "decode: 8 case(s)" in out
    assert not torch.cuda.is_initialized()
    with pytest.raises(SystemExit):
        gpu_suite.main(["--dry-run", "--only", "decode,bogus"])


def test_full_grid_has_the_issue_shapes():
    decode = gpu_suite.grid("decode", quick=False)
    assert len(decode) == 24
    assert {(c["batch"], c["ctx"], c["block"]) for c in decode} == {
        (b, c, bs) for b in (1, 16, 64, 256) for c in (1024, 4096, 16384) for bs in (16, 64)}
    assert [(c["seqs"], c["seqlen"]) for c in gpu_suite.grid("prefill", False)] == [(16, 512), (4, 2048), (1, 8192)]
    assert {(c["model"], c["tokens"]) for c in gpu_suite.grid("moe", False)} == {
        (m, t) for m in ("mixtral-8x7b", "qwen3-30b-a3b") for t in (1, 64, 512, 4096)}
    assert [c["tokens"] for c in gpu_suite.grid("norm", False)] == [1, 256, 8192]


def test_suite_parts_run_on_cpu(tmp_path, monkeypatch):
    """Every benchmark part's Python (inputs, peers, checks, records) on tiny CPU shapes, served by the reference
    vendor, with the GPU timing replaced by a stub; then the report reads the JSON it wrote."""
    from benchmarks import peers, timing

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
    monkeypatch.setattr(timing, "gpu_time", lambda fn, flush, graph=True, **k: (fn(), timing.GpuTime(7.0, "stub"))[1])
    monkeypatch.setattr(peers, "torch_prefill_sdpa", lambda q, k, v, scale, backend: torch.nn.functional
                        .scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))

    def varlen(q, k, v, cu, max_seqlen, scale, backend):  # torch's varlen kernels are CUDA-only
        from dlinfer.vendor.reference import attention as ref_attention

        out = torch.empty_like(q)
        ref_attention.prefill_attention(q, k, v, cu, cu, max_seqlen, scale, True, out)
        return out

    monkeypatch.setattr(peers, "torch_prefill_varlen", varlen)
    for name, value in dict(DTYPE=torch.float32, HQ=4, HK=2, HEAD=64, HIDDEN=128, INTER_SILU=96,
                            EAGER_DECODE=(3, 64, 16), EAGER_PREFILL=16).items():
        monkeypatch.setattr(gpu_suite, name, value)
    monkeypatch.setattr(gpu_suite, "MOE_MODELS", {"mixtral-8x7b": dict(experts=4, topk=2, hidden=64, inter=32),
                                                  "qwen3-30b-a3b": dict(experts=8, topk=4, hidden=64, inter=32)})
    tiny = {"decode": [dict(batch=2, ctx=40, block=16)], "prefill": [dict(seqs=2, seqlen=24)],
            "paged_prefill": [dict(seqs=2, seqlen=24)],
            "fill": [dict(kind=k, tokens=t, block=16) for k, t in (("decode", 8), ("prefill", 32), ("rotary_fill", 32))],
            "norm": [dict(tokens=3)], "rotary": [dict(tokens=5)], "act": [dict(tokens=3)],
            "moe": [dict(model="qwen3-30b-a3b", tokens=9)], "gating": [dict(model="mixtral-8x7b", tokens=7)],
            "eager": [dict(calls=3)]}
    monkeypatch.setattr(gpu_suite, "grid", lambda part, quick: tiny.get(part, []))

    class CpuSuite(gpu_suite.Suite):
        def _meta(self):
            return {"card": "cpu (stub timing)", "date": "2026-11-25T00:00:00+00:00", "command": "test"}

        def prepare_bench(self):
            from dlinfer.vendor import registry

            self.flush = lambda: None
            self.triton_vendor = registry.vendors()["reference"]      # what serves CPU tensors here
            self.lmd_error = "no GPU"
            self.ceilings = timing.Ceilings(copy_gbps=COPY_GBPS, matmul_tflops=MATMUL_TFLOPS)

    parts = list(tiny)
    suite = CpuSuite(gpu_suite.parse_args(["--only", ",".join(parts), "--out", str(tmp_path)]), tmp_path / "r.json")
    suite.device = torch.device("cpu")
    for part in parts:
        suite.prepare_bench()
        suite.run(part)
    suite.save()
    records = suite.data["records"]
    timed = [r for r in records if "us" in r]
    assert {r["op"] for r in timed} >= {"paged_decode_attention", "prefill_attention", "paged_prefill_attention",
                                       "fill_kv_cache", "rms_norm", "add_rms_norm", "apply_rotary_pos_emb",
                                       "silu_and_mul", "fused_moe", "moe_gating_topk_softmax"}
    bad = [(r["op"], r["impl"], r.get("error"), r.get("check")) for r in records
           if r.get("error") or (r.get("check") and not r["check"]["ok"])]
    assert not bad, bad
    assert all(r["skipped"] == "no GPU" for r in records if r["impl"] == "lmdeploy")
    assert "floor:noop_custom_op" in suite.data["eager"]["costs"]
    assert not suite.data["eager"]["broken"], suite.data["eager"]["broken"]
    assert "paged_decode_attention:dlinfer" in suite.data["eager"]["costs"]
    gpu_suite.print_goals(tmp_path / "r.json")
    assert report.main([str(tmp_path / "r.json"), "--md", str(tmp_path / "R.md"), "--png", ""]) == 0
    assert "### fused_moe" in (tmp_path / "R.md").read_text()


def test_summary_cards_and_hygiene(tmp_path):
    """The summary opens the report (the developers' end-to-end lines, then one computed op line per card), every
    table names its card, the peer's install path is left out, and correctness runs kept elsewhere are pointed to."""
    h100 = synthetic()
    h100["meta"]["peer"] = "lmdeploy 0.18.0 (/tmp/site/lmdeploy)"
    del h100["check"]
    h200 = synthetic(date="2026-12-04T10:00:00+00:00")
    h200["meta"]["card"] = "NVIDIA H200"
    h200["records"] = [r for r in h200["records"] if r["op"] == "rms_norm"]
    del h200["check"]
    paths = []
    for name, data in (("h100.json", h100), ("h200.json", h200)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(data))
    summary = tmp_path / "summary.md"
    summary.write_text("- **End to end**: 1.06× stock on the H100.\n")
    checks = tmp_path / "checks.md"
    checks.write_text("## GPU correctness runs (H100)\n\n- check: 10 passed\n")
    md = tmp_path / "RESULTS.md"
    assert report.main([*map(str, paths), "--md", str(md), "--png", "", "--summary", str(summary),
                        "--include", str(checks)]) == 0
    text = md.read_text()
    top = text.split("## Summary\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert top[0] == "- **End to end**: 1.06× stock on the H100."
    h100_line = next(line for line in top if line.startswith("- **Ops on NVIDIA H100 80GB HBM3**"))
    # decode: 7/5 = 1.4x at B=1, 0.80/0.85 = 0.94x at B=256 (the peer nearer its bound) -> geometric mean 1.15x
    assert "paged_decode_attention 1.15× (0.94-1.40×)" in h100_line and "prefill_attention 1.25×" in h100_line
    assert any(line.startswith("- **Ops on NVIDIA H200**") and "rms_norm" in line for line in top)
    assert "### paged_decode_attention (NVIDIA H100 80GB HBM3)" in text
    assert "### rms_norm (NVIDIA H200)" in text  # the newer run's rows replace the same shapes of the older one
    assert "## Speed goals (NVIDIA H100 80GB HBM3, NVIDIA H200)" in text
    assert "/tmp/" not in text and "issue" not in text.lower()
    assert 'listed under "GPU correctness runs (H100)" below' in text
    assert "--summary summary.md" in text
