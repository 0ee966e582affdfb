"""How the conformance kit judges: NaN/Inf cases fail a vendor that masks them, and a case that tests nothing
is never a pass."""

from __future__ import annotations

import pytest
import torch

from dlinfer.testing.conformance import SPECS, run_conformance
from dlinfer.testing.conformance.compare import compare
from dlinfer.testing.conformance.spec import OpSpec
from dlinfer.vendor import Vendor, get_vendor

ATTENTION = ("prefill_attention", "paged_prefill_attention", "paged_decode_attention")


def _register(registry, name, ops):
    registry.register_vendor(Vendor(name=name, priority=-10, devices=frozenset({"cpu"}), default_devices=frozenset(),
                                    ops=ops, capabilities={}))


@pytest.mark.parametrize("op", ATTENTION)
def test_every_attention_op_has_nan_cases_in_both_matrices(op):
    for quick in (True, False):
        assert any(p.get("poison") for p in SPECS[op].cases(quick)), (op, quick)


@pytest.mark.parametrize("op", ATTENTION)
def test_a_vendor_that_turns_nan_into_zeros_fails(isolated_registry, op):
    reference = get_vendor("reference").ops[op]

    def masking(*args):
        reference(*args)
        args[-1].nan_to_num_(0.0, posinf=0.0, neginf=0.0)  # attn_output: what `softmax(...).nan_to_num(0)` gives

    _register(isolated_registry, "masker", {op: masking})
    report = run_conformance("masker", "cpu", quick=True, ops=[op], seed=11, dtypes=[torch.float32])
    failed = {r.case for r in report.failures}
    assert failed and all("poison" in case for case in failed), [r.detail for r in report.failures]
    assert all("NaN" in r.detail or "Inf" in r.detail for r in report.failures)
    assert any(r.status == "pass" for r in report.results)  # the cases without NaN still pass


def test_nonfinite_compare_rules():
    ref = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    ok = compare("out", ref.clone(), ref, torch.float32, "matmul", nonfinite=True)
    assert ok[0]
    masked = torch.tensor([1.0, 0.0, float("inf"), 2.0])
    assert not compare("out", masked, ref, torch.float32, "matmul", nonfinite=True)[0]
    extra_nan = torch.tensor([float("nan"), float("nan"), float("inf"), 2.0])
    assert not compare("out", extra_nan, ref, torch.float32, "matmul", nonfinite=True)[0]
    wrong_inf = torch.tensor([1.0, float("nan"), -float("inf"), 2.0])
    assert not compare("out", wrong_inf, ref, torch.float32, "matmul", nonfinite=True)[0]
    off = torch.tensor([1.5, float("nan"), float("inf"), 2.0])
    assert not compare("out", off, ref, torch.float32, "matmul", nonfinite=True)[0]
    # a case that does not declare NaN inputs: a non-finite reference is a kit bug, never a pass
    assert not compare("out", ref.clone(), ref, torch.float32, "matmul")[0]


def test_a_case_that_tests_nothing_is_not_a_pass(isolated_registry, monkeypatch):
    """A fill_kv_cache case whose every token is padding writes nothing: a vendor with an off-by-one slot
    write would pass it; the kit reports it as a failure (of the case) instead."""
    spec = SPECS["fill_kv_cache"]
    all_padding = dict(T=4, hk=2, d=8, dv=8, block=16, layout="separate", pad=4)
    monkeypatch.setitem(SPECS, "fill_kv_cache", OpSpec(spec.kind, lambda quick: [all_padding], spec.build, spec.run))

    def off_by_one(key, value, key_cache, value_cache, slots, *rest):
        bs = key_cache.shape[1]
        for t, s in enumerate(slots.tolist()):
            if s >= 0:
                key_cache[(s + 1) // bs, (s + 1) % bs] = key[t]
                value_cache[(s + 1) // bs, (s + 1) % bs] = value[t]

    _register(isolated_registry, "offbyone", {"fill_kv_cache": off_by_one})
    report = run_conformance("offbyone", "cpu", quick=True, ops=["fill_kv_cache"], seed=3, dtypes=[torch.float32])
    assert not report.ok
    assert "tests nothing" in report.failures[0].detail
    # the real case set catches the off-by-one
    monkeypatch.setitem(SPECS, "fill_kv_cache", spec)
    report = run_conformance("offbyone", "cpu", quick=True, ops=["fill_kv_cache"], seed=3, dtypes=[torch.float32])
    assert not report.ok and all("elements differ" in r.detail for r in report.failures)


@pytest.mark.parametrize("op", ["fill_kv_cache", "apply_rotary_pos_emb_fill_kv_cache"])
def test_every_cache_write_case_writes_a_token(op):
    for quick in (True, False):
        for p in SPECS[op].cases(quick):
            assert p["pad"] < p["T"], (op, p)


_SCALE_POS = {"prefill_attention": 6, "paged_prefill_attention": 8, "paged_decode_attention": 6}


@pytest.mark.parametrize("op", ATTENTION)
def test_a_vendor_that_ignores_softmax_scale_fails(isolated_registry, op):
    """Every case without an explicit scale uses the default 1/sqrt(D); the sharp-scale cases catch a vendor
    that always uses the default."""
    reference = get_vendor("reference").ops[op]

    def default_scale(*args):
        args = list(args)
        args[_SCALE_POS[op]] = args[0].shape[-1] ** -0.5
        reference(*args)

    _register(isolated_registry, "noscale", {op: default_scale})
    report = run_conformance("noscale", "cpu", quick=True, ops=[op], seed=12, dtypes=[torch.float32])
    failed = {r.case for r in report.failures}
    assert failed and all("scale=" in case for case in failed), failed
