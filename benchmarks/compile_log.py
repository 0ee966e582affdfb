"""Triton compilations in vLLM's model processes, counted with lmdeploy_e2e.py's ``CompileLog``.

``benchmarks/vllm_gpu.py``'s engine child sends ``install`` and ``take`` to vLLM's workers with
``LLM.collective_rpc`` (and calls them in its own process too): a kernel variant first met inside a timed pass
(a new batch size or token count for vLLM's fused-MoE kernels or dlinfer's) compiles there and costs that pass its
compile time. vLLM cloudpickles these functions by reference, so the worker imports this module: it must be cheap
and safe to import there, and it is (``benchmarks.lmdeploy_e2e`` imports only the standard library at module level;
the children's PYTHONPATH holds the checkout).
"""

from __future__ import annotations

import os

from benchmarks.lmdeploy_e2e import CompileLog

_log: CompileLog | None = None


def install(worker=None) -> int:
    """Start counting this process's Triton compilations (once per process) and return its pid.

    ``worker`` is the vLLM worker that ``LLM.collective_rpc`` passes; it is not needed."""
    global _log
    if _log is None:
        _log = CompileLog()
        _log.install()
    return os.getpid()


def hooked() -> bool:
    """Whether Triton's JIT hooks are this process's log (False: no Triton, not installed, or replaced since, so a
    count of 0 proves nothing)."""
    try:
        from triton import knobs
    except ImportError:
        return False
    return _log is not None and knobs.runtime.jit_post_compile_hook == _log._after


def take(worker=None) -> dict:
    """This process's compilations since the last take: ``{pid, hooked, count, seconds, per_kernel}``."""
    taken = _log.take() if _log is not None else {"count": 0, "seconds": 0.0, "per_kernel": {}}
    return {"pid": os.getpid(), "hooked": hooked(), **taken}


def merge(takes: list[dict]) -> dict:
    """One phase's compilations over processes: count, seconds and per-kernel counts summed, the pids and whether
    every one was hooked. (A take empties its process's log, so two takes of one process count nothing twice.)"""
    total = CompileLog.total(takes)
    return {**total, "seconds": float(total["seconds"]), "pids": sorted({t["pid"] for t in takes}),
            "hooked": bool(takes) and all(t["hooked"] for t in takes)}
