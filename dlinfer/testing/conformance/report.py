"""The report model: one :class:`CaseResult` per case, an :class:`OpSummary` per op, a :class:`Report` per run
(table, JSON)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import dlinfer.ops as ops

PASS, FAIL, ERROR, REFUSED, NA, SKIPPED = "pass", "fail", "error", "refused", "n/a", "skipped"

ORACLE_VENDOR = "float64_oracle"  # the temporary vendor serving dlinfer.testing.oracle
ORACLE_LABEL = "float64 oracle"


def baseline_for(vendor: str) -> str:
    """What ``vendor`` is compared against: the float64 oracle for ``reference``, else ``reference``."""
    return ORACLE_LABEL if vendor == "reference" else "reference"


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
        ops_seen = [op for op in (*ops.CORE_OPS, *ops.EXTRA_OPS) if op in self.not_provided or any(r.op == op for r in self.results)]
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
