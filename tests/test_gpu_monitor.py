"""benchmarks/gpu_monitor.py: the nvidia-smi sampler's parsing, phases and summaries, on a stand-in command (this
machine has no GPU; the real command is nvidia-smi's CSV loop)."""

from __future__ import annotations

import sys
import time

from benchmarks.gpu_monitor import GpuMonitor, parse_line, reasons

# a stand-in for `nvidia-smi --query-gpu=... -lms=...`: 1980 MHz for 0.6 s, then a power cap at 1600 MHz
FAKE = [sys.executable, "-u", "-c", """
import time
t0 = time.monotonic()
while True:
    capped = time.monotonic() - t0 > 0.6
    mask = "0x0000000000000004" if capped else "0x0000000000000000"
    print(f"{1600 if capped else 1980}, 3201, {690.5 if capped else 420.0}, 61, {mask}", flush=True)
    print("[N/A], [N/A], [N/A], [N/A], [N/A]", flush=True)
    time.sleep(0.02)
"""]


def test_parse_and_reasons():
    assert parse_line("1980, 3201, 420.37, 45, 0x0000000000000001") == {
        "sm_mhz": 1980.0, "mem_mhz": 3201.0, "power_w": 420.37, "temp_c": 45.0, "reasons": 1}
    assert parse_line("[N/A], 1, 2, 3, 0x0") is None and parse_line("garbage") is None
    assert reasons(0x1) == [] and reasons(0x4 | 0x40 | 0x1) == ["software power cap", "hardware thermal slowdown"]


def test_phases_are_summarized_from_the_samples_they_hold():
    monitor = GpuMonitor(command=FAKE)
    monitor.start()
    try:
        with monitor.phase("fast"):
            time.sleep(0.4)
        time.sleep(0.4)
        with monitor.phase("capped"):
            time.sleep(0.4)
    finally:
        monitor.stop()
    fast, capped = monitor.summary("fast"), monitor.summary("capped")
    assert fast["samples"] > 3 and fast["sm_mhz_min"] == fast["sm_mhz_max"] == 1980 and fast["reasons"] == []
    assert capped["sm_mhz_max"] == 1600 and capped["power_w_max"] == 690.5
    assert capped["reasons"] == ["software power cap"]
    assert "1600-1600 MHz" in monitor.describe("capped") and "software power cap" in monitor.describe("capped")
    assert monitor.summary("never") is None and monitor.describe("never") == "no GPU samples"


def test_without_nvidia_smi_nothing_happens(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monitor = GpuMonitor()
    assert not monitor.available
    monitor.start()
    with monitor.phase("p"):
        pass
    monitor.stop()
    assert monitor.summary("p") is None
