"""The GPU's clocks, power and temperature sampled beside a benchmark, summarized per phase (one timed pass, say).

An end-to-end throughput that moves by tens of percent from one pass to the next has a cause; this module rules
one family of causes in or out: the card slowing down (power or thermal capping, clocks dropping between passes)
while the software did the same work. ``nvidia-smi`` samples the SM and memory clocks, the power draw, the
temperature and the active clock-event (throttle) reasons every ``interval_ms``; :meth:`GpuMonitor.phase` brackets
a phase; :meth:`GpuMonitor.summary` gives per phase the samples' count, SM clock min / median / max, memory clock
min, power max, temperature max and every throttle reason seen (decoded from nvidia-smi's bit mask, idle
excluded). Without ``nvidia-smi`` (a CPU machine) every summary is ``None`` and nothing else changes::

    monitor = GpuMonitor(device_index=0)
    monitor.start()
    with monitor.phase("pass 1"):
        run()
    monitor.stop()
    monitor.summary("pass 1")  # {"samples": 40, "sm_mhz_min": 1980, ...}
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time

QUERY = "clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active"
# the same with the field's name before nvidia-smi 535 (newer drivers still accept it, older ones only it)
QUERY_OLD = QUERY.replace("clocks_event_reasons", "clocks_throttle_reasons")
# nvidia-smi's clock-event reason bits (nvml.h: nvmlClocksEventReason*)
REASONS = {0x1: "idle", 0x2: "application clocks setting", 0x4: "software power cap", 0x8: "hardware slowdown",
           0x10: "sync boost", 0x20: "software thermal slowdown", 0x40: "hardware thermal slowdown",
           0x80: "hardware power brake", 0x100: "display clock setting"}


def reasons(mask: int) -> list[str]:
    """The clock-event reasons in ``mask`` (idle left out: a card waiting for work is not a slow card)."""
    return [name for bit, name in REASONS.items() if mask & bit and bit != 0x1]


def parse_line(line: str) -> dict | None:
    """One ``nvidia-smi --format=csv,noheader,nounits`` line of :data:`QUERY`, or None for a malformed one."""
    fields = [f.strip() for f in line.split(",")]
    if len(fields) != 5:
        return None
    try:
        return {"sm_mhz": float(fields[0]), "mem_mhz": float(fields[1]), "power_w": float(fields[2]),
                "temp_c": float(fields[3]), "reasons": int(fields[4], 16) if fields[4].startswith("0x")
                else int(fields[4])}
    except ValueError:  # "[N/A]" and the like
        return None


class GpuMonitor:
    """Samples of one GPU from a background ``nvidia-smi`` loop, grouped into named phases."""

    def __init__(self, device_index: int = 0, interval_ms: int = 200, command: list[str] | None = None):
        exe = shutil.which("nvidia-smi")
        self.command = command
        if command is None and exe:
            query = QUERY
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # one sample: is the query understood?
                once = subprocess.run([exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                                       f"--id={device_index}"], capture_output=True, text=True, timeout=20)
                query = QUERY if once.returncode == 0 and parse_line(once.stdout.splitlines()[0] if once.stdout
                                                                     else "") else QUERY_OLD
            self.command = [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits", f"-lms={interval_ms}",
                            f"--id={device_index}"]
        self.samples: list[tuple[float, dict]] = []
        self.phases: dict[str, tuple[float, float]] = {}
        self._proc = None
        self._thread = None

    @property
    def available(self) -> bool:
        return self.command is not None

    def start(self) -> None:
        if not self.available or self._proc is not None:
            return
        try:
            self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.command = None
            return
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            sample = parse_line(line)
            if sample is not None:
                self.samples.append((time.monotonic(), sample))

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            self._thread.join(timeout=5)
            self._proc = None

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = (t0, time.monotonic())

    def summary(self, name: str) -> dict | None:
        """The samples taken during phase ``name`` (see the module docstring), or None when there are none."""
        if name not in self.phases:
            return None
        t0, t1 = self.phases[name]
        got = [s for t, s in self.samples if t0 <= t <= t1]
        if not got:
            return None
        sm = sorted(s["sm_mhz"] for s in got)
        mask = 0
        for s in got:
            mask |= s["reasons"]
        return {"samples": len(got), "sm_mhz_min": sm[0], "sm_mhz_median": sm[len(sm) // 2], "sm_mhz_max": sm[-1],
                "mem_mhz_min": min(s["mem_mhz"] for s in got), "power_w_max": max(s["power_w"] for s in got),
                "temp_c_max": max(s["temp_c"] for s in got), "reasons": reasons(mask)}

    def describe(self, name: str) -> str:
        """:func:`describe` of phase ``name``'s summary."""
        return describe(self.summary(name))


def describe(summary: dict | None) -> str:
    """One line for a log: the SM clock range, power, temperature and throttle reasons of a phase's summary."""
    if summary is None:
        return "no GPU samples"
    why = ", ".join(summary["reasons"]) or "no throttling"
    return (f"SM {summary['sm_mhz_min']:.0f}-{summary['sm_mhz_max']:.0f} MHz (median "
            f"{summary['sm_mhz_median']:.0f}), <= {summary['power_w_max']:.0f} W, <= {summary['temp_c_max']:.0f} C, "
            f"{why}")
