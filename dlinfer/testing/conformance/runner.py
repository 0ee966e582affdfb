"""The runner: each case twice on identical inputs (the vendor under test forced, then its baseline), compared."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

import dlinfer
import dlinfer.ops as ops
from dlinfer import settings
from dlinfer.ops import table
from dlinfer.errors import NotSupportedError
from dlinfer.testing import oracle
from dlinfer.testing.conformance.cases import SPECS
from dlinfer.testing.conformance.compare import compare
from dlinfer.testing.conformance.inputs import Rand
from dlinfer.testing.conformance.report import (ERROR, FAIL, ORACLE_VENDOR, PASS, REFUSED, SKIPPED, CaseResult,
                                                Report, baseline_for)
from dlinfer.vendor import registry

ALL_OPS: tuple[str, ...] = tuple(ops.CORE_OPS) + tuple(ops.EXTRA_OPS)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Ops whose Triton kernels use tl.dot, which Triton 3.6's interpreter computes wrongly in bfloat16.
MATMUL_OPS = frozenset({"prefill_attention", "paged_prefill_attention", "paged_decode_attention", "fused_moe",
                        "linear", "weight_quant_matmul"})


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
            and settings.flag("TRITON_INTERPRET")):
        return "bf16 tl.dot is wrong in Triton 3.6's interpreter (TRITON_INTERPRET=1); run bf16 on a GPU"
    return None


_ORACLE: registry.Vendor | None = None


def _oracle_as_vendor() -> registry.Vendor:
    global _ORACLE
    if _ORACLE is None:
        _ORACLE = registry.Vendor(
            name=ORACLE_VENDOR, priority=-1000, devices=frozenset({registry.ANY_DEVICE}),
            default_devices=frozenset(), ops={op: oracle.upcast_op(op) for op in oracle.OPS},
            capabilities={d.name: registry.Capabilities(features=d.features)
                          for d in table.TABLE if d.features and d.name in oracle.OPS},
            description="dlinfer.testing.oracle: independent float64 math (conformance kit only)")
    return _ORACLE


# Serving warm-ups a correctness check must not pay for: the fused-MoE precompile (on a GPU, the first call of a
# shape compiles the kernel variants of every token bucket up to 8192 tokens, 9 to 28 per shape and dtype: the quick
# matrix's fused_moe and fused_moe_w8a8 cases, 15 shapes x dtypes, made 219 Triton compiles where their own calls
# need 61) and the fused-MoE autotune on first use (cards without a shipped table: up to 20 s per shape bucket).
# Neither changes what a case computes: the cases run the table's configs (or the generic tiers'). A check turns
# them off unless the environment sets them explicitly.
WARMUP_SWITCHES = ("DLINFER_PRECOMPILE", "DLINFER_AUTOTUNE")


def warmups_left_on() -> list[str]:
    """The :data:`WARMUP_SWITCHES` the environment leaves unset (or empty): those a check turns off."""
    return [name for name in WARMUP_SWITCHES if not os.environ.get(name, "").strip()]


@contextlib.contextmanager
def _warmups_off():
    """Set each of :func:`warmups_left_on` to ``0`` for the duration; yields the values in force."""
    saved = {name: os.environ.get(name) for name in warmups_left_on()}
    for name in saved:
        os.environ[name] = "0"
    try:
        yield {name: os.environ[name] for name in WARMUP_SWITCHES if name in os.environ}
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _oracle_vendor():
    """Register the float64 oracle as a vendor (never a default; only forced) for the duration; re-entrant."""
    vendor = _oracle_as_vendor()
    current = registry.vendors().get(ORACLE_VENDOR)
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
        ref_inputs = spec.build(params, dtype, Rand(seed, device))
        with _oracle_vendor() if baseline == ORACLE_VENDOR else contextlib.nullcontext(), registry.forced(baseline, op):
            ref = spec.run(ref_inputs)
        _sync(device)
    except Exception as exc:  # noqa: BLE001 - reported as an error of the kit, never hidden
        return CaseResult(op, name, dt, ERROR,
                          detail=f"the {baseline_for(vendor)} raised {type(exc).__name__}: {exc}",
                          seconds=time.perf_counter() - start)
    try:
        inputs = spec.build(params, dtype, Rand(seed, device))
        with registry.forced(vendor, op):
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
    empty = _tests_nothing(ref, ref_inputs, spec.build(params, dtype, Rand(seed, device)))
    if empty:
        problems.append(f"the case tests nothing ({empty}): a kit bug, never a pass")
    poisoned = bool(params.get("poison"))
    if poisoned and not any(bool(t.isnan().any()) for t in ref.values()
                            if isinstance(t, torch.Tensor) and t.is_floating_point()):
        problems.append(f"the case puts NaN into the inputs but the {baseline_for(vendor)}'s outputs hold no NaN: "
                        "NaN in must give NaN out")
    if set(out) != set(ref):
        problems.append(f"outputs {sorted(out)} vs reference {sorted(ref)}")
    for key in ref:
        if key not in out:
            continue
        ok, rel, max_abs, why = compare(key, out[key], ref[key], dtype, spec.kind, nonfinite=poisoned)
        worst_rel, worst_abs = max(worst_rel, rel), max(worst_abs, max_abs)
        if not ok:
            problems.append(why)
    if spec.extra_check is not None and not problems:
        problems.extend(spec.extra_check(out, ref, inputs, dtype))
    status = FAIL if problems else PASS
    return CaseResult(op, name, dt, status, worst_rel, worst_abs, "; ".join(problems),
                      time.perf_counter() - start)


def _tensors(x, path=()):
    """``(path, tensor)`` of every tensor in a case's inputs (dict values, list and tuple items)."""
    if isinstance(x, torch.Tensor):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _tensors(v, path + (k,))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _tensors(v, path + (i,))


def _at(x, path):
    for key in path:
        x = x[key]
    return x


def _tests_nothing(ref: dict, inputs: dict, fresh: dict) -> str:
    """Why a case exercises no write (``""`` when it does): every output is empty, or is an input buffer the
    baseline left exactly as the case built it (e.g. a cache write whose every token is padding, which any
    vendor passes however wrong its slot arithmetic)."""
    tensors = list(_tensors(inputs))
    for out in ref.values():
        if not isinstance(out, torch.Tensor):
            return ""
        if out.numel() == 0:
            continue
        path = next((p for p, t in tensors if t is out), None)
        if path is None:
            return ""  # a new tensor: the op wrote it
        before = _at(fresh, path)
        same = (out == before) | (out.isnan() & before.isnan()) if out.is_floating_point() else out == before
        if not bool(same.all()):
            return ""
    return "every output is empty or an input left unchanged by the baseline"


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
                    progress: Callable[[str], None] | None = None,
                    starting: Callable[[str], None] | None = None) -> Report:
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
        starting: called with one line per op (``[10/19] fused_moe: 6 cases ...``) before its first case runs,
            so that an op that never finishes is named.

    Serving warm-ups (:data:`WARMUP_SWITCHES`: the fused-MoE precompile and autotune) are off for the run unless
    the environment sets them; the report's environment records the values in force.

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
    with _warmups_off() as warmups, _oracle_vendor() if vendor == "reference" else contextlib.nullcontext():
        _run_ops(vendor, vend, selected, quick, seed, dtypes, device, results, not_provided, progress, starting)
    env = environment(device)
    env.update(warmups)
    return Report(vendor, str(device), quick, seed, results, not_provided, time.perf_counter() - start, env)


def _run_ops(vendor, vend, selected, quick, seed, dtypes, device, results, not_provided, progress,
             starting=None) -> None:
    for n, op in enumerate(selected, 1):
        if not vend.provides(op):
            not_provided.append(op)
            if progress:
                progress(f"[{n}/{len(selected)}] {op}: n/a ({vendor} does not provide it)")
            continue
        op_start = time.perf_counter()
        cases = list(SPECS[op].cases(quick))
        if starting:
            starting(f"[{n}/{len(selected)}] {op}: {len(cases) * len(dtypes)} cases ...")
        rows = []
        for i, params in enumerate(cases):
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
