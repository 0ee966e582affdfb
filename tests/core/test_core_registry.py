"""Vendor registry rules: selection by device and priority, overrides, fallback, loud failure, n/a, plugins."""

from __future__ import annotations

import collections
import importlib.metadata
import logging

import pytest
import torch

import dlinfer
import dlinfer.ops as ops
from dlinfer.errors import NotSupportedError
from dlinfer.vendor import Call, Capabilities, Vendor

F32, F16 = torch.float32, torch.float16


def make_vendor(name, priority=50, devices=("cpu",), default=("cpu",), op_names=("silu_and_mul",), caps=None,
                extra=None, available=None, calls=None):
    calls = calls if calls is not None else collections.Counter()

    def impl_for(op):
        ref = dlinfer.vendor.get_vendor("reference").ops[op]

        def impl(*args):
            calls[op] += 1
            return ref(*args)
        return impl

    vendor = Vendor(name=name, priority=priority, devices=frozenset(devices), default_devices=frozenset(default),
                    ops={op: impl_for(op) for op in op_names}, capabilities=caps or {}, extra_reasons=extra,
                    available=available)
    return vendor, calls


def silu(dtype=F32):
    return ops.silu_and_mul(torch.randn(2, 8).to(dtype))


def served_by(op, dtype=F32, device="cpu", **kw):
    from dlinfer.vendor import registry

    return registry.select(Call(op, device, dtype, **kw))[0].name


# ------------------------------------------------------------------------------------------- selection
def test_highest_priority_default_vendor_serves(isolated_registry):
    low, low_calls = make_vendor("low", priority=10)
    high, high_calls = make_vendor("high", priority=20)
    isolated_registry.register_vendor(low)
    isolated_registry.register_vendor(high)
    silu()
    assert high_calls["silu_and_mul"] == 1 and low_calls["silu_and_mul"] == 0
    assert served_by("silu_and_mul") == "high"
    assert served_by("rms_norm") == "reference"  # neither provides it


def test_selection_is_by_device_type(isolated_registry):
    cuda_only, calls = make_vendor("cudaonly", priority=1000, devices=("cuda",), default=("cuda",))
    runs_cpu_not_default, calls2 = make_vendor("forcedonly", priority=95, devices=("cpu",), default=())
    isolated_registry.register_vendor(cuda_only)
    isolated_registry.register_vendor(runs_cpu_not_default)
    silu()
    assert calls["silu_and_mul"] == 0 and calls2["silu_and_mul"] == 0
    assert served_by("silu_and_mul", device="cuda") == "cudaonly"
    assert served_by("silu_and_mul", device="cpu") == "reference"


def test_selection_is_cached_on_metadata_not_values(isolated_registry):
    asked = collections.Counter()

    def extra(call):
        asked[call] += 1
        return []
    vendor, calls = make_vendor("meta", extra=extra)
    isolated_registry.register_vendor(vendor)
    for _ in range(3):
        ops.silu_and_mul(torch.randn(4, 6))  # different values, same metadata
    assert calls["silu_and_mul"] == 3
    assert sum(asked.values()) == 1
    ops.silu_and_mul(torch.randn(4, 6, dtype=F16))  # new metadata: asked again
    assert sum(asked.values()) == 2


# ------------------------------------------------------------------------------------------- overrides
def test_env_override_for_all_ops(isolated_registry, monkeypatch):
    forced, calls = make_vendor("forced", priority=-5, default=())
    isolated_registry.register_vendor(forced)
    monkeypatch.setenv("DLINFER_VENDOR", "forced")
    isolated_registry.clear_overrides()  # env vars are read at selection time; drop cached selections
    silu()
    assert calls["silu_and_mul"] == 1
    # an op the forced vendor does not provide is served as if nothing were forced
    x = torch.randn(3, 8)
    torch.testing.assert_close(ops.rms_norm(x, torch.ones(8), 1e-6), x * torch.rsqrt(x.pow(2).mean(-1, True) + 1e-6))
    assert served_by("rms_norm") == "reference"


def test_env_override_per_op_beats_global(isolated_registry, monkeypatch):
    a, a_calls = make_vendor("aaa", priority=-5, default=(), op_names=("silu_and_mul", "rms_norm"))
    b, b_calls = make_vendor("bbb", priority=-5, default=(), op_names=("silu_and_mul", "rms_norm"))
    isolated_registry.register_vendor(a)
    isolated_registry.register_vendor(b)
    monkeypatch.setenv("DLINFER_VENDOR", "aaa")
    monkeypatch.setenv("DLINFER_VENDOR_SILU_AND_MUL", "bbb")
    isolated_registry.clear_overrides()
    silu()
    ops.rms_norm(torch.randn(2, 4), torch.ones(4))
    assert b_calls["silu_and_mul"] == 1 and a_calls["silu_and_mul"] == 0
    assert a_calls["rms_norm"] == 1 and b_calls["rms_norm"] == 0


def test_set_override_beats_env_and_clears(isolated_registry, monkeypatch):
    a, a_calls = make_vendor("aaa", priority=-5, default=())
    isolated_registry.register_vendor(a)
    monkeypatch.setenv("DLINFER_VENDOR", "reference")
    isolated_registry.clear_overrides()
    isolated_registry.set_override("aaa", op="silu_and_mul")
    silu()
    assert a_calls["silu_and_mul"] == 1
    isolated_registry.set_override(None, op="silu_and_mul")
    silu()
    assert a_calls["silu_and_mul"] == 1
    isolated_registry.set_override("aaa")
    silu()
    assert a_calls["silu_and_mul"] == 2
    with pytest.raises(ValueError, match="unknown vendor 'nope'"):
        isolated_registry.set_override("nope")


def test_unknown_forced_vendor_fails_loudly(isolated_registry, monkeypatch):
    monkeypatch.setenv("DLINFER_VENDOR", "doesnotexist")
    isolated_registry.clear_overrides()
    with pytest.raises(ValueError, match="unknown vendor 'doesnotexist'.*registered vendors"):
        silu()


# ------------------------------------------------------------------------------- fallback and refusal
def test_automatic_choice_falls_back_to_reference_and_logs_once(isolated_registry, caplog):
    vendor, calls = make_vendor("fp32only", caps={"silu_and_mul": Capabilities(dtypes=frozenset({F32}))})
    isolated_registry.register_vendor(vendor)
    with caplog.at_level(logging.WARNING, logger="dlinfer"):
        silu(F16)
        isolated_registry.clear_selection_cache()  # even when selection runs again, the reason is logged once
        silu(F16)
    assert calls["silu_and_mul"] == 0
    records = [r for r in caplog.records if "falls back" in r.getMessage()]
    assert len(records) == 1
    msg = records[0].getMessage()
    assert "fp32only" in msg and "reference" in msg and "dtype float16 not supported" in msg
    silu(F32)
    assert calls["silu_and_mul"] == 1


def test_forced_vendor_that_refuses_raises_with_every_reason(isolated_registry):
    def extra(call):
        return ["the example chip has no float16 exp unit"] if call.dtype == F16 else []
    vendor, calls = make_vendor(
        "picky", default=(), op_names=("paged_decode_attention",),
        caps={"paged_decode_attention": Capabilities(dtypes=frozenset({F32}), block_sizes=frozenset({64}),
                                                     head_sizes=frozenset({128}))}, extra=extra)
    isolated_registry.register_vendor(vendor)
    isolated_registry.set_override("picky")
    kc = torch.randn(2, 16, 1, 8, dtype=F16)
    with pytest.raises(NotSupportedError) as info:
        ops.paged_decode_attention(torch.randn(1, 2, 8, dtype=F16), kc, kc, torch.zeros(1, 1, dtype=torch.int32), 16,
                                   None, torch.tensor([3]), 3, 2, 1)
    msg = str(info.value)
    for part in ("picky", "forced by set_override", "dtype float16 not supported", "head size 8 not supported",
                 "block size 16 not supported", "no float16 exp unit"):
        assert part in msg, part
    assert calls["paged_decode_attention"] == 0


def test_unavailable_vendor_is_refused_with_its_reason(isolated_registry):
    vendor, _ = make_vendor("nodriver", priority=99, available=lambda: "driver libfoo.so not found")
    isolated_registry.register_vendor(vendor)
    assert served_by("silu_and_mul") == "reference"
    isolated_registry.set_override("nodriver")
    with pytest.raises(NotSupportedError, match="driver libfoo.so not found"):
        silu()


def test_not_provided_is_not_a_refusal(isolated_registry):
    vendor, _ = make_vendor("tiny", default=())
    assert vendor.provides("silu_and_mul") and not vendor.provides("rms_norm")
    assert vendor.not_supported_reasons(Call("rms_norm", "cpu", F32)) == ["does not provide rms_norm"]
    isolated_registry.register_vendor(vendor)
    isolated_registry.set_override("tiny")
    assert served_by("rms_norm") == "reference"


def test_no_vendor_at_all_lists_every_refusal(isolated_registry):
    vendor, _ = make_vendor("fp32only", caps={"silu_and_mul": Capabilities(dtypes=frozenset({F32}))})
    isolated_registry.unregister_vendor("reference")
    isolated_registry.register_vendor(vendor)
    with pytest.raises(NotSupportedError, match="no vendor can serve.*fp32only: dtype float16 not supported"):
        silu(F16)


# ------------------------------------------------------------------------------------- vendor records
def test_vendor_record_validation(isolated_registry):
    with pytest.raises(ValueError, match="lowercase"):
        make_vendor("Bad-Name")
    with pytest.raises(ValueError, match="default_devices must be a subset"):
        make_vendor("x", devices=("cpu",), default=("cuda",))
    with pytest.raises(ValueError, match="capabilities for ops it does not provide"):
        make_vendor("x", caps={"rms_norm": Capabilities()})
    with pytest.raises(TypeError, match="priority must be an int"):
        make_vendor("x", priority=1.5)
    with pytest.raises(TypeError, match="expects a dlinfer.vendor.Vendor"):
        isolated_registry.register_vendor("reference")
    vendor, _ = make_vendor("dup")
    isolated_registry.register_vendor(vendor)
    other, _ = make_vendor("dup")
    with pytest.raises(ValueError, match="already registered"):
        isolated_registry.register_vendor(other)
    isolated_registry.register_vendor(other, replace=True)
    assert isolated_registry.get_vendor("dup") is other


def test_capabilities_reasons_are_sentences():
    caps = Capabilities(dtypes=frozenset({F32}), head_sizes=frozenset({64, 128}), block_sizes=frozenset({16}),
                        features=frozenset({"strided_cache"}))
    call = Call("paged_decode_attention", "cpu", F16, head_size=80, head_size_v=96, block_size=32,
                features=frozenset({"strided_cache", "non_causal"}))
    assert caps.reasons(call) == [
        "dtype float16 not supported (supports float32)",
        "head size 80 not supported (supports [64, 128])",
        "value head size 96 not supported (supports [64, 128])",
        "block size 32 not supported (supports [16])",
        "feature 'non_causal' (attn_mask=[]: non-causal attention) not supported",
    ]
    assert caps.reasons(Call("paged_decode_attention", "cpu", F32, 64, 64, 16, frozenset({"strided_cache"}))) == []


def test_call_features_describe_strided_and_non_causal(isolated_registry):
    seen = []
    vendor, _ = make_vendor("spy", default=(), op_names=("paged_prefill_attention", "fill_kv_cache"),
                            extra=lambda call: seen.append(call) or [])
    isolated_registry.register_vendor(vendor)
    isolated_registry.set_override("spy")
    buf = torch.randn(2, 16, 1, 8 + 4)
    kc, vc = buf[..., :8], buf[..., 8:]
    ops.fill_kv_cache(torch.randn(1, 1, 8), torch.randn(1, 1, 4), kc, vc, torch.tensor([3]))
    ops.paged_prefill_attention(torch.randn(2, 2, 8), None, None, kc, vc, torch.tensor([[0]]), 16, torch.tensor([2]),
                                torch.tensor([4]), 2, 4, 2, 1, [])
    fill, prefill = seen
    assert (fill.head_size, fill.head_size_v, fill.block_size) == (8, 4, 16)
    assert fill.features == frozenset({"strided_cache"})
    assert prefill.features == frozenset({"strided_cache", "non_causal"})


# ---------------------------------------------------------------------------------------------- plugins
class _EP:
    """A stand-in for importlib.metadata.EntryPoint."""

    def __init__(self, name, value, obj=None, exc=None):
        self.name, self.value, self._obj, self._exc = name, value, obj, exc

    def load(self):
        if self._exc is not None:
            raise self._exc
        return self._obj


def rediscover(registry, monkeypatch, entries) -> set[str]:
    """Run discovery again from scratch with ``entries`` as the installed ``dlinfer.vendors`` entry points."""
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: entries if group == "dlinfer.vendors" else [])
    registry.rediscover()
    return set(registry.vendors())


def test_broken_plugins_are_logged_and_skipped(isolated_registry, monkeypatch, caplog):
    good, calls = make_vendor("plugged", priority=60)
    entries = [
        _EP("broken_import", "chipx_dlinfer:VENDOR", exc=ImportError("libchipx.so: cannot open shared object")),
        _EP("not_a_vendor", "math:pi", obj=3.14),
        _EP("factory", "plugged_pkg:make_vendor", obj=lambda: good),
        _EP("clash", "other:VENDOR", obj=make_vendor("reference")[0]),
        _EP("factory_raises", "pkg:make", obj=lambda: 1 / 0),
    ]
    with caplog.at_level(logging.WARNING, logger="dlinfer"):
        names = rediscover(isolated_registry, monkeypatch, entries)
    assert {"reference", "plugged"} <= names
    errors = isolated_registry.load_errors()
    assert set(errors) >= {"broken_import", "not_a_vendor", "clash", "factory_raises"}
    assert "libchipx.so" in errors["broken_import"] and "ImportError" in errors["broken_import"]
    assert "must give a dlinfer.vendor.Vendor" in errors["not_a_vendor"]
    assert "already taken" in errors["clash"]
    assert "ZeroDivisionError" in errors["factory_raises"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipped vendor plugin 'broken_import'" in logged and "libchipx.so" in logged
    silu()
    assert calls["silu_and_mul"] == 1  # the good plugin serves; the reference vendor is intact
    with pytest.raises(ValueError, match="failed to load: ImportError"):
        isolated_registry.get_vendor("broken_import")


# ------------------------------------------------------------------------------------------- vendor_name
def test_vendor_name(isolated_registry, monkeypatch):
    assert dlinfer.vendor.vendor_name == isolated_registry.vendor_for_device(isolated_registry.default_device_type())
    assert isolated_registry.vendor_for_device("cpu") == "reference"
    ascend, _ = make_vendor("ascend", priority=100, devices=("npu",), default=("npu",),
                            op_names=("paged_decode_attention",))
    isolated_registry.register_vendor(ascend)
    assert isolated_registry.vendor_for_device("npu") == "ascend"
    assert isolated_registry.vendor_for_device("cpu") == "reference"
    isolated_registry.set_override("ascend")
    assert isolated_registry.vendor_for_device("cpu") == "ascend"
    with pytest.raises(AttributeError):
        dlinfer.vendor.no_such_attribute  # noqa: B018


def test_plugin_may_use_the_registry_while_it_loads(isolated_registry, monkeypatch, caplog):
    """A plugin module that, at import time, looks up the reference vendor (to reuse its implementations)
    re-enters discovery. That must neither load the plugin twice nor record a bogus load error for it."""
    loads = []

    class SelfReferencingEP(_EP):
        def load(self):
            loads.append(self.name)
            if len(loads) > 1:  # what a real re-import of a half-imported module gives
                raise AttributeError("partially initialized module 'reuse_pkg' has no attribute 'VENDOR'")
            ref = isolated_registry.get_vendor("reference")  # re-enters discovery
            return Vendor(name="reuse", priority=5, devices=frozenset({"cpu"}), default_devices=frozenset(),
                          ops={"silu_and_mul": ref.ops["silu_and_mul"]})

    with caplog.at_level(logging.WARNING, logger="dlinfer"):
        names = rediscover(isolated_registry, monkeypatch, [SelfReferencingEP("reuse", "reuse_pkg:VENDOR")])
    assert "reuse" in names
    assert isolated_registry.load_errors() == {}, "a plugin that loaded fine is reported as failed"
    assert loads == ["reuse"], "the plugin's entry point was loaded twice (re-entrant discovery)"
    assert not [r for r in caplog.records if "skipped vendor plugin" in r.getMessage()]


def test_vendor_name_imports_like_lmdeploy_does():
    from dlinfer.vendor import vendor_name  # LMDeploy: `from dlinfer.vendor import vendor_name`

    assert isinstance(vendor_name, str) and vendor_name in dlinfer.vendor.vendors()
