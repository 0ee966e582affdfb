"""Per-process counts of the dlinfer ops the vLLM adapter called.

vLLM loads plugins in every process and skips a plugin that fails, silently falling back to its own kernels.
These counters are how a test (or ``dlinfer demo``) proves, from inside the process that ran the model, that
each replaced op really ran through ``dlinfer.ops``. Counting costs one dict update per op call.

Under ``torch.compile`` (vLLM's default Inductor mode) the layer ops are traced once and replayed from a
graph, so their Python-side counts stop after tracing; attention runs outside the graph and keeps counting.
Run with ``enforce_eager=True`` for exact counts of every op.
"""

from __future__ import annotations

import os
import threading

import torch

_lock = threading.Lock()
_counts: dict[str, int] = {}


def hit(op: str) -> None:
    """Record one call of the dlinfer op ``op`` (no-op while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return
    _counts[op] = _counts.get(op, 0) + 1


def snapshot() -> dict[str, int]:
    """A copy of the counts so far in this process: ``{op name: calls}``."""
    with _lock:
        return dict(_counts)


def reset(worker=None) -> None:
    """Forget the counts (``worker`` is ignored: ``LLM.collective_rpc(reset)`` passes the worker)."""
    with _lock:
        _counts.clear()


def served_vendors() -> dict[str, list[str]]:
    """Which vendor(s) dlinfer's registry chose for each op dispatched so far in this process.

    Read from the registry's per-call selection cache (every dispatched call's metadata and the vendor that
    served it), so it reports what ran, including fallbacks, not what would be chosen by default.
    """
    from dlinfer.vendor import registry

    out: dict[str, set[str]] = {}
    for call, vendor in registry.selections().items():
        out.setdefault(call.op, set()).add(vendor)
    return {op: sorted(names) for op, names in sorted(out.items())}


def report(worker=None) -> dict:
    """Everything a test needs from a model process: pid, op counts, serving vendors, plugin state.

    Takes an ignored ``worker`` argument so that it can be sent to vLLM workers with
    ``LLM.collective_rpc(report)``.
    """
    from dlinfer.framework import vllm_ext

    return {
        "pid": os.getpid(),
        "counts": snapshot(),
        "vendors": served_vendors(),
        "registered": vllm_ext.registered_ops(),
    }


def model_classes(model) -> dict[str, int]:
    """Class names of what computes in a vLLM model: its modules, attention implementations and MoE methods.

    ``LLM.apply_model(model_classes)`` shows, from the process that holds the model, whether dlinfer's
    classes (``Dlinfer*``) or vLLM's run each op.
    """
    out: dict[str, int] = {}

    def add(obj) -> None:
        name = type(obj).__name__
        out[name] = out.get(name, 0) + 1

    for module in model.modules():
        add(module)
        impl = getattr(module, "impl", None)
        if impl is not None and hasattr(impl, "forward"):
            add(impl)
        method = getattr(module, "quant_method", None)
        if method is not None:
            add(method)
    return dict(sorted(out.items()))
