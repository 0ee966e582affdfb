"""The registry's public API: forced(), pinned(), snapshot()/restore(), Call.key(), thread safety, and warnings
that reach a plain script's stderr once per cause."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

import dlinfer.ops as ops
from dlinfer.errors import NotSupportedError
from dlinfer.vendor.registry import Call, Registry, Vendor


def _vendor(name, calls, priority=-5, default=()):
    def silu(x):
        calls.append(name)
        return torch.nn.functional.silu(x[..., : x.shape[-1] // 2]) * x[..., x.shape[-1] // 2:]

    return Vendor(name=name, priority=priority, devices=frozenset({"cpu"}), default_devices=frozenset(default),
                  ops={"silu_and_mul": silu})


def test_call_key_round_trips():
    call = Call("paged_decode_attention", "cuda", torch.float16, 128, 128, 64, frozenset({"strided_cache"}))
    assert Call(*call.key()) == call
    assert call.key() == Call.make_key("paged_decode_attention", "cuda", torch.float16, 128, 128, 64,
                                       frozenset({"strided_cache"}))


def test_forced_restores_the_previous_override(isolated_registry):
    calls = []
    isolated_registry.register_vendor(_vendor("aaa", calls))
    isolated_registry.register_vendor(_vendor("bbb", calls))
    isolated_registry.set_override("bbb", op="silu_and_mul")
    with isolated_registry.forced("aaa", "silu_and_mul"):
        ops.silu_and_mul(torch.randn(2, 4))
        with isolated_registry.forced(None, "silu_and_mul"):  # lifted for the inner block
            ops.silu_and_mul(torch.randn(2, 4))
    ops.silu_and_mul(torch.randn(2, 4))
    assert calls == ["aaa", "bbb"]  # the middle call went to reference
    assert isolated_registry.forced_vendor("silu_and_mul")[0] == "bbb"
    with pytest.raises(ValueError, match="unknown vendor 'nope'"):
        with isolated_registry.forced("nope"):
            pass


def test_snapshot_and_restore():
    reg = Registry()
    snap = reg.snapshot()
    calls = []
    reg.register_vendor(_vendor("extra", calls))
    reg.set_override("extra")
    assert "extra" in reg.vendors()
    reg.restore(snap)
    assert "extra" not in reg.vendors() and reg.forced_vendor("silu_and_mul") == (None, "")
    with pytest.raises(TypeError, match="snapshot"):
        reg.restore({})


def test_pinned_hides_installed_plugins_for_the_block():
    reg = Registry()
    reg.register_vendor(_vendor("developer_plugin", [], priority=500, default=("cpu",)))
    with reg.pinned("reference"):
        assert set(reg.vendors()) == {"reference"}
        assert reg.vendor_for_device("cpu", "silu_and_mul") == "reference"
    assert reg.vendor_for_device("cpu", "silu_and_mul") == "developer_plugin"
    with pytest.raises(ValueError, match="unknown vendor"):
        with reg.pinned("nope"):
            pass


def test_ops_from_several_threads_while_another_changes_the_override(isolated_registry):
    """Every call is served by one of the two vendors, correctly, while the override flips underneath."""
    calls = []
    isolated_registry.register_vendor(_vendor("flip", calls))
    x = torch.randn(8, 16)
    want = torch.nn.functional.silu(x[:, :8]) * x[:, 8:]
    errors, stop = [], threading.Event()

    def worker():
        try:
            while not stop.is_set():
                if not torch.allclose(ops.silu_and_mul(x), want):
                    raise AssertionError("wrong result")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(200):
        isolated_registry.set_override("flip" if i % 2 else None, op="silu_and_mul")
        with isolated_registry.forced("reference" if i % 3 else "flip", "silu_and_mul"):
            time.sleep(0.0002)
        time.sleep(0.0002)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert calls  # the flipping vendor did serve some calls


_SCRIPT = """
import warnings, torch
import dlinfer.ops as ops
from dlinfer.vendor import registry, Vendor, Capabilities
v = Vendor(name="fp32only", priority=50, devices=frozenset({"cpu"}), default_devices=frozenset({"cpu"}),
           ops={"silu_and_mul": lambda x: x}, capabilities={"silu_and_mul": Capabilities(dtypes=frozenset({torch.float32}))})
registry.register_vendor(v)
for _ in range(3):
    ops.silu_and_mul(torch.randn(2, 4, dtype=torch.float16))
    registry.clear_selection_cache()
"""


def test_fallback_warning_reaches_stderr_of_a_plain_script_once():
    run = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "falls back" in line]
    assert len(lines) == 1, run.stderr
    assert "fp32only" in lines[0] and "float16" in lines[0] and "DlinferWarning" in lines[0]


def test_preferred_weight_layout_asks_the_vendor_that_serves_the_call(isolated_registry):
    """An engine asks once, at load, which layout of an op's weights to keep: the vendor serving such calls on the
    device (overrides included) answers through its weight_layout hook; none, or no answer, is the contract's
    K-fastest layout (so is a call no vendor may serve); an answer outside the two layouts is a ValueError naming
    the vendor."""
    asked = []

    def hook(answer):
        def weight_layout(op, device, dtype):
            asked.append((op, device.type, dtype))
            return answer
        return weight_layout

    def vendor(name, answer, priority):
        return Vendor(name=name, priority=priority, devices=frozenset({"cpu"}), default_devices=frozenset({"cpu"}),
                      ops={"fused_moe": lambda *a: None}, weight_layout=hook(answer))

    assert isolated_registry.preferred_weight_layout("fused_moe", "cpu", torch.bfloat16) == "k_fastest"
    isolated_registry.register_vendor(vendor("nfast", "n_fastest", 50))
    assert isolated_registry.preferred_weight_layout("fused_moe", "cpu", torch.bfloat16) == "n_fastest"
    assert asked == [("fused_moe", "cpu", torch.bfloat16)]
    isolated_registry.register_vendor(vendor("quiet", None, 60))  # serves first, says nothing
    assert isolated_registry.preferred_weight_layout("fused_moe", torch.device("cpu"), torch.float16) == "k_fastest"
    with isolated_registry.forced("nfast", "fused_moe"):
        assert isolated_registry.preferred_weight_layout("fused_moe", "cpu", torch.float16) == "n_fastest"
        # a call nothing may serve (the forced vendor has no such device): the contract's layout, and the call
        # itself raises, not the engine's load
        assert isolated_registry.preferred_weight_layout("fused_moe", "meta", torch.float16) == "k_fastest"
        with pytest.raises(NotSupportedError, match="forced"):
            isolated_registry.select(Call("fused_moe", "meta", torch.float16))
    isolated_registry.register_vendor(vendor("odd", "column_major", 70))
    with pytest.raises(ValueError, match="vendor odd: weight_layout"):
        isolated_registry.preferred_weight_layout("fused_moe", "cpu", torch.float16)
